//! The `notifier` service: follows the alarms, the interlock and the services' liveness
//! on MQTT, lets the [`Engine`] decide, routes each notification to the channels that
//! take its severity through their rate limits into durable outboxes, and delivers
//! them with retries. Publishes `<name>/status` (retained).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use dcs_shared::outbox::{Delivery, Outbox};
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::{MqttSettings, QoS, Session, SessionEvent, SessionOptions, UtcNanos};
use serde_json::json;

use crate::channel::Channel;
use crate::config::{NotifierConfig, Severity};
use crate::engine::{AlarmMemory, Engine, Notification};
use crate::ratelimit::RateLimit;

struct Route {
    name: String,
    min: Severity,
    rate: RateLimit,
    outbox: Outbox,
}

/// Saves what the engine remembers (atomically: a crash leaves the old or the new).
fn save(path: &Path, memory: &BTreeMap<String, AlarmMemory>) {
    let tmp = path.with_extension("tmp");
    let r = serde_json::to_vec_pretty(memory)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        tracing::error!(file = %path.display(), error = %e, "cannot save what was notified");
    }
}

fn load(path: &Path) -> BTreeMap<String, AlarmMemory> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "unreadable memory of notified alarms: starting afresh");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

fn dispatch(routes: &mut [Route], n: Notification, now: Instant) {
    let to: Vec<&str> = routes
        .iter()
        .filter(|r| n.severity >= r.min)
        .map(|r| r.name.as_str())
        .collect();
    tracing::info!(kind = ?n.kind, about = %n.subject_of, severity = n.severity.as_str(), channels = ?to, "{}", n.summary);
    for r in routes.iter_mut().filter(|r| n.severity >= r.min) {
        for m in r.rate.admit(n.clone(), now) {
            push(r, &m);
        }
    }
}

fn push(r: &Route, n: &Notification) {
    let record = match serde_json::to_vec(n) {
        Ok(b) => b,
        Err(e) => return tracing::error!(error = %e, "cannot encode a notification"),
    };
    if let Err(e) = r.outbox.push(&record) {
        tracing::error!(channel = %r.name, error = %e, "cannot queue a notification: it is lost");
    }
}

/// Runs until `shutdown`; `file` is the config (relative paths of the channels).
pub async fn run(
    cfg: NotifierConfig,
    file: PathBuf,
    mqtt: MqttSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| {
        format!(
            "cannot create the state directory {}",
            cfg.state_dir.display()
        )
    })?;
    let memory_file = cfg.state_dir.join("notified.json");
    let mut engine = Engine::new(&cfg, Instant::now());
    engine.restore(load(&memory_file));
    let mut routes = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for c in &cfg.channels {
        let kind = c.kind().context("a channel without email: or webhook:")?;
        let channel = Arc::new(Channel::new(&kind, &file).map_err(anyhow::Error::msg)?);
        let outbox = Outbox::open(&cfg.state_dir.join("outbox"), &c.name)
            .with_context(|| format!("cannot open the outbox of channel {}", c.name))?;
        let deliver = {
            let channel = channel.clone();
            move |record: Vec<u8>| {
                let channel = channel.clone();
                async move {
                    match serde_json::from_slice::<Notification>(&record) {
                        Ok(n) => channel.send(&n).await,
                        Err(e) => Delivery::Reject(format!("not a notification: {e}")),
                    }
                }
            }
        };
        tasks.spawn(outbox.clone().deliver(deliver, shutdown.clone()));
        routes.push(Route {
            name: c.name.clone(),
            min: c.min_severity,
            rate: RateLimit::new(
                c.max_per_window,
                Duration::from_secs_f64(c.rate_window_secs),
            ),
            outbox,
        });
    }

    let mut options = SessionOptions::new(&cfg.name);
    for f in engine.filters() {
        options = options.subscribe(&f, QoS::AtLeastOnce);
    }
    let (session, mut events) = Session::start(&mqtt, options)?;
    let status_topic = format!("{}/status", cfg.name);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut status_every = tokio::time::interval(Duration::from_secs(10));
    tracing::info!(channels = routes.len(), station = %cfg.station, "notifier started");
    loop {
        let now = Instant::now();
        let notes = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            ev = events.recv() => match ev {
                None => break,
                Some(SessionEvent::Connected) => engine.broker(true, now, UtcNanos::now()),
                Some(SessionEvent::Disconnected(_)) => engine.broker(false, now, UtcNanos::now()),
                Some(SessionEvent::Message(m)) => engine.message(&m.topic, &m.payload, m.retain, now, UtcNanos::now()),
            },
            _ = tick.tick() => {
                for r in &mut routes {
                    for n in r.rate.flush(now) {
                        push(r, &n);
                    }
                }
                engine.tick(now, UtcNanos::now())
            }
            _ = status_every.tick() => {
                let channels: Vec<_> = routes.iter().map(|r| {
                    let s = r.outbox.state();
                    json!({"name": r.name, "pending_bytes": s.pending_bytes, "delivered": s.delivered,
                           "rejected": s.rejected, "error": s.error, "held_by_rate_limit": r.rate.held()})
                }).collect();
                session.publish_state(&status_topic, json!({"station": cfg.station, "channels": channels,
                    "time": UtcNanos::now().as_nanos()}).to_string());
                Vec::new()
            }
        };
        for n in notes {
            dispatch(&mut routes, n, now);
        }
        if engine.take_changed() {
            save(&memory_file, engine.memory());
        }
    }
    // What the rate limits hold goes to the outboxes, as a summary: not lost at a stop.
    for r in &mut routes {
        for n in r.rate.drain() {
            push(r, &n);
        }
    }
    session.shutdown().await;
    // The delivery tasks stop at `shutdown` between records; what is queued stays.
    while tasks.join_next().await.is_some() {}
    Ok(())
}
