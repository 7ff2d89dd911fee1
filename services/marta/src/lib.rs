//! `marta`: the MARTA CO2 cooling plant driver (SPEC 10), Modbus TCP.
//!
//! Layers, from the wire up: [`registers`] (the map, spans read per poll, float32 word
//! order, bit fields), [`transport`] (Modbus TCP with timeouts), [`fsm`] (the state
//! from the status and control words), [`commands`] (MQTT commands and their register
//! plans), [`plant`] (the latest poll and what is published), all pure but the
//! transport; [`driver`] (polls, writes read back, reconnects), [`service`] (MQTT).

pub mod commands;
pub mod config;
pub mod driver;
pub mod fsm;
pub mod plant;
pub mod registers;
pub mod service;
pub mod transport;

pub use config::MartaConfig;
use dcs_shared::config::ConfigError;
use registers::MapFile;

/// Reads and checks a register map file (errors name the file, line and key).
pub fn load_map(file: &std::path::Path) -> Result<registers::RegisterMap, ConfigError> {
    let map: MapFile = dcs_shared::config::load(file)?;
    map.check()
        .map_err(|(k, m)| ConfigError::invalid(file, &k, m))
}

/// The `marta` service program (see [`dcs_shared::program`]).
pub struct Marta;

impl dcs_shared::program::Program for Marta {
    const NAME: &'static str = "marta";
    const ABOUT: &'static str = "MARTA CO2 cooling plant driver (Modbus TCP).";
    type Config = MartaConfig;

    fn resolve_paths(cfg: &mut MartaConfig, file: &std::path::Path) {
        cfg.register_map = dcs_shared::config::relative_to(file, &cfg.register_map);
    }
    fn load_files(cfg: &mut MartaConfig, file: &std::path::Path) -> Result<(), ConfigError> {
        let map = load_map(&cfg.register_map)?;
        plant::Plant::new(map.clone(), &cfg.coldest_of)
            .map_err(|m| ConfigError::invalid(file, "coldest_of", m))?;
        cfg.map = Some(map);
        Ok(())
    }
    fn mqtt(cfg: &mut MartaConfig) -> Option<&mut dcs_shared::MqttSettings> {
        Some(&mut cfg.mqtt)
    }
    fn client_id(cfg: &MartaConfig) -> Option<String> {
        Some(cfg.name.clone())
    }
    fn summary(cfg: &MartaConfig) -> String {
        let n = cfg.map.as_ref().map_or(0, |m| m.readings.len());
        format!(
            "({}:{}, {n} readings)",
            cfg.connection.host, cfg.connection.port
        )
    }
    async fn run(
        cfg: MartaConfig,
        _file: std::path::PathBuf,
        mqtt: dcs_shared::MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        service::run(cfg, mqtt, shutdown).await
    }
}
