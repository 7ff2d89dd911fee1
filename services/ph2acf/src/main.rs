//! `ph2acf-bridge --config FILE [--check]`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Ph2_ACF calibration bridge.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The bridge config (YAML).
    #[arg(long, short)]
    config: PathBuf,
    /// Check the file and exit.
    #[arg(long)]
    check: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    dcs_shared::logging::init("info");
    let args = Args::parse();
    let cfg = match ph2acf::BridgeConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ph2acf-bridge: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "ph2acf-bridge: {} OK ({} calibrations, {} configs, {} modules)",
            args.config.display(),
            cfg.calibrations.len(),
            cfg.configs.len(),
            cfg.modules.len()
        );
        return ExitCode::SUCCESS;
    }
    let mqtt = cfg.mqtt.clone().with_env_overrides();
    match ph2acf::service::run(cfg, mqtt, dcs_shared::shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ph2acf-bridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}
