//! Commands: `<alarm_prefix>/cmd/ack`, `.../shelve`, `.../unshelve` and
//! `<name>/cmd/refresh`. Parsing is pure; the engine checks rule names and bounds.

use dcs_shared::command::{self, Command, CommandError};
use serde::Deserialize;

/// `<alarm_prefix>/cmd/...`.
#[derive(Debug, Clone, PartialEq)]
pub enum AlarmCommand {
    /// Acknowledge one rule's alarm, or all (`rule: None`).
    Ack {
        /// The rule, or every latched alarm.
        rule: Option<String>,
        /// Who acknowledged, for the record.
        operator: String,
    },
    /// Hold one alarm's notifications for a while (ISA-18.2 shelving).
    Shelve {
        /// The rule.
        rule: String,
        /// How long, > 0 (the engine bounds it).
        minutes: f64,
        /// Who, for the journal.
        by: String,
        /// Why, for the journal.
        reason: String,
    },
    /// End a shelve before its time.
    Unshelve {
        /// The rule.
        rule: String,
        /// Who, for the journal.
        by: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShelvePayload {
    rule: String,
    minutes: f64,
    by: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnshelvePayload {
    rule: String,
    by: String,
}

/// A required text field, trimmed and bounded.
fn required(value: &str, field: &str, max: usize) -> Result<String, CommandError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(CommandError::new(format!("`{field}` must not be empty")));
    }
    Ok(command::truncate(v, max))
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
            ["shelve"] => {
                let p: ShelvePayload = command::json(payload).map_err(|e| {
                    CommandError::new(format!(
                        "{}: shelve takes {{\"rule\", \"minutes\", \"by\", \"reason\"}}",
                        e.0
                    ))
                })?;
                if !(p.minutes.is_finite() && p.minutes > 0.0) {
                    return Err(CommandError::new("`minutes` must be a number above 0"));
                }
                Ok(AlarmCommand::Shelve {
                    rule: required(&p.rule, "rule", 64)?,
                    minutes: p.minutes,
                    by: required(&p.by, "by", 64)?,
                    reason: required(&p.reason, "reason", 200)?,
                })
            }
            ["unshelve"] => {
                let p: UnshelvePayload = command::json(payload).map_err(|e| {
                    CommandError::new(format!("{}: unshelve takes {{\"rule\", \"by\"}}", e.0))
                })?;
                Ok(AlarmCommand::Unshelve {
                    rule: required(&p.rule, "rule", 64)?,
                    by: required(&p.by, "by", 64)?,
                })
            }
            [other, ..] => Err(CommandError::new(format!(
                "unknown command `{}`: the alarm commands are ack, shelve, unshelve",
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

    #[test]
    fn shelve_payloads() {
        let p = |b: &[u8]| AlarmCommand::parse(&["shelve"], b);
        assert_eq!(
            p(br#"{"rule": "dew_point", "minutes": 30, "by": " Ana ", "reason": "sensor swap"}"#)
                .unwrap(),
            AlarmCommand::Shelve {
                rule: "dew_point".into(),
                minutes: 30.0,
                by: "Ana".into(),
                reason: "sensor swap".into()
            }
        );
        let err = |b: &[u8]| p(b).unwrap_err().0;
        assert!(
            err(br#"{"rule": "d", "minutes": 30, "by": "a", "reason": " "}"#)
                .contains("`reason` must not be empty")
        );
        assert!(err(br#"{"rule": "d", "minutes": 30, "by": "a"}"#).contains("reason"));
        assert!(
            err(br#"{"rule": "d", "minutes": 0, "by": "a", "reason": "r"}"#).contains("above 0")
        );
        assert!(
            err(br#"{"rule": "d", "minutes": -5, "by": "a", "reason": "r"}"#).contains("above 0")
        );
        assert!(err(b"dew_point").contains("shelve takes"));
        let u = |b: &[u8]| AlarmCommand::parse(&["unshelve"], b);
        assert_eq!(
            u(br#"{"rule": "dew_point", "by": "Bo"}"#).unwrap(),
            AlarmCommand::Unshelve {
                rule: "dew_point".into(),
                by: "Bo".into()
            }
        );
        assert!(u(br#"{"rule": "dew_point"}"#)
            .unwrap_err()
            .0
            .contains("unshelve takes"));
    }
}
