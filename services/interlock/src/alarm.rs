//! One rule's alarm: debounced condition (hold time), latching until acknowledged,
//! and the published states `active`, `acknowledged`, `cleared` (ISA-18.2 style:
//! an alarm whose condition went away stays `active` until someone acknowledges it).
//! No I/O.

use std::time::{Duration, Instant};

use dcs_shared::UtcNanos;
use serde_json::{json, Map, Value as Json};

use crate::config::Severity;
use crate::rules::{Condition, Evaluation};

/// What an observation changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The condition became unsafe (after the hold time): start the actions.
    pub raised: bool,
    /// The condition became normal: stop the actions.
    pub ended: bool,
    /// Something published changed.
    pub changed: bool,
}

/// An operator's shelve (ISA-18.2): the alarm's notifications are held until `until`.
/// It changes nothing of what the interlock does.
#[derive(Debug, Clone, PartialEq)]
pub struct Shelve {
    /// Who shelved it.
    pub by: String,
    /// Why.
    pub reason: String,
    /// When.
    pub at: UtcNanos,
    /// When it ends by itself.
    pub until: UtcNanos,
}

/// How the last shelve ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Unshelved {
    /// Who unshelved it (`None`: it expired).
    pub by: Option<String>,
    /// When.
    pub at: UtcNanos,
}

/// A rule's alarm.
#[derive(Debug, Clone)]
pub struct Alarm {
    /// The rule's name.
    pub rule: String,
    /// Severity from the rule.
    pub severity: Severity,
    hold: Duration,
    /// Unsafe past the hold time, and not yet back to safe.
    breached: bool,
    /// Unsafe seen, hold time not yet over.
    pending_since: Option<Instant>,
    /// The condition is known (inputs have arrived).
    known: bool,
    /// An alarm exists (raised and not yet cleared).
    latched: bool,
    acknowledged: Option<(String, UtcNanos)>,
    first_seen: Option<UtcNanos>,
    last_seen: Option<UtcNanos>,
    message: String,
    values: Map<String, Json>,
    shelved: Option<Shelve>,
    unshelved: Option<Unshelved>,
}

impl Alarm {
    /// A cleared alarm for `rule`.
    pub fn new(rule: &str, severity: Severity, hold: Duration) -> Self {
        Alarm {
            rule: rule.to_string(),
            severity,
            hold,
            breached: false,
            pending_since: None,
            known: false,
            latched: false,
            acknowledged: None,
            first_seen: None,
            last_seen: None,
            message: String::new(),
            values: Map::new(),
            shelved: None,
            unshelved: None,
        }
    }

    /// Takes the rule's evaluation.
    pub fn observe(&mut self, eval: &Evaluation, now: Instant, wall: UtcNanos) -> Observed {
        let mut out = Observed::default();
        let was_known = self.known;
        self.known = eval.condition != Condition::Waiting;
        out.changed |= was_known != self.known;
        match &eval.condition {
            Condition::Unsafe(message) => {
                if *message != self.message {
                    self.message = message.clone();
                    out.changed |= self.breached;
                }
                self.values = eval.values.clone();
                if self.breached {
                    self.last_seen = Some(wall);
                } else {
                    let since = *self.pending_since.get_or_insert(now);
                    if now.saturating_duration_since(since) >= self.hold {
                        self.pending_since = None;
                        self.breached = true;
                        self.last_seen = Some(wall);
                        if !self.latched {
                            self.latched = true;
                            self.acknowledged = None;
                            self.first_seen = Some(wall);
                        }
                        out.raised = true;
                        out.changed = true;
                    }
                }
            }
            Condition::Safe => {
                self.pending_since = None;
                if self.breached {
                    self.breached = false;
                    self.values = eval.values.clone();
                    out.ended = true;
                    out.changed = true;
                }
                if self.latched && self.acknowledged.is_some() {
                    self.latched = false;
                    out.changed = true;
                }
            }
            Condition::Band => {
                // Not yet past the threshold for long enough: the hold starts over.
                if !self.breached {
                    self.pending_since = None;
                }
            }
            Condition::Waiting => {}
        }
        out
    }

    /// Acknowledges the alarm; an alarm whose condition is already normal clears.
    pub fn acknowledge(&mut self, operator: &str, wall: UtcNanos) -> Result<(), String> {
        if !self.latched {
            return Err(format!(
                "alarm `{}` is cleared: nothing to acknowledge",
                self.rule
            ));
        }
        if self.acknowledged.is_none() {
            self.acknowledged = Some((operator.to_string(), wall));
        }
        if !self.breached {
            self.latched = false;
        }
        Ok(())
    }

    /// Shelves the alarm's notifications until `until` (again: the new shelve replaces
    /// the old). Any state: a cleared alarm that chatters may be shelved too.
    pub fn shelve(&mut self, by: &str, reason: &str, until: UtcNanos, wall: UtcNanos) {
        self.shelved = Some(Shelve {
            by: by.to_string(),
            reason: reason.to_string(),
            at: wall,
            until,
        });
    }

    /// Ends a shelve before its time.
    pub fn unshelve(&mut self, by: &str, wall: UtcNanos) -> Result<(), String> {
        if self.shelved.take().is_none() {
            return Err(format!("alarm `{}` is not shelved", self.rule));
        }
        self.unshelved = Some(Unshelved {
            by: Some(by.to_string()),
            at: wall,
        });
        Ok(())
    }

    /// Ends a shelve whose time is over; returns whether it did.
    pub fn expire(&mut self, wall: UtcNanos) -> bool {
        if self.shelved.as_ref().is_some_and(|s| wall >= s.until) {
            self.shelved = None;
            self.unshelved = Some(Unshelved { by: None, at: wall });
            return true;
        }
        false
    }

    /// The shelve in force, if any.
    pub fn shelved(&self) -> Option<&Shelve> {
        self.shelved.as_ref()
    }

    /// `active`, `acknowledged` or `cleared`.
    pub fn state(&self) -> &'static str {
        match (self.latched, &self.acknowledged) {
            (false, _) => "cleared",
            (true, Some(_)) => "acknowledged",
            (true, None) => "active",
        }
    }

    /// Unsafe now (past the hold time).
    pub fn breached(&self) -> bool {
        self.breached
    }

    /// Known, safe, and not on its way to unsafe: LV on may be allowed.
    pub fn known_safe(&self) -> bool {
        self.known && !self.breached && self.pending_since.is_none()
    }

    /// The last reason the condition was unsafe.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The condition as published: `unsafe`, `normal`, or `unknown` before the first
    /// values.
    pub fn condition(&self) -> &'static str {
        if self.breached {
            "unsafe"
        } else if self.known {
            "normal"
        } else {
            "unknown"
        }
    }

    /// The retained `alarms/<rule>` payload (without the actions, added by the caller).
    pub fn to_json(&self, wall: UtcNanos) -> Json {
        let ts = |t: Option<UtcNanos>| t.map(|t| t.to_string());
        json!({
            "rule": self.rule,
            "severity": self.severity.as_str(),
            "state": self.state(),
            "condition": self.condition(),
            "message": self.message,
            "first_seen": ts(self.first_seen),
            "last_seen": ts(self.last_seen),
            "first_seen_ns": self.first_seen.map(UtcNanos::as_nanos),
            "acknowledged_by": self.acknowledged.as_ref().map(|a| a.0.clone()),
            "acknowledged_at": ts(self.acknowledged.as_ref().map(|a| a.1)),
            "values": self.values,
            "shelved": self.shelved.as_ref().map(|s| json!({
                "by": s.by,
                "reason": s.reason,
                "at": s.at.to_string(),
                "at_ns": s.at.as_nanos(),
                "until": s.until.to_string(),
                "until_ns": s.until.as_nanos(),
            })),
            "unshelved": self.unshelved.as_ref().map(|u| json!({
                "by": u.by,
                "expired": u.by.is_none(),
                "at": u.at.to_string(),
                "at_ns": u.at.as_nanos(),
            })),
            "time": wall.as_nanos(),
        })
    }

    /// Takes back a shelve from the retained copy after a restart (a restart must not
    /// end a shelve early, nor make one last longer, nor beyond `max` from now: the
    /// retained copy is only as trustworthy as whoever may publish it). Returns whether
    /// it did.
    pub fn restore_shelve(&mut self, retained: &Json, wall: UtcNanos, max: Duration) -> bool {
        let Some(s) = retained.get("shelved").filter(|s| s.is_object()) else {
            return false;
        };
        let text = |k: &str| {
            s.get(k)
                .and_then(Json::as_str)
                .unwrap_or("unknown")
                .to_string()
        };
        let Some(until) = s.get("until_ns").and_then(Json::as_i64) else {
            return false;
        };
        let latest = wall
            .as_nanos()
            .saturating_add(i64::try_from(max.as_nanos()).unwrap_or(i64::MAX));
        if self.shelved.is_some() || until <= wall.as_nanos() {
            return false;
        }
        self.shelved = Some(Shelve {
            by: text("by"),
            reason: text("reason"),
            at: s.get("at_ns").and_then(Json::as_i64).map_or(wall, UtcNanos),
            until: UtcNanos(until.min(latest)),
        });
        true
    }

    /// Takes back a latched alarm from its retained copy after a restart, so that a
    /// restart never clears an alarm nobody acknowledged. Returns whether it did.
    pub fn restore(&mut self, retained: &Json) -> bool {
        if self.latched {
            return false;
        }
        let state = retained.get("state").and_then(Json::as_str);
        if !matches!(state, Some("active" | "acknowledged")) {
            return false;
        }
        self.latched = true;
        self.first_seen = retained
            .get("first_seen_ns")
            .and_then(Json::as_i64)
            .map(UtcNanos);
        self.message = retained
            .get("message")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string();
        if state == Some("acknowledged") {
            let by = retained
                .get("acknowledged_by")
                .and_then(Json::as_str)
                .unwrap_or("unknown");
            self.acknowledged = Some((by.to_string(), UtcNanos::now()));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(c: Condition) -> Evaluation {
        Evaluation {
            condition: c,
            values: Map::new(),
            cooling_present: None,
        }
    }
    fn unsafe_() -> Evaluation {
        ev(Condition::Unsafe("too wet".into()))
    }

    #[test]
    fn hold_time_then_latched_until_acknowledged() {
        let t0 = Instant::now();
        let w = UtcNanos(1);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut a = Alarm::new("dew_point", Severity::Critical, Duration::from_secs(5));
        assert_eq!(a.condition(), "unknown");
        assert!(!a.known_safe());
        a.observe(&ev(Condition::Safe), at(0), w);
        assert!(a.known_safe());
        // Unsafe for less than the hold: nothing, but LV on is no longer permitted.
        assert_eq!(a.observe(&unsafe_(), at(1), w), Observed::default());
        assert!(!a.known_safe());
        a.observe(&ev(Condition::Band), at(2), w);
        a.observe(&unsafe_(), at(3), w);
        assert!(
            !a.observe(&unsafe_(), at(7), w).raised,
            "hold restarted at 3 s"
        );
        let o = a.observe(&unsafe_(), at(8), w);
        assert!(o.raised && o.changed);
        assert_eq!(a.state(), "active");
        // In the band the alarm stays.
        assert_eq!(
            a.observe(&ev(Condition::Band), at(9), w),
            Observed::default()
        );
        assert!(a.breached());
        let o = a.observe(&ev(Condition::Safe), at(10), w);
        assert!(o.ended);
        assert_eq!((a.state(), a.condition()), ("active", "normal"), "latched");
        a.acknowledge("op", w).unwrap();
        assert_eq!(a.state(), "cleared");
        assert!(a
            .acknowledge("op", w)
            .unwrap_err()
            .contains("nothing to acknowledge"));
    }

    #[test]
    fn acknowledged_while_unsafe_clears_when_normal() {
        let t0 = Instant::now();
        let w = UtcNanos(1);
        let mut a = Alarm::new("hot", Severity::Warning, Duration::ZERO);
        assert!(a.observe(&unsafe_(), t0, w).raised);
        a.acknowledge("op", w).unwrap();
        assert_eq!(a.state(), "acknowledged");
        let j = a.to_json(w);
        assert_eq!(j["acknowledged_by"], "op");
        a.observe(&ev(Condition::Safe), t0, w);
        assert_eq!(a.state(), "cleared");
    }

    #[test]
    fn restart_restores_a_latched_alarm() {
        let t0 = Instant::now();
        let mut a = Alarm::new("hot", Severity::Warning, Duration::ZERO);
        a.observe(&unsafe_(), t0, UtcNanos(42));
        let retained = a.to_json(UtcNanos(43));
        let mut b = Alarm::new("hot", Severity::Warning, Duration::ZERO);
        assert!(b.restore(&retained));
        assert_eq!(b.state(), "active");
        b.observe(&ev(Condition::Safe), t0, UtcNanos(44));
        assert_eq!(b.state(), "active", "still needs an acknowledgement");
        assert_eq!(b.to_json(UtcNanos(45))["first_seen_ns"], 42);
    }

    #[test]
    fn shelve_expires_or_is_ended_and_survives_a_restart() {
        let t0 = Instant::now();
        let mut a = Alarm::new("hot", Severity::Warning, Duration::ZERO);
        a.observe(&unsafe_(), t0, UtcNanos(1));
        a.shelve("ana", "sensor swap", UtcNanos(100), UtcNanos(10));
        let j = a.to_json(UtcNanos(11));
        assert_eq!(j["shelved"]["by"], "ana");
        assert_eq!(j["shelved"]["until_ns"], 100);
        assert_eq!(j["state"], "active", "shelving changes no state");
        let mut b = Alarm::new("hot", Severity::Warning, Duration::ZERO);
        let day = Duration::from_secs(86_400);
        assert!(b.restore_shelve(&j, UtcNanos(50), day));
        assert_eq!(
            b.to_json(UtcNanos(51))["shelved"]["at_ns"],
            10,
            "its own instant"
        );
        assert!(!b.expire(UtcNanos(99)));
        assert!(b.expire(UtcNanos(100)));
        assert_eq!(b.to_json(UtcNanos(101))["unshelved"]["expired"], true);
        assert!(b
            .unshelve("bo", UtcNanos(102))
            .unwrap_err()
            .contains("not shelved"));
        let mut c = Alarm::new("hot", Severity::Warning, Duration::ZERO);
        assert!(
            !c.restore_shelve(&j, UtcNanos(100), day),
            "over during the restart"
        );
        // A retained copy that says "forever" is cut at the bound.
        let mut forever = j.clone();
        forever["shelved"]["until_ns"] = json!(i64::MAX);
        assert!(c.restore_shelve(&forever, UtcNanos(100), Duration::from_nanos(1000)));
        assert_eq!(c.to_json(UtcNanos(101))["shelved"]["until_ns"], 1100);
        a.unshelve("bo", UtcNanos(20)).unwrap();
        let j = a.to_json(UtcNanos(21));
        assert!(j["shelved"].is_null());
        assert_eq!(j["unshelved"]["by"], "bo");
    }
}
