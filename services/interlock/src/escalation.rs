//! A rule's actions while its alarm's condition persists: each is sent when due, then
//! confirmed from the target's next status; one that is refused or not confirmed
//! within the timeout makes the next one due at once. No I/O: commands are returned
//! for the service to publish.

use std::time::{Duration, Instant};

use dcs_shared::UtcNanos;
use serde_json::{json, Value as Json};

use crate::config::{ActionKind, ActionStep};
use crate::plant::{Known, Plant};

/// A command to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Command topic.
    pub topic: String,
    /// Payload.
    pub payload: String,
}

/// What became of one action, for the alarm payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// `hv_off`, `lv_off`, `chiller_setpoint`, `marta_setpoint`, `marta_stop_co2`.
    pub action: ActionKind,
    /// The command sent, if one was needed.
    pub command: Option<String>,
    /// When it was taken.
    pub at: UtcNanos,
    /// `pending`, `confirmed`, `already done`, `failed: ...`.
    pub result: String,
}

impl Record {
    /// As published.
    pub fn to_json(&self) -> Json {
        json!({
            "do": self.action.as_str(),
            "command": self.command,
            "at": self.at.to_string(),
            "result": self.result,
        })
    }
}

#[derive(Debug)]
struct Pending {
    command: Outgoing,
    sent: Instant,
}

/// The actions of one rule.
#[derive(Debug)]
pub struct Escalation {
    steps: Vec<ActionStep>,
    timeout: Duration,
    started: Option<Instant>,
    next: usize,
    pending: Option<Pending>,
    /// The last action failed: the next is due now.
    hurry: bool,
    /// Every action was taken and some failed: they are all tried again then, for as
    /// long as the condition lasts (a broker or a service may be back).
    retry_at: Option<Instant>,
    /// Where this round of actions starts in `log`.
    round_start: usize,
    /// What was done since the alarm was raised.
    pub log: Vec<Record>,
}

fn done(step: &ActionStep, plant: &Plant, now: Instant) -> bool {
    match step.action {
        ActionKind::HvOff => plant.any_hv_on(now) == Known::No,
        ActionKind::LvOff => plant.any_lv_on(now) == Known::No,
        ActionKind::ChillerSetpoint => {
            let want = step.temp.unwrap_or(f64::INFINITY);
            plant
                .chiller_setpoint(now)
                .is_some_and(|(_, t)| t >= want - 0.05)
        }
        ActionKind::MartaSetpoint => {
            let want = step.temp.unwrap_or(f64::INFINITY);
            plant.marta_setpoint(now).is_some_and(|t| t >= want - 0.05)
        }
        ActionKind::MartaStopCo2 => plant.marta_co2_on(now) == Known::No,
    }
}

fn command(step: &ActionStep, plant: &Plant, now: Instant) -> Outgoing {
    match step.action {
        ActionKind::HvOff => Outgoing {
            topic: format!("{}/cmd/switch/hv", plant.caen()),
            payload: "off".into(),
        },
        ActionKind::LvOff => Outgoing {
            topic: format!("{}/cmd/switch/lv", plant.caen()),
            payload: "off".into(),
        },
        ActionKind::ChillerSetpoint => {
            // The set-point in use; the first one if the chiller's status is unknown
            // (the command is then likely to fail, and the next action follows).
            let n = plant.chiller_setpoint(now).map_or(1, |(n, _)| n);
            Outgoing {
                topic: format!("{}/cmd/setWT", plant.chiller()),
                payload: json!({"setpoint": n, "temp": step.temp}).to_string(),
            }
        }
        ActionKind::MartaSetpoint => Outgoing {
            topic: format!("{}/cmd/set_temperature_setpoint", plant.marta()),
            payload: json!(step.temp).to_string(),
        },
        ActionKind::MartaStopCo2 => Outgoing {
            topic: format!("{}/cmd/stop_co2", plant.marta()),
            payload: String::new(),
        },
    }
}

impl Escalation {
    /// The actions `steps`, each confirmed within `timeout`.
    pub fn new(steps: Vec<ActionStep>, timeout: Duration) -> Self {
        Escalation {
            steps,
            timeout,
            started: None,
            next: 0,
            pending: None,
            hurry: false,
            retry_at: None,
            round_start: 0,
            log: Vec::new(),
        }
    }

    /// The alarm was raised: actions start from the first.
    pub fn start(&mut self, now: Instant) {
        self.started = Some(now);
        self.next = 0;
        self.pending = None;
        self.hurry = false;
        self.retry_at = None;
        self.round_start = 0;
        self.log.clear();
    }

    /// The condition is normal again: actions not yet taken are dropped (what was done
    /// is not undone; an operator restores power). An outstanding action that took
    /// effect (often the very reason the condition cleared) is recorded as confirmed.
    pub fn stop(&mut self, plant: &Plant, now: Instant) {
        if let Some(p) = self.pending.take() {
            let step = &self.steps[self.next];
            if let Some(r) = self.log.last_mut() {
                r.result = if done(step, plant, now) {
                    let waited = now.saturating_duration_since(p.sent);
                    format!("confirmed after {:.1} s", waited.as_secs_f64())
                } else {
                    "abandoned: the condition cleared".into()
                };
            }
        }
        self.started = None;
        self.retry_at = None;
    }

    /// Whether an action is outstanding, still due, or to be retried.
    pub fn running(&self) -> bool {
        self.started.is_some()
            && (self.pending.is_some() || self.next < self.steps.len() || self.retry_at.is_some())
    }

    /// A reply from a target: a refusal of the outstanding command fails it at once.
    /// Returns whether anything changed.
    pub fn reply(&mut self, command_topic: &str, ok: bool, error: Option<&str>) -> bool {
        let Some(p) = &self.pending else { return false };
        if ok || p.command.topic != command_topic {
            return false;
        }
        self.pending = None;
        self.hurry = true;
        self.next += 1;
        if let Some(r) = self.log.last_mut() {
            r.result = format!("failed: refused: {}", error.unwrap_or("no reason given"));
        }
        true
    }

    /// Moves on: confirms, times out, and returns what to send now. The `bool` says
    /// whether the log changed.
    pub fn step(&mut self, plant: &Plant, now: Instant, wall: UtcNanos) -> (Vec<Outgoing>, bool) {
        let Some(started) = self.started else {
            return (Vec::new(), false);
        };
        let mut out = Vec::new();
        let mut changed = false;
        loop {
            if let Some(p) = &self.pending {
                let step = &self.steps[self.next];
                let waited = now.saturating_duration_since(p.sent);
                if done(step, plant, now) {
                    if let Some(r) = self.log.last_mut() {
                        r.result = format!("confirmed after {:.1} s", waited.as_secs_f64());
                    }
                } else if waited >= self.timeout {
                    if let Some(r) = self.log.last_mut() {
                        r.result = format!(
                            "failed: not confirmed by {} within {:.0} s",
                            p.command.topic.split('/').next().unwrap_or(""),
                            self.timeout.as_secs_f64()
                        );
                    }
                    self.hurry = true;
                } else {
                    break;
                }
                tracing::info!(
                    action = step.action.as_str(),
                    result = self.log.last().map(|r| r.result.as_str()).unwrap_or(""),
                    "interlock action"
                );
                self.pending = None;
                self.next += 1;
                changed = true;
                continue;
            }
            let Some(step) = self.steps.get(self.next) else {
                break;
            };
            let due = started + Duration::from_secs_f64(step.after_secs);
            if !self.hurry && now < due {
                break;
            }
            self.hurry = false;
            changed = true;
            if done(step, plant, now) {
                self.log.push(Record {
                    action: step.action,
                    command: None,
                    at: wall,
                    result: "already done".into(),
                });
                self.next += 1;
                continue;
            }
            let cmd = command(step, plant, now);
            self.log.push(Record {
                action: step.action,
                command: Some(format!("{} {}", cmd.topic, cmd.payload)),
                at: wall,
                result: "pending".into(),
            });
            self.pending = Some(Pending {
                command: cmd.clone(),
                sent: now,
            });
            out.push(cmd);
            break;
        }
        if self.next >= self.steps.len() && self.pending.is_none() && out.is_empty() {
            match self.retry_at {
                None if self.log[self.round_start.min(self.log.len())..]
                    .iter()
                    .any(|r| r.result.starts_with("failed")) =>
                {
                    self.retry_at = Some(now + self.timeout);
                }
                Some(at) if now >= at => {
                    // Done ones are recorded as "already done" and skipped.
                    tracing::warn!(
                        actions = self.steps.len(),
                        "interlock actions failed: trying them again"
                    );
                    self.retry_at = None;
                    self.next = 0;
                    self.hurry = true;
                    // Keep the record bounded through long outages.
                    let excess = self.log.len().saturating_sub(4 * self.steps.len());
                    self.log.drain(..excess);
                    self.round_start = self.log.len();
                    return self.step(plant, now, wall);
                }
                _ => {}
            }
        }
        (out, changed)
    }

    /// The time at which [`Escalation::step`] has something to do without new input.
    pub fn next_deadline(&self) -> Option<Instant> {
        let started = self.started?;
        if let Some(at) = self.retry_at {
            return Some(at);
        }
        if let Some(p) = &self.pending {
            return Some(p.sent + self.timeout);
        }
        let step = self.steps.get(self.next)?;
        Some(started + Duration::from_secs_f64(step.after_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps() -> Vec<ActionStep> {
        let s = |action, temp, after_secs| ActionStep {
            action,
            temp,
            after_secs,
        };
        vec![
            s(ActionKind::ChillerSetpoint, Some(20.0), 0.0),
            s(ActionKind::HvOff, None, 30.0),
            s(ActionKind::LvOff, None, 30.0),
        ]
    }

    fn plant(t: Instant, lv: i64, hv: i64, sp: f64) -> Plant {
        let mut p = Plant::new("dcs", "julabo", Duration::from_secs(60));
        let ch = format!(r#"{{"module":"m","lv_status":{lv},"hv_status":{hv}}}"#);
        p.ingest("dcs/channels/0", ch.as_bytes(), t);
        let st = format!(r#"{{"setpoint_1":{sp},"used_setpoint":1}}"#);
        p.ingest("julabo/status", st.as_bytes(), t);
        p
    }

    #[test]
    fn in_order_confirmed_from_status_with_delays() {
        let t0 = Instant::now();
        let w = UtcNanos(0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut e = Escalation::new(steps(), Duration::from_secs(10));
        e.start(t0);
        let (out, _) = e.step(&plant(t0, 1, 1, -20.0), t0, w);
        assert_eq!(out[0].topic, "julabo/cmd/setWT");
        assert_eq!(out[0].payload, r#"{"setpoint":1,"temp":20.0}"#);
        // Confirmed by the next status; HV off waits for its 30 s.
        let (out, changed) = e.step(&plant(at(2), 1, 1, 20.0), at(2), w);
        assert!(out.is_empty() && changed);
        assert!(
            e.log[0].result.starts_with("confirmed after 2.0 s"),
            "{:?}",
            e.log
        );
        assert!(e.step(&plant(at(29), 1, 1, 20.0), at(29), w).0.is_empty());
        let (out, _) = e.step(&plant(at(30), 1, 1, 20.0), at(30), w);
        assert_eq!(out[0].topic, "dcs/cmd/switch/hv");
        // LV off is due at 30 s too, but only once HV off is confirmed.
        assert!(e.step(&plant(at(31), 1, 1, 20.0), at(31), w).0.is_empty());
        let (out, _) = e.step(&plant(at(33), 1, 0, 20.0), at(33), w);
        assert_eq!(out[0].topic, "dcs/cmd/switch/lv");
        e.step(&plant(at(35), 0, 0, 20.0), at(35), w);
        assert!(!e.running());
        let results: Vec<_> = e.log.iter().map(|r| r.result.clone()).collect();
        assert!(
            results.iter().all(|r| r.starts_with("confirmed")),
            "{results:?}"
        );
    }

    #[test]
    fn unconfirmed_or_refused_escalates_at_once() {
        let t0 = Instant::now();
        let w = UtcNanos(0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut e = Escalation::new(steps(), Duration::from_secs(10));
        e.start(t0);
        let p = plant(t0, 1, 1, -20.0);
        e.step(&p, t0, w);
        // The chiller never takes the set-point: HV off goes out at the timeout,
        // well before its 30 s.
        let (out, _) = e.step(&plant(at(10), 1, 1, -20.0), at(10), w);
        assert_eq!(out[0].topic, "dcs/cmd/switch/hv");
        assert!(e.log[0]
            .result
            .contains("not confirmed by julabo within 10 s"));
        // The FSM refuses: LV off at once.
        assert!(e.reply("dcs/cmd/switch/hv", false, Some("CA put failed")));
        let (out, _) = e.step(&plant(at(11), 1, 1, -20.0), at(11), w);
        assert_eq!(out[0].topic, "dcs/cmd/switch/lv");
        assert_eq!(e.log[1].result, "failed: refused: CA put failed");
        // LV off is not confirmed either (the broker is away, say): once every action
        // has been tried, the failed ones go out again after the timeout.
        let p = plant(at(11), 1, 1, -20.0);
        e.step(&p, at(21), w);
        assert!(e.running());
        assert!(e.step(&p, at(25), w).0.is_empty());
        let (out, _) = e.step(&p, at(31), w);
        assert_eq!(
            out[0].topic, "julabo/cmd/setWT",
            "from the first failed action"
        );
    }

    #[test]
    fn marta_stop_co2_and_safe_setpoint_confirmed_from_its_status() {
        let t0 = Instant::now();
        let w = UtcNanos(0);
        let s = |action, temp| ActionStep {
            action,
            temp,
            after_secs: 0.0,
        };
        let steps = vec![
            s(ActionKind::MartaSetpoint, Some(15.0)),
            s(ActionKind::MartaStopCo2, None),
        ];
        let marta = |sp: f64, co2: bool| {
            let mut p = Plant::new("dcs", "julabo", Duration::from_secs(60)).with_marta(Some("M1"));
            let st = format!(r#"{{"temperature_setpoint":{sp},"co2_on":{co2}}}"#);
            p.ingest("M1/status", st.as_bytes(), t0);
            p
        };
        let mut e = Escalation::new(steps.clone(), Duration::from_secs(10));
        e.start(t0);
        let (out, _) = e.step(&marta(-30.0, true), t0, w);
        assert_eq!(out[0].topic, "M1/cmd/set_temperature_setpoint");
        assert_eq!(out[0].payload, "15.0");
        let (out, _) = e.step(&marta(15.0, true), t0, w);
        assert!(e.log[0].result.starts_with("confirmed"), "{:?}", e.log);
        assert_eq!(out[0].topic, "M1/cmd/stop_co2");
        assert_eq!(out[0].payload, "");
        e.step(&marta(15.0, false), t0, w);
        assert!(e.log[1].result.starts_with("confirmed"), "{:?}", e.log);
        assert!(!e.running());
        // Already warmer and stopped: nothing sent. Unknown (offline): sent.
        let mut e = Escalation::new(steps, Duration::from_secs(10));
        e.start(t0);
        assert!(e.step(&marta(20.0, false), t0, w).0.is_empty());
        e.start(t0);
        let mut off = marta(20.0, false);
        off.ingest("M1/online", b"false", t0);
        assert_eq!(
            e.step(&off, t0, w).0[0].topic,
            "M1/cmd/set_temperature_setpoint"
        );
    }

    #[test]
    fn nothing_sent_when_already_safe_and_stop_abandons() {
        let t0 = Instant::now();
        let w = UtcNanos(0);
        let mut e = Escalation::new(steps(), Duration::from_secs(10));
        e.start(t0);
        let (out, _) = e.step(&plant(t0, 1, 0, 25.0), t0, w);
        assert!(out.is_empty());
        assert_eq!(e.log[0].result, "already done");
        let later = t0 + Duration::from_secs(30);
        let (out, _) = e.step(&plant(later, 1, 0, 25.0), later, w);
        assert_eq!(out[0].topic, "dcs/cmd/switch/lv", "HV already off");
        e.stop(&plant(later, 1, 0, 25.0), later);
        assert!(e.log[2].result.starts_with("abandoned"));
        // Started again; HV off goes out and has taken effect when the condition clears.
        e.start(t0);
        let (out, _) = e.step(&plant(later, 1, 1, 25.0), later, w);
        assert_eq!(out[0].topic, "dcs/cmd/switch/hv");
        e.stop(&plant(later, 1, 0, 25.0), later);
        assert!(e.log[1].result.starts_with("confirmed"), "{:?}", e.log);
        assert!(!e.running());
    }
}
