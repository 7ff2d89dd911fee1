//! Broker throughput and latency: 10 publishers -> 1 subscriber, 100-byte payloads,
//! QoS 0 and QoS 1, `dcs-broker` and Debian's Mosquitto measured in the same run.
//!
//! `cargo build --release -p dcs-broker && cargo bench -p dcs-integration-tests --bench broker`
//! Prints messages/s, p50/p99 latency (publish call -> delivery to the subscriber),
//! messages lost, and the broker's peak RSS (VmHWM). `BENCH_MESSAGES` sets messages per
//! publisher (default 10000).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dcs_integration_tests::{peak_rss_mb, Broker, BrokerKind, PASS, USER};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const PUBLISHERS: usize = 10;
const PAYLOAD: usize = 100;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_credentials(USER, PASS)
        .set_inflight(100);
    o
}

struct Figures {
    sent: usize,
    received: usize,
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    peak_rss_mb: f64,
}

/// One run; `rate` paces each publisher (messages/s), `None` publishes as fast as it can.
async fn run(broker: &Broker, qos: QoS, per_publisher: usize, rate: Option<u32>) -> Figures {
    let port = broker.port;
    // Subscriber first, and wait for its SUBACK.
    let (sub, mut sub_el) = AsyncClient::new(options("bench-sub", port), 1000);
    sub.subscribe("bench/#", qos).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let sub_task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match sub_el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let recv = now_ns();
                    let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap_or([0; 8]));
                    if tx.send(recv.saturating_sub(sent)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("subscriber: {e}");
                    return;
                }
            }
        }
    });
    ready_rx.await.unwrap();

    let total = PUBLISHERS * per_publisher;
    let start = Instant::now();
    let mut pubs = Vec::new();
    for i in 0..PUBLISHERS {
        let (c, mut el) = AsyncClient::new(options(&format!("bench-pub-{i}"), port), 1000);
        // Done when every message left the socket (QoS 0) or was acknowledged (QoS 1):
        // disconnecting earlier would drop what the client still queues.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let driver = tokio::spawn(async move {
            let mut done = Some(done_tx);
            let mut count = 0;
            loop {
                match el.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_)))
                        if qos == QoS::AtMostOnce =>
                    {
                        count += 1
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => count += 1,
                    Ok(_) => {}
                    Err(_) => return,
                }
                if count == per_publisher {
                    if let Some(d) = done.take() {
                        let _ = d.send(());
                    }
                }
            }
        });
        pubs.push(tokio::spawn(async move {
            let topic = format!("bench/{i}");
            let mut tick =
                rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(r))));
            for _ in 0..per_publisher {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let mut payload = vec![0u8; PAYLOAD];
                payload[..8].copy_from_slice(&now_ns().to_be_bytes());
                if c.publish(&topic, qos, false, payload).await.is_err() {
                    break;
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(60), done_rx).await;
            let _ = c.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
        }));
    }

    let mut lat = Vec::with_capacity(total);
    let mut last = start;
    // Done when all arrived, or nothing came for 2 s (the rest is lost).
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        lat.push(l);
        last = Instant::now();
        if lat.len() == total {
            break;
        }
    }
    let elapsed = last.duration_since(start).as_secs_f64();
    for p in pubs {
        let _ = p.await;
    }
    sub_task.abort();
    lat.sort_unstable();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q) as usize)
            .map_or(f64::NAN, |&ns| ns as f64 / 1e3)
    };
    Figures {
        sent: total,
        received: lat.len(),
        rate: lat.len() as f64 / elapsed.max(1e-9),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        peak_rss_mb: broker.pid().map_or(f64::NAN, peak_rss_mb),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let per_publisher: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    println!(
        "broker bench: {PUBLISHERS} publishers -> 1 subscriber, {PAYLOAD} B payloads, {} messages per run, loopback",
        PUBLISHERS * per_publisher
    );
    println!("Saturation: every publisher as fast as it can (latency here is queueing).");
    println!(
        "{:<40} {:>4} {:>10} {:>7} {:>9} {:>9} {:>8}",
        "broker", "qos", "msg/s", "lost", "p50 ms", "p99 ms", "RSS MB"
    );
    let setups: [(&str, BrokerKind, &str); 3] = [
        (
            "dcs-broker (shipped limits: 4 MiB x 4)",
            BrokerKind::Dcs,
            "",
        ),
        (
            "dcs-broker (segments 1 MiB x 2)",
            BrokerKind::Dcs,
            "{segment_size: 1048576, segment_count: 2}",
        ),
        ("mosquitto 2.0.11", BrokerKind::Mosquitto, ""),
    ];
    let mut rates = std::collections::HashMap::new();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        for (label, kind, limits) in &setups {
            let broker = Broker::start_with(*kind, limits);
            let f = run(&broker, qos, per_publisher, None).await;
            print_row(label, qos, &f);
            rates.insert((*label, qos as u8), f.rate);
        }
    }
    for qos in [0u8, 1] {
        let dcs = rates[&(setups[0].0, qos)];
        let mosq = rates[&(setups[2].0, qos)];
        println!(
            "QoS {qos}: dcs-broker / mosquitto throughput ratio = {:.2}",
            dcs / mosq
        );
    }
    let paced = 500;
    let n = 2000;
    println!(
        "\nLatency at a steady load: {PUBLISHERS} x {paced} msg/s = {} msg/s, {} messages per run.",
        PUBLISHERS as u32 * paced,
        PUBLISHERS * n
    );
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        for (label, kind, limits) in [&setups[0], &setups[2]] {
            let broker = Broker::start_with(*kind, limits);
            let f = run(&broker, qos, n, Some(paced)).await;
            print_row(label, qos, &f);
        }
    }
}

fn print_row(label: &str, qos: QoS, f: &Figures) {
    println!(
        "{:<40} {:>4} {:>10.0} {:>7} {:>9.2} {:>9.2} {:>8.1}",
        label,
        qos as u8,
        f.rate,
        f.sent - f.received,
        f.p50_us / 1e3,
        f.p99_us / 1e3,
        f.peak_rss_mb
    );
}
