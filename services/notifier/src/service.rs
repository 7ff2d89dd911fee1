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
use crate::journal::{rfc3339, Entry, FileJournal, Journal, MongoJournal};
use crate::ratelimit::RateLimit;

struct Route {
    name: String,
    min: Severity,
    rate: RateLimit,
    outbox: Outbox,
}

/// Saves what the engine remembers (atomically and durably: after a crash or a power
/// cut the file is the old or the new, never empty).
fn save(path: &Path, memory: &BTreeMap<String, AlarmMemory>) {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let r = serde_json::to_vec_pretty(memory)
        .map_err(std::io::Error::other)
        .and_then(|b| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&b)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| match path.parent() {
            Some(dir) => std::fs::File::open(dir)?.sync_all(),
            None => Ok(()),
        });
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

/// Numbers the delivery entries of this process (with its start: unique ids).
static DELIVERIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static BOOT_NS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();

/// The journal entry of a delivery attempt.
fn delivery_entry(n: &Notification, channel: &str, event: &str, error: Option<&str>) -> Entry {
    let now = UtcNanos::now().as_nanos();
    let seq = DELIVERIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let boot = BOOT_NS.get_or_init(|| now);
    Entry {
        id: format!("{boot}-d{seq}"),
        at_ns: now,
        time: rfc3339(now),
        station: n.station.clone(),
        subject: n.subject_of.clone(),
        event: event.to_string(),
        by: None,
        severity: Some(n.severity.as_str().to_string()),
        text: format!("{} via {channel}: {}", n.kind.as_str(), n.summary),
        details: json!({"channel": channel, "kind": n.kind, "error": error, "notified_at_ns": n.at_ns}),
    }
}

/// Opens the journal: MongoDB through its outbox (delivered by a task in `tasks`), or
/// the JSON-lines file.
async fn open_journal(
    cfg: &NotifierConfig,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Journal> {
    let Some(uri) = cfg.journal.uri() else {
        let path = cfg.state_dir.join(&cfg.journal.file);
        let f = FileJournal::open(&path)
            .with_context(|| format!("cannot open the alarm journal {}", path.display()))?;
        tracing::info!(file = %path.display(), "alarm journal in a local file (no MongoDB configured)");
        return Ok(Journal::File(Arc::new(std::sync::Mutex::new(f))));
    };
    // `.journal`: a channel's name cannot start with a dot, so never the same queue.
    let outbox = Outbox::open(&cfg.state_dir.join("outbox"), ".journal")
        .context("cannot open the journal's outbox")?;
    let store = match MongoJournal::new(&cfg.journal, &uri).await {
        Ok(s) => s,
        Err(e) => {
            // The journal must never keep alarms from people: the file instead.
            let path = cfg.state_dir.join(&cfg.journal.file);
            tracing::error!(error = %e, file = %path.display(), "MongoDB journal unusable: journaling to the local file instead");
            let f = FileJournal::open(&path)
                .with_context(|| format!("cannot open the alarm journal {}", path.display()))?;
            return Ok(Journal::File(Arc::new(std::sync::Mutex::new(f))));
        }
    };
    let store = Arc::new(tokio::sync::Mutex::new(store));
    tasks.spawn(outbox.clone().deliver(
        move |record: Vec<u8>| {
            let store = store.clone();
            async move { store.lock().await.store(&record).await }
        },
        shutdown.clone(),
    ));
    tracing::info!(database = %cfg.journal.database, collection = %cfg.journal.collection, "alarm journal in MongoDB");
    Ok(Journal::Mongo(outbox))
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
    let journal = open_journal(&cfg, &mut tasks, &shutdown).await?;
    for c in &cfg.channels {
        let kind = c.kind().context("a channel without email: or webhook:")?;
        let channel = Arc::new(Channel::new(&kind, &file).map_err(anyhow::Error::msg)?);
        let outbox = Outbox::open(&cfg.state_dir.join("outbox"), &c.name)
            .with_context(|| format!("cannot open the outbox of channel {}", c.name))?;
        let deliver = {
            let channel = channel.clone();
            let journal = journal.clone();
            let name = c.name.clone();
            // The first failure of a record is journaled, not every retry.
            let failing = Arc::new(std::sync::Mutex::new(None::<String>));
            move |record: Vec<u8>| {
                let (channel, journal, name, failing) = (
                    channel.clone(),
                    journal.clone(),
                    name.clone(),
                    failing.clone(),
                );
                async move {
                    let n = match serde_json::from_slice::<Notification>(&record) {
                        Ok(n) => n,
                        Err(e) => return Delivery::Reject(format!("not a notification: {e}")),
                    };
                    let d = channel.send(&n).await;
                    // The record being retried, by its content (several share an instant).
                    let key = format!("{}/{:?}/{}", n.at_ns, n.kind, n.subject_of);
                    let first_failure = |f: &std::sync::Mutex<Option<String>>| {
                        f.lock()
                            .map(|mut g| g.replace(key.clone()).as_ref() != Some(&key))
                            .unwrap_or(true)
                    };
                    if !matches!(d, Delivery::Retry(_)) {
                        if let Ok(mut g) = failing.lock() {
                            *g = None;
                        }
                    }
                    match &d {
                        Delivery::Done => {
                            journal.append(&delivery_entry(&n, &name, "notification_sent", None))
                        }
                        Delivery::Retry(e) if first_failure(&failing) => journal
                            .append(&delivery_entry(&n, &name, "notification_failed", Some(e))),
                        Delivery::Retry(_) => {}
                        Delivery::Reject(e) => journal.append(&delivery_entry(
                            &n,
                            &name,
                            "notification_rejected",
                            Some(e),
                        )),
                    }
                    d
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
                let journal_state = match &journal {
                    Journal::Mongo(o) => {
                        let s = o.state();
                        json!({"store": "mongodb", "pending_bytes": s.pending_bytes, "delivered": s.delivered,
                               "rejected": s.rejected, "error": s.error})
                    }
                    Journal::File(_) => json!({"store": "file"}),
                };
                session.publish_state(&status_topic, json!({"station": cfg.station, "channels": channels,
                    "journal": journal_state, "time": UtcNanos::now().as_nanos()}).to_string());
                Vec::new()
            }
        };
        for e in engine.take_journal() {
            journal.append(&e);
        }
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
