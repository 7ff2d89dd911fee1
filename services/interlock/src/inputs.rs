//! The values the rules read: the latest sample of every series (one per matching
//! topic) of every configured input, with its age, and which publishers are online.
//! No I/O: messages come in as (topic, payload, instant).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use dcs_shared::topic;
use serde_json::Value as Json;

use crate::config::InputConfig;

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

#[derive(Debug, Clone)]
struct Sample {
    value: Value,
    at: Instant,
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

    /// Takes a message. JSON is parsed once however many inputs read the topic.
    pub fn ingest(&mut self, topic: &str, payload: &[u8], now: Instant) -> Ingested {
        let mut out = Ingested::default();
        let mut json: Option<Result<Json, String>> = None;
        for (i, input) in self.inputs.iter_mut().enumerate() {
            if !topic::matches(&input.filter, topic) {
                continue;
            }
            let value = match &input.field {
                None => bare(payload).map(Some),
                Some(field) => {
                    let doc = json.get_or_insert_with(|| {
                        serde_json::from_slice::<Json>(payload)
                            .map_err(|e| format!("not JSON ({e})"))
                    });
                    match doc {
                        Ok(doc) => field_value(doc, field),
                        Err(e) => Err(e.clone()),
                    }
                }
            };
            match value {
                // The publisher says it does not know (a chiller not yet read, or
                // disconnected): nothing new. The last value ages as it would.
                Ok(None) => {}
                Ok(Some(value)) => {
                    input
                        .series
                        .insert(topic.to_string(), Sample { value, at: now });
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

    /// Input `index` as of `now`.
    pub fn read(&self, index: usize, now: Instant) -> Reading {
        let input = &self.inputs[index];
        let mut r = Reading::default();
        for (topic, s) in &input.series {
            let source = input
                .source
                .as_deref()
                .unwrap_or_else(|| topic.split('/').next().unwrap_or(topic));
            let age = now.saturating_duration_since(s.at);
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
                        "stale: last value {:.0} s ago (max_age_secs {})",
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
                dcs_shared::command::truncate(text, 40)
            )),
        },
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
}
