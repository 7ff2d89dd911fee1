//! What the interlock knows of the services it commands, from their own status
//! topics: the CAEN channels (`<caen>/channels/<id>`, retained per channel) and the
//! chiller (`<chiller>/status`). Used to decide whether LV is on and whether an action
//! took effect. No I/O.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// One CAEN channel as last published.
#[derive(Debug, Clone)]
struct Channel {
    /// Has a module: the FSM commands it.
    active: bool,
    lv_on: Option<bool>,
    hv_on: Option<bool>,
    at: Instant,
}

/// The chiller as last published.
#[derive(Debug, Clone, Default)]
struct Chiller {
    setpoints: [Option<f64>; 3],
    used_setpoint: Option<u8>,
    at: Option<Instant>,
}

/// The MARTA CO2 plant as last published.
#[derive(Debug, Clone, Default)]
struct Marta {
    setpoint: Option<f64>,
    co2_on: Option<bool>,
    at: Option<Instant>,
}

/// The commanded services' state.
#[derive(Debug)]
pub struct Plant {
    caen: String,
    chiller_name: String,
    marta_name: Option<String>,
    max_age: Duration,
    channels: BTreeMap<String, Channel>,
    chiller: Chiller,
    marta: Marta,
    caen_offline: bool,
    chiller_offline: bool,
    marta_offline: bool,
}

/// A yes/no the interlock may not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Known true.
    Yes,
    /// Known false.
    No,
    /// Stale, offline, or never published.
    Unknown,
}

impl Plant {
    /// A plant view for the CAEN FSM `caen` and chiller driver `chiller`.
    pub fn new(caen: &str, chiller: &str, max_age: Duration) -> Self {
        Plant {
            caen: caen.into(),
            chiller_name: chiller.into(),
            marta_name: None,
            max_age,
            channels: BTreeMap::new(),
            chiller: Chiller::default(),
            marta: Marta::default(),
            caen_offline: false,
            chiller_offline: false,
            marta_offline: false,
        }
    }

    /// Also follows the MARTA driver `marta`.
    pub fn with_marta(mut self, marta: Option<&str>) -> Self {
        self.marta_name = marta.map(String::from);
        self
    }

    /// The topics to subscribe to.
    pub fn filters(&self) -> Vec<String> {
        let mut f = vec![
            format!("{}/channels/+", self.caen),
            format!("{}/status", self.chiller_name),
            format!("{}/reply", self.caen),
            format!("{}/reply", self.chiller_name),
        ];
        if let Some(m) = &self.marta_name {
            f.push(format!("{m}/status"));
            f.push(format!("{m}/reply"));
        }
        f
    }

    /// Takes a message if it is a status of a target; `true` if it was one.
    pub fn ingest(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        if is(topic, &self.caen, "online") {
            self.caen_offline = payload == b"false";
            return true;
        }
        if is(topic, &self.chiller_name, "online") {
            self.chiller_offline = payload == b"false";
            return true;
        }
        if let Some(m) = &self.marta_name {
            if is(topic, m, "online") {
                self.marta_offline = payload == b"false";
                return true;
            }
            if is(topic, m, "status") {
                let doc = serde_json::from_slice::<Json>(payload).unwrap_or(Json::Null);
                self.marta = Marta {
                    setpoint: doc.get("temperature_setpoint").and_then(Json::as_f64),
                    co2_on: doc.get("co2_on").and_then(Json::as_bool),
                    at: doc.is_object().then_some(now),
                };
                return true;
            }
        }
        if let Some(id) = topic
            .strip_prefix(self.caen.as_str())
            .and_then(|t| t.strip_prefix("/channels/"))
        {
            if id.is_empty() || id.contains('/') {
                return false;
            }
            let Ok(doc) = serde_json::from_slice::<Json>(payload) else {
                // Unreadable: forget it, so the channel ages out instead of looking fine.
                self.channels.remove(id);
                return true;
            };
            // On, or still ramping (up, or down after an off): the output may carry
            // voltage, so an off is not confirmed yet (SPEC 4.2 bits 0-2).
            let on = |k: &str| doc.get(k).and_then(Json::as_i64).map(|s| s & 0b111 != 0);
            let active = doc
                .get("module")
                .and_then(Json::as_str)
                .is_some_and(|m| !m.is_empty());
            self.channels.insert(
                id.to_string(),
                Channel {
                    active,
                    lv_on: on("lv_status"),
                    hv_on: on("hv_status"),
                    at: now,
                },
            );
            return true;
        }
        if is(topic, &self.chiller_name, "status") {
            let doc = serde_json::from_slice::<Json>(payload).unwrap_or(Json::Null);
            let f = |k: &str| doc.get(k).and_then(Json::as_f64);
            self.chiller = Chiller {
                setpoints: [f("setpoint_1"), f("setpoint_2"), f("setpoint_3")],
                used_setpoint: doc
                    .get("used_setpoint")
                    .and_then(Json::as_u64)
                    .and_then(|n| u8::try_from(n).ok())
                    .filter(|n| (1..=3).contains(n)),
                at: doc.is_object().then_some(now),
            };
            return true;
        }
        false
    }

    fn caen_fresh(&self, now: Instant) -> bool {
        !self.caen_offline
            && self.channels.values().any(|c| c.active)
            && self
                .channels
                .values()
                .filter(|c| c.active)
                .all(|c| now.saturating_duration_since(c.at) <= self.max_age)
    }

    fn any_active(&self, now: Instant, on: impl Fn(&Channel) -> Option<bool>) -> Known {
        if !self.caen_fresh(now) {
            return Known::Unknown;
        }
        let mut unknown = false;
        for c in self.channels.values().filter(|c| c.active) {
            match on(c) {
                Some(true) => return Known::Yes,
                Some(false) => {}
                None => unknown = true,
            }
        }
        if unknown {
            Known::Unknown
        } else {
            Known::No
        }
    }

    /// Whether LV is on on any commanded channel.
    pub fn any_lv_on(&self, now: Instant) -> Known {
        self.any_active(now, |c| c.lv_on)
    }

    /// Whether HV is on on any commanded channel.
    pub fn any_hv_on(&self, now: Instant) -> Known {
        self.any_active(now, |c| c.hv_on)
    }

    /// The chiller's set-point in use (1..3) and its temperature, if known and fresh.
    pub fn chiller_setpoint(&self, now: Instant) -> Option<(u8, f64)> {
        let at = self.chiller.at?;
        if self.chiller_offline || now.saturating_duration_since(at) > self.max_age {
            return None;
        }
        let n = self.chiller.used_setpoint?;
        Some((n, self.chiller.setpoints[usize::from(n - 1)]?))
    }

    fn marta_fresh(&self, now: Instant) -> Option<&Marta> {
        let at = self.marta.at?;
        (!self.marta_offline && now.saturating_duration_since(at) <= self.max_age)
            .then_some(&self.marta)
    }

    /// MARTA's temperature set-point, if known and fresh.
    pub fn marta_setpoint(&self, now: Instant) -> Option<f64> {
        self.marta_fresh(now)?.setpoint
    }

    /// Whether MARTA's CO2 start bit is set, if known and fresh.
    pub fn marta_co2_on(&self, now: Instant) -> Known {
        match self.marta_fresh(now).and_then(|m| m.co2_on) {
            Some(true) => Known::Yes,
            Some(false) => Known::No,
            None => Known::Unknown,
        }
    }

    /// Whether `topic` is a target's command reply topic.
    pub fn is_reply(&self, topic: &str) -> bool {
        is(topic, &self.caen, "reply")
            || is(topic, &self.chiller_name, "reply")
            || self
                .marta_name
                .as_deref()
                .is_some_and(|m| is(topic, m, "reply"))
    }

    /// The CAEN FSM's MQTT name.
    pub fn caen(&self) -> &str {
        &self.caen
    }

    /// The chiller driver's MQTT name.
    pub fn chiller(&self) -> &str {
        &self.chiller_name
    }

    /// The MARTA driver's MQTT name (config-checked to be set when a `marta_*`
    /// action exists).
    pub fn marta(&self) -> &str {
        self.marta_name.as_deref().unwrap_or("MARTA")
    }
}

/// `topic == "<service>/<suffix>"`, without building the string (every message
/// passes here).
fn is(topic: &str, service: &str, suffix: &str) -> bool {
    topic
        .strip_prefix(service)
        .and_then(|t| t.strip_prefix('/'))
        == Some(suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lv_and_hv_from_the_status_words_of_active_channels() {
        let t0 = Instant::now();
        let mut p = Plant::new("dcs", "julabo", Duration::from_secs(30));
        assert_eq!(p.any_lv_on(t0), Known::Unknown);
        p.ingest(
            "dcs/channels/0",
            br#"{"module":"m0","lv_status":1,"hv_status":5}"#,
            t0,
        );
        // Inactive channels are not commanded and do not count.
        p.ingest(
            "dcs/channels/2",
            br#"{"module":null,"lv_status":0,"hv_status":0}"#,
            t0,
        );
        assert_eq!(p.any_lv_on(t0), Known::Yes);
        assert_eq!(p.any_hv_on(t0), Known::Yes);
        p.ingest(
            "dcs/channels/0",
            br#"{"module":"m0","lv_status":0,"hv_status":0}"#,
            t0,
        );
        assert_eq!(p.any_lv_on(t0), Known::No);
        assert_eq!(p.any_lv_on(t0 + Duration::from_secs(31)), Known::Unknown);
        // Ramping down after an off (bit 2): still energised, the off not confirmed.
        p.ingest(
            "dcs/channels/0",
            br#"{"module":"m0","lv_status":4,"hv_status":4}"#,
            t0,
        );
        assert_eq!(p.any_lv_on(t0), Known::Yes);
        assert_eq!(p.any_hv_on(t0), Known::Yes);
        p.ingest(
            "dcs/channels/0",
            br#"{"module":"m0","lv_status":null,"hv_status":0}"#,
            t0,
        );
        assert_eq!(p.any_lv_on(t0), Known::Unknown);
        p.ingest("dcs/online", b"false", t0);
        assert_eq!(p.any_hv_on(t0), Known::Unknown);
    }

    #[test]
    fn marta_setpoint_and_co2_from_its_status() {
        let t0 = Instant::now();
        let mut p = Plant::new("dcs", "julabo", Duration::from_secs(30));
        // Not followed unless configured.
        assert!(!p.ingest("MARTA/status", br#"{"co2_on":true}"#, t0));
        let mut p = p.with_marta(Some("MARTA"));
        assert!(p.filters().contains(&"MARTA/status".to_string()));
        assert!(p.is_reply("MARTA/reply"));
        assert_eq!(p.marta_co2_on(t0), Known::Unknown);
        p.ingest(
            "MARTA/status",
            br#"{"temperature_setpoint":-30.0,"co2_on":true}"#,
            t0,
        );
        assert_eq!(p.marta_setpoint(t0), Some(-30.0));
        assert_eq!(p.marta_co2_on(t0), Known::Yes);
        assert_eq!(p.marta_co2_on(t0 + Duration::from_secs(31)), Known::Unknown);
        // A plant that does not answer publishes nulls: unknown, not stopped.
        p.ingest(
            "MARTA/status",
            br#"{"temperature_setpoint":null,"co2_on":null}"#,
            t0,
        );
        assert_eq!(p.marta_co2_on(t0), Known::Unknown);
        assert_eq!(p.marta_setpoint(t0), None);
        p.ingest(
            "MARTA/status",
            br#"{"temperature_setpoint":20.0,"co2_on":false}"#,
            t0,
        );
        assert_eq!(p.marta_co2_on(t0), Known::No);
        p.ingest("MARTA/online", b"false", t0);
        assert_eq!(p.marta_co2_on(t0), Known::Unknown);
    }

    #[test]
    fn chiller_setpoint_in_use() {
        let t0 = Instant::now();
        let mut p = Plant::new("dcs", "julabo", Duration::from_secs(30));
        p.ingest(
            "julabo/status",
            br#"{"setpoint_1":-20.0,"setpoint_2":15.0,"setpoint_3":null,"used_setpoint":2}"#,
            t0,
        );
        assert_eq!(p.chiller_setpoint(t0), Some((2, 15.0)));
        assert_eq!(p.chiller_setpoint(t0 + Duration::from_secs(31)), None);
        p.ingest("julabo/status", b"garbage", t0);
        assert_eq!(p.chiller_setpoint(t0), None);
    }
}
