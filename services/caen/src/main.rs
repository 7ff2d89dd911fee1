//! `caen-fsm --config FILE [--check]`: the CAEN power-supply service.

use std::path::PathBuf;
use std::process::ExitCode;

use caen::CaenConfig;
use clap::Parser;

/// CAEN power-supply state machine over EPICS Channel Access.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// YAML config (SPEC 4.3).
    #[arg(long, short)]
    config: PathBuf,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    dcs_shared::logging::init("info");
    let args = Args::parse();
    let cfg = match dcs_shared::config::load::<CaenConfig>(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("caen-fsm: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "caen-fsm: {} OK ({} channels)",
            args.config.display(),
            cfg.channels.len()
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("caen-fsm: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mqtt = cfg.mqtt.clone().with_env_overrides();
    let result = runtime.block_on(async {
        let shutdown = dcs_shared::shutdown::on_signal();
        caen::run(cfg, Some(args.config.clone()), mqtt, shutdown).await
    });
    // The CA client keeps background tasks; do not wait for them on the way out.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caen-fsm: {e:#}");
            ExitCode::FAILURE
        }
    }
}
