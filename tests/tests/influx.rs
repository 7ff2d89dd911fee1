//! The shared line-protocol encoder and InfluxDB writer against a real InfluxDB 1.6.7
//! (Debian): exact types, escaping of hostile names, nanosecond timestamps, refusals.

use dcs_integration_tests::db::Influx;
use dcs_shared::influx::{InfluxSettings, InfluxWriter, WriteError};
use dcs_shared::line_protocol::{encode, FieldValue, Point};

fn writer(i: &Influx) -> InfluxWriter {
    let yaml = format!("{{url: '{}', database: dcs}}", i.url());
    let s: InfluxSettings =
        dcs_shared::config::from_str(&yaml, std::path::Path::new("test")).unwrap();
    InfluxWriter::new(s)
}

#[test]
fn points_round_trip_exactly() {
    let influx = Influx::start();
    let ts = 1_795_000_000_123_456_789i64;
    let points = vec![
        Point {
            measurement: "channels".into(),
            tags: vec![
                ("id".into(), "0".into()),
                ("module".into(), "M 1,a=b".into()),
            ],
            fields: vec![
                ("lv_vMon".into(), FieldValue::Float(12.25)),
                ("lv_status".into(), FieldValue::Int(-3)),
                ("count".into(), FieldValue::Int(7)),
                ("on".into(), FieldValue::Bool(true)),
                ("fsm_state".into(), FieldValue::Str("LV_ON".into())),
                ("note".into(), FieldValue::Str(r#"say "hi" \ bye"#.into())),
            ],
            timestamp_ns: ts,
        },
        Point {
            measurement: "odd meas,name".into(),
            tags: vec![("sensor key".into(), "ESP01".into())],
            fields: vec![("BME temp".into(), FieldValue::Float(21.7))],
            timestamp_ns: ts + 1,
        },
    ];
    let mut body = String::new();
    for p in &points {
        encode(p, &mut body).unwrap();
    }
    writer(&influx).write(&body).unwrap();

    let r = influx.query("SELECT * FROM channels");
    let s = &r["results"][0]["series"][0];
    let cols: Vec<&str> = s["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let row = &s["values"][0];
    let get = |name: &str| &row[cols.iter().position(|c| *c == name).unwrap()];
    assert_eq!(get("time").as_i64(), Some(ts), "nanosecond timestamp");
    assert_eq!(get("lv_vMon").as_f64(), Some(12.25));
    assert_eq!(get("lv_status").as_i64(), Some(-3));
    assert_eq!(get("on"), true);
    assert_eq!(get("fsm_state"), "LV_ON", "string fields are kept");
    assert_eq!(get("note"), r#"say "hi" \ bye"#);
    assert_eq!(get("module"), "M 1,a=b", "escaped tag value");
    // Types as InfluxDB recorded them.
    let keys = influx.query("SHOW FIELD KEYS FROM channels");
    let types: std::collections::HashMap<String, String> = keys["results"][0]["series"][0]
        ["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v[0].as_str().unwrap().to_string(),
                v[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(types["lv_vMon"], "float");
    assert_eq!(types["lv_status"], "integer");
    assert_eq!(types["on"], "boolean");
    assert_eq!(types["fsm_state"], "string");

    let r = influx.query(r#"SELECT "BME temp" FROM "odd meas,name" WHERE "sensor key" = 'ESP01'"#);
    assert_eq!(
        r["results"][0]["series"][0]["values"][0][1].as_f64(),
        Some(21.7),
        "{r}"
    );
}

#[test]
fn refusals_and_outages_are_told_apart() {
    let influx = Influx::start();
    let w = writer(&influx);
    // A type conflict is the data's fault: 4xx, with the server's reason.
    w.write("m f=1i 1\n").unwrap();
    match w.write("m f=\"text\" 2\n") {
        Err(WriteError::Rejected { status, message }) => {
            assert_eq!(status, 400);
            assert!(message.contains("conflict"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // An unknown database too.
    let yaml = format!("{{url: '{}', database: nope}}", influx.url());
    let s: InfluxSettings =
        dcs_shared::config::from_str(&yaml, std::path::Path::new("test")).unwrap();
    let e = InfluxWriter::new(s).write("m f=1i 1\n").unwrap_err();
    assert!(
        matches!(e, WriteError::Rejected { status: 404, ref message } if message.contains("database not found")),
        "{e}"
    );
    // The server gone is worth retrying.
    drop(influx);
    assert!(matches!(w.write("m f=1i 3\n"), Err(WriteError::Retry(_))));
}
