//! The `julabo` service: polls the chiller, publishes `<name>/status` (retained), and
//! carries out `<name>/cmd/...` with one reply each.

use std::time::Duration;

use dcs_shared::command;
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::{MqttSettings, QoS, Reply, Session, SessionEvent, SessionOptions};

use crate::chiller::Chiller;
use crate::commands::JulaboCommand;
use crate::config::JulaboConfig;

/// Runs until `shutdown`.
pub async fn run(
    cfg: JulaboConfig,
    mqtt: MqttSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = cfg.name.clone();
    let poll_every = Duration::from_secs_f64(cfg.timing.poll_interval_secs);
    let mut chiller = Chiller::new(cfg).map_err(anyhow::Error::msg)?;
    let options = SessionOptions::new(&name).subscribe(&format!("{name}/cmd/#"), QoS::AtLeastOnce);
    let (session, mut events) = Session::start(&mqtt, options)?;
    let status_topic = format!("{name}/status");
    let publish = |c: &Chiller| session.publish_state(&status_topic, c.status_json().to_string());
    publish(&chiller);

    let mut tick = tokio::time::interval(poll_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                chiller.poll().await;
                publish(&chiller);
            }
            ev = events.recv() => match ev {
                None => break,
                Some(SessionEvent::Message(msg)) => {
                    let Some(parsed) = command::parse::<JulaboCommand>(&name, &msg) else { continue };
                    let reply = match parsed {
                        Err(e) => Reply::err(&msg.topic, e, chiller.state.as_str()),
                        Ok(cmd) => {
                            let result = chiller.execute(&cmd).await;
                            publish(&chiller);
                            Reply::from_result(&msg.topic, result, chiller.state.as_str())
                        }
                    };
                    if let Err(e) = session.reply(&msg, &reply).await {
                        tracing::warn!(error = %e, "cannot send reply");
                    }
                }
                Some(_) => {}
            },
        }
    }
    session.shutdown().await;
    Ok(())
}
