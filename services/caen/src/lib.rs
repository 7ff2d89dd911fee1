//! `caen-fsm`: the CAEN SY4527 power supply (LV and HV boards) over EPICS Channel
//! Access, driven and reported over MQTT (SPEC 3.1, 4).
//!
//! Layers, from the wire up: [`pv`] (names and parameters), [`ca`] (Channel Access
//! behind the [`ca::ChannelAccess`] trait), [`plant`] (readings and JSON, no I/O),
//! [`fsm`] (the state rules, pure), [`control`] (the safety rules, pure: commands and
//! plant in, writes or refusals out), [`commands`] (MQTT commands, parsed), [`permit`]
//! (the interlock's say on LV on), and [`service`] (the I/O loop that carries the
//! writes out and feeds the results back).

pub mod ca;
pub mod commands;
pub mod config;
pub mod control;
pub mod fsm;
pub mod permit;
pub mod plant;
pub mod pv;
pub mod service;

pub use config::CaenConfig;

/// Starts the service with the `epics-ca-rs` client.
pub async fn run(
    cfg: CaenConfig,
    config_path: Option<std::path::PathBuf>,
    mqtt: dcs_shared::MqttSettings,
    shutdown: dcs_shared::shutdown::CancellationToken,
) -> anyhow::Result<()> {
    let port = std::env::var("EPICS_CA_SERVER_PORT")
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(5064);
    let addresses = cfg.ca.addresses(port).map_err(anyhow::Error::msg)?;
    let ca = std::sync::Arc::new(ca::EpicsCa::new(addresses).await?);
    service::run(cfg, config_path, mqtt, ca, shutdown).await
}

/// The `caen-fsm` program (see [`dcs_shared::program`]).
pub struct CaenFsm;

impl dcs_shared::program::Program for CaenFsm {
    const NAME: &'static str = "caen-fsm";
    const ABOUT: &'static str = "CAEN power-supply state machine over EPICS Channel Access.";
    type Config = CaenConfig;
    // The CA client keeps background tasks: do not wait for them on the way out.
    const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

    fn resolve_paths(cfg: &mut CaenConfig, file: &std::path::Path) {
        if let Some(k) = cfg.safety.permit_key_file.take() {
            cfg.safety.permit_key_file = Some(dcs_shared::config::relative_to(file, &k));
        }
    }
    fn mqtt(cfg: &mut CaenConfig) -> Option<&mut dcs_shared::MqttSettings> {
        Some(&mut cfg.mqtt)
    }
    fn client_id(cfg: &CaenConfig) -> Option<String> {
        Some(cfg.name.clone())
    }
    fn summary(cfg: &CaenConfig) -> String {
        format!("({} channels)", cfg.channels.len())
    }
    async fn run(
        cfg: CaenConfig,
        file: std::path::PathBuf,
        mqtt: dcs_shared::MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        run(cfg, Some(file), mqtt, shutdown).await
    }
}
