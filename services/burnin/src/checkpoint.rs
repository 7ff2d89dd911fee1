//! The run's checkpoint: one JSON file, replaced atomically (written beside, fsynced,
//! renamed, directory fsynced), so a crash at any instant leaves the previous or the
//! new checkpoint, never a torn one. Finished runs are kept as `runs/<id>.json`.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

/// Where the checkpoint lives.
pub struct Checkpoints {
    dir: PathBuf,
}

impl Checkpoints {
    /// Creates `dir` (and `dir/runs`) if needed.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir.join("runs"))?;
        Ok(Checkpoints {
            dir: dir.to_path_buf(),
        })
    }

    fn file(&self) -> PathBuf {
        self.dir.join("checkpoint.json")
    }

    /// The last checkpoint, if any. A file that does not parse is an error naming it
    /// (it is never silently dropped: a person decides).
    pub fn load(&self) -> Result<Option<Json>, String> {
        match fs::read(self.file()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", self.file().display())),
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                format!(
                    "{} is not a checkpoint ({e}): move it away to start afresh",
                    self.file().display()
                )
            }),
        }
    }

    /// Replaces the checkpoint (None: removes it).
    pub fn save(&self, run: Option<&Json>) -> std::io::Result<()> {
        match run {
            None => match fs::remove_file(self.file()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            Some(doc) => write_atomic(&self.file(), &serde_json::to_vec(doc)?),
        }
    }

    /// Keeps a finished run's document as `runs/<id>.json`.
    pub fn keep_run(&self, id: &str, doc: &Json) -> std::io::Result<PathBuf> {
        let f = self.dir.join("runs").join(format!("{id}.json"));
        write_atomic(&f, &serde_json::to_vec_pretty(doc)?)?;
        Ok(f)
    }

    /// The checkpoint in `dir`, read without creating anything (for `dcs burnin show`).
    pub fn peek(dir: &Path) -> Option<Json> {
        serde_json::from_slice(&fs::read(dir.join("checkpoint.json")).ok()?).ok()
    }

    /// A finished run's document.
    pub fn run_document(dir: &Path, id: &str) -> Result<Json, String> {
        let f = dir.join("runs").join(format!("{id}.json"));
        let b = fs::read(&f).map_err(|e| format!("no run {id} in {}: {e}", f.display()))?;
        serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", f.display()))
    }
}

fn write_atomic(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = file.with_extension("json.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, file)?;
    if let Some(dir) = file.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaced_whole_and_a_leftover_temp_file_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let c = Checkpoints::open(d.path()).unwrap();
        assert_eq!(c.load().unwrap(), None);
        c.save(Some(&serde_json::json!({"index": 1}))).unwrap();
        // A crash between write and rename leaves only the temp file behind.
        fs::write(d.path().join("checkpoint.json.tmp"), b"{\"ind").unwrap();
        assert_eq!(c.load().unwrap(), Some(serde_json::json!({"index": 1})));
        c.save(Some(&serde_json::json!({"index": 2}))).unwrap();
        assert_eq!(c.load().unwrap(), Some(serde_json::json!({"index": 2})));
        c.save(None).unwrap();
        assert_eq!(c.load().unwrap(), None);
        fs::write(d.path().join("checkpoint.json"), b"garbage").unwrap();
        assert!(c.load().unwrap_err().contains("move it away"));
    }
}
