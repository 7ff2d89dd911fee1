//! Starts rumqttd from a [`BrokerConfig`] and reports on it.
//!
//! rumqttd runs its listeners and router on threads of its own and has no shutdown API:
//! the broker lives until the process exits, which is what `dcs-broker` does on SIGTERM.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::auth::PasswordFile;
use crate::config::BrokerConfig;
use crate::proxy;

/// A broker that is accepting connections.
#[derive(Debug)]
pub struct RunningBroker {
    /// Listener kind (`mqtt`, `mqtt5`, `websocket`) and address, all listening.
    pub listeners: Vec<(&'static str, SocketAddr)>,
    /// rumqttd's own listeners on 127.0.0.1 (`mqtt`, `mqtt5`), behind the front end.
    pub internal: Vec<(&'static str, SocketAddr)>,
}

/// Starts the broker and returns once every listener accepts connections.
///
/// `config_file` anchors relative paths (the password file). Must be called from within
/// a tokio runtime (the meters reporter is a task on it).
pub fn start(config: &BrokerConfig, config_file: Option<&Path>) -> anyhow::Result<RunningBroker> {
    let users = match (&config.auth.password_file, &config.auth.password_env) {
        (_, Some(var)) => {
            let text = std::env::var(var).map_err(|_| {
                anyhow::anyhow!(
                    "auth.password_env: environment variable {var} is not set (or not UTF-8)"
                )
            })?;
            let users = PasswordFile::parse(&text).map_err(|(line, m)| {
                anyhow::anyhow!("password file in ${var}, line {line}: {m}")
            })?;
            if users.is_empty() {
                bail!("password file in ${var} has no users: nobody could connect");
            }
            tracing::info!(env = %var, users = users.len(), "loaded MQTT users");
            Some(Arc::new(users))
        }
        (Some(p), None) => {
            let path = config_file.map_or(p.clone(), |f| dcs_shared::config::relative_to(f, p));
            let users = PasswordFile::load(&path)?;
            if users.is_empty() {
                bail!(
                    "password file {} has no users: nobody could connect",
                    path.display()
                );
            }
            tracing::info!(file = %path.display(), users = users.len(), "loaded MQTT users");
            Some(Arc::new(users))
        }
        (None, None) => None,
    };
    if users.is_none() {
        tracing::warn!("anonymous MQTT access is allowed (auth.allow_anonymous: true)");
    }

    let listeners = config.listeners.all();
    for (kind, addr) in &listeners {
        // Fail before starting anything when a port is taken.
        TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on {addr} ({kind} listener)"))?;
    }

    // rumqttd listens on loopback only; clients reach it through the front end
    // (crate::proxy), which owns the public listeners.
    let internal = Internal {
        v4: proxy::free_loopback_port()?,
        v5: proxy::free_loopback_port()?,
    };
    let mut rconfig = rumqttd_config(config, &internal)?;
    let servers = [&mut rconfig.v4, &mut rconfig.v5];
    for settings in servers.into_iter().flatten().flat_map(|m| m.values_mut()) {
        if let Some(users) = &users {
            let users = users.clone();
            settings.set_auth_handler(move |client_id: String, user: String, pass: String| {
                let users = users.clone();
                async move { login_allowed(&users, &client_id, &user, &pass) }
            });
        }
    }

    let mut broker = rumqttd::Broker::new(rconfig);
    let meters = broker.meters().ok();
    let (stats_tx, _stats_rx) = broker
        .link("dcs-broker")
        .map_err(|e| anyhow::anyhow!("cannot create the broker's local link: {e}"))?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "broker stopped");
            }
        })
        .context("cannot start the broker thread")?;

    // Every internal listener up and with TCP_NODELAY before any client can connect.
    for addr in [internal.v4, internal.v5] {
        wait_bound(addr, Duration::from_secs(10))
            .with_context(|| format!("rumqttd's internal listener on {addr} did not come up"))?;
        proxy::set_nodelay_on_own_listener(addr)?;
    }

    let upstream = Arc::new(proxy::Upstream {
        v4: internal.v4,
        v5: internal.v5,
        max_packet: config.limits.max_payload_size,
        connect_timeout: Duration::from_millis(u64::from(config.limits.connection_timeout_ms)),
    });
    let mut bound = Vec::new();
    for (kind, addr) in &listeners {
        let listener = proxy::bind(*addr)
            .with_context(|| format!("cannot listen on {addr} ({kind} listener)"))?;
        let kind = match *kind {
            "mqtt" => proxy::Kind::Mqtt,
            "mqtt5" => proxy::Kind::Mqtt5,
            _ => proxy::Kind::Websocket,
        };
        bound.push((kind, listener));
    }
    for (kind, listener) in bound {
        tracing::info!(listener = kind.name(), addr = %listener.local_addr()?, "listening");
        tokio::spawn(proxy::serve(listener, kind, upstream.clone()));
    }

    if config.meters_interval_secs > 0 {
        let every = Duration::from_secs(config.meters_interval_secs);
        tokio::spawn(report_meters(meters, stats_tx, every));
    }
    Ok(RunningBroker {
        listeners,
        internal: vec![("mqtt", internal.v4), ("mqtt5", internal.v5)],
    })
}

/// rumqttd's own (loopback) listeners.
struct Internal {
    v4: SocketAddr,
    v5: SocketAddr,
}

/// The auth handler: the password must match, and a client id that is the name of an
/// account may only be used by that account (nobody but the interlock's account can
/// connect as `interlock`, and so take over its session or publish its will).
pub fn login_allowed(users: &PasswordFile, client_id: &str, user: &str, pass: &str) -> bool {
    if !users.verify(user, pass) {
        tracing::warn!(%client_id, %user, "MQTT login refused: wrong username or password");
        return false;
    }
    if client_id != user && users.contains(client_id) {
        tracing::warn!(
            %client_id, %user,
            "MQTT login refused: client id `{client_id}` is bound to the account of that name"
        );
        return false;
    }
    true
}

/// rumqttd's `Config` has private fields (metrics), so it is built by deserialising.
fn rumqttd_config(c: &BrokerConfig, internal: &Internal) -> anyhow::Result<rumqttd::Config> {
    let l = &c.limits;
    let server = |name: &str, addr: SocketAddr| {
        json!({"1": {
            "name": name,
            "listen": addr.to_string(),
            "next_connection_delay_ms": 1,
            "connections": {
                "connection_timeout_ms": l.connection_timeout_ms,
                "max_payload_size": l.max_payload_size,
                "max_inflight_count": l.max_inflight_count,
                "dynamic_filters": true,
            },
        }})
    };
    let mut value = json!({
        "id": 0,
        "router": {
            "max_connections": l.max_connections,
            "max_outgoing_packet_count": l.max_outgoing_packet_count,
            "max_segment_size": l.segment_size,
            "max_segment_count": l.segment_count,
        },
    });
    value["v4"] = server("mqtt", internal.v4);
    value["v5"] = server("mqtt5", internal.v5);
    if c.meters_interval_secs > 0 {
        // rumqttd 0.20's timer thread panics unless both kinds are configured.
        let every = json!({"push_interval": c.meters_interval_secs});
        value["metrics"] = json!({"meters": every, "alerts": every});
    }
    serde_json::from_value(value).context("building the rumqttd configuration")
}

/// Waits until a socket listens on `addr`'s port. Reads `/proc/net/tcp{,6}` instead of
/// connecting (rumqttd logs every half-open connection as an error) or binding (which
/// would race the broker for the port).
pub fn wait_bound(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !is_listening(addr.port()) {
        if Instant::now() > deadline {
            bail!("nothing listening after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether any local TCP socket is in LISTEN state on `port` (Linux).
pub fn is_listening(port: u16) -> bool {
    let wanted = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|text| {
            text.lines().skip(1).any(|l| {
                let mut cols = l.split_whitespace().skip(1);
                let local = cols.next().unwrap_or("");
                let state = cols.nth(1).unwrap_or("");
                local.ends_with(&wanted) && state == "0A"
            })
        })
    })
}

/// Resident set size of this process, bytes (Linux).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Logs the router's meters and our RSS, and publishes them on `dcs-broker/stats`.
async fn report_meters(
    meters: Option<rumqttd::meters::MetersLink>,
    mut link: rumqttd::local::LinkTx,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let (mut connections, mut subscriptions) = (0usize, 0usize);
    loop {
        tick.tick().await;
        let (mut publishes, mut failed) = (0usize, 0usize);
        // Meters arrive only for intervals with traffic; drain what is there.
        while let Some(batch) = meters.as_ref().and_then(|m| m.recv().ok()) {
            for m in batch {
                if let rumqttd::Meter::Router(_, r) = m {
                    connections = r.total_connections;
                    subscriptions = r.total_subscriptions;
                    publishes += r.total_publishes;
                    failed += r.failed_publishes;
                }
            }
        }
        let rss = rss_bytes().unwrap_or(0);
        tracing::info!(
            connections,
            subscriptions,
            publishes,
            failed_publishes = failed,
            rss_bytes = rss,
            "broker meters"
        );
        let stats = json!({
            "connections": connections,
            "subscriptions": subscriptions,
            "publishes": publishes,
            "failed_publishes": failed,
            "rss_bytes": rss,
            "interval_secs": every.as_secs(),
        });
        let _ = link.try_publish("dcs-broker/stats", stats.to_string());
    }
}
