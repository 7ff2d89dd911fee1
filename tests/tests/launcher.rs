//! The `dcs` launcher as a user runs it: `dcs check` on good and broken configs, and
//! `dcs up` supervising the broker (crash -> restart), answering on MQTT, stopping
//! cleanly on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dcs_integration_tests::{bin, free_port, repo_root, spawn_until, Observer};

const WAIT: Duration = Duration::from_secs(20);

fn check(config: &Path) -> (i32, String) {
    let out = Command::new(bin("dcs"))
        .args(["check", "--config"])
        .arg(config)
        .env("DCS_STATE_DIR", "/nonexistent-state")
        .output()
        .expect("run dcs check");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn shipped_config_checks_ok() {
    let (code, text) = check(&repo_root().join("deploy/dcs.yaml"));
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(
            "OK (broker, caen-sim, env-sim, julabo-sim, marta-sim, ph2acf-sim, burnin, caen-fsm, \
             interlock, julabo, marta, notifier, ph2acf-bridge, telemetry)"
        ),
        "{text}"
    );
}

#[test]
fn broken_configs_are_refused_with_a_precise_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("broker:\n  listeners: [oops\n", &["line 2"]),
        (
            "services:\n  caen-fms: {}\n",
            &["services.caen-fms", "unknown service"],
        ),
        (
            "broker:\n  auth: {allow_anonymous: true}\n  limits:\n    segment_count: 1\n",
            &["broker.limits.segment_count", "line 4", "at least 2"],
        ),
        ("mqtt:\n  url: mqtt://localhost\n", &["mqtt.url", "no port"]),
        ("mqtt:\n  keep_alive_secs: 0\n", &["mqtt.keep_alive_secs"]),
        (
            "mqtt:\n  password: ${NO_SUCH_VAR_FOR_DCS}\n",
            &["line 2", "NO_SUCH_VAR_FOR_DCS is not set"],
        ),
        ("brokr: {}\n", &["unknown field `brokr`", "line 1"]),
        ("", &["empty"]),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let f = dir.path().join(format!("case{i}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        let (code, text) = check(&f);
        assert_eq!(code, 2, "case {i} should fail:\n{yaml}\n{text}");
        assert!(
            text.contains(&format!("case{i}.yaml")),
            "case {i}: file not named: {text}"
        );
        for e in *expected {
            assert!(text.contains(e), "case {i}: `{e}` missing from: {text}");
        }
    }
    let (code, text) = check(&dir.path().join("missing.yaml"));
    assert_eq!(code, 2);
    assert!(text.contains("cannot read file"), "{text}");
}

/// The shipped simulated stack (deploy/*.yaml: every service and simulator) in `dir`
/// with every port moved to a free one: the `dcs up --simulate` command and the
/// broker's port. `services`/`simulators`: the stack's lines naming them.
fn simulated_stack(dir: &Path, services: &str, simulators: &str) -> (Command, u16, PathBuf) {
    let (p4, sim_port, ctl_port) = (free_port(), free_port(), free_port());
    let deploy = repo_root().join("deploy");
    let copy = |f: &str, swaps: &[(&str, String)]| {
        let mut text = std::fs::read_to_string(deploy.join(f)).unwrap();
        for (from, to) in swaps {
            text = text.replace(from, to);
        }
        std::fs::write(dir.join(f), text).unwrap();
    };
    copy(
        "julabo-sim.yaml",
        &[
            ("127.0.0.1:5050", format!("127.0.0.1:{sim_port}")),
            ("127.0.0.1:5051", format!("127.0.0.1:{ctl_port}")),
        ],
    );
    // The shipped driver configs as they are (the julabo's 5 s poll included).
    for f in [
        "julabo.yaml",
        "telemetry.yaml",
        "interlock.yaml",
        "env-sim.yaml",
        "notifier.yaml",
        "marta.yaml",
        "marta-registers.yaml",
        "burnin.yaml",
    ] {
        copy(f, &[]);
    }
    std::fs::create_dir_all(dir.join("burnin")).unwrap();
    for f in ["short.yaml", "reference.yaml"] {
        copy(&format!("burnin/{f}"), &[]);
    }
    let (modbus, modbus_ctl) = (free_port(), free_port());
    copy(
        "marta-sim.yaml",
        &[
            ("127.0.0.1:5502", format!("127.0.0.1:{modbus}")),
            ("127.0.0.1:5503", format!("127.0.0.1:{modbus_ctl}")),
        ],
    );
    let (ca_port, beacon_port) = (free_port(), free_port());
    copy("caen.yaml", &[("port: 15064", format!("port: {ca_port}"))]);
    let ph2_port = free_port();
    for f in ["ph2acf.yaml", "ph2acf-sim.yaml"] {
        copy(f, &[("127.0.0.1:5000", format!("127.0.0.1:{ph2_port}"))]);
    }
    std::fs::create_dir_all(dir.join("ph2acf")).unwrap();
    std::fs::copy(
        deploy.join("ph2acf/PS_module.xml"),
        dir.join("ph2acf/PS_module.xml"),
    )
    .unwrap();
    let config = write_stack(
        dir,
        p4,
        None,
        None,
        &format!("services: {{{services}}}\nsimulators: {{{simulators}}}\n"),
    );
    let mut cmd = Command::new(bin("dcs"));
    cmd.args(["up", "--simulate", "--config"])
        .arg(&config)
        .env("JULABO_PORT", format!("tcp://127.0.0.1:{sim_port}"))
        .env("MARTA_PORT", modbus.to_string())
        .env("CAEN_CA_ADDR_LIST", format!("127.0.0.1:{ca_port}"))
        .env("EPICS_CAS_BEACON_PORT", beacon_port.to_string())
        .env("EPICS_CA_REPEATER_PORT", beacon_port.to_string())
        .env("DCS_STATE_DIR", dir.join("state"))
        .env_remove("DCS_INFLUX_URL")
        .env_remove("DCS_MONGODB_URI")
        .env_remove("DCS_LOG")
        .env_remove("DCS_LOG_FORMAT")
        .env_remove("RUST_LOG");
    (cmd, p4, config)
}

/// The whole-stack tests take turns: two stacks of a dozen processes at once on a
/// 2-core machine would test the machine, not the stack.
static WHOLE_STACK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `dcs up --simulate` with the shipped configs (ports moved to free ones): the
/// simulators and the drivers come up under the launcher and report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_simulate_runs_the_services_with_their_simulators() {
    let _turn = WHOLE_STACK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (cmd, p4, config) = simulated_stack(
        dir.path(),
        "caen-fsm: {config: caen.yaml}, julabo: {config: julabo.yaml}, \
         telemetry: {config: telemetry.yaml}, interlock: {config: interlock.yaml}, \
         ph2acf-bridge: {config: ph2acf.yaml}",
        "caen-sim: {config: caen.yaml}, julabo-sim: {config: julabo-sim.yaml}, \
         env-sim: {config: env-sim.yaml}, ph2acf-sim: {config: ph2acf-sim.yaml}",
    );
    let mut up = spawn_until(cmd, "dcs: up;", WAIT);
    let secret = std::fs::read_to_string(dir.path().join("state/secret")).unwrap();
    let mut o = Observer::connect_as(
        p4,
        "obs",
        "alice",
        secret.trim(),
        &[
            "julabo/status",
            "ph2acf/status",
            "dcs-launcher/status",
            "telemetry/stats",
            "dcs/status",
            "interlock/status",
            "interlock/permits",
        ],
    )
    .await;
    o.wait_for("dcs/status", WAIT, |p| p.contains("\"LV_OFF\""))
        .await
        .unwrap_or_else(|| {
            panic!(
                "caen-fsm never reported LV_OFF from the simulator; launcher said:\n{}",
                up.stderr_text()
            )
        });
    let g = o
        .wait_for("julabo/status", WAIT, |p| {
            p.contains("\"fsm_state\":\"OFF\"")
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "julabo never reported OFF; launcher said:\n{}",
                up.stderr_text()
            )
        });
    let v: serde_json::Value = serde_json::from_str(&g.payload).unwrap();
    assert_eq!(v["status_code"], 2);
    // The interlock sees the simulated sensor boards and chiller: every rule known and
    // normal, and LV refused until the chiller circulates.
    o.wait_for("interlock/status", WAIT, |p| p.contains("\"state\":\"OK\""))
        .await
        .unwrap_or_else(|| panic!("interlock never OK; launcher said:\n{}", up.stderr_text()));
    o.wait_for("interlock/permits", WAIT, |p| {
        p.contains("\"lv_on\":false") && p.contains("cooling required")
    })
    .await
    .expect("LV refused while the chiller is stopped");
    // Each service logs in with an account of its own, named as its client id: the
    // stack's account cannot connect as `interlock`, and a permit it publishes is not
    // obeyed (it is not signed with the interlock's key).
    for id in ["interlock", "julabo", "telemetry", "env-sim", "ph2acf"] {
        let f = dir.path().join(format!("state/mqtt-{id}.secret"));
        assert!(f.exists(), "no account for {id}: {}", f.display());
    }
    let r = dcs_integration_tests::connack(p4, "interlock", "alice", secret.trim(), None).await;
    assert!(r.is_err(), "the stack account connected as `interlock`");
    o.publish_acked("interlock/permits", true, r#"{"lv_on":true,"reasons":[]}"#)
        .await;
    let mut r = Observer::connect_as(p4, "op", "alice", secret.trim(), &["dcs/reply"]).await;
    r.publish("dcs/cmd/switch/lv", "on").await;
    let reply = r
        .next_on("dcs/reply", WAIT)
        .await
        .expect("a reply to LV on");
    assert!(
        reply.payload.contains("\"ok\":false") && reply.payload.contains("not a permit"),
        "{}",
        reply.payload
    );
    // The README walk-through at human speed: start the chiller, LV on a second later.
    let mut h = Observer::connect_as(
        p4,
        "human",
        "alice",
        secret.trim(),
        &["julabo/reply", "dcs/reply", "dcs/status"],
    )
    .await;
    h.publish("julabo/cmd/start", "").await;
    let started = h
        .next_on("julabo/reply", WAIT)
        .await
        .expect("a reply to start");
    assert!(
        started.payload.contains("\"ok\":true") && started.payload.contains("\"ON\""),
        "{}",
        started.payload
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.publish("dcs/cmd/switch/lv", "on").await;
    let reply = h
        .next_on("dcs/reply", WAIT)
        .await
        .expect("a reply to LV on");
    assert!(
        reply.payload.contains("\"ok\":true"),
        "LV on one second after the chiller started: {}",
        reply.payload
    );
    // What a new user sees on dcs/status: ramps, never ERROR (SPEC 4.4).
    async fn states_until(h: &mut Observer, end: &str) -> Vec<String> {
        let mut seen = Vec::new();
        while seen.last().map(String::as_str) != Some(end) {
            let g = h
                .next_on("dcs/status", WAIT)
                .await
                .unwrap_or_else(|| panic!("dcs/status never {end}: {seen:?}"));
            let v: serde_json::Value = serde_json::from_str(&g.payload).unwrap();
            seen.push(v["fsm_state"].as_str().unwrap_or("?").to_string());
        }
        assert!(!seen.iter().any(|s| s == "ERROR"), "{seen:?}");
        seen
    }
    let seen = states_until(&mut h, "LV_ON").await;
    assert!(seen.iter().any(|s| s == "LV_RAMP"), "LV on: {seen:?}");
    h.publish("dcs/cmd/switch/hv", "on").await;
    let seen = states_until(&mut h, "HV_ON").await;
    assert!(seen.iter().any(|s| s == "HV_RAMP"), "HV on: {seen:?}");
    h.publish("dcs/cmd/switch/hv", "off").await;
    states_until(&mut h, "LV_ON").await;
    // The launcher publishes as components start: wait for the one listing them all.
    const ALL: [&str; 10] = [
        "broker",
        "caen-fsm",
        "caen-sim",
        "env-sim",
        "interlock",
        "julabo",
        "julabo-sim",
        "ph2acf-bridge",
        "ph2acf-sim",
        "telemetry",
    ];
    let g = o
        .wait_for("dcs-launcher/status", WAIT, |p| {
            serde_json::from_str::<serde_json::Value>(p)
                .is_ok_and(|v| ALL.iter().all(|c| v["components"][c].is_object()))
        })
        .await
        .expect("launcher lists every component");
    let v: serde_json::Value = serde_json::from_str(&g.payload).unwrap();
    for c in ALL {
        assert_eq!(v["components"][c]["state"], "running", "{v}");
    }
    // A calibration through the bridge and the simulated middleware.
    o.publish(
        "ph2acf/cmd/run",
        r#"{"calibration":"pedenoise","config":"PS_module","modules":["PS_26_05-IBA_00001"],"operator":"alice"}"#,
    )
    .await;
    let g = o
        .wait_for("ph2acf/status", WAIT, |p| {
            serde_json::from_str::<serde_json::Value>(p)
                .is_ok_and(|v| v["state"] == "running" && v["run_number"] == 1)
        })
        .await
        .expect("a calibration runs under the launcher");
    // No MongoDB here: `dcs run show` finds the run in the bridge's local queue.
    let run_id = serde_json::from_str::<serde_json::Value>(&g.payload).unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let shown = Command::new(bin("dcs"))
        .args(["run", "show", &run_id, "--json", "--config"])
        .arg(&config)
        .env("DCS_STATE_DIR", dir.path().join("state"))
        .env_remove("DCS_MONGODB_URI")
        .env_remove("DCS_INFLUX_URL")
        .output()
        .unwrap();
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert!(
        view["source"].as_str().unwrap().contains("local queue"),
        "{view}"
    );
    assert_eq!(view["run"]["run_id"], run_id.as_str());
    assert_eq!(view["run"]["calibration"], "pedenoise");
    let missing = Command::new(bin("dcs"))
        .args(["run", "show", "no-such-run", "--config"])
        .arg(&config)
        .env("DCS_STATE_DIR", dir.path().join("state"))
        .env_remove("DCS_MONGODB_URI")
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("no run `no-such-run` in the local queue"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    // No database in the simulated stack: the chiller's status is kept in the spool.
    let g = o
        .wait_for("telemetry/stats", WAIT, |p| {
            serde_json::from_str::<serde_json::Value>(p).is_ok_and(|v| {
                v["received"].as_u64() > Some(0) && v["spool_bytes"].as_u64() > Some(0)
            })
        })
        .await
        .expect("telemetry spools what the stack publishes");
    assert!(g.payload.contains("none: spooling only"), "{}", g.payload);
    assert!(dir.path().join("state/telemetry").is_dir());
    let status = up
        .terminate(Duration::from_secs(15))
        .expect("dcs up did not stop within 15 s");
    assert!(status.success(), "{status}");
}

/// A healthy stack is quiet: the whole shipped simulated stack (every service and
/// simulator) for 30 s and a clean stop print nothing at WARN or ERROR, and every
/// component starts once (none crashes and restarts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_stack_is_quiet_from_start_to_clean_stop() {
    let _turn = WHOLE_STACK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (cmd, p4, _) = simulated_stack(
        dir.path(),
        "caen-fsm: {config: caen.yaml}, julabo: {config: julabo.yaml}, \
         marta: {config: marta.yaml}, telemetry: {config: telemetry.yaml}, \
         interlock: {config: interlock.yaml}, notifier: {config: notifier.yaml}, \
         ph2acf-bridge: {config: ph2acf.yaml}, burnin: {config: burnin.yaml}",
        "caen-sim: {config: caen.yaml}, julabo-sim: {config: julabo-sim.yaml}, \
         marta-sim: {config: marta-sim.yaml}, env-sim: {config: env-sim.yaml}, \
         ph2acf-sim: {config: ph2acf-sim.yaml}",
    );
    let mut up = spawn_until(cmd, "dcs: up;", WAIT);
    let secret = std::fs::read_to_string(dir.path().join("state/secret")).unwrap();
    let mut o = Observer::connect_as(p4, "obs", "alice", secret.trim(), &["dcs/status"]).await;
    o.wait_for("dcs/status", WAIT, |p| p.contains("\"LV_OFF\""))
        .await
        .unwrap_or_else(|| panic!("caen-fsm never came up:\n{}", up.stderr_text()));
    drop(o);
    // Past the CA beacon ramp (20 ms doubling to 15 s) and a few republish periods.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let status = up
        .terminate(Duration::from_secs(20))
        .expect("dcs up did not stop within 20 s");
    assert!(status.success(), "{status}");
    // The launcher's last line: every component's output has been copied before it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !up.stderr_text().contains("stopped component=\"broker\"") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = up.stderr_text();
    assert!(log.contains("stopped component=\"broker\""), "{log}");
    let loud: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        loud.is_empty(),
        "a healthy run logged:\n{}\n--- whole log ---\n{log}",
        loud.join("\n")
    );
    assert!(!log.contains("restarting"), "a component restarted:\n{log}");
    for noisy in ["caen_sim::server: write", "/../"] {
        assert!(!log.contains(noisy), "`{noisy}` in\n{log}");
    }
}

/// Writes a stack config with the embedded broker on `p4` (and optional MQTT 5 and
/// websocket ports), user `alice` created on first start, plus `rest` (YAML lines).
fn write_stack(
    dir: &Path,
    p4: u16,
    p5: Option<u16>,
    ws: Option<u16>,
    rest: &str,
) -> std::path::PathBuf {
    let addr = |p: Option<u16>| p.map_or("null".to_string(), |p| format!("127.0.0.1:{p}"));
    let config = dir.join("dcs.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: state\n\
             mqtt: {{url: mqtt://127.0.0.1:{p4}, username: alice, password_file: state/secret}}\n\
             broker:\n  listeners: {{mqtt: 127.0.0.1:{p4}, mqtt5: {}, websocket: {}}}\n  \
             auth: {{password_file: state/passwd}}\n  meters_interval_secs: 0\n{rest}",
            addr(p5),
            addr(ws)
        ),
    )
    .unwrap();
    config
}

fn pid_of(status: &serde_json::Value, component: &str) -> Option<i32> {
    status["components"][component]["pid"]
        .as_i64()
        .map(|p| p as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_supervises_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (p4, p5, pws) = (free_port(), free_port(), free_port());
    let config = write_stack(dir.path(), p4, Some(p5), Some(pws), "");
    let mut cmd = Command::new(bin("dcs"));
    cmd.args(["up", "--config"]).arg(&config);
    let mut up = spawn_until(cmd, "dcs: up;", WAIT);

    // First start created the services' account; the observer logs in with it, as alice.
    let secret = std::fs::read_to_string(dir.path().join("state/secret")).unwrap();
    assert_eq!(secret.trim().len(), 32);
    let mut s = Observer::connect_as(p4, "obs", "alice", secret.trim(), &["dcs-launcher/#"]).await;
    let g = s
        .wait_for("dcs-launcher/status", WAIT, |p| p.contains("\"running\""))
        .await
        .expect("launcher status");
    let status: serde_json::Value = serde_json::from_str(&g.payload).unwrap();
    let broker_pid = pid_of(&status, "broker").expect("broker pid");

    // The broker crashes: the launcher restarts it, and its own session comes back and
    // republishes the status (the new broker starts empty).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(broker_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    drop(s);
    let deadline = Instant::now() + WAIT;
    let restarted = loop {
        assert!(
            Instant::now() < deadline,
            "broker not restarted; launcher said:\n{}",
            up.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut o = match tokio::time::timeout(
            Duration::from_secs(3),
            Observer::connect_as(p4, "obs2", "alice", secret.trim(), &["dcs-launcher/status"]),
        )
        .await
        {
            Ok(o) => o,
            Err(_) => continue,
        };
        if let Some(g) = o
            .next_on("dcs-launcher/status", Duration::from_secs(3))
            .await
        {
            let v: serde_json::Value = serde_json::from_str(&g.payload).unwrap();
            if v["components"]["broker"]["restarts"] == 1
                && v["components"]["broker"]["state"] == "running"
            {
                break (v, o);
            }
        }
    };
    drop(restarted);
    // Restored as retained: a subscriber arriving now gets it from the broker's store.
    let mut late =
        Observer::connect_as(p4, "late", "alice", secret.trim(), &["dcs-launcher/status"]).await;
    let g = late
        .next_on("dcs-launcher/status", WAIT)
        .await
        .expect("retained status");
    assert!(g.retain);
    let status: serde_json::Value = serde_json::from_str(&g.payload).unwrap();
    assert_eq!(status["components"]["broker"]["restarts"], 1, "{status}");
    let new_pid = pid_of(&status, "broker").unwrap();
    assert_ne!(new_pid, broker_pid);
    assert!(
        status["components"]["broker"]["last_exit"]
            .as_str()
            .unwrap()
            .contains("signal: 9"),
        "{status}"
    );

    // Commands: an unknown component is refused with a reply naming the known ones.
    let mut c =
        Observer::connect_as(p4, "cmd", "alice", secret.trim(), &["dcs-launcher/reply"]).await;
    c.publish("dcs-launcher/cmd/restart", "caen-fsm").await;
    let r = c.next_on("dcs-launcher/reply", WAIT).await.expect("reply");
    let r: serde_json::Value = serde_json::from_str(&r.payload).unwrap();
    assert_eq!(r["ok"], false);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("running ones are broker"),
        "{r}"
    );

    // SIGTERM stops everything, in time, and leaves no child behind.
    let status = up
        .terminate(Duration::from_secs(15))
        .expect("dcs up did not stop within 15 s");
    assert!(status.success(), "{status}");
    let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(new_pid), None).is_err();
    assert!(gone, "broker child {new_pid} still alive");
}

/// `dcs up` killed with SIGKILL (no chance to clean up) still leaves no child behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_die_with_a_killed_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let p4 = free_port();
    let config = write_stack(dir.path(), p4, None, None, "");
    let mut cmd = Command::new(bin("dcs"));
    cmd.args(["up", "--config"]).arg(&config);
    let mut up = spawn_until(cmd, "dcs: up;", WAIT);
    let secret = std::fs::read_to_string(dir.path().join("state/secret")).unwrap();
    let mut o =
        Observer::connect_as(p4, "obs", "alice", secret.trim(), &["dcs-launcher/status"]).await;
    let g = o
        .wait_for("dcs-launcher/status", WAIT, |p| p.contains("\"pid\":"))
        .await
        .expect("status with the broker's pid");
    let status: serde_json::Value = serde_json::from_str(&g.payload).unwrap();
    let broker = nix::unistd::Pid::from_raw(pid_of(&status, "broker").unwrap());
    drop(o);
    up.kill();
    let deadline = Instant::now() + WAIT;
    // Gone, or a zombie waiting for init to reap it: either way not running.
    while nix::sys::signal::kill(broker, None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{broker}/stat"))
            .is_ok_and(|s| s.contains(") Z "))
    {
        assert!(
            Instant::now() < deadline,
            "broker {broker} outlived its launcher"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One entry point: `dcs run NAME` (what `dcs up` starts for each child) is the
/// component's own code: the same `--check` line as its binary, and the same exit codes
/// for a broken config (2) and for a failure at run time (1).
#[test]
fn dcs_run_is_each_components_own_entry_point() {
    let deploy = repo_root().join("deploy");
    let stack = deploy.join("dcs.yaml");
    let tail = |out: &std::process::Output| {
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // `NAME: FILE OK (summary)`: the file is named differently (relative to the
        // stack file or not); the rest must be the same.
        let (name, rest) = text.split_once(": ").unwrap_or_default();
        let rest = rest.split_once(" OK").map(|r| r.1.to_string());
        (name.to_string(), rest)
    };
    for (name, file) in [
        ("caen-fsm", "caen.yaml"),
        ("julabo", "julabo.yaml"),
        ("telemetry", "telemetry.yaml"),
        ("interlock", "interlock.yaml"),
        ("ph2acf-bridge", "ph2acf.yaml"),
        ("burnin", "burnin.yaml"),
        ("caen-sim", "caen.yaml"),
        ("julabo-sim", "julabo-sim.yaml"),
        ("env-sim", "env-sim.yaml"),
        ("ph2acf-sim", "ph2acf-sim.yaml"),
    ] {
        let own = Command::new(bin(name))
            .arg("--config")
            .arg(deploy.join(file))
            .arg("--check")
            .output()
            .unwrap();
        let via = Command::new(bin("dcs"))
            .args(["run", name, "--check", "--config"])
            .arg(&stack)
            .output()
            .unwrap();
        assert!(
            own.status.success() && via.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&own.stderr),
            String::from_utf8_lossy(&via.stderr)
        );
        let (a, b) = (tail(&own), tail(&via));
        assert_eq!(a.0, name);
        assert!(a.1.is_some(), "{name}: {a:?}");
        assert_eq!(a, b, "{name}: its binary and `dcs run` differ");
    }

    // Exit codes: a broken config is 2, a failure at run time 1, both ways.
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    std::fs::write(
        dir.path().join("julabo.yaml"),
        "name: julabo\nport: tcp://127.0.0.1:1\ntiming: {min_spacing_ms: 99999}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("julabo-sim.yaml"),
        format!("tcp: 127.0.0.1:{port}\n"),
    )
    .unwrap();
    let stack = write_stack(
        dir.path(),
        free_port(),
        None,
        None,
        "services: {julabo: {config: julabo.yaml}}\nsimulators: {julabo-sim: {config: julabo-sim.yaml}}\n",
    );
    for (name, file, code, why) in [
        ("julabo", "julabo.yaml", 2, "min_spacing_ms"),
        ("julabo-sim", "julabo-sim.yaml", 1, "in use"),
    ] {
        let own = Command::new(bin(name))
            .arg("--config")
            .arg(dir.path().join(file))
            .output()
            .unwrap();
        let via = Command::new(bin("dcs"))
            .args(["run", name, "--config"])
            .arg(&stack)
            .output()
            .unwrap();
        for out in [&own, &via] {
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(code), "{name}: {err}");
            assert!(err.contains(why), "{name}: {err}");
        }
    }
    drop(taken);
}

/// Edits `file` in place: each `from` must be in it (a shipped file that changed must
/// not silently leave a test on its defaults).
fn swap(file: &Path, swaps: &[(&str, &str)]) {
    let mut text = std::fs::read_to_string(file).unwrap();
    for (from, to) in swaps {
        assert!(text.contains(from), "`{from}` not in {}", file.display());
        text = text.replace(from, to);
    }
    std::fs::write(file, text).unwrap();
}

/// The short burn-in sequence on the whole simulated stack with InfluxDB and a
/// MongoDB-wire server, as an operator runs it:
/// started over MQTT, an interlock trip in the cold phase (env-sim raises the dew
/// point) pauses it without a fight, dry air and an acknowledgement let it resume by
/// itself after the hold time with the step redone; one channel's sensor breaks down
/// and its IV scans stop at compliance while the other's finish; `burnin` SIGKILLed during an IV
/// scan is restarted by the launcher and resumes at that step; the run ends done, every
/// step done once, the pauses, IV points (with their conditions) and the calibration's
/// run id in the run document, which reaches MongoDB; `burnin_steps` points in
/// InfluxDB; `dcs burnin show` prints it and writes the IV curves as CSV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burn_in_pauses_on_a_trip_resumes_by_itself_and_survives_a_kill() {
    let _turn = WHOLE_STACK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (cmd, p4, _) = simulated_stack(
        dir.path(),
        "caen-fsm: {config: caen.yaml}, julabo: {config: julabo.yaml}, \
         interlock: {config: interlock.yaml}, ph2acf-bridge: {config: ph2acf.yaml}, \
         burnin: {config: burnin.yaml}",
        "caen-sim: {config: caen.yaml}, julabo-sim: {config: julabo-sim.yaml}, \
         env-sim: {config: env-sim.yaml}, ph2acf-sim: {config: ph2acf-sim.yaml}",
    );
    // Time scale: a bath that settles in seconds, read every second, 2 s calibrations,
    // a 3 s hold before resuming.
    let d = dir.path();
    swap(
        &d.join("julabo-sim.yaml"),
        &[("tau_secs: 60", "tau_secs: 1")],
    );
    swap(
        &d.join("julabo.yaml"),
        &[("poll_interval_secs: 5", "poll_interval_secs: 1")],
    );
    swap(
        &d.join("ph2acf-sim.yaml"),
        &[("run_secs: 20", "run_secs: 2")],
    );
    swap(
        &d.join("burnin.yaml"),
        &[("hold_secs: 300", "hold_secs: 3")],
    );
    // Channel 1's sensor breaks down at 20 V: its scan stops at compliance.
    swap(
        &d.join("caen.yaml"),
        &[(
            "  hv_leak_ua: 0.05",
            "  hv_leak_ua: 0.05\n  breakdown_volts: {\"1\": 20}",
        )],
    );
    let influx = dcs_integration_tests::db::Influx::start();
    let mongo = dcs_integration_tests::db::Mongo::start();
    let mut cmd = cmd;
    cmd.env("DCS_INFLUX_URL", influx.url())
        .env("DCS_MONGODB_URI", mongo.uri());
    let mut up = spawn_until(cmd, "dcs: up;", WAIT);
    let secret = std::fs::read_to_string(d.join("state/secret")).unwrap();
    let mut o = Observer::connect_as(
        p4,
        "obs",
        "alice",
        secret.trim(),
        &[
            "burnin/status",
            "burnin/reply",
            "interlock/status",
            "alarms/reply",
            "env-sim/reply",
            "dcs-launcher/status",
        ],
    )
    .await;
    let long = Duration::from_secs(120);
    o.wait_json("interlock/status", long, "state OK", |v| v["state"] == "OK")
        .await;
    o.wait_json("burnin/status", WAIT, "idle", |v| v["state"] == "idle")
        .await;

    let r = o
        .command(
            "burnin",
            "start",
            r#"{"sequence": "short", "modules": ["module_0", "module_1"], "operator": "ana", "comment": "ci"}"#,
            WAIT,
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let again = o
        .command(
            "burnin",
            "start",
            r#"{"sequence": "short", "modules": ["module_0"], "operator": "bob"}"#,
            WAIT,
        )
        .await;
    assert!(
        again["error"]
            .as_str()
            .unwrap_or("")
            .contains("abort it first"),
        "{again}"
    );

    // Cold phase of cycle 1: the box gets humid.
    let s = o
        .wait_json("burnin/status", long, "cycle 1 soak", |v| {
            v["step"]["path"] == "cycle 1/2, step 2 soak"
        })
        .await;
    let run_id = s["run_id"].as_str().unwrap().to_string();
    let r = o
        .command(
            "env-sim",
            "set",
            r#"{"board": "ESP01", "temp": 21.0, "humi": 95.0}"#,
            WAIT,
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let p = o
        .wait_json("burnin/status", long, "paused by the interlock", |v| {
            v["state"] == "paused"
        })
        .await;
    assert!(
        p["pause"]["reason"].as_str().unwrap().contains("interlock"),
        "{p}"
    );
    // Dry air back, the alarm acknowledged: the run goes on by itself.
    let r = o
        .command(
            "env-sim",
            "set",
            r#"{"board": "ESP01", "temp": 21.0, "humi": 40.0}"#,
            WAIT,
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    o.wait_json("interlock/status", long, "dew point normal", |v| {
        v["conditions"]["dew_point"] == "normal"
    })
    .await;
    // (Acknowledged already if the interlock had cleared it by itself.)
    let r = o
        .command(
            "alarms",
            "ack",
            r#"{"rule": "dew_point", "operator": "ana"}"#,
            WAIT,
        )
        .await;
    assert!(
        r["ok"] == true
            || r["error"]
                .as_str()
                .is_some_and(|e| e.contains("nothing to acknowledge")),
        "{r}"
    );
    o.wait_json("burnin/status", long, "resumed", |v| {
        v["state"] == "running" && v["phase"] == "step"
    })
    .await;

    // Killed in the middle of the second IV scan.
    o.wait_json("burnin/status", long, "cycle 2 IV scan", |v| {
        v["step"]["path"] == "cycle 2/2, step 3 iv_scan"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    o.discard("dcs-launcher/status");
    o.publish("dcs-launcher/cmd/refresh", "").await;
    let l = o
        .wait_json("dcs-launcher/status", WAIT, "burnin's pid", |v| {
            pid_of(v, "burnin").is_some()
        })
        .await;
    let pid = pid_of(&l, "burnin").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill burnin");
    o.wait_json("burnin/status", long, "resumed after the restart", |v| {
        v["pause"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("restarted"))
    })
    .await;
    let end = o
        .wait_json("burnin/status", Duration::from_secs(240), "done", |v| {
            matches!(v["state"].as_str(), Some("done" | "aborted" | "failed"))
        })
        .await;
    assert_eq!(end["state"], "done", "{end}\n{}", up.stderr_text());

    let doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.join(format!("state/burnin/runs/{run_id}.json"))).unwrap(),
    )
    .unwrap();
    let steps = doc["steps"].as_array().unwrap();
    let paused_s: f64 = doc["pauses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (p["end_ns"].as_i64().unwrap_or(0) - p["start_ns"].as_i64().unwrap_or(0)) as f64 / 1e9
        })
        .sum();
    eprintln!(
        "short sequence on the simulators: {:.1} s from start to done, {paused_s:.1} s of it paused (the trip, the restart)",
        (doc["end_ns"].as_i64().unwrap() - doc["start_ns"].as_i64().unwrap()) as f64 / 1e9
    );
    let total = doc["total"].as_u64().unwrap();
    for i in 0..total {
        let done = steps
            .iter()
            .filter(|s| s["index"] == i && s["outcome"] == "done")
            .count();
        assert_eq!(done, 1, "step {i} done once: {steps:#?}");
    }
    let pauses = doc["pauses"].as_array().unwrap();
    assert!(
        pauses
            .iter()
            .all(|p| p["end_ns"].as_i64() > p["start_ns"].as_i64()),
        "{pauses:#?}"
    );
    assert!(
        pauses
            .iter()
            .any(|p| p["reason"].as_str().unwrap().contains("interlock")),
        "{pauses:#?}"
    );
    assert!(
        pauses.iter().any(|p| p["reason"] == "burnin restarted"),
        "{pauses:#?}"
    );
    // The trip and the kill, nothing else (a refused command would be a pause too).
    assert_eq!(pauses.len(), 2, "{pauses:#?}");
    let iv: Vec<&serde_json::Value> = steps
        .iter()
        .filter(|s| s["kind"] == "iv_scan" && s["outcome"] == "done")
        .collect();
    assert_eq!(iv.len(), 2);
    for s in &iv {
        // Channel 0: 25, 50, 75, 100 V, one point each, none twice.
        let curve = &s["data"]["iv"]["0"];
        assert_eq!(curve["end"], "complete", "{curve}");
        let pts = curve["points"].as_array().unwrap();
        let v: Vec<f64> = pts.iter().map(|p| p["v_set"].as_f64().unwrap()).collect();
        assert_eq!(v, [25.0, 50.0, 75.0, 100.0], "{curve}");
        let last = &pts[3];
        assert!((last["v"].as_f64().unwrap() - 100.0).abs() < 2.0, "{last}");
        // 100 V on the simulator's 100 MOhm load and 0.05 uA of sensor leakage.
        assert!(
            (last["i_ua"].as_f64().unwrap() - 1.05).abs() < 0.1,
            "{last}"
        );
        assert!(
            last["env"]["env"]["dew_point"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "{last}"
        );
        // Channel 1 broke down: stopped at 75 V (13 uA >= 10 uA compliance), back to 0.
        let curve = &s["data"]["iv"]["1"];
        assert_eq!(curve["end"], "compliance", "{curve}");
        let pts = curve["points"].as_array().unwrap();
        let v: Vec<f64> = pts.iter().map(|p| p["v_set"].as_f64().unwrap()).collect();
        assert_eq!(v, [25.0, 50.0, 75.0], "{curve}");
        assert!(pts[2]["i_ua"].as_f64().unwrap() >= 10.0, "{curve}");
        assert!(pts[1]["i_ua"].as_f64().unwrap() < 10.0, "{curve}");
    }
    // Every step start and end, the two pauses and resumes, the end: in InfluxDB.
    let q = format!("SELECT * FROM burnin_steps WHERE run_id = '{run_id}'");
    let rows = influx.wait_rows(&q, long, |r| r.iter().any(|p| p["event"] == "run_end"));
    let count = |e: &str| rows.iter().filter(|p| p["event"] == e).count();
    assert_eq!(count("step_end"), total as usize, "{rows:#?}");
    assert_eq!(count("step_start"), steps.len(), "{rows:#?}");
    assert_eq!(count("pause"), 2, "{rows:#?}");
    assert_eq!(count("resume"), 2, "{rows:#?}");
    // The document reached MongoDB: `dcs burnin show` finds it there once the local
    // copies (the run's file, the checkpoint of the last run) are moved away.
    let local = d.join(format!("state/burnin/runs/{run_id}.json"));
    std::fs::rename(&local, d.join("moved.json")).unwrap();
    std::fs::rename(
        d.join("state/burnin/checkpoint.json"),
        d.join("moved-checkpoint.json"),
    )
    .unwrap();
    let show = |args: &[&str]| {
        Command::new(bin("dcs"))
            .args(["burnin", "show", &run_id, "--config"])
            .arg(d.join("dcs.yaml"))
            .args(args)
            .env("DCS_STATE_DIR", d.join("state"))
            .env("DCS_MONGODB_URI", mongo.uri())
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + WAIT;
    let from_mongo = loop {
        let out = show(&["--json"]);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let err = String::from_utf8_lossy(&from_mongo.stderr);
    assert!(from_mongo.status.success(), "{err}");
    assert!(err.contains("from MongoDB"), "{err}");
    let stored: serde_json::Value = serde_json::from_slice(&from_mongo.stdout).unwrap();
    assert_eq!(stored["steps"], doc["steps"]);
    let csv = d.join("csv");
    let out = show(&["--csv", csv.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("pauses: 2"), "{table}");
    assert!(
        table.contains("cycle 2/2, step 3 iv_scan channel 1 (compliance)"),
        "{table}"
    );
    let files = std::fs::read_dir(&csv).unwrap().count();
    assert_eq!(files, 4, "two scans of two channels");
    let cal = steps
        .iter()
        .find(|s| s["kind"] == "calibration" && s["outcome"] == "done")
        .unwrap();
    assert!(cal["data"]["ph2acf_run_id"].is_string(), "{cal}");
    assert_eq!(cal["data"]["status"], "done", "{cal}");
    let status = up
        .terminate(Duration::from_secs(20))
        .expect("dcs up did not stop within 20 s");
    assert!(status.success(), "{status}");
}
