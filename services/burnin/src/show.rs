//! `dcs burnin show RUN_ID [--json] [--csv DIR]`: a run's timeline, its pauses and its
//! IV tables, from the run's file (`state_dir/runs/<id>.json`), the checkpoint of the
//! run in progress, or MongoDB; IV curves as CSV, one file per channel and scan.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use dcs_shared::UtcNanos;
use serde_json::Value as Json;

use crate::checkpoint::Checkpoints;
use crate::config::BurninConfig;
use crate::store::RunStore;

/// The run document `id`, and where it came from.
pub async fn fetch(cfg: &BurninConfig, id: &str) -> anyhow::Result<(Json, String)> {
    if let Ok(doc) = Checkpoints::run_document(&cfg.state_dir, id) {
        return Ok((doc, format!("{}/runs/{id}.json", cfg.state_dir.display())));
    }
    if let Some(doc) = Checkpoints::peek(&cfg.state_dir).filter(|d| d["id"] == id) {
        return Ok((doc, "the checkpoint of the run in progress".into()));
    }
    match cfg.mongodb.effective() {
        Some(m) => {
            let store = RunStore::new(&m).await.map_err(anyhow::Error::msg)?;
            match store.find(id).await.map_err(anyhow::Error::msg)? {
                Some(doc) => Ok((doc, format!("MongoDB {}.{}", m.database, m.collection))),
                None => anyhow::bail!(
                    "no run `{id}` in {}/runs nor in MongoDB {}.{}",
                    cfg.state_dir.display(),
                    m.database,
                    m.collection
                ),
            }
        }
        None => anyhow::bail!(
            "no run `{id}` in {}/runs (and no MongoDB configured: mongodb.uri or DCS_MONGODB_URI)",
            cfg.state_dir.display()
        ),
    }
}

fn ns(v: &Json) -> String {
    v.as_i64().filter(|n| *n >= 0).map_or_else(
        || "-".into(),
        |n| {
            let t: String = UtcNanos(n).to_string().chars().take(19).collect();
            t.replace('T', " ")
        },
    )
}

fn secs(a: &Json, b: &Json) -> String {
    match (a.as_i64(), b.as_i64()) {
        (Some(a), Some(b)) => format_secs((b - a) as f64 / 1e9),
        _ => "-".into(),
    }
}

fn format_secs(s: f64) -> String {
    if s >= 3600.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s >= 60.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.1} s")
    }
}

/// The worst (highest) fresh value of environment input `name` in a snapshot.
fn env_max(env: &Json, name: &str) -> Option<f64> {
    env["env"][name]
        .as_array()?
        .iter()
        .filter_map(|s| s["value"].as_f64())
        .reduce(f64::max)
}

/// The run as text: header, steps, pauses, IV tables.
pub fn render(doc: &Json) -> String {
    let mut o = String::new();
    let state = doc["state"]["state"].as_str().unwrap_or("?");
    let _ = writeln!(
        o,
        "run {}  sequence {}  {}  operator {}  modules {}",
        doc["id"].as_str().unwrap_or("?"),
        doc["sequence"].as_str().unwrap_or("?"),
        state,
        doc["operator"].as_str().unwrap_or("?"),
        doc["modules"]
            .as_array()
            .map(|m| m
                .iter()
                .filter_map(Json::as_str)
                .collect::<Vec<_>>()
                .join(","))
            .unwrap_or_default()
    );
    if let Some(r) = doc["state"]["reason"].as_str() {
        let _ = writeln!(o, "reason: {r}");
    }
    let _ = writeln!(
        o,
        "start {}  end {}  duration {}  steps {}/{}",
        ns(&doc["start_ns"]),
        ns(&doc["end_ns"]),
        secs(&doc["start_ns"], &doc["end_ns"]),
        doc["index"],
        doc["total"]
    );
    let _ = writeln!(o, "\nsteps:");
    for s in doc["steps"].as_array().into_iter().flatten() {
        let mut extra = String::new();
        if let Some(id) = s["data"]["ph2acf_run_id"].as_str() {
            extra = format!(
                "  ph2acf run {id} {}",
                s["data"]["status"].as_str().unwrap_or("")
            );
        }
        let _ = writeln!(
            o,
            "  {}  {:>9}  {:<12} {}{}",
            ns(&s["start_ns"]),
            secs(&s["start_ns"], &s["end_ns"]),
            s["outcome"].as_str().unwrap_or("?"),
            s["path"].as_str().unwrap_or("?"),
            extra
        );
    }
    let pauses = doc["pauses"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(o, "\npauses: {}", pauses.len());
    for p in &pauses {
        let _ = writeln!(
            o,
            "  {}  {:>9}  at {}: {}",
            ns(&p["start_ns"]),
            secs(&p["start_ns"], &p["end_ns"]),
            p["step"].as_str().unwrap_or("?"),
            p["reason"].as_str().unwrap_or("?")
        );
    }
    for s in doc["steps"].as_array().into_iter().flatten() {
        let Some(curves) = s["data"]["iv"].as_object() else {
            continue;
        };
        for (ch, c) in curves {
            let _ = writeln!(
                o,
                "\nIV {} channel {ch} ({}):",
                s["path"].as_str().unwrap_or("?"),
                c["end"].as_str().unwrap_or("?")
            );
            let _ = writeln!(
                o,
                "  {:>8} {:>9} {:>10} {:>8} {:>6} {:>8}",
                "V set", "V", "I (uA)", "T coolant", "RH %", "dew"
            );
            for p in c["points"].as_array().into_iter().flatten() {
                let f = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
                let _ = writeln!(
                    o,
                    "  {:>8} {:>9} {:>10} {:>8} {:>6} {:>8}",
                    f(p["v_set"].as_f64(), 1),
                    f(p["v"].as_f64(), 2),
                    f(p["i_ua"].as_f64(), 4),
                    f(p["env"]["coolant"]["temp"].as_f64(), 2),
                    f(env_max(&p["env"], "humidity"), 1),
                    f(env_max(&p["env"], "dew_point"), 2),
                );
            }
        }
    }
    o
}

/// Writes each IV curve as `<run>_<step index>_ch<channel>.csv` in `dir`: timestamp
/// (RFC 3339 and ns), V set, V, I, the coolant temperature and, for each environment
/// input, its highest fresh value at that point (empty when missing).
pub fn export_csv(doc: &Json, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let id = doc["id"].as_str().unwrap_or("run");
    let mut files = Vec::new();
    for s in doc["steps"].as_array().into_iter().flatten() {
        let Some(curves) = s["data"]["iv"].as_object() else {
            continue;
        };
        for (ch, c) in curves {
            let points = c["points"].as_array().cloned().unwrap_or_default();
            let mut names: Vec<String> = points
                .first()
                .and_then(|p| p["env"]["env"].as_object())
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            names.sort();
            let mut text = String::from("time,t_ns,v_set,v,i_ua,coolant_temp");
            for n in &names {
                text.push(',');
                text.push_str(n);
            }
            text.push('\n');
            let f = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
            for p in &points {
                let _ = write!(
                    text,
                    "{},{},{},{},{},{}",
                    p["t_ns"]
                        .as_i64()
                        .filter(|n| *n >= 0)
                        .map_or(String::new(), |n| UtcNanos(n).to_string()),
                    p["t_ns"],
                    f(p["v_set"].as_f64()),
                    f(p["v"].as_f64()),
                    f(p["i_ua"].as_f64()),
                    f(p["env"]["coolant"]["temp"].as_f64())
                );
                for n in &names {
                    let _ = write!(text, ",{}", f(env_max(&p["env"], n)));
                }
                text.push('\n');
            }
            let file = dir.join(format!("{id}_{}_ch{ch}.csv", s["index"]));
            std::fs::write(&file, text)?;
            files.push(file);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Json {
        json!({
            "id": "BI-1", "sequence": "short", "operator": "ana", "modules": ["m0"],
            "state": {"state": "done"}, "start_ns": 1_800_000_000_000_000_000i64,
            "end_ns": 1_800_000_100_000_000_000i64, "index": 2, "total": 2,
            "steps": [
                {"index": 0, "path": "step 1 soak", "kind": "soak", "outcome": "done",
                 "start_ns": 1_800_000_000_000_000_000i64, "end_ns": 1_800_000_010_000_000_000i64},
                {"index": 1, "path": "step 2 iv_scan", "kind": "iv_scan", "outcome": "done",
                 "start_ns": 1_800_000_010_000_000_000i64, "end_ns": 1_800_000_100_000_000_000i64,
                 "data": {"iv": {"0": {"end": "compliance", "points": [
                    {"t_ns": 1_800_000_020_000_000_000i64, "v_set": 10.0, "v": 10.01, "i_ua": 0.1,
                     "env": {"coolant": {"temp": -33.9}, "env": {
                        "humidity": [{"value": 4.0}, {"value": 6.5}],
                        "dew_point": [{"value": null, "stale": true}]}}}
                 ]}}}}
            ],
            "pauses": [{"reason": "interlock ALARM", "step": "step 2 iv_scan",
                        "start_ns": 1_800_000_050_000_000_000i64, "end_ns": 1_800_000_080_000_000_000i64}]
        })
    }

    #[test]
    fn the_table_shows_steps_pauses_and_iv_points() {
        let t = render(&doc());
        assert!(t.contains("run BI-1  sequence short  done"), "{t}");
        assert!(t.contains("1.5 min"), "{t}");
        assert!(t.contains("interlock ALARM"), "{t}");
        assert!(t.contains("30.0 s"), "{t}");
        assert!(
            t.contains("IV step 2 iv_scan channel 0 (compliance)"),
            "{t}"
        );
        assert!(t.contains("10.01"), "{t}");
        assert!(t.contains("6.5"), "{t}");
    }

    #[test]
    fn csv_has_one_file_per_channel_and_missing_values_empty() {
        let d = tempfile::tempdir().unwrap();
        let files = export_csv(&doc(), d.path()).unwrap();
        assert_eq!(files.len(), 1);
        let text = std::fs::read_to_string(&files[0]).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "time,t_ns,v_set,v,i_ua,coolant_temp,dew_point,humidity"
        );
        assert!(
            lines[1].ends_with(",10,10.01,0.1,-33.9,,6.5"),
            "{}",
            lines[1]
        );
    }
}
