//! The interlock without I/O: messages and clock ticks in, retained state and
//! commands out. [`crate::service`] connects it to MQTT; tests and the benchmark can
//! drive it directly.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dcs_shared::permit::{self, PermitKey};
use dcs_shared::UtcNanos;
use serde_json::{json, Value as Json};

use crate::alarm::Alarm;
use crate::config::{InterlockConfig, RuleConfig, RuleKind, Severity};
use crate::escalation::{Escalation, Outgoing};
use crate::inputs::Inputs;
use crate::plant::Plant;
use crate::rules;

/// What the service must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Publish retained state (kept and republished after a reconnect).
    State {
        /// Topic.
        topic: String,
        /// JSON payload.
        payload: String,
    },
    /// Send a command to a target.
    Command(Outgoing),
}

struct Rule {
    name: String,
    cfg: RuleConfig,
    alarm: Alarm,
    escalation: Escalation,
    cooling_present: Option<bool>,
}

/// The interlock's state.
pub struct Interlock {
    name: String,
    alarm_prefix: String,
    inputs: Inputs,
    plant: Plant,
    rules: Vec<Rule>,
    /// For each input, the rules reading it.
    readers: Vec<Vec<usize>>,
    /// Retained alarms are taken back until then (after a restart).
    restore_until: Instant,
    /// Alarm documents are not published before the retained ones are taken back: a
    /// restart must not overwrite a latched or shelved alarm with a cleared one (people
    /// would be told "cleared", then "raised" again).
    alarms_held: bool,
    republish_every: Duration,
    last_republish: Instant,
    published: BTreeMap<String, String>,
    permit: PermitSigner,
    shelve_max_minutes: f64,
}

/// Signs `<name>/permits`: again whenever it changes and every `every` when it does not.
struct PermitSigner {
    key: PermitKey,
    boot: UtcNanos,
    seq: u64,
    every_ns: i64,
    last: Option<(String, UtcNanos)>,
}

impl Interlock {
    /// Builds the interlock at `now` (`boot`: the same instant, wall clock), signing
    /// its permits with `key`.
    pub fn new(cfg: &InterlockConfig, now: Instant, boot: UtcNanos, key: PermitKey) -> Self {
        let inputs = Inputs::new(&cfg.inputs, now);
        let rules: Vec<Rule> = cfg
            .rules
            .iter()
            .map(|(name, r)| Rule {
                name: name.clone(),
                cfg: r.clone(),
                alarm: Alarm::new(name, r.severity, Duration::from_secs_f64(r.hold_secs)),
                escalation: Escalation::new(
                    r.effective_actions(),
                    Duration::from_secs_f64(r.confirm_timeout_secs),
                ),
                cooling_present: None,
            })
            .collect();
        let mut readers = vec![Vec::new(); cfg.inputs.len()];
        for (ri, r) in rules.iter().enumerate() {
            for name in r.cfg.input_names() {
                if let Some(i) = inputs.index(name) {
                    readers[i].push(ri);
                }
            }
        }
        Interlock {
            name: cfg.name.clone(),
            alarm_prefix: cfg.alarm_prefix.clone(),
            inputs,
            plant: Plant::new(
                &cfg.targets.caen,
                &cfg.targets.chiller,
                Duration::from_secs_f64(cfg.targets.max_age_secs),
            )
            .with_marta(cfg.targets.marta.as_deref()),
            rules,
            readers,
            restore_until: now + Duration::from_secs(5),
            alarms_held: true,
            republish_every: Duration::from_secs_f64(cfg.timing.republish_secs),
            last_republish: now,
            published: BTreeMap::new(),
            permit: PermitSigner {
                key,
                boot,
                seq: 0,
                every_ns: (cfg.timing.permit_secs * 1e9) as i64,
                last: None,
            },
            shelve_max_minutes: cfg.shelve_max_minutes,
        }
    }

    /// Every filter the service subscribes to.
    pub fn filters(&self) -> Vec<String> {
        let mut f = self.inputs.filters();
        f.extend(self.plant.filters());
        f.push("+/online".into());
        f.push(format!("{}/+", self.alarm_prefix));
        // `cmd/+`, not `cmd/#`: `alarms/cmd` itself matches `alarms/+` already, and a
        // broker delivers a message once per matching filter (two replies).
        f.push(format!("{}/cmd/+", self.alarm_prefix));
        f.push(format!("{}/cmd/#", self.name));
        f.sort();
        f.dedup();
        f
    }

    /// The alarm topic prefix.
    pub fn alarm_prefix(&self) -> &str {
        &self.alarm_prefix
    }

    /// Takes a message (not a command: the service parses those).
    pub fn on_message(
        &mut self,
        topic: &str,
        payload: &[u8],
        retain: bool,
        now: Instant,
        wall: UtcNanos,
    ) -> Vec<Effect> {
        let out = self.ingest(topic, payload, retain, now, wall);
        self.hold(out)
    }

    /// Drops the alarm documents while they are held (see `alarms_held`).
    fn hold(&self, mut out: Vec<Effect>) -> Vec<Effect> {
        if self.alarms_held {
            let prefix = format!("{}/", self.alarm_prefix);
            out.retain(|e| !matches!(e, Effect::State { topic, .. } if topic.starts_with(&prefix)));
        }
        out
    }

    fn ingest(
        &mut self,
        topic: &str,
        payload: &[u8],
        retain: bool,
        now: Instant,
        wall: UtcNanos,
    ) -> Vec<Effect> {
        let mut touched: Vec<usize> = Vec::new();
        if let Some(rule) = topic
            .strip_prefix(self.alarm_prefix.as_str())
            .and_then(|t| t.strip_prefix('/'))
        {
            // Our own retained alarms, read back once after a start.
            if retain && now < self.restore_until {
                if let (Some(r), Ok(doc)) = (
                    self.rules.iter_mut().find(|r| r.name == rule),
                    serde_json::from_slice::<Json>(payload),
                ) {
                    if r.alarm.restore(&doc) {
                        tracing::warn!(
                            rule,
                            state = r.alarm.state(),
                            "latched alarm restored from its retained copy"
                        );
                    }
                    let max = Duration::from_secs_f64(self.shelve_max_minutes * 60.0);
                    if r.alarm.restore_shelve(&doc, wall, max) {
                        tracing::info!(rule, "shelve restored from the retained alarm");
                    }
                }
            }
            return self.settle(&touched, now, wall);
        }
        if let Some(source) = topic.strip_suffix("/online") {
            if !source.contains('/') {
                self.inputs.set_online(source, payload != b"false");
                self.plant.ingest(topic, payload, now);
                touched.extend(0..self.rules.len());
                return self.settle(&touched, now, wall);
            }
        }
        if self.plant.is_reply(topic) {
            if let Ok(doc) = serde_json::from_slice::<Json>(payload) {
                let cmd = doc.get("topic").and_then(Json::as_str).unwrap_or("");
                let ok = doc.get("ok").and_then(Json::as_bool).unwrap_or(false);
                let error = doc.get("error").and_then(Json::as_str);
                for (i, r) in self.rules.iter_mut().enumerate() {
                    if r.escalation.reply(cmd, ok, error) {
                        touched.push(i);
                    }
                }
            }
            return self.settle(&touched, now, wall);
        }
        if self.plant.ingest(topic, payload, now) {
            // Confirmations and the cooling rule's "is LV on".
            touched.extend(
                self.rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| {
                        r.cfg.kind == RuleKind::CoolingRequired || r.escalation.running()
                    })
                    .map(|(i, _)| i),
            );
        }
        let got = self.inputs.ingest_at(topic, payload, now, wall);
        for (i, why) in &got.malformed {
            tracing::warn!(
                topic,
                input = self.inputs.name(*i),
                why,
                "unreadable input value (counts as stale)"
            );
        }
        for i in got
            .updated
            .iter()
            .chain(got.malformed.iter().map(|(i, _)| i))
        {
            touched.extend(&self.readers[*i]);
        }
        touched.sort_unstable();
        touched.dedup();
        self.settle(&touched, now, wall)
    }

    /// Time passes: ages, hold times, action deadlines, shelves' ends, periodic
    /// republication.
    pub fn tick(&mut self, now: Instant, wall: UtcNanos) -> Vec<Effect> {
        let all: Vec<usize> = (0..self.rules.len()).collect();
        let mut out = self.settle(&all, now, wall);
        let mut expired = false;
        for i in 0..self.rules.len() {
            if self.rules[i].alarm.expire(wall) {
                expired = true;
                tracing::info!(
                    rule = self.rules[i].name,
                    state = self.rules[i].alarm.state(),
                    "shelve expired: the alarm's notifications resume"
                );
                out.push(self.alarm_effect(i, wall));
            }
        }
        if expired {
            self.publish_derived(wall, &mut out);
        }
        if now.saturating_duration_since(self.last_republish) >= self.republish_every {
            out.extend(self.republish(wall));
        }
        let mut out = self.hold(out);
        if self.alarms_held && now >= self.restore_until {
            // The retained copies had their chance: every alarm as it stands now.
            self.alarms_held = false;
            out.extend(self.republish(wall));
        }
        out
    }

    /// Everything retained, now (refresh, periodic).
    pub fn republish(&mut self, wall: UtcNanos) -> Vec<Effect> {
        self.last_republish = Instant::now();
        self.published.clear();
        self.permit.last = None;
        let mut out = Vec::new();
        for i in 0..self.rules.len() {
            out.push(self.alarm_effect(i, wall));
        }
        self.publish_derived(wall, &mut out);
        self.hold(out)
    }

    /// Acknowledges one alarm or all latched ones; the result is the reply's error.
    pub fn acknowledge(
        &mut self,
        rule: Option<&str>,
        operator: &str,
        wall: UtcNanos,
    ) -> (Result<(), String>, Vec<Effect>) {
        let mut out = Vec::new();
        let result = match rule {
            Some(name) => match self.rule_index(name) {
                Err(e) => Err(e),
                Ok(i) => {
                    let r = self.rules[i].alarm.acknowledge(operator, wall);
                    if r.is_ok() {
                        tracing::info!(
                            rule = name,
                            operator,
                            state = self.rules[i].alarm.state(),
                            "alarm acknowledged"
                        );
                        out.push(self.alarm_effect(i, wall));
                    }
                    r
                }
            },
            None => {
                let mut n = 0;
                for i in 0..self.rules.len() {
                    if self.rules[i].alarm.acknowledge(operator, wall).is_ok() {
                        n += 1;
                        out.push(self.alarm_effect(i, wall));
                    }
                }
                tracing::info!(operator, count = n, "alarms acknowledged");
                if n == 0 {
                    Err("no alarm to acknowledge: all are cleared".into())
                } else {
                    Ok(())
                }
            }
        };
        self.publish_derived(wall, &mut out);
        (result, self.hold(out))
    }

    fn rule_index(&self, name: &str) -> Result<usize, String> {
        self.rules
            .iter()
            .position(|r| r.name == name)
            .ok_or_else(|| {
                format!(
                    "no rule `{}` (rules: {})",
                    dcs_shared::command::truncate(name, 40),
                    self.rules
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// Shelves one alarm's notifications for `minutes` (at most `shelve_max_minutes`).
    /// Nothing the interlock does changes: rules, actions and permits ignore shelves.
    pub fn shelve(
        &mut self,
        rule: &str,
        minutes: f64,
        by: &str,
        reason: &str,
        wall: UtcNanos,
    ) -> (Result<(), String>, Vec<Effect>) {
        let mut out = Vec::new();
        let i = match self.rule_index(rule) {
            Ok(i) => i,
            Err(e) => return (Err(e), out),
        };
        if !(minutes > 0.0 && minutes <= self.shelve_max_minutes) {
            return (
                Err(format!(
                    "minutes must be above 0 and at most {} (shelve_max_minutes)",
                    self.shelve_max_minutes
                )),
                out,
            );
        }
        let until = UtcNanos(wall.as_nanos().saturating_add((minutes * 60e9) as i64));
        self.rules[i].alarm.shelve(by, reason, until, wall);
        tracing::info!(rule, by, reason, minutes, until = %until, "alarm shelved");
        out.push(self.alarm_effect(i, wall));
        self.publish_derived(wall, &mut out);
        (Ok(()), self.hold(out))
    }

    /// Ends a shelve before its time.
    pub fn unshelve(
        &mut self,
        rule: &str,
        by: &str,
        wall: UtcNanos,
    ) -> (Result<(), String>, Vec<Effect>) {
        let mut out = Vec::new();
        let r = self
            .rule_index(rule)
            .and_then(|i| self.rules[i].alarm.unshelve(by, wall).map(|()| i));
        if let Ok(i) = r {
            tracing::info!(rule, by, "alarm unshelved");
            out.push(self.alarm_effect(i, wall));
            self.publish_derived(wall, &mut out);
        }
        (r.map(|_| ()), self.hold(out))
    }

    /// `OK`, `ALARM` (an alarm is latched) or `UNKNOWN` (waiting for first values).
    pub fn state(&self) -> &'static str {
        if self.rules.iter().any(|r| r.alarm.state() != "cleared") {
            "ALARM"
        } else if self.rules.iter().any(|r| r.alarm.condition() == "unknown") {
            "UNKNOWN"
        } else {
            "OK"
        }
    }

    /// The earliest instant at which [`Interlock::tick`] has a deadline to act on.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.rules
            .iter()
            .filter_map(|r| r.escalation.next_deadline())
            .min()
    }

    fn settle(&mut self, rules: &[usize], now: Instant, wall: UtcNanos) -> Vec<Effect> {
        let mut out = Vec::new();
        for &i in rules {
            let r = &mut self.rules[i];
            let eval = rules::evaluate(&r.cfg, &self.inputs, &self.plant, now);
            r.cooling_present = eval.cooling_present;
            let o = r.alarm.observe(&eval, now, wall);
            if o.raised {
                tracing::warn!(
                    rule = r.name,
                    severity = r.cfg.severity.as_str(),
                    message = r.alarm.message(),
                    "alarm raised"
                );
                r.escalation.start(now);
            }
            if o.ended {
                tracing::info!(
                    rule = r.name,
                    state = r.alarm.state(),
                    "alarm condition back to normal"
                );
                r.escalation.stop(&self.plant, now);
            }
            let (commands, logged) = r.escalation.step(&self.plant, now, wall);
            for c in &commands {
                tracing::warn!(
                    rule = r.name,
                    topic = c.topic,
                    payload = c.payload,
                    "interlock command"
                );
            }
            out.extend(commands.into_iter().map(Effect::Command));
            if o.changed || logged {
                out.push(self.alarm_effect(i, wall));
            }
        }
        self.publish_derived(wall, &mut out);
        out
    }

    fn alarm_effect(&self, i: usize, wall: UtcNanos) -> Effect {
        let r = &self.rules[i];
        let mut doc = r.alarm.to_json(wall);
        let log: Vec<Json> = r.escalation.log.iter().map(|l| l.to_json()).collect();
        doc["action"] = r.escalation.log.last().map_or(Json::Null, |l| {
            json!(format!("{}: {}", l.action.as_str(), l.result))
        });
        doc["actions"] = Json::Array(log);
        doc["advice"] = json!(r.cfg.advice);
        Effect::State {
            topic: format!("{}/{}", self.alarm_prefix, r.name),
            payload: doc.to_string(),
        }
    }

    /// Permits, summary and status, each only when it changed (the timestamp aside).
    fn publish_derived(&mut self, wall: UtcNanos, out: &mut Vec<Effect>) {
        let mut reasons = Vec::new();
        for r in self.rules.iter().filter(|r| r.cfg.inhibit_lv) {
            let ok = match r.cfg.kind {
                RuleKind::CoolingRequired => r.cooling_present == Some(true) && !r.alarm.breached(),
                _ => r.alarm.known_safe(),
            };
            if !ok {
                let why = match (r.cfg.kind, r.alarm.condition()) {
                    (_, "unknown") => "waiting for first values".to_string(),
                    (RuleKind::CoolingRequired, _) if !r.alarm.breached() => {
                        "cooling required: the chiller is not known to be running".to_string()
                    }
                    _ if r.alarm.message().is_empty() => "not known to be safe".to_string(),
                    _ => r.alarm.message().to_string(),
                };
                reasons.push(format!("{}: {why}", r.name));
            }
        }
        let lv_on = reasons.is_empty();
        self.sign_permit(lv_on, reasons, wall, out);
        let mut counts = [0u32; 3];
        let mut worst: Option<Severity> = None;
        let mut by_rule = serde_json::Map::new();
        let mut conditions = serde_json::Map::new();
        let mut shelved = serde_json::Map::new();
        for r in &self.rules {
            if let Some(s) = r.alarm.shelved() {
                shelved.insert(
                    r.name.clone(),
                    json!({"by": s.by, "reason": s.reason, "until": s.until.to_string()}),
                );
            }
            let s = r.alarm.state();
            counts[match s {
                "active" => 0,
                "acknowledged" => 1,
                _ => 2,
            }] += 1;
            if s != "cleared" {
                worst = worst.max(Some(r.alarm.severity));
            }
            by_rule.insert(r.name.clone(), json!(s));
            conditions.insert(r.name.clone(), json!(r.alarm.condition()));
        }
        let summary = json!({
            "active": counts[0],
            "acknowledged": counts[1],
            "cleared": counts[2],
            "worst": worst.map_or("none", Severity::as_str),
            "rules": by_rule,
            "shelved": shelved,
        });
        let status = json!({
            "state": self.state(),
            "lv_on_permitted": lv_on,
            "conditions": conditions,
            "malformed_inputs": self.inputs.malformed_total(),
        });
        for (topic, mut doc) in [
            (format!("{}/summary", self.alarm_prefix), summary),
            (format!("{}/status", self.name), status),
        ] {
            let key = doc.to_string();
            if self.published.get(&topic) == Some(&key) {
                continue;
            }
            self.published.insert(topic.clone(), key);
            doc["time"] = json!(wall.as_nanos());
            out.push(Effect::State {
                topic,
                payload: doc.to_string(),
            });
        }
    }

    /// Signs and publishes the permit when it changed, or when the last signature is
    /// `permit_secs` old (a permit nobody re-signs goes stale at its readers).
    fn sign_permit(
        &mut self,
        lv_on: bool,
        reasons: Vec<String>,
        wall: UtcNanos,
        out: &mut Vec<Effect>,
    ) {
        let s = &mut self.permit;
        let key = json!([lv_on, reasons]).to_string();
        let due = match &s.last {
            None => true,
            Some((k, at)) => {
                *k != key || wall.as_nanos().saturating_sub(at.as_nanos()) >= s.every_ns
            }
        };
        if !due {
            return;
        }
        s.seq += 1;
        s.last = Some((key, wall));
        let p = permit::Permit {
            lv_on,
            reasons,
            time: wall,
            boot_ns: s.boot.as_nanos(),
            seq: s.seq,
        };
        let topic = format!("{}/permits", self.name);
        let doc = permit::sign(&s.key, &topic, &p);
        out.push(Effect::State {
            topic,
            payload: doc.to_string(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn key() -> PermitKey {
        PermitKey::from_text("interlock engine test key").unwrap()
    }

    fn engine() -> (Interlock, Instant) {
        let cfg: InterlockConfig = dcs_shared::config::from_str(
            r#"
inputs:
  bath: {topic: julabo/status, field: internal_temp, max_age_secs: 30}
  running: {topic: julabo/status, field: running, max_age_secs: 30}
  dew: {topic: "+/sensors/BME/dew", max_age_secs: 60}
rules:
  dew_point:
    kind: dew_point
    cold: [bath]
    dew: [dew]
    margin: 3
    hysteresis: 1
    actions:
      - {do: chiller_setpoint, temp: 20}
      - {do: hv_off, after_secs: 10}
      - {do: lv_off, after_secs: 10}
  cooling: {kind: cooling_required, running: running, mode: refuse}
"#,
            Path::new("t.yaml"),
        )
        .unwrap();
        let t0 = Instant::now();
        // Started 6 s ago: the retained alarms' window is over at the first tick.
        let started = t0.checked_sub(Duration::from_secs(6)).unwrap_or(t0);
        let mut il = Interlock::new(&cfg, started, UtcNanos::now(), key());
        il.tick(t0, UtcNanos(1));
        (il, t0)
    }

    fn states(e: &[Effect]) -> BTreeMap<String, Json> {
        e.iter()
            .filter_map(|e| match e {
                Effect::State { topic, payload } => {
                    Some((topic.clone(), serde_json::from_str(payload).unwrap()))
                }
                _ => None,
            })
            .collect()
    }

    fn commands(e: &[Effect]) -> Vec<String> {
        e.iter()
            .filter_map(|e| match e {
                Effect::Command(c) => Some(c.topic.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn dew_point_breach_commands_in_order_and_permit_follows() {
        let (mut il, t0) = engine();
        let w = UtcNanos(7);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let out = il.republish(w);
        assert_eq!(
            states(&out)["interlock/permits"]["lv_on"],
            false,
            "unknown at start"
        );
        il.on_message(
            "dcs/channels/0",
            br#"{"module":"m","lv_status":1,"hv_status":1}"#,
            false,
            t0,
            w,
        );
        il.on_message(
            "julabo/status",
            br#"{"internal_temp":10.0,"running":true,"setpoint_1":10.0,"used_setpoint":1}"#,
            false,
            t0,
            w,
        );
        let out = il.on_message("ESP01/sensors/BME/dew", b"5.0", false, t0, w);
        let s = states(&out);
        assert_eq!(s["interlock/permits"]["lv_on"], true);
        assert_eq!(s["interlock/status"]["state"], "OK");

        let out = il.on_message("ESP01/sensors/BME/dew", b"8.0", false, at(1), w);
        assert_eq!(commands(&out), ["julabo/cmd/setWT"]);
        let s = states(&out);
        assert_eq!(s["alarms/dew_point"]["state"], "active");
        assert_eq!(s["alarms/dew_point"]["values"]["dew_point"], 8.0);
        assert_eq!(s["alarms/summary"]["active"], 1);
        assert_eq!(s["interlock/permits"]["lv_on"], false);
        assert!(s["interlock/permits"]["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("dew_point: coldest 10.00"));

        il.on_message(
            "julabo/status",
            br#"{"internal_temp":10.0,"running":true,"setpoint_1":20.0,"used_setpoint":1}"#,
            false,
            at(2),
            w,
        );
        assert_eq!(commands(&il.tick(at(11), w)), ["dcs/cmd/switch/hv"]);
        let out = il.on_message(
            "dcs/channels/0",
            br#"{"module":"m","lv_status":1,"hv_status":0}"#,
            false,
            at(12),
            w,
        );
        assert_eq!(commands(&out), ["dcs/cmd/switch/lv"]);

        // Back to normal: latched until acknowledged, then cleared.
        il.on_message(
            "dcs/channels/0",
            br#"{"module":"m","lv_status":0,"hv_status":0}"#,
            false,
            at(13),
            w,
        );
        let out = il.on_message("ESP01/sensors/BME/dew", b"5.0", false, at(14), w);
        let s = states(&out);
        assert_eq!(s["alarms/dew_point"]["state"], "active");
        assert_eq!(s["alarms/dew_point"]["condition"], "normal");
        let actions = s["alarms/dew_point"]["actions"].as_array().unwrap().len();
        assert_eq!(actions, 3);
        let (r, out) = il.acknowledge(Some("dew_point"), "ana", w);
        r.unwrap();
        assert_eq!(states(&out)["alarms/dew_point"]["state"], "cleared");
        assert!(il
            .acknowledge(Some("nope"), "ana", w)
            .0
            .unwrap_err()
            .contains("rules: cooling, dew_point"));
    }

    #[test]
    fn a_restart_publishes_no_alarm_before_taking_back_its_retained_copies() {
        let cfg: InterlockConfig = dcs_shared::config::from_str(
            "inputs:\n  dew: {topic: d, max_age_secs: 60}\n  bath: {topic: b, max_age_secs: 60}\n\
             rules:\n  dew_point: {kind: dew_point, cold: [bath], dew: [dew], margin: 3}\n",
            std::path::Path::new("t.yaml"),
        )
        .unwrap();
        let t0 = Instant::now();
        let w = UtcNanos(1_000_000_000_000);
        let mut il = Interlock::new(&cfg, t0, w, key());
        let first = il.republish(w);
        assert!(states(&first).contains_key("interlock/permits"));
        assert!(!states(&first).contains_key("alarms/dew_point"), "held");
        // The broker hands back the latched, shelved alarm.
        let retained = json!({"rule": "dew_point", "state": "active", "message": "wet",
            "first_seen_ns": 5, "shelved": {"by": "ana", "reason": "r", "at_ns": 7,
            "until_ns": w.as_nanos() + 600_000_000_000i64}});
        let out = il.on_message(
            "alarms/dew_point",
            retained.to_string().as_bytes(),
            true,
            t0,
            w,
        );
        assert!(!states(&out).contains_key("alarms/dew_point"), "still held");
        let out = il.tick(t0 + Duration::from_secs(5), w);
        let s = states(&out);
        assert_eq!(s["alarms/dew_point"]["state"], "active");
        assert_eq!(s["alarms/dew_point"]["shelved"]["by"], "ana");
        assert_eq!(s["alarms/summary"]["active"], 1);
    }

    #[test]
    fn shelving_is_bounded_shown_and_expires() {
        let (mut il, t0) = engine();
        let w = UtcNanos(1_000_000_000_000);
        let (r, out) = il.shelve("dew_point", 30.0, "ana", "sensor swap", w);
        r.unwrap();
        let s = states(&out);
        assert_eq!(s["alarms/dew_point"]["shelved"]["by"], "ana");
        assert_eq!(
            s["alarms/summary"]["shelved"]["dew_point"]["reason"],
            "sensor swap"
        );
        let (r, out) = il.shelve("dew_point", 24.0 * 60.0 + 1.0, "ana", "long", w);
        assert!(r.unwrap_err().contains("at most 1440"));
        assert!(out.is_empty(), "a refused shelve changes nothing");
        let (r, _) = il.shelve("nope", 5.0, "ana", "r", w);
        assert!(r.unwrap_err().contains("no rule `nope`"));
        // Not yet over at 29 min; over at 30.
        let min = |m: i64| UtcNanos(w.as_nanos() + m * 60_000_000_000);
        assert!(!states(&il.tick(t0, min(29))).contains_key("alarms/dew_point"));
        let s = states(&il.tick(t0, min(30)));
        assert!(s["alarms/dew_point"]["shelved"].is_null());
        assert_eq!(s["alarms/dew_point"]["unshelved"]["expired"], true);
        assert_eq!(s["alarms/summary"]["shelved"], json!({}));
        let (r, out) = il.unshelve("dew_point", "bo", min(31));
        assert!(r.unwrap_err().contains("not shelved"));
        assert!(out.is_empty());
    }

    use proptest::prelude::*;

    /// What can happen to the interlock: values, time, operators' commands.
    #[derive(Debug, Clone)]
    enum Step {
        Dew(f64),
        Bath(f64, bool),
        Channel(bool, bool),
        Wait(u64),
        Ack,
        Shelve(u8),
        Unshelve,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (-5.0..15.0f64).prop_map(Step::Dew),
            ((-40.0..30.0f64), any::<bool>()).prop_map(|(t, r)| Step::Bath(t, r)),
            (any::<bool>(), any::<bool>()).prop_map(|(l, h)| Step::Channel(l, h)),
            (0u64..40).prop_map(Step::Wait),
            Just(Step::Ack),
            (1u8..60).prop_map(Step::Shelve),
            Just(Step::Unshelve),
        ]
    }

    /// What the interlock does to the lab: the commands it sends, and the permit's
    /// verdict (the last one signed: re-signing an unchanged verdict is not an act).
    fn acts(out: &[Effect], verdict: &mut String) -> Vec<String> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Command(c) => Some(format!("{} {}", c.topic, c.payload)),
                Effect::State { topic, payload } if topic == "interlock/permits" => {
                    let p: Json = serde_json::from_str(payload).unwrap();
                    *verdict = format!("{} {}", p["lv_on"], p["reasons"]);
                    None
                }
                _ => None,
            })
            .collect()
    }

    proptest! {
        /// Shelving (ISA-18.2) silences people, never the interlock: the same events
        /// with and without shelve commands give the same commands and permits.
        #[test]
        fn shelving_never_changes_what_the_interlock_does(
            steps in proptest::collection::vec(step(), 1..60)
        ) {
            let (mut plain, t0) = engine();
            let (mut shelved, _) = engine();
            let mut secs = 0u64;
            let mut wall = 1_000_000_000_000i64;
            let (mut plain_verdict, mut shelved_verdict) = (String::new(), String::new());
            acts(&plain.republish(UtcNanos(wall)), &mut plain_verdict);
            acts(&shelved.republish(UtcNanos(wall)), &mut shelved_verdict);
            for s in steps {
                let now = t0 + Duration::from_secs(secs);
                let w = UtcNanos(wall);
                let msg = match &s {
                    Step::Dew(d) => Some(("ESP01/sensors/BME/dew".to_string(), format!("{d}"))),
                    Step::Bath(t, r) => Some(("julabo/status".to_string(), format!(
                        r#"{{"internal_temp":{t},"running":{r},"setpoint_1":{t},"used_setpoint":1}}"#))),
                    Step::Channel(l, h) => Some(("dcs/channels/0".to_string(), format!(
                        r#"{{"module":"m","lv_status":{},"hv_status":{}}}"#, u8::from(*l), u8::from(*h)))),
                    _ => None,
                };
                let (a, b) = match s {
                    Step::Wait(d) => {
                        secs += d;
                        wall += i64::try_from(d).unwrap() * 1_000_000_000;
                        let now = t0 + Duration::from_secs(secs);
                        let w = UtcNanos(wall);
                        (plain.tick(now, w), shelved.tick(now, w))
                    }
                    Step::Ack => (
                        plain.acknowledge(None, "op", w).1,
                        shelved.acknowledge(None, "op", w).1,
                    ),
                    Step::Shelve(m) => {
                        let rule = if m % 2 == 0 { "dew_point" } else { "cooling" };
                        let (r, out) = shelved.shelve(rule, f64::from(m) / 60.0, "op", "test", w);
                        prop_assert!(r.is_ok());
                        (Vec::new(), out)
                    }
                    Step::Unshelve => (
                        Vec::new(),
                        shelved.unshelve("dew_point", "op", w).1,
                    ),
                    _ => {
                        let (topic, payload) = msg.unwrap();
                        (
                            plain.on_message(&topic, payload.as_bytes(), false, now, w),
                            shelved.on_message(&topic, payload.as_bytes(), false, now, w),
                        )
                    }
                };
                prop_assert_eq!(
                    acts(&a, &mut plain_verdict),
                    acts(&b, &mut shelved_verdict),
                    "after {:?}",
                    s
                );
                prop_assert_eq!(&plain_verdict, &shelved_verdict, "after {:?}", s);
                prop_assert_eq!(plain.state(), shelved.state());
            }
        }
    }

    #[test]
    fn permits_are_signed_in_sequence_and_resigned_when_unchanged() {
        let (mut e, t0) = engine();
        let wall = UtcNanos(1_000_000_000_000);
        let mut v = dcs_shared::permit::Verifier::new(key(), 30.0);
        let permits = |out: &[Effect]| -> Vec<String> {
            out.iter()
                .filter_map(|e| match e {
                    Effect::State { topic, payload } if topic == "interlock/permits" => {
                        Some(payload.clone())
                    }
                    _ => None,
                })
                .collect()
        };
        let first = permits(&e.republish(wall));
        assert_eq!(first.len(), 1);
        let p = v
            .accept("interlock/permits", first[0].as_bytes(), wall)
            .unwrap();
        assert!(!p.lv_on, "no values yet: {p:?}");
        // Unchanged: not signed again before permit_secs (10 s by default) ...
        let soon = UtcNanos(wall.as_nanos() + 9_000_000_000);
        assert!(permits(&e.tick(t0, soon)).is_empty());
        // ... and signed again, newer, once it is due.
        let later = UtcNanos(wall.as_nanos() + 10_000_000_000);
        let again = permits(&e.tick(t0, later));
        assert_eq!(again.len(), 1);
        let p2 = v
            .accept("interlock/permits", again[0].as_bytes(), later)
            .unwrap();
        assert_eq!(
            (p2.seq, p2.lv_on, &p2.reasons),
            (p.seq + 1, false, &p.reasons)
        );
        // A replay of the first is refused by a reader.
        assert!(v
            .accept("interlock/permits", first[0].as_bytes(), later)
            .is_err());
    }
}
