//! MARTA: the full poll cycle (55 readings, alarm, control and status words) against
//! marta-sim, side by side with pymodbus's client reading the same spans and with one
//! request per reading (a driver without chunking); command -> confirmed register write
//! through MQTT with the shipped 1 s poll; the idle driver's CPU and memory.
//!
//! `cargo build --release --bins && cargo bench -p dcs-integration-tests --bench marta`

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dcs_integration_tests::{
    bin, cpu_seconds, free_port, pct, peak_rss_mb, repo_root, spawn_until, Broker, BrokerKind,
    Observer, PASS, USER,
};

const ROUNDS: usize = 300;

fn ms(v: &mut [f64]) -> (f64, f64) {
    (pct(v, 0.5) * 1e3, pct(v, 0.99) * 1e3)
}

/// pymodbus's client polling `port`: `spans` (one request each) or one request per
/// reading; prints the cycle times, one per line.
fn pymodbus_cycles(port: u16, per_reading: bool) -> Vec<f64> {
    let script = r#"
import sys, time, yaml
from pymodbus.client import ModbusTcpClient
m = yaml.safe_load(open(sys.argv[1])); port = int(sys.argv[2]); per = sys.argv[3] == "1"
if per:
    reqs = [(r["register"], 2) for r in m["readings"]] + [(300, 4), (305, 1), (310, 6), (320, 1)]
else:
    reqs = [(100, 66), (168, 44), (300, 4), (305, 1), (310, 6), (320, 1)]
c = ModbusTcpClient("127.0.0.1", port=port); c.connect()
for _ in range(int(sys.argv[4])):
    t = time.perf_counter()
    for a, n in reqs:
        r = c.read_holding_registers(a, count=n, slave=1)
        assert not r.isError(), r
    print(time.perf_counter() - t)
"#;
    let out = Command::new(repo_root().join(".venv/bin/python"))
        .args(["-c", script])
        .arg(repo_root().join("deploy/marta-registers.yaml"))
        .arg(port.to_string())
        .arg(if per_reading { "1" } else { "0" })
        .arg(ROUNDS.to_string())
        .output()
        .expect("python (.venv, made by .ci/run)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

fn config(dir: &Path, port: u16, broker: Option<&Broker>) -> std::path::PathBuf {
    let cfg = dir.join("marta.yaml");
    let mqtt = broker.map_or(String::new(), |b| {
        format!(
            "mqtt: {{url: {}, username: {USER}, password: {PASS}}}\n",
            b.url()
        )
    });
    std::fs::write(
        &cfg,
        format!(
            "register_map: {}\nconnection: {{host: 127.0.0.1, port: {port}}}\n{mqtt}",
            repo_root().join("deploy/marta-registers.yaml").display()
        ),
    )
    .unwrap();
    cfg
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (port, control) = (free_port(), free_port());
    let sim_cfg = dir.path().join("marta-sim.yaml");
    std::fs::write(
        &sim_cfg,
        format!(
            "tcp: 127.0.0.1:{port}\ncontrol: 127.0.0.1:{control}\nregister_map: {}\n",
            repo_root().join("deploy/marta-registers.yaml").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("marta-sim"));
    cmd.arg("--config").arg(&sim_cfg);
    let _sim = spawn_until(cmd, "marta-sim: control on", Duration::from_secs(15));

    // A) The poll cycle, in this process (the driver's own code) and with pymodbus.
    let file = config(dir.path(), port, None);
    let mut cfg: marta::MartaConfig =
        dcs_shared::config::from_str(&std::fs::read_to_string(&file).unwrap(), &file).unwrap();
    cfg.map = Some(marta::load_map(&repo_root().join("deploy/marta-registers.yaml")).unwrap());
    let spans = cfg.map.as_ref().unwrap().spans.len();
    let mut driver = marta::driver::Driver::new(cfg).unwrap();
    assert!(driver.poll().await, "marta-sim does not answer");
    let mut ours = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        assert!(driver.poll().await);
        ours.push(t.elapsed().as_secs_f64());
    }
    let mut py_spans = pymodbus_cycles(port, false);
    let mut py_each = pymodbus_cycles(port, true);
    let (o50, o99) = ms(&mut ours);
    let (p50, p99) = ms(&mut py_spans);
    let (e50, e99) = ms(&mut py_each);
    println!("MARTA full poll (55 readings + alarm, control, set-point and status words) against marta-sim, {ROUNDS} cycles, ms:");
    println!(
        "{:<44} {:>9} {:>8} {:>8}",
        "client", "requests", "p50", "p99"
    );
    println!(
        "{:<44} {:>9} {:>8.2} {:>8.2}",
        "marta driver (tokio-modbus)", spans, o50, o99
    );
    println!(
        "{:<44} {:>9} {:>8.2} {:>8.2}",
        "pymodbus 3.8, same spans", spans, p50, p99
    );
    println!(
        "{:<44} {:>9} {:>8.2} {:>8.2}",
        "pymodbus 3.8, one request per reading",
        55 + 4,
        e50,
        e99
    );
    println!(
        "ratio: pymodbus same spans / ours p50 {:.1}x; one per reading / ours {:.1}x",
        p50 / o50,
        e50 / o50
    );
    drop(driver);

    // B) Command -> reply (the write read back) through MQTT, shipped 1 s poll.
    let broker = Broker::start(BrokerKind::Dcs);
    let file = config(dir.path(), port, Some(&broker));
    let mut cmd = Command::new(bin("marta"));
    cmd.arg("--config").arg(&file);
    let proc = spawn_until(cmd, "connected to MQTT broker", Duration::from_secs(15));
    let mut obs = Observer::connect(broker.port, "bench-marta", &["MARTA/#"]).await;
    obs.wait_json("MARTA/status", Duration::from_secs(15), "CONNECTED", |s| {
        s["fsm_state"] == "CONNECTED"
    })
    .await;
    let mut lat = Vec::new();
    for i in 0..50 {
        obs.discard("MARTA/reply");
        // Spread over the poll's phase.
        tokio::time::sleep(Duration::from_millis(37 * (i % 27) as u64)).await;
        let sp = if i % 2 == 0 { "-20" } else { "-21.5" };
        let t = Instant::now();
        let r = obs
            .command(
                "MARTA",
                "set_temperature_setpoint",
                sp,
                Duration::from_secs(10),
            )
            .await;
        lat.push(t.elapsed().as_secs_f64());
        assert_eq!(r["ok"], true, "{r}");
    }
    let (c50, c99) = ms(&mut lat);
    println!("set_temperature_setpoint -> reply (written, read back, polled), 50 rounds at spread poll phases: p50 {c50:.2} ms, p99 {c99:.2} ms");

    // C) Idle: the shipped 1 s poll, nothing asked.
    let pid = proc.child.id();
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(20)).await;
    let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    println!(
        "idle marta (1 s poll, 20 s): CPU {cpu:.2} %, peak RSS {:.1} MB",
        peak_rss_mb(pid)
    );
}
