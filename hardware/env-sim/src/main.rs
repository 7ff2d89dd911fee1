//! `env-sim --config FILE`, or `env-sim --boards N` for N boards ESP001.. with the
//! defaults (benchmarks).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dcs_shared::program;
use env_sim::{EnvSim, EnvSimConfig};

/// Simulated environmental sensor boards on MQTT.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// YAML config.
    #[arg(long, short, conflicts_with = "boards")]
    config: Option<PathBuf>,
    /// Instead of a config: this many boards, publishing every --interval-secs.
    #[arg(long)]
    boards: Option<usize>,
    /// Publication period with --boards.
    #[arg(long, default_value_t = 1.0)]
    interval_secs: f64,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    dcs_shared::logging::init("info");
    let args = Args::parse();
    let cfg = match (&args.config, args.boards) {
        (Some(path), _) => return program::check_or_run::<EnvSim>(path, args.check, |_| {}),
        (None, Some(n)) => {
            let yaml = format!(
                "boards: [{}]\ninterval_secs: {}",
                (1..=n)
                    .map(|i| format!("ESP{i:03}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                args.interval_secs
            );
            match dcs_shared::config::from_str::<EnvSimConfig>(
                &yaml,
                std::path::Path::new("--boards"),
            ) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("env-sim: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        (None, None) => {
            eprintln!("env-sim: give --config FILE or --boards N");
            return ExitCode::from(2);
        }
    };
    program::finish::<EnvSim>(cfg, None, args.check)
}
