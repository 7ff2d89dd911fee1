//! The telemetry forwarder against real peers: our broker (and Mosquitto), Debian's
//! InfluxDB 1.6.7, VictoriaMetrics for the v2 write API. Payloads are the ones the
//! services publish (SPEC 3); the shipped `deploy/telemetry.yaml` is the config under test.

use std::collections::BTreeMap;
use std::time::Duration;

use dcs_integration_tests::db::{Influx, Victoria};
use dcs_integration_tests::forwarder::{stats, Forwarder};
use dcs_integration_tests::{Broker, BrokerKind, Observer};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn now_ns() -> i64 {
    dcs_shared::UtcNanos::now().as_nanos()
}

fn types(influx: &Influx, m: &str) -> BTreeMap<String, String> {
    influx.field_types(m).into_iter().collect()
}

fn time_between(row: &serde_json::Map<String, Value>, from: i64, to: i64) {
    let t = row["time"].as_i64().unwrap();
    assert!((from..=to).contains(&t), "time {t} not in [{from}, {to}]");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_shipped_mapping_reaches_influxdb_with_exact_types() {
    let broker = Broker::start(BrokerKind::Dcs);
    let influx = Influx::start();
    let mut fwd = Forwarder::shipped(&broker, &influx.url());
    let mut obs = Observer::connect(broker.port, "obs", &["telemetry/stats"]).await;
    fwd.start();
    stats(&mut obs, |_| true).await;

    let t0 = now_ns();
    let run_time: i64 = 1_763_800_000_123_456_789;
    let msgs: Vec<(&str, String)> = vec![
        ("dcs/status", r#"{"fsm_state": "LV_ON"}"#.into()),
        (
            "dcs/channels",
            r#"{"id": "0", "module": "module_0", "lv_board": 0, "lv_channel": 0, "lv_status": 1,
                "lv_setV": 12.0, "lv_vMon": 11.98, "lv_iMon": 1.2, "lv_maxI": 2.5, "lv_tripTime": 10.0,
                "lv_tripInt": 0, "lv_tripExt": 17, "lv_unVthr": 0.0, "lv_ovVthr": 15.0,
                "lv_rampUpTime": 100.0, "lv_rampDwnTime": 100.0, "lv_temp": 31.5,
                "hv_board": 12, "hv_channel": 0, "hv_status": 0, "hv_setV": 200.0, "hv_vMon": 0.4,
                "hv_iMon": 0.0, "hv_maxI": 500.0, "hv_tripTime": 10.0, "hv_tripInt": 0,
                "hv_tripExt": 17, "hv_rampUpSpeed": 50.0, "hv_rampDwnSpeed": 50.0,
                "hv_imRange": "Low", "hv_tripMode": "Kill", "fsm_state": "LV_ON"}"#
                .into(),
        ),
        (
            "julabo/status",
            r#"{"status_code": 3, "internal_temp": -20.05, "external_temp": -19.8,
                "setpoint_1": -20.0, "setpoint_2": 20.0, "setpoint_3": 15.0, "used_setpoint": 1,
                "power": -45.0, "ext_is_used": false, "fsm_state": "RUNNING"}"#
                .into(),
        ),
        ("ESP01/sensors/BME/temp", "21.7".into()),
        ("ESP01/sensors/BME/humi", "45.2".into()),
        ("ESP01/sensors/BME/dew", "9.3".into()),
        ("ESP03/sensors/SCD30/co2", "612".into()),
        (
            "ph2acf/status",
            r#"{"state": "running", "run_id": "r-12", "run_number": 12, "calibration": "pedenoise",
                "progress": 42.5, "started_at": "2026-11-22T10:00:00Z", "last_error": null}"#
                .into(),
        ),
        (
            "ph2acf/run",
            format!(
                r#"{{"event": "start", "run_id": "r-12", "calibration": "pedenoise", "run_number": 12, "time": {run_time}}}"#
            ),
        ),
        // As the interlock publishes them (services/interlock/src/engine.rs).
        (
            "alarms/dew_point",
            format!(
                r#"{{"rule": "dew_point", "severity": "critical", "state": "active", "condition": "unsafe",
                    "message": "coldest 10.00 degC (julabo/status) is 2.00 above the dew point 8.00 degC (ESP01/sensors/BME/dew), less than the margin 3",
                    "first_seen": "2025-11-22T08:26:40.123456789Z", "last_seen": "2025-11-22T08:26:40.123456789Z",
                    "first_seen_ns": {run_time}, "acknowledged_by": null, "acknowledged_at": null,
                    "values": {{"coldest": 10.0, "coldest_topic": "julabo/status", "dew_point": 8.0, "dew_point_topic": "ESP01/sensors/BME/dew", "gap": 2.0}},
                    "time": {run_time}, "action": "chiller_setpoint: pending",
                    "actions": [{{"do": "chiller_setpoint", "command": "julabo/cmd/setWT {{\"setpoint\":1,\"temp\":20.0}}", "at": "2025-11-22T08:26:40.123456789Z", "result": "pending"}}]}}"#
            ),
        ),
        (
            "alarms/summary",
            format!(
                r#"{{"active": 1, "acknowledged": 0, "cleared": 2, "worst": "critical",
                    "rules": {{"cooling": "cleared", "dew_point": "active", "over_temperature": "cleared"}}, "time": {run_time}}}"#
            ),
        ),
        (
            "interlock/permits",
            format!(r#"{{"lv_on": false, "reasons": ["dew_point: coldest 10.00 degC"], "time": {run_time}}}"#),
        ),
    ];
    for (topic, payload) in &msgs {
        obs.publish(topic, payload.clone()).await;
    }
    stats(&mut obs, |s| {
        s["written"].as_u64() >= Some(msgs.len() as u64 - 2)
    })
    .await;
    let t1 = now_ns();

    let rows = influx.rows("SELECT * FROM dcs_status");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["fsm_state"], "LV_ON");
    time_between(&rows[0], t0, t1);

    let rows = influx.rows("SELECT * FROM channels");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    for (tag, v) in [
        ("id", "0"),
        ("module", "module_0"),
        ("lv_board", "0"),
        ("lv_channel", "0"),
        ("hv_board", "12"),
        ("hv_channel", "0"),
    ] {
        assert_eq!(r[tag], v, "tag {tag}");
    }
    assert_eq!(r["lv_vMon"], 11.98);
    assert_eq!(r["lv_tripExt"], 17);
    assert_eq!(r["hv_imRange"], "Low");
    assert_eq!(r["fsm_state"], "LV_ON");
    let t = types(&influx, "channels");
    assert_eq!(t["lv_status"], "integer");
    assert_eq!(t["hv_tripExt"], "integer");
    assert_eq!(t["lv_setV"], "float", "12.0 stays a float");
    assert_eq!(t["hv_iMon"], "float", "0.0 stays a float");
    assert_eq!(t["fsm_state"], "string");
    assert_eq!(t["hv_tripMode"], "string");
    assert!(!t.contains_key("id"), "tags are not fields: {t:?}");
    let tag_keys = influx.rows("SHOW TAG KEYS FROM channels");
    assert_eq!(tag_keys.len(), 6, "{tag_keys:?}");

    let rows = influx.rows("SELECT * FROM chiller");
    assert_eq!(rows[0]["internal_temp"], -20.05);
    assert_eq!(rows[0]["ext_is_used"], false);
    let t = types(&influx, "chiller");
    assert_eq!(t["status_code"], "integer");
    assert_eq!(t["used_setpoint"], "integer");
    assert_eq!(t["ext_is_used"], "boolean");
    assert_eq!(t["fsm_state"], "string");

    // Three values published one by one: one row, on a whole second.
    let rows = influx.rows("SELECT * FROM sensors WHERE sensor = 'ESP01'");
    assert_eq!(rows.len(), 1, "merged per timestamp: {rows:?}");
    assert_eq!(rows[0]["BME_temp"], 21.7);
    assert_eq!(rows[0]["BME_humi"], 45.2);
    assert_eq!(rows[0]["BME_dew"], 9.3);
    assert_eq!(rows[0]["time"].as_i64().unwrap() % 1_000_000_000, 0);
    let rows = influx.rows("SELECT * FROM sensors WHERE sensor = 'ESP03'");
    assert_eq!(rows[0]["SCD30_co2"], 612.0);

    let rows = influx.rows("SELECT * FROM ph2acf");
    assert_eq!(rows[0]["state"], "running");
    assert_eq!(rows[0]["run_number"], 12);
    assert_eq!(types(&influx, "ph2acf")["run_number"], "integer");
    let rows = influx.rows("SELECT * FROM run_markers");
    assert_eq!(rows[0]["time"], run_time, "payload time, to the nanosecond");
    assert_eq!(rows[0]["run_id"], "r-12");
    assert_eq!(rows[0]["event"], "start");

    // Interlock alarms at the instant of the transition, tagged by rule.
    let rows = influx.rows("SELECT * FROM alarms");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["time"], run_time);
    assert_eq!(rows[0]["rule"], "dew_point");
    assert_eq!(rows[0]["state"], "active");
    assert_eq!(rows[0]["values_dew_point"], 8.0);
    assert_eq!(rows[0]["actions_0_do"], "chiller_setpoint");
    let t = types(&influx, "alarms");
    assert_eq!(t["first_seen_ns"], "integer");
    assert_eq!(t["severity"], "string");
    assert!(!t.contains_key("rule"), "the rule is the tag: {t:?}");
    let rows = influx.rows("SELECT * FROM alarm_summary");
    assert_eq!(rows[0]["active"], 1);
    assert_eq!(rows[0]["rules_dew_point"], "active");
    assert_eq!(types(&influx, "alarm_summary")["active"], "integer");
    let rows = influx.rows("SELECT * FROM interlock");
    assert_eq!(rows[0]["topic"], "permits");
    assert_eq!(rows[0]["lv_on"], false);
    assert_eq!(types(&influx, "interlock")["lv_on"], "boolean");

    // Self-metrics reach the database too.
    let rows = influx.wait_rows("SELECT * FROM telemetry_stats", WAIT, |r| !r.is_empty());
    assert!(!rows.is_empty(), "telemetry_stats written");
    assert_eq!(types(&influx, "telemetry_stats")["received"], "integer");
    drop(fwd);
}

#[tokio::test(flavor = "multi_thread")]
async fn v2_write_api_reaches_victoria_metrics() {
    let broker = Broker::start(BrokerKind::Dcs);
    let vm = Victoria::start();
    let mut fwd = Forwarder::with_config(
        &broker,
        &format!(
            "output: {{url: '{}', api: v2, org: lab, bucket: dcs, token: t0ken}}\n\
             inputs:\n\
             - {{topics: ['+/sensors/+/+'], data_format: value, measurement: vmsensors, topic_tags: {{sensor: '{{1}}'}}, field: '{{3}}_{{4}}'}}\n\
             - {{topics: [lab/run], measurement: vmrun, time_key: t, time_format: unix_ms}}\n",
            vm.url()
        ),
    );
    let mut obs = Observer::connect(broker.port, "obs", &["telemetry/stats"]).await;
    fwd.start();
    stats(&mut obs, |_| true).await;
    obs.publish("ESP02/sensors/BME/temp", "22.5").await;
    obs.publish("lab/run", r#"{"t": 1763800000123, "progress": 50}"#)
        .await;
    let series = vm.export("vm.*", WAIT, |s| s.len() >= 2);
    let find = |name: &str| {
        series
            .iter()
            .find(|s| s["metric"]["__name__"] == name)
            .unwrap_or_else(|| panic!("{name} not in {series:?}"))
    };
    let temp = find("vmsensors_BME_temp");
    assert_eq!(temp["metric"]["sensor"], "ESP02");
    assert_eq!(temp["values"][0], 22.5);
    let run = find("vmrun_progress");
    assert_eq!(run["values"][0], 50.0);
    assert_eq!(run["timestamps"][0], 1_763_800_000_123_i64);
}

/// Receive-time timestamps, so a point written twice would show as two rows.
const SEQ_INPUT: &str = "inputs:\n- {topics: [lab/seq], measurement: seq, types: {n: integer}}\n";

fn seq_numbers(influx: &Influx) -> Vec<i64> {
    let mut v: Vec<i64> = influx
        .rows("SELECT n FROM seq")
        .iter()
        .filter_map(|r| r["n"].as_i64())
        .collect();
    v.sort_unstable();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn influxdb_outage_loses_nothing_and_writes_each_message_once() {
    let broker = Broker::start(BrokerKind::Dcs);
    let mut influx = Influx::start();
    let mut fwd = Forwarder::with_config(
        &broker,
        &format!(
            "output: {{url: '{}', database: dcs}}\n{SEQ_INPUT}",
            influx.url()
        ),
    );
    let mut obs = Observer::connect(broker.port, "obs", &["telemetry/stats"]).await;
    fwd.start();
    stats(&mut obs, |_| true).await;
    const N: i64 = 600;
    for n in 0..200 {
        obs.publish("lab/seq", format!(r#"{{"n": {n}}}"#)).await;
    }
    let rows = influx.wait_rows("SELECT count(n) FROM seq", WAIT, |r| {
        r.first().and_then(|r| r["count"].as_i64()) == Some(200)
    });
    assert_eq!(rows[0]["count"], 200);
    influx.kill();
    for n in 200..N {
        obs.publish("lab/seq", format!(r#"{{"n": {n}}}"#)).await;
    }
    let s = stats(&mut obs, |s| {
        s["received"] == N && s["retried"].as_u64() > Some(0)
    })
    .await;
    assert!(s["spool_bytes"].as_u64() > Some(0), "{s}");
    assert!(s["output"].as_str().unwrap().starts_with("retrying"), "{s}");
    influx.restart();
    let s = stats(&mut obs, |s| s["output"] == "ok" && s["spool_bytes"] == 0).await;
    assert!(s["written"].as_i64() >= Some(N), "{s}");
    assert_eq!(
        seq_numbers(&influx),
        (0..N).collect::<Vec<_>>(),
        "every message exactly once"
    );
    assert!(
        fwd.stderr().contains("InfluxDB write failed"),
        "{}",
        fwd.stderr()
    );
}

async fn forwarder_killed_mid_stream(kind: BrokerKind) {
    let broker = Broker::start(kind);
    let influx = Influx::start();
    let mut fwd = Forwarder::with_config(
        &broker,
        &format!(
            "output: {{url: '{}', database: dcs}}\n{SEQ_INPUT}",
            influx.url()
        ),
    );
    let mut obs = Observer::connect(broker.port, "obs", &["telemetry/stats"]).await;
    fwd.start();
    stats(&mut obs, |_| true).await;
    const N: i64 = 3000;
    let publisher = Observer::connect(broker.port, "pub", &[]).await;
    let stream = tokio::spawn(async move {
        for n in 0..N {
            publisher
                .publish("lab/seq", format!(r#"{{"n": {n}}}"#))
                .await;
            if n % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        publisher
    });
    stats(&mut obs, |s| s["written"].as_u64() > Some(300)).await;
    fwd.proc.as_mut().unwrap().kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fwd.start();
    let _publisher = stream.await.unwrap();
    let rows = influx.wait_rows("SELECT count(n) FROM seq", Duration::from_secs(60), |r| {
        r.first().and_then(|r| r["count"].as_i64()) >= Some(N)
    });
    assert!(!rows.is_empty());
    // Give a late redelivery the chance to show up as a duplicate before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = seq_numbers(&influx);
    let mut distinct = got.clone();
    distinct.dedup();
    assert_eq!(
        distinct,
        (0..N).collect::<Vec<_>>(),
        "nothing lost ({kind:?})"
    );
    let duplicates = got.len() - distinct.len();
    // At least once: only what was spooled or written but not yet acknowledged when
    // the process died can come twice (the broker's inflight window, at most 100 here,
    // plus one batch of 500).
    assert!(duplicates <= 600, "{duplicates} duplicates");
    eprintln!("{kind:?}: {duplicates} duplicates after SIGKILL");
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarder_sigkill_loses_nothing_with_our_broker() {
    forwarder_killed_mid_stream(BrokerKind::Dcs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarder_sigkill_loses_nothing_with_mosquitto() {
    forwarder_killed_mid_stream(BrokerKind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_database_it_spools_says_so_and_delivers_later() {
    let broker = Broker::start(BrokerKind::Dcs);
    let influx = Influx::start();
    // No URL: spooling only, as `dcs up --simulate` runs it.
    let mut fwd = Forwarder::shipped(&broker, "");
    let mut obs = Observer::connect(broker.port, "obs", &["telemetry/stats"]).await;
    fwd.start();
    stats(&mut obs, |_| true).await;
    assert!(
        fwd.stderr().contains("no InfluxDB output configured"),
        "{}",
        fwd.stderr()
    );
    for n in 0..10 {
        obs.publish("dcs/status", format!(r#"{{"fsm_state": "S{n}"}}"#))
            .await;
    }
    let s = stats(&mut obs, |s| s["received"] == 10).await;
    assert_eq!(s["output"], "none: spooling only");
    assert!(s["spool_bytes"].as_u64() > Some(0));
    // SIGTERM keeps the spool; the next run with a database delivers it.
    let status = fwd
        .proc
        .as_mut()
        .unwrap()
        .terminate(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "clean exit on SIGTERM");
    fwd.env[0].1 = influx.url();
    fwd.start();
    let rows = influx.wait_rows("SELECT fsm_state FROM dcs_status", WAIT, |r| r.len() >= 10);
    let states: Vec<&str> = rows
        .iter()
        .filter_map(|r| r["fsm_state"].as_str())
        .collect();
    assert_eq!(states.len(), 10, "{states:?}");
    assert!(fwd.spool_dir().exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_counted_and_refused_data_goes_to_the_dead_letter_file() {
    let broker = Broker::start(BrokerKind::Dcs);
    let influx = Influx::start();
    let mut fwd = Forwarder::with_config(
        &broker,
        &format!(
            "output: {{url: '{}', database: dcs}}\nmax_payload_bytes: 1000\n\
             inputs:\n\
             - {{topics: ['lab/json/#'], measurement: bad, types: {{code: integer}}}}\n\
             - {{topics: ['lab/#'], measurement: '{{4}}'}}\n",
            influx.url()
        ),
    );
    let mut obs = Observer::connect(broker.port, "obs", &["telemetry/stats"]).await;
    fwd.start();
    stats(&mut obs, |_| true).await;
    obs.publish("lab/json/a", r#"{"x": 1.5, "code": 3}"#).await; // good
    obs.publish("lab/json/a", r#"{"x": "#).await; // malformed JSON
    obs.publish("lab/json/a", "[1, 2]").await; // not objects
    obs.publish("lab/json/a", r#"{"x": 2.5, "code": 3.5}"#)
        .await; // wrong type: field dropped, rest written
    obs.publish("lab/json/a", vec![b'{'; 5000]).await; // too large
    obs.publish("lab/x", "{}").await; // too few levels for `{4}`: unmatched
    obs.publish("lab/json/a", r#"{"x": "text"}"#).await; // type conflict in InfluxDB
    obs.publish("lab/json/a", r#"{"x": 4.5}"#).await; // good
    let s = stats(&mut obs, |s| {
        s["received"] == 8 && s["spool_bytes"] == 0 && s["rejected"] == 1
    })
    .await;
    assert_eq!(s["malformed"], 4, "{s}");
    assert_eq!(s["unmatched"], 1, "{s}");
    let xs: Vec<f64> = influx
        .rows("SELECT x FROM bad")
        .iter()
        .filter_map(|r| r["x"].as_f64())
        .collect();
    assert_eq!(xs, vec![1.5, 2.5, 4.5]);
    let dead = std::fs::read_to_string(fwd.spool_dir().join("dead-letter.jsonl")).unwrap();
    let entry: Value = serde_json::from_str(dead.lines().next().unwrap()).unwrap();
    assert_eq!(entry["status"], 400);
    assert!(
        entry["error"].as_str().unwrap().contains("conflict"),
        "{entry}"
    );
    assert!(
        entry["lines"].as_str().unwrap().contains("x=\"text\""),
        "{entry}"
    );
    // Each problem logged once per topic, with its reason; the process is still up.
    let log = fwd.stderr();
    assert!(log.contains("invalid JSON"), "{log}");
    assert!(log.contains("too few levels"), "{log}");
    assert_eq!(
        log.matches("message not (fully) written").count(),
        2,
        "{log}"
    );
    assert!(fwd
        .proc
        .as_mut()
        .unwrap()
        .child
        .try_wait()
        .unwrap()
        .is_none());
}
