//! `caen-fsm` against `caen-sim` over real Channel Access on private loopback ports,
//! commanded over MQTT through our broker: states, safety rules, faults, IOC restart,
//! reload and bad input.

use std::time::{Duration, Instant};

use dcs_integration_tests::caen::{
    config, start_fsm, start_fsm_with, Ca, CaPorts, CaenSim, TestChannel,
};
use dcs_integration_tests::{Broker, BrokerKind, Observer, Proc};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

struct Rig {
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    ports: CaPorts,
    sim: CaenSim,
    fsm: Proc,
    obs: Observer,
    ca: Ca,
    _broker: Broker,
}

const CHANNELS: &[TestChannel] = &[
    ("0", Some("module_0"), 0, 0, 12, 0),
    ("1", Some("module_1"), 0, 1, 12, 1),
    ("2", None, 0, 2, 12, 2),
];

/// A broker, free CA ports and the test config (for the simulator and the FSM alike).
fn setup() -> (Broker, tempfile::TempDir, CaPorts, std::path::PathBuf) {
    let broker = Broker::start(BrokerKind::Dcs);
    let dir = tempfile::tempdir().unwrap();
    let ports = CaPorts::free();
    let config_path = dir.path().join("caen.yaml");
    std::fs::write(
        &config_path,
        config(
            "dcs",
            broker.port,
            ports,
            &dir.path().join("sim-state.json"),
            CHANNELS,
        ),
    )
    .unwrap();
    (broker, dir, ports, config_path)
}

impl Rig {
    async fn start() -> Rig {
        Rig::start_with(&[]).await
    }

    async fn start_with(fsm_env: &[(&str, &str)]) -> Rig {
        let (broker, dir, ports, config_path) = setup();
        let sim = CaenSim::start(&config_path, ports);
        let mut obs = Observer::connect(broker.port, "test-obs", &["dcs/#"]).await;
        let fsm = start_fsm_with(&config_path, ports, fsm_env);
        let ca = Ca::new(ports).await;
        wait_state(&mut obs, "LV_OFF").await;
        Rig {
            _dir: dir,
            config: config_path,
            ports,
            sim,
            fsm,
            obs,
            ca,
            _broker: broker,
        }
    }

    /// Sends a command and returns its reply.
    async fn cmd(&mut self, topic: &str, payload: &str) -> Value {
        self.obs.publish(topic, payload.to_string()).await;
        let t = topic.to_string();
        let got = self
            .obs
            .wait_for("dcs/reply", WAIT, |p| {
                serde_json::from_str::<Value>(p).is_ok_and(|v| v["topic"] == t.as_str())
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "no reply to {topic}; caen-fsm said:\n{}",
                    self.fsm.stderr_text()
                )
            });
        serde_json::from_str(&got.payload).unwrap()
    }

    async fn ok(&mut self, topic: &str, payload: &str) {
        let r = self.cmd(topic, payload).await;
        assert_eq!(r["ok"], true, "{topic} {payload}: {r}");
    }
}

async fn wait_state(obs: &mut Observer, state: &str) {
    let want = format!("\"{state}\"");
    obs.wait_for("dcs/status", WAIT, |p| p.contains(&want))
        .await
        .unwrap_or_else(|| panic!("dcs/status never {state}"));
}

/// Waits for a `dcs/channels` object of channel `id` satisfying `pred`.
async fn wait_channel(
    obs: &mut Observer,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let got = obs
        .wait_for("dcs/channels", WAIT, |p| {
            serde_json::from_str::<Value>(p).is_ok_and(|v| v["id"] == id && pred(&v))
        })
        .await
        .unwrap_or_else(|| panic!("channel {id}: never {what}"));
    serde_json::from_str(&got.payload).unwrap()
}

async fn poll_pv(ca: &Ca, pv: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = ca.get(pv).await;
        if pred(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{pv} stays at {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cycle_with_safety_rules() {
    let mut r = Rig::start().await;
    // Settings from the config reach the supply of active channels only.
    poll_pv(&r.ca, "test:12:000:V0Set", |v| v == 60.0).await;
    poll_pv(&r.ca, "test:00:001:V0Set", |v| v == 12.0).await;
    // Written one after the other, PDwn last.
    poll_pv(&r.ca, "test:12:000:PDwn", |v| v == 1.0).await;
    assert_eq!(r.ca.get("test:12:000:RUp").await, 100.0);
    assert_eq!(
        r.ca.get("test:00:002:V0Set").await,
        0.0,
        "monitored-only channel untouched"
    );
    // Enums are published by their strings, as the Python stack did.
    let ch = wait_channel(&mut r.obs, "0", "with its enum strings", |v| {
        v["hv_tripMode"] == "Ramp" && v["hv_imRange"] == "Low"
    })
    .await;
    for f in [
        "lv_board",
        "lv_channel",
        "hv_board",
        "hv_channel",
        "module",
        "lv_tripExt",
        "hv_imRange",
    ] {
        assert!(ch.get(f).is_some(), "{f} missing in {ch}");
    }

    // HV before LV is refused and nothing moves.
    let reply = r.cmd("dcs/cmd/switch/hv", "on").await;
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"].as_str().unwrap().contains("LV is not on"),
        "{reply}"
    );
    assert_eq!(r.ca.get("test:12:000:Pw").await, 0.0);
    assert_eq!(r.ca.get("test:12:001:Pw").await, 0.0);

    r.ok("dcs/cmd/switch/lv", "on").await;
    wait_state(&mut r.obs, "LV_ON").await;
    assert_eq!(
        r.ca.get("test:00:002:Pw").await,
        0.0,
        "channel without module not switched"
    );

    r.ok("dcs/cmd/switch/hv", "on").await;
    wait_state(&mut r.obs, "HV_RAMP").await;
    wait_state(&mut r.obs, "HV_ON").await;
    // HV_ON comes from the status word; VMon may still be settling in that update.
    let ch = wait_channel(&mut r.obs, "0", "on at 60 V", |v| {
        v["fsm_state"] == "HV_ON"
            && v["hv_vMon"]
                .as_f64()
                .is_some_and(|x| (x - 60.0).abs() < 0.5)
    })
    .await;
    assert_eq!(ch["hv_status"], 1);

    // Set-points: applied and read back, limits enforced.
    r.ok("dcs/cmd/setv/hv/0", "80").await;
    wait_channel(&mut r.obs, "0", "setV 80", |v| v["hv_setV"] == 80.0).await;
    let reply = r.cmd("dcs/cmd/setv/hv/0", "5000").await;
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"].as_str().unwrap().contains("limits"),
        "{reply}"
    );
    assert_eq!(r.ca.get("test:12:000:V0Set").await, 80.0);
    let reply = r.cmd("dcs/cmd/setv/lv/2", "5").await;
    assert!(
        reply["error"].as_str().unwrap().contains("monitored"),
        "{reply}"
    );

    // LV off with HV on: HV goes first, LV only once HV is below 5 V.
    let hv_vmon = r.ca.channel("test:12:000:VMon").await;
    let lv_pw = r.ca.channel("test:00:000:Pw").await;
    let mut hv_sub = hv_vmon.subscribe().await.unwrap();
    let mut lv_sub = lv_pw.subscribe().await.unwrap();
    r.obs.publish("dcs/cmd/switch/lv/0", "off").await;
    let mut last_hv = f64::NAN;
    let deadline = Instant::now() + WAIT;
    loop {
        tokio::select! {
            Some(Ok(s)) = hv_sub.recv() => last_hv = s.value.to_f64().unwrap(),
            Some(Ok(s)) = lv_sub.recv() => {
                if s.value.to_f64() == Some(0.0) {
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => panic!("LV never switched off"),
        }
    }
    assert!(last_hv < 5.0, "LV switched off with HV at {last_hv} V");
    let reply = r
        .obs
        .wait_for("dcs/reply", WAIT, |p| p.contains("switch/lv/0"))
        .await
        .unwrap();
    assert!(reply.payload.contains("\"ok\":true"), "{}", reply.payload);
    // Channel 0 is off, channel 1 still has HV: a mixed system (SPEC 4.4: any LV_OFF
    // with LV or HV on is LV_MIX).
    wait_state(&mut r.obs, "LV_MIX").await;
    r.ok("dcs/cmd/switch/hv/1", "off").await;
    wait_state(&mut r.obs, "HV_RAMP").await;
    wait_state(&mut r.obs, "LV_MIX").await;
    r.ok("dcs/cmd/switch/lv", "off").await;
    wait_state(&mut r.obs, "LV_OFF").await;
    assert!(
        r.fsm.terminate(Duration::from_secs(5)).is_some(),
        "caen-fsm ignores SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trip_is_an_error_until_cleared() {
    let mut r = Rig::start().await;
    r.ok("dcs/cmd/switch/lv", "on").await;
    wait_state(&mut r.obs, "LV_ON").await;
    r.ok("dcs/cmd/switch/hv/0", "on").await;
    wait_state(&mut r.obs, "HV_MIX").await;
    r.ca.put("test:12:000:SimTrip", 1.0).await;
    wait_state(&mut r.obs, "ERROR").await;
    let ch = wait_channel(&mut r.obs, "0", "tripped", |v| {
        v["hv_status"].as_i64().is_some_and(|s| s & (1 << 9) != 0)
    })
    .await;
    assert_eq!(ch["fsm_state"], "ERROR");
    // HV cannot be switched on on a channel in error.
    let reply = r.cmd("dcs/cmd/switch/hv/0", "on").await;
    assert_eq!(reply["ok"], false, "{reply}");
    r.ok("dcs/cmd/clear", "").await;
    wait_state(&mut r.obs, "LV_ON").await;
    assert_eq!(
        r.ca.get("test:12:000:Pw").await,
        0.0,
        "a trip leaves HV off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ioc_crash_and_restart_recover_without_a_restart_of_the_fsm() {
    let mut r = Rig::start().await;
    r.ok("dcs/cmd/switch/lv", "on").await;
    wait_state(&mut r.obs, "LV_ON").await;
    // The simulator saves its state at most every 200 ms.
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.sim.kill();
    wait_state(&mut r.obs, "DISCONNECTED").await;
    // Commands while the IOC is away are refused, not half-applied.
    let reply = r.cmd("dcs/cmd/switch/lv", "off").await;
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"].as_str().unwrap().contains("not connected"),
        "{reply}"
    );
    r.sim.restart();
    // The mainframe kept its channels on while its IOC was down.
    if r.obs
        .wait_for("dcs/status", WAIT, |p| p.contains("\"LV_ON\""))
        .await
        .is_none()
    {
        panic!("no recovery; caen-fsm said:\n{}", r.fsm.stderr_text());
    }
    let _ = r.ports;
}

/// An IOC that stops answering (process stopped, circuit still open) is noticed by the
/// CA echo timeout (`EPICS_CA_CONN_TMO`, honoured from the environment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_ioc_is_disconnected_and_recovers() {
    let mut r = Rig::start_with(&[("EPICS_CA_CONN_TMO", "1")]).await;
    let pid = nix::unistd::Pid::from_raw(r.sim.proc().unwrap().child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let seen = r
        .obs
        .wait_for("dcs/status", WAIT, |p| p.contains("\"DISCONNECTED\""))
        .await;
    // Freshness at the source: what the FSM can no longer read is published as null,
    // never as the last value (the interlock then counts it as unknown, so unsafe).
    let channel = r
        .obs
        .wait_for("dcs/channels/0", WAIT, |p| {
            serde_json::from_str::<Value>(p).is_ok_and(|v| v["fsm_state"] == "DISCONNECTED")
        })
        .await;
    // One object per channel for the loss: the dozens of PV disconnections that
    // follow change nothing that is published.
    let again = r
        .obs
        .wait_for("dcs/channels/0", Duration::from_millis(800), |p| {
            p.contains("\"DISCONNECTED\"")
        })
        .await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        again.is_none(),
        "channel 0 published DISCONNECTED twice: {:?}",
        again.map(|g| g.payload)
    );
    assert!(
        seen.is_some(),
        "hung IOC not noticed; caen-fsm said:\n{}",
        r.fsm.stderr_text()
    );
    let channel: Value =
        serde_json::from_str(&channel.expect("channel 0 DISCONNECTED").payload).unwrap();
    for field in ["lv_vMon", "lv_iMon", "lv_status", "hv_vMon", "hv_status"] {
        assert!(
            channel[field].is_null(),
            "{field} kept while disconnected: {channel}"
        );
    }
    if r.obs
        .wait_for("dcs/status", WAIT, |p| p.contains("\"LV_OFF\""))
        .await
        .is_none()
    {
        panic!(
            "never LV_OFF again; caen-fsm said:\n{}",
            r.fsm.stderr_text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_get_reasons_and_change_nothing() {
    let mut r = Rig::start().await;
    for (topic, payload, why) in [
        ("dcs/cmd/switch/lv", "maybe", "`on` or `off`"),
        ("dcs/cmd/switch/xv", "on", "not a supply"),
        ("dcs/cmd/switch/lv/9", "on", "no channel `9`"),
        ("dcs/cmd/setv/lv/0", "twelve", "number"),
        ("dcs/cmd/setv/lv/0", "-1", "limits"),
        ("dcs/cmd/setv/lv/0", "16", "limits"),
        ("dcs/cmd/explode", "", "unknown command"),
        ("dcs/cmd/refresh", "\u{0}\u{ff}garbage", "payload"),
        ("dcs/cmd/reload", "now", "no payload"),
    ] {
        let reply = r.cmd(topic, payload).await;
        assert_eq!(reply["ok"], false, "{topic} {payload:?}: {reply}");
        let e = reply["error"].as_str().unwrap();
        assert!(e.contains(why), "{topic} {payload:?}: {e}");
        assert_eq!(reply["state"], "LV_OFF");
    }
    // Invalid UTF-8 and a huge payload.
    r.obs
        .publish("dcs/cmd/switch/lv", vec![0xff, 0xfe, 0x00])
        .await;
    let reply = r
        .obs
        .wait_for("dcs/reply", WAIT, |p| p.contains("UTF-8"))
        .await;
    assert!(reply.is_some());
    r.obs.publish("dcs/cmd/setv/lv/0", "9".repeat(10_000)).await;
    let reply = r
        .obs
        .wait_for("dcs/reply", WAIT, |p| {
            p.contains("setv/lv/0") && p.contains("must be a number")
        })
        .await;
    assert!(reply.is_some(), "a 10000-digit number is infinite: refused");
    for pv in ["test:00:000:Pw", "test:00:001:Pw", "test:12:000:Pw"] {
        assert_eq!(r.ca.get(pv).await, 0.0, "{pv}");
    }
    assert_eq!(r.ca.get("test:00:000:V0Set").await, 12.0);
    // Still alive and answering.
    r.ok("dcs/cmd/refresh", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_changed_config_and_keeps_the_old_one_if_broken() {
    let mut r = Rig::start().await;
    let text = std::fs::read_to_string(&r.config).unwrap();
    // Channel 2 gets a module, and the LV set-point changes.
    let changed = text
        .replace(
            "\"2\": {lv: {board: 0, chan: 2}, hv: {board: 12, chan: 2}}",
            "\"2\": {lv: {board: 0, chan: 2}, hv: {board: 12, chan: 2}, module: module_2}",
        )
        .replace("setV: 12.0", "setV: 11.0");
    assert_ne!(changed, text);
    std::fs::write(&r.config, &changed).unwrap();
    r.ok("dcs/cmd/reload", "").await;
    wait_channel(&mut r.obs, "2", "active", |v| v["module"] == "module_2").await;
    poll_pv(&r.ca, "test:00:002:V0Set", |v| v == 11.0).await;
    poll_pv(&r.ca, "test:00:000:V0Set", |v| v == 11.0).await;
    wait_state(&mut r.obs, "LV_OFF").await;
    // A broken file is refused with the key at fault; the running config stays.
    std::fs::write(&r.config, changed.replace("setV: 11.0", "setV: 99.0")).unwrap();
    let reply = r.cmd("dcs/cmd/reload", "").await;
    assert_eq!(reply["ok"], false);
    let e = reply["error"].as_str().unwrap();
    assert!(
        e.contains("running one is kept") && e.contains("setV"),
        "{e}"
    );
    r.ok("dcs/cmd/switch/lv/2", "on").await;
    poll_pv(&r.ca, "test:00:002:Pw", |v| v == 1.0).await;
}

/// Settings before power: caen-fsm started before the IOC takes no switch-on until
/// every configured setting has been written and read back; once one is accepted, the
/// simulator's write log shows every setting of the channel before its `Pw On`. The
/// same after a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_switch_on_before_the_settings_are_read_back() {
    let (broker, _dir, ports, config_path) = setup();
    let mut obs = Observer::connect(broker.port, "test-obs", &["dcs/status", "dcs/reply"]).await;
    let _fsm = start_fsm(&config_path, ports);
    obs.next_on("dcs/status", WAIT)
        .await
        .expect("a first status");

    /// Sends `topic on` until it is accepted; returns the refusals.
    async fn until_accepted(obs: &mut Observer, topic: &str, allowed: &[&str]) -> Vec<String> {
        let mut refusals = Vec::new();
        loop {
            obs.publish(topic, "on").await;
            let r = obs.next_on("dcs/reply", WAIT).await.expect("a reply");
            let r: Value = serde_json::from_str(&r.payload).unwrap();
            if r["topic"] != topic {
                continue;
            }
            if r["ok"] == true {
                return refusals;
            }
            let e = r["error"].as_str().unwrap_or("").to_string();
            assert!(allowed.iter().any(|a| e.contains(a)), "{e}");
            refusals.push(e);
            assert!(refusals.len() < 2000, "never accepted: {refusals:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // No IOC yet: refused; the IOC comes up with other settings (its defaults).
    obs.publish("dcs/cmd/switch/lv/0", "on").await;
    let r = obs.next_on("dcs/reply", WAIT).await.expect("a reply");
    assert!(r.payload.contains("\"ok\":false"), "{}", r.payload);
    let mut sim = CaenSim::start(&config_path, ports);
    until_accepted(
        &mut obs,
        "dcs/cmd/switch/lv/0",
        &["settings not confirmed", "not connected"],
    )
    .await;

    // A reload while the IOC does not answer: refused until it is back and the new
    // channels' settings are read back.
    let pid = nix::unistd::Pid::from_raw(sim.proc().unwrap().child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    obs.publish("dcs/cmd/reload", "").await;
    obs.publish("dcs/cmd/switch/hv/0", "on").await;
    let mut refused = false;
    while let Some(r) = obs.next_on("dcs/reply", WAIT).await {
        if r.payload.contains("switch/hv/0") {
            refused = r.payload.contains("\"ok\":false");
            break;
        }
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(refused, "HV on accepted right after a reload");
    until_accepted(
        &mut obs,
        "dcs/cmd/switch/hv/0",
        &["settings not confirmed", "not connected", "LV is not on"],
    )
    .await;

    let log = sim.proc().unwrap().stderr_text();
    let writes: Vec<&str> = log.lines().filter(|l| l.contains(" write")).collect();
    let first = |pv: &str| {
        writes.iter().position(|l| {
            (l.contains(&format!("test:{pv}\"")) || l.contains(&format!("test:{pv} ")))
                && l.contains("value=On")
        })
    };
    let written_before = |pv: &str, end: usize| {
        writes[..end]
            .iter()
            .filter(|l| l.contains(&format!("test:{pv}\"")) || l.contains(&format!("test:{pv} ")))
            .count()
    };
    // LV: written once before LV on. HV: its On came after the reload, so every HV
    // setting was written twice before it (first connect, and again after the reload).
    for (pw, times, settings) in [
        (
            "00:000:Pw",
            1,
            &[
                "00:000:V0Set",
                "00:000:I0Set",
                "00:000:Trip",
                "00:000:TripExt",
                "00:000:RUpTime",
                "00:000:RDwTime",
            ][..],
        ),
        (
            "12:000:Pw",
            2,
            &[
                "12:000:V0Set",
                "12:000:I0Set",
                "12:000:RUp",
                "12:000:RDWn",
                "12:000:Trip",
                "12:000:PDwn",
                "12:000:ImRange",
            ][..],
        ),
    ] {
        let on = first(pw).unwrap_or_else(|| panic!("no {pw} On in the log:\n{log}"));
        for pv in settings {
            assert!(
                written_before(pv, on) >= times,
                "{pv} not written {times} time(s) before {pw} On:\n{log}"
            );
        }
    }
}
