//! The forwarder: MQTT (persistent session, QoS 1, manual acks) -> mapping -> spool ->
//! InfluxDB. A message is acknowledged to the broker only once its lines are in the
//! spool, so whatever happens to the forwarder, a message is either in the spool or
//! still queued in the broker's session.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use anyhow::Context;
use dcs_shared::influx::{InfluxSettings, InfluxWriter};
use dcs_shared::line_protocol;
use dcs_shared::mqtt::AckToken;
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::spool::{Spool, SpoolConfig, SpoolError};
use dcs_shared::{Message, MqttSettings, QoS, Session, SessionEvent, SessionOptions, UtcNanos};

use crate::config::TelemetryConfig;
use crate::mapping::{MapError, Mapper};
use crate::record;
use crate::sink::{Control, Sink};
use crate::stats::Stats;

/// Most messages taken from the session before the spool is flushed and they are
/// acked. Brokers send a subscriber only so many unacknowledged messages (rumqttd 100,
/// Mosquitto 20 by default), so acks must flow back while the rest arrives: waiting to
/// gather large groups would stall the stream.
const GROUP: usize = 50;
/// Topics remembered for "logged once"; past this, problems are only counted.
const WARNED_TOPICS: usize = 10_000;

/// Runs the forwarder until `shutdown` is cancelled.
pub async fn run(
    cfg: TelemetryConfig,
    mqtt: MqttSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mapper = Mapper::new(&cfg.inputs).map_err(anyhow::Error::msg)?;
    let s = &cfg.spool;
    let spool = Spool::open(SpoolConfig {
        dir: s.dir.clone(),
        segment_bytes: s.segment_bytes,
        max_bytes: s.max_bytes,
        overflow: s.overflow,
    })
    .with_context(|| format!("cannot open the spool in {}", s.dir.display()))?;
    let pending = spool.pending_bytes();
    tracing::info!(dir = %s.dir.display(), pending_bytes = pending, overflow = ?s.overflow, max_bytes = s.max_bytes, "spool open");
    let spool = Arc::new(Mutex::new(spool));
    let stats = Arc::new(Stats::default());
    stats.spool_bytes.store(pending, Ordering::Relaxed);
    let control = Arc::new(Control::default());

    let sink = match cfg.output() {
        Some(out) => {
            log_output(&out);
            stats.set_output("starting");
            let sink = Sink {
                spool: spool.clone(),
                writer: InfluxWriter::new(out),
                stats: stats.clone(),
                batch: cfg.batch.clone(),
                retry: cfg.retry.clone(),
                dead_letter: s.dead_letter_path(),
                control: control.clone(),
            };
            Some(
                std::thread::Builder::new()
                    .name("influx-sink".into())
                    .spawn(move || sink.run())
                    .context("cannot start the InfluxDB writer thread")?,
            )
        }
        None => {
            tracing::info!(spool = %s.dir.display(), "no InfluxDB output configured: messages are kept in the spool until one is (set output.url or DCS_INFLUX_URL)");
            stats.set_output("none: spooling only");
            None
        }
    };

    let mut options = SessionOptions::new(&cfg.name);
    options.client_id = cfg.client_id();
    options.clean_session = false;
    options.manual_acks = true;
    for f in mapper.filters() {
        options = options.subscribe(&f, QoS::AtLeastOnce);
    }
    let (session, mut events) = Session::start(&mqtt, options)?;
    let stats_topic = session.topic("stats");
    // Unbounded, so that ingest never waits for the acker: the acker waits for the
    // session's request queue, which the session drains only while ingest takes its
    // messages. What it holds is bounded by the broker's inflight window.
    let (to_acker, acker_rx) = mpsc::unbounded_channel();
    let acker = tokio::spawn(acker(
        acker_rx,
        session.clone(),
        cfg.spool.fsync,
        control.clone(),
    ));
    let mut ingest = Ingest {
        mapper,
        spool: spool.clone(),
        stats: stats.clone(),
        to_acker,
        max_payload: cfg.max_payload_bytes,
        acks: Vec::new(),
        warned: HashSet::new(),
        appended: false,
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(cfg.stats_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    'run: loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                let snap = stats.snapshot();
                session.publish_state(&stats_topic, serde_json::to_vec(&snap).unwrap_or_default());
                let mut line = String::new();
                if line_protocol::encode(&snap.point(&cfg.name, UtcNanos::now().as_nanos()), &mut line).is_ok()
                    && !ingest.append(&record::encode(UtcNanos::now().as_nanos(), &line), &shutdown).await
                {
                    break;
                }
            }
            ev = events.recv() => match ev {
                None => break,
                Some(SessionEvent::Message(m)) => {
                    if !ingest.take(m, &shutdown).await {
                        break;
                    }
                }
                Some(_) => {}
            },
        }
        // Group commit: one flush (and fsync) for what is already waiting, up to GROUP.
        for _ in 1..GROUP {
            match events.try_recv() {
                Ok(SessionEvent::Message(m)) => {
                    if !ingest.take(m, &shutdown).await {
                        break 'run;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        ingest.commit().await;
    }

    ingest.commit().await;
    drop(ingest);
    // Everything taken is acknowledged before the session closes (unless the broker is
    // away: then the broker redelivers it, and the spool already has it).
    if tokio::time::timeout(Duration::from_secs(3), acker)
        .await
        .is_err()
    {
        tracing::warn!(
            "acknowledgements not all sent at shutdown; the broker will redeliver those messages"
        );
    }
    if let Ok(mut s) = spool.lock() {
        if let Err(e) = s.sync() {
            tracing::error!(error = %e, "cannot sync the spool at shutdown");
        }
    }
    if let Some(handle) = sink {
        let grace = Duration::from_secs(cfg.shutdown_grace_secs);
        control.stop(Instant::now() + grace);
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }
    let snap = stats.snapshot();
    if let Ok(s) = spool.lock() {
        tracing::info!(
            received = snap.received,
            written = snap.written,
            left_in_spool_bytes = s.pending_bytes(),
            "telemetry stopped"
        );
    }
    session.publish_state(&stats_topic, serde_json::to_vec(&snap).unwrap_or_default());
    session.shutdown().await;
    Ok(())
}

fn log_output(o: &InfluxSettings) {
    tracing::info!(
        url = %o.url,
        api = ?o.api,
        database = o.database.as_deref().unwrap_or(""),
        org = o.org.as_deref().unwrap_or(""),
        bucket = o.bucket.as_deref().unwrap_or(""),
        "writing to InfluxDB"
    );
}

/// Records handed to the kernel, and the acks they are owed once durable.
struct Commit {
    /// The spool segment to fsync, when records were appended.
    file: Option<std::fs::File>,
    acks: Vec<AckToken>,
}

/// Fsyncs (when configured) and then acknowledges, in order, off the ingest path: the
/// broker only sends a few unacknowledged messages at a time, so an fsync in line
/// would stall the stream. Commits that queue up meanwhile share one fsync (segments
/// closed in between were fsynced when closed).
async fn acker(
    mut rx: mpsc::UnboundedReceiver<Commit>,
    session: Session,
    fsync: bool,
    control: Arc<Control>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(c) = rx.try_recv() {
            batch.push(c);
        }
        let newest = batch.iter_mut().rev().find_map(|c| c.file.take());
        if let (true, Some(file)) = (fsync, newest) {
            let synced = tokio::task::spawn_blocking(move || file.sync_data()).await;
            match synced {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // Not acknowledged: the broker will deliver these again.
                    tracing::error!(error = %e, "cannot fsync the spool; messages not acknowledged");
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "fsync task failed; messages not acknowledged");
                    continue;
                }
            }
        }
        control.wake();
        for a in batch.into_iter().flat_map(|c| c.acks) {
            if session.ack(a).await.is_err() {
                break;
            }
        }
    }
}

/// The MQTT side.
struct Ingest {
    mapper: Mapper,
    spool: Arc<Mutex<Spool>>,
    stats: Arc<Stats>,
    to_acker: mpsc::UnboundedSender<Commit>,
    max_payload: usize,
    /// Messages in the spool (not yet flushed) that the broker waits an ack for.
    acks: Vec<AckToken>,
    warned: HashSet<String>,
    appended: bool,
}

impl Ingest {
    /// Maps and spools one message; its ack waits for the next [`Ingest::commit`].
    /// `false` when shutdown came while the spool could not take it (then it is not
    /// acknowledged, and the broker delivers it again).
    async fn take(&mut self, m: Message, shutdown: &CancellationToken) -> bool {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        let received = UtcNanos::now().as_nanos();
        let mut lines = String::new();
        if m.payload.len() > self.max_payload {
            let reason = format!(
                "payload of {} bytes is larger than max_payload_bytes ({})",
                m.payload.len(),
                self.max_payload
            );
            self.malformed(&m.topic, &reason);
        } else {
            match self.mapper.map(&m.topic, &m.payload, received) {
                Ok(mapped) => {
                    let mut problems = mapped.problems;
                    for p in &mapped.points {
                        if let Err(e) = line_protocol::encode(p, &mut lines) {
                            problems.push(e.to_string());
                        }
                    }
                    if !problems.is_empty() {
                        self.malformed(&m.topic, &problems.join("; "));
                    }
                }
                Err(MapError::Unmatched(reason)) => {
                    self.stats.unmatched.fetch_add(1, Ordering::Relaxed);
                    self.warn_once(&m.topic, &format!("{reason}; message ignored"));
                }
                Err(MapError::Malformed(reason)) => self.malformed(&m.topic, &reason),
            }
        }
        if !lines.is_empty()
            && !self
                .append(&record::encode(received, &lines), shutdown)
                .await
        {
            return false;
        }
        if let Some(a) = m.ack {
            self.acks.push(a);
        }
        true
    }

    /// Appends a record, holding on (without acknowledging anything newer) while the
    /// spool cannot take it.
    async fn append(&mut self, rec: &[u8], shutdown: &CancellationToken) -> bool {
        let mut logged = false;
        loop {
            let r = match self.spool.lock() {
                Ok(mut s) => {
                    let before = s.stats.dropped;
                    let r = s.append(rec);
                    let dropped = s.stats.dropped - before;
                    if dropped > 0 {
                        self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
                    }
                    r
                }
                Err(_) => Err(SpoolError::Io(std::io::Error::other("spool lock poisoned"))),
            };
            match r {
                Ok(()) => {
                    self.appended = true;
                    return true;
                }
                Err(SpoolError::TooLarge(n)) => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(bytes = n, "record too large for the spool; dropped");
                    return true;
                }
                Err(e) => {
                    if !logged {
                        tracing::error!(error = %e, "spool cannot take more; holding MQTT acknowledgements until it can (the broker keeps the messages)");
                        logged = true;
                    }
                    // What is already in the spool can be acknowledged meanwhile.
                    self.commit().await;
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
    }

    /// Hands what was appended to the kernel, and its acks to the [`acker`], which makes
    /// it durable and acknowledges it to the broker while the next messages come in.
    async fn commit(&mut self) {
        let mut file = None;
        if self.appended {
            let handle = match self.spool.lock() {
                Ok(mut s) => {
                    self.stats
                        .spool_bytes
                        .store(s.pending_bytes(), Ordering::Relaxed);
                    s.sync_handle()
                }
                Err(_) => Err(SpoolError::Io(std::io::Error::other("spool lock poisoned"))),
            };
            match handle {
                Ok(f) => file = Some(f),
                Err(e) => {
                    // Not acknowledged: the broker will deliver these again.
                    tracing::error!(error = %e, "cannot flush the spool; messages not acknowledged");
                    self.acks.clear();
                    return;
                }
            }
            self.appended = false;
        }
        if file.is_none() && self.acks.is_empty() {
            return;
        }
        let acks = std::mem::take(&mut self.acks);
        if self.to_acker.send(Commit { file, acks }).is_err() {
            tracing::error!("acknowledgement task gone; messages not acknowledged");
        }
    }

    fn malformed(&mut self, topic: &str, reason: &str) {
        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
        self.warn_once(topic, reason);
    }

    fn warn_once(&mut self, topic: &str, reason: &str) {
        if self.warned.len() < WARNED_TOPICS && self.warned.insert(topic.to_string()) {
            tracing::warn!(topic, reason, "message not (fully) written; further problems on this topic are counted in telemetry/stats, not logged");
        }
    }
}
