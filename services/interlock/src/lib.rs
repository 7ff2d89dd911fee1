//! `interlock`: headless safety rules over what the suite publishes, acting on the
//! other services over MQTT, with latched alarms.
//!
//! Layers, from the data up: [`inputs`] (values and their ages, publishers online),
//! [`plant`] (the CAEN channels and the chiller as their services publish them),
//! [`rules`] (conditions, pure), [`alarm`] (hold time, latching, acknowledgement),
//! [`escalation`] (actions in order, confirmed from status, escalated on failure),
//! [`engine`] (all of it without I/O), [`service`] (MQTT). [`config`] is the rules file.

pub mod alarm;
pub mod commands;
pub mod config;
pub mod engine;
pub mod escalation;
pub use dcs_shared::inputs;
pub mod plant;
pub mod rules;
pub mod service;

pub use config::InterlockConfig;

/// The `interlock` program (see [`dcs_shared::program`]).
pub struct Interlock;

impl dcs_shared::program::Program for Interlock {
    const NAME: &'static str = "interlock";
    const ABOUT: &'static str =
        "Safety interlock: dew point, over-temperature, cooling, stale data.";
    type Config = InterlockConfig;

    fn resolve_paths(cfg: &mut InterlockConfig, file: &std::path::Path) {
        cfg.resolve_paths(file);
    }
    fn mqtt(cfg: &mut InterlockConfig) -> Option<&mut dcs_shared::MqttSettings> {
        Some(&mut cfg.mqtt)
    }
    fn client_id(cfg: &InterlockConfig) -> Option<String> {
        Some(cfg.name.clone())
    }
    fn summary(cfg: &InterlockConfig) -> String {
        format!("({} rules, {} inputs)", cfg.rules.len(), cfg.inputs.len())
    }
    async fn run(
        cfg: InterlockConfig,
        _file: std::path::PathBuf,
        mqtt: dcs_shared::MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        service::run(cfg, mqtt, shutdown).await
    }
}
