//! The Ph2_ACF bridge with real peers: dcs-broker, the ph2acf-sim middleware and
//! command line, SecantusDB (MongoDB wire protocol) and InfluxDB 1.6.7.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dcs_integration_tests::db::{Influx, Mongo};
use dcs_integration_tests::{
    bin, free_port, spawn_until, Broker, BrokerKind, Observer, Proc, PASS, USER,
};
use futures_util::io::AsyncReadExt as _;
use mongodb::bson::{doc, Bson, Document};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const ROOT_BYTES: u64 = 300_000;

struct Setup {
    dir: tempfile::TempDir,
    sim_port: u16,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("work")).unwrap();
        std::fs::write(
            dir.path().join("PS.xml"),
            "<HwDescription><BeBoard Id=\"0\"/></HwDescription>\n",
        )
        .unwrap();
        Setup {
            dir,
            sim_port: free_port(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Simulator config; `fault` is a YAML flow mapping or empty.
    fn sim_config(&self, name: &str, run_secs: f64, fault: &str) -> PathBuf {
        let fault = if fault.is_empty() {
            String::new()
        } else {
            format!("fault: {fault}\n")
        };
        let p = self.path(name);
        std::fs::write(
            &p,
            format!(
                "listen: 127.0.0.1:{}\nbase_dir: work\nrun_secs: {run_secs}\nresults_root_bytes: {ROOT_BYTES}\n\
                 hybrids: 1\nchannels: 16\n{fault}",
                self.sim_port
            ),
        )
        .unwrap();
        p
    }

    fn start_sim(&self, run_secs: f64, fault: &str) -> Proc {
        let mut cmd = Command::new(bin("ph2acf-sim"));
        cmd.arg("--config")
            .arg(self.sim_config("sim-server.yaml", run_secs, fault));
        spawn_until(cmd, "middleware listening", WAIT)
    }

    /// Bridge config. `backend` is `middleware` or `cli` (the CLI runs the simulator's
    /// command-line mode with a config of `run_secs`, `fault`).
    fn bridge_config(
        &self,
        broker: &Broker,
        backend: &str,
        mongo: &str,
        influx: &str,
        cli_fault: &str,
    ) -> PathBuf {
        let cli_cfg = self.sim_config("sim-cli.yaml", 1.5, cli_fault);
        let p = self.path("bridge.yaml");
        std::fs::write(
            &p,
            format!(
                "mqtt: {{url: \"{}\", username: {USER}, password: {PASS}, keep_alive_secs: 5}}\n\
                 backend: {backend}\n\
                 middleware: {{address: \"127.0.0.1:{}\", reply_timeout_secs: 2, poll_ms: 100}}\n\
                 cli: {{program: \"{}\", args: [cli, --config, \"{}\", -b]}}\n\
                 work_dir: work\nqueue_dir: queue\nstall_timeout_secs: 3\nrun_timeout_secs: 60\n\
                 calibrations: [pedenoise, calibration]\nconfigs: {{PS_module: PS.xml}}\n\
                 modules: [PS_1, PS_2]\n\
                 mongodb: {{uri: \"{mongo}\", database: dcs, timeout_secs: 1}}\n\
                 influx: {{url: \"{influx}\", database: dcs}}\n",
                broker.url(),
                self.sim_port,
                bin("ph2acf-sim").display(),
                cli_cfg.display(),
            ),
        )
        .unwrap();
        p
    }
}

fn start_bridge(cfg: &Path) -> Proc {
    let mut cmd = Command::new(bin("ph2acf-bridge"));
    cmd.arg("--config").arg(cfg);
    spawn_until(cmd, "ph2acf bridge started", WAIT)
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}

const RUN: &str = r#"{"calibration":"pedenoise","config":"PS_module","modules":["PS_2","PS_1"],"operator":"alice","comment":"after reflow; LV at 10.5 V"}"#;

/// Sends `payload` to `ph2acf/cmd/<verb>` and returns the reply.
async fn command(obs: &mut Observer, verb: &str, payload: &str) -> Value {
    obs.discard("ph2acf/reply");
    obs.publish(&format!("ph2acf/cmd/{verb}"), payload.to_string())
        .await;
    let r = obs
        .wait_for("ph2acf/reply", WAIT, |_| true)
        .await
        .unwrap_or_else(|| panic!("no reply to {verb}"));
    json(&r.payload)
}

/// Waits for a status whose `last_run.status` is set after `run_id` started; returns it.
async fn wait_ended(obs: &mut Observer, run_id: &str) -> Value {
    let id = run_id.to_string();
    let s = obs
        .wait_for("ph2acf/status", WAIT, move |p| {
            let v = json(p);
            v["state"] == "idle" && v["last_run"]["run_id"] == id.as_str()
        })
        .await
        .unwrap_or_else(|| panic!("run {run_id} did not end"));
    json(&s.payload)
}

async fn run_document(mongo_uri: &str, run_id: &str, want: impl Fn(&Document) -> bool) -> Document {
    let client = mongodb::Client::with_uri_str(mongo_uri).await.unwrap();
    let runs = client.database("dcs").collection::<Document>("runs");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(Some(d)) = runs.find_one(doc! {"run_id": run_id}).await {
            if want(&d) {
                return d;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run document {run_id} not in MongoDB"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn chip_count(d: &Document) -> usize {
    d.get_array("chips").map(|a| a.len()).unwrap_or(0)
}

/// Checks the stored run: the document, GridFS, and the two markers in InfluxDB at
/// the document's very instants.
async fn check_stored(mongo_uri: &str, influx: &Influx, run_id: &str) -> Document {
    let d = run_document(mongo_uri, run_id, |d| d.get_str("status") == Ok("done")).await;
    assert_eq!(d.get_str("calibration").unwrap(), "pedenoise");
    assert_eq!(
        d.get_array("modules").unwrap(),
        &vec![Bson::from("PS_1"), Bson::from("PS_2")]
    );
    assert_eq!(d.get_str("comment").unwrap(), "after reflow; LV at 10.5 V");
    assert!(d.get_i64("run_number").unwrap() >= 1);
    assert!(d.get_str("configuration_xml").unwrap().contains("BeBoard"));
    assert_eq!(chip_count(&d), 16, "8 SSA + 8 MPA chip files parsed");
    let chip = d.get_array("chips").unwrap()[8]
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(chip.get_str("chip_type").unwrap(), "MPA");
    let ped = chip
        .get_document("results")
        .unwrap()
        .get_document("pedestal")
        .unwrap();
    let mean = ped.get_f64("mean").unwrap();
    assert!((500.0..600.0).contains(&mean), "pedestal mean {mean}");
    assert_eq!(ped.get_array("values").unwrap().len(), 16);
    let start = d.get_i64("start_time_ns").unwrap();
    let end = d.get_i64("end_time_ns").unwrap();
    assert!(end > start);
    assert_eq!(
        d.get_datetime("start_time").unwrap().timestamp_millis(),
        start.div_euclid(1_000_000)
    );

    // Results.root in GridFS, byte for byte the size the simulator wrote.
    let client = mongodb::Client::with_uri_str(mongo_uri).await.unwrap();
    let bucket = client.database("dcs").gridfs_bucket(
        mongodb::options::GridFsBucketOptions::builder()
            .bucket_name("results".to_string())
            .build(),
    );
    let mut stream = bucket
        .open_download_stream(Bson::String(format!("{run_id}/Results.root")))
        .await
        .expect("Results.root in GridFS");
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.unwrap();
    assert_eq!(bytes.len() as u64, ROOT_BYTES);
    assert_eq!(&bytes[..4], b"root");

    // Two markers, at exactly the document's instants.
    let rows = influx.wait_rows(
        &format!("SELECT * FROM calibration_runs WHERE run_id = '{run_id}'"),
        WAIT,
        |r| r.len() == 2,
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["time"].as_i64(), Some(start));
    assert_eq!(rows[0]["event"], "start");
    assert_eq!(rows[1]["time"].as_i64(), Some(end));
    assert_eq!(rows[1]["event"], "end");
    assert_eq!(rows[1]["status"], "done");
    assert_eq!(rows[1]["end_ns"].as_i64(), Some(end));
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middleware_run_is_stored_and_shown_with_its_environment() {
    let broker = Broker::start(BrokerKind::Dcs);
    let mongo = Mongo::start();
    let influx = Influx::start();
    let s = Setup::new();
    let _sim = s.start_sim(2.0, "");
    let cfg = s.bridge_config(&broker, "middleware", &mongo.uri(), &influx.url(), "");
    let mut bridge = start_bridge(&cfg);
    let mut obs = Observer::connect(broker.port, "t-ph2acf", &["ph2acf/#"]).await;
    obs.wait_for("ph2acf/status", WAIT, |p| json(p)["state"] == "idle")
        .await
        .expect("idle status");

    let r = command(&mut obs, "run", RUN).await;
    assert_eq!(r["ok"], true, "{r}");
    let running = obs
        .wait_for("ph2acf/status", WAIT, |p| json(p)["state"] == "running")
        .await
        .unwrap();
    let st = json(&running.payload);
    let run_id = st["run_id"].as_str().unwrap().to_string();
    assert_eq!(st["calibration"], "pedenoise");

    // Refusals while it runs change nothing.
    let second = command(&mut obs, "run", RUN).await;
    assert_eq!(second["ok"], false);
    assert!(
        second["error"]
            .as_str()
            .unwrap()
            .contains("one run at a time"),
        "{second}"
    );
    for (payload, why) in [
        (
            r#"{"calibration":"pedenoise; rm -rf ~","config":"PS_module","modules":["PS_1"],"operator":"a"}"#,
            "unknown calibration",
        ),
        (
            r#"{"calibration":"pedenoise","config":"../../etc/passwd","modules":["PS_1"],"operator":"a"}"#,
            "unknown config",
        ),
        (
            r#"{"calibration":"pedenoise","config":"PS_module","modules":["PS_1"],"operator":"$(reboot)"}"#,
            "operator",
        ),
        (r#"{"calibration":"#, "JSON"),
    ] {
        let r = command(&mut obs, "run", payload).await;
        assert_eq!(r["ok"], false, "{payload}");
        assert!(r["error"].as_str().unwrap().contains(why), "{payload}: {r}");
    }
    let r = command(&mut obs, "selfdestruct", "").await;
    assert!(
        r["error"].as_str().unwrap().contains("unknown command"),
        "{r}"
    );

    // Environment written during the run (as the telemetry forwarder would).
    let now = dcs_shared::UtcNanos::now().as_nanos();
    let lines = format!(
        "chiller internal_temp=-20.5,fsm_state=\"ON\" {now}\nchiller internal_temp=-19.5,fsm_state=\"ON\" {}\n\
         channels,id=1,module=PS_1 lv_vMon=10.5,hv_iMon=1.25 {now}\n",
        now + 1000
    );
    ureq::post(format!("{}/write", influx.url()))
        .query("db", "dcs")
        .send(lines)
        .unwrap();
    // Before the run: not part of its environment.
    ureq::post(format!("{}/write", influx.url()))
        .query("db", "dcs")
        .send(format!(
            "chiller internal_temp=99 {}\n",
            now - 3_600_000_000_000
        ))
        .unwrap();

    let ended = wait_ended(&mut obs, &run_id).await;
    assert_eq!(ended["last_run"]["status"], "done", "{ended}");
    let d = check_stored(&mongo.uri(), &influx, &run_id).await;
    assert_eq!(d.get_str("backend").unwrap(), "middleware");
    let n = d.get_i64("run_number").unwrap();
    assert!(s
        .path(&format!("work/Results/Run_{n}/Results.root"))
        .exists());

    // Only the accepted run exists: the refused ones left no trace.
    let client = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
    let count = client
        .database("dcs")
        .collection::<Document>("runs")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(count, 1);
    let dirs = std::fs::read_dir(s.path("work/Results")).unwrap().count();
    assert_eq!(dirs, 1);

    // `dcs run show` joins the document and the environment during the run.
    let stack = s.path("stack.yaml");
    std::fs::write(
        &stack,
        format!(
            "mqtt: {{url: \"{}\"}}\nservices:\n  ph2acf-bridge: {{config: bridge.yaml}}\n",
            broker.url()
        ),
    )
    .unwrap();
    let out = Command::new(bin("dcs"))
        .args(["run", "show", &run_id, "--json", "--config"])
        .arg(&stack)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["run"]["run_id"], run_id.as_str());
    let chiller: Vec<&Value> = v["environment"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["measurement"] == "chiller")
        .collect();
    assert_eq!(chiller.len(), 1);
    assert_eq!(
        chiller[0]["values"].as_array().unwrap().len(),
        2,
        "only the points during the run: {v}"
    );
    let table = Command::new(bin("dcs"))
        .args(["run", "show", &run_id, "--config"])
        .arg(&stack)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&format!("run {run_id}  pedenoise  done")),
        "{table}"
    );
    let temp = table
        .lines()
        .find(|l| l.contains("internal_temp"))
        .expect(&table);
    assert!(temp.contains("-20.0000"), "mean of the two points: {temp}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("id=1,module=PS_1") && l.contains("lv_vMon")),
        "{table}"
    );
    let missing = Command::new(bin("dcs"))
        .args(["run", "show", "nope", "--config"])
        .arg(&stack)
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no run `nope`"));

    assert!(bridge
        .terminate(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_run_waits_for_mongodb_and_nothing_is_lost() {
    let broker = Broker::start(BrokerKind::Dcs);
    let mut mongo = Mongo::start();
    let influx = Influx::start();
    let s = Setup::new();
    let uri = mongo.uri();
    mongo.kill(); // MongoDB is down when the run starts and ends.
    let cfg = s.bridge_config(&broker, "cli", &uri, &influx.url(), "");
    let _bridge = start_bridge(&cfg);
    let mut obs = Observer::connect(broker.port, "t-ph2acf-cli", &["ph2acf/#"]).await;
    obs.wait_for("ph2acf/status", WAIT, |p| json(p)["state"] == "idle")
        .await
        .expect("idle status");
    let r = command(&mut obs, "run", RUN).await;
    assert_eq!(r["ok"], true, "{r}");
    // Progress parsed from the tool's output.
    let mid = obs
        .wait_for("ph2acf/status", WAIT, |p| {
            let v = json(p);
            v["progress"].as_f64().is_some_and(|x| x > 0.0 && x < 100.0)
        })
        .await
        .expect("progress from the command line");
    let run_id = json(&mid.payload)["run_id"].as_str().unwrap().to_string();
    let ended = wait_ended(&mut obs, &run_id).await;
    assert_eq!(ended["last_run"]["status"], "done", "{ended}");
    let queued = obs
        .wait_for("ph2acf/status", WAIT, |p| {
            json(p)["queue"]["mongodb"]["error"].is_string()
        })
        .await
        .expect("queue error shown");
    assert!(
        json(&queued.payload)["queue"]["mongodb"]["pending_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    let marker = obs
        .wait_for("ph2acf/run", WAIT, |p| json(p)["event"] == "end")
        .await
        .unwrap();
    let marker = json(&marker.payload);

    mongo.restart();
    let d = check_stored(&uri, &influx, &run_id).await;
    assert_eq!(d.get_str("backend").unwrap(), "cli");
    assert_eq!(
        marker["time"].as_i64(),
        Some(d.get_i64("end_time_ns").unwrap()),
        "MQTT marker at the same instant"
    );
    obs.wait_for("ph2acf/status", WAIT, |p| {
        json(p)["queue"]["mongodb"]["pending_bytes"] == 0
    })
    .await
    .expect("queue drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_end_runs_as_failed_with_the_reason_and_partial_results() {
    let broker = Broker::start(BrokerKind::Dcs);
    let mongo = Mongo::start();
    let s = Setup::new();
    let mut obs = Observer::connect(broker.port, "t-ph2acf-faults", &["ph2acf/#"]).await;
    // (backend, simulator fault, expected words in the error)
    let cases = [
        (
            "middleware",
            "{kind: hang, at_percent: 30}",
            "did not answer",
        ),
        (
            "middleware",
            "{kind: drop, at_percent: 30}",
            "dropped the connection",
        ),
        (
            "middleware",
            "{kind: crash, at_percent: 50}",
            "dropped the connection",
        ),
        ("cli", "{kind: crash, at_percent: 50}", "SIGABRT"),
        ("cli", "{kind: hang, at_percent: 30}", "Ph2_ACF hung"),
    ];
    for (backend, fault, why) in cases {
        let (sim_fault, cli_fault) = if backend == "cli" {
            ("", fault)
        } else {
            (fault, "")
        };
        let _sim = (backend == "middleware").then(|| s.start_sim(2.0, sim_fault));
        let cfg = s.bridge_config(&broker, backend, &mongo.uri(), "", cli_fault);
        obs.discard("ph2acf/online");
        let mut bridge = start_bridge(&cfg);
        // This bridge's birth, then its status: a late "idle" of the previous bridge
        // would send the run before this one subscribes (the command is then lost).
        obs.wait_for("ph2acf/online", WAIT, |p| p == "true")
            .await
            .expect("birth");
        obs.wait_for("ph2acf/status", WAIT, |p| json(p)["state"] == "idle")
            .await
            .expect("idle");
        let r = command(&mut obs, "run", RUN).await;
        assert_eq!(r["ok"], true, "{r}");
        let st = obs
            .wait_for("ph2acf/status", WAIT, |p| json(p)["state"] == "running")
            .await
            .unwrap();
        let run_id = json(&st.payload)["run_id"].as_str().unwrap().to_string();
        let ended = wait_ended(&mut obs, &run_id).await;
        assert_eq!(
            ended["last_run"]["status"], "failed",
            "{backend} {fault}: {ended}"
        );
        let err = ended["last_run"]["error"].as_str().unwrap_or_default();
        assert!(err.contains(why), "{backend} {fault}: {err}");
        let d = run_document(&mongo.uri(), &run_id, |d| {
            d.get_str("status") == Ok("failed")
        })
        .await;
        assert!(d.get_str("error").unwrap().contains(why));
        if fault.contains("crash") {
            // A partial directory: some chips, no Results.root, recorded as missing.
            let chips = chip_count(&d);
            assert!((1..16).contains(&chips), "{backend}: {chips} chips");
            let missing = d.get_array("missing_files").unwrap();
            assert!(missing.contains(&Bson::from("Results.root")), "{missing:?}");
        }
        assert!(bridge.terminate(Duration::from_secs(10)).is_some());
        obs.discard("ph2acf/status");
    }
}
