//! Telemetry forwarder figures, with the shipped `deploy/telemetry.yaml`:
//! - mapping + line-protocol encoding of `dcs/channels` messages (lines/s, in process);
//! - ingest: MQTT publish -> in the spool and acknowledged, no database (msg/s), with
//!   and without fsync before the ack;
//! - end to end: publish -> InfluxDB 1.6.7 acknowledged and queryable (msg/s);
//! - recovery: points/s drained from the spool after an InfluxDB outage;
//! - the forwarder's peak RSS.
//!
//! `cargo build --release --workspace && cargo bench -p dcs-integration-tests --bench telemetry`
//! `BENCH_MESSAGES` sets the messages per run (default 100000).

use std::time::{Duration, Instant};

use dcs_integration_tests::db::Influx;
use dcs_integration_tests::forwarder::{stats, Forwarder};
use dcs_integration_tests::{peak_rss_mb, Broker, BrokerKind, Observer, PASS, USER};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const PUBLISHERS: usize = 4;

fn channel_payload(id: usize) -> String {
    format!(
        r#"{{"id": "{id}", "module": "module_{id}", "lv_board": 0, "lv_channel": {id}, "lv_status": 1,
        "lv_setV": 12.0, "lv_vMon": 11.98, "lv_iMon": 1.2, "lv_maxI": 2.5, "lv_tripTime": 10.0,
        "lv_tripInt": 0, "lv_tripExt": 17, "lv_unVthr": 0.0, "lv_ovVthr": 15.0,
        "lv_rampUpTime": 100.0, "lv_rampDwnTime": 100.0, "lv_temp": 31.5, "hv_board": 12,
        "hv_channel": {id}, "hv_status": 1, "hv_setV": 200.0, "hv_vMon": 199.7, "hv_iMon": 0.8,
        "hv_maxI": 500.0, "hv_tripTime": 10.0, "hv_tripInt": 0, "hv_tripExt": 17,
        "hv_rampUpSpeed": 50.0, "hv_rampDwnSpeed": 50.0, "hv_imRange": "Low",
        "hv_tripMode": "Kill", "fsm_state": "HV_ON"}}"#
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn encoder(n: usize) -> f64 {
    let path = dcs_integration_tests::repo_root().join("deploy/telemetry.yaml");
    let cfg: telemetry::TelemetryConfig = dcs_shared::config::load(&path).expect("config");
    let mapper = telemetry::mapping::Mapper::new(&cfg.inputs).expect("mapper");
    let payloads: Vec<String> = (0..8).map(channel_payload).collect();
    let mut rates = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut out = String::new();
        for i in 0..n {
            let m = mapper
                .map("dcs/channels", payloads[i % 8].as_bytes(), i as i64)
                .expect("map");
            out.clear();
            for p in &m.points {
                dcs_shared::line_protocol::encode(p, &mut out).expect("encode");
            }
        }
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    median(rates)
}

/// Publishes `n` channel messages at QoS 1 from [`PUBLISHERS`] clients, as fast as the
/// broker takes them.
async fn publish(port: u16, n: usize) {
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let mut o = MqttOptions::new(format!("bench-pub-{p}"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_credentials(USER, PASS)
            .set_inflight(200);
        let (client, mut el) = AsyncClient::new(o, 1000);
        let count = n / PUBLISHERS;
        tasks.push(tokio::spawn(async move {
            let payloads: Vec<String> = (0..8).map(|c| channel_payload(p * 8 + c)).collect();
            let sender = tokio::spawn(async move {
                for i in 0..count {
                    client
                        .publish(
                            "dcs/channels",
                            QoS::AtLeastOnce,
                            false,
                            payloads[i % 8].clone(),
                        )
                        .await
                        .expect("publish");
                }
                client
            });
            let mut acked = 0;
            while acked < count {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                    Ok(_) => {}
                    Err(e) => panic!("publisher: {e}"),
                }
            }
            let _ = sender.await;
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
}

/// The database alone: `n` channel points, mapped and encoded by the forwarder's own
/// code beforehand, written in batches of the shipped size (5000) from `writers`
/// threads to a fresh InfluxDB, timed until the last write is acknowledged. No broker,
/// no forwarder: the ceiling any end-to-end figure through this database can reach.
fn influx_alone(n: usize, writers: usize) -> f64 {
    let path = dcs_integration_tests::repo_root().join("deploy/telemetry.yaml");
    let cfg: telemetry::TelemetryConfig = dcs_shared::config::load(&path).expect("config");
    let mapper = telemetry::mapping::Mapper::new(&cfg.inputs).expect("mapper");
    let payloads: Vec<String> = (0..8).map(channel_payload).collect();
    let t0 = dcs_shared::time::UtcNanos::now().as_nanos();
    let mut batches = Vec::new();
    let mut body = String::new();
    for i in 0..n {
        let m = mapper
            .map("dcs/channels", payloads[i % 8].as_bytes(), t0 + i as i64)
            .expect("map");
        for p in &m.points {
            dcs_shared::line_protocol::encode(p, &mut body).expect("encode");
            body.push('\n');
        }
        if (i + 1) % 5000 == 0 || i + 1 == n {
            batches.push(std::mem::take(&mut body));
        }
    }
    let influx = Influx::start();
    let url = format!("{}/write?db=dcs&precision=ns", influx.url());
    let queue = std::sync::Mutex::new(batches);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..writers {
            s.spawn(|| {
                let agent = ureq::Agent::new_with_defaults();
                loop {
                    let Some(b) = queue.lock().expect("queue").pop() else {
                        return;
                    };
                    let r = agent.post(&url).send(b.as_bytes()).expect("write");
                    assert_eq!(r.status(), 204);
                }
            });
        }
    });
    n as f64 / t.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let n = n - n % PUBLISHERS;
    println!("telemetry bench: {n} `dcs/channels` messages (~900 B JSON, 32 fields) per run");

    let enc = encoder(n);
    println!("map + encode:          {enc:>10.0} lines/s (median of 5, one core)");
    for writers in [1, 2] {
        let rates: Vec<f64> = (0..3).map(|_| influx_alone(n, writers)).collect();
        println!(
            "InfluxDB alone, {writers} writer{}: {:>7.0} points/s acknowledged (median of 3; {})",
            if writers == 1 { " " } else { "s" },
            median(rates.clone()),
            rates
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // Large broker segments: a QoS 1 burst must not overflow rumqttd's in-memory log.
    let broker = Broker::start_with(
        BrokerKind::Dcs,
        "{segment_size: 104857600, segment_count: 10, max_inflight_count: 1000}",
    );
    let faster_stats = [("stats_interval_secs: 10", "stats_interval_secs: 1")];

    for fsync in [true, false] {
        let fsync_edit = if fsync {
            ("fsync: true ", "fsync: true ")
        } else {
            ("fsync: true ", "fsync: false ")
        };
        let mut fwd = Forwarder::shipped_with(&broker, "", &[faster_stats[0], fsync_edit]);
        let mut obs = Observer::connect(broker.port, "bench-obs", &["telemetry/stats"]).await;
        fwd.start();
        stats(&mut obs, |_| true).await;
        let t = Instant::now();
        publish(broker.port, n).await;
        let published = t.elapsed();
        let want = n as u64;
        stats(&mut obs, |s| s["received"].as_u64() >= Some(want)).await;
        let ingested = t.elapsed();
        println!(
            "ingest, fsync {fsync:<5}:   {:>10.0} msg/s into the spool (publishers done at {:.0} msg/s)",
            n as f64 / ingested.as_secs_f64(),
            n as f64 / published.as_secs_f64()
        );
        // A forwarder that is gone must not keep its persistent session's backlog.
        if let Some(p) = fwd.proc.as_mut() {
            p.terminate(Duration::from_secs(10));
        }
    }

    let mut influx = Influx::start();
    let mut fwd = Forwarder::shipped_with(&broker, &influx.url(), &faster_stats);
    let mut obs = Observer::connect(broker.port, "bench-obs2", &["telemetry/stats"]).await;
    fwd.start();
    stats(&mut obs, |_| true).await;
    let count = |influx: &Influx| {
        influx
            .rows("SELECT count(lv_vMon) FROM channels")
            .first()
            .and_then(|r| r["count"].as_i64())
            .unwrap_or(0)
    };
    let t = Instant::now();
    publish(broker.port, n).await;
    let published = t.elapsed();
    let total = n as i64;
    while count(&influx) < total {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "end to end too slow"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e2e = t.elapsed();
    println!(
        "end to end (InfluxDB):  {:>10.0} msg/s publish -> queryable ({:.1} s; publishers done at {:.0} msg/s)",
        n as f64 / e2e.as_secs_f64(),
        e2e.as_secs_f64(),
        n as f64 / published.as_secs_f64()
    );

    // Outage: InfluxDB killed, n more messages spooled, then drained.
    influx.kill();
    publish(broker.port, n).await;
    let want = 2 * n as u64;
    let s = stats(&mut obs, |s| s["received"].as_u64() >= Some(want)).await;
    let spooled_mb = s["spool_bytes"].as_u64().unwrap_or(0) as f64 / 1e6;
    influx.restart();
    let t = Instant::now();
    while count(&influx) < 2 * total {
        assert!(t.elapsed() < Duration::from_secs(600), "drain too slow");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "recovery after outage:  {:>10.0} points/s drained ({spooled_mb:.1} MB spooled)",
        n as f64 / t.elapsed().as_secs_f64()
    );
    if let Some(p) = &fwd.proc {
        println!(
            "forwarder peak RSS:     {:>10.1} MB",
            peak_rss_mb(p.child.id())
        );
    }
    if let Some(pid) = broker.pid() {
        println!("broker peak RSS:        {:>10.1} MB", peak_rss_mb(pid));
    }
}
