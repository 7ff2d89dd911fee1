//! What people are told, decided from the messages the suite publishes and the clock:
//! an alarm raised, escalated (the interlock's actions and whether they were
//! confirmed), acknowledged and cleared, a reminder while it stays active and
//! unacknowledged, and the watchdog's notices when the interlock, a watched service or
//! the broker goes away (and when it is back). No I/O: messages and instants in,
//! notifications out; the service routes them to the channels.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use dcs_shared::UtcNanos;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::config::{NotifierConfig, Severity};

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An alarm became active.
    Raised,
    /// The interlock took further actions for an active alarm.
    Escalated,
    /// Someone acknowledged it.
    Acknowledged,
    /// It cleared.
    Cleared,
    /// Still active and unacknowledged.
    Reminder,
    /// The interlock, a watched service or the broker is gone or silent.
    Watchdog,
    /// It is back.
    Back,
    /// Notifications held back by a channel's rate limit, counted.
    Folded,
}

impl Kind {
    /// The word in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Raised => "RAISED",
            Kind::Escalated => "ESCALATED",
            Kind::Acknowledged => "ACKNOWLEDGED",
            Kind::Cleared => "CLEARED",
            Kind::Reminder => "STILL ACTIVE",
            Kind::Watchdog => "WATCHDOG",
            Kind::Back => "BACK",
            Kind::Folded => "FOLDED",
        }
    }
}

/// One message for people, channel-independent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// What happened.
    pub kind: Kind,
    /// Routing: the alarm's severity; `critical` for the watchdog.
    pub severity: Severity,
    /// The station.
    pub station: String,
    /// The alarm's rule, or the service the watchdog speaks of.
    pub subject_of: String,
    /// One line.
    pub summary: String,
    /// The alarm's message, values, actions, and what to do.
    pub details: Json,
    /// When it happened, UTC ns.
    pub at_ns: i64,
}

/// What is remembered of one alarm (kept across restarts: no repeated "raised").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlarmMemory {
    /// `active`, `acknowledged`, `cleared`.
    pub state: String,
    /// Who acknowledged it.
    pub acknowledged_by: Option<String>,
    /// Actions already told.
    pub actions_told: usize,
    /// UTC ns of the last message about it (reminders count from it).
    pub last_told_ns: i64,
}

#[derive(Debug, Default)]
struct Absence {
    since: Option<Instant>,
    told: bool,
}

/// The notifier's decisions.
#[derive(Debug)]
pub struct Engine {
    station: String,
    alarm_prefix: String,
    interlock: String,
    watch: BTreeSet<String>,
    reminder: Duration,
    silence: Duration,
    grace: Duration,
    alarms: BTreeMap<String, AlarmMemory>,
    interlock_seen: Instant,
    interlock_silent: Absence,
    offline: BTreeMap<String, Absence>,
    broker: Absence,
}

fn ns_to(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl Engine {
    /// An engine for `cfg`, started at `now`.
    pub fn new(cfg: &NotifierConfig, now: Instant) -> Self {
        let mut watch: BTreeSet<String> = cfg.watch.iter().cloned().collect();
        watch.insert(cfg.interlock.clone());
        Engine {
            station: cfg.station.clone(),
            alarm_prefix: cfg.alarm_prefix.clone(),
            interlock: cfg.interlock.clone(),
            watch,
            reminder: Duration::from_secs_f64(cfg.timing.reminder_secs),
            silence: Duration::from_secs_f64(cfg.timing.interlock_silence_secs),
            grace: Duration::from_secs_f64(cfg.timing.offline_grace_secs),
            alarms: BTreeMap::new(),
            interlock_seen: now,
            interlock_silent: Absence::default(),
            offline: BTreeMap::new(),
            broker: Absence::default(),
        }
    }

    /// The topics to follow.
    pub fn filters(&self) -> Vec<String> {
        vec![
            format!("{}/+", self.alarm_prefix),
            format!("{}/#", self.interlock),
            "+/online".into(),
        ]
    }

    /// What is remembered of the alarms (to save).
    pub fn memory(&self) -> &BTreeMap<String, AlarmMemory> {
        &self.alarms
    }

    /// Takes back what was saved before a restart.
    pub fn restore(&mut self, memory: BTreeMap<String, AlarmMemory>) {
        self.alarms = memory;
    }

    fn note(
        &self,
        kind: Kind,
        severity: Severity,
        about: &str,
        summary: String,
        details: Json,
        wall: UtcNanos,
    ) -> Notification {
        Notification {
            kind,
            severity,
            station: self.station.clone(),
            subject_of: about.to_string(),
            summary,
            details,
            at_ns: wall.as_nanos(),
        }
    }

    /// A message from the broker.
    pub fn message(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        wall: UtcNanos,
    ) -> Vec<Notification> {
        let mut out = Vec::new();
        let mut levels = topic.split('/');
        let (first, second, rest) = (levels.next(), levels.next(), levels.next());
        if first == Some(self.interlock.as_str())
            && !(second == Some("online") && payload == b"false")
        {
            self.interlock_seen = now;
            if self.interlock_silent.told {
                self.interlock_silent.told = false;
                out.push(self.note(
                    Kind::Back,
                    Severity::Critical,
                    &self.interlock,
                    format!("{} publishes again", self.interlock),
                    Json::Null,
                    wall,
                ));
            }
        }
        if let (Some(svc), Some("online"), None) = (first, second, rest) {
            if self.watch.contains(svc) {
                let a = self.offline.entry(svc.to_string()).or_default();
                if payload == b"false" {
                    if a.since.is_none() {
                        a.since = Some(now);
                    }
                } else {
                    a.since = None;
                    if a.told {
                        a.told = false;
                        out.push(self.note(
                            Kind::Back,
                            Severity::Critical,
                            svc,
                            format!("{svc} is online again"),
                            Json::Null,
                            wall,
                        ));
                    }
                }
            }
            return out;
        }
        if first == Some(self.alarm_prefix.as_str()) && rest.is_none() {
            if let Some(rule) = second.filter(|r| !matches!(*r, "summary" | "reply" | "cmd")) {
                out.extend(self.alarm(rule, payload, wall));
            }
        }
        out
    }

    fn alarm(&mut self, rule: &str, payload: &[u8], wall: UtcNanos) -> Vec<Notification> {
        let Ok(doc) = serde_json::from_slice::<Json>(payload) else {
            tracing::warn!(rule, "unreadable alarm payload: ignored");
            return Vec::new();
        };
        let state = doc
            .get("state")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string();
        if !matches!(state.as_str(), "active" | "acknowledged" | "cleared") {
            return Vec::new();
        }
        let severity = match doc.get("severity").and_then(Json::as_str) {
            Some("warning") => Severity::Warning,
            _ => Severity::Critical,
        };
        let acked_by = doc
            .get("acknowledged_by")
            .and_then(Json::as_str)
            .map(String::from);
        let actions: Vec<Json> = doc
            .get("actions")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default();
        let details = serde_json::json!({
            "rule": rule,
            "message": doc.get("message"),
            "values": doc.get("values"),
            "actions": actions,
            "acknowledged_by": acked_by,
            "advice": doc.get("advice"),
            "first_seen": doc.get("first_seen"),
        });
        let prev = self.alarms.get(rule).cloned();
        let mut mem = prev.clone().unwrap_or_default();
        let mut out = Vec::new();
        let was_open = prev.as_ref().is_some_and(|p| p.state != "cleared");
        let open = state != "cleared";
        let message = doc
            .get("message")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string();
        if open && !was_open {
            out.push(self.note(
                Kind::Raised,
                severity,
                rule,
                format!("{rule}: {message}"),
                details.clone(),
                wall,
            ));
            mem = AlarmMemory {
                actions_told: actions.len(),
                ..AlarmMemory::default()
            };
        } else if open {
            // New actions are told once each has a result (one message for a group).
            let new = &actions[mem.actions_told.min(actions.len())..];
            let settled = !new.is_empty()
                && new.iter().all(|a| {
                    a.get("result")
                        .and_then(Json::as_str)
                        .is_some_and(|r| r != "pending")
                });
            if settled {
                let done: Vec<String> = new
                    .iter()
                    .map(|a| {
                        format!(
                            "{}: {}",
                            a.get("do").and_then(Json::as_str).unwrap_or("?"),
                            a.get("result").and_then(Json::as_str).unwrap_or("?")
                        )
                    })
                    .collect();
                out.push(self.note(
                    Kind::Escalated,
                    severity,
                    rule,
                    format!("{rule}: {}", done.join("; ")),
                    details.clone(),
                    wall,
                ));
                mem.actions_told = actions.len();
            }
        }
        if let (Some(by), None) = (&acked_by, &mem.acknowledged_by) {
            if prev.is_some() || open {
                out.push(self.note(
                    Kind::Acknowledged,
                    severity,
                    rule,
                    format!("{rule}: acknowledged by {by}"),
                    details.clone(),
                    wall,
                ));
            }
        }
        if !open && was_open {
            let sev = if severity == Severity::Critical {
                Severity::Critical
            } else {
                Severity::Info
            };
            out.push(self.note(
                Kind::Cleared,
                sev,
                rule,
                format!("{rule}: cleared"),
                details,
                wall,
            ));
        }
        mem.state = state;
        mem.acknowledged_by = acked_by;
        if !out.is_empty() {
            mem.last_told_ns = wall.as_nanos();
        }
        self.alarms.insert(rule.to_string(), mem);
        out
    }

    /// The notifier's own broker connection came or went.
    pub fn broker(&mut self, connected: bool, now: Instant, wall: UtcNanos) -> Vec<Notification> {
        if connected {
            self.broker.since = None;
            // Whatever the interlock did meanwhile, it is judged from now on.
            self.interlock_seen = now;
            if std::mem::take(&mut self.broker.told) {
                return vec![self.note(
                    Kind::Back,
                    Severity::Critical,
                    "broker",
                    "the MQTT broker is reachable again".into(),
                    Json::Null,
                    wall,
                )];
            }
        } else if self.broker.since.is_none() {
            self.broker.since = Some(now);
        }
        Vec::new()
    }

    /// Reminders and the watchdog's deadlines.
    pub fn tick(&mut self, now: Instant, wall: UtcNanos) -> Vec<Notification> {
        let mut out = Vec::new();
        let grace = self.grace;
        if let Some(since) = self.broker.since {
            if !self.broker.told && now.saturating_duration_since(since) >= grace {
                self.broker.told = true;
                let secs = now.saturating_duration_since(since).as_secs();
                out.push(self.note(
                    Kind::Watchdog,
                    Severity::Critical,
                    "broker",
                    format!("the MQTT broker has been unreachable for {secs} s: the suite's state is unknown"),
                    Json::Null,
                    wall,
                ));
            }
            // Without the broker nothing else can be judged.
            return out;
        }
        let mut gone = Vec::new();
        for (svc, a) in &mut self.offline {
            if let Some(since) = a.since {
                if !a.told && now.saturating_duration_since(since) >= grace {
                    a.told = true;
                    gone.push((svc.clone(), now.saturating_duration_since(since).as_secs()));
                }
            }
        }
        for (svc, secs) in gone {
            let what = if svc == self.interlock {
                "the safety interlock"
            } else {
                "a service"
            };
            out.push(self.note(
                Kind::Watchdog,
                Severity::Critical,
                &svc,
                format!("{svc} ({what}) has been offline for {secs} s"),
                Json::Null,
                wall,
            ));
        }
        let interlock_offline_told = self.offline.get(&self.interlock).is_some_and(|a| a.told);
        let quiet = now.saturating_duration_since(self.interlock_seen);
        if quiet >= self.silence && !self.interlock_silent.told && !interlock_offline_told {
            self.interlock_silent.told = true;
            out.push(self.note(
                Kind::Watchdog,
                Severity::Critical,
                &self.interlock,
                format!(
                    "{} has published nothing for {} s: the safety interlock may be stuck",
                    self.interlock,
                    quiet.as_secs()
                ),
                Json::Null,
                wall,
            ));
        }
        let reminder = ns_to(self.reminder);
        let mut due = Vec::new();
        for (rule, m) in &self.alarms {
            if m.state == "active"
                && m.acknowledged_by.is_none()
                && wall.as_nanos() - m.last_told_ns >= reminder
            {
                due.push(rule.clone());
            }
        }
        // One message for all the alarms due at once: a flood is not repeated as one.
        if !due.is_empty() {
            let now_ns = wall.as_nanos();
            let lines: Vec<String> = due
                .iter()
                .map(|r| {
                    let since = self.alarms.get(r).map_or(now_ns, |m| m.last_told_ns);
                    format!(
                        "{r} ({} min since the last message)",
                        (now_ns - since) / 60_000_000_000
                    )
                })
                .collect();
            let (about, summary) = if due.len() == 1 {
                (
                    due[0].clone(),
                    format!("{}: still active and unacknowledged", lines[0]),
                )
            } else {
                (
                    "alarms".to_string(),
                    format!(
                        "{} alarms still active and unacknowledged: {}",
                        due.len(),
                        due.join(", ")
                    ),
                )
            };
            out.push(self.note(
                Kind::Reminder,
                Severity::Critical,
                &about,
                summary,
                serde_json::json!({ "alarms": lines }),
                wall,
            ));
            for rule in &due {
                if let Some(m) = self.alarms.get_mut(rule) {
                    m.last_told_ns = now_ns;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NotifierConfig {
        dcs_shared::config::from_str(
            "station: box1\nstate_dir: /tmp/x\nwatch: [dcs]\n\
             timing: {reminder_secs: 600, interlock_silence_secs: 60, offline_grace_secs: 30}\n\
             channels: [{name: chat, webhook: {url: 'http://127.0.0.1:1/x', format: json}}]\n",
            std::path::Path::new("notifier.yaml"),
        )
        .unwrap()
    }

    fn alarm(state: &str, actions: &str, acked: Option<&str>) -> Vec<u8> {
        format!(
            r#"{{"rule":"dew_point","severity":"critical","state":"{state}","message":"dew point 2.1 degC above the coldest surface","values":{{"bath_temp":4.0}},"actions":[{actions}],"acknowledged_by":{}}}"#,
            acked.map_or("null".to_string(), |a| format!("\"{a}\""))
        )
        .into_bytes()
    }

    const SP: &str = r#"{"do":"chiller_setpoint","result":"confirmed after 2.0 s"}"#;
    const HV: &str = r#"{"do":"hv_off","result":"pending"}"#;
    const HV_OK: &str = r#"{"do":"hv_off","result":"confirmed after 3.0 s"}"#;
    const LV_OK: &str = r#"{"do":"lv_off","result":"confirmed after 9.0 s"}"#;

    fn kinds(v: &[Notification]) -> Vec<Kind> {
        v.iter().map(|n| n.kind).collect()
    }

    #[test]
    fn raised_escalated_acknowledged_cleared_once_each() {
        let t0 = Instant::now();
        let w = |s: i64| UtcNanos(1_000_000_000_000 + s * 1_000_000_000);
        let mut e = Engine::new(&cfg(), t0);
        let t = "alarms/dew_point";
        let raised = e.message(t, &alarm("active", SP, None), t0, w(0));
        assert_eq!(kinds(&raised), [Kind::Raised]);
        assert_eq!(raised[0].station, "box1");
        assert_eq!(raised[0].details["values"]["bath_temp"], 4.0);
        // The same state again (a republish): nothing.
        assert!(e
            .message(t, &alarm("active", SP, None), t0, w(1))
            .is_empty());
        // HV off taken, pending: not yet; confirmed with LV off: one message for both.
        assert!(e
            .message(t, &alarm("active", &format!("{SP},{HV}"), None), t0, w(2))
            .is_empty());
        let esc = e.message(
            t,
            &alarm("active", &format!("{SP},{HV_OK},{LV_OK}"), None),
            t0,
            w(3),
        );
        assert_eq!(kinds(&esc), [Kind::Escalated]);
        assert!(
            esc[0].summary.contains("hv_off: confirmed")
                && esc[0].summary.contains("lv_off: confirmed"),
            "{}",
            esc[0].summary
        );
        let all = format!("{SP},{HV_OK},{LV_OK}");
        assert_eq!(
            kinds(&e.message(t, &alarm("acknowledged", &all, Some("ana")), t0, w(4))),
            [Kind::Acknowledged]
        );
        assert!(e
            .message(t, &alarm("acknowledged", &all, Some("ana")), t0, w(5))
            .is_empty());
        assert_eq!(
            kinds(&e.message(t, &alarm("cleared", &all, Some("ana")), t0, w(6))),
            [Kind::Cleared]
        );
        assert!(e
            .message(t, &alarm("cleared", &all, Some("ana")), t0, w(7))
            .is_empty());
        // Raised again later: a new story.
        assert_eq!(
            kinds(&e.message(t, &alarm("active", "", None), t0, w(8))),
            [Kind::Raised]
        );
        // Summary, replies, commands and garbage are not alarms.
        for topic in ["alarms/summary", "alarms/reply", "alarms/cmd/ack"] {
            assert!(e
                .message(topic, &alarm("active", "", None), t0, w(9))
                .is_empty());
        }
        assert!(e.message("alarms/other", b"{garbage", t0, w(9)).is_empty());
    }

    #[test]
    fn a_restart_does_not_repeat_what_was_told() {
        let t0 = Instant::now();
        let mut e = Engine::new(&cfg(), t0);
        e.message(
            "alarms/dew_point",
            &alarm("active", SP, None),
            t0,
            UtcNanos(1),
        );
        let saved = e.memory().clone();
        let mut again = Engine::new(&cfg(), t0);
        again.restore(saved);
        // The retained alarm arrives after the restart: already told.
        assert!(again
            .message(
                "alarms/dew_point",
                &alarm("active", SP, None),
                t0,
                UtcNanos(2)
            )
            .is_empty());
        // A cleared alarm seen for the first time is history, not news.
        assert!(again
            .message(
                "alarms/cooling",
                &alarm("cleared", "", Some("x")),
                t0,
                UtcNanos(2)
            )
            .is_empty());
    }

    #[test]
    fn reminders_while_active_and_unacknowledged() {
        let t0 = Instant::now();
        let mut e = Engine::new(&cfg(), t0);
        let s = 1_000_000_000i64;
        e.message("interlock/permits", b"{}", t0, UtcNanos(0));
        e.message(
            "alarms/dew_point",
            &alarm("active", "", None),
            t0,
            UtcNanos(0),
        );
        assert!(e.tick(t0, UtcNanos(599 * s)).is_empty());
        let r = e.tick(t0, UtcNanos(600 * s));
        assert_eq!(kinds(&r), [Kind::Reminder]);
        assert!(
            r[0].summary.starts_with("dew_point (10 min"),
            "{}",
            r[0].summary
        );
        assert!(e.tick(t0, UtcNanos(601 * s)).is_empty());
        assert_eq!(kinds(&e.tick(t0, UtcNanos(1200 * s))), [Kind::Reminder]);
        // Acknowledged: no more reminders.
        e.message(
            "alarms/dew_point",
            &alarm("acknowledged", "", Some("bo")),
            t0,
            UtcNanos(1300 * s),
        );
        assert!(e.tick(t0, UtcNanos(5000 * s)).is_empty());
    }

    #[test]
    fn watchdog_on_the_interlock_services_and_broker() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let w = UtcNanos(0);
        let mut e = Engine::new(&cfg(), t0);
        e.message("interlock/permits", b"{}", at(0), w);
        assert!(e.tick(at(59), w).is_empty());
        let n = e.tick(at(60), w);
        assert_eq!(kinds(&n), [Kind::Watchdog]);
        assert!(
            n[0].summary.contains("published nothing for 60 s"),
            "{}",
            n[0].summary
        );
        assert!(e.tick(at(120), w).is_empty(), "told once");
        assert_eq!(
            kinds(&e.message("interlock/permits", b"{}", at(121), w)),
            [Kind::Back]
        );
        // Offline (last will): after the grace, once; a quick restart is not told.
        e.message("interlock/online", b"false", at(130), w);
        e.message("interlock/online", b"true", at(135), w);
        assert!(e.tick(at(170), w).is_empty());
        e.message("dcs/online", b"false", at(200), w);
        e.message("interlock/online", b"false", at(200), w);
        let n = e.tick(at(230), w);
        assert_eq!(kinds(&n), [Kind::Watchdog, Kind::Watchdog]);
        assert!(n.iter().any(|x| x.summary.contains("safety interlock")));
        // Offline told: no separate "silent" notice for the same outage.
        assert!(e.tick(at(400), w).is_empty());
        assert_eq!(
            kinds(&e.message("dcs/online", b"true", at(401), w)),
            [Kind::Back]
        );
        // A service not watched is not told.
        e.message("julabo/online", b"false", at(402), w);
        // The broker: away longer than the grace, told once, back told.
        e.broker(false, at(500), w);
        assert!(e.tick(at(520), w).is_empty());
        assert_eq!(kinds(&e.tick(at(530), w)), [Kind::Watchdog]);
        assert_eq!(kinds(&e.broker(true, at(540), w)), [Kind::Back]);
    }
}
