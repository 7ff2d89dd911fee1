//! The MQTT commands of SPEC 3.1, parsed (no I/O).

use dcs_shared::command::{self, Command, CommandError};

use crate::pv::Side;

/// A command to the CAEN FSM.
#[derive(Debug, Clone, PartialEq)]
pub enum CaenCommand {
    /// `switch/<lv|hv>` (all active channels) or `switch/<lv|hv>/<id>`, payload on/off.
    Switch {
        /// Supply.
        side: Side,
        /// On or off.
        on: bool,
        /// One channel, or all active ones.
        channel: Option<String>,
    },
    /// `setv/<lv|hv>/<id>`, payload volts.
    SetV {
        /// Supply.
        side: Side,
        /// Channel id.
        channel: String,
        /// Volts.
        volts: f64,
    },
    /// `clear`: clear latched alarms.
    Clear,
    /// `refresh`: republish everything.
    Refresh,
    /// `reload`: re-read the config file and rebuild the channels.
    Reload,
    /// `reconnect`: drop and recreate the CA channels.
    Reconnect,
}

fn side(s: &str) -> Result<Side, CommandError> {
    match s {
        "lv" => Ok(Side::Lv),
        "hv" => Ok(Side::Hv),
        other => Err(CommandError::new(format!(
            "`{}` is not a supply: use lv or hv",
            command::truncate(other, 20)
        ))),
    }
}

fn on_off(payload: &[u8]) -> Result<bool, CommandError> {
    match command::text(payload)?.to_ascii_lowercase().as_str() {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(CommandError::new(format!(
            "payload must be `on` or `off`, got `{}`",
            command::truncate(other, 40)
        ))),
    }
}

impl Command for CaenCommand {
    fn parse(path: &[&str], payload: &[u8]) -> Result<Self, CommandError> {
        match path {
            ["switch", s] => Ok(CaenCommand::Switch {
                side: side(s)?,
                on: on_off(payload)?,
                channel: None,
            }),
            ["switch", s, id] => Ok(CaenCommand::Switch {
                side: side(s)?,
                on: on_off(payload)?,
                channel: Some(id.to_string()),
            }),
            ["setv", s, id] => Ok(CaenCommand::SetV {
                side: side(s)?,
                channel: id.to_string(),
                volts: command::number(payload)?,
            }),
            ["clear"] => command::expect_empty(payload).map(|_| CaenCommand::Clear),
            ["refresh"] => command::expect_empty(payload).map(|_| CaenCommand::Refresh),
            ["reload"] => command::expect_empty(payload).map(|_| CaenCommand::Reload),
            ["reconnect"] => command::expect_empty(payload).map(|_| CaenCommand::Reconnect),
            _ => Err(CommandError::new(format!(
                "unknown command `{}`: use switch/<lv|hv>[/<id>], setv/<lv|hv>/<id>, clear, \
                 refresh, reload or reconnect",
                command::truncate(&path.join("/"), 60)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(path: &str, payload: &str) -> Result<CaenCommand, String> {
        let parts: Vec<&str> = path.split('/').collect();
        CaenCommand::parse(&parts, payload.as_bytes()).map_err(|e| e.0)
    }

    #[test]
    fn the_python_topics_parse() {
        assert_eq!(
            p("switch/lv", "on"),
            Ok(CaenCommand::Switch {
                side: Side::Lv,
                on: true,
                channel: None
            })
        );
        assert_eq!(
            p("switch/hv/3", " OFF\n"),
            Ok(CaenCommand::Switch {
                side: Side::Hv,
                on: false,
                channel: Some("3".into())
            })
        );
        assert_eq!(
            p("setv/hv/0", "150.5"),
            Ok(CaenCommand::SetV {
                side: Side::Hv,
                channel: "0".into(),
                volts: 150.5
            })
        );
        assert_eq!(p("clear", ""), Ok(CaenCommand::Clear));
        assert_eq!(p("reload", ""), Ok(CaenCommand::Reload));
    }

    #[test]
    fn bad_commands_say_why() {
        assert!(p("switch/lv", "maybe")
            .unwrap_err()
            .contains("`on` or `off`"));
        assert!(p("switch/mv", "on").unwrap_err().contains("not a supply"));
        assert!(p("setv/lv/0", "1e999").unwrap_err().contains("number"));
        assert!(p("setv/lv", "1").unwrap_err().contains("unknown command"));
        assert!(p("explode", "")
            .unwrap_err()
            .contains("unknown command `explode`"));
        assert!(p("refresh", "now").unwrap_err().contains("no payload"));
    }
}
