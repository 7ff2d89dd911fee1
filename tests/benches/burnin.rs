//! Burn-in sequencer figures:
//! - pause latency: `interlock/status` going to ALARM on the broker -> `burnin/status`
//!   saying paused, seen by one client subscribed to both (two broker hops and the
//!   engine), over `dcs-broker` with the real `burnin` binary, p50/p99 of 200 trips;
//! - engine CPU: the pure engine running a soak step through one simulated hour of
//!   the messages a station publishes (ticks every 250 ms, 3 sensor boards x 3
//!   quantities every 2 s, the chiller every 5 s, 3 CAEN channels every 10 s, the
//!   permit every 10 s, the interlock every 60 s): CPU seconds per hour of run.
//!
//! `cargo build --release -p burnin -p dcs-broker && cargo bench -p dcs-integration-tests --bench burnin`
//! (`BENCH_ROUNDS` sets the trips, default 200).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use burnin::engine::{Engine, Request, Settings};
use burnin::sequence::{self, Limits};
use burnin::world::{Names, World};
use dcs_integration_tests::{bin, pct, spawn_until, Broker, BrokerKind, Observer, PASS, USER};
use dcs_shared::UtcNanos;

const WAIT: Duration = Duration::from_secs(30);
const SOAK: &str = "steps:\n  - soak: {secs: 86400}\n";

async fn pause_latency(rounds: usize) -> (f64, f64) {
    let broker = Broker::start(BrokerKind::Dcs);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("seqs")).unwrap();
    std::fs::write(dir.path().join("seqs/soak.yaml"), SOAK).unwrap();
    let file = dir.path().join("burnin.yaml");
    std::fs::write(
        &file,
        format!(
            "sequences_dir: seqs\nstate_dir: state\n\
             environment: {{dew_point: {{topic: bench/dew, max_age_secs: 3600}}}}\n\
             resume: {{hold_secs: 0, max_pauses: 1000000}}\n\
             mqtt: {{url: \"mqtt://127.0.0.1:{}\", username: {USER}, password: {PASS}}}\n",
            broker.port
        ),
    )
    .unwrap();
    let mut o = Observer::connect(broker.port, "bench", &["burnin/status", "burnin/reply"]).await;
    // What the other services would have retained.
    for (t, p) in [
        ("interlock/status", r#"{"state": "OK"}"#),
        ("interlock/permits", r#"{"lv_on": true}"#),
        (
            "dcs/channels/0",
            r#"{"module": "m0", "lv_status": 0, "hv_status": 0}"#,
        ),
        ("bench/dew", "-40"),
    ] {
        o.publish_acked(t, true, p).await;
    }
    let mut cmd = Command::new(bin("burnin"));
    cmd.arg("--config").arg(&file);
    let burnin = spawn_until(cmd, "connected to the broker", WAIT);
    o.wait_json("burnin/status", WAIT, "idle", |v| v["state"] == "idle")
        .await;
    let r = o
        .command(
            "burnin",
            "start",
            r#"{"sequence": "soak", "modules": ["m0"], "operator": "bench"}"#,
            WAIT,
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    o.wait_json("burnin/status", WAIT, "running", |v| {
        v["state"] == "running"
    })
    .await;
    let mut ms = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        o.discard("burnin/status");
        let t0 = Instant::now();
        o.publish("interlock/status", r#"{"state": "ALARM"}"#).await;
        o.wait_for("burnin/status", WAIT, |p| p.contains(r#""state":"paused""#))
            .await
            .unwrap_or_else(|| panic!("not paused; burnin said:\n{}", burnin.stderr_text()));
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        o.publish("interlock/status", r#"{"state": "OK"}"#).await;
        o.wait_json("burnin/status", WAIT, "running again", |v| {
            v["state"] == "running" && v["phase"] == "step"
        })
        .await;
    }
    (pct(&mut ms, 0.5), pct(&mut ms, 0.99))
}

fn engine_cpu_per_hour() -> f64 {
    let env: BTreeMap<String, dcs_shared::inputs::InputConfig> =
        serde_json::from_value(serde_json::json!({
            "dew_point": {"topic": "+/sensors/BME/dew", "max_age_secs": 30},
            "humidity": {"topic": "+/sensors/BME/humi", "max_age_secs": 30},
            "air_temp": {"topic": "+/sensors/BME/temp", "max_age_secs": 30},
            "coolant": {"topic": "julabo/status", "field": "internal_temp", "max_age_secs": 30},
        }))
        .unwrap();
    let t0 = Instant::now();
    let settings = Settings {
        hold: Duration::from_secs(300),
        max_pause: Duration::from_secs(4 * 3600),
        max_pauses: 20,
        reply_timeout: Duration::from_secs(30),
        interlock_max_age: Duration::from_secs(150),
        chiller_setpoint: 1,
        limits: Limits::default(),
    };
    let mut e = Engine::new("burnin", settings, World::new(Names::default(), &env, t0));
    let mut wall = UtcNanos::now().as_nanos();
    let channel = |i: usize| {
        format!(
            r#"{{"module": "m{i}", "lv_status": 1, "hv_status": 1, "hv_vMon": 100.0, "hv_iMon": 1.05, "lv_vMon": 12.0}}"#
        )
    };
    let feed = |e: &mut Engine, at: Instant, wall: i64, t: &str, p: &str| {
        e.on_message(t, p.as_bytes(), at, UtcNanos(wall));
    };
    for (t, p) in [
        (
            "interlock/status".to_string(),
            r#"{"state": "OK"}"#.to_string(),
        ),
        ("interlock/permits".into(), r#"{"lv_on": true}"#.into()),
        (
            "julabo/status".into(),
            r#"{"internal_temp": -34.0, "running": true}"#.into(),
        ),
    ] {
        feed(&mut e, t0, wall, &t, &p);
    }
    for b in 1..=3 {
        for q in ["dew", "humi", "temp"] {
            feed(
                &mut e,
                t0,
                wall,
                &format!("ESP0{b}/sensors/BME/{q}"),
                "-45.0",
            );
        }
    }
    for i in 0..3 {
        feed(&mut e, t0, wall, &format!("dcs/channels/{i}"), &channel(i));
    }
    let seq = sequence::parse(SOAK, std::path::Path::new("soak"), Limits::default()).unwrap();
    let (r, _) = e.request(
        Request::Start {
            name: "soak".into(),
            sequence: Box::new(seq),
            text: SOAK.into(),
            modules: vec!["m0".into(), "m1".into(), "m2".into()],
            operator: "bench".into(),
            comment: String::new(),
        },
        t0,
        UtcNanos(wall),
    );
    r.unwrap();
    // One simulated hour, 250 ms at a time, with the messages due in each step.
    let started = cpu_now();
    let mut at = t0;
    for step in 1..=(3600 * 4) {
        at += Duration::from_millis(250);
        wall += 250_000_000;
        let ms = step * 250;
        if ms % 2000 == 0 {
            for b in 1..=3 {
                for q in ["dew", "humi", "temp"] {
                    feed(
                        &mut e,
                        at,
                        wall,
                        &format!("ESP0{b}/sensors/BME/{q}"),
                        "-45.0",
                    );
                }
            }
        }
        if ms % 5000 == 0 {
            feed(
                &mut e,
                at,
                wall,
                "julabo/status",
                r#"{"internal_temp": -34.0, "running": true}"#,
            );
        }
        if ms % 10_000 == 0 {
            feed(&mut e, at, wall, "interlock/permits", r#"{"lv_on": true}"#);
            for i in 0..3 {
                feed(&mut e, at, wall, &format!("dcs/channels/{i}"), &channel(i));
            }
        }
        if ms % 60_000 == 0 {
            feed(&mut e, at, wall, "interlock/status", r#"{"state": "OK"}"#);
        }
        e.tick(at, UtcNanos(wall));
    }
    let cpu = cpu_now() - started;
    let run = e.run().unwrap();
    assert_eq!(
        run.state,
        burnin::engine::RunState::Running,
        "still soaking"
    );
    assert!(run.pauses.is_empty(), "{:?}", run.pauses);
    cpu
}

/// This process's CPU time (user + system), s.
fn cpu_now() -> f64 {
    dcs_integration_tests::cpu_seconds(std::process::id())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let cpu = engine_cpu_per_hour();
    println!("engine CPU per hour of a running sequence (soak, 3 boards, 3 channels): {:.3} s ({:.4} % of one core)", cpu, cpu / 3600.0 * 100.0);
    let (p50, p99) = pause_latency(rounds).await;
    println!("interlock ALARM on the broker -> burnin/status paused ({rounds} trips, dcs-broker): p50 {p50:.2} ms, p99 {p99:.2} ms");
}
