//! Commands on `ph2acf/cmd/...`, parsed and checked against the config's allowlists.
//! Pure: no I/O. Nothing from a payload reaches Ph2_ACF unless it is listed in the
//! config, and the free-text fields are only ever stored.

use std::path::PathBuf;

use dcs_shared::command::{self, Command, CommandError};
use serde::Deserialize;

use crate::config::{is_identifier, BridgeConfig};

/// A bridge command, before the allowlist check.
#[derive(Debug, Clone, PartialEq)]
pub enum BridgeCommand {
    /// `run` with its JSON request.
    Run(RunRequest),
    /// `stop`: end the current run (recorded as stopped).
    Stop,
    /// `refresh`: republish the status now.
    Refresh,
}

/// The payload of `ph2acf/cmd/run`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Calibration name (from `calibrations:`).
    pub calibration: String,
    /// Configuration name (a key of `configs:`).
    pub config: String,
    /// Modules under test (from `modules:`).
    pub modules: Vec<String>,
    /// Who started it.
    pub operator: String,
    /// Free text, stored with the run.
    #[serde(default)]
    pub comment: String,
}

/// A run request that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPlan {
    /// Calibration name.
    pub calibration: String,
    /// Configuration name.
    pub config: String,
    /// Its XML file.
    pub config_file: PathBuf,
    /// Modules, sorted, without duplicates.
    pub modules: Vec<String>,
    /// Operator.
    pub operator: String,
    /// Comment.
    pub comment: String,
}

/// Longest comment kept.
pub const MAX_COMMENT: usize = 1000;

impl Command for BridgeCommand {
    fn parse(path: &[&str], payload: &[u8]) -> Result<Self, CommandError> {
        match path {
            ["run"] => command::json::<RunRequest>(payload)
                .map(BridgeCommand::Run)
                .map_err(|e| {
                    CommandError::new(format!(
                        "run takes a JSON object {{\"calibration\", \"config\", \"modules\", \
                             \"operator\", \"comment\"}}: {e}"
                    ))
                }),
            ["stop"] => command::expect_empty(payload).map(|()| BridgeCommand::Stop),
            ["refresh"] => command::expect_empty(payload).map(|()| BridgeCommand::Refresh),
            other => Err(CommandError::new(format!(
                "unknown command `{}`: use run, stop or refresh",
                command::truncate(&other.join("/"), 40)
            ))),
        }
    }
}

fn listed(what: &str, value: &str, allowed: &[&str]) -> Result<(), CommandError> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(CommandError::new(format!(
        "unknown {what} `{}`: allowed are {}",
        command::truncate(value, 40),
        allowed.join(", ")
    )))
}

impl RunRequest {
    /// Checks the request against the config's allowlists.
    pub fn check(self, cfg: &BridgeConfig) -> Result<RunPlan, CommandError> {
        let cals: Vec<&str> = cfg.calibrations.iter().map(String::as_str).collect();
        listed("calibration", &self.calibration, &cals)?;
        let names: Vec<&str> = cfg.configs.keys().map(String::as_str).collect();
        listed("config", &self.config, &names)?;
        if self.modules.is_empty() {
            return Err(CommandError::new("modules: give at least one module"));
        }
        let mods: Vec<&str> = cfg.modules.iter().map(String::as_str).collect();
        for m in &self.modules {
            listed("module", m, &mods)?;
        }
        if !is_identifier(&self.operator) {
            return Err(CommandError::new(format!(
                "operator `{}`: give a user name (letters, digits, `_`, `-`, `.`)",
                command::truncate(&self.operator, 40)
            )));
        }
        if self.comment.chars().count() > MAX_COMMENT {
            return Err(CommandError::new(format!(
                "comment longer than {MAX_COMMENT} characters"
            )));
        }
        if self
            .comment
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(CommandError::new("comment holds control characters"));
        }
        let mut modules = self.modules;
        modules.sort();
        modules.dedup();
        Ok(RunPlan {
            config_file: cfg.configs[&self.config].clone(),
            calibration: self.calibration,
            config: self.config,
            modules,
            operator: self.operator,
            comment: self.comment,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg() -> BridgeConfig {
        dcs_shared::config::from_str(
            "backend: cli\ncli: {program: /bin/true}\nwork_dir: w\nqueue_dir: q\n\
             calibrations: [pedenoise, calibration]\nconfigs: {PS: ps.xml}\nmodules: [M1, M2]\n",
            Path::new("b.yaml"),
        )
        .unwrap()
    }

    fn run(json: &str) -> Result<RunPlan, String> {
        match BridgeCommand::parse(&["run"], json.as_bytes()).map_err(|e| e.0)? {
            BridgeCommand::Run(r) => r.check(&cfg()).map_err(|e| e.0),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn good_run_is_planned() {
        let p = run(
            r#"{"calibration":"pedenoise","config":"PS","modules":["M2","M1","M2"],
            "operator":"alice","comment":"after reflow; LV 10.5 V"}"#,
        )
        .unwrap();
        assert_eq!(p.modules, ["M1", "M2"]);
        assert_eq!(p.config_file, PathBuf::from("ps.xml"));
        assert_eq!(p.comment, "after reflow; LV 10.5 V");
    }

    #[test]
    fn refusals_say_why() {
        for (json, why) in [
            ("{", "JSON object"),
            ("[]", "JSON object"),
            (r#"{"calibration":"pedenoise"}"#, "missing field"),
            (
                r#"{"calibration":"x; rm -rf /","config":"PS","modules":["M1"],"operator":"a"}"#,
                "unknown calibration",
            ),
            (
                r#"{"calibration":"pedenoise","config":"../etc/passwd","modules":["M1"],"operator":"a"}"#,
                "unknown config",
            ),
            (
                r#"{"calibration":"pedenoise","config":"PS","modules":[],"operator":"a"}"#,
                "at least one module",
            ),
            (
                r#"{"calibration":"pedenoise","config":"PS","modules":["M1|sh"],"operator":"a"}"#,
                "unknown module",
            ),
            (
                r#"{"calibration":"pedenoise","config":"PS","modules":["M1"],"operator":"$(reboot)"}"#,
                "operator",
            ),
            (
                r#"{"calibration":"pedenoise","config":"PS","modules":["M1"],"operator":"a","comment":"\u0007"}"#,
                "control",
            ),
            (
                r#"{"calibration":"pedenoise","config":"PS","modules":["M1"],"operator":"a","x":1}"#,
                "unknown field",
            ),
        ] {
            let e = run(json).unwrap_err();
            assert!(e.contains(why), "{json}: {e}");
        }
        assert!(BridgeCommand::parse(&["stop"], b"now").is_err());
        assert!(BridgeCommand::parse(&["rm"], b"")
            .unwrap_err()
            .0
            .contains("unknown command"));
        assert_eq!(
            BridgeCommand::parse(&["stop"], b"").unwrap(),
            BridgeCommand::Stop
        );
    }
}
