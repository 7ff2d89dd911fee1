//! The bridge service: commands on MQTT, one run at a time, records into the queues.
//!
//! A run's start instant is taken when the command is accepted, its end when the
//! backend reports the outcome; both go, unchanged, into the MongoDB document, the
//! `calibration_runs` points and the `ph2acf/run` markers.

use std::sync::Arc;
use std::time::Duration;

use dcs_shared::command;
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::{MqttSettings, QoS, Session, SessionEvent, SessionOptions, UtcNanos};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backend::{self, Outcome, RunEvent, RunStatus};
use crate::commands::{BridgeCommand, RunPlan};
use crate::config::{BackendKind, BridgeConfig};
use crate::outbox::{Delivery, Outbox};
use crate::record::{new_run_id, RunRecord};
use crate::results;
use crate::store::MongoStore;

struct Current {
    record: RunRecord,
    progress: Option<f64>,
    stop: CancellationToken,
    stopping: bool,
    task: JoinHandle<Outcome>,
    events: mpsc::UnboundedReceiver<RunEvent>,
}

struct Bridge {
    cfg: Arc<BridgeConfig>,
    session: Session,
    mongo: Outbox,
    influx: Outbox,
    current: Option<Current>,
    last_run: Option<serde_json::Value>,
    last_error: Option<String>,
}

impl Bridge {
    fn state(&self) -> &'static str {
        match &self.current {
            None => "idle",
            Some(c) if c.stopping => "stopping",
            Some(_) => "running",
        }
    }

    fn publish_status(&self) {
        let c = self.current.as_ref();
        let r = c.map(|c| &c.record);
        let queue = |o: &Outbox| {
            let s = o.state();
            json!({"pending_bytes": s.pending_bytes, "delivered": s.delivered, "error": s.error})
        };
        let status = json!({
            "state": self.state(),
            "run_id": r.map(|r| &r.run_id),
            "run_number": r.and_then(|r| r.run_number),
            "calibration": r.map(|r| &r.calibration),
            "config": r.map(|r| &r.config),
            "modules": r.map(|r| &r.modules),
            "operator": r.map(|r| &r.operator),
            "progress": c.and_then(|c| c.progress),
            "started_at": r.map(|r| UtcNanos(r.start_ns).to_string()),
            "start_ns": r.map(|r| r.start_ns),
            "last_error": self.last_error,
            "last_run": self.last_run,
            "queue": {"mongodb": queue(&self.mongo), "influxdb": queue(&self.influx)},
            "backend": match self.cfg.backend { BackendKind::Middleware => "middleware", BackendKind::Cli => "cli" },
            "time": UtcNanos::now().as_nanos(),
        });
        self.session
            .publish_state(&self.session.topic("status"), status.to_string());
    }

    /// Queues both records of `rec` (`end` selects the end point) and sends the marker.
    fn record(&mut self, rec: &RunRecord, end: bool) {
        match serde_json::to_vec(rec) {
            Ok(bytes) => {
                if let Err(e) = self.mongo.push(&bytes) {
                    tracing::error!(run_id = rec.run_id, error = %e, "cannot queue the run document");
                    self.last_error =
                        Some(format!("run {} not queued for MongoDB: {e}", rec.run_id));
                }
            }
            Err(e) => tracing::error!(run_id = rec.run_id, error = %e, "cannot serialise the run"),
        }
        if let Some(line) = rec.line(end) {
            if let Err(e) = self.influx.push(line.as_bytes()) {
                tracing::error!(run_id = rec.run_id, error = %e, "cannot queue the InfluxDB marker");
                self.last_error = Some(format!("run {} marker not queued: {e}", rec.run_id));
            }
        }
        let topic = self.session.topic("run");
        if !self
            .session
            .try_publish(&topic, rec.marker(end).to_string(), QoS::AtLeastOnce, false)
        {
            tracing::warn!(
                run_id = rec.run_id,
                "run marker not published on MQTT (broker away)"
            );
        }
    }

    fn start(&mut self, plan: RunPlan) {
        let start = UtcNanos::now();
        let record = RunRecord {
            run_id: new_run_id(start),
            run_number: None,
            calibration: plan.calibration.clone(),
            config: plan.config.clone(),
            config_file: plan.config_file.display().to_string(),
            modules: plan.modules.clone(),
            operator: plan.operator.clone(),
            comment: plan.comment.clone(),
            backend: match self.cfg.backend {
                BackendKind::Middleware => "middleware",
                BackendKind::Cli => "cli",
            }
            .into(),
            status: RunStatus::Running,
            error: None,
            start_ns: start.as_nanos(),
            end_ns: None,
            results: None,
        };
        tracing::info!(run_id = record.run_id, calibration = record.calibration,
            config = record.config, modules = ?record.modules, operator = record.operator, "run started");
        self.record(&record, false);
        let (tx, events) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let (cfg, s) = (self.cfg.clone(), stop.clone());
        let task = tokio::spawn(async move { backend::execute(&cfg, &plan, tx, s).await });
        self.last_error = None;
        self.current = Some(Current {
            record,
            progress: Some(0.0),
            stop,
            stopping: false,
            task,
            events,
        });
        self.publish_status();
    }

    async fn finish(&mut self, outcome: Outcome) {
        let end = UtcNanos::now();
        let Some(mut cur) = self.current.take() else {
            return;
        };
        while let Ok(ev) = cur.events.try_recv() {
            apply(&mut cur, ev);
        }
        let mut rec = cur.record;
        rec.end_ns = Some(end.as_nanos());
        rec.status = outcome.status;
        rec.error = outcome.error;
        if let Some(n) = rec.run_number {
            let dir = results::run_dir(&self.cfg.work_dir, n);
            let inline = self.cfg.inline_max_bytes;
            rec.results = tokio::task::spawn_blocking(move || results::collect(&dir, inline))
                .await
                .ok();
        }
        let chips = rec.results.as_ref().map_or(0, |r| r.chips.len());
        if rec.status == RunStatus::Failed {
            tracing::error!(
                run_id = rec.run_id,
                error = rec.error.as_deref().unwrap_or(""),
                chips,
                "run failed"
            );
            self.last_error = rec.error.clone();
        } else {
            tracing::info!(
                run_id = rec.run_id,
                status = rec.status.as_str(),
                chips,
                duration_s = (rec.end_ns.unwrap_or(rec.start_ns) - rec.start_ns) as f64 / 1e9,
                "run ended"
            );
        }
        self.record(&rec, true);
        self.last_run = Some(json!({
            "run_id": rec.run_id, "run_number": rec.run_number, "calibration": rec.calibration,
            "status": rec.status.as_str(), "error": rec.error, "start_ns": rec.start_ns,
            "end_ns": rec.end_ns, "chips": chips,
        }));
        self.publish_status();
    }

    fn command(&mut self, cmd: BridgeCommand) -> Result<(), String> {
        match cmd {
            BridgeCommand::Refresh => {
                self.publish_status();
                Ok(())
            }
            BridgeCommand::Stop => match &mut self.current {
                None => Err("no run is going".into()),
                Some(c) if c.stopping => {
                    Err(format!("run {} is already stopping", c.record.run_id))
                }
                Some(c) => {
                    tracing::info!(run_id = c.record.run_id, "stop requested");
                    c.stopping = true;
                    c.stop.cancel();
                    self.publish_status();
                    Ok(())
                }
            },
            BridgeCommand::Run(req) => {
                // The request's own mistakes first: they need fixing whatever runs.
                let plan = req.check(&self.cfg).map_err(|e| e.0)?;
                if let Some(c) = &self.current {
                    return Err(format!(
                        "run {} ({}) is going: one run at a time; stop it first with {}",
                        c.record.run_id,
                        c.record.calibration,
                        self.session.topic("cmd/stop")
                    ));
                }
                self.start(plan);
                Ok(())
            }
        }
    }
}

fn apply(cur: &mut Current, ev: RunEvent) {
    match ev {
        RunEvent::RunNumber(n) => cur.record.run_number = Some(n),
        RunEvent::Progress(p) => cur.progress = Some(p),
    }
}

/// What the current run did next.
enum Activity {
    Event(RunEvent),
    Ended(Outcome),
}

async fn activity(cur: &mut Option<Current>) -> Activity {
    let Some(c) = cur else {
        return std::future::pending().await;
    };
    tokio::select! {
        // Events first: the run number must be known before the end is recorded.
        biased;
        Some(ev) = c.events.recv() => Activity::Event(ev),
        r = &mut c.task => Activity::Ended(match r {
            Ok(o) => o,
            Err(e) => Outcome {
                status: RunStatus::Failed,
                error: Some(format!("bridge run task failed: {e}")),
            },
        }),
    }
}

async fn run_end(cur: &mut Option<Current>) -> Outcome {
    loop {
        match activity(cur).await {
            Activity::Ended(o) => return o,
            Activity::Event(ev) => {
                if let Some(c) = cur.as_mut() {
                    apply(c, ev);
                }
            }
        }
    }
}

/// Starts the delivery tasks of both queues.
fn start_delivery(
    cfg: &BridgeConfig,
    mongo: &Outbox,
    influx: &Outbox,
    shutdown: &CancellationToken,
) {
    match cfg.mongodb() {
        Some(settings) => {
            let q = mongo.clone();
            let sd = shutdown.clone();
            tokio::spawn(async move {
                let store = match MongoStore::new(&settings).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "MongoDB not usable: run documents stay queued");
                        return;
                    }
                };
                let store = Arc::new(tokio::sync::Mutex::new(store));
                q.deliver(
                    move |bytes| {
                        let store = store.clone();
                        async move {
                            let rec: RunRecord = match serde_json::from_slice(&bytes) {
                                Ok(r) => r,
                                Err(e) => {
                                    return Delivery::Reject(format!(
                                        "unreadable queued record: {e}"
                                    ))
                                }
                            };
                            store.lock().await.write(&rec).await
                        }
                    },
                    sd,
                )
                .await;
            });
        }
        // A configuration choice (the simulated stack's), said once: not a warning.
        None => tracing::info!(dir = %cfg.queue_dir.display(),
            "no MongoDB configured (mongodb.uri, DCS_MONGODB_URI): run documents are kept in the queue"),
    }
    match cfg.influx() {
        Some(settings) => {
            tokio::spawn(dcs_shared::influx::deliver_outbox(
                influx.clone(),
                settings,
                shutdown.clone(),
            ));
        }
        None => tracing::info!(dir = %cfg.queue_dir.display(),
            "no InfluxDB configured (influx.url, DCS_INFLUX_URL): run markers are kept in the queue"),
    }
}

/// Runs the bridge until `shutdown`. A run going at shutdown is stopped and recorded.
pub async fn run(
    cfg: BridgeConfig,
    mqtt: MqttSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mongo = Outbox::open(&cfg.queue_dir, "mongodb")
        .map_err(|e| anyhow::anyhow!("queue {}: {e}", cfg.queue_dir.display()))?;
    let influx = Outbox::open(&cfg.queue_dir, "influxdb")
        .map_err(|e| anyhow::anyhow!("queue {}: {e}", cfg.queue_dir.display()))?;
    let delivery_stop = CancellationToken::new();
    start_delivery(&cfg, &mongo, &influx, &delivery_stop);
    let options =
        SessionOptions::new(&cfg.name).subscribe(&format!("{}/cmd/#", cfg.name), QoS::AtLeastOnce);
    let (session, mut events) = Session::start(&mqtt, options)?;
    tracing::info!(backend = ?cfg.backend, work_dir = %cfg.work_dir.display(),
        calibrations = cfg.calibrations.len(), configs = cfg.configs.len(), "ph2acf bridge started");
    let mut b = Bridge {
        cfg: Arc::new(cfg),
        session,
        mongo,
        influx,
        current: None,
        last_run: None,
        last_error: None,
    };
    b.publish_status();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut shown_queue = (b.mongo.state(), b.influx.state());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            act = activity(&mut b.current) => match act {
                Activity::Event(ev) => {
                    if let Some(c) = b.current.as_mut() {
                        apply(c, ev);
                    }
                    b.publish_status();
                }
                Activity::Ended(outcome) => b.finish(outcome).await,
            },
            _ = tick.tick() => {
                let now = (b.mongo.state(), b.influx.state());
                if now != shown_queue {
                    shown_queue = now;
                    b.publish_status();
                }
            }
            ev = events.recv() => match ev {
                None => break,
                Some(SessionEvent::Message(msg)) => {
                    let Some(parsed) = command::parse::<BridgeCommand>(&b.cfg.name, &msg) else { continue };
                    let result = parsed.map_err(|e| e.0).and_then(|c| b.command(c));
                    b.session.answer(&msg, result, b.state()).await;
                }
                Some(SessionEvent::Connected) => {
                    tracing::info!("connected to the broker");
                    b.publish_status();
                }
                Some(SessionEvent::Disconnected(why)) => {
                    tracing::warn!(why, "broker connection lost: a run going keeps going");
                }
            },
        }
    }
    if let Some(c) = b.current.as_mut() {
        tracing::warn!(
            run_id = c.record.run_id,
            "shutting down during a run: stopping it"
        );
        c.stop.cancel();
        let outcome =
            match tokio::time::timeout(Duration::from_secs(15), run_end(&mut b.current)).await {
                Ok(o) => o,
                Err(_) => Outcome {
                    status: RunStatus::Failed,
                    error: None,
                },
            };
        let outcome = Outcome {
            status: if outcome.status == RunStatus::Done {
                RunStatus::Done
            } else {
                RunStatus::Stopped
            },
            error: Some("the bridge was shut down during the run".into()),
        };
        b.finish(outcome).await;
    }
    // Give the stores a moment to take what was just queued; the rest stays queued.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline
        && (b.mongo.state().pending_bytes > 0 && b.cfg.mongodb().is_some()
            || b.influx.state().pending_bytes > 0 && b.cfg.influx().is_some())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    delivery_stop.cancel();
    b.session.shutdown().await;
    tracing::info!("ph2acf bridge stopped");
    Ok(())
}
