//! The simulator's YAML config (also read by the command-line mode).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Calibrations the real software knows (SPEC 6.1, Outer and Inner Tracker).
pub const KNOWN_CALIBRATIONS: &[&str] = &[
    "calibration",
    "pedenoise",
    "calibrationandpedenoise",
    "noiseOT",
    "alignment",
    "otlatency",
    "cmNoise",
    "PSquickTest",
    "PSfullTest",
    "pixelalive",
    "noise",
    "scurve",
    "gain",
    "gainopt",
    "threqu",
    "thrmin",
    "thradj",
    "latency",
    "injdelay",
    "clockdelay",
    "physics",
];

/// A fault to inject into every run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Stop answering (the middleware keeps the connection open and says nothing; the
    /// command line prints nothing more and never exits).
    Hang,
    /// Abort the process, leaving a partial results directory.
    Crash,
    /// Close the client connection (middleware only; the run goes on).
    Drop,
}

/// When and how a run fails.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// What happens.
    pub kind: FaultKind,
    /// At which progress, in percent.
    #[serde(default = "half")]
    pub at_percent: f64,
}

fn half() -> f64 {
    50.0
}

/// `ph2acf-sim` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Middleware TCP address (the real one listens on 5000).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Working directory of the middleware: `Results/` and `RunNumbers.dat` go here
    /// (the command-line mode uses its current directory, as the real tool does).
    #[serde(default = "default_base_dir")]
    pub base_dir: PathBuf,
    /// How long a run lasts.
    #[serde(default = "default_run_secs")]
    pub run_secs: f64,
    /// Size of the placeholder `Results.root`.
    #[serde(default = "default_root_bytes")]
    pub results_root_bytes: u64,
    /// Hybrids (front-ends) per module; each has 8 SSA and 8 MPA chips.
    #[serde(default = "one")]
    pub hybrids: u32,
    /// Channels per chip in the per-chip text files.
    #[serde(default = "default_channels")]
    pub channels: u32,
    /// Calibrations accepted (default: every name of SPEC 6.1).
    #[serde(default = "default_calibrations")]
    pub calibrations: Vec<String>,
    /// Fault injected into every run.
    #[serde(default)]
    pub fault: Option<Fault>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5000))
}
fn default_base_dir() -> PathBuf {
    PathBuf::from(".dcs/ph2acf")
}
fn default_run_secs() -> f64 {
    10.0
}
fn default_root_bytes() -> u64 {
    1 << 20
}
fn one() -> u32 {
    1
}
fn default_channels() -> u32 {
    120
}
fn default_calibrations() -> Vec<String> {
    KNOWN_CALIBRATIONS.iter().map(|s| s.to_string()).collect()
}

impl SimConfig {
    /// Loads a config file; `base_dir` is relative to it.
    pub fn load(path: &std::path::Path) -> Result<SimConfig, dcs_shared::ConfigError> {
        let mut cfg: SimConfig = dcs_shared::config::load(path)?;
        cfg.base_dir = dcs_shared::config::relative_to(path, &cfg.base_dir);
        Ok(cfg)
    }
}

impl dcs_shared::Validate for SimConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if !(self.run_secs.is_finite() && (0.0..=3.2e7).contains(&self.run_secs)) {
            return Err(("run_secs".into(), "must be 0..3.2e7 seconds".into()));
        }
        if self.results_root_bytes > 1 << 32 {
            return Err(("results_root_bytes".into(), "at most 4 GiB".into()));
        }
        if !(1..=16).contains(&self.hybrids) {
            return Err(("hybrids".into(), "must be 1..16".into()));
        }
        if !(1..=4096).contains(&self.channels) {
            return Err(("channels".into(), "must be 1..4096".into()));
        }
        if let Some(f) = self.fault {
            if !(0.0..=100.0).contains(&f.at_percent) {
                return Err(("fault.at_percent".into(), "must be 0..100".into()));
            }
        }
        Ok(())
    }
}
