//! `telemetry --config FILE`: forwards MQTT to InfluxDB through a durable spool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use telemetry::TelemetryConfig;

/// MQTT to InfluxDB forwarder.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// YAML config (see deploy/telemetry.yaml).
    #[arg(long, short)]
    config: PathBuf,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    dcs_shared::logging::init("info");
    let args = Args::parse();
    let mut cfg = match dcs_shared::config::load::<TelemetryConfig>(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("telemetry: {e}");
            return ExitCode::from(2);
        }
    };
    cfg.resolve_paths(&args.config);
    if args.check {
        println!("telemetry: {} is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    let mqtt = cfg.mqtt.clone().with_env_overrides();
    let shutdown = dcs_shared::shutdown::on_signal();
    match telemetry::service::run(cfg, mqtt, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("telemetry: {e:#}");
            ExitCode::FAILURE
        }
    }
}
