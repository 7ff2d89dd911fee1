//! The `burnin` service: the [`Engine`] on MQTT. Messages are handled as they arrive,
//! a clock tick runs hold times, timeouts and IV settling; effects are carried out in
//! order: commands published, the checkpoint written before anything else is said.

use std::time::{Duration, Instant};

use dcs_shared::line_protocol;
use dcs_shared::outbox::Outbox;
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::{command, MqttSettings, QoS, Session, SessionEvent, SessionOptions, UtcNanos};

use crate::checkpoint::Checkpoints;
use crate::commands::BurninCommand;
use crate::config::BurninConfig;
use crate::engine::{Effect, Engine, Request, Run};
use crate::sequence;
use crate::store::RunStore;
use crate::world::World;

struct Io {
    session: Session,
    checkpoints: Checkpoints,
    status_topic: String,
    mongo: Outbox,
    influx: Outbox,
}

impl Io {
    fn apply(&self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Command { topic, payload } => {
                    if !self
                        .session
                        .try_publish(&topic, payload, QoS::AtLeastOnce, false)
                    {
                        // Its reply will not come: the reply timeout pauses the run.
                        tracing::error!(topic, "command not sent (broker away or queue full)");
                    }
                }
                Effect::Status(doc) => self
                    .session
                    .publish_state(&self.status_topic, doc.to_string()),
                Effect::Checkpoint(doc) => {
                    if let Err(e) = self.checkpoints.save(doc.as_ref()) {
                        tracing::error!(error = %e, "cannot write the checkpoint: a restart would resume from an older step");
                    }
                }
                Effect::Record(doc) => {
                    let id = doc.get("id").and_then(|v| v.as_str()).unwrap_or("run");
                    match self.checkpoints.keep_run(id, &doc) {
                        Ok(f) => tracing::info!(run = id, file = %f.display(), "run document kept"),
                        Err(e) => {
                            tracing::error!(run = id, error = %e, "cannot keep the run document")
                        }
                    }
                    if let Err(e) = self.mongo.push(doc.to_string().as_bytes()) {
                        tracing::error!(run = id, error = %e, "cannot queue the run document for MongoDB (the file is kept)");
                    }
                }
                Effect::Point(p) => {
                    let mut line = String::new();
                    match line_protocol::encode(&p, &mut line) {
                        Ok(()) => {
                            if let Err(e) = self.influx.push(line.as_bytes()) {
                                tracing::error!(error = %e, "cannot queue a burnin_steps point");
                            }
                        }
                        Err(e) => tracing::error!(error = %e.0, "burnin_steps point not encodable"),
                    }
                }
                Effect::Log(false, m) => tracing::info!("{m}"),
                Effect::Log(true, m) => tracing::warn!("{m}"),
            }
        }
    }
}

/// Runs until `shutdown`.
pub async fn run(
    cfg: BurninConfig,
    mqtt: MqttSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let checkpoints = Checkpoints::open(&cfg.state_dir)
        .map_err(|e| anyhow::anyhow!("cannot use state_dir {}: {e}", cfg.state_dir.display()))?;
    let saved = checkpoints.load().map_err(anyhow::Error::msg)?;
    let queue_dir = cfg.state_dir.join("queue");
    let mongo = Outbox::open(&queue_dir, "mongodb")
        .map_err(|e| anyhow::anyhow!("queue {}: {e}", queue_dir.display()))?;
    let influx = Outbox::open(&queue_dir, "influxdb")
        .map_err(|e| anyhow::anyhow!("queue {}: {e}", queue_dir.display()))?;
    let delivery_stop = CancellationToken::new();
    start_delivery(&cfg, &mongo, &influx, &delivery_stop);
    let world = World::new(cfg.services.clone(), &cfg.environment, Instant::now());
    let mut engine = Engine::new(&cfg.name, cfg.settings(), world);
    let mut options = SessionOptions::new(&cfg.name);
    for f in engine.world.filters() {
        options = options.subscribe(&f, QoS::AtLeastOnce);
    }
    options = options.subscribe(&format!("{}/cmd/#", cfg.name), QoS::AtLeastOnce);
    let (session, mut events) = Session::start(&mqtt, options)?;
    let io = Io {
        session: session.clone(),
        checkpoints,
        status_topic: format!("{}/status", cfg.name),
        mongo,
        influx,
    };
    // Taken back once connected: what it sends (an ending's switch-offs) must not be
    // dropped for want of a connection.
    let mut pending: Option<Run> = None;
    if let Some(doc) = saved {
        match serde_json::from_value::<Run>(doc) {
            Ok(run) => pending = Some(run),
            Err(e) => anyhow::bail!(
                "{}/checkpoint.json is not a run of this version ({e}): move it away to start afresh",
                cfg.state_dir.display()
            ),
        }
    }
    tracing::info!(
        sequences = cfg.sequences().len(),
        dir = %cfg.sequences_dir.display(),
        "burnin started"
    );
    if pending.is_none() {
        io.apply(vec![engine.status(UtcNanos::now())]);
    }

    let mut tick = tokio::time::interval(Duration::from_millis(cfg.timing.tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status_every = tokio::time::interval(Duration::from_secs_f64(cfg.timing.status_secs));
    status_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => io.apply(engine.tick(Instant::now(), UtcNanos::now())),
            _ = status_every.tick() => {
                if engine.run().is_some_and(|r| r.end_ns.is_none()) {
                    io.apply(vec![engine.status(UtcNanos::now())]);
                }
            }
            ev = events.recv() => match ev {
                None => break,
                Some(SessionEvent::Message(msg)) => {
                    let (now, wall) = (Instant::now(), UtcNanos::now());
                    if let Some(parsed) = command::parse::<BurninCommand>(&cfg.name, &msg) {
                        let (result, effects) = match parsed {
                            Err(e) => (Err(e.to_string()), vec![]),
                            Ok(BurninCommand::Refresh) => (Ok(()), vec![engine.status(wall)]),
                            Ok(c) => match request(&cfg, c) {
                                Err(e) => (Err(e), vec![]),
                                Ok(req) => engine.request(req, now, wall),
                            },
                        };
                        // The checkpoint is on disk before the operator hears "ok".
                        io.apply(effects);
                        session.answer(&msg, result, engine.state()).await;
                        continue;
                    }
                    io.apply(engine.on_message(&msg.topic, &msg.payload, now, wall));
                }
                Some(SessionEvent::Connected) => {
                    tracing::info!("connected to the broker");
                    if let Some(run) = pending.take() {
                        io.apply(engine.restore(run, Instant::now(), UtcNanos::now()));
                    }
                }
                Some(SessionEvent::Disconnected(why)) => {
                    // Replies cannot arrive: a step waiting for one times out and pauses.
                    tracing::warn!(why, "broker connection lost");
                }
            },
        }
    }
    delivery_stop.cancel();
    session.shutdown().await;
    Ok(())
}

/// Starts delivery from the queues to the databases that are configured; the others
/// keep their records until one is.
fn start_delivery(cfg: &BurninConfig, mongo: &Outbox, influx: &Outbox, stop: &CancellationToken) {
    match cfg.mongodb.effective() {
        Some(settings) => {
            let (q, stop) = (mongo.clone(), stop.clone());
            tokio::spawn(async move {
                let store = match RunStore::new(&settings).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "MongoDB not usable: run documents stay queued");
                        return;
                    }
                };
                let store = std::sync::Arc::new(tokio::sync::Mutex::new(store));
                q.deliver(
                    move |bytes| {
                        let store = store.clone();
                        async move { store.lock().await.store(&bytes).await }
                    },
                    stop,
                )
                .await;
            });
        }
        // A configuration choice (the simulated stack's), said once: not a warning.
        None => tracing::info!(
            "no MongoDB configured (mongodb.uri, DCS_MONGODB_URI): run documents are kept in state_dir/runs and queued"
        ),
    }
    match cfg.influx() {
        Some(settings) => {
            tokio::spawn(dcs_shared::influx::deliver_outbox(
                influx.clone(),
                settings,
                stop.clone(),
            ));
        }
        None => tracing::info!(
            "no InfluxDB configured (influx.url, DCS_INFLUX_URL): burnin_steps points are queued"
        ),
    }
}

/// An operator command as the engine takes it (a start loads its sequence file).
fn request(cfg: &BurninConfig, c: BurninCommand) -> Result<Request, String> {
    Ok(match c {
        BurninCommand::Start {
            sequence: name,
            modules,
            operator,
            comment,
        } => {
            let Some((_, file)) = cfg.sequences().into_iter().find(|(n, _)| *n == name) else {
                let names: Vec<String> = cfg.sequences().into_iter().map(|(n, _)| n).collect();
                return Err(format!(
                    "no sequence `{name}` in {} (sequences: {})",
                    cfg.sequences_dir.display(),
                    names.join(", ")
                ));
            };
            let (seq, text) = sequence::load(&file, cfg.limits).map_err(|e| e.to_string())?;
            Request::Start {
                name,
                sequence: Box::new(seq),
                text,
                modules,
                operator,
                comment,
            }
        }
        BurninCommand::Pause { operator, reason } => Request::Pause { operator, reason },
        BurninCommand::Resume { operator } => Request::Resume { operator },
        BurninCommand::Abort { operator, reason } => Request::Abort { operator, reason },
        BurninCommand::IvScan {
            modules,
            operator,
            comment,
            scan,
        } => {
            let (seq, text) = sequence::iv_scan_alone(scan, cfg.limits)?;
            Request::Start {
                name: "iv_scan".into(),
                sequence: Box::new(seq),
                text,
                modules,
                operator,
                comment,
            }
        }
        BurninCommand::Refresh => return Err("refresh is answered by the service".into()),
    })
}
