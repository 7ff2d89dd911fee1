//! The MARTA driver over MQTT against an independent Modbus TCP server (pymodbus, loaded
//! with the register map by `tests/interop/marta_plc.py`) and against marta-sim with
//! its plant model and injected faults.

use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dcs_integration_tests::{
    bin, free_port, repo_root, spawn_until, Broker, BrokerKind, Observer, Proc, PASS, USER,
};
use serde_json::Value;
use tokio_modbus::client::Reader;

const WAIT: Duration = Duration::from_secs(30);

fn map_file() -> PathBuf {
    repo_root().join("deploy/marta-registers.yaml")
}

/// pymodbus's server with the map's registers (see marta_plc.py for its values).
fn start_plc() -> (Proc, u16) {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        ".venv missing: run .ci/run (it installs pymodbus into .venv)"
    );
    let port = free_port();
    let mut cmd = Command::new(python);
    cmd.arg(repo_root().join("tests/interop/marta_plc.py"))
        .arg(map_file())
        .arg(port.to_string());
    (spawn_until(cmd, "marta_plc: ready", WAIT), port)
}

/// marta-sim on free ports with a fast plant; returns it and (modbus, control) ports.
fn start_sim(dir: &Path) -> (Proc, u16, u16) {
    let (port, control) = (free_port(), free_port());
    let cfg = dir.join("marta-sim.yaml");
    std::fs::write(
        &cfg,
        format!(
            "tcp: 127.0.0.1:{port}\ncontrol: 127.0.0.1:{control}\nregister_map: {}\n\
             plant: {{chiller_tau_secs: 1, co2_tau_secs: 2}}\n",
            map_file().display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("marta-sim"));
    cmd.arg("--config").arg(&cfg);
    (
        spawn_until(cmd, "marta-sim: control on", WAIT),
        port,
        control,
    )
}

/// The driver, polling `port` every 200 ms.
fn start_marta(dir: &Path, broker: &Broker, port: u16) -> Proc {
    let cfg = dir.join("marta.yaml");
    std::fs::write(
        &cfg,
        format!(
            "name: MARTA\nregister_map: {}\n\
             connection: {{host: 127.0.0.1, port: {port}, request_timeout_ms: 500, reconnect_min_ms: 100, reconnect_max_secs: 1}}\n\
             timing: {{poll_interval_secs: 0.2, republish_secs: 2, reset_pulse_ms: 100}}\n\
             mqtt: {{url: {}, username: {USER}, password: {PASS}}}\n",
            map_file().display(),
            broker.url()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("marta"));
    cmd.arg("--config").arg(&cfg);
    spawn_until(cmd, "connected to MQTT broker", WAIT)
}

/// Holding registers read with the tests' own Modbus client.
async fn regs(port: u16, start: u16, count: u16) -> Vec<u16> {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut ctx = tokio_modbus::client::tcp::connect_slave(addr, tokio_modbus::Slave(1))
        .await
        .unwrap();
    ctx.read_holding_registers(start, count)
        .await
        .unwrap()
        .unwrap()
}

/// Writes holding registers with the tests' own client (a PLC changing its own words).
async fn write_regs(port: u16, start: u16, words: &[u16]) {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut ctx = tokio_modbus::client::tcp::connect_slave(addr, tokio_modbus::Slave(1))
        .await
        .unwrap();
    tokio_modbus::client::Writer::write_multiple_registers(&mut ctx, start, words)
        .await
        .unwrap()
        .unwrap();
}

fn ctl(control: u16, line: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", control)).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    answer.trim().to_string()
}

async fn status_where(obs: &mut Observer, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    obs.wait_json("MARTA/status", WAIT, what, pred).await
}

fn state(s: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["fsm_state"] == s
}

async fn ok(obs: &mut Observer, verb: &str, payload: &str) -> Value {
    let r = obs.command("MARTA", verb, payload, WAIT).await;
    assert_eq!(r["ok"], true, "{verb} {payload}: {r}");
    r
}

async fn refused(obs: &mut Observer, verb: &str, payload: &str, why: &str) {
    let r = obs.command("MARTA", verb, payload, WAIT).await;
    assert_eq!(r["ok"], false, "{verb} {payload}: {r}");
    let e = r["error"].as_str().unwrap_or_default();
    assert!(
        e.contains(why),
        "{verb} {payload}: `{e}` does not say `{why}`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_decodes_every_reading_and_writes_what_the_map_says_on_pymodbus() {
    let (plc, port) = start_plc();
    let broker = Broker::start(BrokerKind::Dcs);
    let dir = tempfile::tempdir().unwrap();
    let mut obs = Observer::connect(broker.port, "t-marta", &["MARTA/#"]).await;
    let _marta = start_marta(dir.path(), &broker, port);

    // Every reading, in map order, is i * 1.25 - 20 on the server.
    let s = status_where(&mut obs, "CONNECTED", state("CONNECTED")).await;
    let map = std::fs::read_to_string(map_file()).unwrap();
    let names: Vec<&str> = map
        .lines()
        .take_while(|l| !l.starts_with("controls:"))
        .filter_map(|l| l.strip_prefix("- name: "))
        .collect();
    assert_eq!(names.len(), 55);
    for (i, name) in names.iter().enumerate() {
        assert_eq!(s[*name], i as f64 * 1.25 - 20.0, "{name}");
    }
    assert_eq!(s["status_word"], 1);
    assert!(s["measured_at"].as_i64().unwrap() > 0);
    let a = obs
        .wait_json("MARTA/alarms", WAIT, "alarms", |a| a["active"].is_array())
        .await;
    let active: Vec<_> = a["active"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].clone())
        .collect();
    assert_eq!(active, ["CP_HP_W", "EB_FS"]);
    assert_eq!(a["active"][1]["meaning"], "Emergency button pressed");
    assert_eq!(a["active"][1]["severity"], "error");
    assert_eq!(a["active"][0]["severity"], "warning");

    // Commands: the register effect read back from the server itself. A PLC that is
    // not ready (status word 0) starts nothing.
    write_regs(port, 320, &[0]).await;
    refused(&mut obs, "start_chiller", "", "not ready (status word 0)").await;
    assert_eq!(regs(port, 305, 1).await, [0]);
    write_regs(port, 320, &[1]).await;
    refused(&mut obs, "start_co2", "", "start_chiller first").await;
    assert_eq!(regs(port, 305, 1).await, [0]);
    ok(&mut obs, "start_chiller", "").await;
    assert_eq!(regs(port, 305, 1).await, [0b001]);
    ok(&mut obs, "set_flow_active", "1").await;
    assert_eq!(regs(port, 305, 1).await, [0b101]);
    let r = ok(&mut obs, "start_co2", "").await;
    assert_eq!(r["state"], "CO2_RUNNING");
    assert_eq!(regs(port, 305, 1).await, [0b111]);
    refused(&mut obs, "stop_chiller", "", "stop_co2 first").await;
    assert_eq!(regs(port, 305, 1).await, [0b111]);
    // float32 set-points: big-endian bytes, low word first (-30.5 = 0xC1F40000).
    ok(&mut obs, "set_temperature_setpoint", "-30.5").await;
    assert_eq!(regs(port, 310, 2).await, [0x0000, 0xC1F4]);
    ok(&mut obs, "set_speed_setpoint", "4500").await;
    assert_eq!(regs(port, 312, 2).await, [0xA000, 0x458C]);
    ok(&mut obs, "set_flow_setpoint", "2.5").await;
    assert_eq!(regs(port, 314, 2).await, [0x0000, 0x4020]);
    for (verb, payload, why) in [
        ("set_temperature_setpoint", "-40", "outside -35 .. 25 degC"),
        ("set_temperature_setpoint", "cold", "must be a number"),
        ("set_speed_setpoint", "6000.5", "outside 0 .. 6000 rpm"),
        ("set_flow_setpoint", "5.5", "outside 0 .. 5 g/s"),
        ("set_flow_active", "2", "0 or 1"),
        ("start_co2", "now", "no payload"),
        ("warm_up", "", "unknown command"),
    ] {
        refused(&mut obs, verb, payload, why).await;
    }
    assert_eq!(regs(port, 305, 1).await, [0b111]);
    assert_eq!(
        regs(port, 310, 6).await,
        [0x0000, 0xC1F4, 0xA000, 0x458C, 0x0000, 0x4020]
    );
    ok(&mut obs, "stop_co2", "").await;
    assert_eq!(regs(port, 305, 1).await, [0b101]);
    ok(&mut obs, "stop_chiller", "").await;
    assert_eq!(regs(port, 305, 1).await, [0b100]);

    // clear_alarms stops the plant: refused while it runs without an alarm; after a
    // trip (status word 3), the start bits first, then the reset bit set and cleared.
    ok(&mut obs, "start_chiller", "").await;
    ok(&mut obs, "start_co2", "").await;
    refused(&mut obs, "clear_alarms", "", "would stop it").await;
    assert_eq!(regs(port, 305, 1).await, [0b111]);
    write_regs(port, 320, &[3]).await;
    let log_before = plc.stderr_text().lines().count();
    ok(&mut obs, "clear_alarms", "").await;
    assert_eq!(regs(port, 305, 1).await, [0b100]);
    let writes: Vec<String> = plc
        .stderr_text()
        .lines()
        .skip(log_before)
        .filter(|l| l.starts_with("write 305"))
        .map(String::from)
        .collect();
    assert_eq!(writes, ["write 305 [4]", "write 305 [12]", "write 305 [4]"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_give_disconnected_with_the_reason_and_recover_by_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let (_sim, port, control) = start_sim(dir.path());
    let broker = Broker::start(BrokerKind::Dcs);
    let mut obs = Observer::connect(broker.port, "t-marta", &["MARTA/#"]).await;
    let _marta = start_marta(dir.path(), &broker, port);
    status_where(&mut obs, "CONNECTED", state("CONNECTED")).await;

    for (fault, why) in [
        ("silent", "no answer within 500 ms to reading registers"),
        ("drop_reads", "connection lost during reading registers"),
        ("exception 4", "Modbus exception 0x04"),
    ] {
        let (on, off) = match fault.split_once(' ') {
            Some((name, _)) => (fault.to_string(), format!("{name} off")),
            None => (format!("{fault} on"), format!("{fault} off")),
        };
        obs.discard("MARTA/status");
        obs.discard("MARTA/alarms");
        assert_eq!(ctl(control, &on), "ok");
        let s = status_where(&mut obs, fault, state("DISCONNECTED")).await;
        let e = s["error"].as_str().unwrap_or_default();
        assert!(e.contains(why), "{fault}: `{e}` does not say `{why}`");
        // Nothing stale: every reading and the interlock's fields are unknown.
        assert!(
            s["TT05_CO2"].is_null() && s["co2_running"].is_null() && s["measured_at"].is_null()
        );
        let a = obs
            .wait_json("MARTA/alarms", WAIT, "unknown alarms", |a| {
                a["active"].is_null()
            })
            .await;
        assert_eq!(a["fsm_state"], "DISCONNECTED");
        refused(&mut obs, "start_chiller", "", "nothing can be written").await;
        assert_eq!(ctl(control, &off), "ok");
        let s = status_where(&mut obs, "recovery", state("CONNECTED")).await;
        assert!(s["error"].is_null() && s["TT05_CO2"].is_number());
    }
    // A connection dropped by the server between polls: made again at once, the plant
    // never shown DISCONNECTED.
    obs.discard("MARTA/status");
    assert_eq!(ctl(control, "drop"), "ok");
    ok(&mut obs, "start_chiller", "").await;
    loop {
        let s = obs
            .wait_json("MARTA/status", WAIT, "a status", |_| true)
            .await;
        assert_ne!(s["fsm_state"], "DISCONNECTED", "{s}");
        if s["fsm_state"] == "CHILLER_RUNNING" {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plant_alarm_clear_alarms_and_restart_on_marta_sim() {
    let dir = tempfile::tempdir().unwrap();
    let (_sim, port, control) = start_sim(dir.path());
    let broker = Broker::start(BrokerKind::Dcs);
    let mut obs = Observer::connect(broker.port, "t-marta", &["MARTA/#"]).await;
    let _marta = start_marta(dir.path(), &broker, port);
    status_where(&mut obs, "CONNECTED", state("CONNECTED")).await;

    ok(&mut obs, "set_temperature_setpoint", "-30").await;
    ok(&mut obs, "start_chiller", "").await;
    ok(&mut obs, "start_co2", "").await;
    let s = status_where(&mut obs, "the loop cold", |s| {
        s["co2_running"] == true && s["TT05_CO2"].as_f64().is_some_and(|t| t < -29.0)
    })
    .await;
    assert_eq!(
        s["co2_coldest_temp"], -30.0,
        "the set-point, where the loop is heading"
    );
    assert!(s["LP_speed"].as_f64().unwrap() > 2000.0);

    assert_eq!(ctl(control, "emergency on"), "ok");
    let s = status_where(&mut obs, "ALARM", state("ALARM")).await;
    assert_eq!(s["co2_running"], false);
    let a = obs
        .wait_json("MARTA/alarms", WAIT, "EB_FS", |a| {
            a["active"]
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x["name"] == "EB_FS"))
        })
        .await;
    assert!(a.to_string().contains("Emergency button pressed"));
    refused(&mut obs, "start_co2", "", "clear_alarms first").await;
    // Still pressed: the reset does not clear it, but the start bits are cleared.
    ok(&mut obs, "clear_alarms", "").await;
    let sim: Value = serde_json::from_str(&ctl(control, "state")).unwrap();
    assert_eq!(sim["control"], 0);
    assert_eq!(sim["status"], 3);
    assert_eq!(ctl(control, "emergency off"), "ok");
    let r = ok(&mut obs, "clear_alarms", "").await;
    assert_eq!(r["state"], "CONNECTED", "{r}");
    obs.wait_json("MARTA/alarms", WAIT, "no alarms", |a| {
        a["active"] == serde_json::json!([])
    })
    .await;
    ok(&mut obs, "start_chiller", "").await;
    ok(&mut obs, "start_co2", "").await;
    status_where(&mut obs, "CO2 running again", |s| s["co2_running"] == true).await;
}

/// The full flow under `dcs up --simulate` with MARTA as the interlock's cooling source
/// (the shipped caen, marta and marta-sim configs, ports moved): LV refused until the
/// CO2 loop runs; start the chiller and CO2, reach -30 degC, LV and HV on; a plant
/// alarm: state ALARM with its text, the interlock switches HV then LV off; clear the
/// alarms, restart, acknowledge: LV allowed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_simulate_with_marta_as_the_cooling_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let deploy = repo_root().join("deploy");
    let (p4, mb, mctl, ca, beacon) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let copy = |name: &str, from: &[(&str, String)]| {
        let mut text = std::fs::read_to_string(deploy.join(name)).unwrap();
        for (old, new) in from {
            assert!(text.contains(old), "deploy/{name} no longer has `{old}`");
            text = text.replace(old, new);
        }
        std::fs::write(d.join(name), text).unwrap();
    };
    copy("caen.yaml", &[("port: 15064", format!("port: {ca}"))]);
    copy(
        "marta-sim.yaml",
        &[
            ("127.0.0.1:5502", format!("127.0.0.1:{mb}")),
            ("127.0.0.1:5503", format!("127.0.0.1:{mctl}")),
            ("chiller_tau_secs: 10", "chiller_tau_secs: 1".into()),
            ("co2_tau_secs: 20", "co2_tau_secs: 2".into()),
        ],
    );
    copy("marta.yaml", &[]);
    copy("marta-registers.yaml", &[]);
    // A dry box: dew point about -37 degC, so -30 degC is safe with a 3 degC margin.
    copy("env-sim.yaml", &[("humi: 40.0", "humi: 1.0".into())]);
    std::fs::write(
        d.join("interlock.yaml"),
        "name: interlock\npermit_key_file: state/permit.key\n\
         targets: {caen: dcs, chiller: julabo, marta: MARTA, max_age_secs: 30}\n\
         inputs:\n  co2_running: {topic: MARTA/status, field: co2_running, max_age_secs: 30}\n  \
         co2_coldest: {topic: MARTA/status, field: co2_coldest_temp, max_age_secs: 30}\n  \
         dew: {topic: \"+/sensors/BME/dew\", max_age_secs: 30}\n\
         rules:\n  dew_point: {kind: dew_point, cold: [co2_coldest], dew: [dew], margin: 3, hold_secs: 1,\n    \
         actions: [{do: marta_setpoint, temp: 20}, {do: hv_off, after_secs: 60}, {do: lv_off, after_secs: 60}]}\n  \
         cooling: {kind: cooling_required, running: co2_running, mode: switch_off, hold_secs: 1, confirm_timeout_secs: 60}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("dcs.yaml"),
        format!(
            "state_dir: state\n\
             mqtt: {{url: mqtt://127.0.0.1:{p4}, username: alice, password_file: state/secret}}\n\
             broker:\n  listeners: {{mqtt: 127.0.0.1:{p4}, mqtt5: null, websocket: null}}\n  \
             auth: {{password_file: state/passwd}}\n  meters_interval_secs: 0\n\
             services: {{caen-fsm: {{config: caen.yaml}}, marta: {{config: marta.yaml}}, interlock: {{config: interlock.yaml}}}}\n\
             simulators: {{caen-sim: {{config: caen.yaml}}, marta-sim: {{config: marta-sim.yaml}}, env-sim: {{config: env-sim.yaml}}}}\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("dcs"));
    cmd.args(["up", "--simulate", "--config"])
        .arg(d.join("dcs.yaml"))
        .env("MARTA_PORT", mb.to_string())
        .env("CAEN_CA_ADDR_LIST", format!("127.0.0.1:{ca}"))
        .env("EPICS_CAS_BEACON_PORT", beacon.to_string())
        .env("EPICS_CA_REPEATER_PORT", beacon.to_string())
        .env("DCS_STATE_DIR", d.join("state"))
        .env_remove("DCS_INFLUX_URL");
    let mut up = spawn_until(cmd, "dcs: up;", WAIT);
    let secret = std::fs::read_to_string(d.join("state/secret")).unwrap();
    let mut o = Observer::connect_as(
        p4,
        "t-flow",
        "alice",
        secret.trim(),
        &[
            "MARTA/#",
            "dcs/status",
            "dcs/reply",
            "interlock/permits",
            "alarms/#",
        ],
    )
    .await;
    status_where(&mut o, "CONNECTED", state("CONNECTED")).await;
    o.wait_json("interlock/permits", WAIT, "LV refused", |p| {
        p["lv_on"] == false && p.to_string().contains("cooling")
    })
    .await;
    o.wait_json("dcs/status", WAIT, "LV_OFF", |s| s["fsm_state"] == "LV_OFF")
        .await;
    let r = o.command("dcs", "switch/lv", "on", WAIT).await;
    assert_eq!(r["ok"], false, "LV on without CO2 cooling: {r}");

    ok(&mut o, "set_temperature_setpoint", "-30").await;
    ok(&mut o, "start_chiller", "").await;
    ok(&mut o, "start_co2", "").await;
    status_where(&mut o, "the loop at -30 degC", |s| {
        s["co2_running"] == true && s["TT05_CO2"].as_f64().is_some_and(|t| t < -29.5)
    })
    .await;
    o.wait_json("interlock/permits", WAIT, "LV allowed", |p| {
        p["lv_on"] == true
    })
    .await;
    // caen-fsm may take the new permit a moment after this observer (a busy machine):
    // LV on as an operator would, again after a second while refused.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = o.command("dcs", "switch/lv", "on", WAIT).await;
        if r["ok"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "LV on refused: {r}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    o.wait_json("dcs/status", WAIT, "LV_ON", |s| s["fsm_state"] == "LV_ON")
        .await;
    let r = o.command("dcs", "switch/hv", "on", WAIT).await;
    assert_eq!(r["ok"], true, "{r}");
    o.wait_json("dcs/status", WAIT, "HV_ON", |s| s["fsm_state"] == "HV_ON")
        .await;

    // The plant trips: cooling is lost, HV then LV go off.
    o.discard("dcs/status");
    assert_eq!(ctl(mctl, "alarm TT04_CO2_HT_TS"), "ok");
    status_where(&mut o, "ALARM", state("ALARM")).await;
    let a = o
        .wait_json("MARTA/alarms", WAIT, "the alarm text", |a| {
            a["active"].as_array().is_some_and(|v| !v.is_empty())
        })
        .await;
    assert_eq!(
        a["active"][0]["meaning"],
        "Accumulator heater temperature very high"
    );
    o.wait_json("dcs/status", WAIT, "the supply off", |s| {
        s["fsm_state"] == "LV_OFF"
    })
    .await;
    // HV first, confirmed, then LV (the system state may pass LV_ON within the FSM's
    // 100 ms settling: the interlock's record says the order).
    let alarm = o
        .wait_json("alarms/cooling", WAIT, "both actions confirmed", |a| {
            a["actions"].as_array().is_some_and(|v| {
                v.len() == 2
                    && v.iter()
                        .all(|x| x["result"].as_str().unwrap_or("").starts_with("confirmed"))
            })
        })
        .await;
    assert_eq!(alarm["actions"][0]["do"], "hv_off");
    assert_eq!(alarm["actions"][1]["do"], "lv_off");
    let at = |i: usize| alarm["actions"][i]["at"].as_str().unwrap_or("").to_string();
    assert!(at(0) <= at(1), "{alarm}");

    // Cleared, restarted, acknowledged: LV allowed again.
    ok(&mut o, "clear_alarms", "").await;
    ok(&mut o, "start_chiller", "").await;
    ok(&mut o, "start_co2", "").await;
    status_where(&mut o, "CO2 running again", |s| s["co2_running"] == true).await;
    let r = o
        .command(
            "alarms",
            "ack",
            r#"{"rule": "cooling", "operator": "t-flow"}"#,
            WAIT,
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    o.wait_json("interlock/permits", WAIT, "LV allowed again", |p| {
        p["lv_on"] == true
    })
    .await;
    let status = up.terminate(Duration::from_secs(15)).expect("dcs up stops");
    assert!(status.success(), "{status}");
}
