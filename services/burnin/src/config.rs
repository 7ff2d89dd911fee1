//! `burnin.yaml`: which services to command, the environment values to watch and
//! record, where sequences and checkpoints live, the resume policy and the limits.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use dcs_shared::config::invalid;
use dcs_shared::inputs::InputConfig;
use dcs_shared::{MqttSettings, Validate};
use serde::Deserialize;

use crate::engine::Settings;
use crate::sequence::Limits;
use crate::store::MongoSettings;
use crate::world::Names;
use dcs_shared::influx::InfluxSettings;

/// Everything `burnin` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurninConfig {
    /// MQTT name: `<name>/status`, `<name>/cmd/...`.
    #[serde(default = "default_name")]
    pub name: String,
    /// The services commanded and watched.
    #[serde(default)]
    pub services: Names,
    /// Which chiller set-point (1..3) the sequence writes.
    #[serde(default = "default_setpoint")]
    pub chiller_setpoint: u8,
    /// Folder of the sequence files (`<name>.yaml`).
    pub sequences_dir: PathBuf,
    /// Folder of the checkpoint and the finished runs' documents.
    pub state_dir: PathBuf,
    /// Values that must be fresh while a run goes on and are recorded with every step
    /// and IV point. `require` reads `humidity` and `dew_point`.
    pub environment: BTreeMap<String, InputConfig>,
    /// What a sequence may ask.
    #[serde(default)]
    pub limits: Limits,
    /// Pauses and resumes.
    #[serde(default)]
    pub resume: Resume,
    /// Clock and timeouts.
    #[serde(default)]
    pub timing: Timing,
    /// Where run documents go (also kept as files in `state_dir/runs/`).
    #[serde(default)]
    pub mongodb: MongoSettings,
    /// Where `burnin_steps` points go; `DCS_INFLUX_*` override.
    #[serde(default)]
    pub influx: Option<InfluxSettings>,
    /// Broker settings when run alone (`dcs up` passes the stack's).
    #[serde(default)]
    pub mqtt: MqttSettings,
}

fn default_name() -> String {
    "burnin".into()
}
fn default_setpoint() -> u8 {
    1
}

/// Pauses and resumes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resume {
    /// Conditions normal this long before a paused run resumes by itself.
    pub hold_secs: f64,
    /// A pause longer than this aborts the run.
    pub max_pause_minutes: f64,
    /// More automatic pauses than this in one run abort it.
    pub max_pauses: u32,
}

impl Default for Resume {
    fn default() -> Self {
        Resume {
            hold_secs: 300.0,
            max_pause_minutes: 240.0,
            max_pauses: 20,
        }
    }
}

/// Clock and timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// How often the engine looks at the clock, ms.
    pub tick_ms: u64,
    /// A command not answered within this pauses the run.
    pub reply_timeout_secs: f64,
    /// `interlock/status` older than this counts as the interlock gone (it republishes
    /// every 60 s).
    pub interlock_max_age_secs: f64,
    /// `burnin/status` republished this often while a run goes on (progress, ETA).
    pub status_secs: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            tick_ms: 250,
            reply_timeout_secs: 30.0,
            interlock_max_age_secs: 150.0,
            status_secs: 10.0,
        }
    }
}

const MAX_SECS: f64 = 7.0 * 86400.0;

fn secs_ok(v: f64) -> bool {
    v.is_finite() && v > 0.0 && v <= MAX_SECS
}

impl Validate for BurninConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        for (k, v) in [
            ("name", &self.name),
            ("services.caen", &self.services.caen),
            ("services.chiller", &self.services.chiller),
            ("services.interlock", &self.services.interlock),
            ("services.ph2acf", &self.services.ph2acf),
        ] {
            dcs_shared::topic::check_level(v).or_else(|m| invalid(k, m))?;
        }
        if !(1..=3).contains(&self.chiller_setpoint) {
            return invalid("chiller_setpoint", "must be 1, 2 or 3");
        }
        if self.environment.is_empty() {
            return invalid(
                "environment",
                "no values: a burn-in records (and needs) its conditions",
            );
        }
        for (name, input) in &self.environment {
            input
                .check()
                .or_else(|(f, m)| invalid(format!("environment.{name}.{f}"), m))?;
        }
        let l = &self.limits;
        if !(l.temp_min.is_finite() && l.temp_max.is_finite() && l.temp_min < l.temp_max) {
            return invalid("limits.temp_min", "must be below limits.temp_max");
        }
        for (k, v) in [
            ("limits.lv_max_volts", l.lv_max_volts),
            ("limits.hv_max_volts", l.hv_max_volts),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return invalid(k, "must be > 0 volts");
            }
        }
        if !(self.resume.hold_secs.is_finite() && (0.0..=MAX_SECS).contains(&self.resume.hold_secs))
        {
            return invalid("resume.hold_secs", "must be 0 .. a week");
        }
        if !secs_ok(self.resume.max_pause_minutes * 60.0) {
            return invalid("resume.max_pause_minutes", "must be > 0 and at most a week");
        }
        if !(10..=60_000).contains(&self.timing.tick_ms) {
            return invalid("timing.tick_ms", "must be 10 .. 60000");
        }
        for (k, v) in [
            ("timing.reply_timeout_secs", self.timing.reply_timeout_secs),
            (
                "timing.interlock_max_age_secs",
                self.timing.interlock_max_age_secs,
            ),
            ("timing.status_secs", self.timing.status_secs),
        ] {
            if !secs_ok(v) {
                return invalid(k, "must be > 0 and at most a week");
            }
        }
        if let Some(i) = self.influx.as_ref().filter(|i| !i.url.trim().is_empty()) {
            i.check().map_err(|(k, m)| (format!("influx.{k}"), m))?;
        }
        if !(self.mongodb.timeout_secs.is_finite() && self.mongodb.timeout_secs > 0.0) {
            return invalid("mongodb.timeout_secs", "must be > 0");
        }
        self.mqtt.check()
    }
}

impl BurninConfig {
    /// The engine's settings.
    pub fn settings(&self) -> Settings {
        Settings {
            hold: Duration::from_secs_f64(self.resume.hold_secs),
            max_pause: Duration::from_secs_f64(self.resume.max_pause_minutes * 60.0),
            max_pauses: self.resume.max_pauses,
            reply_timeout: Duration::from_secs_f64(self.timing.reply_timeout_secs),
            interlock_max_age: Duration::from_secs_f64(self.timing.interlock_max_age_secs),
            chiller_setpoint: self.chiller_setpoint,
            limits: self.limits,
        }
    }

    /// InfluxDB settings with `DCS_INFLUX_*` applied; `None` when no URL is set.
    pub fn influx(&self) -> Option<InfluxSettings> {
        let o = self.influx.clone()?.with_env_overrides();
        (!o.url.trim().is_empty()).then_some(o)
    }

    /// The sequences that can be started: (name, file), sorted.
    pub fn sequences(&self) -> Vec<(String, PathBuf)> {
        let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(&self.sequences_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .filter_map(|p| Some((p.file_stem()?.to_str()?.to_string(), p)))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn shipped_config_loads_and_mistakes_name_the_key() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/burnin.yaml");
        let cfg: BurninConfig = dcs_shared::config::load(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.environment.contains_key("dew_point"));
        let e = dcs_shared::config::from_str::<BurninConfig>(
            "sequences_dir: s\nstate_dir: t\nchiller_setpoint: 4\nenvironment:\n  dew_point: {topic: a/b, max_age_secs: 30}\n",
            Path::new("b.yaml"),
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("chiller_setpoint"));
        assert_eq!(e.line, Some(3));
        let e = dcs_shared::config::from_str::<BurninConfig>(
            "sequences_dir: s\nstate_dir: t\nenvironment:\n  dew_point: {topic: a/#/b, max_age_secs: 30}\n",
            Path::new("b.yaml"),
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("environment.dew_point.topic"));
    }
}
