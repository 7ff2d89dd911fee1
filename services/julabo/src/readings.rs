//! What the unit last said, field by field. No I/O here.
//!
//! Each of the nine queries behind `julabo/status` keeps its own outcome: the value
//! and the instant it was asked for, or why it could not be read. A query the unit
//! does not answer (lewis has no `IN_MODE_01`) leaves that field null with the reason;
//! the others keep their values and ages. The payload's `measured_at` is the oldest
//! instant among the values it carries, so an age counted from it is never too young.

use std::collections::HashMap;
use std::time::Duration;

use dcs_shared::UtcNanos;
use serde_json::json;

use crate::fsm::State;
use crate::protocol::{Query, Status, Value};

/// The queries of one poll cycle, in the order they are asked. STATUS first: it is
/// the one every unit answers, and the one that says whether the others can be trusted.
pub const CYCLE: [Query; 9] = [
    Query::Status,
    Query::BathTemp,
    Query::Pv1,
    Query::Pv2,
    Query::Setpoint(0),
    Query::Setpoint(1),
    Query::Setpoint(2),
    Query::ActiveSetpoint,
    Query::ExternalControl,
];

/// Why a query gave no value.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// For `error` in the status: names the query.
    pub reason: String,
    /// The unit answered something that is not a reply to this query (as opposed to
    /// not answering at all).
    pub garbled: bool,
}

/// The latest outcome of one query.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// The value, or why there is none.
    pub outcome: Result<Value, Failure>,
    /// When the query was about to be sent.
    pub at: UtcNanos,
}

/// Every field of the unit, as last read.
#[derive(Debug, Clone, Default)]
pub struct Readings {
    fields: HashMap<Query, Field>,
}

impl Readings {
    /// Records a value read at `at`. Returns the field it replaces.
    pub fn read(&mut self, q: Query, value: Value, at: UtcNanos) -> Option<Field> {
        self.fields.insert(
            q,
            Field {
                outcome: Ok(value),
                at,
            },
        )
    }

    /// Records that `q`, asked at `at`, gave no value. Returns the field it replaces.
    pub fn failed(&mut self, q: Query, failure: Failure, at: UtcNanos) -> Option<Field> {
        self.fields.insert(
            q,
            Field {
                outcome: Err(failure),
                at,
            },
        )
    }

    /// Forgets everything (the line was closed: nothing is known any more).
    pub fn clear(&mut self) {
        self.fields.clear();
    }

    /// The latest outcome of `q`.
    pub fn get(&self, q: Query) -> Option<&Field> {
        self.fields.get(&q)
    }

    /// The latest outcome of `q` if it was asked for no longer than `max_age` before
    /// `now`.
    pub fn recent(&self, q: Query, now: UtcNanos, max_age: Duration) -> Option<&Field> {
        let max = i64::try_from(max_age.as_nanos()).unwrap_or(i64::MAX);
        self.get(q)
            .filter(|f| now.as_nanos().saturating_sub(f.at.as_nanos()) <= max)
    }

    fn value(&self, q: Query) -> Option<&Value> {
        self.get(q).and_then(|f| f.outcome.as_ref().ok())
    }

    /// The number read for `q`.
    pub fn float(&self, q: Query) -> Option<f64> {
        match self.value(q) {
            Some(Value::Float(v)) => Some(*v),
            _ => None,
        }
    }

    /// The mode read for `q`.
    pub fn int(&self, q: Query) -> Option<i64> {
        match self.value(q) {
            Some(Value::Int(v)) => Some(*v),
            _ => None,
        }
    }

    /// The status read.
    pub fn status(&self) -> Option<&Status> {
        match self.value(Query::Status) {
            Some(Value::Status(s)) => Some(s),
            _ => None,
        }
    }

    /// The state these readings put the chiller in, with the line open or not.
    pub fn state(&self, line_open: bool) -> State {
        if !line_open {
            return State::Disconnected;
        }
        match self.get(Query::Status).map(|f| &f.outcome) {
            Some(Ok(Value::Status(s))) => State::from_status(s),
            // Replies that make no sense: something is wrong with the unit or the line.
            Some(Err(f)) if f.garbled => State::Error,
            // Not read yet, or no reply: neither ON nor OFF.
            _ => State::Connected,
        }
    }

    /// What is wrong, for `error`: the unit's own condition first, then each field
    /// that could not be read, in poll order. `None` when all is well.
    pub fn problems(&self) -> Option<String> {
        let mut out = Vec::new();
        if let Some(s) = self.status() {
            if s.is_manual() {
                out.push(format!(
                    "the chiller is under manual control ({s}): switch it to remote on its front panel"
                ));
            } else if s.is_error() {
                out.push(format!("chiller alarm {s}"));
            }
        }
        for q in CYCLE {
            if let Some(Field {
                outcome: Err(f), ..
            }) = self.get(q)
            {
                out.push(f.reason.clone());
            }
        }
        (!out.is_empty()).then(|| out.join("; "))
    }

    /// The oldest instant among the values read.
    pub fn oldest(&self) -> Option<UtcNanos> {
        CYCLE
            .iter()
            .filter_map(|q| self.get(*q))
            .filter(|f| f.outcome.is_ok())
            .map(|f| f.at)
            .min()
    }

    /// The `julabo/status` payload (the Python stack's fields, plus `status_text`,
    /// `running`, `error` and `measured_at`, nanoseconds since the Unix epoch, UTC).
    /// A field the unit did not give is null.
    pub fn to_json(&self, state: State, error: Option<&str>, power_pv: u8) -> serde_json::Value {
        let status = self.status();
        let (power, external) = if power_pv == 2 {
            (Query::Pv2, Query::Pv1)
        } else {
            (Query::Pv1, Query::Pv2)
        };
        json!({
            "status_code": status.map(|s| s.code),
            "status_text": status.map(|s| s.text.clone()),
            "internal_temp": self.float(Query::BathTemp),
            "external_temp": self.float(external),
            "setpoint_1": self.float(Query::Setpoint(0)),
            "setpoint_2": self.float(Query::Setpoint(1)),
            "setpoint_3": self.float(Query::Setpoint(2)),
            "used_setpoint": self.int(Query::ActiveSetpoint).map(|i| i + 1),
            "power": self.float(power),
            "ext_is_used": self.int(Query::ExternalControl).map(|i| i == 1),
            "running": status.map(|s| s.code == 3 || s.code == 1),
            "fsm_state": state.as_str(),
            "error": error,
            "measured_at": self.oldest().map(UtcNanos::as_nanos),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::parse_reply;

    fn all_read(r: &mut Readings, at: i64) {
        let replies = [
            "03 REMOTE START",
            "5.10",
            "-40.0",
            "6.20",
            "5.00",
            "10.00",
            "15.00",
            "0",
            "0",
        ];
        for (i, (q, reply)) in CYCLE.iter().zip(replies).enumerate() {
            r.read(*q, parse_reply(*q, reply).unwrap(), UtcNanos(at + i as i64));
        }
    }

    fn no_reply(q: Query) -> Failure {
        Failure {
            reason: format!("no reply to {} within 1s", q.text()),
            garbled: false,
        }
    }

    #[test]
    fn a_full_read_maps_to_the_python_fields() {
        let mut r = Readings::default();
        all_read(&mut r, 1000);
        let s = r.to_json(r.state(true), r.problems().as_deref(), 1);
        assert_eq!(
            s,
            json!({"status_code": 3, "status_text": "REMOTE START", "internal_temp": 5.1,
                   "external_temp": 6.2, "setpoint_1": 5.0, "setpoint_2": 10.0, "setpoint_3": 15.0,
                   "used_setpoint": 1, "power": -40.0, "ext_is_used": false, "running": true,
                   "fsm_state": "ON", "error": null, "measured_at": 1000})
        );
        let s = r.to_json(State::On, None, 2);
        assert_eq!(
            (&s["power"], &s["external_temp"]),
            (&json!(6.2), &json!(-40.0))
        );
    }

    #[test]
    fn one_unanswered_query_blanks_only_its_field() {
        let mut r = Readings::default();
        all_read(&mut r, 1000);
        r.failed(
            Query::ActiveSetpoint,
            no_reply(Query::ActiveSetpoint),
            UtcNanos(2000),
        );
        let s = r.to_json(r.state(true), r.problems().as_deref(), 1);
        assert_eq!(s["used_setpoint"], serde_json::Value::Null);
        assert_eq!(
            (&s["fsm_state"], &s["running"], &s["setpoint_1"]),
            (&json!("ON"), &json!(true), &json!(5.0))
        );
        assert_eq!(s["error"], "no reply to IN_MODE_01 within 1s");
        // The oldest value carried, not the failed query's time.
        assert_eq!(s["measured_at"], 1000);
    }

    #[test]
    fn status_decides_the_state() {
        let mut r = Readings::default();
        assert_eq!(r.state(true), State::Connected);
        assert_eq!(r.state(false), State::Disconnected);
        r.failed(Query::Status, no_reply(Query::Status), UtcNanos(1));
        assert_eq!(r.state(true), State::Connected);
        r.failed(
            Query::Status,
            Failure {
                reason: "unexpected reply".into(),
                garbled: true,
            },
            UtcNanos(2),
        );
        assert_eq!(r.state(true), State::Error);
        let st = |t: &str| parse_reply(Query::Status, t).unwrap();
        r.read(Query::Status, st("01 MANUAL START"), UtcNanos(3));
        assert_eq!(r.state(true), State::Error);
        assert!(r.problems().unwrap().contains("front panel"));
        r.read(Query::Status, st("-01 LOW LEVEL"), UtcNanos(4));
        assert_eq!(r.problems().unwrap(), "chiller alarm -01 LOW LEVEL");
        // An alarm is not a running chiller, for the interlock.
        assert_eq!(r.to_json(State::Error, None, 1)["running"], false);
        r.read(Query::Status, st("02 REMOTE STOP"), UtcNanos(5));
        assert_eq!((r.state(true), r.problems()), (State::Off, None));
    }

    #[test]
    fn recent_looks_at_the_age() {
        let mut r = Readings::default();
        all_read(&mut r, 0);
        let s = Duration::from_secs(1);
        assert!(r
            .recent(Query::Status, UtcNanos(1_000_000_000), s)
            .is_some());
        assert!(r
            .recent(Query::Status, UtcNanos(1_000_000_001), s)
            .is_none());
        r.clear();
        assert!(r.get(Query::Status).is_none());
        assert_eq!(r.oldest(), None);
    }
}
