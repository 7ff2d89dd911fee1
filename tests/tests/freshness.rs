//! Freshness of the chiller's status (issue 15): a chiller that stops answering while
//! powered must never look running, and the interlock's cooling rule must see its
//! last reading age from when it was measured, not from when a message last arrived.
//!
//! Real processes on free ports: dcs-broker, julabo-sim, julabo, and the interlock
//! with one rule (`cooling_required`). No CAEN: LV is then unknown, so a chiller not
//! known to run is unsafe and raises the cooling alarm.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcs_integration_tests::{
    bin, spawn_until, start_julabo_sim, Broker, BrokerKind, Observer, Proc, PASS, USER,
};
use dcs_shared::UtcNanos;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
/// The interlock's `max_age_secs` of `running`.
const MAX_AGE_SECS: u64 = 5;
/// After the fault began, a `running: true` can only be a message still on its way:
/// a poll in flight fails at its next query (9 queries of 40 ms + 300 ms timeout), so
/// anything later would be an old reading published again. Generous for shared
/// machines; the `measured_at` check below is exact.
const MARGIN: Duration = Duration::from_secs(3);

/// How the unit stops answering.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// julabo-sim's control port: `silent on` (the unit is powered, replies nothing).
    Silent,
    /// SIGSTOP of julabo-sim: the line stays open and accepts bytes, nothing answers.
    Stopped,
}

struct Stack {
    broker: Broker,
    sim: Proc,
    control: u16,
    _julabo: Proc,
    _interlock: Proc,
    _dir: tempfile::TempDir,
}

impl Stack {
    fn start() -> Stack {
        let broker = Broker::start(BrokerKind::Dcs);
        let dir = tempfile::tempdir().expect("tempdir");
        let (sim, tcp, control) = start_julabo_sim(30);
        let julabo = start_julabo(dir.path(), tcp, &broker);
        let interlock = start_interlock(dir.path(), &broker);
        Stack {
            broker,
            sim,
            control,
            _julabo: julabo,
            _interlock: interlock,
            _dir: dir,
        }
    }

    /// Sends a line to julabo-sim's control port; its answer.
    fn ctl(&self, line: &str) -> String {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.control)).expect("control");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s.write_all(format!("{line}\n").as_bytes())
            .expect("control write");
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .expect("control answer");
        answer.trim().to_string()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.sim.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal julabo-sim");
    }

    fn fault(&self, f: Fault, on: bool) {
        use nix::sys::signal::Signal;
        match (f, on) {
            (Fault::Silent, on) => {
                let line = if on { "silent on" } else { "silent off" };
                assert_eq!(self.ctl(line), "ok");
            }
            (Fault::Stopped, true) => self.signal(Signal::SIGSTOP),
            (Fault::Stopped, false) => self.signal(Signal::SIGCONT),
        }
    }
}

fn start_julabo(dir: &Path, tcp: u16, broker: &Broker) -> Proc {
    let cfg = dir.join("julabo.yaml");
    std::fs::write(
        &cfg,
        format!(
            "name: julabo\nport: tcp://127.0.0.1:{tcp}\n\
             timing: {{min_spacing_ms: 40, poll_interval_secs: 0.5, reply_timeout_ms: 300, failures_before_reconnect: 2}}\n\
             serial: {{baud: 115200}}\nlimits: {{temp_min: -30, temp_max: 40}}\n\
             mqtt: {{url: {}, username: {USER}, password: {PASS}, keep_alive_secs: 5}}\n",
            broker.url()
        ),
    )
    .expect("julabo config");
    let mut cmd = Command::new(bin("julabo"));
    cmd.arg("--config").arg(&cfg);
    spawn_until(cmd, "connected to MQTT broker", WAIT)
}

fn start_interlock(dir: &Path, broker: &Broker) -> Proc {
    let file = dir.join("interlock.yaml");
    std::fs::write(
        &file,
        format!(
            r#"
mqtt: {{url: "{}", username: {USER}, password: {PASS}, keep_alive_secs: 5}}
targets: {{caen: dcs, chiller: julabo, max_age_secs: 60}}
inputs:
  running: {{topic: julabo/status, field: running, max_age_secs: {MAX_AGE_SECS}}}
timing: {{evaluate_ms: 100, republish_secs: 60}}
rules:
  cooling: {{kind: cooling_required, running: running, mode: refuse}}
permit_key_file: permit.key
"#,
            broker.url()
        ),
    )
    .expect("interlock config");
    let mut cmd = Command::new(bin("interlock"));
    cmd.arg("--config").arg(&file);
    spawn_until(cmd, "connected to the broker", WAIT)
}

/// Every `julabo/status` with the instant it was received, collected by its own
/// client until the returned flag is set (or after two minutes at most).
type Received = Arc<Mutex<Vec<(Instant, Value)>>>;

async fn collect_status(port: u16) -> (Received, Arc<std::sync::atomic::AtomicBool>) {
    let mut obs = Observer::connect(port, "status-collector", &["julabo/status"]).await;
    let got: Received = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (g, s) = (got.clone(), stop.clone());
    tokio::spawn(async move {
        let end = Instant::now() + Duration::from_secs(120);
        while !s.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < end {
            if let Some(m) = obs
                .next_on("julabo/status", Duration::from_millis(200))
                .await
            {
                let v = serde_json::from_str(&m.payload).unwrap_or(Value::Null);
                if let Ok(mut g) = g.lock() {
                    g.push((Instant::now(), v));
                }
            }
        }
    });
    (got, stop)
}

/// The next JSON message on `topic` satisfying `pred`, within [`WAIT`].
async fn wait_json(
    obs: &mut Observer,
    topic: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    obs.wait_json(topic, WAIT, what, pred).await
}

fn is_running(v: &Value) -> bool {
    v["running"] == true
}

async fn chiller_stops_answering_while_running(fault: Fault) {
    let st = Stack::start();
    let port = st.broker.port;
    let mut obs = Observer::connect(
        port,
        "operator",
        &["julabo/status", "julabo/reply", "alarms/cooling"],
    )
    .await;

    // Running, and the interlock content with it. (If the interlock saw it stopped
    // first, the cooling alarm was raised: acknowledged once normal, it clears.)
    obs.publish("julabo/cmd/start", "").await;
    let r = wait_json(&mut obs, "julabo/reply", "the reply to start", |v| {
        v["topic"] == "julabo/cmd/start"
    })
    .await;
    assert_eq!(r["ok"], true, "{r}");
    let s_running = wait_json(&mut obs, "julabo/status", "running", is_running).await;
    let s = &s_running;
    let at = s["measured_at"]
        .as_i64()
        .unwrap_or_else(|| panic!("measured_at, ns: {s}"));
    let drift = (UtcNanos::now().as_nanos() - at).abs();
    assert!(drift < 60_000_000_000, "measured_at {at} is not now: {s}");
    let normal = wait_json(&mut obs, "alarms/cooling", "a normal condition", |v| {
        v["condition"] == "normal"
    })
    .await;
    // (Started before the interlock saw it stopped, it never raised the alarm.)
    if normal["state"] != "cleared" {
        obs.publish(
            "alarms/cmd/ack",
            r#"{"rule": "cooling", "operator": "test"}"#,
        )
        .await;
        wait_json(&mut obs, "alarms/cooling", "a cleared alarm", |v| {
            v["state"] == "cleared"
        })
        .await;
    }

    // The unit stops answering.
    let (received, stop) = collect_status(port).await;
    obs.discard("julabo/status");
    obs.discard("alarms/cooling");
    let fault_wall = UtcNanos::now();
    let fault_at = Instant::now();
    st.fault(fault, true);

    // The status says so: nothing read, and why.
    let s = wait_json(&mut obs, "julabo/status", "null readings", |v| {
        v["running"].is_null() && v["error"].is_string()
    })
    .await;
    for k in [
        "status_code",
        "internal_temp",
        "external_temp",
        "setpoint_1",
        "power",
        "measured_at",
    ] {
        assert!(s[k].is_null(), "{k} while the unit does not answer: {s}");
    }
    assert!(
        s["error"].as_str().unwrap_or("").contains("no reply"),
        "{s}"
    );

    // The last reading goes stale after max_age although julabo keeps publishing.
    let a = wait_json(&mut obs, "alarms/cooling", "an active alarm", |v| {
        v["state"] == "active" && v["condition"] == "unsafe"
    })
    .await;
    let m = a["message"].as_str().unwrap_or("");
    assert!(m.contains("running (julabo/status): stale"), "{a}");

    // Keep watching a few polls more: reopens of the line must not bring it back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let received = received.lock().map(|g| g.clone()).unwrap_or_default();
    // Not before max_age either: the last running reading aged out, a null did not
    // count as unsafe by itself.
    let last_running = received
        .iter()
        .map(|(_, v)| v)
        .chain([&s_running])
        .filter(|v| is_running(v))
        .filter_map(|v| v["measured_at"].as_i64())
        .max()
        .unwrap_or(0);
    let first_seen = a["first_seen_ns"].as_i64().unwrap_or(0);
    assert!(
        first_seen - last_running >= MAX_AGE_SECS as i64 * 1_000_000_000 - 200_000_000,
        "alarm raised {} ms after the last running reading: {a}",
        (first_seen - last_running) / 1_000_000
    );
    assert!(
        received.len() >= 4,
        "julabo must keep publishing (nulls, and why) while the unit does not answer: {received:?}"
    );
    for (t, v) in &received {
        if !is_running(v) {
            continue;
        }
        // Only a reading measured before the fault may say running ...
        let at = v["measured_at"].as_i64().unwrap_or(i64::MAX);
        assert!(
            at < fault_wall.as_nanos(),
            "running: true measured after the unit stopped answering ({fault:?}): {v}"
        );
        // ... and only while it was still on its way.
        assert!(
            t.saturating_duration_since(fault_at) <= MARGIN,
            "running: true {:?} after the unit stopped answering ({fault:?}): {v}",
            t.saturating_duration_since(fault_at)
        );
    }

    // The unit answers again: a new reading, measured after it came back, and the
    // condition is normal again (the alarm stays latched until acknowledged).
    let back_wall = UtcNanos::now();
    st.fault(fault, false);
    let s = wait_json(&mut obs, "julabo/status", "a new reading", |v| {
        is_running(v)
            && v["measured_at"]
                .as_i64()
                .is_some_and(|t| t >= back_wall.as_nanos())
    })
    .await;
    assert!(s["error"].is_null(), "{s}");
    wait_json(&mut obs, "alarms/cooling", "a normal condition", |v| {
        v["condition"] == "normal"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_chiller_is_never_published_running_and_goes_stale() {
    chiller_stops_answering_while_running(Fault::Silent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_chiller_simulator_is_never_published_running_and_goes_stale() {
    chiller_stops_answering_while_running(Fault::Stopped).await;
}
