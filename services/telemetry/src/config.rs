//! The forwarder's configuration (YAML): inputs like Telegraf's `mqtt_consumer`, one
//! InfluxDB output, the spool, batching and retry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dcs_shared::influx::InfluxSettings;
use dcs_shared::spool::Overflow;
use dcs_shared::{MqttSettings, Validate};
use serde::Deserialize;

use crate::topic::{self, Template};

/// Everything `telemetry` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// MQTT name: `<name>/online`, `<name>/stats`.
    #[serde(default = "default_name")]
    pub name: String,
    /// MQTT client id; must stay the same across restarts, since the broker keeps the
    /// persistent session (and the messages queued while away) under it.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Broker settings when run alone (`dcs up` passes the stack's).
    #[serde(default)]
    pub mqtt: MqttSettings,
    /// What to read from MQTT, and how to turn it into points. First match wins.
    pub inputs: Vec<InputConfig>,
    /// Where points go. Without it, everything is kept in the spool.
    #[serde(default)]
    pub output: Option<InfluxSettings>,
    /// The on-disk spool between MQTT and InfluxDB.
    #[serde(default)]
    pub spool: SpoolSettings,
    /// Write batching.
    #[serde(default)]
    pub batch: BatchSettings,
    /// Retry of failed writes.
    #[serde(default)]
    pub retry: RetrySettings,
    /// Self-metrics period (`<name>/stats` and measurement `telemetry_stats`), seconds
    /// (fractions allowed, from 0.1).
    #[serde(default = "default_stats_interval")]
    pub stats_interval_secs: f64,
    /// Larger MQTT payloads are refused as malformed.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// How long a SIGTERM waits for the spool to drain before leaving the rest in it.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
}

fn default_name() -> String {
    "telemetry".into()
}
fn default_stats_interval() -> f64 {
    10.0
}
fn default_max_payload() -> usize {
    256 * 1024
}
fn default_grace() -> u64 {
    5
}

/// Spool settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSettings {
    /// Directory of the segments; relative paths are relative to the config file.
    pub dir: PathBuf,
    /// Bound on the spool, bytes.
    pub max_bytes: u64,
    /// Segment size, bytes.
    pub segment_bytes: u64,
    /// At the bound: `drop_oldest` (counted and logged) or `refuse` (stop acknowledging
    /// MQTT, so the broker holds the messages).
    pub overflow: Overflow,
    /// fsync before acknowledging MQTT: survives a power cut, not only a crash.
    pub fsync: bool,
    /// Lines InfluxDB refused, with its message (JSON lines). Default `<dir>/dead-letter.jsonl`.
    pub dead_letter: Option<PathBuf>,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            dir: PathBuf::from(".dcs/telemetry"),
            max_bytes: 1024 * 1024 * 1024,
            segment_bytes: 16 * 1024 * 1024,
            overflow: Overflow::DropOldest,
            fsync: true,
            dead_letter: None,
        }
    }
}

impl SpoolSettings {
    /// The dead-letter file.
    pub fn dead_letter_path(&self) -> PathBuf {
        self.dead_letter
            .clone()
            .unwrap_or_else(|| self.dir.join("dead-letter.jsonl"))
    }
}

/// Write batching: a batch leaves when it is full or its oldest message has waited
/// `interval_ms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSettings {
    /// Messages per write (a message usually makes one line).
    pub size: usize,
    /// Bytes per write, about.
    pub max_bytes: u64,
    /// Longest wait for a batch to fill, ms.
    pub interval_ms: u64,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            size: 5000,
            max_bytes: 8 * 1024 * 1024,
            interval_ms: 1000,
        }
    }
}

/// Exponential backoff between failed writes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// First delay, ms.
    pub initial_ms: u64,
    /// Longest delay, s.
    pub max_secs: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            initial_ms: 500,
            max_secs: 30,
        }
    }
}

/// `json` (an object, or an array of objects) or `value` (a bare number, bool or text).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// JSON object(s); nested objects flattened with `_`.
    #[default]
    Json,
    /// A bare value.
    Value,
}

/// A field's line-protocol type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// 64-bit float; every JSON number unless told otherwise (so `0` and `0.5` never
    /// conflict in the database).
    #[default]
    Float,
    /// Signed integer (`i`).
    Integer,
    /// Unsigned integer (`u`).
    Unsigned,
    /// `true`/`false`.
    Boolean,
    /// Text.
    String,
}

/// How a payload timestamp is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// Integer nanoseconds since the epoch.
    #[default]
    UnixNs,
    /// Integer microseconds.
    UnixUs,
    /// Integer milliseconds.
    UnixMs,
    /// Seconds, possibly fractional.
    Unix,
    /// RFC 3339 text (`2026-11-22T10:00:00.123Z`).
    Rfc3339,
}

/// One input: topics and how their payloads become points.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// MQTT topic filters (wildcards allowed).
    pub topics: Vec<String>,
    /// Payload format.
    #[serde(default)]
    pub data_format: DataFormat,
    /// Measurement name; `{n}` is topic level n (Telegraf: `name_override`).
    #[serde(alias = "name_override")]
    pub measurement: String,
    /// JSON keys written as tags instead of fields.
    #[serde(default)]
    pub tag_keys: Vec<String>,
    /// Tags made from topic levels: `sensor: "{1}"`.
    #[serde(default)]
    pub topic_tags: BTreeMap<String, String>,
    /// `value` format: the field name (`{3}_{4}`); default `value`.
    #[serde(default)]
    pub field: Option<String>,
    /// `value` format: the value's type.
    #[serde(default)]
    pub value_type: FieldType,
    /// JSON fields with a fixed type; the others follow their JSON type (numbers float,
    /// strings kept as strings, booleans).
    #[serde(default)]
    pub types: BTreeMap<String, FieldType>,
    /// JSON fields not written.
    #[serde(default)]
    pub exclude_fields: Vec<String>,
    /// JSON key of a timestamp in the payload; it wins over the receive time.
    #[serde(default)]
    pub time_key: Option<String>,
    /// Format of `time_key`.
    #[serde(default)]
    pub time_format: TimeFormat,
    /// Receive times are rounded down to this (`1s`), so that values published one by
    /// one (a sensor's temperature, humidity, dew point) land on one timestamp and
    /// InfluxDB merges them into one row.
    #[serde(default)]
    pub precision: Option<String>,
}

impl InputConfig {
    /// The rounding of receive times, if any.
    pub fn precision(&self) -> Result<Option<Duration>, String> {
        self.precision
            .as_deref()
            .map(|p| humantime::parse_duration(p).map_err(|e| format!("`{p}`: {e}")))
            .transpose()
    }
}

impl TelemetryConfig {
    /// The MQTT client id.
    pub fn client_id(&self) -> String {
        self.client_id.clone().unwrap_or_else(|| self.name.clone())
    }

    /// The output, with `DCS_INFLUX_URL`, `DCS_INFLUX_PASSWORD` and `DCS_INFLUX_TOKEN`
    /// applied; `None` when no URL is configured (`url: ""`, e.g. an unset
    /// `${DCS_INFLUX_URL:-}`), which means spooling only.
    pub fn output(&self) -> Option<InfluxSettings> {
        let o = self.output.clone()?.with_env_overrides();
        (!o.url.trim().is_empty()).then_some(o)
    }

    /// Makes relative paths relative to the config file.
    pub fn resolve_paths(&mut self, config_file: &Path) {
        self.spool.dir = dcs_shared::config::relative_to(config_file, &self.spool.dir);
        if let Some(d) = &self.spool.dead_letter {
            self.spool.dead_letter = Some(dcs_shared::config::relative_to(config_file, d));
        }
    }
}

fn err<T>(key: &str, message: String) -> Result<T, (String, String)> {
    Err((key.to_string(), message))
}

fn check_input(i: &InputConfig) -> Result<(), (String, String)> {
    if i.topics.is_empty() {
        return err("topics", "at least one topic filter".into());
    }
    let mut shortest = usize::MAX;
    let mut unbounded = false;
    for t in &i.topics {
        topic::check_filter(t).or_else(|m| err("topics", m))?;
        let (n, open) = topic::min_levels(t);
        shortest = shortest.min(n);
        unbounded |= open;
    }
    let level_ok = |key: &str, text: &str| -> Result<(), (String, String)> {
        let t = Template::parse(text).or_else(|m| err(key, m))?;
        if t.max_level() > shortest && !unbounded {
            return err(
                key,
                format!(
                    "`{text}` uses topic level {} but the topics have only {shortest}",
                    t.max_level()
                ),
            );
        }
        Ok(())
    };
    level_ok("measurement", &i.measurement)?;
    for (k, v) in &i.topic_tags {
        level_ok(&format!("topic_tags.{k}"), v)?;
    }
    match i.data_format {
        DataFormat::Value => {
            if let Some(f) = &i.field {
                level_ok("field", f)?;
            }
            if !i.tag_keys.is_empty() || i.time_key.is_some() || !i.types.is_empty() {
                return err(
                    "data_format",
                    "`value` payloads have no keys: tag_keys, time_key and types need `json`"
                        .into(),
                );
            }
        }
        DataFormat::Json => {
            if i.field.is_some() {
                return err("field", "only for `data_format: value`".into());
            }
        }
    }
    i.precision().or_else(|m| err("precision", m))?;
    Ok(())
}

/// Two filters that share topics without one covering the other would both be
/// subscribed, and the broker would deliver those topics twice.
fn check_overlaps(inputs: &[InputConfig]) -> Result<(), (String, String)> {
    let all: Vec<(usize, &String)> = inputs
        .iter()
        .enumerate()
        .flat_map(|(n, i)| i.topics.iter().map(move |t| (n, t)))
        .collect();
    for (a, (na, fa)) in all.iter().enumerate() {
        for (nb, fb) in &all[a + 1..] {
            if topic::intersects(fa, fb) && !topic::covers(fa, fb) && !topic::covers(fb, fa) {
                return err(
                    &format!("inputs[{nb}].topics"),
                    format!(
                        "`{fb}` overlaps `{fa}` of inputs[{na}] without either covering the other: \
                         the broker would deliver the shared topics twice; add a filter that covers both"
                    ),
                );
            }
        }
    }
    Ok(())
}

impl Validate for TelemetryConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.inputs.is_empty() {
            return Err(("inputs".into(), "at least one input".into()));
        }
        for (n, i) in self.inputs.iter().enumerate() {
            check_input(i).map_err(|(k, m)| (format!("inputs[{n}].{k}"), m))?;
        }
        check_overlaps(&self.inputs)?;
        if let Some(o) = self.output() {
            o.check().map_err(|(k, m)| (format!("output.{k}"), m))?;
        }
        let s = &self.spool;
        if s.segment_bytes < 4096 || s.max_bytes < 2 * s.segment_bytes {
            return Err((
                "spool.max_bytes".into(),
                "must be at least two segments (segment_bytes >= 4096)".into(),
            ));
        }
        for (key, zero) in [
            ("batch.size", self.batch.size == 0),
            ("batch.interval_ms", self.batch.interval_ms == 0),
            ("batch.max_bytes", self.batch.max_bytes == 0),
            ("retry.initial_ms", self.retry.initial_ms == 0),
            ("retry.max_secs", self.retry.max_secs == 0),
        ] {
            if zero {
                return Err((key.into(), "must be > 0".into()));
            }
        }
        if !(0.1..=86400.0).contains(&self.stats_interval_secs) {
            return Err((
                "stats_interval_secs".into(),
                "must be between 0.1 and 86400".into(),
            ));
        }
        if self.max_payload_bytes == 0 {
            return Err(("max_payload_bytes".into(), "must be > 0".into()));
        }
        self.mqtt.check().map_err(|(k, m)| (format!("mqtt.{k}"), m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<TelemetryConfig, String> {
        dcs_shared::config::from_str::<TelemetryConfig>(yaml, Path::new("t.yaml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_config_has_safe_defaults() {
        let c = load("inputs: [{topics: [dcs/status], measurement: dcs_status}]").unwrap();
        assert!(c.output.is_none());
        assert!(c.spool.fsync);
        assert_eq!(c.spool.overflow, Overflow::DropOldest);
        assert_eq!(c.client_id(), "telemetry");
        assert_eq!(
            c.spool.dead_letter_path(),
            Path::new(".dcs/telemetry/dead-letter.jsonl")
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = load("inputs: [{topics: [a/#/b], measurement: m}]").unwrap_err();
        assert!(
            e.contains("inputs[0].topics") && e.contains("last level"),
            "{e}"
        );
        let e = load("inputs: [{topics: [a/+], measurement: '{3}'}]").unwrap_err();
        assert!(
            e.contains("inputs[0].measurement") && e.contains("only 2"),
            "{e}"
        );
        let e = load("inputs: [{topics: [a], measurement: m, data_format: value, tag_keys: [x]}]")
            .unwrap_err();
        assert!(e.contains("need `json`"), "{e}");
        let e = load("inputs: [{topics: [a], measurement: m, precision: soon}]").unwrap_err();
        assert!(e.contains("inputs[0].precision"), "{e}");
        let e = load("inputs: [{topics: [a], measurement: m, types: {x: decimal}}]").unwrap_err();
        assert!(e.contains("decimal"), "{e}");
        let e = load("inputs: [{topics: [a], measurement: m}]\noutput: {url: 'http://h:1'}")
            .unwrap_err();
        assert!(e.contains("output.database"), "{e}");
        let e = load("inputs: []").unwrap_err();
        assert!(e.contains("at least one input"), "{e}");
    }

    #[test]
    fn partial_overlaps_are_refused() {
        let e = load(
            "inputs: [{topics: ['a/+/c'], measurement: m}, {topics: ['a/b/+'], measurement: n}]",
        )
        .unwrap_err();
        assert!(e.contains("inputs[1].topics") && e.contains("twice"), "{e}");
        assert!(load(
            "inputs: [{topics: ['a/b'], measurement: m}, {topics: ['a/#'], measurement: n}]"
        )
        .is_ok());
    }

    #[test]
    fn hash_filters_allow_any_level() {
        assert!(load("inputs: [{topics: ['a/#'], measurement: '{5}'}]").is_ok());
    }

    #[test]
    fn shipped_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/telemetry.yaml");
        let c = dcs_shared::config::load::<TelemetryConfig>(&path).unwrap();
        assert!(c.inputs.len() >= 5);
    }
}
