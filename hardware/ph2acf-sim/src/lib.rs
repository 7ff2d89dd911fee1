//! `ph2acf-sim`: a Ph2_ACF that real clients drive, for tests and `dcs up --simulate`.
//!
//! - Middleware mode (default): a MiddlewareController on TCP (SPEC 6.1), one client
//!   at a time, commands only valid in order ([`protocol`]), runs executed by
//!   [`server`] that write a results directory like the real one ([`run`]).
//! - Command-line mode (`ph2acf-sim cli ... -b -f <xml> -c <name>`, see [`cli`]):
//!   behaves like `runCalibration`.
//!
//! Fault injection (config `fault: {kind: hang|crash|drop, at_percent: N}`): hang,
//! crash mid-run leaving a partial directory, drop the connection; an unknown
//! calibration is rejected.

pub mod cli;
pub mod config;
pub mod protocol;
pub mod run;
pub mod server;

pub use config::SimConfig;
pub use server::run;

/// The `ph2acf-sim` program in middleware mode (see [`dcs_shared::program`]).
pub struct Ph2acfSim;

impl dcs_shared::program::Program for Ph2acfSim {
    const NAME: &'static str = "ph2acf-sim";
    const ABOUT: &'static str = "Simulated Ph2_ACF: MiddlewareController, or runCalibration (cli).";
    type Config = SimConfig;

    fn resolve_paths(cfg: &mut SimConfig, file: &std::path::Path) {
        cfg.base_dir = dcs_shared::config::relative_to(file, &cfg.base_dir);
    }
    async fn run(
        cfg: SimConfig,
        _file: std::path::PathBuf,
        _mqtt: dcs_shared::MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        run(cfg, shutdown).await
    }
}
