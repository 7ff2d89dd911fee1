//! Reading what Ph2_ACF left in `Results/Run_<N>/`: per-chip text files parsed into
//! numbers, every file listed with its size. Parsing is pure; [`collect`] reads the
//! directory. A partial directory (crashed run) is read as far as it goes.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The run-number file in the working directory.
pub const RUN_NUMBER_FILE: &str = "RunNumbers.dat";

/// Takes the next run number from `RunNumbers.dat` and records it (middleware runs;
/// the command-line tool does this itself).
pub fn next_run_number(work_dir: &Path) -> io::Result<u64> {
    let path = work_dir.join(RUN_NUMBER_FILE);
    let last = match fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} does not hold a run number", path.display()),
            )
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let n = last + 1;
    fs::create_dir_all(work_dir)?;
    let tmp = work_dir.join(format!("{RUN_NUMBER_FILE}.bridge-tmp"));
    fs::write(&tmp, format!("{n}\n"))?;
    fs::rename(&tmp, &path)?;
    Ok(n)
}

/// The directory of run `n`.
pub fn run_dir(work_dir: &Path, n: u64) -> PathBuf {
    work_dir.join("Results").join(format!("Run_{n}"))
}

/// Summary of one column of a chip file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Mean.
    pub mean: f64,
    /// Root mean square deviation from the mean.
    pub rms: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Summary {
    fn of(v: &[f64]) -> Option<Summary> {
        if v.is_empty() {
            return None;
        }
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        Some(Summary {
            mean,
            rms: var.sqrt(),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

/// One column of per-channel numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    /// Column name from the header (`pedestal`, `noise`).
    pub name: String,
    /// Summary over channels.
    pub summary: Option<Summary>,
    /// One value per channel, in channel order.
    pub values: Vec<f64>,
}

/// Results of one chip (`BE0_OG0_FE0_Chip8MPA.txt`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chip {
    /// File name without `.txt`.
    pub name: String,
    /// Back-end board.
    pub board: u32,
    /// Optical group.
    pub optical_group: u32,
    /// Front-end hybrid.
    pub hybrid: u32,
    /// Chip id.
    pub chip: u32,
    /// Chip type (`MPA`, `SSA`, `CBC`, ...).
    pub chip_type: String,
    /// Channels read.
    pub channels: usize,
    /// Per-channel columns (the channel column itself is implied by the order).
    pub columns: Vec<Column>,
    /// Lines that could not be read.
    pub bad_lines: usize,
}

/// Splits `BE0_OG0_FE1_Chip8MPA` into its numbers and chip type.
pub fn parse_chip_name(stem: &str) -> Option<(u32, u32, u32, u32, String)> {
    let mut parts = stem.split('_');
    let num = |p: Option<&str>, prefix: &str| p?.strip_prefix(prefix)?.parse::<u32>().ok();
    let be = num(parts.next(), "BE")?;
    let og = num(parts.next(), "OG")?;
    let fe = num(parts.next(), "FE")?;
    let chip = parts.next()?.strip_prefix("Chip")?;
    if parts.next().is_some() {
        return None;
    }
    let digits = chip.bytes().take_while(u8::is_ascii_digit).count();
    let id = chip[..digits].parse().ok()?;
    Some((be, og, fe, id, chip[digits..].to_string()))
}

/// Parses a chip file: `#` comment lines, the last of which before the data names the
/// columns (`# channel pedestal noise`), then one line of numbers per channel.
pub fn parse_chip(stem: &str, text: &str) -> Option<Chip> {
    let (board, optical_group, hybrid, chip, chip_type) = parse_chip_name(stem)?;
    let mut header: Vec<String> = Vec::new();
    let mut cols: Vec<Vec<f64>> = Vec::new();
    let mut bad_lines = 0;
    let mut channels = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            if channels == 0 {
                header = c.split_whitespace().map(str::to_string).collect();
            }
            continue;
        }
        let nums: Option<Vec<f64>> = line
            .split_whitespace()
            .map(|w| w.parse::<f64>().ok().filter(|v| v.is_finite()))
            .collect();
        match nums {
            Some(v) if v.len() >= 2 && (cols.is_empty() || v.len() == cols.len() + 1) => {
                if cols.is_empty() {
                    cols = vec![Vec::new(); v.len() - 1];
                }
                for (c, x) in cols.iter_mut().zip(&v[1..]) {
                    c.push(*x);
                }
                channels += 1;
            }
            _ => bad_lines += 1,
        }
    }
    let names: Vec<String> = if header.len() == cols.len() + 1 {
        header[1..].to_vec()
    } else {
        (1..=cols.len()).map(|i| format!("column{i}")).collect()
    };
    Some(Chip {
        name: stem.to_string(),
        board,
        optical_group,
        hybrid,
        chip,
        chip_type,
        channels,
        columns: names
            .into_iter()
            .zip(cols)
            .map(|(name, values)| Column {
                summary: Summary::of(&values),
                name,
                values,
            })
            .collect(),
        bad_lines,
    })
}

/// A file of the run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultFile {
    /// Name in the run directory.
    pub name: String,
    /// Full path when collected.
    pub path: PathBuf,
    /// Size, bytes.
    pub bytes: u64,
}

/// Everything read from a run directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunResults {
    /// The directory.
    pub dir: PathBuf,
    /// Parsed chip files, by name.
    pub chips: Vec<Chip>,
    /// Every file, by name.
    pub files: Vec<ResultFile>,
    /// `Configuration.xml` as Ph2_ACF used it, when present and text.
    pub configuration_xml: Option<String>,
    /// Expected files that are not there (a run that crashed).
    pub missing: Vec<String>,
}

/// Reads the run directory `dir`; a missing directory gives empty results naming it.
pub fn collect(dir: &Path, inline_max: u64) -> RunResults {
    let mut r = RunResults {
        dir: dir.to_path_buf(),
        ..Default::default()
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(_) => {
            r.missing.push(dir.display().to_string());
            return r;
        }
    };
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        if name == "Configuration.xml" && meta.len() <= inline_max {
            r.configuration_xml = fs::read_to_string(&path).ok();
        }
        if let Some(stem) = name.strip_suffix(".txt") {
            if meta.len() <= 64 * 1024 * 1024 {
                if let Some(chip) = fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| parse_chip(stem, &t))
                {
                    r.chips.push(chip);
                }
            }
        }
        r.files.push(ResultFile {
            name,
            path,
            bytes: meta.len(),
        });
    }
    r.chips
        .sort_by_key(|c| (c.board, c.optical_group, c.hybrid, c.chip, c.name.clone()));
    r.files.sort_by(|a, b| a.name.cmp(&b.name));
    for expected in ["Results.root", "Configuration.xml"] {
        if !r.files.iter().any(|f| f.name == expected) {
            r.missing.push(expected.to_string());
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chip_names() {
        assert_eq!(
            parse_chip_name("BE0_OG0_FE1_Chip8MPA"),
            Some((0, 0, 1, 8, "MPA".into()))
        );
        assert_eq!(
            parse_chip_name("BE0_OG0_FE0_Chip3"),
            Some((0, 0, 0, 3, "".into()))
        );
        for bad in [
            "Results",
            "BE0_OG0_FE0",
            "BEx_OG0_FE0_Chip1",
            "BE0_OG0_FE0_ChipMPA",
            "BE0_OG0_FE0_Chip1_x",
        ] {
            assert_eq!(parse_chip_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn chip_file_with_header_and_garbage() {
        let text = "# Ph2_ACF pedenoise results\n# Board 0\n# channel pedestal noise\n\
                    0 500.0 3.0\n1 502.0 5.0\nnot numbers\n2 501.0\n3 nan 1\n";
        let c = parse_chip("BE0_OG0_FE0_Chip8MPA", text).unwrap();
        assert_eq!(c.channels, 2);
        assert_eq!(c.bad_lines, 3);
        assert_eq!(c.columns[0].name, "pedestal");
        assert_eq!(c.columns[1].values, [3.0, 5.0]);
        let s = c.columns[0].summary.as_ref().unwrap();
        assert_eq!((s.mean, s.rms, s.min, s.max), (501.0, 1.0, 500.0, 502.0));
        // Without a usable header the columns are numbered.
        let c = parse_chip("BE0_OG0_FE0_Chip1SSA", "0 1 2\n1 3 4\n").unwrap();
        assert_eq!(c.columns[1].name, "column2");
        assert!(parse_chip("notes", "0 1").is_none());
    }

    #[test]
    fn run_numbers_and_partial_directories() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(next_run_number(tmp.path()).unwrap(), 1);
        assert_eq!(next_run_number(tmp.path()).unwrap(), 2);
        fs::write(tmp.path().join(RUN_NUMBER_FILE), "garbage").unwrap();
        assert!(next_run_number(tmp.path())
            .unwrap_err()
            .to_string()
            .contains("RunNumbers.dat"));
        let dir = run_dir(tmp.path(), 7);
        let r = collect(&dir, 1024);
        assert_eq!(r.missing, [dir.display().to_string()]);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("Configuration.xml"), "<x/>").unwrap();
        fs::write(
            dir.join("BE0_OG0_FE0_Chip0SSA.txt"),
            "# channel noise\n0 1.5\n",
        )
        .unwrap();
        let r = collect(&dir, 1024);
        assert_eq!(r.missing, ["Results.root"]);
        assert_eq!(r.configuration_xml.as_deref(), Some("<x/>"));
        assert_eq!(r.chips.len(), 1);
        assert_eq!(r.files.len(), 2);
    }
}
