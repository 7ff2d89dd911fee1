//! One calibration run's outputs, laid out as Ph2_ACF lays them out:
//! `Results/Run_<N>/{Configuration.xml, BE0_OG0_FE<h>_Chip<c><SSA|MPA>.txt,
//! Results.root}` and a monotonic `RunNumbers.dat` beside `Results/`.
//!
//! Files appear as the run progresses (chip files one by one, `Results.root` when the
//! run is closed), so a crash leaves a partial directory as the real software does.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rand::{Rng, RngCore, SeedableRng};

use crate::config::SimConfig;

/// The run-number file, beside `Results/`.
pub const RUN_NUMBER_FILE: &str = "RunNumbers.dat";

/// Reads the last run number (0 when there is none yet).
pub fn last_run_number(base: &Path) -> u64 {
    fs::read_to_string(base.join(RUN_NUMBER_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Records `n` as the last run number if it is higher than the one on file.
pub fn record_run_number(base: &Path, n: u64) -> io::Result<()> {
    if n <= last_run_number(base) {
        return Ok(());
    }
    fs::create_dir_all(base)?;
    let tmp = base.join(format!("{RUN_NUMBER_FILE}.tmp"));
    fs::write(&tmp, format!("{n}\n"))?;
    fs::rename(tmp, base.join(RUN_NUMBER_FILE))
}

/// The chip files of one run, in the order they are written.
pub fn chip_names(hybrids: u32) -> Vec<(u32, u32, &'static str)> {
    let mut v = Vec::new();
    for h in 0..hybrids {
        for c in 0..16 {
            v.push((h, c, if c < 8 { "SSA" } else { "MPA" }));
        }
    }
    v
}

/// A run being written.
pub struct RunWriter {
    /// `Results/Run_<N>`.
    pub dir: PathBuf,
    /// Run number.
    pub run_number: u64,
    calibration: String,
    chips: Vec<(u32, u32, &'static str)>,
    written: usize,
    channels: u32,
    root_bytes: u64,
    rng: rand::rngs::StdRng,
}

impl RunWriter {
    /// Creates the run directory and copies the configuration into it.
    pub fn begin(
        cfg: &SimConfig,
        base: &Path,
        calibration: &str,
        config_file: &Path,
        run_number: u64,
    ) -> io::Result<RunWriter> {
        let xml = fs::read(config_file).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot read {}: {e}", config_file.display()),
            )
        })?;
        record_run_number(base, run_number)?;
        let dir = base.join("Results").join(format!("Run_{run_number}"));
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("Configuration.xml"), xml)?;
        Ok(RunWriter {
            dir,
            run_number,
            calibration: calibration.to_string(),
            chips: chip_names(cfg.hybrids),
            written: 0,
            channels: cfg.channels,
            root_bytes: cfg.results_root_bytes,
            rng: rand::rngs::StdRng::seed_from_u64(run_number),
        })
    }

    /// Writes the chip files due at `percent` progress.
    pub fn advance(&mut self, percent: f64) -> io::Result<()> {
        let due = ((percent / 100.0) * self.chips.len() as f64).floor() as usize;
        while self.written < due.min(self.chips.len()) {
            let (h, c, kind) = self.chips[self.written];
            self.write_chip(h, c, kind)?;
            self.written += 1;
        }
        Ok(())
    }

    fn write_chip(&mut self, hybrid: u32, chip: u32, kind: &str) -> io::Result<()> {
        let mut text = format!(
            "# Ph2_ACF {} results\n# Board 0, OpticalGroup 0, Hybrid {hybrid}, Chip {chip} ({kind})\n\
             # channel pedestal noise\n",
            self.calibration
        );
        let base_ped = 500.0 + 3.0 * chip as f64 + 10.0 * hybrid as f64;
        let base_noise = if kind == "MPA" { 2.0 } else { 4.0 } + 0.05 * chip as f64;
        for ch in 0..self.channels {
            let p = base_ped + self.rng.gen_range(-2.0..2.0);
            let n = base_noise + self.rng.gen_range(-0.3..0.3);
            text.push_str(&format!("{ch} {p:.3} {n:.4}\n"));
        }
        let name = format!("BE0_OG0_FE{hybrid}_Chip{chip}{kind}.txt");
        fs::write(self.dir.join(name), text)
    }

    /// Closes the run: remaining chip files and `Results.root`. Returns its path.
    pub fn finish(&mut self) -> io::Result<PathBuf> {
        self.advance(100.0)?;
        let path = self.dir.join("Results.root");
        let mut f = io::BufWriter::new(fs::File::create(&path)?);
        // ROOT files start with "root"; the rest is noise so nothing compresses it away.
        f.write_all(b"root")?;
        let mut left = self.root_bytes.saturating_sub(4);
        let mut chunk = vec![0u8; 64 * 1024];
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            self.rng.fill_bytes(&mut chunk[..n]);
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.flush()?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SimConfig {
        dcs_shared::config::from_str("results_root_bytes: 1000\nchannels: 4\n", Path::new("t"))
            .unwrap()
    }

    #[test]
    fn run_directory_grows_then_closes() {
        let tmp = tempfile::tempdir().unwrap();
        let xml = tmp.path().join("PS.xml");
        fs::write(&xml, "<HwDescription/>").unwrap();
        let base = tmp.path().join("work");
        let mut run = RunWriter::begin(&cfg(), &base, "pedenoise", &xml, 12).unwrap();
        assert_eq!(last_run_number(&base), 12);
        assert_eq!(
            fs::read_to_string(run.dir.join("Configuration.xml")).unwrap(),
            "<HwDescription/>"
        );
        run.advance(50.0).unwrap();
        let files = fs::read_dir(&run.dir).unwrap().count();
        assert_eq!(files, 1 + 8, "configuration and half the 16 chips");
        let root = run.finish().unwrap();
        assert_eq!(fs::metadata(&root).unwrap().len(), 1000);
        let chip = fs::read_to_string(run.dir.join("BE0_OG0_FE0_Chip8MPA.txt")).unwrap();
        assert_eq!(chip.lines().count(), 3 + 4);
        assert!(chip.contains("# channel pedestal noise"));
        // Run numbers only go up.
        record_run_number(&base, 5).unwrap();
        assert_eq!(last_run_number(&base), 12);
    }

    #[test]
    fn unreadable_configuration_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let e = RunWriter::begin(&cfg(), tmp.path(), "x", &tmp.path().join("nope.xml"), 1)
            .err()
            .unwrap();
        assert!(e.to_string().contains("nope.xml"), "{e}");
    }
}
