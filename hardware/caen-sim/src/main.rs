//! `caen-sim --config FILE [--port P] [--tick-ms N] [--state FILE]`

use std::path::PathBuf;
use std::process::ExitCode;

use caen_sim::CaenSim;
use clap::Parser;
use dcs_shared::program::{self, Program};

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
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    // First, while the process is single-threaded (see its docs).
    <CaenSim as Program>::before_threads();
    dcs_shared::logging::init("info");
    let args = Args::parse();
    program::check_or_run::<CaenSim>(&args.config, args.check, |cfg| {
        if args.port.is_some() {
            cfg.sim.port = args.port;
        }
        if let Some(ms) = args.tick_ms {
            cfg.sim.tick_ms = ms;
        }
        if args.state.is_some() {
            cfg.sim.state_file = args.state.clone();
        }
    })
}
