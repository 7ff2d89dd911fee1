//! `marta-sim`: a MARTA CO2 cooling plant that real Modbus TCP clients talk to, with
//! the driver's register map, a plant model ([`model`]) and a control port for faults.
//!
//! Control port protocol (one command per line, answered `ok`, `error: ...` or JSON):
//! `state` (JSON snapshot), `alarm NAME` (latch any alarm bit of the map until a
//! reset), `emergency on|off` (the emergency button), `silent on|off` (no answers),
//! `drop_reads on|off` (close the connection when a read arrives), `exception CODE|off`
//! (answer every request with that Modbus exception), `drop` (close the clients now).

pub mod model;
pub mod server;

pub use server::{run, SimConfig};

/// The `marta-sim` program (see [`dcs_shared::program`]).
pub struct MartaSim;

impl dcs_shared::program::Program for MartaSim {
    const NAME: &'static str = "marta-sim";
    const ABOUT: &'static str = "Simulated MARTA CO2 cooling plant (Modbus TCP, SPEC 10).";
    type Config = SimConfig;

    fn resolve_paths(cfg: &mut SimConfig, file: &std::path::Path) {
        cfg.register_map = dcs_shared::config::relative_to(file, &cfg.register_map);
    }
    fn load_files(
        cfg: &mut SimConfig,
        _file: &std::path::Path,
    ) -> Result<(), dcs_shared::ConfigError> {
        cfg.map = Some(marta::load_map(&cfg.register_map)?);
        Ok(())
    }
    fn summary(cfg: &SimConfig) -> String {
        format!("(modbus on {})", cfg.tcp)
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
