//! `julabo`: the Julabo chiller driver.
//!
//! Layers, from the wire up: [`protocol`] (commands and replies, no I/O),
//! [`transport`] (serial port or TCP tunnel, and the paced [`transport::Link`]),
//! [`readings`] (what the unit said, field by field) and [`schedule`] (which
//! conversation gets the line next: commands first), both pure, [`chiller`] (reading
//! the unit, reconnecting, carrying out commands), [`fsm`] (the published state),
//! [`commands`] (MQTT commands, validated), [`service`] (MQTT).

pub mod chiller;
pub mod commands;
pub mod config;
pub mod fsm;
pub mod protocol;
pub mod readings;
pub mod schedule;
pub mod service;
pub mod transport;

pub use config::JulaboConfig;

/// The `julabo` service program (see [`dcs_shared::program`]).
pub struct Julabo;

impl dcs_shared::program::Program for Julabo {
    const NAME: &'static str = "julabo";
    const ABOUT: &'static str = "Julabo chiller driver.";
    type Config = JulaboConfig;

    fn mqtt(cfg: &mut JulaboConfig) -> Option<&mut dcs_shared::MqttSettings> {
        Some(&mut cfg.mqtt)
    }
    fn client_id(cfg: &JulaboConfig) -> Option<String> {
        Some(cfg.name.clone())
    }
    fn summary(cfg: &JulaboConfig) -> String {
        format!("({})", cfg.port)
    }
    async fn run(
        cfg: JulaboConfig,
        _file: std::path::PathBuf,
        mqtt: dcs_shared::MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        service::run(cfg, mqtt, shutdown).await
    }
}
