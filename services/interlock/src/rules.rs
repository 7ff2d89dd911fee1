//! Rule conditions: from the inputs and the plant, whether a rule is unsafe, safe, or
//! in its hysteresis band, with the values that decided it. Pure functions.

use std::time::Instant;

use serde_json::{json, Map, Value as Json};

use crate::config::{RuleConfig, RuleKind};
use crate::inputs::{Inputs, Reading, Untrusted};
use crate::plant::{Known, Plant};

/// A rule's condition now.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Past the threshold, or its inputs cannot be trusted.
    Unsafe(String),
    /// Back past the threshold by at least the hysteresis.
    Safe,
    /// Between the threshold and threshold + hysteresis: the previous condition holds.
    Band,
    /// Waiting for first values after start.
    Waiting,
}

/// A condition, the values it was decided on, and whether LV on may be allowed.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The condition.
    pub condition: Condition,
    /// What the rule looked at (for the alarm payload).
    pub values: Map<String, Json>,
    /// For `cooling_required`, whether cooling is known to be present (the permit for
    /// LV on); `None` for the other kinds, whose permit follows their condition.
    pub cooling_present: Option<bool>,
}

fn read_all(inputs: &Inputs, names: &[String], now: Instant) -> Reading {
    let mut all = Reading::default();
    for n in names {
        let Some(i) = inputs.index(n) else { continue };
        let r = inputs.read(i, now);
        all.fresh.extend(r.fresh);
        all.untrusted.extend(r.untrusted);
        all.waiting |= r.waiting;
    }
    all
}

fn untrusted_message(u: &[Untrusted]) -> String {
    let mut parts: Vec<String> = u
        .iter()
        .take(3)
        .map(|u| format!("{}: {}", u.what, u.why))
        .collect();
    if u.len() > 3 {
        parts.push(format!("and {} more", u.len() - 3));
    }
    format!("unsafe, data cannot be trusted: {}", parts.join("; "))
}

/// The extreme of the fresh values, with the topic it came from.
fn extreme(r: &Reading, highest: bool) -> Option<(&str, f64)> {
    r.fresh
        .iter()
        .map(|(t, v)| (t.as_str(), v.number()))
        .reduce(|a, b| if (b.1 > a.1) == highest { b } else { a })
}

/// Evaluates one rule.
pub fn evaluate(rule: &RuleConfig, inputs: &Inputs, plant: &Plant, now: Instant) -> Evaluation {
    let mut values = Map::new();
    let mut cooling_present = None;
    let condition = match rule.kind {
        RuleKind::DewPoint => {
            let cold = read_all(inputs, &rule.cold, now);
            let dew = read_all(inputs, &rule.dew, now);
            let coldest = extreme(&cold, false);
            let wettest = extreme(&dew, true);
            if let Some((t, v)) = coldest {
                values.insert("coldest".into(), json!(v));
                values.insert("coldest_topic".into(), json!(t));
            }
            if let Some((t, v)) = wettest {
                values.insert("dew_point".into(), json!(v));
                values.insert("dew_point_topic".into(), json!(t));
            }
            let margin = rule.margin.unwrap_or(0.0);
            let untrusted: Vec<Untrusted> = cold
                .untrusted
                .iter()
                .chain(&dew.untrusted)
                .cloned()
                .collect();
            match (coldest, wettest) {
                _ if !untrusted.is_empty() => Condition::Unsafe(untrusted_message(&untrusted)),
                (Some((ct, c)), Some((dt, d))) => {
                    let gap = c - d;
                    values.insert("gap".into(), json!(gap));
                    if gap < margin {
                        Condition::Unsafe(format!(
                            "coldest {c:.2} degC ({ct}) is {gap:.2} above the dew point {d:.2} degC ({dt}), less than the margin {margin}"
                        ))
                    } else if gap >= margin + rule.hysteresis {
                        Condition::Safe
                    } else {
                        Condition::Band
                    }
                }
                _ => Condition::Waiting,
            }
        }
        RuleKind::OverTemperature => {
            let r = read_all(inputs, &rule.inputs, now);
            let hottest = extreme(&r, true);
            if let Some((t, v)) = hottest {
                values.insert("hottest".into(), json!(v));
                values.insert("hottest_topic".into(), json!(t));
            }
            let limit = rule.limit.unwrap_or(0.0);
            match hottest {
                _ if !r.untrusted.is_empty() => Condition::Unsafe(untrusted_message(&r.untrusted)),
                Some((t, v)) if v > limit => {
                    Condition::Unsafe(format!("{v:.2} ({t}) is above the limit {limit}"))
                }
                Some((_, v)) if v <= limit - rule.hysteresis => Condition::Safe,
                Some(_) => Condition::Band,
                None => Condition::Waiting,
            }
        }
        RuleKind::CoolingRequired => {
            let r = read_all(inputs, rule.running.as_slice(), now);
            let running = if !r.untrusted.is_empty() {
                Err(untrusted_message(&r.untrusted))
            } else if r.fresh.is_empty() {
                Ok(None)
            } else {
                Ok(Some(r.fresh.iter().all(|(_, v)| v.truthy())))
            };
            if let Some((_, v)) = r.fresh.first() {
                values.insert("running".into(), v.to_json());
            }
            let lv = plant.any_lv_on(now);
            values.insert(
                "lv_on".into(),
                match lv {
                    Known::Yes => json!(true),
                    Known::No => json!(false),
                    Known::Unknown => Json::Null,
                },
            );
            cooling_present = Some(matches!(running, Ok(Some(true))));
            match (running, lv) {
                (Ok(Some(true)), _) => Condition::Safe,
                (Ok(None), _) => Condition::Waiting,
                // No cooling, and LV is off: nothing to protect yet (the permit
                // refuses LV on).
                (_, Known::No) => Condition::Safe,
                (Ok(Some(false)), Known::Yes) => {
                    Condition::Unsafe("LV is on while the chiller is not running".into())
                }
                (Ok(Some(false)), Known::Unknown) => Condition::Unsafe(
                    "the chiller is not running and the CAEN channel states are unknown (stale or offline)".into(),
                ),
                (Err(why), _) => Condition::Unsafe(format!(
                    "cooling cannot be confirmed while LV may be on: {why}"
                )),
            }
        }
    };
    Evaluation {
        condition,
        values,
        cooling_present,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InterlockConfig;
    use std::path::Path;
    use std::time::Duration;

    fn setup() -> (InterlockConfig, Inputs, Plant, Instant) {
        let cfg: InterlockConfig = dcs_shared::config::from_str(
            r#"
inputs:
  bath: {topic: julabo/status, field: internal_temp, max_age_secs: 30}
  running: {topic: julabo/status, field: running, max_age_secs: 30}
  dew: {topic: "+/sensors/BME/dew", max_age_secs: 60}
  temp: {topic: "+/sensors/BME/temp", max_age_secs: 60}
rules:
  dew_point: {kind: dew_point, cold: [bath], dew: [dew], margin: 3, hysteresis: 1}
  hot: {kind: over_temperature, inputs: [temp], limit: 40, hysteresis: 2}
  cooling: {kind: cooling_required, running: running, mode: refuse}
"#,
            Path::new("t.yaml"),
        )
        .unwrap();
        let t0 = Instant::now();
        let inputs = Inputs::new(&cfg.inputs, t0);
        let plant = Plant::new("dcs", "julabo", Duration::from_secs(30));
        (cfg, inputs, plant, t0)
    }

    #[test]
    fn dew_point_margin_with_hysteresis() {
        let (cfg, mut inputs, plant, t0) = setup();
        let rule = &cfg.rules["dew_point"];
        let eval = |i: &Inputs| evaluate(rule, i, &plant, t0).condition;
        assert_eq!(eval(&inputs), Condition::Waiting);
        inputs.ingest("julabo/status", br#"{"internal_temp": 10.0}"#, t0);
        inputs.ingest("ESP01/sensors/BME/dew", b"5.0", t0);
        inputs.ingest("ESP02/sensors/BME/dew", b"6.0", t0);
        assert_eq!(eval(&inputs), Condition::Safe); // gap 4 = margin + hysteresis
        inputs.ingest("ESP02/sensors/BME/dew", b"6.5", t0);
        assert_eq!(eval(&inputs), Condition::Band); // 3.5
        inputs.ingest("ESP02/sensors/BME/dew", b"7.5", t0);
        let Condition::Unsafe(m) = eval(&inputs) else {
            panic!()
        };
        assert!(
            m.contains("ESP02/sensors/BME/dew") && m.contains("2.50 above"),
            "{m}"
        );
    }

    #[test]
    fn stale_or_missing_is_unsafe() {
        let (cfg, mut inputs, plant, t0) = setup();
        let rule = &cfg.rules["dew_point"];
        inputs.ingest("julabo/status", br#"{"internal_temp": 10.0}"#, t0);
        inputs.ingest("ESP01/sensors/BME/dew", b"5.0", t0);
        let later = t0 + Duration::from_secs(45);
        inputs.ingest("ESP01/sensors/BME/dew", b"5.0", later);
        let Condition::Unsafe(m) = evaluate(rule, &inputs, &plant, later).condition else {
            panic!()
        };
        assert!(m.contains("bath (julabo/status): stale"), "{m}");
    }

    #[test]
    fn over_temperature_limit() {
        let (cfg, mut inputs, plant, t0) = setup();
        let rule = &cfg.rules["hot"];
        inputs.ingest("ESP01/sensors/BME/temp", b"40.5", t0);
        assert!(matches!(
            evaluate(rule, &inputs, &plant, t0).condition,
            Condition::Unsafe(_)
        ));
        inputs.ingest("ESP01/sensors/BME/temp", b"39", t0);
        assert_eq!(
            evaluate(rule, &inputs, &plant, t0).condition,
            Condition::Band
        );
        inputs.ingest("ESP01/sensors/BME/temp", b"38", t0);
        assert_eq!(
            evaluate(rule, &inputs, &plant, t0).condition,
            Condition::Safe
        );
    }

    #[test]
    fn cooling_required_only_matters_with_lv_on() {
        let (cfg, mut inputs, mut plant, t0) = setup();
        let rule = &cfg.rules["cooling"];
        let eval = |i: &Inputs, p: &Plant| evaluate(rule, i, p, t0);
        inputs.ingest("julabo/status", br#"{"running": false}"#, t0);
        // LV state unknown: cannot tell it is safe.
        assert!(matches!(
            eval(&inputs, &plant).condition,
            Condition::Unsafe(_)
        ));
        plant.ingest(
            "dcs/channels/0",
            br#"{"module":"m","lv_status":0,"hv_status":0}"#,
            t0,
        );
        let e = eval(&inputs, &plant);
        assert_eq!(
            (e.condition, e.cooling_present),
            (Condition::Safe, Some(false))
        );
        plant.ingest(
            "dcs/channels/0",
            br#"{"module":"m","lv_status":1,"hv_status":0}"#,
            t0,
        );
        assert!(matches!(
            eval(&inputs, &plant).condition,
            Condition::Unsafe(_)
        ));
        inputs.ingest("julabo/status", br#"{"running": true}"#, t0);
        let e = eval(&inputs, &plant);
        assert_eq!(
            (e.condition, e.cooling_present),
            (Condition::Safe, Some(true))
        );
    }
}
