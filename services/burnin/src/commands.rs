//! Operator commands on `<name>/cmd/...`: `start`, `pause`, `resume`, `abort`,
//! `refresh`. Parsing is pure; the service loads the sequence and the engine decides.

use dcs_shared::command::{self, Command, CommandError};
use serde::Deserialize;

use crate::sequence::IvScan;

/// A `burnin` command.
#[derive(Debug, Clone, PartialEq)]
pub enum BurninCommand {
    /// `{"sequence", "modules", "operator", "comment"}`.
    Start {
        /// Sequence name: a file `<name>.yaml` in `sequences_dir`.
        sequence: String,
        /// Modules under test.
        modules: Vec<String>,
        /// Who.
        operator: String,
        /// Why (may be empty).
        comment: String,
    },
    /// `{"operator", "reason"}`.
    Pause {
        /// Who.
        operator: String,
        /// Why.
        reason: String,
    },
    /// `{"operator"}`.
    Resume {
        /// Who.
        operator: String,
    },
    /// `{"operator", "reason"}`.
    Abort {
        /// Who.
        operator: String,
        /// Why.
        reason: String,
    },
    /// `{"modules", "operator", "comment", "scan": {iv_scan step}}`: an IV scan alone,
    /// run as a one-step sequence (checkpointed, paused and recorded like any run).
    IvScan {
        /// Modules whose channels are scanned.
        modules: Vec<String>,
        /// Who.
        operator: String,
        /// Why (may be empty).
        comment: String,
        /// The scan, as an `iv_scan` step of a sequence file.
        scan: IvScan,
    },
    /// Republish the status.
    Refresh,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IvScanPayload {
    modules: Vec<String>,
    operator: String,
    #[serde(default)]
    comment: String,
    scan: IvScan,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartPayload {
    sequence: String,
    modules: Vec<String>,
    operator: String,
    #[serde(default)]
    comment: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WhoWhy {
    operator: String,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Who {
    operator: String,
}

/// The operator of a run: a user name, as the Ph2_ACF bridge takes it for the run's
/// calibrations (a name it would refuse would pause the run at its first calibration).
fn user_name(value: &str) -> Result<String, CommandError> {
    let v = value.trim();
    if !command::is_identifier(v) {
        return Err(CommandError::new(format!(
            "`operator` `{}`: give a user name (letters, digits, `_`, `-`, `.`), as Ph2_ACF runs record it",
            command::truncate(v, 40)
        )));
    }
    Ok(v.to_string())
}

fn required(value: &str, field: &str, max: usize) -> Result<String, CommandError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(CommandError::new(format!("`{field}` must not be empty")));
    }
    Ok(command::truncate(v, max))
}

impl Command for BurninCommand {
    fn parse(path: &[&str], payload: &[u8]) -> Result<Self, CommandError> {
        let who_why = |verb: &str| -> Result<WhoWhy, CommandError> {
            command::json(payload).map_err(|e| {
                CommandError::new(format!(
                    "{}: {verb} takes {{\"operator\", \"reason\"}}",
                    e.0
                ))
            })
        };
        match path {
            ["start"] => {
                let p: StartPayload = command::json(payload).map_err(|e| {
                    CommandError::new(format!(
                        "{}: start takes {{\"sequence\", \"modules\": [..], \"operator\", \"comment\"}}",
                        e.0
                    ))
                })?;
                let sequence = required(&p.sequence, "sequence", 64)?;
                // A name, never a path: only files of the sequences folder run.
                if !command::is_identifier(&sequence) {
                    return Err(CommandError::new(format!(
                        "`sequence` must be a sequence name (letters, digits, `-`, `_`, `.`), not `{sequence}`"
                    )));
                }
                if p.modules.is_empty() {
                    return Err(CommandError::new(
                        "`modules` must list the modules under test",
                    ));
                }
                let modules = p
                    .modules
                    .iter()
                    .map(|m| required(m, "modules[]", 64))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(BurninCommand::Start {
                    sequence: sequence.trim_end_matches(".yaml").to_string(),
                    modules,
                    operator: user_name(&p.operator)?,
                    comment: command::truncate(p.comment.trim(), 500),
                })
            }
            ["pause"] => {
                let p = who_why("pause")?;
                Ok(BurninCommand::Pause {
                    operator: required(&p.operator, "operator", 64)?,
                    reason: required(&p.reason, "reason", 200)?,
                })
            }
            ["resume"] => {
                let p: Who = command::json(payload).map_err(|e| {
                    CommandError::new(format!("{}: resume takes {{\"operator\"}}", e.0))
                })?;
                Ok(BurninCommand::Resume {
                    operator: required(&p.operator, "operator", 64)?,
                })
            }
            ["abort"] => {
                let p = who_why("abort")?;
                Ok(BurninCommand::Abort {
                    operator: required(&p.operator, "operator", 64)?,
                    reason: required(&p.reason, "reason", 200)?,
                })
            }
            ["iv_scan"] => {
                let p: IvScanPayload = command::json(payload).map_err(|e| {
                    CommandError::new(format!(
                        "{}: iv_scan takes {{\"modules\": [..], \"operator\", \"comment\", \"scan\": {{\"from\", \"segments\": [{{\"to\", \"step\"}}], \"ramp_rate\", \"settle_secs\", \"compliance_ua\", \"channels\"}}}}",
                        e.0
                    ))
                })?;
                if p.modules.is_empty() {
                    return Err(CommandError::new("`modules` must list the modules to scan"));
                }
                Ok(BurninCommand::IvScan {
                    modules: p
                        .modules
                        .iter()
                        .map(|m| required(m, "modules[]", 64))
                        .collect::<Result<Vec<_>, _>>()?,
                    operator: user_name(&p.operator)?,
                    comment: command::truncate(p.comment.trim(), 500),
                    scan: p.scan,
                })
            }
            ["refresh"] => Ok(BurninCommand::Refresh),
            other => Err(CommandError::new(format!(
                "unknown command `{}`: burnin takes start, pause, resume, abort, iv_scan, refresh",
                other.join("/")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_needs_a_name_modules_and_an_operator() {
        let ok = BurninCommand::parse(
            &["start"],
            br#"{"sequence": "short.yaml", "modules": ["module_0"], "operator": "ana"}"#,
        )
        .unwrap();
        assert_eq!(
            ok,
            BurninCommand::Start {
                sequence: "short".into(),
                modules: vec!["module_0".into()],
                operator: "ana".into(),
                comment: String::new()
            }
        );
        for (payload, says) in [
            (
                &br#"{"sequence": "../etc/passwd", "modules": ["m"], "operator": "a"}"#[..],
                "sequence name",
            ),
            (
                br#"{"sequence": "s", "modules": [], "operator": "a"}"#,
                "modules",
            ),
            (
                br#"{"sequence": "s", "modules": ["m"], "operator": " "}"#,
                "operator",
            ),
            (br#"{"sequence": "s", "modules": ["m"]}"#, "operator"),
            (
                br#"{"sequence": "s", "modules": ["m"], "operator": "Ana M."}"#,
                "user name",
            ),
            (b"go", "start takes"),
        ] {
            let e = BurninCommand::parse(&["start"], payload).unwrap_err();
            assert!(e.0.contains(says), "{e}");
        }
        let e = BurninCommand::parse(&["stop"], b"").unwrap_err();
        assert!(e.0.contains("start, pause, resume, abort"), "{e}");
        let e = BurninCommand::parse(&["abort"], br#"{"operator": "a"}"#).unwrap_err();
        assert!(e.0.contains("reason"), "{e}");
        let e =
            BurninCommand::parse(&["resume"], br#"{"operator": "a", "reason": "r"}"#).unwrap_err();
        assert!(e.0.contains("resume takes {\"operator\"}"), "{e}");
    }

    #[test]
    fn an_iv_scan_alone_takes_the_step_of_a_sequence() {
        let c = BurninCommand::parse(
            &["iv_scan"],
            br#"{"modules": ["module_0"], "operator": "ana", "scan": {"segments": [{"to": 100, "step": 10}], "compliance_ua": 5}}"#,
        )
        .unwrap();
        let BurninCommand::IvScan { scan, .. } = c else {
            panic!("{c:?}")
        };
        assert_eq!(scan.points().len(), 10);
        assert_eq!(scan.ramp_rate, 10.0);
        let e = BurninCommand::parse(
            &["iv_scan"],
            br#"{"modules": ["m"], "operator": "a", "scan": {"segments": [], "compliance_ua": 5, "volts": 3}}"#,
        )
        .unwrap_err();
        assert!(e.0.contains("volts"), "{e}");
    }
}
