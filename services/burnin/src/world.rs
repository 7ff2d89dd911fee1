//! What the sequencer knows of the lab, from the other services' own topics: the CAEN
//! channels, the chiller, the interlock and its LV permit, the Ph2_ACF bridge, who is
//! online, and the environment values (as [`Inputs`], with their ages). No I/O.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use dcs_shared::inputs::{InputConfig, Inputs, Value};
use dcs_shared::UtcNanos;
use serde::Deserialize;
use serde_json::{json, Value as Json};

/// The services the sequencer commands and watches (`burnin.yaml` `services:`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Names {
    /// The CAEN FSM (`name:` in caen.yaml).
    #[serde(default = "caen_default")]
    pub caen: String,
    /// The chiller driver (`name:` in julabo.yaml).
    #[serde(default = "chiller_default")]
    pub chiller: String,
    /// The interlock.
    #[serde(default = "interlock_default")]
    pub interlock: String,
    /// The Ph2_ACF bridge.
    #[serde(default = "ph2acf_default")]
    pub ph2acf: String,
}

fn caen_default() -> String {
    "dcs".into()
}
fn chiller_default() -> String {
    "julabo".into()
}
fn interlock_default() -> String {
    "interlock".into()
}
fn ph2acf_default() -> String {
    "ph2acf".into()
}

impl Default for Names {
    fn default() -> Self {
        Names {
            caen: caen_default(),
            chiller: chiller_default(),
            interlock: interlock_default(),
            ph2acf: ph2acf_default(),
        }
    }
}

/// One CAEN channel as last published.
#[derive(Debug, Clone, Default)]
pub struct Channel {
    /// Module name (None: monitored only).
    pub module: Option<String>,
    /// LV on or ramping (status bits 0-2).
    pub lv_on: Option<bool>,
    /// HV on or ramping.
    pub hv_on: Option<bool>,
    /// LV ramping (status bits 1-2): not yet confirmed either way.
    pub lv_ramping: bool,
    /// HV ramping (status bits 1-2).
    pub hv_ramping: bool,
    /// HV VMon, volts.
    pub hv_v: Option<f64>,
    /// HV IMon, microamps.
    pub hv_i: Option<f64>,
    /// LV VMon, volts.
    pub lv_v: Option<f64>,
    /// When it arrived.
    pub at: Option<Instant>,
}

/// The Ph2_ACF bridge as last published.
#[derive(Debug, Clone, Default)]
pub struct Bridge {
    /// `idle`, `running`, `stopping`.
    pub state: Option<String>,
    /// The current run.
    pub run_id: Option<String>,
    /// The last finished run: (run id, status `done|stopped|failed`, error).
    pub last_run: Option<(String, String, Option<String>)>,
}

/// Everything observed.
pub struct World {
    names: Names,
    /// CAEN channels by id.
    pub channels: BTreeMap<String, Channel>,
    /// Chiller bath temperature, degC, and whether it runs.
    pub chiller_temp: Option<f64>,
    /// Whether the chiller circulates.
    pub chiller_running: Option<bool>,
    /// `interlock/status` `state` and when it arrived.
    pub interlock: Option<(String, Instant)>,
    /// `interlock/permits` `lv_on`.
    pub lv_permit: Option<bool>,
    /// The Ph2_ACF bridge.
    pub bridge: Bridge,
    online: HashMap<String, bool>,
    /// The environment values.
    pub env: Inputs,
    env_names: Vec<String>,
}

impl World {
    /// A world that knows nothing yet.
    pub fn new(names: Names, env: &BTreeMap<String, InputConfig>, started: Instant) -> Self {
        World {
            names,
            channels: BTreeMap::new(),
            chiller_temp: None,
            chiller_running: None,
            interlock: None,
            lv_permit: None,
            bridge: Bridge::default(),
            online: HashMap::new(),
            env: Inputs::new(env, started),
            env_names: env.keys().cloned().collect(),
        }
    }

    /// The service names.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The topics to subscribe to.
    pub fn filters(&self) -> Vec<String> {
        let n = &self.names;
        let mut f = vec![
            format!("{}/channels/+", n.caen),
            format!("{}/status", n.chiller),
            format!("{}/status", n.interlock),
            format!("{}/permits", n.interlock),
            format!("{}/status", n.ph2acf),
        ];
        for s in [&n.caen, &n.chiller, &n.interlock, &n.ph2acf] {
            f.push(format!("{s}/online"));
            f.push(format!("{s}/reply"));
        }
        f.extend(self.env.filters());
        f.sort();
        f.dedup();
        f
    }

    /// Whether `service` said it is offline.
    pub fn offline(&self, service: &str) -> bool {
        self.online.get(service) == Some(&false)
    }

    /// Takes a message (not a reply: those go to the engine).
    pub fn ingest(&mut self, topic: &str, payload: &[u8], now: Instant, wall: UtcNanos) {
        if let Some(svc) = topic.strip_suffix("/online") {
            if !svc.contains('/') {
                self.online.insert(svc.to_string(), payload != b"false");
                self.env.set_online(svc, payload != b"false");
            }
        }
        self.env.ingest_at(topic, payload, now, wall);
        let doc = || serde_json::from_slice::<Json>(payload).unwrap_or(Json::Null);
        let n = &self.names;
        if let Some(id) = topic
            .strip_prefix(n.caen.as_str())
            .and_then(|t| t.strip_prefix("/channels/"))
        {
            let d = doc();
            if !d.is_object() {
                // Unreadable: forget it rather than act on an old reading.
                self.channels.remove(id);
                return;
            }
            let status = |k: &str| d.get(k).and_then(Json::as_i64);
            let f = |k: &str| d.get(k).and_then(Json::as_f64);
            self.channels.insert(
                id.to_string(),
                Channel {
                    module: d
                        .get("module")
                        .and_then(Json::as_str)
                        .filter(|m| !m.is_empty())
                        .map(String::from),
                    lv_on: status("lv_status").map(|s| s & 0b111 != 0),
                    hv_on: status("hv_status").map(|s| s & 0b111 != 0),
                    lv_ramping: status("lv_status").is_some_and(|s| s & 0b110 != 0),
                    hv_ramping: status("hv_status").is_some_and(|s| s & 0b110 != 0),
                    hv_v: f("hv_vMon"),
                    hv_i: f("hv_iMon"),
                    lv_v: f("lv_vMon"),
                    at: Some(now),
                },
            );
        } else if topic == format!("{}/status", n.chiller) {
            let d = doc();
            self.chiller_temp = d.get("internal_temp").and_then(Json::as_f64);
            self.chiller_running = d.get("running").and_then(Json::as_bool);
        } else if topic == format!("{}/status", n.interlock) {
            let d = doc();
            self.interlock = d
                .get("state")
                .and_then(Json::as_str)
                .map(|s| (s.to_string(), now));
        } else if topic == format!("{}/permits", n.interlock) {
            self.lv_permit = doc().get("lv_on").and_then(Json::as_bool);
        } else if topic == format!("{}/status", n.ph2acf) {
            let d = doc();
            let s = |v: &Json, k: &str| v.get(k).and_then(Json::as_str).map(String::from);
            self.bridge = Bridge {
                state: s(&d, "state"),
                run_id: s(&d, "run_id"),
                last_run: d
                    .get("last_run")
                    .and_then(|l| Some((s(l, "run_id")?, s(l, "status")?, s(l, "error")))),
            };
        }
    }

    /// Channel ids whose module is one of `modules`.
    pub fn channels_of(&self, modules: &[String]) -> Vec<String> {
        self.channels
            .iter()
            .filter(|(_, c)| c.module.as_ref().is_some_and(|m| modules.contains(m)))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Modules known from the channels.
    pub fn modules(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .channels
            .values()
            .filter_map(|c| c.module.clone())
            .collect();
        m.sort();
        m.dedup();
        m
    }

    /// Why the environment cannot be trusted now (stale, offline, garbage, never
    /// seen), or None.
    pub fn env_problem(&self, now: Instant) -> Option<String> {
        for (i, name) in self.env_names.iter().enumerate() {
            let r = self.env.read(i, now);
            if let Some(u) = r.untrusted.first() {
                return Some(format!("{}: {}", u.what, u.why));
            }
            if r.fresh.is_empty() {
                return Some(format!("{name}: no value yet"));
            }
        }
        None
    }

    /// Fresh values of environment input `name` (empty if unknown or stale).
    pub fn env_values(&self, name: &str, now: Instant) -> Vec<f64> {
        self.env.index(name).map_or_else(Vec::new, |i| {
            self.env
                .read(i, now)
                .fresh
                .into_iter()
                .map(|(_, v)| v.number())
                .collect()
        })
    }

    /// The conditions at `now`, for records: every environment series with its value
    /// and age (a value older than its `max_age_secs` is `null`, with `stale: true`:
    /// missing, never silently reused), the coolant, and each channel's supply state.
    pub fn snapshot(&self, channels: &[String], now: Instant) -> Json {
        let mut env = serde_json::Map::new();
        for (i, name) in self.env_names.iter().enumerate() {
            let max = self.env.max_age(i);
            let series: Vec<Json> = self
                .env
                .latest(i, now)
                .into_iter()
                .map(|(topic, v, age)| {
                    let stale = age > max;
                    json!({
                        "topic": topic,
                        "value": if stale { Json::Null } else { value_json(v) },
                        "age_s": round3(age.as_secs_f64()),
                        "stale": stale,
                    })
                })
                .collect();
            env.insert(name.clone(), Json::Array(series));
        }
        let ch: serde_json::Map<String, Json> = channels
            .iter()
            .map(|id| {
                let c = self.channels.get(id).cloned().unwrap_or_default();
                (
                    id.clone(),
                    json!({
                        "lv_on": c.lv_on, "hv_on": c.hv_on,
                        "hv_v": c.hv_v, "hv_i_ua": c.hv_i, "lv_v": c.lv_v,
                        "age_s": c.at.map(|a| round3(now.saturating_duration_since(a).as_secs_f64())),
                    }),
                )
            })
            .collect();
        json!({
            "env": env,
            "coolant": {"temp": self.chiller_temp, "running": self.chiller_running},
            "interlock": self.interlock.as_ref().map(|(s, _)| s.clone()),
            "channels": ch,
        })
    }

    /// Age of the interlock's status.
    pub fn interlock_age(&self, now: Instant) -> Option<Duration> {
        self.interlock
            .as_ref()
            .map(|(_, at)| now.saturating_duration_since(*at))
    }
}

fn value_json(v: Value) -> Json {
    v.to_json()
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
