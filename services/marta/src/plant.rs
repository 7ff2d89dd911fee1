//! What the driver knows of the plant from its latest poll, and what it publishes:
//! `MARTA/status` (every reading, the state, the words) and `MARTA/alarms`, with the
//! deadband rule that decides when the status goes out again. No I/O.

use std::time::{Duration, Instant};

use dcs_shared::UtcNanos;
use serde_json::{json, Map, Value as Json};

use crate::commands::Snapshot;
use crate::fsm::{self, State};
use crate::registers::{Image, RegisterMap};

/// What was published last, to compare the next poll with.
#[derive(Debug, Clone, PartialEq)]
struct Published {
    values: Vec<Option<f64>>,
    state: State,
    words: Option<(u16, u16)>,
    alarms: Vec<usize>,
    error: Option<String>,
    at: Instant,
}

/// The plant as the latest poll saw it.
#[derive(Debug)]
pub struct Plant {
    map: RegisterMap,
    coldest_of: Vec<usize>,
    /// The reading `temperature_setpoint` (where the CO2 loop is heading).
    setpoint: usize,
    image: Option<Image>,
    measured_at: Option<UtcNanos>,
    state: State,
    /// Why the plant is DISCONNECTED, or what contradicts in its words.
    error: Option<String>,
    published: Option<Published>,
}

impl Plant {
    /// A plant read with `map`; `coldest_of` are reading names (checked: unknown names
    /// are an error naming them).
    pub fn new(map: RegisterMap, coldest_of: &[String]) -> Result<Self, String> {
        let coldest_of = coldest_of
            .iter()
            .map(|n| {
                map.readings
                    .iter()
                    .position(|r| &r.name == n)
                    .ok_or_else(|| {
                        format!("coldest_of: `{n}` is not a reading of the register map")
                    })
            })
            .collect::<Result<_, _>>()?;
        let setpoint = map
            .readings
            .iter()
            .position(|r| r.name == "temperature_setpoint")
            .ok_or("the register map has no reading `temperature_setpoint` (co2_coldest_temp needs it)")?;
        Ok(Plant {
            map,
            coldest_of,
            setpoint,
            image: None,
            measured_at: None,
            state: State::Init,
            error: None,
            published: None,
        })
    }

    /// The register map.
    pub fn map(&self) -> &RegisterMap {
        &self.map
    }

    /// The state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Why the plant is DISCONNECTED or in a contradictory state.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// A complete poll, started at `at`.
    pub fn polled(&mut self, image: Image, at: UtcNanos) {
        let c = &self.map.controls;
        let status = image.word(self.map.status).unwrap_or(0);
        let bit =
            |b: crate::registers::Bit| image.word(b.register).is_some_and(|w| w & b.mask() != 0);
        let (state, fault) = fsm::state(status, bit(c.start_chiller), bit(c.start_co2));
        self.state = state;
        self.error = fault;
        self.image = Some(image);
        self.measured_at = Some(at);
    }

    /// The PLC did not answer: every reading is unknown until the next poll.
    pub fn failed(&mut self, why: String) {
        self.state = State::Disconnected;
        self.error = Some(why);
        self.image = None;
        self.measured_at = None;
    }

    /// What commands are checked against.
    pub fn snapshot(&self) -> Snapshot {
        let c = &self.map.controls;
        let bit = |b: crate::registers::Bit| {
            self.image
                .as_ref()
                .and_then(|i| i.word(b.register))
                .is_some_and(|w| w & b.mask() != 0)
        };
        Snapshot {
            state: self.state,
            chiller_bit: bit(c.start_chiller),
            co2_bit: bit(c.start_co2),
            status_word: self.word(self.map.status),
        }
    }

    /// A register from the latest poll.
    pub fn word(&self, register: u16) -> Option<u16> {
        self.image.as_ref()?.word(register)
    }

    fn values(&self) -> Vec<Option<f64>> {
        self.map
            .readings
            .iter()
            .map(|r| {
                let img = self.image.as_ref()?;
                // The shortest decimal of the float32 (-30.1, not -30.100000381...).
                let v = self.map.value(r, img)?;
                format!("{}", v as f32).parse::<f64>().ok()
            })
            .collect()
    }

    fn words(&self) -> Option<(u16, u16)> {
        let c = self.map.controls.start_chiller.register;
        Some((self.word(self.map.status)?, self.word(c)?))
    }

    fn alarm_indexes(&self) -> Vec<usize> {
        let Some(img) = &self.image else {
            return Vec::new();
        };
        self.map
            .alarms
            .iter()
            .enumerate()
            .filter(|(_, a)| img.word(a.register).is_some_and(|w| w & (1 << a.bit) != 0))
            .map(|(i, _)| i)
            .collect()
    }

    /// Whether the status should go out now: first time, a change of state, words,
    /// alarms or error, a reading past its deadband (0: any change; appearing or
    /// vanishing counts), or `republish` since the last time.
    pub fn status_due(&self, now: Instant, republish: Duration) -> bool {
        let Some(p) = &self.published else {
            return true;
        };
        if p.state != self.state
            || p.words != self.words()
            || p.alarms != self.alarm_indexes()
            || p.error != self.error
            || now.saturating_duration_since(p.at) >= republish
        {
            return true;
        }
        self.values()
            .iter()
            .zip(&p.values)
            .zip(&self.map.readings)
            .any(|((new, old), r)| match (new, old) {
                (Some(a), Some(b)) => {
                    if r.deadband > 0.0 {
                        (a - b).abs() > r.deadband
                    } else {
                        a != b
                    }
                }
                (None, None) => false,
                _ => true,
            })
    }

    /// Whether `MARTA/alarms` changed since it was last published: the list, or the
    /// state and error it carries.
    pub fn alarms_changed(&self) -> bool {
        self.published.as_ref().is_none_or(|p| {
            p.alarms != self.alarm_indexes() || p.state != self.state || p.error != self.error
        })
    }

    /// Records that the status and alarms went out at `now`.
    pub fn mark_published(&mut self, now: Instant) {
        self.published = Some(Published {
            values: self.values(),
            state: self.state,
            words: self.words(),
            alarms: self.alarm_indexes(),
            error: self.error.clone(),
            at: now,
        });
    }

    /// `MARTA/status`: every reading by name (null when unknown), `fsm_state`, and for
    /// the interlock `co2_running` (the loop really runs: CO2_RUNNING with status word
    /// 2) and `co2_coldest_temp` (the coldest of `coldest_of`, or the set-point while
    /// the loop runs if that is colder: where the loop is heading).
    pub fn status_json(&self) -> Json {
        let values = self.values();
        let mut doc = Map::new();
        for (r, v) in self.map.readings.iter().zip(&values) {
            doc.insert(r.name.clone(), json!(v));
        }
        let words = self.words();
        let snap = self.snapshot();
        let co2_running = self.state == State::Co2Running
            && words.is_some_and(|(s, _)| s == fsm::status::CO2_RUNNING);
        let mut coldest = self
            .coldest_of
            .iter()
            .filter_map(|&i| values[i])
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
        if self.state == State::Co2Running {
            if let (Some(sp), Some(c)) = (values[self.setpoint], coldest) {
                coldest = Some(c.min(sp));
            }
        }
        let known = self.image.is_some();
        let flow_bit = self.map.controls.flow_active;
        doc.insert("fsm_state".into(), json!(self.state.as_str()));
        doc.insert("status_word".into(), json!(words.map(|w| w.0)));
        doc.insert("control_word".into(), json!(words.map(|w| w.1)));
        doc.insert(
            "chiller_on".into(),
            json!(known.then_some(snap.chiller_bit)),
        );
        doc.insert("co2_on".into(), json!(known.then_some(snap.co2_bit)));
        doc.insert(
            "flow_active".into(),
            json!(self
                .word(flow_bit.register)
                .map(|w| w & flow_bit.mask() != 0)),
        );
        doc.insert("co2_running".into(), json!(known.then_some(co2_running)));
        doc.insert("co2_coldest_temp".into(), json!(coldest));
        doc.insert(
            "alarm_count".into(),
            json!(known.then(|| self.alarm_indexes().len())),
        );
        doc.insert(
            "measured_at".into(),
            json!(self.measured_at.map(|t| t.as_nanos())),
        );
        doc.insert("error".into(), json!(self.error));
        Json::Object(doc)
    }

    /// `MARTA/alarms`: the active alarm bits with their meaning and severity (`null`
    /// when the plant does not answer: unknown, not none).
    pub fn alarms_json(&self) -> Json {
        let active = self.image.is_some().then(|| {
            self.alarm_indexes()
                .into_iter()
                .map(|i| {
                    let a = &self.map.alarms[i];
                    json!({
                        "name": a.name,
                        "severity": a.severity,
                        "meaning": a.meaning,
                        "register": a.register,
                        "bit": a.bit,
                    })
                })
                .collect::<Vec<_>>()
        });
        json!({
            "active": active,
            "fsm_state": self.state.as_str(),
            "measured_at": self.measured_at.map(|t| t.as_nanos()),
            "error": self.error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registers::{encode_f32, MapFile, Span, WordOrder};

    fn plant() -> Plant {
        let text = include_str!("../../../deploy/marta-registers.yaml");
        let map = serde_yaml::from_str::<MapFile>(text)
            .unwrap()
            .check()
            .unwrap();
        Plant::new(map, &["TT05_CO2".into(), "TT06_CO2".into()]).unwrap()
    }

    /// An image with every mapped register 0 and `f` applied.
    fn image(p: &Plant, f: impl FnOnce(&mut Image)) -> Image {
        let mut img = Image::default();
        for s in &p.map().spans {
            img.fill(*s, &vec![0; usize::from(s.count)]);
        }
        f(&mut img);
        img
    }

    fn set_f(img: &mut Image, p: &Plant, name: &str, v: f32) {
        let r = p.map().reading(name).unwrap().register;
        img.fill(
            Span { start: r, count: 2 },
            &encode_f32(v, WordOrder::LowFirst),
        );
    }

    #[test]
    fn status_carries_every_reading_and_the_interlock_fields() {
        let mut p = plant();
        assert!(Plant::new(p.map().clone(), &["TT99".into()])
            .unwrap_err()
            .contains("TT99"));
        let img = image(&p, |i| {
            i.fill(
                Span {
                    start: 305,
                    count: 1,
                },
                &[0b0111],
            );
            i.fill(
                Span {
                    start: 320,
                    count: 1,
                },
                &[2],
            );
            i.fill(
                Span {
                    start: 301,
                    count: 1,
                },
                &[1 << 5],
            );
        });
        let mut img = img;
        set_f(&mut img, &p, "TT05_CO2", -29.7);
        set_f(&mut img, &p, "TT06_CO2", -28.1);
        set_f(&mut img, &p, "temperature_setpoint", -30.0);
        p.polled(img, UtcNanos(42));
        let s = p.status_json();
        assert_eq!(s.as_object().unwrap().len(), 55 + 11);
        assert_eq!(s["TT05_CO2"], json!(-29.7));
        assert_eq!(s["PT01_R452A"], json!(0.0));
        assert_eq!(s["fsm_state"], "CO2_RUNNING");
        assert_eq!(s["co2_running"], true);
        assert_eq!(s["flow_active"], true);
        // Heading to -30: colder than any CO2 temperature measured.
        assert_eq!(s["co2_coldest_temp"], json!(-30.0));
        assert_eq!(s["measured_at"], 42);
        assert_eq!(s["alarm_count"], 1);
        let a = p.alarms_json();
        assert_eq!(a["active"][0]["name"], "V_CB_FS");
        assert_eq!(a["active"][0]["meaning"], "Fans circuit breaker");
        assert_eq!(a["active"][0]["severity"], "error");
        // Starting (status 1): CO2_RUNNING per SPEC 10, but not yet cooling.
        let img = image(&p, |i| {
            i.fill(
                Span {
                    start: 305,
                    count: 1,
                },
                &[0b011],
            );
            i.fill(
                Span {
                    start: 320,
                    count: 1,
                },
                &[1],
            );
        });
        p.polled(img, UtcNanos(43));
        assert_eq!(p.status_json()["fsm_state"], "CO2_RUNNING");
        assert_eq!(p.status_json()["co2_running"], false);
    }

    #[test]
    fn a_lost_plant_publishes_nothing_stale() {
        let mut p = plant();
        let img = image(&p, |i| {
            i.fill(
                Span {
                    start: 320,
                    count: 1,
                },
                &[1],
            )
        });
        p.polled(img, UtcNanos(1));
        p.failed("no answer within 1000 ms to reading registers 100..165".into());
        let s = p.status_json();
        assert_eq!(s["fsm_state"], "DISCONNECTED");
        assert!(
            s["TT05_CO2"].is_null() && s["co2_running"].is_null() && s["measured_at"].is_null()
        );
        assert!(s["error"].as_str().unwrap().contains("no answer"));
        assert!(p.alarms_json()["active"].is_null());
        assert_eq!(p.snapshot().state, State::Disconnected);
    }

    #[test]
    fn deadbands_decide_when_the_status_goes_out_again() {
        let mut p = plant();
        let t0 = Instant::now();
        let every = Duration::from_secs(10);
        let poll = |p: &mut Plant, tt05: f32, lp: f32| {
            let mut img = image(p, |i| {
                i.fill(
                    Span {
                        start: 320,
                        count: 1,
                    },
                    &[1],
                )
            });
            set_f(&mut img, p, "TT05_CO2", tt05);
            set_f(&mut img, p, "LP_speed", lp);
            p.polled(img, UtcNanos(1));
        };
        poll(&mut p, -20.0, 3000.0);
        assert!(p.status_due(t0, every));
        p.mark_published(t0);
        assert!(!p.status_due(t0, every));
        // TT05_CO2 has a 0.2 deadband.
        poll(&mut p, -20.15, 3000.0);
        assert!(!p.status_due(t0, every));
        poll(&mut p, -20.25, 3000.0);
        assert!(p.status_due(t0, every));
        // LP_speed has deadband 0: any change.
        poll(&mut p, -20.0, 3000.0);
        p.mark_published(t0);
        poll(&mut p, -20.0, 3000.5);
        assert!(p.status_due(t0, every));
        p.mark_published(t0);
        // Nothing changes: only the republish period.
        assert!(!p.status_due(t0 + Duration::from_secs(9), every));
        assert!(p.status_due(t0 + every, every));
        // A state change, an alarm bit.
        p.failed("gone".into());
        assert!(p.status_due(t0, every));
        assert!(p.alarms_changed());
        poll(&mut p, -20.0, 3000.5);
        p.mark_published(t0);
        assert!(!p.alarms_changed());
        let img = image(&p, |i| {
            i.fill(
                Span {
                    start: 320,
                    count: 1,
                },
                &[3],
            );
            i.fill(
                Span {
                    start: 301,
                    count: 1,
                },
                &[1 << 7],
            );
        });
        p.polled(img, UtcNanos(2));
        assert!(p.alarms_changed() && p.status_due(t0, every));
        assert_eq!(p.state(), State::Alarm);
    }
}
