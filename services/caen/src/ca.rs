//! Channel Access behind a small trait: the state machine sees connection and value
//! events and can write a value; nothing else of the CA library leaks out.
//!
//! [`EpicsCa`] implements it with `epics-ca-rs` (pure Rust; it honours the standard
//! `EPICS_CA_*` environment). Reconnection after an IOC restart is the library's: a
//! watched PV reports `Disconnected`, then `Connected` and its current value again.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use epics_base_rs::server::snapshot::DbrClass;
use epics_base_rs::types::{DbFieldType, EpicsValue};
use epics_ca_rs::client::{CaChannel, CaClient, ConnectionEvent};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

/// What a watched PV reports. `slot` is the caller's index for the PV.
#[derive(Debug, Clone, PartialEq)]
pub enum CaEvent {
    /// The PV's channel connected (or reconnected).
    Connected {
        /// Caller's index.
        slot: usize,
    },
    /// The PV's channel was lost (IOC gone, circuit dropped).
    Disconnected {
        /// Caller's index.
        slot: usize,
    },
    /// A monitor update (deadband applied).
    Value {
        /// Caller's index.
        slot: usize,
        /// Numeric value (enum index for enums).
        value: f64,
        /// The enum string, for enum PVs.
        label: Option<String>,
    },
}

/// A value to write.
#[derive(Debug, Clone, PartialEq)]
pub enum PutValue {
    /// A number (converted to the PV's native type).
    Number(f64),
    /// An enum by its string (`On`, `Kill`, `Yes`).
    Label(String),
}

impl std::fmt::Display for PutValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PutValue::Number(v) => write!(f, "{v}"),
            PutValue::Label(l) => f.write_str(l),
        }
    }
}

/// Why a write failed, in words for the operator.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PutError {
    /// The PV's channel is not connected.
    #[error("{0} is not connected")]
    NotConnected(String),
    /// No completion within the timeout.
    #[error("no answer from {0} within {1:?}")]
    Timeout(String, Duration),
    /// The server refused it.
    #[error("{0} refused the write: {1}")]
    Refused(String, String),
}

/// Stops a watch when dropped.
pub struct Watch(JoinHandle<()>);

impl Watch {
    /// A watch run by `task` (for other implementations of [`ChannelAccess`]).
    pub fn new(task: JoinHandle<()>) -> Watch {
        Watch(task)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The Channel Access operations the state machine needs.
pub trait ChannelAccess: Send + Sync + 'static {
    /// Watches `pv`: connection changes and monitor updates (with `deadband`) are sent
    /// on `events` as they happen, until the returned [`Watch`] is dropped.
    fn watch(
        &self,
        slot: usize,
        pv: &str,
        deadband: f64,
        events: UnboundedSender<CaEvent>,
    ) -> Watch;

    /// Writes `value` to `pv` and waits for the server's completion (put with notify).
    fn put(
        &self,
        pv: &str,
        value: PutValue,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), PutError>> + Send;
}

/// [`ChannelAccess`] over `epics-ca-rs`.
pub struct EpicsCa {
    client: Arc<CaClient>,
    /// Channels used for writes, created on first use and kept (a channel costs one
    /// search; its connection follows the IOC by itself).
    put_channels: Mutex<HashMap<String, CaChannel>>,
}

impl EpicsCa {
    /// A client configured from the EPICS environment; `addresses`, when not empty,
    /// replace the search address list.
    pub async fn new(addresses: Vec<SocketAddr>) -> anyhow::Result<EpicsCa> {
        let client = CaClient::new()
            .await
            .map_err(|e| anyhow::anyhow!("cannot start the Channel Access client: {e}"))?;
        if !addresses.is_empty() {
            client.set_address_list(addresses);
        }
        // The library prints libca-style exception banners on stderr by default; one
        // structured log line per event instead.
        client.set_exception_handler(|ex| {
            tracing::warn!(
                message = %ex.message,
                pv = ex.pv_name.as_deref().unwrap_or(""),
                server = ?ex.server_addr,
                "channel access exception"
            );
        });
        Ok(EpicsCa {
            client: Arc::new(client),
            put_channels: Mutex::new(HashMap::new()),
        })
    }

    fn put_channel(&self, pv: &str) -> CaChannel {
        let mut map = match self.put_channels.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(pv.to_string())
            .or_insert_with(|| self.client.create_channel(pv))
            .clone()
    }
}

impl ChannelAccess for EpicsCa {
    fn watch(
        &self,
        slot: usize,
        pv: &str,
        deadband: f64,
        events: UnboundedSender<CaEvent>,
    ) -> Watch {
        let channel = self.client.create_channel(pv);
        Watch(tokio::spawn(watch(
            slot,
            pv.to_string(),
            channel,
            deadband,
            events,
        )))
    }

    async fn put(&self, pv: &str, value: PutValue, timeout: Duration) -> Result<(), PutError> {
        let ch = self.put_channel(pv);
        // A write channel created just now needs its search; one that was connected and
        // is not any more fails fast here instead of after the full timeout.
        if ch
            .wait_connected(timeout.min(Duration::from_secs(2)))
            .await
            .is_err()
        {
            return Err(PutError::NotConnected(pv.to_string()));
        }
        let result = match &value {
            PutValue::Number(v) => ch.put_with_timeout(&EpicsValue::Double(*v), timeout).await,
            PutValue::Label(l) => match tokio::time::timeout(timeout, ch.put_string(l)).await {
                Ok(r) => r,
                Err(_) => Err(epics_base_rs::error::CaError::Timeout),
            },
        };
        result.map_err(|e| {
            // A write channel whose circuit came back while the server did not answer
            // (a hung IOC) keeps "no write access" cached for good: forget it, so the
            // next write makes a fresh one that asks the server again.
            if let Ok(mut map) = self.put_channels.lock() {
                map.remove(pv);
            }
            match e {
                epics_base_rs::error::CaError::Timeout => {
                    PutError::Timeout(pv.to_string(), timeout)
                }
                epics_base_rs::error::CaError::Disconnected => {
                    PutError::NotConnected(pv.to_string())
                }
                other => PutError::Refused(pv.to_string(), other.to_string()),
            }
        })
    }
}

async fn watch(
    slot: usize,
    pv: String,
    ch: CaChannel,
    deadband: f64,
    events: UnboundedSender<CaEvent>,
) {
    let mut conn = ch.connection_events();
    while ch.wait_connected(Duration::from_secs(3600)).await.is_err() {}
    let mut labels = enum_labels(&ch).await;
    let mut stale_labels = false;
    if events.send(CaEvent::Connected { slot }).is_err() {
        return;
    }
    let mut sub = loop {
        match ch.subscribe_with_deadband(deadband).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(%pv, error = %e, "cannot subscribe; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    loop {
        let sent = tokio::select! {
            ev = conn.recv() => match ev {
                Ok(ConnectionEvent::Connected) => {
                    // Reconnected, perhaps to another IOC: its enum strings may differ.
                    // A server that does not answer yet (a hung IOC coming back) keeps
                    // the strings known; they are asked again with the next update.
                    match enum_labels(&ch).await {
                        Some(l) => labels = Some(l),
                        None => stale_labels = true,
                    }
                    events.send(CaEvent::Connected { slot })
                }
                Ok(ConnectionEvent::Disconnected) => events.send(CaEvent::Disconnected { slot }),
                Ok(_) => Ok(()),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Missed transitions: report the state as it is now.
                    if ch.info().await.is_ok() {
                        events.send(CaEvent::Connected { slot })
                    } else {
                        events.send(CaEvent::Disconnected { slot })
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            update = sub.recv() => match update {
                Some(Ok(snap)) => match snap.value.to_f64() {
                    Some(value) => {
                        if stale_labels || labels.is_none() && is_enum(&ch) {
                            if let Some(l) = enum_labels(&ch).await {
                                labels = Some(l);
                                stale_labels = false;
                            }
                        }
                        let label = labels.as_ref().and_then(|l| l.get(value as usize).cloned());
                        events.send(CaEvent::Value { slot, value, label })
                    }
                    None => {
                        tracing::warn!(%pv, value = ?snap.value, "non-numeric update ignored");
                        Ok(())
                    }
                },
                // Disconnection is reported by the connection events; the subscription
                // resumes by itself after a reconnect.
                Some(Err(_)) => Ok(()),
                None => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match ch.subscribe_with_deadband(deadband).await {
                        Ok(s) => sub = s,
                        Err(e) => tracing::debug!(%pv, error = %e, "resubscribe failed"),
                    }
                    Ok(())
                }
            },
        };
        if sent.is_err() {
            return; // the service is gone
        }
    }
}

fn is_enum(ch: &CaChannel) -> bool {
    matches!(ch.native_field_type(), Ok(DbFieldType::Enum))
}

/// The enum strings of an enum PV (DBR_CTRL_ENUM); `None` for other types, and when
/// the server does not give them.
async fn enum_labels(ch: &CaChannel) -> Option<Vec<String>> {
    // One extra round trip per PV at every (re)connect: only enums need it.
    if !is_enum(ch) {
        return None;
    }
    let snap = ch.get_with_metadata(DbrClass::Ctrl).await.ok()?;
    let enums = snap.enums?;
    Some(
        enums
            .strings
            .iter()
            .map(|s| s.as_str_lossy().into_owned())
            .collect(),
    )
}
