//! An MQTT session that looks after itself.
//!
//! [`Session`] wraps a rumqttc client and drives its event loop in a task. It
//! - reconnects with backoff when the broker goes away, forever, logging once per outage;
//! - sets the retained last will `<name>/online = false` and publishes `true` on every
//!   connect (the birth message);
//! - re-subscribes after every reconnect, and republishes the service's retained state
//!   (everything sent with [`Session::publish_state`]): the embedded broker keeps nothing
//!   across a restart, so the services must restore the retained topics themselves;
//! - speaks MQTT 3.1.1 by default and MQTT 5 when configured, in which case a command's
//!   response topic and correlation data are honoured by [`Session::reply`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::command::Reply;
use crate::topic::is_command_topic;

pub use rumqttc::QoS;

/// Where and how a service connects to the broker (the `mqtt:` section of its config).
///
/// `DCS_MQTT_URL`, `DCS_MQTT_USERNAME` and `DCS_MQTT_PASSWORD` override the file (see
/// [`MqttSettings::with_env_overrides`]), so a container can be pointed elsewhere and
/// given its secret without editing configs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSettings {
    /// `mqtt://host:port` (also `tcp://` or bare `host:port`).
    #[serde(default = "default_url")]
    pub url: String,
    /// Login name; anonymous when absent.
    #[serde(default)]
    pub username: Option<String>,
    /// Password in clear; prefer `password_file` or `DCS_MQTT_PASSWORD`.
    #[serde(default)]
    pub password: Option<String>,
    /// A file whose first line is the password (a mounted secret).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Keep-alive interval; must be > 0 (rumqttd drops clients with keep-alive 0).
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u16,
    /// Protocol version: `3.1.1` (default) or `5`.
    #[serde(default)]
    pub version: MqttVersion,
    /// Largest packet sent or accepted, bytes.
    #[serde(default = "default_max_packet")]
    pub max_packet_size: usize,
}

fn default_url() -> String {
    "mqtt://127.0.0.1:1883".into()
}
fn default_keep_alive() -> u16 {
    30
}
fn default_max_packet() -> usize {
    1024 * 1024
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            url: default_url(),
            username: None,
            password: None,
            password_file: None,
            keep_alive_secs: default_keep_alive(),
            version: MqttVersion::default(),
            max_packet_size: default_max_packet(),
        }
    }
}

/// MQTT protocol version a session speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 3.1.1 (protocol level 4); the default, best supported by rumqttd.
    #[default]
    V311,
    /// MQTT 5.
    V5,
}

impl<'de> Deserialize<'de> for MqttVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(f64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Num(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        match text.as_str() {
            "3.1.1" | "4" | "311" => Ok(MqttVersion::V311),
            "5" | "5.0" => Ok(MqttVersion::V5),
            other => Err(serde::de::Error::custom(format!(
                "unknown MQTT version `{other}`: use 3.1.1 or 5"
            ))),
        }
    }
}

impl MqttSettings {
    /// Applies `DCS_MQTT_URL`, `DCS_MQTT_USERNAME`, `DCS_MQTT_PASSWORD` when set.
    pub fn with_env_overrides(mut self) -> Self {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        if let Some(url) = var("DCS_MQTT_URL") {
            self.url = url;
        }
        if let Some(user) = var("DCS_MQTT_USERNAME") {
            self.username = Some(user);
        }
        if let Some(pass) = var("DCS_MQTT_PASSWORD") {
            self.password = Some(pass);
            self.password_file = None;
        }
        self
    }

    /// Host and port from `url`.
    pub fn host_port(&self) -> Result<(String, u16), String> {
        let rest = self
            .url
            .strip_prefix("mqtt://")
            .or_else(|| self.url.strip_prefix("tcp://"))
            .unwrap_or(&self.url);
        if rest.contains("://") {
            return Err(format!(
                "unsupported scheme in `{}`: use mqtt://host:port",
                self.url
            ));
        }
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("`{}` has no port: use mqtt://host:port", self.url))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{port}` in `{}` is not a port number", self.url))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("`{}` has no host", self.url));
        }
        Ok((host.to_string(), port))
    }

    /// The password from `password` or the first line of `password_file`.
    pub fn resolve_password(&self) -> Result<Option<String>, String> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read MQTT password file {}: {e}", path.display()))?;
        Ok(Some(text.lines().next().unwrap_or("").to_string()))
    }

    /// Checks the settings; errors are (key relative to this section, message).
    pub fn check(&self) -> Result<(), (String, String)> {
        self.host_port().map_err(|m| ("url".to_string(), m))?;
        if self.keep_alive_secs == 0 {
            return Err((
                "keep_alive_secs".into(),
                "must be > 0 (a keep-alive of 0 gets the client disconnected by rumqttd)".into(),
            ));
        }
        if self.max_packet_size < 1024 {
            return Err((
                "max_packet_size".into(),
                "must be at least 1024 bytes".into(),
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err((
                "password_file".into(),
                "give either password or password_file, not both".into(),
            ));
        }
        Ok(())
    }
}

/// What a service asks of its session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Service name: topic prefix of `<name>/online`, `<name>/reply`, `<name>/cmd/#`.
    pub name: String,
    /// MQTT client id; unique per broker.
    pub client_id: String,
    /// `false` asks the broker to keep subscriptions and queued QoS 1 messages while the
    /// service is away (persistent session).
    pub clean_session: bool,
    /// Filters subscribed on every connect.
    pub subscriptions: Vec<(String, QoS)>,
    /// QoS 1/2 messages are acknowledged only when the service calls [`Session::ack`]
    /// (e.g. once a message is safely on disk); the broker redelivers the others after
    /// a reconnect.
    pub manual_acks: bool,
}

impl SessionOptions {
    /// Options for service `name`: client id = name, clean session, no subscriptions.
    pub fn new(name: &str) -> Self {
        SessionOptions {
            name: name.to_string(),
            client_id: name.to_string(),
            clean_session: true,
            subscriptions: Vec::new(),
            manual_acks: false,
        }
    }

    /// Adds a subscription.
    pub fn subscribe(mut self, filter: &str, qos: QoS) -> Self {
        self.subscriptions.push((filter.to_string(), qos));
        self
    }
}

/// An application message received by the session.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Topic name.
    pub topic: String,
    /// Payload bytes, unchecked.
    pub payload: Bytes,
    /// Whether the broker delivered it from its retained store.
    pub retain: bool,
    /// MQTT 5 response topic set by the sender.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data set by the sender.
    pub correlation_data: Option<Bytes>,
    /// With [`SessionOptions::manual_acks`], what to pass to [`Session::ack`] (QoS 1/2
    /// messages only).
    pub ack: Option<AckToken>,
}

/// The acknowledgement a manually acknowledged message is owed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    pkid: u16,
    qos: QoS,
}

/// What the session reports to its service.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// Connected (or reconnected); subscriptions and retained state are being restored.
    Connected,
    /// The connection was lost or refused; the session retries by itself.
    Disconnected(String),
    /// An application message.
    Message(Message),
}

/// Errors from building a session or handing it a request.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The settings cannot be used.
    #[error("MQTT settings: {0}")]
    Settings(String),
    /// The session's request queue is closed (the session was shut down).
    #[error("MQTT session closed")]
    Closed,
}

#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

fn qos5(q: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

impl Client {
    async fn publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Bytes,
    ) -> Result<(), SessionError> {
        let r = match self {
            Client::V4(c) => c
                .publish_bytes(topic, qos, retain, payload)
                .await
                .map_err(|_| ()),
            Client::V5(c) => c
                .publish_bytes(topic, qos5(qos), retain, payload)
                .await
                .map_err(|_| ()),
        };
        r.map_err(|_| SessionError::Closed)
    }

    fn try_publish(&self, topic: &str, qos: QoS, retain: bool, payload: Bytes) -> bool {
        match self {
            Client::V4(c) => c.try_publish(topic, qos, retain, payload).is_ok(),
            Client::V5(c) => c.try_publish(topic, qos5(qos), retain, payload).is_ok(),
        }
    }

    async fn subscribe(&self, filter: &str, qos: QoS) -> Result<(), SessionError> {
        let r = match self {
            Client::V4(c) => c.subscribe(filter, qos).await.map_err(|_| ()),
            // Command filters with Retain As Published: a retained command published
            // while we are subscribed arrives with its retain flag, so it is refused
            // and cleared like one from the store (MQTT 3.1.1 clears the flag).
            Client::V5(c) if is_command_topic(filter) => {
                use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule};
                let f = Filter {
                    path: filter.to_string(),
                    qos: qos5(qos),
                    nolocal: false,
                    preserve_retain: true,
                    retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                };
                c.subscribe_many([f]).await.map_err(|_| ())
            }
            Client::V5(c) => c.subscribe(filter, qos5(qos)).await.map_err(|_| ()),
        };
        r.map_err(|_| SessionError::Closed)
    }

    async fn ack(&self, token: AckToken) -> Result<(), SessionError> {
        let r = match self {
            Client::V4(c) => {
                let mut p = rumqttc::Publish::new("", token.qos, Vec::new());
                p.pkid = token.pkid;
                c.ack(&p).await.map_err(|_| ())
            }
            Client::V5(c) => {
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new("", qos5(token.qos), "", None);
                p.pkid = token.pkid;
                c.ack(&p).await.map_err(|_| ())
            }
        };
        r.map_err(|_| SessionError::Closed)
    }

    /// Like [`Client::ack`] without waiting for room in the request queue (for the
    /// event-loop task itself, which is what empties that queue).
    fn try_ack_v5(&self, token: AckToken) -> bool {
        match self {
            Client::V4(_) => false,
            Client::V5(c) => {
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new("", qos5(token.qos), "", None);
                p.pkid = token.pkid;
                c.try_ack(&p).is_ok()
            }
        }
    }

    async fn disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.disconnect().await.map_err(|_| ()),
            Client::V5(c) => c.disconnect().await.map_err(|_| ()),
        };
    }
}

struct Inner {
    name: String,
    client: Client,
    subscriptions: Mutex<Vec<(String, QoS)>>,
    /// Retained state to restore after each reconnect, by topic.
    retained: Mutex<BTreeMap<String, Bytes>>,
    connected: AtomicBool,
    /// The subscriptions of this connection are queued: only then is retained state
    /// published, so whoever sees a service's status can command it at once.
    restored: AtomicBool,
    stopping: AtomicBool,
    /// Some retained state could not be queued; the driver sends it all again.
    dirty: AtomicBool,
    driver: Mutex<Option<JoinHandle<()>>>,
}

/// A handle on the service's MQTT session; cheap to clone.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

const REQUEST_QUEUE: usize = 1024;

/// TCP_NODELAY: commands, replies and status are small packets written back to back;
/// with Nagle's algorithm the second waits for the peer's delayed ACK (40 ms here).
fn no_delay() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}
const EVENT_QUEUE: usize = 1024;

impl Session {
    /// Starts the session. The connection is made in the background: the service starts
    /// at once and gets [`SessionEvent::Connected`] when the broker answers.
    pub fn start(
        settings: &MqttSettings,
        options: SessionOptions,
    ) -> Result<(Session, mpsc::Receiver<SessionEvent>), SessionError> {
        settings
            .check()
            .map_err(|(k, m)| SessionError::Settings(format!("{k}: {m}")))?;
        let (host, port) = settings.host_port().map_err(SessionError::Settings)?;
        let password = settings
            .resolve_password()
            .map_err(SessionError::Settings)?;
        let will_topic = format!("{}/online", options.name);
        let keep_alive = Duration::from_secs(u64::from(settings.keep_alive_secs));
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);

        let (client, driver): (Client, DriverLoop) = match settings.version {
            MqttVersion::V311 => {
                let mut o = rumqttc::MqttOptions::new(&options.client_id, host, port);
                o.set_keep_alive(keep_alive)
                    .set_manual_acks(options.manual_acks)
                    .set_clean_session(options.clean_session)
                    .set_max_packet_size(settings.max_packet_size, settings.max_packet_size)
                    .set_last_will(rumqttc::LastWill::new(
                        &will_topic,
                        "false",
                        QoS::AtLeastOnce,
                        true,
                    ));
                if let Some(user) = &settings.username {
                    o.set_credentials(user, password.clone().unwrap_or_default());
                }
                let (c, mut el) = rumqttc::AsyncClient::new(o, REQUEST_QUEUE);
                el.set_network_options(no_delay());
                (Client::V4(c), DriverLoop::V4(Box::new(el)))
            }
            MqttVersion::V5 => {
                use rumqttc::v5::mqttbytes::v5::LastWill;
                let mut o = rumqttc::v5::MqttOptions::new(&options.client_id, host, port);
                o.set_keep_alive(keep_alive)
                    .set_manual_acks(options.manual_acks)
                    .set_clean_start(options.clean_session)
                    .set_max_packet_size(u32::try_from(settings.max_packet_size).ok())
                    .set_last_will(LastWill::new(
                        &will_topic,
                        "false",
                        qos5(QoS::AtLeastOnce),
                        true,
                        None,
                    ));
                if !options.clean_session {
                    // MQTT 5 ends the session at disconnect unless an expiry is given.
                    o.set_session_expiry_interval(Some(u32::MAX));
                }
                if let Some(user) = &settings.username {
                    o.set_credentials(user, password.clone().unwrap_or_default());
                }
                o.set_network_options(no_delay());
                let (c, el) = rumqttc::v5::AsyncClient::new(o, REQUEST_QUEUE);
                (Client::V5(c), DriverLoop::V5(Box::new(el)))
            }
        };

        let inner = Arc::new(Inner {
            name: options.name.clone(),
            client,
            subscriptions: Mutex::new(options.subscriptions),
            retained: Mutex::new(BTreeMap::new()),
            connected: AtomicBool::new(false),
            restored: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            driver: Mutex::new(None),
        });
        let handle = tokio::spawn(drive(
            driver,
            options.manual_acks,
            inner.clone(),
            events_tx,
            settings.url.clone(),
        ));
        if let Ok(mut d) = inner.driver.lock() {
            *d = Some(handle);
        }
        // Retained state that found the request queue full is retried on a timer, not
        // only at the driver's next network event (a keep-alive away on a quiet link).
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.stopping.load(Ordering::SeqCst) {
                    return;
                }
                if inner.connected.load(Ordering::SeqCst)
                    && inner.dirty.swap(false, Ordering::SeqCst)
                {
                    inner.flush_state();
                }
            }
        });
        Ok((Session { inner }, events_rx))
    }

    /// The service name this session publishes under.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// `<name>/<suffix>`.
    pub fn topic(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.inner.name)
    }

    /// Whether the broker connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    /// Publishes a message, waiting for room in the request queue (backpressure).
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), SessionError> {
        self.inner
            .client
            .publish(topic, qos, retain, payload.into())
            .await
    }

    /// Publishes without waiting. `false` when the broker is away or the request queue
    /// is full: the message is dropped and the caller decides what that means (a stream
    /// of updates that is republished on refresh can afford it; a service loop must
    /// never block on its own session).
    pub fn try_publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> bool {
        self.is_connected()
            && self
                .inner
                .client
                .try_publish(topic, qos, retain, payload.into())
    }

    /// Publishes retained state (QoS 1) and remembers it, so that it is published again
    /// after every reconnect. Never blocks: while the broker is away the value waits in
    /// memory, and a value that finds the request queue full is retried by the session.
    pub fn publish_state(&self, topic: &str, payload: impl Into<Bytes>) {
        let payload = payload.into();
        let Ok(mut state) = self.inner.retained.lock() else {
            return;
        };
        state.insert(topic.to_string(), payload.clone());
        // Queued under the lock, so the queue order is the map order: a restore running
        // at the same time can never send an older value after this one.
        // Before the subscriptions are restored it waits for the restore to send it.
        if self.inner.restored.load(Ordering::SeqCst)
            && !self
                .inner
                .client
                .try_publish(topic, QoS::AtLeastOnce, true, payload)
        {
            self.inner.dirty.store(true, Ordering::SeqCst);
        }
    }

    /// Subscribes now and after every reconnect.
    pub async fn subscribe(&self, filter: &str, qos: QoS) -> Result<(), SessionError> {
        if let Ok(mut s) = self.inner.subscriptions.lock() {
            if !s.iter().any(|(f, _)| f == filter) {
                s.push((filter.to_string(), qos));
            }
        }
        self.inner.client.subscribe(filter, qos).await
    }

    /// Acknowledges a message received with [`SessionOptions::manual_acks`]. Acks go out
    /// in the order they are given; MQTT wants them in the order messages arrived.
    pub async fn ack(&self, token: AckToken) -> Result<(), SessionError> {
        self.inner.client.ack(token).await
    }

    /// Sends the one reply to a command: on `<name>/reply`, and on the MQTT 5 response
    /// topic with the correlation data when the command carried them.
    pub async fn reply(&self, command: &Message, reply: &Reply) -> Result<(), SessionError> {
        let name = self.inner.name.clone();
        self.reply_as(&name, command, reply).await
    }

    /// Answers a command with its outcome ([`Session::reply`] of
    /// [`Reply::from_result`]); a reply that cannot be sent is logged, not returned: the
    /// outcome is in the log either way and there is nobody else to tell.
    pub async fn answer(&self, command: &Message, result: Result<(), String>, state: &str) {
        let name = self.inner.name.clone();
        self.answer_as(&name, command, result, state).await;
    }

    /// [`Session::answer`] under another prefix (see [`Session::reply_as`]).
    pub async fn answer_as(
        &self,
        prefix: &str,
        command: &Message,
        result: Result<(), String>,
        state: &str,
    ) {
        let reply = Reply::from_result(&command.topic, result, state);
        if let Err(e) = self.reply_as(prefix, command, &reply).await {
            tracing::warn!(topic = %command.topic, error = %e, "cannot send reply");
        }
    }

    /// [`Session::reply`] for commands taken under another prefix than the service
    /// name (the interlock takes `alarms/cmd/ack` and answers on `alarms/reply`).
    pub async fn reply_as(
        &self,
        prefix: &str,
        command: &Message,
        reply: &Reply,
    ) -> Result<(), SessionError> {
        let payload = Bytes::from(serde_json::to_vec(reply).unwrap_or_default());
        match reply.ok {
            true => tracing::info!(topic = %reply.topic, state = %reply.state, "command done"),
            false => tracing::warn!(
                topic = %reply.topic,
                error = reply.error.as_deref().unwrap_or(""),
                "command refused"
            ),
        }
        self.inner
            .client
            .publish(
                &format!("{prefix}/reply"),
                QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .await?;
        let response_topic = command.response_topic.as_deref().filter(|rt| {
            // Never let a requester make us publish a command, or to a wildcard.
            let ok = !rt.is_empty() && !rt.contains("/cmd/") && !rt.contains(['+', '#']);
            if !ok {
                tracing::warn!(response_topic = rt, "response topic refused");
            }
            ok
        });
        if let (Some(rt), Client::V5(c)) = (response_topic, &self.inner.client) {
            let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                correlation_data: command.correlation_data.clone(),
                ..Default::default()
            };
            c.publish_with_properties(rt, qos5(QoS::AtLeastOnce), false, payload, props)
                .await
                .map_err(|_| SessionError::Closed)?;
        }
        Ok(())
    }

    /// Announces `<name>/online = false`, disconnects cleanly and waits (at most 2 s)
    /// for the session task to end.
    pub async fn shutdown(&self) {
        if self.is_connected() {
            let _ = self
                .inner
                .client
                .publish(
                    &self.topic("online"),
                    QoS::AtLeastOnce,
                    true,
                    Bytes::from_static(b"false"),
                )
                .await;
        }
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.client.disconnect().await;
        let handle = self.inner.driver.lock().ok().and_then(|mut d| d.take());
        if let Some(h) = handle {
            if tokio::time::timeout(Duration::from_secs(2), h)
                .await
                .is_err()
            {
                tracing::warn!("MQTT session did not close within 2 s");
            }
        }
    }
}

impl Inner {
    /// A retained message on a command topic reached an MQTT 5 session (from the store,
    /// or live thanks to Retain As Published). An empty one only deletes a stored
    /// command (our own clearing message among them): swallowed, `true`. Any other is
    /// passed on to be refused (`false`), and the stored copy is cleared: nobody
    /// executes that clearing message, since it too arrives retained.
    fn retained_command(&self, m: &Message) -> bool {
        if m.payload.is_empty() {
            tracing::debug!(topic = %m.topic, "retained command deleted");
            return true;
        }
        if self
            .client
            .try_publish(&m.topic, QoS::AtLeastOnce, true, Bytes::new())
        {
            tracing::info!(topic = %m.topic, "retained command removed from the broker");
        } else {
            tracing::warn!(topic = %m.topic, "cannot remove a retained command: request queue full");
        }
        false
    }

    /// Runs after each CONNACK, off the event-loop task so that a full request queue
    /// cannot deadlock the loop that drains it.
    fn restore(self: &Arc<Self>) {
        let inner = self.clone();
        tokio::spawn(async move {
            let birth = format!("{}/online", inner.name);
            let _ = inner
                .client
                .publish(&birth, QoS::AtLeastOnce, true, Bytes::from_static(b"true"))
                .await;
            let subs = inner
                .subscriptions
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default();
            for (filter, qos) in subs {
                if inner.client.subscribe(&filter, qos).await.is_err() {
                    return;
                }
            }
            inner.restored.store(true, Ordering::SeqCst);
            inner.flush_state();
        });
    }

    /// Queues every retained state value; marks the session dirty if the queue is full.
    fn flush_state(&self) {
        let Ok(state) = self.retained.lock() else {
            return;
        };
        for (topic, payload) in state.iter() {
            if !self
                .client
                .try_publish(topic, QoS::AtLeastOnce, true, payload.clone())
            {
                self.dirty.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

enum DriverLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// One step of either event loop, reduced to what the session cares about.
enum Step {
    ConnAck,
    Publish(Message),
    Other,
    Failed(String, bool),
}

impl DriverLoop {
    async fn step(&mut self) -> Step {
        match self {
            DriverLoop::V4(el) => match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => Step::ConnAck,
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    Step::Publish(Message {
                        ack: (p.qos != QoS::AtMostOnce).then_some(AckToken {
                            pkid: p.pkid,
                            qos: p.qos,
                        }),
                        topic: p.topic,
                        payload: p.payload,
                        retain: p.retain,
                        response_topic: None,
                        correlation_data: None,
                    })
                }
                Ok(_) => Step::Other,
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    let auth = matches!(
                        code,
                        rumqttc::ConnectReturnCode::BadUserNamePassword
                            | rumqttc::ConnectReturnCode::NotAuthorized
                    );
                    Step::Failed(format!("broker refused the connection: {code:?}"), auth)
                }
                Err(e) => Step::Failed(e.to_string(), false),
            },
            DriverLoop::V5(el) => {
                use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
                match el.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(_))) => Step::ConnAck,
                    Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.unwrap_or_default();
                        let qos = match p.qos {
                            rumqttc::v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
                            rumqttc::v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
                            rumqttc::v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
                        };
                        Step::Publish(Message {
                            ack: (qos != QoS::AtMostOnce).then_some(AckToken { pkid: p.pkid, qos }),
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload,
                            retain: p.retain,
                            response_topic: props.response_topic,
                            correlation_data: props.correlation_data,
                        })
                    }
                    Ok(_) => Step::Other,
                    Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                        let auth = matches!(
                            code,
                            ConnectReturnCode::BadUserNamePassword
                                | ConnectReturnCode::NotAuthorized
                        );
                        Step::Failed(format!("broker refused the connection: {code:?}"), auth)
                    }
                    Err(e) => Step::Failed(e.to_string(), false),
                }
            }
        }
    }
}

async fn drive(
    mut el: DriverLoop,
    manual_acks: bool,
    inner: Arc<Inner>,
    events: mpsc::Sender<SessionEvent>,
    url: String,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut last_error = String::new();
    loop {
        if inner.restored.load(Ordering::SeqCst) && inner.dirty.swap(false, Ordering::SeqCst) {
            inner.flush_state();
        }
        match el.step().await {
            Step::ConnAck => {
                if backoff.attempts() > 0 {
                    tracing::info!(broker = %url, attempts = backoff.attempts(), "reconnected to MQTT broker");
                } else {
                    tracing::info!(broker = %url, "connected to MQTT broker");
                }
                backoff.reset();
                last_error.clear();
                inner.restored.store(false, Ordering::SeqCst);
                inner.connected.store(true, Ordering::SeqCst);
                inner.restore();
                let _ = events.send(SessionEvent::Connected).await;
            }
            Step::Publish(mut m) => {
                if m.retain
                    && matches!(inner.client, Client::V5(_))
                    && is_command_topic(&m.topic)
                    && inner.retained_command(&m)
                {
                    if let Some(token) = m.ack.take().filter(|_| manual_acks) {
                        if !inner.client.try_ack_v5(token) {
                            tracing::warn!(topic = %m.topic, "cannot acknowledge a deleted retained command: request queue full");
                        }
                    }
                    continue;
                }
                if !manual_acks {
                    m.ack = None;
                }
                if events.send(SessionEvent::Message(m)).await.is_err() {
                    tracing::debug!("session events receiver dropped");
                }
            }
            Step::Other => {}
            Step::Failed(reason, auth) => {
                if inner.stopping.load(Ordering::SeqCst) {
                    break;
                }
                inner.restored.store(false, Ordering::SeqCst);
                let was_connected = inner.connected.swap(false, Ordering::SeqCst);
                // rumqttd closes the socket on a refused login, with no CONNACK code:
                // accepted TCP connection, then closed before CONNACK. A broker that is
                // down refuses the TCP connection instead, and gets no hint.
                let lower = reason.to_ascii_lowercase();
                let closed_at_login = !was_connected
                    && !lower.contains("refused")
                    && (lower.contains("closed")
                        || lower.contains("reset")
                        || lower.contains("eof"));
                let reason = if auth || closed_at_login {
                    format!("{reason} (check the MQTT username and password)")
                } else {
                    reason
                };
                if was_connected || reason != last_error {
                    tracing::warn!(broker = %url, error = %reason, "MQTT connection lost; retrying with backoff");
                    let _ = events
                        .send(SessionEvent::Disconnected(reason.clone()))
                        .await;
                    last_error = reason;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
    inner.restored.store(false, Ordering::SeqCst);
    inner.connected.store(false, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(yaml: &str) -> MqttSettings {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn urls() {
        let hp = |u: &str| {
            MqttSettings {
                url: u.into(),
                ..Default::default()
            }
            .host_port()
        };
        assert_eq!(hp("mqtt://127.0.0.1:1883"), Ok(("127.0.0.1".into(), 1883)));
        assert_eq!(hp("tcp://broker:1884/"), Ok(("broker".into(), 1884)));
        assert_eq!(hp("localhost:7"), Ok(("localhost".into(), 7)));
        assert_eq!(hp("mqtt://[::1]:1883"), Ok(("::1".into(), 1883)));
        assert!(hp("mqtt://host").unwrap_err().contains("no port"));
        assert!(hp("mqtt://host:99999").unwrap_err().contains("not a port"));
        assert!(hp("ws://host:1")
            .unwrap_err()
            .contains("unsupported scheme"));
        assert!(hp("mqtt://:1").unwrap_err().contains("no host"));
    }

    #[test]
    fn versions_parse_from_numbers_and_text() {
        assert_eq!(settings("version: 5").version, MqttVersion::V5);
        assert_eq!(settings("version: 3.1.1").version, MqttVersion::V311);
        assert_eq!(settings("{}").version, MqttVersion::V311);
        let e = serde_yaml::from_str::<MqttSettings>("version: 6").unwrap_err();
        assert!(e.to_string().contains("unknown MQTT version `6`"), "{e}");
    }

    #[test]
    fn check_refuses_keep_alive_zero() {
        let s = settings("keep_alive_secs: 0");
        let (k, m) = s.check().unwrap_err();
        assert_eq!(k, "keep_alive_secs");
        assert!(m.contains("rumqttd"));
    }

    #[test]
    fn password_file_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\nignored\n").unwrap();
        let s = MqttSettings {
            password_file: Some(f),
            ..Default::default()
        };
        assert_eq!(s.resolve_password().unwrap().as_deref(), Some("s3cret"));
        let s = MqttSettings {
            password_file: Some(dir.path().join("none")),
            ..Default::default()
        };
        assert!(s
            .resolve_password()
            .unwrap_err()
            .contains("cannot read MQTT password file"));
    }
}
