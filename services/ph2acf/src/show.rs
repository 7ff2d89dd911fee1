//! `dcs run show <run_id>`: the run document from MongoDB (or, while it waits for a
//! database, from the bridge's local queue) joined with the environment during the run
//! from InfluxDB (the measurements of `environment:`), using the very instants stored
//! in the document.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use dcs_shared::influx::InfluxWriter;
use dcs_shared::UtcNanos;
use mongodb::bson::{Bson, Document};
use serde::Serialize;
use serde_json::Value;

use crate::config::BridgeConfig;
use crate::record::RunRecord;
use crate::store::MongoStore;

/// One InfluxDB series during the run.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Measurement.
    pub measurement: String,
    /// Tags of the series.
    pub tags: BTreeMap<String, String>,
    /// Column names (`time` first, nanoseconds).
    pub columns: Vec<String>,
    /// Rows.
    pub values: Vec<Vec<Value>>,
}

/// A run and its environment.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    /// Where the document was read: MongoDB, or the local queue.
    pub source: String,
    /// The run document (relaxed extended JSON).
    pub run: Value,
    /// Start and end instants queried, ns.
    pub window_ns: (i64, i64),
    /// Series, by measurement then tags.
    pub environment: Vec<Series>,
    /// Measurements that could not be read, with why.
    pub unavailable: BTreeMap<String, String>,
}

fn ns(doc: &Document, key: &str) -> Option<i64> {
    match doc.get(key)? {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(*v as i64),
        _ => None,
    }
}

/// Parses a `/query` answer into series of `measurement`.
pub fn parse_series(answer: &Value) -> Vec<Series> {
    let mut out = Vec::new();
    let Some(series) = answer
        .pointer("/results/0/series")
        .and_then(Value::as_array)
    else {
        return out;
    };
    for s in series {
        let tags = s
            .get("tags")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .filter(|(_, v)| !v.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let strings = |v: Option<&Value>| -> Vec<String> {
            v.and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        out.push(Series {
            measurement: s
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            tags,
            columns: strings(s.get("columns")),
            values: s
                .get("values")
                .and_then(Value::as_array)
                .map(|rows| rows.iter().filter_map(|r| r.as_array().cloned()).collect())
                .unwrap_or_default(),
        });
    }
    out
}

/// The latest record of `run_id` still in the bridge's queue for MongoDB (a run has a
/// record at its start and one at its end), as its document.
pub fn queued(cfg: &BridgeConfig, run_id: &str) -> anyhow::Result<Option<Document>> {
    let dir = cfg.queue_dir.join("mongodb");
    let mut latest = None;
    let r = dcs_shared::spool::pending_records(&dir, &mut |b| {
        if let Ok(rec) = serde_json::from_slice::<RunRecord>(&b) {
            if rec.run_id == run_id {
                latest = Some(rec);
            }
        }
    });
    match r {
        Ok(()) => {}
        Err(dcs_shared::spool::SpoolError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot read the queue {}: {e}", dir.display()),
    }
    Ok(latest.map(|r| r.document(true)))
}

/// Reads run `run_id` and its environment. A record still in the local queue is newer
/// than what MongoDB holds (the queue delivers in order), so it comes first; MongoDB is
/// asked only when the queue has nothing of the run.
pub async fn fetch(cfg: &BridgeConfig, run_id: &str) -> anyhow::Result<RunView> {
    let queue = cfg.queue_dir.join("mongodb");
    let (doc, source) = match (queued(cfg, run_id)?, cfg.mongodb()) {
        (Some(doc), mongo) => {
            let why = if mongo.is_some() {
                "not yet in MongoDB"
            } else {
                "no MongoDB configured"
            };
            (doc, format!("the local queue {} ({why})", queue.display()))
        }
        (None, Some(mongo)) => {
            let store = MongoStore::new(&mongo).await.map_err(anyhow::Error::msg)?;
            let found = store.find(run_id).await.map_err(|e| {
                anyhow::anyhow!(
                    "no run `{run_id}` in the local queue {}, and MongoDB: {e}",
                    queue.display()
                )
            })?;
            match found {
                Some(doc) => (doc, format!("MongoDB ({}.{})", mongo.database, mongo.collection)),
                None => anyhow::bail!(
                    "no run `{run_id}` in MongoDB ({}.{}) nor in the local queue {}",
                    mongo.database,
                    mongo.collection,
                    queue.display()
                ),
            }
        }
        (None, None) => anyhow::bail!(
            "no MongoDB configured (mongodb.uri or DCS_MONGODB_URI), and no run `{run_id}` in the local queue {}",
            queue.display()
        ),
    };
    let start = ns(&doc, "start_time_ns")
        .ok_or_else(|| anyhow::anyhow!("run `{run_id}` has no start_time_ns"))?;
    // A run still going (or whose end is not recorded yet) is shown up to now.
    let end = ns(&doc, "end_time_ns").unwrap_or_else(|| UtcNanos::now().as_nanos());
    let mut view = RunView {
        source,
        run: Bson::Document(doc).into_relaxed_extjson(),
        window_ns: (start, end),
        environment: Vec::new(),
        unavailable: BTreeMap::new(),
    };
    let Some(influx) = cfg.influx() else {
        view.unavailable
            .insert("*".into(), "no InfluxDB configured".into());
        return Ok(view);
    };
    let measurements = cfg.environment.clone();
    let (series, unavailable) = tokio::task::spawn_blocking(move || {
        let reader = InfluxWriter::new(influx);
        let mut series = Vec::new();
        let mut unavailable = BTreeMap::new();
        for m in measurements {
            let q = format!(
                "SELECT * FROM \"{}\" WHERE time >= {start} AND time <= {end} GROUP BY *",
                m.replace('"', "")
            );
            match reader.query(&q) {
                Ok(answer) => series.extend(parse_series(&answer)),
                Err(e) => {
                    unavailable.insert(m, e.to_string());
                }
            }
        }
        (series, unavailable)
    })
    .await?;
    view.environment = series;
    view.unavailable = unavailable;
    Ok(view)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn fmt_ns(v: Option<&Value>) -> String {
    v.and_then(Value::as_i64)
        .map(|n| UtcNanos(n).to_string())
        .unwrap_or_else(|| "-".into())
}

/// The view as text for a terminal: the run, its chips, and per series and field the
/// number of points, min, mean, max and last value.
pub fn render_table(v: &RunView) -> String {
    let r = &v.run;
    let g = |k: &str| r.get(k).map(text).unwrap_or_else(|| "-".into());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {}  {}  {}",
        g("run_id"),
        g("calibration"),
        g("status")
    );
    let _ = writeln!(out, "  from {}", v.source);
    let _ = writeln!(
        out,
        "  run number {}, config {}, modules {}, operator {}",
        g("run_number"),
        g("config"),
        r.get("modules")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
        g("operator")
    );
    let _ = writeln!(
        out,
        "  start {}  end {}  duration {} s",
        fmt_ns(r.get("start_time_ns")),
        fmt_ns(r.get("end_time_ns")),
        g("duration_s")
    );
    if let Some(e) = r.get("error").filter(|e| !e.is_null()) {
        let _ = writeln!(out, "  error: {}", text(e));
    }
    if let Some(chips) = r.get("chips").and_then(Value::as_array) {
        let _ = writeln!(out, "  chips: {}", chips.len());
        for c in chips {
            let mut line = format!("    {:<24}", c.get("name").map(text).unwrap_or_default());
            if let Some(res) = c.get("results").and_then(Value::as_object) {
                for (name, col) in res {
                    let _ = write!(
                        line,
                        " {name} mean {} rms {}",
                        col.get("mean")
                            .and_then(Value::as_f64)
                            .map_or("-".into(), |x| format!("{x:.3}")),
                        col.get("rms")
                            .and_then(Value::as_f64)
                            .map_or("-".into(), |x| format!("{x:.3}")),
                    );
                }
            }
            let _ = writeln!(out, "{line}");
        }
    }
    if let Some(files) = r.get("files").and_then(Value::as_array) {
        let names: Vec<String> = files
            .iter()
            .map(|f| {
                format!(
                    "{} ({} B)",
                    f.get("name").map(text).unwrap_or_default(),
                    f.get("bytes").map(text).unwrap_or_default()
                )
            })
            .collect();
        let _ = writeln!(out, "  files (GridFS): {}", names.join(", "));
    }
    let points: usize = v.environment.iter().map(|s| s.values.len()).sum();
    let _ = writeln!(
        out,
        "\nenvironment during the run ({points} points from InfluxDB):"
    );
    let _ = writeln!(
        out,
        "{:<12} {:<28} {:<16} {:>5} {:>12} {:>12} {:>12} {:>12}",
        "measurement", "series", "field", "n", "min", "mean", "max", "last"
    );
    for s in &v.environment {
        let series = if s.tags.is_empty() {
            "-".to_string()
        } else {
            s.tags
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        for (i, col) in s.columns.iter().enumerate().skip(1) {
            let vals: Vec<&Value> = s
                .values
                .iter()
                .filter_map(|row| row.get(i))
                .filter(|x| !x.is_null())
                .collect();
            if vals.is_empty() {
                continue;
            }
            let nums: Vec<f64> = vals.iter().filter_map(|x| x.as_f64()).collect();
            let last = vals.last().map(|x| text(x)).unwrap_or_default();
            let (min, mean, max) = if nums.len() == vals.len() {
                let mean = nums.iter().sum::<f64>() / nums.len() as f64;
                (
                    format!("{:.4}", nums.iter().copied().fold(f64::INFINITY, f64::min)),
                    format!("{mean:.4}"),
                    format!(
                        "{:.4}",
                        nums.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                    ),
                )
            } else {
                ("-".into(), "-".into(), "-".into())
            };
            let _ = writeln!(
                out,
                "{:<12} {:<28} {:<16} {:>5} {:>12} {:>12} {:>12} {:>12}",
                s.measurement,
                series,
                col,
                vals.len(),
                min,
                mean,
                max,
                last
            );
        }
    }
    for (m, why) in &v.unavailable {
        let _ = writeln!(out, "{m}: not read: {why}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn influx_answer_to_series_and_table() {
        let answer: Value = serde_json::from_str(
            r#"{"results":[{"statement_id":0,"series":[
                {"name":"chiller","columns":["time","internal_temp","fsm_state"],
                 "values":[[1,-20.5,"ON"],[2,-19.5,"ON"]]},
                {"name":"channels","tags":{"id":"1","module":""},"columns":["time","lv_vMon"],
                 "values":[[1,10.5]]}]}]}"#,
        )
        .unwrap();
        let s = parse_series(&answer);
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].tags.len(), 1, "empty tags dropped");
        let view = RunView {
            source: "MongoDB (dcs.runs)".into(),
            run: serde_json::json!({"run_id": "r1", "calibration": "pedenoise", "status": "done",
                "start_time_ns": 1, "end_time_ns": 2, "modules": ["M1"]}),
            window_ns: (1, 2),
            environment: s,
            unavailable: BTreeMap::new(),
        };
        let t = render_table(&view);
        assert!(t.contains("run r1  pedenoise  done"), "{t}");
        assert!(t.contains("3 points"), "{t}");
        let chiller = t.lines().find(|l| l.contains("internal_temp")).unwrap();
        assert!(chiller.contains("-20.0000"), "mean: {chiller}");
        assert!(t
            .lines()
            .any(|l| l.contains("fsm_state") && l.trim_end().ends_with("ON")));
        assert!(parse_series(&serde_json::json!({"results":[{}]})).is_empty());
    }
}
