//! The `burnin` service: the [`Engine`] on MQTT. Messages are handled as they arrive,
//! a clock tick runs hold times, timeouts and IV settling; effects are carried out in
//! order: commands published, the checkpoint written before anything else is said.

use std::time::{Duration, Instant};

use dcs_shared::shutdown::CancellationToken;
use dcs_shared::{command, MqttSettings, QoS, Session, SessionEvent, SessionOptions, UtcNanos};

use crate::checkpoint::Checkpoints;
use crate::commands::BurninCommand;
use crate::config::BurninConfig;
use crate::engine::{Effect, Engine, Request, Run};
use crate::sequence;
use crate::world::World;

struct Io {
    session: Session,
    checkpoints: Checkpoints,
    status_topic: String,
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
    };
    let mut startup = Vec::new();
    if let Some(doc) = saved {
        match serde_json::from_value::<Run>(doc) {
            Ok(run) => startup = engine.restore(run, UtcNanos::now()),
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
    io.apply(startup);
    io.apply(vec![engine.status(UtcNanos::now())]);

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
                Some(SessionEvent::Connected) => tracing::info!("connected to the broker"),
                Some(SessionEvent::Disconnected(why)) => {
                    // Replies cannot arrive: a step waiting for one times out and pauses.
                    tracing::warn!(why, "broker connection lost");
                }
            },
        }
    }
    session.shutdown().await;
    Ok(())
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
        BurninCommand::Refresh => return Err("refresh is answered by the service".into()),
    })
}
