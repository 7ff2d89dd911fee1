//! `julabo-sim [--config FILE] [--tcp ADDR] [--pty LINK] [--serial TTY] [--control ADDR]`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use julabo_sim::SimConfig;

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
}

#[tokio::main]
async fn main() -> ExitCode {
    dcs_shared::logging::init("info");
    let args = Args::parse();
    let mut cfg = match &args.config {
        Some(p) => match dcs_shared::config::load::<SimConfig>(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("julabo-sim: {e}");
                return ExitCode::from(2);
            }
        },
        None => SimConfig::default(),
    };
    cfg.tcp = args.tcp.or(cfg.tcp);
    cfg.pty = args.pty.or(cfg.pty);
    cfg.serial = args.serial.or(cfg.serial);
    cfg.control = args.control.or(cfg.control);
    if let Some(ms) = args.min_spacing_ms {
        cfg.device.min_spacing_ms = ms;
    }
    if args.manual {
        cfg.device.remote = false;
    }
    cfg.device.unsupported.extend(args.unsupported);
    if let Err((k, m)) = dcs_shared::Validate::validate(&cfg) {
        eprintln!("julabo-sim: `{k}`: {m}");
        return ExitCode::from(2);
    }
    let shutdown = dcs_shared::shutdown::on_signal();
    match julabo_sim::run(cfg, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("julabo-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
