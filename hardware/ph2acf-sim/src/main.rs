//! `ph2acf-sim [--config FILE]`: the middleware server.
//! `ph2acf-sim cli [--config FILE] [-b] -f <xml> -c <calibration>`: like `runCalibration`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dcs_shared::program;
use ph2acf_sim::{Ph2acfSim, SimConfig};

/// Simulated Ph2_ACF.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// YAML config (defaults apply without one).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Subcommand)]
enum Mode {
    /// Run one calibration in the current directory, like `runCalibration`.
    Cli {
        /// Batch mode (accepted for compatibility; always batch).
        #[arg(short = 'b')]
        batch: bool,
        /// Hardware description XML.
        #[arg(short = 'f')]
        file: PathBuf,
        /// Calibration name.
        #[arg(short = 'c')]
        calibration: String,
    },
}

fn load(path: Option<&Path>) -> Result<SimConfig, String> {
    match path {
        Some(p) => program::load::<Ph2acfSim>(p).map_err(|e| e.to_string()),
        None => {
            dcs_shared::config::from_str("{}", Path::new("(defaults)")).map_err(|e| e.to_string())
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ph2acf-sim: {e}");
            return ExitCode::from(2);
        }
    };
    match args.mode {
        Some(Mode::Cli {
            file, calibration, ..
        }) => ExitCode::from(ph2acf_sim::cli::run(&cfg, &file, &calibration)),
        None => {
            dcs_shared::logging::init("info");
            program::finish::<Ph2acfSim>(cfg, args.config.as_deref(), args.check)
        }
    }
}
