//! `julabo-sim [--config FILE] [--tcp ADDR] [--pty LINK] [--serial TTY] [--control ADDR]`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dcs_shared::program;
use julabo_sim::{JulaboSim, SimConfig};

/// Simulated Julabo circulator (SPEC 5).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// YAML config (listeners and the unit's model); flags override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Serve on TCP, raw (like ser2net or nc).
    #[arg(long)]
    tcp: Option<SocketAddr>,
    /// Create a pseudo-terminal and link its device at this path.
    #[arg(long)]
    pty: Option<PathBuf>,
    /// Open this existing tty as the unit's port (e.g. one end of a socat pair).
    #[arg(long)]
    serial: Option<PathBuf>,
    /// Fault-injection control port.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Minimum spacing between commands, ms (default 250, as the real unit).
    #[arg(long)]
    min_spacing_ms: Option<u64>,
    /// Start under manual (front panel) control instead of remote.
    #[arg(long)]
    manual: bool,
    /// A command this model does not have (repeatable): no reply, -08 on the next STATUS.
    #[arg(long, value_name = "COMMAND")]
    unsupported: Vec<String>,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    dcs_shared::logging::init("info");
    let args = Args::parse();
    let adjust = |cfg: &mut SimConfig| {
        cfg.tcp = args.tcp.or(cfg.tcp);
        cfg.pty = args.pty.clone().or(cfg.pty.take());
        cfg.serial = args.serial.clone().or(cfg.serial.take());
        cfg.control = args.control.or(cfg.control);
        if let Some(ms) = args.min_spacing_ms {
            cfg.device.min_spacing_ms = ms;
        }
        if args.manual {
            cfg.device.remote = false;
        }
        cfg.device
            .unsupported
            .extend(args.unsupported.iter().cloned());
    };
    match &args.config {
        Some(p) => program::check_or_run::<JulaboSim>(p, args.check, adjust),
        None => {
            let mut cfg = SimConfig::default();
            adjust(&mut cfg);
            program::finish::<JulaboSim>(cfg, None, args.check)
        }
    }
}
