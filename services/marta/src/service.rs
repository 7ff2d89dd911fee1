//! The `marta` service: polls the plant, publishes `<name>/status` and `<name>/alarms`
//! (retained), and carries out `<name>/cmd/...` with one reply each, in arrival order,
//! between two polls.

use std::time::Duration;

use dcs_shared::command;
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::{MqttSettings, QoS, Session, SessionEvent, SessionOptions};
use tokio::time::{Instant, MissedTickBehavior};

use crate::commands::MartaCommand;
use crate::config::MartaConfig;
use crate::driver::Driver;

/// Runs until `shutdown`.
pub async fn run(
    cfg: MartaConfig,
    mqtt: MqttSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = cfg.name.clone();
    let republish = Duration::from_secs_f64(cfg.timing.republish_secs);
    let mut poll = tokio::time::interval(Duration::from_secs_f64(cfg.timing.poll_interval_secs));
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut driver = Driver::new(cfg).map_err(anyhow::Error::msg)?;
    let options = SessionOptions::new(&name).subscribe(&format!("{name}/cmd/#"), QoS::AtLeastOnce);
    let (session, mut events) = Session::start(&mqtt, options)?;
    let status_topic = format!("{name}/status");
    let alarms_topic = format!("{name}/alarms");
    tracing::info!(peer = %driver.peer(), "MARTA driver started");

    // `force`: after a command, whatever the deadbands say.
    let publish = |d: &mut Driver, force: bool| {
        let now = std::time::Instant::now();
        let alarms = d.plant.alarms_changed();
        if force || alarms || d.plant.status_due(now, republish) {
            session.publish_state(&status_topic, d.plant.status_json().to_string());
            if force || alarms {
                session.publish_state(&alarms_topic, d.plant.alarms_json().to_string());
            }
            d.plant.mark_published(now);
        }
    };
    publish(&mut driver, true);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                let SessionEvent::Message(msg) = ev else { continue };
                let Some(parsed) = command::parse::<MartaCommand>(&name, &msg) else { continue };
                let result = match parsed {
                    Err(e) => Err(e.to_string()),
                    Ok(cmd) => {
                        // Not cancelled by a shutdown: a plan of writes (a reset pulse)
                        // is never cut in the middle; each step has its timeout.
                        let r = driver.execute(cmd).await;
                        publish(&mut driver, true);
                        // The command read the plant: it counts as this period's poll.
                        poll.reset_at(Instant::now() + poll.period());
                        r
                    }
                };
                session.answer(&msg, result, driver.plant.state().as_str()).await;
            }
            _ = poll.tick() => {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = driver.poll() => {}
                }
                publish(&mut driver, false);
            }
        }
    }
    // Commands that arrived during the last step still get their one reply.
    while let Ok(ev) = events.try_recv() {
        if let SessionEvent::Message(msg) = ev {
            if command::parse::<MartaCommand>(&name, &msg).is_some() {
                let why = "the service is stopping: not carried out";
                session
                    .answer(&msg, Err(why.into()), driver.plant.state().as_str())
                    .await;
            }
        }
    }
    session.shutdown().await;
    Ok(())
}
