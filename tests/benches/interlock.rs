//! Interlock figures, over our broker with real clients:
//! - reaction time: a breaching sensor message published -> the first safety command
//!   (`dcs/cmd/switch/hv off`) received by a client subscribed to it (p50, p99);
//! - load: 1,000 sensor topics updating at 1 Hz (env-sim with 250 boards x 4
//!   quantities, every one an input of a rule): the interlock's CPU share and RSS.
//!
//! `cargo build --workspace && cargo bench -p dcs-integration-tests --bench interlock`

use std::process::Command;
use std::time::{Duration, Instant};

use dcs_integration_tests::{
    bin, cpu_seconds, pct, peak_rss_mb, spawn_until, Broker, BrokerKind, Observer, PASS, USER,
};

const WAIT: Duration = Duration::from_secs(30);

fn rules(port: u16) -> String {
    format!(
        r#"
mqtt: {{url: "mqtt://127.0.0.1:{port}", username: {USER}, password: {PASS}, keep_alive_secs: 5}}
inputs:
  bath: {{topic: bench/bath, max_age_secs: 3600}}
  dew: {{topic: "+/sensors/BME/dew", max_age_secs: 30}}
  temp: {{topic: "+/sensors/BME/temp", max_age_secs: 30}}
  humi: {{topic: "+/sensors/BME/humi", max_age_secs: 30}}
  co2: {{topic: "+/sensors/SCD30/co2", max_age_secs: 30}}
rules:
  dew_point:
    kind: dew_point
    cold: [bath]
    dew: [dew]
    margin: 3
    hysteresis: 1
    inhibit_lv: false
    actions: [{{do: hv_off}}]
    confirm_timeout_secs: 3600
  hot: {{kind: over_temperature, inputs: [temp], limit: 40, hysteresis: 1, inhibit_lv: false}}
  wet: {{kind: over_temperature, inputs: [humi], limit: 95, hysteresis: 1, inhibit_lv: false}}
  stuffy: {{kind: over_temperature, inputs: [co2], limit: 5000, hysteresis: 100, inhibit_lv: false}}
"#
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // BENCH_BROKER=mosquitto runs the same against Debian's Mosquitto.
    let kind = match std::env::var("BENCH_BROKER").as_deref() {
        Ok("mosquitto") => BrokerKind::Mosquitto,
        _ => BrokerKind::Dcs,
    };
    let broker = Broker::start(kind);
    println!("broker: {kind:?}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("interlock.yaml");
    std::fs::write(&file, rules(broker.port)).unwrap();
    let mut cmd = Command::new(bin("interlock"));
    cmd.arg("--config").arg(&file);
    let il = spawn_until(cmd, "connected to the broker", WAIT);
    let pid = il.child.id();
    let mut obs = Observer::connect(
        broker.port,
        "bench",
        &["dcs/cmd/switch/hv", "alarms/reply", "alarms/dew_point"],
    )
    .await;
    // Let the interlock subscribe.
    obs.wait_for("alarms/dew_point", WAIT, |_| true)
        .await
        .expect("interlock up");
    obs.publish("bench/bath", "20.0").await;
    // The sensor board: a client of its own, as in the lab.
    let board = Observer::connect(broker.port, "board", &[]).await;

    // Reaction time.
    let rounds = 200;
    let mut ms = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        obs.publish("ESP001/sensors/BME/dew", "5.0").await;
        // Back to normal and acknowledged: the next breach raises a fresh alarm.
        loop {
            obs.discard("alarms/reply");
            obs.publish("alarms/cmd/ack", "dew_point").await;
            let r = obs.next_on("alarms/reply", WAIT).await.expect("ack reply");
            if r.payload.contains("\"ok\":true") || r.payload.contains("nothing to acknowledge") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        obs.discard("dcs/cmd/switch/hv");
        let t0 = Instant::now();
        board.publish("ESP001/sensors/BME/dew", "18.0").await;
        obs.next_on("dcs/cmd/switch/hv", WAIT)
            .await
            .expect("HV off command");
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "reaction (breaching message -> HV off command on the wire), {rounds} rounds: p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut ms, 0.5),
        pct(&mut ms, 0.99)
    );
    obs.publish("ESP001/sensors/BME/dew", "5.0").await;

    // Load: 1,000 topics at 1 Hz.
    let mut sim = Command::new(bin("env-sim"));
    sim.args(["--boards", "250", "--interval-secs", "1"])
        .env("DCS_MQTT_URL", broker.url())
        .env("DCS_MQTT_USERNAME", USER)
        .env("DCS_MQTT_PASSWORD", PASS);
    let _sim = spawn_until(sim, "env-sim publishing", WAIT);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let secs = 30.0;
    let (c0, t0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let cpu = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64();
    println!(
        "load (1,000 sensor topics at 1 Hz, 4 rules over them): interlock CPU {:.1} % of one core, peak RSS {:.1} MB",
        cpu * 100.0,
        peak_rss_mb(pid)
    );
}
