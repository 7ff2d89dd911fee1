//! The command-line mode: behaves like `runCalibration -b -f <xml> -c <name>` run in a
//! Ph2_ACF working directory (the current directory), printing the real tool's kind of
//! log lines and `>>>> Progress :  NN.N% <<<<` lines.
//!
//! Exit codes: 0 when the run closed normally, 1 when it could not start (unknown
//! calibration, unreadable configuration), SIGABRT for the `crash` fault.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::config::{FaultKind, SimConfig};
use crate::run::{last_run_number, RunWriter};

fn log(level: char, text: &str) {
    // Local time of day without zone, as Ph2_ACF prints it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = now.as_secs() % 86_400;
    let line = format!(
        "|{:02}:{:02}:{:02}.{:03}|{level}| {text}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.subsec_millis()
    );
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs one calibration in the current directory; returns the exit code.
pub fn run(cfg: &SimConfig, xml: &Path, calibration: &str) -> u8 {
    let base = Path::new(".");
    if !cfg.calibrations.iter().any(|c| c == calibration) {
        log(
            'E',
            &format!("Calibration {calibration} not recognised: aborting"),
        );
        return 1;
    }
    log(
        'I',
        &format!("Loading configuration file {}", xml.display()),
    );
    let run_number = last_run_number(base) + 1;
    let mut w = match RunWriter::begin(cfg, base, calibration, xml, run_number) {
        Ok(w) => w,
        Err(e) => {
            log('E', &format!("{e}"));
            return 1;
        }
    };
    log('I', "Initializing the Hardware");
    log('I', &format!("Configuring calibration {calibration}"));
    log('I', &format!("Run {run_number} started"));
    let steps = 50;
    let pause = Duration::from_secs_f64(cfg.run_secs.max(0.0) / steps as f64);
    for i in 0..=steps {
        let percent = 100.0 * i as f64 / steps as f64;
        if let Some(f) = cfg.fault {
            if percent >= f.at_percent {
                match f.kind {
                    FaultKind::Crash => {
                        log('E', "Segmentation violation: aborting");
                        std::process::abort();
                    }
                    FaultKind::Hang => loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    },
                    FaultKind::Drop => {}
                }
            }
        }
        if let Err(e) = w.advance(percent) {
            log('E', &format!("cannot write results: {e}"));
            return 1;
        }
        println!(">>>> Progress : {percent:5.1}% <<<<");
        if i < steps {
            std::thread::sleep(pause);
        }
    }
    match w.finish() {
        Ok(_) => log(
            'I',
            &format!("Closing result file: Results/Run_{run_number}/Results.root"),
        ),
        Err(e) => {
            log('E', &format!("cannot close results: {e}"));
            return 1;
        }
    }
    log('I', "Halted");
    0
}
