//! `telemetry --config FILE [--check]`: forwards MQTT to InfluxDB through a durable spool.

fn main() -> std::process::ExitCode {
    dcs_shared::program::main::<telemetry::Telemetry>()
}
