//! `telemetry`: the MQTT to InfluxDB forwarder that replaces Telegraf's `mqtt_consumer`.
//!
//! Source, transform, sink, as in vector:
//! - [`service`]: the MQTT side (persistent session, QoS 1, acknowledged only once in
//!   the spool);
//! - [`mapping`]: the config's inputs turn a message into points (`dcs_shared::topic`
//!   holds the filter matching and the `{n}` name templates);
//! - the spool (`dcs_shared::spool`) keeps [`record`]s on disk;
//! - [`sink`]: batches to InfluxDB v1 or v2 with retry, backoff and a dead-letter file;
//! - [`stats`]: self-metrics on `telemetry/stats` and in `telemetry_stats`.

pub mod config;
pub mod flat;
pub mod mapping;
pub mod record;
pub mod service;
pub mod sink;
pub mod stats;
/// MQTT topic filters and name templates (shared with the interlock).
pub use dcs_shared::topic;

pub use config::TelemetryConfig;

/// The `telemetry` program (see [`dcs_shared::program`]).
pub struct Telemetry;

impl dcs_shared::program::Program for Telemetry {
    const NAME: &'static str = "telemetry";
    const ABOUT: &'static str = "MQTT to InfluxDB forwarder through a durable spool.";
    type Config = TelemetryConfig;
    const SINGLE_THREAD: bool = true;

    fn resolve_paths(cfg: &mut TelemetryConfig, file: &std::path::Path) {
        cfg.resolve_paths(file);
    }
    fn mqtt(cfg: &mut TelemetryConfig) -> Option<&mut dcs_shared::MqttSettings> {
        Some(&mut cfg.mqtt)
    }
    fn client_id(cfg: &TelemetryConfig) -> Option<String> {
        Some(cfg.name.clone())
    }
    async fn run(
        cfg: TelemetryConfig,
        _file: std::path::PathBuf,
        mqtt: dcs_shared::MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        service::run(cfg, mqtt, shutdown).await
    }
}
