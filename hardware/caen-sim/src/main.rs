//! `caen-sim --config FILE [--port P] [--tick-ms N] [--state FILE]`

use std::path::PathBuf;
use std::process::ExitCode;

use caen_sim::SimConfig;
use clap::Parser;

/// Simulated CAEN SY4527 mainframe: an EPICS Channel Access server (SPEC 4).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The CAEN YAML config (the `caen` service's file, with an optional `sim:` section).
    #[arg(long, short)]
    config: PathBuf,
    /// CA port for UDP search and TCP (overrides `sim.port`).
    #[arg(long)]
    port: Option<u16>,
    /// Physics step, ms (overrides `sim.tick_ms`).
    #[arg(long)]
    tick_ms: Option<u64>,
    /// State file surviving restarts (overrides `sim.state_file`; relative to the
    /// current directory).
    #[arg(long)]
    state: Option<PathBuf>,
}

fn main() -> ExitCode {
    // First, while the process is single-threaded (see its docs).
    caen_sim::loopback_env_defaults();
    dcs_shared::logging::init("info");
    let args = Args::parse();
    let mut cfg = match dcs_shared::config::load::<SimConfig>(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("caen-sim: {e}");
            return ExitCode::from(2);
        }
    };
    cfg.resolve_paths(&args.config);
    if args.port.is_some() {
        cfg.sim.port = args.port;
    }
    if let Some(ms) = args.tick_ms {
        cfg.sim.tick_ms = ms;
    }
    if args.state.is_some() {
        cfg.sim.state_file = args.state;
    }
    if let Err((k, m)) = dcs_shared::Validate::validate(&cfg) {
        eprintln!("caen-sim: `{k}`: {m}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("caen-sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = dcs_shared::shutdown::on_signal();
        caen_sim::run(cfg, shutdown).await
    });
    // Do not wait for stray blocking tasks: the state file is already written.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caen-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
