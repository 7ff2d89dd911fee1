//! `burnin`: burn-in sequences (thermal cycles, IV scans, Ph2_ACF calibrations) run
//! unattended over MQTT, checkpointed at every step, paused when the interlock trips or
//! data goes stale, and resumed by themselves once conditions are back.
//!
//! Layers: [`sequence`] (the sequence files, pure), [`world`] (what the other services
//! publish), [`engine`] (the run, pure: messages and clock in, commands out),
//! [`checkpoint`] (atomic file), [`commands`] (operator commands), [`store`] (MongoDB),
//! [`service`] (MQTT, the durable queues in front of MongoDB and InfluxDB).
//! [`config`] is `burnin.yaml`. See `docs/burnin.md`.

pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod engine;
pub mod sequence;
pub mod service;
pub mod show;
pub mod store;
pub mod world;

pub use config::BurninConfig;

/// The `burnin` program (see [`dcs_shared::program`]).
pub struct Burnin;

impl dcs_shared::program::Program for Burnin {
    const NAME: &'static str = "burnin";
    const ABOUT: &'static str =
        "Burn-in sequencer: thermal cycles, IV scans, calibrations; checkpointed, paused on trips.";
    type Config = BurninConfig;

    fn resolve_paths(cfg: &mut BurninConfig, file: &std::path::Path) {
        cfg.state_dir = dcs_shared::config::relative_to(file, &cfg.state_dir);
        cfg.sequences_dir = dcs_shared::config::relative_to(file, &cfg.sequences_dir);
    }
    fn load_files(
        cfg: &mut BurninConfig,
        _file: &std::path::Path,
    ) -> Result<(), dcs_shared::ConfigError> {
        // Every shipped sequence must load: a broken one is found at start, not when an
        // operator picks it at 3 a.m.
        for (_, f) in cfg.sequences() {
            sequence::load(&f, cfg.limits)?;
        }
        Ok(())
    }
    fn mqtt(cfg: &mut BurninConfig) -> Option<&mut dcs_shared::MqttSettings> {
        Some(&mut cfg.mqtt)
    }
    fn client_id(cfg: &BurninConfig) -> Option<String> {
        Some(cfg.name.clone())
    }
    fn summary(cfg: &BurninConfig) -> String {
        format!("({} sequences)", cfg.sequences().len())
    }
    async fn run(
        cfg: BurninConfig,
        _file: std::path::PathBuf,
        mqtt: dcs_shared::MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        service::run(cfg, mqtt, shutdown).await
    }
}
