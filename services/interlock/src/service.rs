//! The `interlock` service: the [`Interlock`] engine on MQTT. Input messages are
//! evaluated as they arrive (reaction time is one message), and a clock tick ages
//! values, runs hold times and action deadlines.

use std::time::{Duration, Instant};

use dcs_shared::command;
use dcs_shared::permit::PermitKey;
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::{MqttSettings, QoS, Session, SessionEvent, SessionOptions, UtcNanos};

use crate::commands::{AlarmCommand, InterlockCommand};
use crate::config::InterlockConfig;
use crate::engine::{Effect, Interlock};

fn apply(session: &Session, effects: Vec<Effect>) {
    for e in effects {
        match e {
            Effect::State { topic, payload } => session.publish_state(&topic, payload),
            Effect::Command(c) => {
                // A safety command must not be dropped silently: QoS 1, and if the
                // queue refuses it the deadline makes the next action due.
                if !session.try_publish(&c.topic, c.payload, QoS::AtLeastOnce, false) {
                    tracing::error!(topic = c.topic, "interlock command not sent (broker away or queue full); it will time out and escalate");
                }
            }
        }
    }
}

/// Runs until `shutdown`.
pub async fn run(
    cfg: InterlockConfig,
    mqtt: MqttSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let key = PermitKey::from_env_or_file(cfg.permit_key_file.as_deref(), true)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut engine = Interlock::new(&cfg, Instant::now(), UtcNanos::now(), key);
    let mut options = SessionOptions::new(&cfg.name);
    for f in engine.filters() {
        options = options.subscribe(&f, QoS::AtLeastOnce);
    }
    let (session, mut events) = Session::start(&mqtt, options)?;
    tracing::info!(
        rules = cfg.rules.len(),
        inputs = cfg.inputs.len(),
        "interlock started"
    );
    apply(&session, engine.republish(UtcNanos::now()));

    let mut tick = tokio::time::interval(Duration::from_millis(cfg.timing.evaluate_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let alarm_prefix = cfg.alarm_prefix.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => apply(&session, engine.tick(Instant::now(), UtcNanos::now())),
            ev = events.recv() => match ev {
                None => break,
                Some(SessionEvent::Message(msg)) => {
                    let wall = UtcNanos::now();
                    if let Some(parsed) = command::parse::<AlarmCommand>(&alarm_prefix, &msg) {
                        let result = match parsed {
                            Err(e) => Err(e.to_string()),
                            Ok(AlarmCommand::Ack { rule, operator }) => {
                                let (r, effects) = engine.acknowledge(rule.as_deref(), &operator, wall);
                                apply(&session, effects);
                                r
                            }
                            Ok(AlarmCommand::Shelve { rule, minutes, by, reason }) => {
                                let (r, effects) = engine.shelve(&rule, minutes, &by, &reason, wall);
                                apply(&session, effects);
                                r
                            }
                            Ok(AlarmCommand::Unshelve { rule, by }) => {
                                let (r, effects) = engine.unshelve(&rule, &by, wall);
                                apply(&session, effects);
                                r
                            }
                        };
                        reply(&session, &alarm_prefix, &msg, result, engine.state()).await;
                        continue;
                    }
                    if let Some(parsed) = command::parse::<InterlockCommand>(&cfg.name, &msg) {
                        let result = match parsed {
                            Err(e) => Err(e.to_string()),
                            Ok(InterlockCommand::Refresh) => {
                                apply(&session, engine.republish(wall));
                                Ok(())
                            }
                        };
                        reply(&session, &cfg.name, &msg, result, engine.state()).await;
                        continue;
                    }
                    let effects = engine.on_message(&msg.topic, &msg.payload, msg.retain, Instant::now(), wall);
                    apply(&session, effects);
                }
                Some(SessionEvent::Connected) => {
                    tracing::info!("connected to the broker");
                }
                Some(SessionEvent::Disconnected(why)) => {
                    tracing::warn!(why, "broker connection lost: rules keep running on the last values, which age into unsafe");
                }
            },
        }
    }
    session.shutdown().await;
    Ok(())
}

async fn reply(
    session: &Session,
    prefix: &str,
    msg: &dcs_shared::Message,
    result: Result<(), String>,
    state: &str,
) {
    session.answer_as(prefix, msg, result, state).await;
}
