//! Commands: `<alarm_prefix>/cmd/ack` and `<name>/cmd/refresh`. Parsing is pure.

use dcs_shared::command::{self, Command, CommandError};
use serde::Deserialize;

/// `<alarm_prefix>/cmd/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlarmCommand {
    /// Acknowledge one rule's alarm, or all (`rule: None`).
    Ack {
        /// The rule, or every latched alarm.
        rule: Option<String>,
        /// Who acknowledged, for the record.
        operator: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckPayload {
    rule: String,
    #[serde(default)]
    operator: Option<String>,
}

impl Command for AlarmCommand {
    fn parse(path: &[&str], payload: &[u8]) -> Result<Self, CommandError> {
        match path {
            ["ack"] => {
                let text = command::text(payload)?;
                let (rule, operator) = if text.starts_with('{') {
                    let p: AckPayload = command::json(payload)?;
                    (p.rule, p.operator)
                } else {
                    (text.to_string(), None)
                };
                let rule = match rule.as_str() {
                    "" => {
                        return Err(CommandError::new(
                            "name the alarm: payload `<rule>`, `all`, or {\"rule\": \"<rule>\", \"operator\": \"<who>\"}",
                        ))
                    }
                    "all" => None,
                    r => Some(r.to_string()),
                };
                Ok(AlarmCommand::Ack {
                    rule,
                    operator: operator
                        .filter(|o| !o.trim().is_empty())
                        .map(|o| command::truncate(o.trim(), 64))
                        .unwrap_or_else(|| "unknown".into()),
                })
            }
            [other, ..] => Err(CommandError::new(format!(
                "unknown command `{}`: the alarm command is ack",
                command::truncate(other, 40)
            ))),
            [] => Err(CommandError::new("no command")),
        }
    }
}

/// `<name>/cmd/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterlockCommand {
    /// Republish status, permits and every alarm now.
    Refresh,
}

impl Command for InterlockCommand {
    fn parse(path: &[&str], payload: &[u8]) -> Result<Self, CommandError> {
        match path {
            ["refresh"] => command::expect_empty(payload).map(|_| InterlockCommand::Refresh),
            [other, ..] => Err(CommandError::new(format!(
                "unknown command `{}`: the interlock takes refresh (alarms are acknowledged on <alarms>/cmd/ack)",
                command::truncate(other, 40)
            ))),
            [] => Err(CommandError::new("no command")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_payloads() {
        let p = |b: &[u8]| AlarmCommand::parse(&["ack"], b);
        assert_eq!(
            p(b"dew_point").unwrap(),
            AlarmCommand::Ack {
                rule: Some("dew_point".into()),
                operator: "unknown".into()
            }
        );
        assert_eq!(
            p(br#"{"rule": "all", "operator": "Ana"}"#).unwrap(),
            AlarmCommand::Ack {
                rule: None,
                operator: "Ana".into()
            }
        );
        assert!(p(b"").unwrap_err().0.contains("name the alarm"));
        assert!(p(br#"{"rule": 3}"#).unwrap_err().0.contains("not valid"));
        assert!(AlarmCommand::parse(&["reset"], b"")
            .unwrap_err()
            .0
            .contains("unknown command `reset`"));
        assert!(InterlockCommand::parse(&["refresh"], b"x").is_err());
    }
}
