//! The `julabo` service: polls the chiller, publishes `<name>/status` (retained), and
//! carries out `<name>/cmd/...` with one reply each.
//!
//! Commands go first: the line carries one paced query at a time, and between two of
//! them the loop takes in every command that has arrived; a command waiting gets the
//! next slot, never the end of a poll cycle. Commands are carried out and replied to
//! in the order they arrived (malformed ones too, so replies keep that order).

use std::collections::VecDeque;

use dcs_shared::command::{self, CommandError};
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::{Message, MqttSettings, QoS, Session, SessionEvent, SessionOptions};
use tokio::sync::mpsc::error::TryRecvError;

use crate::chiller::Chiller;
use crate::commands::JulaboCommand;
use crate::config::JulaboConfig;
use crate::schedule::Slot;

type Queue = VecDeque<(Message, Result<JulaboCommand, CommandError>)>;

/// Queues a command (anything else from the session needs nothing from us: retained
/// state is restored by the session itself).
fn take(name: &str, ev: SessionEvent, queue: &mut Queue) {
    if let SessionEvent::Message(msg) = ev {
        if let Some(parsed) = command::parse::<JulaboCommand>(name, &msg) {
            queue.push_back((msg, parsed));
        }
    }
}

/// Runs until `shutdown`.
pub async fn run(
    cfg: JulaboConfig,
    mqtt: MqttSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = cfg.name.clone();
    let mut chiller = Chiller::new(cfg).map_err(anyhow::Error::msg)?;
    let options = SessionOptions::new(&name).subscribe(&format!("{name}/cmd/#"), QoS::AtLeastOnce);
    let (session, mut events) = Session::start(&mqtt, options)?;
    let status_topic = format!("{name}/status");
    let publish = |c: &Chiller| session.publish_state(&status_topic, c.status_json().to_string());
    publish(&chiller);

    let mut queue = Queue::new();
    let mut interrupted = None;
    'run: loop {
        loop {
            match events.try_recv() {
                Ok(ev) => take(&name, ev, &mut queue),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => break 'run,
            }
        }
        match chiller.next_slot(!queue.is_empty()) {
            Slot::Command => {
                let Some((msg, parsed)) = queue.pop_front() else {
                    continue;
                };
                let result = match parsed {
                    Err(e) => Err(e.to_string()),
                    Ok(cmd) => {
                        let result = tokio::select! {
                            _ = shutdown.cancelled() => {
                                interrupted = Some(msg);
                                break 'run;
                            }
                            r = chiller.execute(&cmd) => r,
                        };
                        // Unless a STATUS still owed to this command will publish it.
                        if !chiller.status_owed() {
                            publish(&chiller);
                        }
                        result
                    }
                };
                session.answer(&msg, result, chiller.state().as_str()).await;
            }
            Slot::Idle(until) => tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'run,
                ev = events.recv() => match ev {
                    Some(ev) => take(&name, ev, &mut queue),
                    None => break 'run,
                },
                _ = tokio::time::sleep_until(until) => {}
            },
            slot => {
                let publish_now = tokio::select! {
                    _ = shutdown.cancelled() => break 'run,
                    p = chiller.step(slot) => p,
                };
                if publish_now {
                    publish(&chiller);
                }
            }
        }
    }
    // Every command still gets its one reply.
    while let Ok(ev) = events.try_recv() {
        take(&name, ev, &mut queue);
    }
    let state = chiller.state();
    if let Some(msg) = interrupted {
        let why = format!("the service stopped while carrying this out: check {status_topic}");
        session.answer(&msg, Err(why), state.as_str()).await;
    }
    for (msg, _) in queue {
        let why = "the service is stopping: not carried out";
        session.answer(&msg, Err(why.into()), state.as_str()).await;
    }
    session.shutdown().await;
    Ok(())
}
