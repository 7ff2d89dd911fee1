//! The telemetry forwarder as a process, for the tests and the bench.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{bin, repo_root, spawn_until, Broker, Observer, Proc, PASS, USER};

/// Longest wait for the forwarder.
const WAIT: Duration = Duration::from_secs(30);

/// A `telemetry` process with its own spool directory.
pub struct Forwarder {
    dir: tempfile::TempDir,
    config: PathBuf,
    /// Environment given to the process.
    pub env: Vec<(String, String)>,
    /// The running process.
    pub proc: Option<Proc>,
}

impl Forwarder {
    /// A forwarder on `broker` with `body` (inputs, output...) added to a test config:
    /// short batch interval, fast retries, stats every second.
    pub fn with_config(broker: &Broker, body: &str) -> Forwarder {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("telemetry.yaml");
        std::fs::write(
            &config,
            format!(
                "mqtt: {{url: '{}', username: {USER}, password: {PASS}, keep_alive_secs: 5}}\n\
                 spool: {{dir: spool, segment_bytes: 65536, max_bytes: 104857600}}\n\
                 batch: {{size: 500, interval_ms: 200}}\n\
                 retry: {{initial_ms: 100, max_secs: 1}}\n\
                 stats_interval_secs: 1\n{body}",
                broker.url()
            ),
        )
        .unwrap();
        Forwarder {
            dir,
            config,
            env: Vec::new(),
            proc: None,
        }
    }

    /// The shipped `deploy/telemetry.yaml`, pointed at `broker` and `influx_url` through
    /// the environment, as a deployment would.
    pub fn shipped(broker: &Broker, influx_url: &str) -> Forwarder {
        Self::shipped_with(broker, influx_url, &[])
    }

    /// Like [`Forwarder::shipped`], with text replacements in the file (`(from, to)`).
    pub fn shipped_with(broker: &Broker, influx_url: &str, edits: &[(&str, &str)]) -> Forwarder {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = std::fs::read_to_string(repo_root().join("deploy/telemetry.yaml"))
            .expect("deploy/telemetry.yaml");
        for (from, to) in edits {
            assert!(text.contains(from), "`{from}` not in deploy/telemetry.yaml");
            text = text.replace(from, to);
        }
        let config = dir.path().join("telemetry.yaml");
        std::fs::write(&config, text).expect("config");
        let env = vec![
            ("DCS_INFLUX_URL".into(), influx_url.to_string()),
            ("DCS_STATE_DIR".into(), dir.path().display().to_string()),
            ("DCS_MQTT_URL".into(), broker.url()),
            ("DCS_MQTT_USERNAME".into(), USER.into()),
            ("DCS_MQTT_PASSWORD".into(), PASS.into()),
        ];
        Forwarder {
            dir,
            config,
            env,
            proc: None,
        }
    }

    /// Starts (or restarts) the process.
    pub fn start(&mut self) {
        let mut cmd = Command::new(bin("telemetry"));
        cmd.arg("--config").arg(&self.config);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(spawn_until(cmd, "spool open", WAIT));
    }

    /// What it logged.
    pub fn stderr(&self) -> String {
        self.proc
            .as_ref()
            .map(|p| p.stderr_text())
            .unwrap_or_default()
    }

    /// Its spool directory.
    pub fn spool_dir(&self) -> PathBuf {
        if self.env.is_empty() {
            self.dir.path().join("spool")
        } else {
            self.dir.path().join("telemetry")
        }
    }
}

/// Waits until the forwarder's stats appear (its subscriptions are in place by then:
/// the session queues them before the retained stats) and returns them.
pub async fn stats(obs: &mut Observer, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = Value::Null;
    while let Some(got) = obs
        .next_on(
            "telemetry/stats",
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        )
        .await
    {
        last = serde_json::from_str(&got.payload).unwrap_or(Value::Null);
        if pred(&last) {
            return last;
        }
    }
    panic!("telemetry/stats never as expected; last: {last}");
}
