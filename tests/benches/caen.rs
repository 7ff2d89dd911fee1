//! CAEN FSM figures, against `caen-sim` over real Channel Access and our broker:
//! - command latency: `dcs/cmd/switch/lv/0` published -> the simulator's `Pw` changed,
//!   seen by a CA monitor of the bench (p50, p99 over many switches);
//! - monitor throughput: 200 channels whose VMon changes at 10 Hz (simulator noise above
//!   the 0.01 V deadband), updates per second reaching MQTT (`dcs/channels`) and the
//!   FSM's CPU share. The Python original polled once a second.
//!
//! `cargo build --workspace && cargo bench -p dcs-integration-tests --bench caen`

use std::time::{Duration, Instant};

use dcs_integration_tests::caen::{config, start_fsm, Ca, CaPorts, CaenSim, TestChannel};
use dcs_integration_tests::{cpu_seconds, pct, Broker, BrokerKind, Observer};

const WAIT: Duration = Duration::from_secs(60);

struct Rig {
    _dir: tempfile::TempDir,
    _sim: CaenSim,
    fsm: dcs_integration_tests::Proc,
    obs: Observer,
    ca: Ca,
    _broker: Broker,
}

async fn rig(channels: &[TestChannel<'_>], sim_extra: &str) -> Rig {
    let broker = Broker::start(BrokerKind::Dcs);
    let dir = tempfile::tempdir().unwrap();
    let ports = CaPorts::free();
    let path = dir.path().join("caen.yaml");
    let text = config(
        "dcs",
        broker.port,
        ports,
        &dir.path().join("state.json"),
        channels,
    )
    .replace("tick_ms: 20", sim_extra);
    std::fs::write(&path, text).unwrap();
    let sim = CaenSim::start(&path, ports);
    let mut obs = Observer::connect(
        broker.port,
        "bench-obs",
        &["dcs/status", "dcs/reply", "dcs/channels"],
    )
    .await;
    let fsm = start_fsm(&path, ports);
    obs.wait_for("dcs/status", WAIT, |p| p.contains("LV_OFF"))
        .await
        .expect("LV_OFF");
    let ca = Ca::new(ports).await;
    Rig {
        _dir: dir,
        _sim: sim,
        fsm,
        obs,
        ca,
        _broker: broker,
    }
}

async fn command_latency() {
    let mut r = rig(&[("0", Some("m0"), 0, 0, 12, 0)], "tick_ms: 20").await;
    let pw = r.ca.channel("test:00:000:Pw").await;
    let mut sub = pw.subscribe().await.unwrap();
    let _ = sub.recv().await; // current value
    let n = 200;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let on = i % 2 == 0;
        let t0 = Instant::now();
        r.obs
            .publish("dcs/cmd/switch/lv/0", if on { "on" } else { "off" })
            .await;
        loop {
            let s = tokio::time::timeout(WAIT, sub.recv())
                .await
                .expect("Pw monitor")
                .unwrap()
                .unwrap();
            if s.value.to_f64() == Some(if on { 1.0 } else { 0.0 }) {
                break;
            }
        }
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
        // Let the reply and the status settle so each switch is measured alone.
        r.obs.next_on("dcs/reply", WAIT).await.expect("reply");
    }
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    println!(
        "command -> CA put seen by the simulator: n={n}  p50 {p50:.2} ms  p99 {p99:.2} ms  \
         (Python: next 1 s poll, 500 ms on average)"
    );
}

async fn monitor_throughput() {
    let ids: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    let modules: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    let channels: Vec<TestChannel> = (0..200usize)
        .map(|i| {
            (
                ids[i].as_str(),
                Some(modules[i].as_str()),
                (i / 8) as u8,
                (i % 8) as u16,
                (50 + i / 12) as u8,
                (i % 12) as u16,
            )
        })
        .collect();
    let mut r = rig(&channels, "tick_ms: 100\n  noise: 0.05").await;
    let reply = {
        r.obs.publish("dcs/cmd/switch/lv", "on").await;
        r.obs.next_on("dcs/reply", WAIT).await.expect("reply")
    };
    assert!(reply.payload.contains("\"ok\":true"), "{}", reply.payload);
    r.obs
        .wait_for("dcs/status", WAIT, |p| p.contains("\"LV_ON\""))
        .await
        .expect("LV_ON");
    tokio::time::sleep(Duration::from_secs(2)).await;
    while r
        .obs
        .next_on("dcs/channels", Duration::from_millis(1))
        .await
        .is_some()
    {}
    let pid = r.fsm.child.id();
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    let window = Duration::from_secs(10);
    let mut n = 0u64;
    while t0.elapsed() < window {
        if r.obs
            .next_on("dcs/channels", Duration::from_millis(200))
            .await
            .is_some()
        {
            n += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(pid) - cpu0) / secs * 100.0;
    println!(
        "monitor throughput: 200 channels at 10 Hz -> {:.0} channel updates/s on MQTT \
         (ideal 2000), caen-fsm CPU {cpu:.0} % of one core",
        n as f64 / secs
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    command_latency().await;
    monitor_throughput().await;
}
