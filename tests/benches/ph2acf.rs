//! Ph2_ACF bridge figures, with the real simulator middleware and SecantusDB:
//! - overhead per run: the bridge's CPU time per run, and the delay from the end
//!   instant the bridge records to the run document being queryable (p50, max);
//! - ingest: a large run (128 chips x 1920 channels, a 64 MiB Results.root) from its
//!   end to the document queryable: chips/s, document MB/s, GridFS MB/s.
//!
//! `cargo build --release --workspace && cargo bench -p dcs-integration-tests --bench ph2acf`

use std::process::Command;
use std::time::{Duration, Instant};

use dcs_integration_tests::db::Mongo;
use dcs_integration_tests::{
    bin, cpu_seconds, free_port, pct, spawn_until, Broker, BrokerKind, Observer, PASS, USER,
};
use mongodb::bson::{doc, Document};

const RUN: &str =
    r#"{"calibration":"pedenoise","config":"PS","modules":["M1"],"operator":"bench"}"#;

async fn one_run(obs: &mut Observer, runs: &mongodb::Collection<Document>) -> (Duration, Document) {
    obs.discard("ph2acf/status");
    obs.publish("ph2acf/cmd/run", RUN.to_string()).await;
    let st = obs
        .wait_for("ph2acf/status", Duration::from_secs(60), |p| {
            p.contains("\"running\"")
        })
        .await
        .expect("running");
    let v: serde_json::Value = serde_json::from_str(&st.payload).unwrap();
    let run_id = v["run_id"].as_str().unwrap().to_string();
    loop {
        if let Ok(Some(d)) = runs
            .find_one(doc! {"run_id": &run_id, "status": "done"})
            .await
        {
            let seen = dcs_shared::UtcNanos::now().as_nanos();
            let end = d.get_i64("end_time_ns").unwrap();
            return (Duration::from_nanos((seen - end).max(0) as u64), d);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main]
async fn main() {
    let broker = Broker::start(BrokerKind::Dcs);
    let mongo = Mongo::start();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("PS.xml"), "<HwDescription/>").unwrap();
    let sim_port = free_port();
    let start_sim = |hybrids: u32, channels: u32, root: u64| {
        std::fs::write(
            p("sim.yaml"),
            format!(
                "listen: 127.0.0.1:{sim_port}\nbase_dir: work\nrun_secs: 0.5\n\
                 results_root_bytes: {root}\nhybrids: {hybrids}\nchannels: {channels}\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new(bin("ph2acf-sim"));
        cmd.arg("--config").arg(p("sim.yaml"));
        spawn_until(cmd, "middleware listening", Duration::from_secs(30))
    };
    std::fs::write(
        p("bridge.yaml"),
        format!(
            "mqtt: {{url: \"{}\", username: {USER}, password: {PASS}}}\nbackend: middleware\n\
             middleware: {{address: \"127.0.0.1:{sim_port}\", poll_ms: 100}}\nwork_dir: work\n\
             queue_dir: queue\ncalibrations: [pedenoise]\nconfigs: {{PS: PS.xml}}\nmodules: [M1]\n\
             mongodb: {{uri: \"{}\"}}\n",
            broker.url(),
            mongo.uri()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("ph2acf-bridge"));
    cmd.arg("--config").arg(p("bridge.yaml"));
    let bridge = spawn_until(cmd, "ph2acf bridge started", Duration::from_secs(30));
    let pid = bridge.child.id();
    let mut obs = Observer::connect(broker.port, "bench-ph2acf", &["ph2acf/#"]).await;
    let client = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
    let runs = client.database("dcs").collection::<Document>("runs");

    // Overhead: 20 ordinary runs (16 chips x 120 channels, 1 MiB Results.root).
    let mut sim = start_sim(1, 120, 1 << 20);
    let cpu0 = cpu_seconds(pid);
    let mut delays = Vec::new();
    let t0 = Instant::now();
    for _ in 0..20 {
        let (d, _) = one_run(&mut obs, &runs).await;
        delays.push(d.as_secs_f64() * 1e3);
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    println!(
        "overhead: 20 runs of 0.5 s in {wall:.1} s; bridge CPU {:.1} ms per run ({:.1} % of one core); \
         end instant -> document queryable p50 {:.1} ms, max {:.1} ms",
        cpu / 20.0 * 1e3,
        cpu / wall * 100.0,
        pct(&mut delays, 0.5),
        pct(&mut delays, 1.0),
    );
    sim.kill();

    // Ingest: one large run, 3 times.
    let _sim = start_sim(8, 1920, 64 << 20);
    for _ in 0..3 {
        let (d, doc) = one_run(&mut obs, &runs).await;
        let bytes = mongodb::bson::to_vec(&doc).unwrap().len() as f64;
        let chips = doc.get_array("chips").unwrap().len() as f64;
        let s = d.as_secs_f64();
        println!(
            "ingest: {chips} chips, document {:.1} MB, Results.root 64 MiB to GridFS: {s:.2} s from end to queryable \
             ({:.0} chips/s, {:.1} MB/s in all)",
            bytes / 1e6,
            chips / s,
            (bytes + (64u64 << 20) as f64) / 1e6 / s
        );
    }
}
