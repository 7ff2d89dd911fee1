//! The values the rules read: the latest sample of every series (one per matching
//! topic) of every configured input, with its age, and which publishers are online.
//! No I/O: messages come in as (topic, payload, instant, wall clock).
//!
//! A value's age counts from when it was measured, not from when it arrived: a JSON
//! payload with a top-level [`MEASURED_AT`] (nanoseconds since the Unix epoch, UTC; the
//! chiller driver publishes it) is as old as that instant says, so a stream of new
//! messages repeating an old reading goes stale. Without it (bare sensor values, or
//! `null`), the arrival is the measurement.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value as Json;

use crate::{topic, UtcNanos};

/// One named input: a topic (wildcards allowed: every matching topic is a series of
/// its own) and where the value is in the payload.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// MQTT topic filter: `julabo/status`, `+/sensors/BME/dew`.
    pub topic: String,
    /// JSON key holding the value; without it the payload is a bare number
    /// (`21.7`) or `true`/`false`.
    #[serde(default)]
    pub field: Option<String>,
    /// A value older than this is stale, and stale counts as unsafe.
    pub max_age_secs: f64,
    /// Whose `<source>/online` says whether the publisher is alive; default: the
    /// topic's first level (`julabo`, `ESP01`).
    #[serde(default)]
    pub source: Option<String>,
}

impl InputConfig {
    /// Checks the input; an error is (field, message) for the caller to put under its
    /// own key (`inputs.<name>.<field>`).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        topic::check_filter(&self.topic).map_err(|m| ("topic", m))?;
        if !(self.max_age_secs > 0.0 && self.max_age_secs <= 365.0 * 86400.0) {
            return Err((
                "max_age_secs",
                "must be > 0 and at most a year (stale data counts as unsafe)".into(),
            ));
        }
        if self.field.as_deref() == Some("") {
            return Err((
                "field",
                "must name a JSON key, or be left out for bare values".into(),
            ));
        }
        if let Some(s) = &self.source {
            if topic::check_level(s).is_err() {
                return Err((
                    "source",
                    "must be a service name (an MQTT topic level)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// A value as read from a payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A number.
    Number(f64),
    /// `true`/`false`.
    Bool(bool),
}

impl Value {
    /// As a number (booleans are 0/1).
    pub fn number(self) -> f64 {
        match self {
            Value::Number(v) => v,
            Value::Bool(b) => f64::from(u8::from(b)),
        }
    }

    /// As a condition: a boolean, or a number other than 0.
    pub fn truthy(self) -> bool {
        match self {
            Value::Number(v) => v != 0.0,
            Value::Bool(b) => b,
        }
    }

    /// For alarm payloads.
    pub fn to_json(self) -> Json {
        match self {
            Value::Number(v) => serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number),
            Value::Bool(b) => Json::Bool(b),
        }
    }
}

/// The top-level payload field that says when its values were measured: an integer,
/// nanoseconds since the Unix epoch, UTC.
///
/// A top-level `time` is not read as one: in this suite it is when a message was
/// published (alarms, `interlock/status`, permits), which a republication renews.
pub const MEASURED_AT: &str = "measured_at";

#[derive(Debug, Clone)]
struct Sample {
    value: Value,
    /// When it arrived.
    at: Instant,
    /// How old it already was then (0 when the payload does not say).
    age_at_arrival: Duration,
}

impl Sample {
    fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.at)
            .saturating_add(self.age_at_arrival)
    }
}

struct Input {
    name: String,
    filter: String,
    field: Option<String>,
    max_age: Duration,
    source: Option<String>,
    /// Latest good sample per topic.
    series: HashMap<String, Sample>,
    /// Last garbage seen per topic (cleared by the next good value).
    malformed: HashMap<String, String>,
}

/// Why a value cannot be trusted.
#[derive(Debug, Clone, PartialEq)]
pub struct Untrusted {
    /// Which input and series.
    pub what: String,
    /// Why, in words.
    pub why: String,
}

/// One input as a rule sees it now.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// Fresh values by topic.
    pub fresh: Vec<(String, Value)>,
    /// Series that cannot be trusted (stale, publisher offline, garbage).
    pub untrusted: Vec<Untrusted>,
    /// Nothing ever arrived and `max_age` has not yet passed since start: not yet
    /// known (neither safe nor unsafe).
    pub waiting: bool,
}

/// All inputs.
pub struct Inputs {
    inputs: Vec<Input>,
    by_name: BTreeMap<String, usize>,
    /// `<source>/online` as last published.
    online: HashMap<String, bool>,
    started: Instant,
    malformed_total: u64,
}

/// What a message did to the inputs.
#[derive(Debug, Default, PartialEq)]
pub struct Ingested {
    /// Inputs that got a new good value.
    pub updated: Vec<usize>,
    /// Inputs whose payload could not be read, with why.
    pub malformed: Vec<(usize, String)>,
}

impl Inputs {
    /// Builds the store; `started` is when waiting for first values began.
    pub fn new(cfg: &BTreeMap<String, InputConfig>, started: Instant) -> Self {
        let inputs: Vec<Input> = cfg
            .iter()
            .map(|(name, c)| Input {
                name: name.clone(),
                filter: c.topic.clone(),
                field: c.field.clone(),
                max_age: Duration::from_secs_f64(c.max_age_secs),
                source: c.source.clone(),
                series: HashMap::new(),
                malformed: HashMap::new(),
            })
            .collect();
        let by_name = inputs
            .iter()
            .enumerate()
            .map(|(i, x)| (x.name.clone(), i))
            .collect();
        Inputs {
            inputs,
            by_name,
            online: HashMap::new(),
            started,
            malformed_total: 0,
        }
    }

    /// The index of input `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The input's name.
    pub fn name(&self, index: usize) -> &str {
        &self.inputs[index].name
    }

    /// The filters to subscribe to.
    pub fn filters(&self) -> Vec<String> {
        let all: Vec<String> = self.inputs.iter().map(|i| i.filter.clone()).collect();
        topic::minimal_set(&all)
    }

    /// Payloads that could not be read since start.
    pub fn malformed_total(&self) -> u64 {
        self.malformed_total
    }

    /// Records `<source>/online`.
    pub fn set_online(&mut self, source: &str, online: bool) {
        self.online.insert(source.to_string(), online);
    }

    /// Whether `source` said it is offline (never heard of counts as online: sensor
    /// boards have no last will; their values still age out).
    pub fn is_offline(&self, source: &str) -> bool {
        self.online.get(source) == Some(&false)
    }

    /// Takes a message that arrived at `now`, with the wall clock read from the system.
    /// Same as [`Inputs::ingest_at`] with `UtcNanos::now()`: for callers whose `now`
    /// is the current instant.
    pub fn ingest(&mut self, topic: &str, payload: &[u8], now: Instant) -> Ingested {
        self.ingest_at(topic, payload, now, UtcNanos::now())
    }

    /// Takes a message that arrived at `now`, `wall` being the same instant on the
    /// wall clock (to compare with the payload's [`MEASURED_AT`]). JSON is parsed once
    /// however many inputs read the topic.
    pub fn ingest_at(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        wall: UtcNanos,
    ) -> Ingested {
        let mut out = Ingested::default();
        let mut json: Option<Result<(Json, Duration), String>> = None;
        for (i, input) in self.inputs.iter_mut().enumerate() {
            if !topic::matches(&input.filter, topic) {
                continue;
            }
            let (value, age_at_arrival) = match &input.field {
                None => (bare(payload).map(Some), Duration::ZERO),
                Some(field) => {
                    let doc = json.get_or_insert_with(|| {
                        let doc = serde_json::from_slice::<Json>(payload)
                            .map_err(|e| format!("not JSON ({e})"))?;
                        let age = age_at_arrival(&doc, wall)?;
                        Ok((doc, age))
                    });
                    match doc {
                        Ok((doc, age)) => (field_value(doc, field), *age),
                        Err(e) => (Err(e.clone()), Duration::ZERO),
                    }
                }
            };
            match value {
                // The publisher says it does not know (a chiller not yet read, or
                // disconnected): nothing new. The last value ages as it would.
                Ok(None) => {}
                Ok(Some(value)) => {
                    input.series.insert(
                        topic.to_string(),
                        Sample {
                            value,
                            at: now,
                            age_at_arrival,
                        },
                    );
                    input.malformed.remove(topic);
                    out.updated.push(i);
                }
                Err(why) => {
                    // The last good value is kept but not refreshed: garbage ages
                    // into "stale", never into "fine".
                    input.malformed.insert(topic.to_string(), why.clone());
                    self.malformed_total += 1;
                    out.malformed.push((i, why));
                }
            }
        }
        out
    }

    /// Every series of input `index` that ever had a good value: (topic, latest good
    /// value, its age now), stale ones included, in topic order; with
    /// [`Inputs::max_age`] the caller decides what is too old for its purpose.
    pub fn latest(&self, index: usize, now: Instant) -> Vec<(String, Value, Duration)> {
        let mut v: Vec<_> = self.inputs[index]
            .series
            .iter()
            .map(|(t, s)| (t.clone(), s.value, s.age(now)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The `max_age_secs` of input `index`.
    pub fn max_age(&self, index: usize) -> Duration {
        self.inputs[index].max_age
    }

    /// Input `index` as of `now`.
    pub fn read(&self, index: usize, now: Instant) -> Reading {
        let input = &self.inputs[index];
        let mut r = Reading::default();
        for (topic, s) in &input.series {
            let source = input
                .source
                .as_deref()
                .unwrap_or_else(|| topic.split('/').next().unwrap_or(topic));
            let age = s.age(now);
            let what = || format!("{} ({topic})", input.name);
            if self.is_offline(source) {
                r.untrusted.push(Untrusted {
                    what: what(),
                    why: format!("{source} is offline ({source}/online = false)"),
                });
            } else if age > input.max_age {
                r.untrusted.push(Untrusted {
                    what: what(),
                    why: format!(
                        "stale: last value measured {:.0} s ago (max_age_secs {})",
                        age.as_secs_f64(),
                        input.max_age.as_secs_f64()
                    ),
                });
            } else if let Some(why) = input.malformed.get(topic) {
                r.untrusted.push(Untrusted {
                    what: what(),
                    why: format!("last payload unreadable: {why}"),
                });
            } else {
                r.fresh.push((topic.clone(), s.value));
            }
        }
        for (topic, why) in &input.malformed {
            if !input.series.contains_key(topic) {
                r.untrusted.push(Untrusted {
                    what: format!("{} ({topic})", input.name),
                    why: format!("payload unreadable: {why}"),
                });
            }
        }
        if input.series.is_empty() && input.malformed.is_empty() {
            if now.saturating_duration_since(self.started) <= input.max_age {
                r.waiting = true;
            } else {
                r.untrusted.push(Untrusted {
                    what: input.name.clone(),
                    why: format!(
                        "no value on {} for {:.0} s (max_age_secs {})",
                        input.filter,
                        now.saturating_duration_since(self.started).as_secs_f64(),
                        input.max_age.as_secs_f64()
                    ),
                });
            }
        }
        // Stable order for messages and tests.
        r.fresh.sort_by(|a, b| a.0.cmp(&b.0));
        r
    }
}

fn bare(payload: &[u8]) -> Result<Value, String> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| "payload is not UTF-8".to_string())?
        .trim();
    match text {
        "true" => Ok(Value::Bool(true)),
        "false" => Ok(Value::Bool(false)),
        _ => match text.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(Value::Number(v)),
            _ => Err(format!(
                "expected a number, got `{}`",
                crate::command::truncate(text, 40)
            )),
        },
    }
}

/// How old the payload's values were when it arrived at `wall`: `wall - measured_at`,
/// 0 when it has no [`MEASURED_AT`] (or `null`), and 0 for an instant in the future
/// (a clock ahead of ours must not make a value younger than its arrival). A
/// [`MEASURED_AT`] that is not an integer makes the payload unreadable: its age is
/// unknown, so none of its values can be trusted.
fn age_at_arrival(doc: &Json, wall: UtcNanos) -> Result<Duration, String> {
    match doc.get(MEASURED_AT) {
        None | Some(Json::Null) => Ok(Duration::ZERO),
        Some(v) => {
            let ns = v.as_i64().ok_or_else(|| {
                format!(
                    "`{MEASURED_AT}` is not an integer of nanoseconds since the Unix epoch: {}",
                    crate::command::truncate(&v.to_string(), 40)
                )
            })?;
            let age = wall.as_nanos().saturating_sub(ns);
            Ok(Duration::from_nanos(u64::try_from(age).unwrap_or(0)))
        }
    }
}

fn field_value(doc: &Json, field: &str) -> Result<Option<Value>, String> {
    match doc.get(field) {
        Some(Json::Number(n)) => n
            .as_f64()
            .filter(|v| v.is_finite())
            .map(|v| Some(Value::Number(v)))
            .ok_or_else(|| format!("`{field}` is not a finite number")),
        Some(Json::Bool(b)) => Ok(Some(Value::Bool(*b))),
        Some(Json::Null) => Ok(None),
        Some(other) => Err(format!("`{field}` is not a number or boolean: {other}")),
        None => Err(format!("no `{field}` in the payload")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(start: Instant) -> Inputs {
        let cfg: BTreeMap<String, InputConfig> = serde_yaml::from_str(
            r#"
bath: {topic: julabo/status, field: internal_temp, max_age_secs: 10}
running: {topic: julabo/status, field: running, max_age_secs: 10}
dew: {topic: "+/sensors/BME/dew", max_age_secs: 5}
"#,
        )
        .unwrap();
        Inputs::new(&cfg, start)
    }

    #[test]
    fn json_fields_and_bare_values_with_wildcards() {
        let t0 = Instant::now();
        let mut s = store(t0);
        let got = s.ingest(
            "julabo/status",
            br#"{"internal_temp": -20.5, "running": true}"#,
            t0,
        );
        assert_eq!(
            got.updated,
            [s.index("bath").unwrap(), s.index("running").unwrap()]
        );
        s.ingest("ESP01/sensors/BME/dew", b"4.5", t0);
        s.ingest("ESP02/sensors/BME/dew", b" 7.25\n", t0);
        let dew = s.read(s.index("dew").unwrap(), t0);
        assert_eq!(
            dew.fresh,
            [
                ("ESP01/sensors/BME/dew".to_string(), Value::Number(4.5)),
                ("ESP02/sensors/BME/dew".to_string(), Value::Number(7.25))
            ]
        );
        let run = s.read(s.index("running").unwrap(), t0);
        assert_eq!(run.fresh[0].1, Value::Bool(true));
    }

    #[test]
    fn stale_offline_and_garbage_are_untrusted_never_fine() {
        let t0 = Instant::now();
        let mut s = store(t0);
        let dew = s.index("dew").unwrap();
        // Nothing yet: waiting until max_age has passed since start, then untrusted.
        assert!(s.read(dew, t0 + Duration::from_secs(4)).waiting);
        let r = s.read(dew, t0 + Duration::from_secs(6));
        assert!(!r.waiting && r.untrusted[0].why.contains("no value on +/sensors/BME/dew"));

        s.ingest("ESP01/sensors/BME/dew", b"4.5", t0);
        let r = s.read(dew, t0 + Duration::from_secs(6));
        assert!(
            r.fresh.is_empty() && r.untrusted[0].why.contains("stale"),
            "{r:?}"
        );

        let t1 = t0 + Duration::from_secs(10);
        s.ingest("ESP01/sensors/BME/dew", b"4.5", t1);
        let got = s.ingest("ESP01/sensors/BME/dew", b"nan", t1);
        assert_eq!(got.malformed.len(), 1);
        let r = s.read(dew, t1);
        assert!(r.untrusted[0].why.contains("expected a number"), "{r:?}");
        s.ingest("ESP01/sensors/BME/dew", b"4.0", t1);
        assert_eq!(s.read(dew, t1).fresh.len(), 1);

        s.set_online("ESP01", false);
        let r = s.read(dew, t1);
        assert!(r.untrusted[0].why.contains("ESP01 is offline"), "{r:?}");
        s.set_online("ESP01", true);
        assert!(s.read(dew, t1).untrusted.is_empty());

        // null is "not known": no new value, the old one ages.
        let bath = s.index("bath").unwrap();
        let t2 = t0 + Duration::from_secs(11);
        assert!(s.read(bath, t2).untrusted[0]
            .why
            .contains("no value on julabo/status"));
        s.ingest(
            "julabo/status",
            br#"{"internal_temp": 4.0, "running": true}"#,
            t0,
        );
        let got = s.ingest(
            "julabo/status",
            br#"{"internal_temp": null, "running": null}"#,
            t1,
        );
        assert_eq!(got, Ingested::default());
        assert!(s.read(bath, t1).fresh.len() == 1);
        assert!(s.read(bath, t2).untrusted[0].why.contains("stale"));
        s.ingest("julabo/status", b"{garbage", t1);
        assert!(s.read(bath, t1).untrusted[0].why.contains("not JSON"));
        assert_eq!(s.malformed_total(), 3);
    }

    const SEC: i64 = 1_000_000_000;
    /// Some wall-clock instant (2027-01-15), as `UtcNanos`.
    const WALL: i64 = 1_800_000_000 * SEC;

    fn status(running: bool, measured_at: Option<i64>) -> Vec<u8> {
        serde_json::json!({"internal_temp": 4.0, "running": running, "measured_at": measured_at})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn a_new_message_with_an_old_measurement_is_stale() {
        let t0 = Instant::now();
        let mut s = store(t0);
        let running = s.index("running").unwrap();
        // Measured 20 s ago, arriving now: older than max_age (10 s) at once.
        s.ingest_at(
            "julabo/status",
            &status(true, Some(WALL - 20 * SEC)),
            t0,
            UtcNanos(WALL),
        );
        let r = s.read(running, t0);
        assert!(r.fresh.is_empty(), "{r:?}");
        assert!(
            r.untrusted[0]
                .why
                .contains("stale: last value measured 20 s ago"),
            "{r:?}"
        );

        // Measured 4 s before arrival: fresh for 6 s more, then stale.
        s.ingest_at(
            "julabo/status",
            &status(true, Some(WALL - 4 * SEC)),
            t0,
            UtcNanos(WALL),
        );
        assert_eq!(s.read(running, t0 + Duration::from_secs(5)).fresh.len(), 1);
        assert!(!s
            .read(running, t0 + Duration::from_secs(7))
            .untrusted
            .is_empty());

        // The same reading republished every second (issue 15): each message is new,
        // its content is not, and it goes stale all the same.
        for k in 1..=12u64 {
            let at = t0 + Duration::from_secs(k);
            let wall = UtcNanos(WALL + k as i64 * SEC);
            s.ingest_at("julabo/status", &status(true, Some(WALL)), at, wall);
        }
        let r = s.read(running, t0 + Duration::from_secs(12));
        assert!(
            r.fresh.is_empty() && r.untrusted[0].why.contains("stale"),
            "{r:?}"
        );
    }

    #[test]
    fn without_a_measured_instant_the_arrival_counts() {
        let t0 = Instant::now();
        let mut s = store(t0);
        let running = s.index("running").unwrap();
        for payload in [status(true, None), br#"{"running": true}"#.to_vec()] {
            s.ingest_at("julabo/status", &payload, t0, UtcNanos(WALL));
            assert_eq!(s.read(running, t0 + Duration::from_secs(9)).fresh.len(), 1);
            let r = s.read(running, t0 + Duration::from_secs(11));
            assert!(r.untrusted[0].why.contains("stale"), "{r:?}");
        }
        // Bare values never carry one.
        let dew = s.index("dew").unwrap();
        s.ingest_at("ESP01/sensors/BME/dew", b"4.5", t0, UtcNanos(WALL));
        assert_eq!(s.read(dew, t0 + Duration::from_secs(5)).fresh.len(), 1);
    }

    #[test]
    fn a_measured_instant_in_the_future_counts_as_the_arrival() {
        let t0 = Instant::now();
        let mut s = store(t0);
        let running = s.index("running").unwrap();
        // The publisher's clock is a minute ahead: no younger than arrival, no older.
        s.ingest_at(
            "julabo/status",
            &status(true, Some(WALL + 60 * SEC)),
            t0,
            UtcNanos(WALL),
        );
        assert_eq!(s.read(running, t0 + Duration::from_secs(9)).fresh.len(), 1);
        let r = s.read(running, t0 + Duration::from_secs(11));
        assert!(
            r.fresh.is_empty() && r.untrusted[0].why.contains("stale"),
            "{r:?}"
        );
    }

    #[test]
    fn an_unreadable_measured_instant_makes_the_payload_untrusted() {
        let t0 = Instant::now();
        let mut s = store(t0);
        let running = s.index("running").unwrap();
        s.ingest_at(
            "julabo/status",
            &status(true, Some(WALL)),
            t0,
            UtcNanos(WALL),
        );
        for bad in [
            r#"{"running": true, "measured_at": "2027-01-15T08:00:00Z"}"#,
            r#"{"running": true, "measured_at": 1.8e18}"#,
        ] {
            let got = s.ingest_at("julabo/status", bad.as_bytes(), t0, UtcNanos(WALL));
            assert_eq!(got.malformed.len(), 2, "both inputs of the topic: {got:?}");
            let r = s.read(running, t0);
            assert!(r.fresh.is_empty(), "{r:?}");
            assert!(
                r.untrusted[0]
                    .why
                    .contains("`measured_at` is not an integer"),
                "{r:?}"
            );
        }
    }
}
