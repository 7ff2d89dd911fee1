//! The bridge's YAML config: what may run (allowlists), how Ph2_ACF is reached, and
//! where records go. Nothing from an MQTT payload is used unless it is listed here.

use dcs_shared::config::invalid;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use dcs_shared::influx::InfluxSettings;
use dcs_shared::MqttSettings;
use serde::Deserialize;

/// How runs are driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// The MiddlewareController TCP protocol (SPEC 6.1).
    Middleware,
    /// The command-line tool (`runCalibration -b -f <xml> -c <name>`).
    Cli,
}

/// `middleware:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MiddlewareSettings {
    /// Server address (Ph2_ACF listens on 5000).
    pub address: SocketAddr,
    /// Connecting, and each request's reply.
    #[serde(default = "default_reply_timeout")]
    pub reply_timeout_secs: f64,
    /// Period of `Status?` while running.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

fn default_reply_timeout() -> f64 {
    10.0
}
fn default_poll_ms() -> u64 {
    500
}

/// `cli:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliSettings {
    /// The program (`runCalibration`, `CMSITminiDAQ`), started without a shell.
    pub program: PathBuf,
    /// Fixed arguments before `-f <xml> -c <name>` (e.g. `["-b"]`).
    #[serde(default)]
    pub args: Vec<String>,
}

/// `mongodb:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSettings {
    /// Connection string; `DCS_MONGODB_URI` overrides it. Empty: runs are queued only.
    pub uri: String,
    /// Database.
    #[serde(default = "default_database")]
    pub database: String,
    /// Collection of run documents.
    #[serde(default = "default_collection")]
    pub collection: String,
    /// GridFS bucket for result files.
    #[serde(default = "default_bucket")]
    pub bucket: String,
    /// Server selection and connect timeout.
    #[serde(default = "default_mongo_timeout")]
    pub timeout_secs: f64,
}

fn default_database() -> String {
    "dcs".into()
}
fn default_collection() -> String {
    "runs".into()
}
fn default_bucket() -> String {
    "results".into()
}
fn default_mongo_timeout() -> f64 {
    5.0
}

/// The bridge config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// MQTT name: `<name>/cmd/...`, `<name>/status`, `<name>/run`, `<name>/reply`.
    #[serde(default = "default_name")]
    pub name: String,
    /// Broker (standalone binary; under `dcs up` the stack's settings are used).
    #[serde(default)]
    pub mqtt: MqttSettings,
    /// Which backend drives runs.
    pub backend: BackendKind,
    /// Required with `backend: middleware`.
    #[serde(default)]
    pub middleware: Option<MiddlewareSettings>,
    /// Required with `backend: cli`.
    #[serde(default)]
    pub cli: Option<CliSettings>,
    /// Ph2_ACF working directory: `Results/Run_<N>/` and `RunNumbers.dat` are here.
    pub work_dir: PathBuf,
    /// Calibrations operators may start.
    pub calibrations: Vec<String>,
    /// Configuration names operators may choose, each mapped to its XML file.
    pub configs: BTreeMap<String, PathBuf>,
    /// Module names operators may give (the run document is indexed by them).
    pub modules: Vec<String>,
    /// A run longer than this is stopped and recorded as failed.
    #[serde(default = "default_run_timeout")]
    pub run_timeout_secs: f64,
    /// No progress (CLI output, or a `Status?` answer) for this long: the run is
    /// recorded as failed ("hung").
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_secs: f64,
    /// Where run documents go.
    #[serde(default)]
    pub mongodb: Option<MongoSettings>,
    /// Where `calibration_runs` points go (and where `dcs run show` reads the
    /// environment).
    #[serde(default)]
    pub influx: Option<InfluxSettings>,
    /// Durable queue of records waiting for a database (relative to this file).
    pub queue_dir: PathBuf,
    /// `Configuration.xml` up to this size is kept in the run document too; every
    /// result file goes to GridFS.
    #[serde(default = "default_inline_max")]
    pub inline_max_bytes: u64,
    /// Measurements `dcs run show` reads for the environment during a run.
    #[serde(default = "default_environment")]
    pub environment: Vec<String>,
}

fn default_environment() -> Vec<String> {
    ["chiller", "channels", "sensors"]
        .map(String::from)
        .to_vec()
}

fn default_name() -> String {
    "ph2acf".into()
}
fn default_run_timeout() -> f64 {
    4.0 * 3600.0
}
fn default_stall_timeout() -> f64 {
    120.0
}
fn default_inline_max() -> u64 {
    256 * 1024
}

impl dcs_shared::Validate for BridgeConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if let Err(m) = dcs_shared::topic::check_level(&self.name) {
            return invalid("name", m);
        }
        match self.backend {
            BackendKind::Middleware if self.middleware.is_none() => {
                return invalid(
                    "middleware",
                    "backend is middleware: give middleware.address",
                )
            }
            BackendKind::Cli if self.cli.is_none() => {
                return invalid("cli", "backend is cli: give cli.program")
            }
            _ => {}
        }
        if self.calibrations.is_empty() {
            return invalid("calibrations", "list the calibrations operators may run");
        }
        for c in &self.calibrations {
            if !is_identifier(c) {
                return invalid("calibrations", format!("`{c}` is not a calibration name"));
            }
        }
        if self.configs.is_empty() {
            return invalid(
                "configs",
                "map at least one configuration name to its XML file",
            );
        }
        for (name, path) in &self.configs {
            if !is_identifier(name) {
                return invalid(
                    "configs",
                    format!("`{name}`: names are letters, digits, `_`, `-`, `.`"),
                );
            }
            // The middleware message is `Configure,Calibration:..,ConfigurationFile:<path>`.
            if path
                .to_str()
                .is_none_or(|p| p.is_empty() || p.contains([',', '{', '}', '\n']))
            {
                return invalid(
                    format!("configs.{name}"),
                    "the XML path must be UTF-8 without `,`, `{`, `}`",
                );
            }
        }
        for m in &self.modules {
            if !is_identifier(m) {
                return invalid(
                    "modules",
                    format!("`{m}`: names are letters, digits, `_`, `-`, `.`"),
                );
            }
        }
        // Bounded: they become `Duration`s (a year is more than any calibration).
        let secs = [
            ("run_timeout_secs", Some(self.run_timeout_secs)),
            ("stall_timeout_secs", Some(self.stall_timeout_secs)),
            (
                "middleware.reply_timeout_secs",
                self.middleware.as_ref().map(|m| m.reply_timeout_secs),
            ),
            (
                "mongodb.timeout_secs",
                self.mongodb.as_ref().map(|m| m.timeout_secs),
            ),
        ];
        for (k, v) in secs {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0 && v <= 3.2e7) {
                    return invalid(k, "must be a number of seconds > 0 and at most a year");
                }
            }
        }
        if let Some(m) = &self.middleware {
            if m.poll_ms == 0 {
                return invalid("middleware.poll_ms", "must be > 0");
            }
        }
        if let Some(m) = &self.mongodb {
            if !(m.uri.is_empty() || m.uri.starts_with("mongodb://")) {
                return invalid(
                    "mongodb.uri",
                    "must start with mongodb:// (or be empty: queue only)",
                );
            }
        }
        if let Some(i) = &self.influx {
            if !i.url.trim().is_empty() {
                i.check().map_err(|(k, m)| (format!("influx.{k}"), m))?;
            }
        }
        self.mqtt.check()
    }
}

pub use dcs_shared::command::is_identifier;

impl BridgeConfig {
    /// Loads, validates and resolves relative paths against the file.
    pub fn load(path: &Path) -> Result<Self, dcs_shared::ConfigError> {
        let mut c: BridgeConfig = dcs_shared::config::load(path)?;
        c.resolve_paths(path);
        Ok(c)
    }

    /// Makes relative paths relative to the config file.
    pub fn resolve_paths(&mut self, file: &Path) {
        let rel = |p: &Path| dcs_shared::config::relative_to(file, p);
        self.work_dir = rel(&self.work_dir);
        self.queue_dir = rel(&self.queue_dir);
        for p in self.configs.values_mut() {
            *p = rel(p);
        }
        if let Some(c) = &mut self.cli {
            if c.program.components().count() > 1 {
                c.program = rel(&c.program);
            }
        }
    }

    /// InfluxDB settings with `DCS_INFLUX_*` applied; `None` when no URL is set.
    pub fn influx(&self) -> Option<InfluxSettings> {
        let o = self.influx.clone()?.with_env_overrides();
        (!o.url.trim().is_empty()).then_some(o)
    }

    /// MongoDB settings with `DCS_MONGODB_URI` applied; `None` when no URI is set.
    pub fn mongodb(&self) -> Option<MongoSettings> {
        let mut m = self.mongodb.clone()?;
        if let Ok(uri) = std::env::var("DCS_MONGODB_URI") {
            m.uri = uri;
        }
        (!m.uri.trim().is_empty()).then_some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "backend: cli\ncli: {program: /bin/true}\nwork_dir: w\nqueue_dir: q\n\
        calibrations: [pedenoise]\nconfigs: {PS: ps.xml}\nmodules: [PS_1]\n";

    fn load(extra: &str) -> Result<BridgeConfig, String> {
        dcs_shared::config::from_str::<BridgeConfig>(&format!("{BASE}{extra}"), Path::new("b.yaml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn good_config_loads() {
        let c = load("").unwrap();
        assert_eq!(c.backend, BackendKind::Cli);
        assert_eq!(c.name, "ph2acf");
    }

    #[test]
    fn errors_name_the_key() {
        for (yaml, key) in [
            ("backend: middleware\n", "middleware"),
            ("calibrations: []\n", "calibrations"),
            ("calibrations: ['a;b']\n", "calibrations"),
            ("configs: {}\n", "configs"),
            ("configs: {'-rf': x.xml}\n", "configs"),
            ("modules: ['$(x)']\n", "modules"),
            ("run_timeout_secs: 0\n", "run_timeout_secs"),
            ("stall_timeout_secs: 1e300\n", "stall_timeout_secs"),
            ("mongodb: {uri: 'http://x'}\n", "mongodb.uri"),
            ("colour: red\n", "colour"),
        ] {
            // Each case replaces the base's key of the same name.
            let base: String = BASE
                .lines()
                .filter(|l| !l.starts_with(yaml.split(':').next().unwrap()))
                .map(|l| format!("{l}\n"))
                .collect();
            let e = dcs_shared::config::from_str::<BridgeConfig>(
                &format!("{base}{yaml}"),
                Path::new("b.yaml"),
            )
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
            assert!(e.contains(key), "{yaml}: {e}");
        }
    }

    #[test]
    fn identifiers() {
        for ok in ["pedenoise", "PS_26_05-IBA_00001", "v1.2"] {
            assert!(is_identifier(ok), "{ok}");
        }
        for bad in [
            "",
            "-f",
            ".hidden",
            "a b",
            "a;b",
            "$(x)",
            "a/b",
            "`x`",
            &"x".repeat(65),
        ] {
            assert!(!is_identifier(bad), "{bad}");
        }
    }
}
