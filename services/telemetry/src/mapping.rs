//! MQTT message in, InfluxDB points out: the inputs of the config, compiled. No I/O.

use std::collections::BTreeMap;

use dcs_shared::line_protocol::{FieldValue, Point};
use serde_json::Value;

use crate::config::{DataFormat, FieldType, InputConfig, TimeFormat};
use crate::flat;
use crate::topic::{self, Template};

/// Why a message gave no points.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MapError {
    /// No input maps the topic: no filter matches (only possible with overlapping
    /// subscriptions), or a matching filter's names need topic levels it lacks.
    #[error("{0}")]
    Unmatched(String),
    /// The payload cannot be read as the input says.
    #[error("{0}")]
    Malformed(String),
}

/// The points of one message, and what was wrong in it but did not stop it (a field of
/// the wrong type is dropped, the rest is written).
#[derive(Debug, Default, PartialEq)]
pub struct Mapped {
    /// Points to write.
    pub points: Vec<Point>,
    /// Problems, for the malformed counter and the log.
    pub problems: Vec<String>,
}

struct Input {
    filters: Vec<String>,
    format: DataFormat,
    measurement: Template,
    tag_keys: Vec<String>,
    topic_tags: Vec<(String, Template)>,
    field: Template,
    value_type: FieldType,
    types: BTreeMap<String, FieldType>,
    exclude: Vec<String>,
    time_key: Option<String>,
    time_format: TimeFormat,
    precision_ns: i64,
}

/// The compiled inputs.
pub struct Mapper {
    inputs: Vec<Input>,
}

impl Mapper {
    /// Compiles validated inputs.
    pub fn new(inputs: &[InputConfig]) -> Result<Mapper, String> {
        let inputs = inputs
            .iter()
            .map(|i| {
                Ok(Input {
                    filters: i.topics.clone(),
                    format: i.data_format,
                    measurement: Template::parse(&i.measurement)?,
                    tag_keys: i.tag_keys.clone(),
                    topic_tags: i
                        .topic_tags
                        .iter()
                        .map(|(k, v)| Ok((k.clone(), Template::parse(v)?)))
                        .collect::<Result<_, String>>()?,
                    field: Template::parse(i.field.as_deref().unwrap_or("value"))?,
                    value_type: i.value_type,
                    types: i.types.clone(),
                    exclude: i.exclude_fields.clone(),
                    time_key: i.time_key.clone(),
                    time_format: i.time_format,
                    precision_ns: i.precision()?.map_or(1, |d| {
                        i64::try_from(d.as_nanos()).unwrap_or(i64::MAX).max(1)
                    }),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Mapper { inputs })
    }

    /// The topic filters to subscribe to: none covered by another, so that no message
    /// is delivered twice.
    pub fn filters(&self) -> Vec<String> {
        let all: Vec<String> = self.inputs.iter().flat_map(|i| i.filters.clone()).collect();
        topic::minimal_set(&all)
    }

    /// Maps one message received at `received_ns`.
    pub fn map(&self, topic: &str, payload: &[u8], received_ns: i64) -> Result<Mapped, MapError> {
        let input = self
            .inputs
            .iter()
            .find(|i| i.filters.iter().any(|f| topic::matches(f, topic)))
            .ok_or_else(|| MapError::Unmatched("no input matches the topic".into()))?;
        input.map(topic, payload, received_ns)
    }
}

impl Input {
    fn map(&self, topic: &str, payload: &[u8], received_ns: i64) -> Result<Mapped, MapError> {
        let malformed = |m: String| MapError::Malformed(m);
        let unmatched =
            |what: &str| MapError::Unmatched(format!("topic has too few levels for {what}"));
        let text =
            std::str::from_utf8(payload).map_err(|_| malformed("payload is not UTF-8".into()))?;
        let measurement = self
            .measurement
            .render(topic)
            .ok_or_else(|| unmatched("the measurement name"))?;
        let mut tags = Vec::new();
        for (k, t) in &self.topic_tags {
            let v = t
                .render(topic)
                .ok_or_else(|| unmatched(&format!("tag `{k}`")))?;
            tags.push((k.clone(), v));
        }
        let timestamp = received_ns - received_ns.rem_euclid(self.precision_ns);
        let mut out = Mapped::default();
        match self.format {
            DataFormat::Value => {
                let field = self
                    .field
                    .render(topic)
                    .ok_or_else(|| unmatched("the field name"))?;
                let value = parse_value(text.trim(), self.value_type)
                    .map_err(|e| malformed(format!("`{field}`: {e}")))?;
                out.points.push(Point {
                    measurement,
                    tags,
                    fields: vec![(field, value)],
                    timestamp_ns: timestamp,
                });
            }
            DataFormat::Json => {
                let objects =
                    flat::parse(payload).map_err(|e| malformed(format!("invalid JSON: {e}")))?;
                for obj in objects {
                    let p = self.point(obj, &measurement, &tags, timestamp, &mut out.problems)?;
                    out.points.push(p);
                }
            }
        }
        Ok(out)
    }

    fn point(
        &self,
        flat: Vec<(String, Value)>,
        measurement: &str,
        topic_tags: &[(String, String)],
        received: i64,
        problems: &mut Vec<String>,
    ) -> Result<Point, MapError> {
        let mut tags = topic_tags.to_vec();
        let mut fields = Vec::new();
        let mut timestamp = received;
        for (key, value) in flat {
            if self.time_key.as_deref() == Some(key.as_str()) {
                match parse_time(&value, self.time_format) {
                    Ok(t) => timestamp = t,
                    Err(e) => problems.push(format!("`{key}`: {e}; receive time used")),
                }
                continue;
            }
            if self.tag_keys.contains(&key) {
                match value {
                    Value::String(s) => tags.push((key, s)),
                    Value::Number(n) => tags.push((key, n.to_string())),
                    Value::Bool(b) => tags.push((key, b.to_string())),
                    other => {
                        problems.push(format!("tag `{key}`: {} is not a tag value", kind(&other)))
                    }
                }
                continue;
            }
            if self.exclude.contains(&key) {
                continue;
            }
            let typed = match self.types.get(&key) {
                Some(t) => convert(value, *t),
                None => infer(value),
            };
            match typed {
                Ok(v) => fields.push((key, v)),
                Err(e) => problems.push(format!("`{key}`: {e}")),
            }
        }
        // Sorted, and a key given twice keeps its last value, as a JSON object would.
        fields.reverse();
        fields.sort_by(|a: &(String, FieldValue), b| a.0.cmp(&b.0));
        fields.dedup_by(|later, earlier| later.0 == earlier.0);
        if fields.is_empty() {
            return Err(MapError::Malformed("no fields to write".into()));
        }
        Ok(Point {
            measurement: measurement.to_string(),
            tags,
            fields,
            timestamp_ns: timestamp,
        })
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn infer(v: Value) -> Result<FieldValue, String> {
    match v {
        Value::Number(_) => convert(v, FieldType::Float),
        Value::Bool(b) => Ok(FieldValue::Bool(b)),
        Value::String(s) => Ok(FieldValue::Str(s)),
        other => Err(format!("{} cannot be a field", kind(&other))),
    }
}

fn convert(v: Value, t: FieldType) -> Result<FieldValue, String> {
    let found = kind(&v);
    match (t, v) {
        (FieldType::Float, Value::Number(n)) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .map(FieldValue::Float)
            .ok_or_else(|| format!("{n} is not a finite float")),
        (FieldType::Integer, Value::Number(n)) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
                    .map(|f| f as i64)
            })
            .map(FieldValue::Int)
            .ok_or_else(|| format!("{n} is not an integer")),
        (FieldType::Unsigned, Value::Number(n)) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19)
                    .map(|f| f as u64)
            })
            .map(FieldValue::UInt)
            .ok_or_else(|| format!("{n} is not an unsigned integer")),
        (FieldType::Boolean, Value::Bool(b)) => Ok(FieldValue::Bool(b)),
        (FieldType::String, Value::String(s)) => Ok(FieldValue::Str(s)),
        (FieldType::String, Value::Number(n)) => Ok(FieldValue::Str(n.to_string())),
        (FieldType::String, Value::Bool(b)) => Ok(FieldValue::Str(b.to_string())),
        _ => Err(format!("{found} where {} was expected", type_name(t))),
    }
}

fn type_name(t: FieldType) -> &'static str {
    match t {
        FieldType::Float => "a float",
        FieldType::Integer => "an integer",
        FieldType::Unsigned => "an unsigned integer",
        FieldType::Boolean => "a boolean",
        FieldType::String => "a string",
    }
}

/// A bare payload (`value` format).
fn parse_value(text: &str, t: FieldType) -> Result<FieldValue, String> {
    let bad = || {
        format!(
            "`{}` is not {}",
            dcs_shared::command::truncate(text, 40),
            type_name(t)
        )
    };
    match t {
        FieldType::Float => text
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(FieldValue::Float)
            .ok_or_else(bad),
        FieldType::Integer => text.parse().map(FieldValue::Int).map_err(|_| bad()),
        FieldType::Unsigned => text.parse().map(FieldValue::UInt).map_err(|_| bad()),
        FieldType::Boolean => match text {
            "true" | "1" | "on" => Ok(FieldValue::Bool(true)),
            "false" | "0" | "off" => Ok(FieldValue::Bool(false)),
            _ => Err(bad()),
        },
        FieldType::String => Ok(FieldValue::Str(text.to_string())),
    }
}

fn parse_time(v: &Value, f: TimeFormat) -> Result<i64, String> {
    let number = || -> Result<f64, String> {
        match v {
            Value::Number(n) => n.as_f64().ok_or_else(|| "not a number".to_string()),
            Value::String(s) => s
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a number")),
            other => Err(format!("{} is not a timestamp", kind(other))),
        }
    };
    let exact = |scale: i64| -> Result<i64, String> {
        let n = match v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        match n {
            Some(n) => n
                .checked_mul(scale)
                .ok_or_else(|| "timestamp out of range".into()),
            None => Err(format!("{v} is not an integer timestamp")),
        }
    };
    match f {
        TimeFormat::UnixNs => exact(1),
        TimeFormat::UnixUs => exact(1_000),
        TimeFormat::UnixMs => exact(1_000_000),
        TimeFormat::Unix => {
            let s = number()?;
            if !s.is_finite() || s.abs() > 9.2e9 {
                return Err("timestamp out of range".into());
            }
            Ok((s * 1e9).round() as i64)
        }
        TimeFormat::Rfc3339 => {
            let Value::String(s) = v else {
                return Err(format!("{} is not RFC 3339 text", kind(v)));
            };
            let t = humantime::parse_rfc3339_weak(s).map_err(|e| format!("`{s}`: {e}"))?;
            let d = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| format!("`{s}` is before 1970"))?;
            i64::try_from(d.as_nanos()).map_err(|_| "timestamp out of range".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcs_shared::line_protocol::encode;

    fn mapper(yaml: &str) -> Mapper {
        let inputs: Vec<InputConfig> = serde_yaml::from_str(yaml).unwrap();
        Mapper::new(&inputs).unwrap()
    }

    fn lines(m: &Mapper, topic: &str, payload: &str, t: i64) -> String {
        let mut s = String::new();
        for p in m.map(topic, payload.as_bytes(), t).unwrap().points {
            encode(&p, &mut s).unwrap();
        }
        s
    }

    #[test]
    fn channels_with_tags_and_types() {
        let m = mapper(
            "[{topics: [dcs/channels], measurement: channels, tag_keys: [id, module, lv_board],
               types: {lv_status: integer}}]",
        );
        let got = lines(
            &m,
            "dcs/channels",
            r#"{"id": "0", "module": "M 1", "lv_board": 0, "lv_status": 1, "lv_vMon": 0,
                "hv_imRange": "Low", "fsm_state": "LV_ON", "lv_temp": null}"#,
            7,
        );
        assert_eq!(
            got,
            "channels,id=0,lv_board=0,module=M\\ 1 fsm_state=\"LV_ON\",hv_imRange=\"Low\",lv_status=1i,lv_vMon=0.0 7\n"
        );
    }

    #[test]
    fn sensors_fields_from_topic_levels_rounded_to_the_second() {
        let m = mapper(
            "[{topics: ['+/sensors/+/+'], data_format: value, measurement: sensors,
               topic_tags: {sensor: '{1}'}, field: '{3}_{4}', precision: 1s}]",
        );
        let t = 1_700_000_000_123_456_789;
        assert_eq!(
            lines(&m, "ESP02/sensors/BME/temp", " 21.7\n", t),
            "sensors,sensor=ESP02 BME_temp=21.7 1700000000000000000\n"
        );
        let e = m.map("ESP02/sensors/BME/temp", b"warm", t).unwrap_err();
        assert_eq!(
            e,
            MapError::Malformed("`BME_temp`: `warm` is not a float".into())
        );
    }

    #[test]
    fn payload_time_wins_and_bad_time_falls_back() {
        let m = mapper("[{topics: [r], measurement: m, time_key: t, time_format: unix_ms}]");
        assert_eq!(
            lines(&m, "r", r#"{"t": 1700000000123, "x": 1}"#, 5),
            "m x=1.0 1700000000123000000\n"
        );
        let out = m.map("r", br#"{"t": "soon", "x": 1}"#, 5).unwrap();
        assert_eq!(out.points[0].timestamp_ns, 5);
        assert_eq!(out.problems.len(), 1);
        let m = mapper("[{topics: [r], measurement: m, time_key: t, time_format: rfc3339}]");
        assert_eq!(
            lines(&m, "r", r#"{"t": "2023-11-14T22:13:20.5Z", "x": 1}"#, 5),
            "m x=1.0 1700000000500000000\n"
        );
    }

    #[test]
    fn wrong_types_drop_the_field_not_the_point() {
        let m = mapper("[{topics: [j], measurement: m, types: {s: integer}}]");
        let out = m.map("j", br#"{"s": 1.5, "v": 2}"#, 1).unwrap();
        assert_eq!(
            out.points[0].fields,
            vec![("v".to_string(), FieldValue::Float(2.0))]
        );
        assert_eq!(out.problems, vec!["`s`: 1.5 is not an integer".to_string()]);
        let out = m.map("j", br#"{"s": "x"}"#, 1).unwrap_err();
        assert_eq!(out, MapError::Malformed("no fields to write".into()));
    }

    #[test]
    fn malformed_and_unmatched() {
        let m = mapper("[{topics: ['a/#'], measurement: m}]");
        assert!(matches!(m.map("b", b"{}", 1), Err(MapError::Unmatched(_))));
        let m2 = mapper("[{topics: ['a/#'], measurement: '{2}'}]");
        assert_eq!(
            m2.map("a", br#"{"x":1}"#, 1).unwrap_err(),
            MapError::Unmatched("topic has too few levels for the measurement name".into())
        );
        for bad in [&b"{"[..], b"[1]", b"3", b"\xff", b"{}"] {
            assert!(
                matches!(m.map("a/x", bad, 1), Err(MapError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn nested_objects_and_arrays_flatten() {
        let m = mapper("[{topics: [n], measurement: m}]");
        assert_eq!(
            lines(&m, "n", r#"{"a": {"b": true, "c": [1, 2]}}"#, 1),
            "m a_b=true,a_c_0=1.0,a_c_1=2.0 1\n"
        );
        assert_eq!(
            lines(&m, "n", r#"[{"x": 1}, {"x": 2}]"#, 1),
            "m x=1.0 1\nm x=2.0 1\n"
        );
    }

    #[test]
    fn first_matching_input_wins() {
        let m =
            mapper("[{topics: [a/b], measurement: first}, {topics: ['a/#'], measurement: second}]");
        assert!(lines(&m, "a/b", r#"{"x":1}"#, 1).starts_with("first "));
        assert!(lines(&m, "a/c", r#"{"x":1}"#, 1).starts_with("second "));
        assert_eq!(m.filters(), vec!["a/#".to_string()]);
    }

    #[test]
    fn integers_and_unsigned() {
        let m =
            mapper("[{topics: [i], measurement: m, types: {a: integer, b: unsigned, c: string}}]");
        assert_eq!(
            lines(&m, "i", r#"{"a": -3, "b": 4.0, "c": 5}"#, 1),
            "m a=-3i,b=4u,c=\"5\" 1\n"
        );
        let out = m.map("i", br#"{"a": 1, "b": -4}"#, 1).unwrap();
        assert_eq!(
            out.problems,
            vec!["`b`: -4 is not an unsigned integer".to_string()]
        );
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn mapper() -> Mapper {
        let inputs: Vec<InputConfig> = serde_yaml::from_str(
            "[{topics: ['j/#'], measurement: m, tag_keys: [t], types: {i: integer},
               time_key: ts, time_format: rfc3339},
              {topics: ['+/sensors/+/+'], data_format: value, measurement: s,
               topic_tags: {sensor: '{1}'}, field: '{3}_{4}'}]",
        )
        .unwrap();
        Mapper::new(&inputs).unwrap()
    }

    proptest! {
        /// Whatever arrives, mapping and encoding return an answer; they never panic.
        #[test]
        fn any_payload_maps_or_is_refused(topic in "[a-zA-Z0-9/+ ,=\\\\\"]{0,30}", payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let m = mapper();
            if let Ok(out) = m.map(&topic, &payload, 1) {
                for p in out.points {
                    let mut s = String::new();
                    if dcs_shared::line_protocol::encode(&p, &mut s).is_ok() {
                        prop_assert!(s.ends_with('\n'));
                    }
                }
            }
        }

        #[test]
        fn any_json_object_maps_or_is_refused(keys in proptest::collection::vec("[ -~]{0,8}", 1..6), vals in proptest::collection::vec(any::<f64>(), 1..6), sensor in "[ -~]{0,8}") {
            let m = mapper();
            let obj: serde_json::Map<String, Value> = keys.iter().zip(&vals)
                .map(|(k, v)| (k.clone(), serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number)))
                .collect();
            let payload = Value::Object(obj).to_string();
            let _ = m.map("j/x", payload.as_bytes(), 1);
            let _ = m.map(&format!("{sensor}/sensors/a/b"), b"1.5", 1);
        }
    }
}
