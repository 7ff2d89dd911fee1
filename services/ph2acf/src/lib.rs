//! `ph2acf-bridge`: runs Ph2_ACF calibrations on MQTT command and records them in
//! MongoDB and InfluxDB at the same instants (SPEC 6).
//!
//! Layers, from the wire up:
//! - [`backend`]: driving Ph2_ACF, over the middleware TCP protocol or the command line
//!   (timeouts, crashes, dropped connections end a run as failed with the reason);
//! - [`results`]: reading the run directory (per-chip files parsed, no I/O in parsing);
//! - [`record`]: the run as a MongoDB document and `calibration_runs` points (pure);
//! - [`outbox`]: durable queues in front of the stores; [`store`] (MongoDB, GridFS) and
//!   `dcs_shared::influx::deliver_outbox` (InfluxDB) deliver from them;
//! - [`commands`] (allowlist checks, pure) and [`service`] (MQTT, one run at a time);
//! - [`show`]: `dcs run show`, the run joined with the environment during it.

pub mod backend;
pub mod commands;
pub mod config;
/// The durable queues (shared with the notifier).
pub use dcs_shared::outbox;
pub mod record;
pub mod results;
pub mod service;
pub mod show;
pub mod store;

pub use config::BridgeConfig;

/// The `ph2acf-bridge` program (see [`dcs_shared::program`]).
pub struct Bridge;

impl dcs_shared::program::Program for Bridge {
    const NAME: &'static str = "ph2acf-bridge";
    const ABOUT: &'static str = "Ph2_ACF calibrations over MQTT, recorded in MongoDB and InfluxDB.";
    type Config = BridgeConfig;

    fn resolve_paths(cfg: &mut BridgeConfig, file: &std::path::Path) {
        cfg.resolve_paths(file);
    }
    fn mqtt(cfg: &mut BridgeConfig) -> Option<&mut dcs_shared::MqttSettings> {
        Some(&mut cfg.mqtt)
    }
    fn client_id(cfg: &BridgeConfig) -> Option<String> {
        Some(cfg.name.clone())
    }
    fn summary(cfg: &BridgeConfig) -> String {
        format!(
            "({} calibrations, {} configs, {} modules)",
            cfg.calibrations.len(),
            cfg.configs.len(),
            cfg.modules.len()
        )
    }
    async fn run(
        cfg: BridgeConfig,
        _file: std::path::PathBuf,
        mqtt: dcs_shared::MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        service::run(cfg, mqtt, shutdown).await
    }
}
