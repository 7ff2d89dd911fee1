//! A run as it is recorded: the same [`RunRecord`] becomes the MongoDB document and the
//! `calibration_runs` points, carrying the very same start and end instants (SPEC 6.2).
//! Pure: no I/O.

use dcs_shared::line_protocol::{self, FieldValue, Point};
use dcs_shared::UtcNanos;
use mongodb::bson::{self, doc, Bson, DateTime, Document};
use serde::{Deserialize, Serialize};

use crate::backend::RunStatus;
use crate::results::RunResults;

/// Measurement of the run markers in InfluxDB.
pub const MEASUREMENT: &str = "calibration_runs";

/// Largest run document written (MongoDB's limit is 16 MiB; the rest goes to GridFS).
pub const MAX_DOCUMENT: usize = 15 * 1024 * 1024;

/// Everything known about a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The bridge's id of the run (unique; what `dcs run show` takes).
    pub run_id: String,
    /// Ph2_ACF's run number, once known.
    pub run_number: Option<u64>,
    /// Calibration.
    pub calibration: String,
    /// Configuration name.
    pub config: String,
    /// Its XML file as configured.
    pub config_file: String,
    /// Modules under test.
    pub modules: Vec<String>,
    /// Operator.
    pub operator: String,
    /// Comment.
    pub comment: String,
    /// `middleware` or `cli`.
    pub backend: String,
    /// Running, done, stopped, failed.
    pub status: RunStatus,
    /// Why it failed (or what went wrong closing it).
    pub error: Option<String>,
    /// Start instant, UTC ns, taken by the bridge.
    pub start_ns: i64,
    /// End instant, UTC ns.
    pub end_ns: Option<i64>,
    /// What Ph2_ACF left behind (end record only).
    pub results: Option<RunResults>,
}

/// Keeps a column name usable as a BSON key.
fn key(name: &str) -> String {
    let k: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if k.is_empty() {
        "_".into()
    } else {
        k
    }
}

fn date(ns: i64) -> Bson {
    Bson::DateTime(DateTime::from_millis(UtcNanos(ns).as_millis()))
}

fn opt_i64(v: Option<i64>) -> Bson {
    v.map_or(Bson::Null, Bson::Int64)
}

/// GridFS id of a result file: stable, so a retried write replaces, never duplicates.
pub fn file_id(run_id: &str, name: &str) -> String {
    format!("{run_id}/{name}")
}

impl RunRecord {
    /// The MongoDB document. `with_values: false` leaves out the per-channel arrays
    /// (for documents that would pass [`MAX_DOCUMENT`]; the files are in GridFS).
    pub fn document(&self, with_values: bool) -> Document {
        let mut d = doc! {
            "run_id": &self.run_id,
            "run_number": opt_i64(self.run_number.map(|n| n as i64)),
            "calibration": &self.calibration,
            "config": &self.config,
            "config_file": &self.config_file,
            "modules": &self.modules,
            "operator": &self.operator,
            "comment": &self.comment,
            "backend": &self.backend,
            "status": self.status.as_str(),
            "error": self.error.as_deref().map_or(Bson::Null, |e| Bson::String(e.into())),
            "start_time": date(self.start_ns),
            "start_time_ns": self.start_ns,
            "end_time": self.end_ns.map_or(Bson::Null, date),
            "end_time_ns": opt_i64(self.end_ns),
            "duration_s": self
                .end_ns
                .map_or(Bson::Null, |e| Bson::Double((e - self.start_ns) as f64 / 1e9)),
        };
        let Some(r) = &self.results else {
            return d;
        };
        let chips: Vec<Document> = r
            .chips
            .iter()
            .map(|c| {
                let mut results = Document::new();
                for col in &c.columns {
                    let mut cd = Document::new();
                    if let Some(s) = &col.summary {
                        cd.insert("mean", s.mean);
                        cd.insert("rms", s.rms);
                        cd.insert("min", s.min);
                        cd.insert("max", s.max);
                    }
                    if with_values {
                        cd.insert("values", col.values.clone());
                    }
                    results.insert(key(&col.name), cd);
                }
                doc! {
                    "name": &c.name,
                    "board": c.board as i64,
                    "optical_group": c.optical_group as i64,
                    "hybrid": c.hybrid as i64,
                    "chip": c.chip as i64,
                    "chip_type": &c.chip_type,
                    "channels": c.channels as i64,
                    "bad_lines": c.bad_lines as i64,
                    "results": results,
                }
            })
            .collect();
        let files: Vec<Document> = r
            .files
            .iter()
            .map(|f| {
                doc! {
                    "name": &f.name,
                    "bytes": f.bytes as i64,
                    "gridfs_id": file_id(&self.run_id, &f.name),
                }
            })
            .collect();
        d.insert("results_dir", r.dir.display().to_string());
        d.insert(
            "configuration_xml",
            r.configuration_xml
                .as_deref()
                .map_or(Bson::Null, |x| Bson::String(x.into())),
        );
        d.insert("chips", chips);
        d.insert("files", files);
        d.insert("missing_files", r.missing.clone());
        if !with_values {
            d.insert("values_in_gridfs_only", true);
        }
        d
    }

    /// The document, without per-channel values if it would be too large.
    pub fn document_within_limit(&self) -> Document {
        let d = self.document(true);
        match bson::to_vec(&d) {
            Ok(v) if v.len() <= MAX_DOCUMENT => d,
            _ => self.document(false),
        }
    }

    /// The `calibration_runs` point of the start (`end: false`) or the end.
    pub fn point(&self, end: bool) -> Option<Point> {
        let ts = if end { self.end_ns? } else { self.start_ns };
        let mut fields = vec![
            (
                "event".to_string(),
                FieldValue::Str(if end { "end" } else { "start" }.into()),
            ),
            (
                "status".into(),
                FieldValue::Str(self.status.as_str().into()),
            ),
            ("modules".into(), FieldValue::Str(self.modules.join(","))),
            ("operator".into(), FieldValue::Str(self.operator.clone())),
            ("config".into(), FieldValue::Str(self.config.clone())),
            ("start_ns".into(), FieldValue::Int(self.start_ns)),
        ];
        if let Some(n) = self.run_number {
            fields.push(("run_number".into(), FieldValue::Int(n as i64)));
        }
        if let Some(e) = self.end_ns {
            fields.push(("end_ns".into(), FieldValue::Int(e)));
            fields.push((
                "duration_s".into(),
                FieldValue::Float((e - self.start_ns) as f64 / 1e9),
            ));
        }
        if let Some(e) = &self.error {
            fields.push(("error".into(), FieldValue::Str(e.clone())));
        }
        Some(Point {
            measurement: MEASUREMENT.into(),
            tags: vec![
                ("calibration".into(), self.calibration.clone()),
                ("run_id".into(), self.run_id.clone()),
            ],
            fields,
            timestamp_ns: ts,
        })
    }

    /// The point as a line of line protocol.
    pub fn line(&self, end: bool) -> Option<String> {
        let p = self.point(end)?;
        let mut s = String::new();
        line_protocol::encode(&p, &mut s).ok()?;
        if !s.ends_with('\n') {
            s.push('\n');
        }
        Some(s)
    }

    /// The MQTT run marker (`ph2acf/run`), same instants.
    pub fn marker(&self, end: bool) -> serde_json::Value {
        serde_json::json!({
            "event": if end { "end" } else { "start" },
            "run_id": self.run_id,
            "calibration": self.calibration,
            "run_number": self.run_number,
            "status": self.status.as_str(),
            "error": self.error,
            "time": if end { self.end_ns.unwrap_or(self.start_ns) } else { self.start_ns },
        })
    }
}

/// A new run id: UTC start time and a random suffix (`20261122T101502Z-3f9a`).
pub fn new_run_id(start: UtcNanos) -> String {
    dcs_shared::time::run_id(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{Chip, Column, ResultFile, Summary};

    fn record() -> RunRecord {
        RunRecord {
            run_id: "20261122T101502Z-3f9a".into(),
            run_number: Some(12),
            calibration: "pedenoise".into(),
            config: "PS".into(),
            config_file: "/x/PS.xml".into(),
            modules: vec!["M1".into(), "M2".into()],
            operator: "alice".into(),
            comment: "c".into(),
            backend: "cli".into(),
            status: RunStatus::Done,
            error: None,
            start_ns: 1_795_000_000_123_456_789,
            end_ns: Some(1_795_000_010_987_654_321),
            results: Some(RunResults {
                dir: "/w/Results/Run_12".into(),
                chips: vec![Chip {
                    name: "BE0_OG0_FE0_Chip8MPA".into(),
                    board: 0,
                    optical_group: 0,
                    hybrid: 0,
                    chip: 8,
                    chip_type: "MPA".into(),
                    channels: 2,
                    columns: vec![Column {
                        name: "noise.rms".into(),
                        summary: Some(Summary {
                            mean: 1.0,
                            rms: 0.5,
                            min: 0.5,
                            max: 1.5,
                        }),
                        values: vec![0.5, 1.5],
                    }],
                    bad_lines: 0,
                }],
                files: vec![ResultFile {
                    name: "Results.root".into(),
                    path: "/w/r".into(),
                    bytes: 9,
                }],
                configuration_xml: Some("<x/>".into()),
                missing: vec![],
            }),
        }
    }

    #[test]
    fn document_and_points_carry_the_same_instants() {
        let r = record();
        let d = r.document(true);
        assert_eq!(d.get_i64("start_time_ns").unwrap(), r.start_ns);
        assert_eq!(d.get_i64("end_time_ns").unwrap(), r.end_ns.unwrap());
        assert_eq!(
            d.get_datetime("start_time").unwrap().timestamp_millis(),
            r.start_ns / 1_000_000
        );
        let chip = &d.get_array("chips").unwrap()[0];
        let noise = chip.as_document().unwrap().get_document("results").unwrap();
        assert!(noise.contains_key("noise_rms"), "{noise}");
        let start = r.line(false).unwrap();
        let end = r.line(true).unwrap();
        assert!(start
            .starts_with("calibration_runs,calibration=pedenoise,run_id=20261122T101502Z-3f9a "));
        assert!(
            start.trim_end().ends_with(" 1795000000123456789"),
            "{start}"
        );
        assert!(end.trim_end().ends_with(" 1795000010987654321"), "{end}");
        assert!(end.contains("event=\"end\""));
        let no_values = r.document(false);
        assert!(!no_values.to_string().contains("values:"));
        assert_eq!(r.marker(true)["time"], 1_795_000_010_987_654_321i64);
    }

    #[test]
    fn run_ids_are_readable_and_distinct() {
        let t = UtcNanos(1_795_000_000_123_456_789);
        let a = new_run_id(t);
        assert!(a.starts_with("20261118T110640Z-"), "{a}");
        assert_eq!(a.len(), "20261118T110640Z-0000".len());
        assert!(crate::config::is_identifier(&a));
    }
}
