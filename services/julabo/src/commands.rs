//! MQTT commands of SPEC 3.2, parsed and checked before anything reaches the unit.

use dcs_shared::command::{self, Command, CommandError};
use serde::Deserialize;

/// A command on `julabo/cmd/<verb>`.
#[derive(Debug, Clone, PartialEq)]
pub enum JulaboCommand {
    /// Start circulating.
    Start,
    /// Stop circulating.
    Stop,
    /// Poll and publish the status now.
    Refresh,
    /// Close and reopen the line.
    Reconnect,
    /// Control on the external Pt100.
    UseExt,
    /// Control on the internal sensor.
    UseInt,
    /// Set set-point `setpoint` (1..3) to `temp` degC.
    SetWT {
        /// 1..3.
        setpoint: u8,
        /// degC, checked against the configured limits when executed.
        temp: f64,
    },
    /// Make set-point 1..3 the active one.
    UseSP(u8),
    /// Pump pressure stage 1..4.
    SetPress(u8),
}

impl JulaboCommand {
    /// Whether the command writes to the unit.
    pub fn writes(&self) -> bool {
        !matches!(self, JulaboCommand::Refresh | JulaboCommand::Reconnect)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetWt {
    setpoint: u8,
    temp: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UseSp {
    setpoint: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPress {
    press: u8,
}

fn setpoint(n: u8) -> Result<u8, CommandError> {
    if (1..=3).contains(&n) {
        Ok(n)
    } else {
        Err(CommandError::new(format!(
            "setpoint must be 1, 2 or 3, got {n}"
        )))
    }
}

impl Command for JulaboCommand {
    fn parse(path: &[&str], payload: &[u8]) -> Result<Self, CommandError> {
        let none = |c: JulaboCommand| command::expect_empty(payload).map(|_| c);
        match path {
            ["start"] => none(JulaboCommand::Start),
            ["stop"] => none(JulaboCommand::Stop),
            ["refresh"] => none(JulaboCommand::Refresh),
            ["reconnect"] => none(JulaboCommand::Reconnect),
            ["useExt"] => none(JulaboCommand::UseExt),
            ["useInt"] => none(JulaboCommand::UseInt),
            ["setWT"] => {
                let p: SetWt = command::json(payload)?;
                if !p.temp.is_finite() {
                    return Err(CommandError::new("temp must be a number"));
                }
                Ok(JulaboCommand::SetWT { setpoint: setpoint(p.setpoint)?, temp: p.temp })
            }
            ["useSP"] => Ok(JulaboCommand::UseSP(setpoint(command::json::<UseSp>(payload)?.setpoint)?)),
            ["setPress"] => {
                let p: SetPress = command::json(payload)?;
                if !(1..=4).contains(&p.press) {
                    return Err(CommandError::new(format!("press must be a pump stage 1..4, got {}", p.press)));
                }
                Ok(JulaboCommand::SetPress(p.press))
            }
            _ => Err(CommandError::new(format!(
                "unknown command `{}`: use start, stop, refresh, reconnect, useExt, useInt, setWT, useSP, setPress",
                command::truncate(&path.join("/"), 40)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(verb: &str, payload: &str) -> Result<JulaboCommand, CommandError> {
        JulaboCommand::parse(&[verb], payload.as_bytes())
    }

    #[test]
    fn valid_commands() {
        assert_eq!(p("start", ""), Ok(JulaboCommand::Start));
        assert_eq!(
            p("setWT", r#"{"setpoint": 2, "temp": -20.5}"#),
            Ok(JulaboCommand::SetWT {
                setpoint: 2,
                temp: -20.5
            })
        );
        assert_eq!(
            p("useSP", r#"{"setpoint": 3}"#),
            Ok(JulaboCommand::UseSP(3))
        );
        assert_eq!(
            p("setPress", r#"{"press": 4}"#),
            Ok(JulaboCommand::SetPress(4))
        );
    }

    #[test]
    fn invalid_commands_say_why() {
        assert!(p("setWT", r#"{"setpoint": 4, "temp": 1}"#)
            .unwrap_err()
            .0
            .contains("1, 2 or 3"));
        assert!(p("setWT", r#"{"setpoint": 1}"#)
            .unwrap_err()
            .0
            .contains("missing field `temp`"));
        assert!(p("setWT", r#"{"setpoint": 1, "temp": "cold"}"#)
            .unwrap_err()
            .0
            .contains("invalid type"));
        assert!(p("setWT", r#"{"setpoint": 1, "temp": 1, "x": 2}"#)
            .unwrap_err()
            .0
            .contains("unknown field"));
        assert!(p("setPress", r#"{"press": 0}"#)
            .unwrap_err()
            .0
            .contains("1..4"));
        assert!(p("useSP", "2")
            .unwrap_err()
            .0
            .contains("must be a JSON object"));
        // The contract's objects only: an array is not read by field order.
        assert!(p("setWT", "[3, 10.5]")
            .unwrap_err()
            .0
            .contains("got an array"));
        assert!(p("useSP", "[1]").unwrap_err().0.contains("got an array"));
        assert!(p("start", "now").unwrap_err().0.contains("no payload"));
        assert!(p("explode", "")
            .unwrap_err()
            .0
            .contains("unknown command `explode`"));
        assert!(p("setWT", "{").is_err());
    }
}
