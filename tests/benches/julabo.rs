//! Julabo status cycle: the nine queries behind `julabo/status`, against the simulator
//! enforcing the real unit's 250 ms spacing, compared with the Python driver's fixed
//! sleeps (250 ms before every write, 100 ms before every read: about 3.1 s a cycle).
//! Also probes which spacing the unit tolerates, to show where the pacing comes from.
//!
//!
//! Then commands through MQTT, as a dashboard or a sequencer sends them, with the
//! shipped driver timing (260 ms spacing at 4800 baud, 5 s poll) against the 250 ms
//! unit, at random phases of the poll: command -> reply, command -> `julabo/status`
//! showing the effect, and start -> the interlock's LV permit.
//!
//! `cargo build --release --bins && cargo bench -p dcs-integration-tests --bench julabo`

use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use dcs_integration_tests::{bin, free_port, spawn_until, Broker, BrokerKind, PASS, USER};
use julabo::chiller::read_all;
use julabo::config::SerialSettings;
use julabo::transport::{open, Endpoint, Link};

fn dropped(control: u16) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", control)).unwrap();
    s.write_all(b"state\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["dropped"].as_u64().unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (port, control) = (free_port(), free_port());
    let mut cmd = Command::new(bin("julabo-sim"));
    cmd.args([
        "--tcp",
        &format!("127.0.0.1:{port}"),
        "--control",
        &format!("127.0.0.1:{control}"),
    ]);
    let _sim = spawn_until(cmd, "julabo-sim: control on", Duration::from_secs(15));
    let ep = Endpoint::parse(&format!("tcp://127.0.0.1:{port}")).unwrap();
    let serial = SerialSettings::default();

    println!("julabo status cycle (9 queries) over TCP against julabo-sim (unit drops commands < 250 ms apart);");
    println!("spacing is counted from the end of the previous command at 4800 baud 7E1, as the driver does");
    println!(
        "{:>12} {:>8} {:>12} {:>10} {:>14}",
        "spacing ms", "cycles", "median s", "failed", "unit dropped"
    );
    let mut median_260 = f64::NAN;
    for spacing in [200u64, 240, 250, 260] {
        let before = dropped(control);
        let mut link = Link::new(
            open(&ep, &serial, Duration::from_secs(3)).await.unwrap(),
            Duration::from_millis(spacing),
            Duration::from_millis(400),
        )
        .with_line_speed(&serial);
        let mut times = Vec::new();
        let mut failed = 0;
        for _ in 0..5 {
            let t0 = Instant::now();
            match read_all(&mut link).await {
                Ok(_) => times.push(t0.elapsed().as_secs_f64()),
                Err(_) => failed += 1,
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        if spacing == 260 {
            median_260 = median;
        }
        println!(
            "{:>12} {:>8} {:>12.3} {:>10} {:>14}",
            spacing,
            times.len(),
            median,
            failed,
            dropped(control) - before
        );
        // Let the unit's spacing window pass before the next series.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let python = 9.0 * (0.100 + 0.250);
    println!(
        "shipped pacing (260 ms): {median_260:.3} s per cycle vs Python's fixed sleeps ~{python:.2} s (measured there ~3.1 s): {:.2}x faster",
        3.1 / median_260
    );
    command_latency().await;
}

/// Messages as they arrive, with the instant they did.
type Arrivals = tokio::sync::mpsc::UnboundedReceiver<(Instant, String, serde_json::Value)>;

async fn subscriber(port: u16, filters: &[&str]) -> (rumqttc::AsyncClient, Arrivals) {
    let mut o = rumqttc::MqttOptions::new("bench-op", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_credentials(USER, PASS);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    for f in filters {
        client
            .subscribe(*f, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
                let v = serde_json::from_slice(&p.payload).unwrap_or_default();
                if tx.send((Instant::now(), p.topic.clone(), v)).is_err() {
                    return;
                }
            }
        }
    });
    (client, rx)
}

/// A condition on a JSON payload.
type Want<'a> = dyn Fn(&serde_json::Value) -> bool + 'a;

/// Waits for each of `wants` (topic, predicate) and returns when each first held,
/// counted from `t0`.
async fn timings(rx: &mut Arrivals, t0: Instant, wants: &[(&str, &Want<'_>)]) -> Vec<f64> {
    let mut got: Vec<Option<f64>> = vec![None; wants.len()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.iter().any(Option::is_none) {
        let Ok(Some((at, topic, v))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            panic!(
                "not all of {:?} within 20 s",
                wants.iter().map(|w| w.0).collect::<Vec<_>>()
            );
        };
        for (i, (t, pred)) in wants.iter().enumerate() {
            if got[i].is_none() && topic == *t && pred(&v) {
                got[i] = Some(at.duration_since(t0).as_secs_f64() * 1000.0);
            }
        }
    }
    got.into_iter().map(Option::unwrap_or_default).collect()
}

fn summary(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    println!(
        "{name:<34} {:>8.0} {:>8.0} {:>8.0} {:>5}",
        q(0.5),
        q(0.99),
        ms[ms.len() - 1],
        ms.len()
    );
}

async fn command_latency() {
    let broker = Broker::start(BrokerKind::Dcs);
    let (port, control) = (free_port(), free_port());
    let mut cmd = Command::new(bin("julabo-sim"));
    cmd.args([
        "--tcp",
        &format!("127.0.0.1:{port}"),
        "--control",
        &format!("127.0.0.1:{control}"),
    ]);
    let _sim = spawn_until(cmd, "julabo-sim: control on", Duration::from_secs(15));
    let dir = tempfile::tempdir().unwrap();
    let mqtt = format!(
        "mqtt: {{url: {}, username: {USER}, password: {PASS}}}",
        broker.url()
    );
    // The shipped driver config, pointed at this simulator and broker.
    let shipped =
        std::fs::read_to_string(dcs_integration_tests::repo_root().join("deploy/julabo.yaml"))
            .unwrap()
            .replace(
                "${JULABO_PORT:-tcp://127.0.0.1:5050}",
                &format!("tcp://127.0.0.1:{port}"),
            );
    std::fs::write(
        dir.path().join("julabo.yaml"),
        format!("{shipped}\n{mqtt}\n"),
    )
    .unwrap();
    let mut cmd = Command::new(bin("julabo"));
    cmd.arg("--config").arg(dir.path().join("julabo.yaml"));
    let _julabo = spawn_until(cmd, "connected to MQTT broker", Duration::from_secs(15));
    std::fs::write(
        dir.path().join("interlock.yaml"),
        format!(
            "{mqtt}\ntargets: {{caen: dcs, chiller: julabo, max_age_secs: 60}}\n\
             inputs:\n  running: {{topic: julabo/status, field: running, max_age_secs: 30}}\n\
             timing: {{evaluate_ms: 100, republish_secs: 60}}\n\
             rules:\n  cooling: {{kind: cooling_required, running: running, mode: refuse}}\n\
             permit_key_file: permit.key\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("interlock"));
    cmd.arg("--config").arg(dir.path().join("interlock.yaml"));
    let _interlock = spawn_until(cmd, "connected to the broker", Duration::from_secs(15));

    let (client, mut rx) = subscriber(
        broker.port,
        &["julabo/reply", "julabo/status", "interlock/permits"],
    )
    .await;
    timings(
        &mut rx,
        Instant::now(),
        &[("julabo/status", &|v| v["fsm_state"] == "OFF")],
    )
    .await;
    let publish = |verb: &str, payload: String| {
        let client = client.clone();
        let topic = format!("julabo/cmd/{verb}");
        async move {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    };
    let is_reply = |verb: &'static str| {
        move |v: &serde_json::Value| v["topic"] == format!("julabo/cmd/{verb}") && v["ok"] == true
    };
    let (mut set_reply, mut set_status) = (Vec::new(), Vec::new());
    let (mut start_reply, mut start_status, mut start_permit) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut stop_reply, mut stop_status) = (Vec::new(), Vec::new());
    const ROUNDS: usize = 20;
    println!();
    println!("julabo commands over MQTT, shipped timing, {ROUNDS} rounds at random phases of the 5 s poll:");
    for i in 0..ROUNDS {
        // Phases spread over the poll interval (golden-ratio steps through 0..5 s).
        let pause = |k: usize| {
            Duration::from_millis(((i * 3 + k) as f64 * 0.618_034 % 1.0 * 5000.0) as u64)
        };
        tokio::time::sleep(pause(0)).await;
        let temp = 10.0 + (i % 5) as f64;
        let t0 = Instant::now();
        publish("setWT", format!(r#"{{"setpoint": 1, "temp": {temp}}}"#)).await;
        let t = timings(
            &mut rx,
            t0,
            &[
                ("julabo/reply", &is_reply("setWT")),
                ("julabo/status", &|v| v["setpoint_1"] == temp),
            ],
        )
        .await;
        set_reply.push(t[0]);
        set_status.push(t[1]);

        tokio::time::sleep(pause(1)).await;
        let t0 = Instant::now();
        publish("start", String::new()).await;
        let t = timings(
            &mut rx,
            t0,
            &[
                ("julabo/reply", &is_reply("start")),
                ("julabo/status", &|v| v["running"] == true),
                ("interlock/permits", &|v| v["lv_on"] == true),
            ],
        )
        .await;
        start_reply.push(t[0]);
        start_status.push(t[1]);
        start_permit.push(t[2]);

        tokio::time::sleep(pause(2)).await;
        let t0 = Instant::now();
        publish("stop", String::new()).await;
        let t = timings(
            &mut rx,
            t0,
            &[
                ("julabo/reply", &is_reply("stop")),
                ("julabo/status", &|v| v["running"] == false),
                ("interlock/permits", &|v| v["lv_on"] == false),
            ],
        )
        .await;
        stop_reply.push(t[0]);
        stop_status.push(t[1]);
    }
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>5}",
        "ms", "p50", "p99", "max", "n"
    );
    summary("setWT -> reply", set_reply);
    summary("setWT -> status shows it", set_status);
    summary("start -> reply", start_reply);
    summary("start -> status running", start_status);
    summary("start -> interlock LV permit", start_permit);
    summary("stop -> reply", stop_reply);
    summary("stop -> status stopped", stop_status);
    println!("before (issue 18, same setup): replies 2500-5500 ms, LV permit ~6000 ms after the start's reply");
}
