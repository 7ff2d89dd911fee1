//! Real time-series databases on free ports: Debian's InfluxDB 1.6.7 (v1 API) and
//! VictoriaMetrics (accepts the InfluxDB v2 write API).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::{free_port, spawn_until, Proc};

/// An `influxd` with its data in a temp dir; restartable on the same port and data.
pub struct Influx {
    /// HTTP port.
    pub port: u16,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl Influx {
    /// Starts InfluxDB and creates database `dcs`.
    pub fn start() -> Influx {
        let dir = tempfile::tempdir().expect("tempdir");
        let (http, rpc) = (free_port(), free_port());
        let d = dir.path().display();
        let conf = format!(
            "bind-address = \"127.0.0.1:{rpc}\"\nreporting-disabled = true\n\
             [meta]\n  dir = \"{d}/meta\"\n[data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n\
             [http]\n  bind-address = \"127.0.0.1:{http}\"\n  log-enabled = false\n\
             [monitor]\n  store-enabled = false\n"
        );
        std::fs::write(dir.path().join("influxdb.conf"), conf).expect("influxdb.conf");
        let mut i = Influx {
            port: http,
            dir,
            proc: None,
        };
        i.restart();
        i.query("CREATE DATABASE dcs");
        i
    }

    /// (Re)starts the server on the same port and data.
    pub fn restart(&mut self) {
        let mut cmd = Command::new("influxd");
        cmd.args(["run", "-config"])
            .arg(self.dir.path().join("influxdb.conf"));
        self.proc = Some(spawn_until(
            cmd,
            "Listening on HTTP",
            Duration::from_secs(30),
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while ureq::get(format!("{}/ping", self.url())).call().is_err() {
            assert!(Instant::now() < deadline, "influxd not answering /ping");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the server (SIGKILL): an outage. Written data is in its WAL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs InfluxQL on database `dcs`, nanosecond epochs.
    pub fn query(&self, q: &str) -> serde_json::Value {
        let mut r = ureq::post(format!("{}/query", self.url()))
            .query("db", "dcs")
            .query("epoch", "ns")
            .query("q", q)
            .send_empty()
            .expect("InfluxQL query");
        serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("JSON")
    }

    /// Rows of the first series of a query as column -> value maps.
    pub fn rows(&self, q: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let v = self.query(q);
        let Some(series) = v["results"][0]["series"].as_array() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for s in series {
            let cols: Vec<String> = s["columns"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .map(|x| x.as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default();
            for row in s["values"].as_array().into_iter().flatten() {
                let mut m = serde_json::Map::new();
                for (c, v) in cols.iter().zip(row.as_array().into_iter().flatten()) {
                    m.insert(c.clone(), v.clone());
                }
                // Tags of GROUP BY * queries.
                if let Some(tags) = s["tags"].as_object() {
                    for (k, v) in tags {
                        m.insert(k.clone(), v.clone());
                    }
                }
                out.push(m);
            }
        }
        out
    }

    /// `field -> type` of a measurement (`SHOW FIELD KEYS`).
    pub fn field_types(&self, measurement: &str) -> Vec<(String, String)> {
        self.rows(&format!("SHOW FIELD KEYS FROM \"{measurement}\""))
            .into_iter()
            .map(|r| {
                (
                    r["fieldKey"].as_str().unwrap_or("").to_string(),
                    r["fieldType"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Polls `q` until `done(rows)` or `within` passes; returns the last rows.
    pub fn wait_rows(
        &self,
        q: &str,
        within: Duration,
        done: impl Fn(&[serde_json::Map<String, serde_json::Value>]) -> bool,
    ) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let deadline = Instant::now() + within;
        loop {
            let rows = self.rows(q);
            if done(&rows) || Instant::now() >= deadline {
                return rows;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A VictoriaMetrics server (InfluxDB v1 and v2 write APIs; read back by export).
pub struct Victoria {
    /// HTTP port.
    pub port: u16,
    _dir: tempfile::TempDir,
    _proc: Proc,
}

impl Victoria {
    /// Starts it on a free port.
    pub fn start() -> Victoria {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut cmd = Command::new("victoria-metrics");
        cmd.arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", dir.path().display()))
            .args(["-retentionPeriod=100y", "-search.latencyOffset=0s"]);
        let proc = spawn_until(cmd, "started VictoriaMetrics", Duration::from_secs(30));
        let v = Victoria {
            port,
            _dir: dir,
            _proc: proc,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while ureq::get(format!("{}/health", v.url())).call().is_err() {
            assert!(
                Instant::now() < deadline,
                "victoria-metrics not answering /health"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        v
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Series whose name matches the regex, from `/api/v1/export` (one JSON object per
    /// series: `metric`, `values`, `timestamps` in ms), polled until `done` or `within`.
    pub fn export(
        &self,
        name_regex: &str,
        within: Duration,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let _ = ureq::post(format!("{}/internal/force_flush", self.url())).send_empty();
            let series: Vec<serde_json::Value> = ureq::get(format!("{}/api/v1/export", self.url()))
                .query("match[]", format!("{{__name__=~\"{name_regex}\"}}"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .map(|t| {
                    t.lines()
                        .filter_map(|l| serde_json::from_str(l).ok())
                        .collect()
                })
                .unwrap_or_default();
            if done(&series) || Instant::now() >= deadline {
                return series;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// A MongoDB-wire server (SecantusDB's `secantusd-py`, from the venv `.ci/run` makes)
/// on a free port, in-memory: a restart starts empty.
pub struct Mongo {
    /// Port.
    pub port: u16,
    proc: Option<Proc>,
}

impl Mongo {
    /// Starts the server.
    pub fn start() -> Mongo {
        let mut m = Mongo {
            port: free_port(),
            proc: None,
        };
        m.restart();
        m
    }

    /// (Re)starts it on the same port.
    pub fn restart(&mut self) {
        let exe = std::env::var_os("DCS_SECANTUSD")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| crate::repo_root().join(".venv/bin/secantusd-py"));
        assert!(
            exe.exists(),
            "{} missing: run .ci/run (it installs SecantusDB into .venv)",
            exe.display()
        );
        let mut cmd = Command::new(exe);
        cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--storage-path", ":memory:"]);
        self.proc = Some(spawn_until(cmd, "listening on", Duration::from_secs(60)));
    }

    /// Kills it (SIGKILL): an outage.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// `mongodb://127.0.0.1:<port>`.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }
}
