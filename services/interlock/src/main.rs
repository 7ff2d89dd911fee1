//! `interlock --config FILE [--check]`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Safety interlock: dew point, over-temperature, cooling, stale data.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The rules file (YAML).
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
    let mut cfg = match dcs_shared::config::load::<interlock::InterlockConfig>(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("interlock: {e}");
            return ExitCode::from(2);
        }
    };
    cfg.resolve_paths(&args.config);
    if args.check {
        println!(
            "interlock: {} OK ({} rules, {} inputs)",
            args.config.display(),
            cfg.rules.len(),
            cfg.inputs.len()
        );
        return ExitCode::SUCCESS;
    }
    let mqtt = cfg.mqtt.clone().with_env_overrides();
    let shutdown = dcs_shared::shutdown::on_signal();
    match interlock::service::run(cfg, mqtt, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("interlock: {e:#}");
            ExitCode::FAILURE
        }
    }
}
