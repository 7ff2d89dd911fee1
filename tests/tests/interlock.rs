//! The interlock with the real services it commands: dcs-broker, caen-sim + caen-fsm
//! over Channel Access, julabo-sim + julabo over TCP. Sensor boards are this test's
//! own MQTT client publishing `ESP0n/sensors/...`, as the lab boards do.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dcs_integration_tests::caen::{config, start_fsm, CaPorts, CaenSim};
use dcs_integration_tests::{
    bin, free_port, spawn_until, start_julabo_sim, Broker, BrokerKind, Got, Observer, Proc, PASS,
    USER,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn json(g: &Got) -> Value {
    serde_json::from_str(&g.payload).unwrap_or(Value::Null)
}

/// Interlock rules for the tests: short ages, holds and delays.
fn rules(mqtt_port: u16, extra: &str) -> String {
    format!(
        r#"
mqtt: {{url: "mqtt://127.0.0.1:{mqtt_port}", username: {USER}, password: {PASS}, keep_alive_secs: 5}}
targets: {{caen: dcs, chiller: julabo, max_age_secs: 60}}
inputs:
  bath: {{topic: julabo/status, field: internal_temp, max_age_secs: 10}}
  running: {{topic: julabo/status, field: running, max_age_secs: 10}}
  dew: {{topic: "+/sensors/BME/dew", max_age_secs: 3}}
  air: {{topic: "+/sensors/BME/temp", max_age_secs: 30}}
timing: {{evaluate_ms: 100, republish_secs: 60}}
rules:
{extra}"#
    )
}

const DEW_AND_COOLING: &str = r#"
  dew_point:
    kind: dew_point
    cold: [bath]
    dew: [dew]
    margin: 3
    hysteresis: 1
    actions:
      - {do: chiller_setpoint, temp: 25}
      - {do: hv_off, after_secs: 3}
      - {do: lv_off, after_secs: 3}
    confirm_timeout_secs: 20
  cooling: {kind: cooling_required, running: running, mode: switch_off, confirm_timeout_secs: 30}
"#;

fn start_interlock(dir: &Path, text: &str) -> Proc {
    let file = dir.join("interlock.yaml");
    // The key caen-fsm verifies the permits with (created by the interlock).
    std::fs::write(&file, format!("{text}\npermit_key_file: permit.key\n")).unwrap();
    let mut cmd = Command::new(bin("interlock"));
    cmd.arg("--config").arg(&file);
    spawn_until(cmd, "connected to the broker", WAIT)
}

/// The whole plant: broker, CAEN and chiller with their simulators, the interlock.
struct Plant {
    broker: Broker,
    _caen_sim: CaenSim,
    _fsm: Proc,
    julabo: Option<Proc>,
    _julabo_sim: Proc,
    _interlock: Proc,
    _dir: tempfile::TempDir,
}

fn plant() -> Plant {
    let broker = Broker::start(BrokerKind::Dcs);
    let dir = tempfile::tempdir().unwrap();
    // CAEN: two commanded channels; LV on only with the interlock's permit.
    let ports = CaPorts::free();
    let caen = config(
        "dcs",
        broker.port,
        ports,
        &dir.path().join("caen-state.json"),
        &[
            ("0", Some("m0"), 0, 0, 12, 0),
            ("1", Some("m1"), 0, 1, 12, 1),
        ],
    )
    .replace(
        "safety:\n",
        "safety:\n  interlock: interlock\n  permit_key_file: permit.key\n",
    );
    let caen_file = dir.path().join("caen.yaml");
    std::fs::write(&caen_file, caen).unwrap();
    let caen_sim = CaenSim::start(&caen_file, ports);
    let fsm = start_fsm(&caen_file, ports);
    // Chiller at 20 degC, fast polling.
    let (julabo_sim, tcp, _) = start_julabo_sim(30);
    let julabo = start_julabo(dir.path(), tcp, &broker);
    let interlock = start_interlock(dir.path(), &rules(broker.port, DEW_AND_COOLING));
    Plant {
        broker,
        _caen_sim: caen_sim,
        _fsm: fsm,
        julabo: Some(julabo),
        _julabo_sim: julabo_sim,
        _interlock: interlock,
        _dir: dir,
    }
}

fn start_julabo(dir: &Path, tcp: u16, broker: &Broker) -> Proc {
    let cfg = dir.join("julabo.yaml");
    std::fs::write(
        &cfg,
        format!(
            "name: julabo\nport: tcp://127.0.0.1:{tcp}\ntiming: {{min_spacing_ms: 40, poll_interval_secs: 0.5, reply_timeout_ms: 300}}\n\
             serial: {{baud: 115200}}\nlimits: {{temp_min: -30, temp_max: 40}}\nmqtt: {{url: {}, username: {USER}, password: {PASS}, keep_alive_secs: 5}}\n",
            broker.url()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("julabo"));
    cmd.arg("--config").arg(&cfg);
    spawn_until(cmd, "connected to MQTT broker", WAIT)
}

/// Sends a command and returns its reply.
async fn command(obs: &mut Observer, service: &str, verb: &str, payload: &str) -> Value {
    let topic = format!("{service}/cmd/{verb}");
    let reply = format!("{service}/reply");
    // The interlock's own commands get replies on the same topic.
    obs.discard(&reply);
    obs.publish(&topic, payload.to_string()).await;
    let g = obs
        .wait_for(&reply, WAIT, |p| {
            p.contains(&format!("\"topic\":\"{topic}\""))
        })
        .await
        .unwrap_or_else(|| panic!("no reply to {topic}"));
    json(&g)
}

/// Waits for a JSON message on `topic` satisfying `pred`. Earlier messages still
/// queued count: call [`Observer::discard`] first to wait for a new one.
async fn wait_json(
    obs: &mut Observer,
    topic: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    obs.wait_json(topic, WAIT, what, pred).await
}

/// The retained value of `topic` now, read by a new client.
async fn current(port: u16, topic: &str) -> Value {
    let id = format!("peek-{}", free_port());
    let mut o = Observer::connect(port, &id, &[topic]).await;
    json(
        &o.next_on(topic, WAIT)
            .await
            .unwrap_or_else(|| panic!("nothing retained on {topic}")),
    )
}

/// Waits until the retained CAEN system state is one of `states`.
async fn caen_state_becomes(port: u16, states: &[&str]) {
    let ok = tokio::time::timeout(WAIT, async {
        loop {
            let now = current(port, "dcs/status").await;
            if states.iter().any(|s| now["fsm_state"] == *s) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "dcs/status never became one of {states:?}");
}

/// Publishes a dew point every 500 ms from board ESP01; the returned sender changes
/// it (NaN: the board stops publishing).
fn sensor_board(obs: &Observer) -> tokio::sync::watch::Sender<f64> {
    let (tx, mut rx) = tokio::sync::watch::channel(10.0_f64);
    let client = obs.client.clone();
    tokio::spawn(async move {
        loop {
            let v = *rx.borrow_and_update();
            if v.is_finite() {
                let _ = client
                    .publish(
                        "ESP01/sensors/BME/dew",
                        rumqttc::QoS::AtMostOnce,
                        false,
                        format!("{v:.2}"),
                    )
                    .await;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                r = rx.changed() => if r.is_err() { return },
            }
        }
    });
    tx
}

/// LV refused without cooling, then allowed once the chiller runs; LV and HV on.
async fn power_up(obs: &mut Observer, port: u16) {
    // Once caen-fsm has written and read back the channels' settings.
    caen_state_becomes(port, &["LV_OFF"]).await;
    let r = command(obs, "dcs", "switch/lv", "on").await;
    assert_eq!(r["ok"], false, "{r}");
    let why = r["error"].as_str().unwrap();
    assert!(
        why.contains("refused by the interlock") && why.contains("cooling"),
        "{why}"
    );
    obs.discard("interlock/permits");
    assert_eq!(command(obs, "julabo", "start", "").await["ok"], true);
    wait_json(obs, "interlock/permits", "lv_on true", |v| {
        v["lv_on"] == true
    })
    .await;
    assert_eq!(command(obs, "dcs", "switch/lv", "on").await["ok"], true);
    caen_state_becomes(port, &["LV_ON"]).await;
    assert_eq!(command(obs, "dcs", "switch/hv", "on").await["ok"], true);
    caen_state_becomes(port, &["HV_ON"]).await;
}

const WATCH: &[&str] = &[
    "dcs/cmd/#",
    "dcs/reply",
    "julabo/#",
    "alarms/#",
    "interlock/#",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dew_point_breach_raises_the_chiller_then_switches_hv_then_lv_off() {
    let p = plant();
    let port = p.broker.port;
    let mut obs = Observer::connect(port, "operator", WATCH).await;
    let board = sensor_board(&obs);
    power_up(&mut obs, port).await;

    // The bath is at 20 degC: a dew point of 18 is 2 degC away, inside the margin of 3.
    obs.discard("alarms/dew_point");
    board.send(18.0).unwrap();
    let a = wait_json(&mut obs, "alarms/dew_point", "active", |v| {
        v["state"] == "active"
    })
    .await;
    assert_eq!(a["severity"], "critical");
    assert_eq!(a["values"]["dew_point"], 18.0);
    assert!(
        a["message"]
            .as_str()
            .unwrap()
            .contains("ESP01/sensors/BME/dew"),
        "{a}"
    );
    assert!(a["first_seen"].as_str().unwrap().ends_with('Z'));
    // First the chiller set-point, confirmed from the chiller's status.
    let cmd = obs
        .next_on("julabo/cmd/setWT", WAIT)
        .await
        .expect("setWT sent");
    assert_eq!(cmd.payload, r#"{"setpoint":1,"temp":25.0}"#);
    // The breach persists (the bath warms with a 60 s time constant): HV off, then LV
    // off once HV off is confirmed. (The operator's `on` commands are on these topics
    // too: wait for `off`.)
    obs.wait_for("dcs/cmd/switch/hv", WAIT, |p| p == "off")
        .await
        .expect("HV off sent");
    obs.wait_for("dcs/cmd/switch/lv", WAIT, |p| p == "off")
        .await
        .expect("LV off sent");
    let a = wait_json(&mut obs, "alarms/dew_point", "3 actions confirmed", |v| {
        v["actions"].as_array().is_some_and(|a| {
            a.len() == 3
                && a.iter()
                    .all(|x| x["result"].as_str().unwrap_or("").starts_with("confirmed"))
        })
    })
    .await;
    let order: Vec<&str> = a["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["do"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["chiller_setpoint", "hv_off", "lv_off"]);
    // (The system state follows the channels once they have settled.)
    caen_state_becomes(port, &["LV_OFF"]).await;
    assert_eq!(current(port, "julabo/status").await["setpoint_1"], 25.0);
    // LV on is refused while the condition lasts.
    let r = command(&mut obs, "dcs", "switch/lv", "on").await;
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("dew_point: coldest"),
        "{r}"
    );

    // Acknowledged while unsafe, cleared once the air is dry again.
    let r = command(
        &mut obs,
        "alarms",
        "ack",
        r#"{"rule": "dew_point", "operator": "test"}"#,
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    let a = wait_json(&mut obs, "alarms/dew_point", "acknowledged", |v| {
        v["state"] == "acknowledged"
    })
    .await;
    assert_eq!(a["acknowledged_by"], "test");
    obs.discard("alarms/summary");
    obs.discard("interlock/permits");
    board.send(10.0).unwrap();
    wait_json(&mut obs, "alarms/dew_point", "cleared", |v| {
        v["state"] == "cleared"
    })
    .await;
    let s = wait_json(&mut obs, "alarms/summary", "nothing active", |v| {
        v["active"] == 0 && v["acknowledged"] == 0
    })
    .await;
    assert_eq!(s["rules"]["dew_point"], "cleared");
    wait_json(&mut obs, "interlock/permits", "lv_on again", |v| {
        v["lv_on"] == true
    })
    .await;
    // Acknowledging a cleared alarm, or an unknown rule, is refused with a reason.
    let r = command(&mut obs, "alarms", "ack", "dew_point").await;
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("nothing to acknowledge"),
        "{r}"
    );
    let r = command(&mut obs, "alarms", "ack", "dew").await;
    assert!(
        r["error"].as_str().unwrap().contains("no rule `dew`"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sensor_and_offline_service_count_as_unsafe() {
    let mut p = plant();
    let port = p.broker.port;
    let mut obs = Observer::connect(port, "operator", WATCH).await;
    let board = sensor_board(&obs);
    power_up(&mut obs, port).await;

    // The board dies: after max_age (3 s) the dew point is unknown, hence unsafe, and
    // the first action is taken.
    obs.discard("alarms/dew_point");
    board.send(f64::NAN).unwrap();
    let a = wait_json(&mut obs, "alarms/dew_point", "active", |v| {
        v["state"] == "active"
    })
    .await;
    let m = a["message"].as_str().unwrap();
    assert!(m.contains("dew (ESP01/sensors/BME/dew): stale"), "{m}");
    obs.next_on("julabo/cmd/setWT", WAIT)
        .await
        .expect("safe action taken");
    board.send(10.0).unwrap();
    wait_json(&mut obs, "alarms/dew_point", "normal", |v| {
        v["condition"] == "normal"
    })
    .await;
    obs.discard("alarms/summary");
    assert_eq!(command(&mut obs, "alarms", "ack", "all").await["ok"], true);
    wait_json(&mut obs, "alarms/summary", "all clear", |v| {
        v["active"] == 0 && v["acknowledged"] == 0
    })
    .await;
    // Fully on again for the next fault, whatever the first alarm's actions did.
    assert_eq!(
        command(&mut obs, "dcs", "switch/lv", "on").await["ok"],
        true
    );
    caen_state_becomes(port, &["LV_ON", "HV_ON"]).await;
    assert_eq!(
        command(&mut obs, "dcs", "switch/hv", "on").await["ok"],
        true
    );
    caen_state_becomes(port, &["HV_ON"]).await;
    obs.discard("dcs/cmd/switch/hv");
    obs.discard("dcs/cmd/switch/lv");
    obs.discard("alarms/cooling");
    obs.discard("interlock/permits");

    // The chiller driver dies (SIGKILL): its last will says julabo/online = false, and
    // what it published is untrusted at once: cooling cannot be confirmed with LV on,
    // so HV then LV go off.
    if let Some(mut j) = p.julabo.take() {
        j.kill();
    }
    obs.wait_for("julabo/online", WAIT, |p| p == "false")
        .await
        .expect("last will");
    let a = wait_json(&mut obs, "alarms/cooling", "active", |v| {
        v["state"] == "active"
    })
    .await;
    assert!(
        a["message"].as_str().unwrap().contains("julabo is offline"),
        "{a}"
    );
    obs.wait_for("dcs/cmd/switch/hv", WAIT, |p| p == "off")
        .await
        .expect("HV off");
    obs.wait_for("dcs/cmd/switch/lv", WAIT, |p| p == "off")
        .await
        .expect("LV off");
    caen_state_becomes(port, &["LV_OFF"]).await;
    let permit = wait_json(
        &mut obs,
        "interlock/permits",
        "lv refused for cooling",
        |v| v["lv_on"] == false && v["reasons"].to_string().contains("cooling"),
    )
    .await;
    assert!(
        permit["reasons"].to_string().contains("julabo is offline"),
        "{permit}"
    );
    let r = command(&mut obs, "dcs", "switch/lv", "on").await;
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("refused by the interlock"),
        "{r}"
    );
}

/// Only the broker and the interlock: a rule over sensor values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hovering_at_the_threshold_does_not_chatter_and_broker_restarts_are_survived() {
    let mut broker = Broker::start(BrokerKind::Dcs);
    let dir = tempfile::tempdir().unwrap();
    let text = rules(
        broker.port,
        "  hot: {kind: over_temperature, inputs: [air], limit: 40, hysteresis: 1.5, severity: warning, inhibit_lv: false}\n",
    );
    let _il = start_interlock(dir.path(), &text);
    let mut obs = Observer::connect(broker.port, "board", &["alarms/hot"]).await;
    // A started interlock publishes its alarms once it has read back its retained ones.
    obs.wait_for("alarms/hot", WAIT, |_| true)
        .await
        .expect("the interlock publishes alarms/hot after its restore window");
    for v in [39.0, 40.2, 39.8, 40.1, 39.5, 40.3, 39.9, 39.0, 40.05] {
        obs.publish("ESP02/sensors/BME/temp", format!("{v}")).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Let the last evaluation publish, then collect the state transitions.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut states: Vec<String> = Vec::new();
    while let Some(g) = obs.next_on("alarms/hot", Duration::from_millis(200)).await {
        let v = json(&g);
        let s = format!(
            "{}/{}",
            v["state"].as_str().unwrap_or(""),
            v["condition"].as_str().unwrap_or("")
        );
        if states.last() != Some(&s) {
            states.push(s);
        }
    }
    // Raised once at 40.2 and never cleared or raised again: within the 1.5 degC
    // hysteresis the alarm stays put.
    assert_eq!(
        states.iter().filter(|s| *s == "active/unsafe").count(),
        1,
        "{states:?}"
    );
    assert_eq!(states.last().unwrap(), "active/unsafe", "{states:?}");

    // The broker restarts (its retained store is gone): the interlock reconnects,
    // publishes its alarm again, and keeps acting on new values.
    broker.kill();
    broker.restart();
    let mut obs = Observer::connect(broker.port, "board2", &["alarms/hot", "alarms/reply"]).await;
    let a = wait_json(&mut obs, "alarms/hot", "republished", |v| {
        v["state"] == "active"
    })
    .await;
    assert_eq!(a["severity"], "warning");
    obs.publish("ESP02/sensors/BME/temp", "38.0").await;
    wait_json(&mut obs, "alarms/hot", "normal", |v| {
        v["condition"] == "normal"
    })
    .await;
    let r = command(&mut obs, "alarms", "ack", "hot").await;
    assert_eq!(r["ok"], true, "{r}");
    wait_json(&mut obs, "alarms/hot", "cleared", |v| {
        v["state"] == "cleared"
    })
    .await;
    // `alarms/cmd` itself (no verb) matches two of the interlock's filters; it still
    // gets exactly one reply, a refusal.
    obs.discard("alarms/reply");
    obs.publish("alarms/cmd", "all").await;
    let r = obs.next_on("alarms/reply", WAIT).await.expect("a refusal");
    assert!(r.payload.contains("\"ok\":false"), "{}", r.payload);
    let again = obs.next_on("alarms/reply", Duration::from_secs(1)).await;
    assert_eq!(again, None, "a second reply to one command");
}

#[test]
fn a_malformed_rules_file_is_refused_at_start_with_its_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = rules(
        1883,
        "  hot:\n    kind: over_temperature\n    inputs: [air, airr]\n    limit: 40\n",
    );
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, bad).unwrap();
    let out = Command::new(bin("interlock"))
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml")
            && err.contains("rules.hot.inputs")
            && err.contains("no input named `airr`"),
        "{err}"
    );
    std::fs::write(
        &file,
        "inputs: {}\nrules:\n  x: {kind: dew_point, cold: [a], dew: [b], margin: 3\n",
    )
    .unwrap();
    let out = Command::new(bin("interlock"))
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml") && err.contains("line"), "{err}");
}
