//! The launcher on MQTT, as `dcs-launcher`: retained `dcs-launcher/status` with every
//! component's state, and commands `dcs-launcher/cmd/restart` (payload: a component
//! name) and `dcs-launcher/cmd/refresh`, each answered on `dcs-launcher/reply`.

use std::collections::HashMap;

use dcs_shared::command::{self, Command, CommandError};
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::{MqttSettings, QoS, Session, SessionEvent, SessionOptions};
use tokio::sync::mpsc;

use crate::supervisor::StatusBoard;

/// MQTT name of the launcher.
pub const NAME: &str = "dcs-launcher";

/// Commands the launcher takes.
#[derive(Debug, PartialEq)]
pub enum LauncherCommand {
    /// Stop a component and start it again now.
    Restart(String),
    /// Publish the status again.
    Refresh,
}

impl Command for LauncherCommand {
    fn parse(path: &[&str], payload: &[u8]) -> Result<Self, CommandError> {
        match path {
            ["restart"] => match command::text(payload)? {
                "" => Err(CommandError::new(
                    "restart needs the component name as payload",
                )),
                name => Ok(LauncherCommand::Restart(name.to_string())),
            },
            ["refresh"] => command::expect_empty(payload).map(|_| LauncherCommand::Refresh),
            _ => Err(CommandError::new(format!(
                "unknown command `{}`: use restart or refresh",
                command::truncate(&path.join("/"), 40)
            ))),
        }
    }
}

/// Runs the launcher's MQTT presence until `shutdown`.
pub async fn run(
    settings: MqttSettings,
    board: StatusBoard,
    restarts: HashMap<String, mpsc::Sender<()>>,
    shutdown: CancellationToken,
) {
    let options = SessionOptions::new(NAME).subscribe(&format!("{NAME}/cmd/#"), QoS::AtLeastOnce);
    let (session, mut events) = match Session::start(&settings, options) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "launcher cannot use MQTT; status will not be published");
            return;
        }
    };
    let status_topic = session.topic("status");
    let publish = |s: &Session| {
        let body = serde_json::json!({ "components": board.snapshot() });
        s.publish_state(&status_topic, body.to_string());
    };
    publish(&session);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = board.changed() => publish(&session),
            ev = events.recv() => match ev {
                None => break,
                Some(SessionEvent::Message(msg)) => {
                    let Some(parsed) = command::parse::<LauncherCommand>(NAME, &msg) else { continue };
                    let result = match parsed {
                        Err(e) => Err(e.to_string()),
                        Ok(LauncherCommand::Refresh) => {
                            publish(&session);
                            Ok(())
                        }
                        Ok(LauncherCommand::Restart(name)) => match restarts.get(&name) {
                            Some(tx) if tx.try_send(()).is_ok() => Ok(()),
                            Some(_) => Err(format!("a restart of `{name}` is already pending")),
                            None => {
                                let mut known: Vec<_> = restarts.keys().map(String::as_str).collect();
                                known.sort();
                                Err(format!(
                                    "no component `{}` in this stack: running ones are {}",
                                    command::truncate(&name, 40),
                                    known.join(", ")
                                ))
                            }
                        },
                    };
                    session.answer(&msg, result, "running").await;
                }
                Some(_) => {}
            },
        }
    }
    publish(&session);
    session.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(
            LauncherCommand::parse(&["restart"], b" broker \n"),
            Ok(LauncherCommand::Restart("broker".into()))
        );
        assert!(LauncherCommand::parse(&["restart"], b"")
            .unwrap_err()
            .0
            .contains("component name"));
        assert_eq!(
            LauncherCommand::parse(&["refresh"], b""),
            Ok(LauncherCommand::Refresh)
        );
        assert!(LauncherCommand::parse(&["reboot"], b"")
            .unwrap_err()
            .0
            .contains("unknown command `reboot`"));
    }
}
