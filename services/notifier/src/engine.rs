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
use crate::journal::{rfc3339, Entry};

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
    /// An operator shelved the alarm's notifications (ISA-18.2).
    Shelved,
    /// The shelve ended (expired, or unshelved by an operator).
    Unshelved,
    /// The daily message: all quiet, or what is open.
    Daily,
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
            Kind::Shelved => "SHELVED",
            Kind::Unshelved => "UNSHELVED",
            Kind::Daily => "DAILY",
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
    /// Actions whose result was told, by `do@at` (a retry round or a new breach adds
    /// entries with new instants; a result is told once).
    #[serde(default)]
    pub actions_told: Vec<String>,
    /// The alarm's severity (reminders and clearances go where its raise went).
    #[serde(default)]
    pub severity: Option<Severity>,
    /// UTC ns of the last message about it (reminders count from it).
    pub last_told_ns: i64,
    /// Shelved until (UTC ns): nothing is told of it meanwhile.
    #[serde(default)]
    pub shelved_until: Option<i64>,
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
    /// The alarms' memory changed since [`Engine::take_changed`].
    changed: bool,
    interlock_seen: Instant,
    interlock_silent: Absence,
    offline: BTreeMap<String, Absence>,
    broker: Absence,
    journal: Vec<Entry>,
    journal_seq: u64,
    /// This process's start (UTC ns): with the sequence, a journal id unique across
    /// restarts and clock steps.
    boot_ns: i64,
    daily_at: Option<chrono::NaiveTime>,
    /// The last day the daily message was due (`None` until the first tick).
    daily_done: Option<chrono::NaiveDate>,
    events_since_daily: u64,
}

/// A week, in ns: the longest shelve the notifier believes.
const WEEK_NS: i64 = 7 * 86_400 * 1_000_000_000;
/// How long after a shelve's end the interlock has to say it ended (it checks at every
/// evaluation, 250 ms) before the notifier stops holding that alarm's messages.
const GRACE_NS: i64 = 60 * 1_000_000_000;

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
            changed: false,
            interlock_seen: now,
            interlock_silent: Absence::default(),
            offline: BTreeMap::new(),
            broker: Absence::default(),
            journal: Vec::new(),
            journal_seq: 0,
            boot_ns: UtcNanos::now().as_nanos(),
            // Validated with the config.
            daily_at: cfg.timing.daily().ok().flatten(),
            daily_done: None,
            events_since_daily: 0,
        }
    }

    /// The journal entries made since the last call (alarm events, shelving, the
    /// watchdog; the service adds the deliveries).
    pub fn take_journal(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.journal)
    }

    /// Records `n` in the journal (`by`: the operator).
    fn journal(&mut self, n: &Notification, event: &str, by: Option<&str>) {
        self.journal_seq += 1;
        if !matches!(n.kind, Kind::Watchdog | Kind::Back) {
            self.events_since_daily += 1;
        }
        self.journal.push(Entry {
            id: format!("{}-e{}", self.boot_ns, self.journal_seq),
            at_ns: n.at_ns,
            time: rfc3339(n.at_ns),
            station: n.station.clone(),
            subject: n.subject_of.clone(),
            event: event.to_string(),
            by: by.map(String::from),
            severity: Some(n.severity.as_str().to_string()),
            text: n.summary.clone(),
            details: n.details.clone(),
        });
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

    /// Whether the memory changed since the last call (to save it only then).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
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

    /// A message from the broker (`retained`: delivered from the broker's store).
    pub fn message(
        &mut self,
        topic: &str,
        payload: &[u8],
        retained: bool,
        now: Instant,
        wall: UtcNanos,
    ) -> Vec<Notification> {
        let out = self.on_message(topic, payload, retained, now, wall);
        self.journal_watchdog(&out);
        out
    }

    /// The watchdog's notices go to the journal too (alarm events are journaled as
    /// they are decided, told or not).
    fn journal_watchdog(&mut self, out: &[Notification]) {
        for n in out {
            let event = match n.kind {
                Kind::Watchdog => "watchdog",
                Kind::Back => "back",
                _ => continue,
            };
            self.journal(n, event, None);
        }
    }

    fn on_message(
        &mut self,
        topic: &str,
        payload: &[u8],
        retained: bool,
        now: Instant,
        wall: UtcNanos,
    ) -> Vec<Notification> {
        let mut out = Vec::new();
        let mut levels = topic.split('/');
        let (first, second, rest) = (levels.next(), levels.next(), levels.next());
        // Alive is a permit signed now: not a retained copy, not an operator's command.
        if first == Some(self.interlock.as_str())
            && second == Some("permits")
            && rest.is_none()
            && !retained
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
        if payload.is_empty() {
            // The retained alarm was deleted (a rule removed): nothing to remind of.
            self.changed |= self.alarms.remove(rule).is_some();
            return Vec::new();
        }
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
        // The interlock's instant of the change, when it says (the journal's time).
        let wall = doc
            .get("time")
            .and_then(Json::as_i64)
            .filter(|t| t.abs_diff(wall.as_nanos()) < 60_000_000_000)
            .map_or(wall, UtcNanos);
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
        let shelve = doc.get("shelved").filter(|s| s.is_object());
        // At most a week ahead, whatever the payload says (the interlock bounds it more).
        let shelved_until = shelve
            .and_then(|s| s.get("until_ns"))
            .and_then(Json::as_i64)
            .map(|u| u.min(wall.as_nanos().saturating_add(WEEK_NS)));
        let details = serde_json::json!({
            "rule": rule,
            "message": doc.get("message"),
            "values": doc.get("values"),
            "actions": actions,
            "acknowledged_by": acked_by,
            "advice": doc.get("advice"),
            "first_seen": doc.get("first_seen"),
            "shelved": shelve,
        });
        let prev = self.alarms.get(rule).cloned();
        let mut mem = prev.clone().unwrap_or_default();
        // (notification, journal event, operator)
        let mut events: Vec<(Notification, &str, Option<String>)> = Vec::new();
        let was_open = prev.as_ref().is_some_and(|p| p.state != "cleared");
        let open = state != "cleared";
        let message = doc
            .get("message")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string();
        let key = |a: &Json| {
            format!(
                "{}@{}",
                a.get("do").and_then(Json::as_str).unwrap_or("?"),
                a.get("at").and_then(Json::as_str).unwrap_or("?")
            )
        };
        let settled_action = |a: &Json| {
            a.get("result")
                .and_then(Json::as_str)
                .is_some_and(|r| r != "pending")
        };
        // A new shelve (or a new end time) is told first: what follows is held.
        if shelved_until.is_some() && shelved_until != mem.shelved_until {
            let text = |k: &str| {
                shelve
                    .and_then(|s| s.get(k))
                    .and_then(Json::as_str)
                    .unwrap_or("?")
                    .to_string()
            };
            let by = text("by");
            let secs = shelved_until
                .unwrap_or(0)
                .saturating_sub(wall.as_nanos())
                .max(0)
                / 1_000_000_000;
            let span = if secs < 120 {
                format!("{secs} s")
            } else {
                format!("{} min", (secs + 30) / 60)
            };
            events.push((
                self.note(
                    Kind::Shelved,
                    severity,
                    rule,
                    format!(
                        "{rule}: notifications shelved by {by} for {span} (until {}): {}",
                        crate::render::when(shelved_until.unwrap_or(0)),
                        text("reason")
                    ),
                    details.clone(),
                    wall,
                ),
                "shelved",
                Some(by),
            ));
        }
        if open && !was_open {
            events.push((
                self.note(
                    Kind::Raised,
                    severity,
                    rule,
                    format!("{rule}: {message}"),
                    details.clone(),
                    wall,
                ),
                "raised",
                None,
            ));
            // Actions with a result are told with the raise; pending ones when settled.
            mem = AlarmMemory {
                actions_told: actions
                    .iter()
                    .filter(|a| settled_action(a))
                    .map(key)
                    .collect(),
                shelved_until: mem.shelved_until,
                ..AlarmMemory::default()
            };
        } else if open {
            // Actions not yet told are told once all of them have a result (one message
            // for a group taken together).
            let new: Vec<&Json> = actions
                .iter()
                .filter(|a| !mem.actions_told.contains(&key(a)))
                .collect();
            let settled = !new.is_empty() && new.iter().all(|a| settled_action(a));
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
                events.push((
                    self.note(
                        Kind::Escalated,
                        severity,
                        rule,
                        format!("{rule}: {}", done.join("; ")),
                        details.clone(),
                        wall,
                    ),
                    "escalated",
                    None,
                ));
                mem.actions_told.extend(new.iter().map(|a| key(a)));
            }
        }
        if let (Some(by), None) = (&acked_by, &mem.acknowledged_by) {
            if prev.is_some() || open {
                events.push((
                    self.note(
                        Kind::Acknowledged,
                        severity,
                        rule,
                        format!("{rule}: acknowledged by {by}"),
                        details.clone(),
                        wall,
                    ),
                    "acknowledged",
                    Some(by.clone()),
                ));
            }
        }
        if !open && was_open {
            events.push((
                self.note(
                    Kind::Cleared,
                    severity,
                    rule,
                    format!("{rule}: cleared"),
                    details.clone(),
                    wall,
                ),
                "cleared",
                None,
            ));
        }
        if shelved_until.is_none() && mem.shelved_until.is_some() {
            let ended = doc.get("unshelved").filter(|u| u.is_object());
            let by = ended
                .and_then(|u| u.get("by"))
                .and_then(Json::as_str)
                .map(String::from);
            let how = match &by {
                Some(b) => format!("unshelved by {b}"),
                None => "shelve expired".to_string(),
            };
            let now = match state.as_str() {
                "cleared" => "cleared".to_string(),
                s => format!(
                    "{s} ({} now)",
                    doc.get("condition").and_then(Json::as_str).unwrap_or("?")
                ),
            };
            events.push((
                self.note(
                    Kind::Unshelved,
                    severity,
                    rule,
                    format!("{rule}: {how}; notifications resume; the alarm is {now}"),
                    details,
                    wall,
                ),
                if by.is_some() {
                    "unshelved"
                } else {
                    "shelve_expired"
                },
                by,
            ));
        }
        // Every event is journaled; while shelved only the shelve's own are told. A
        // shelve the interlock has not ended a minute after its time (the interlock
        // gone?) holds nothing more.
        let held = shelved_until.is_some_and(|u| wall.as_nanos() < u.saturating_add(GRACE_NS));
        let mut out = Vec::new();
        for (n, event, by) in events {
            self.journal(&n, event, by.as_deref());
            if !held || n.kind == Kind::Shelved {
                out.push(n);
            } else {
                tracing::info!(rule, kind = ?n.kind, "shelved: not told");
            }
        }
        mem.state = state;
        mem.severity = Some(severity);
        mem.acknowledged_by = acked_by;
        mem.shelved_until = shelved_until;
        if !out.is_empty() {
            mem.last_told_ns = wall.as_nanos();
        }
        if prev.as_ref() != Some(&mem) {
            self.alarms.insert(rule.to_string(), mem);
            self.changed = true;
        }
        out
    }

    /// The notifier's own broker connection came or went.
    pub fn broker(&mut self, connected: bool, now: Instant, wall: UtcNanos) -> Vec<Notification> {
        let out = self.on_broker(connected, now, wall);
        self.journal_watchdog(&out);
        out
    }

    fn on_broker(&mut self, connected: bool, now: Instant, wall: UtcNanos) -> Vec<Notification> {
        if connected {
            // The interlock could not be heard meanwhile: its deadline moves by the
            // outage (not to now: a flapping connection must not hide a dead interlock).
            if let Some(since) = self.broker.since.take() {
                self.interlock_seen =
                    (self.interlock_seen + now.saturating_duration_since(since)).min(now);
            }
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

    /// Reminders, the watchdog's deadlines, the daily message.
    pub fn tick(&mut self, now: Instant, wall: UtcNanos) -> Vec<Notification> {
        let mut out = self.on_tick(now, wall);
        self.journal_watchdog(&out);
        out.extend(self.daily(wall));
        out
    }

    /// The daily message once `daily_at` (local time) has passed today. A notifier
    /// started after it sends the next day's.
    fn daily(&mut self, wall: UtcNanos) -> Option<Notification> {
        let at = self.daily_at?;
        let local =
            chrono::DateTime::from_timestamp_nanos(wall.as_nanos()).with_timezone(&chrono::Local);
        let today = local.date_naive();
        let past = local.time() >= at;
        let Some(done) = self.daily_done else {
            self.daily_done = Some(if past {
                today
            } else {
                today.pred_opt().unwrap_or(today)
            });
            return None;
        };
        if !past || done >= today {
            return None;
        }
        self.daily_done = Some(today);
        let open: Vec<String> = self
            .alarms
            .iter()
            .filter(|(_, m)| m.state != "cleared" || m.shelved_until.is_some())
            .map(|(r, m)| {
                let shelved = if m.shelved_until.is_some() {
                    ", shelved"
                } else {
                    ""
                };
                format!("{r} ({}{shelved})", m.state)
            })
            .collect();
        let away: Vec<String> = self
            .offline
            .iter()
            .filter(|(_, a)| a.told)
            .map(|(s, _)| format!("{s} offline"))
            .chain(
                self.interlock_silent
                    .told
                    .then(|| format!("{} silent", self.interlock)),
            )
            .chain(
                self.broker
                    .since
                    .is_some()
                    .then(|| "the MQTT broker unreachable".to_string()),
            )
            .collect();
        let events = std::mem::take(&mut self.events_since_daily);
        let summary = if open.is_empty() && away.is_empty() {
            format!("all quiet: no alarm open, the interlock is publishing; {events} alarm events since the last daily message")
        } else {
            let mut parts = Vec::new();
            if !open.is_empty() {
                parts.push(format!("{} open: {}", open.len(), open.join(", ")));
            }
            if !away.is_empty() {
                parts.push(away.join(", "));
            }
            format!(
                "not quiet: {}; {events} alarm events since the last daily message",
                parts.join("; ")
            )
        };
        Some(self.note(
            Kind::Daily,
            Severity::Info,
            "daily",
            summary,
            serde_json::json!({ "alarms": open, "away": away, "events": events }),
            wall,
        ))
    }

    fn on_tick(&mut self, now: Instant, wall: UtcNanos) -> Vec<Notification> {
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
                && m.shelved_until
                    .is_none_or(|u| wall.as_nanos() >= u.saturating_add(GRACE_NS))
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
            // As bad as the worst alarm reminded of: it goes where those raises went.
            let severity = due
                .iter()
                .filter_map(|r| self.alarms.get(r).and_then(|m| m.severity))
                .max()
                .unwrap_or(Severity::Critical);
            out.push(self.note(
                Kind::Reminder,
                severity,
                &about,
                summary,
                serde_json::json!({ "alarms": lines }),
                wall,
            ));
            for rule in &due {
                if let Some(m) = self.alarms.get_mut(rule) {
                    m.last_told_ns = now_ns;
                    self.changed = true;
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
        let raised = e.message(t, &alarm("active", SP, None), false, t0, w(0));
        assert_eq!(kinds(&raised), [Kind::Raised]);
        assert_eq!(raised[0].station, "box1");
        assert_eq!(raised[0].details["values"]["bath_temp"], 4.0);
        // What was told is to be saved; a republish changes nothing to save.
        assert!(e.take_changed());
        // The same state again (a republish): nothing.
        assert!(e
            .message(t, &alarm("active", SP, None), false, t0, w(1))
            .is_empty());
        // HV off taken, pending: not yet; confirmed with LV off: one message for both.
        assert!(e
            .message(
                t,
                &alarm("active", &format!("{SP},{HV}"), None),
                false,
                t0,
                w(2)
            )
            .is_empty());
        let esc = e.message(
            t,
            &alarm("active", &format!("{SP},{HV_OK},{LV_OK}"), None),
            false,
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
            kinds(&e.message(
                t,
                &alarm("acknowledged", &all, Some("ana")),
                false,
                t0,
                w(4)
            )),
            [Kind::Acknowledged]
        );
        assert!(e
            .message(
                t,
                &alarm("acknowledged", &all, Some("ana")),
                false,
                t0,
                w(5)
            )
            .is_empty());
        assert_eq!(
            kinds(&e.message(t, &alarm("cleared", &all, Some("ana")), false, t0, w(6))),
            [Kind::Cleared]
        );
        assert!(e
            .message(t, &alarm("cleared", &all, Some("ana")), false, t0, w(7))
            .is_empty());
        assert!(e.take_changed());
        assert!(!e.take_changed(), "nothing new since");
        // Raised again later: a new story.
        assert_eq!(
            kinds(&e.message(t, &alarm("active", "", None), false, t0, w(8))),
            [Kind::Raised]
        );
        // Summary, replies, commands and garbage are not alarms.
        for topic in ["alarms/summary", "alarms/reply", "alarms/cmd/ack"] {
            assert!(e
                .message(topic, &alarm("active", "", None), false, t0, w(9))
                .is_empty());
        }
        assert!(e
            .message("alarms/other", b"{garbage", false, t0, w(9))
            .is_empty());
    }

    #[test]
    fn every_action_result_is_told_once_even_when_pending_at_the_raise() {
        let t0 = Instant::now();
        let mut e = Engine::new(&cfg(), t0);
        let t = "alarms/dew_point";
        let a = |what: &str, at: &str, result: &str| {
            format!(r#"{{"do":"{what}","at":"{at}","result":"{result}"}}"#)
        };
        let sp = |r: &str| a("chiller_setpoint", "T1", r);
        let n = e.message(
            t,
            &alarm("active", &sp("pending"), None),
            false,
            t0,
            UtcNanos(1),
        );
        assert_eq!(kinds(&n), [Kind::Raised]);
        let failed = sp("failed: not confirmed by julabo within 60 s");
        let n = e.message(t, &alarm("active", &failed, None), false, t0, UtcNanos(2));
        assert_eq!(kinds(&n), [Kind::Escalated]);
        assert!(
            n[0].summary.contains("chiller_setpoint: failed"),
            "{}",
            n[0].summary
        );
        // A retry round (new instants): told when settled; the old ones are not again.
        let again = format!(
            "{failed},{}",
            a("chiller_setpoint", "T2", "confirmed after 1.0 s")
        );
        let n = e.message(t, &alarm("active", &again, None), false, t0, UtcNanos(3));
        assert_eq!(kinds(&n), [Kind::Escalated]);
        assert_eq!(
            n[0].summary.matches("chiller_setpoint").count(),
            1,
            "{}",
            n[0].summary
        );
        assert!(e
            .message(t, &alarm("active", &again, None), false, t0, UtcNanos(4))
            .is_empty());
        // A deleted alarm (empty retained payload) is forgotten: no reminders of it.
        e.message(t, b"", false, t0, UtcNanos(5));
        assert!(e.memory().is_empty());
    }

    #[test]
    fn a_restart_does_not_repeat_what_was_told() {
        let t0 = Instant::now();
        let mut e = Engine::new(&cfg(), t0);
        e.message(
            "alarms/dew_point",
            &alarm("active", SP, None),
            false,
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
                false,
                t0,
                UtcNanos(2)
            )
            .is_empty());
        // A cleared alarm seen for the first time is history, not news.
        assert!(again
            .message(
                "alarms/cooling",
                &alarm("cleared", "", Some("x")),
                false,
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
        e.message("interlock/permits", b"{}", false, t0, UtcNanos(0));
        e.message(
            "alarms/dew_point",
            &alarm("active", "", None),
            false,
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
            false,
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
        e.message("interlock/permits", b"{}", false, at(0), w);
        assert!(e.tick(at(59), w).is_empty());
        let n = e.tick(at(60), w);
        assert_eq!(kinds(&n), [Kind::Watchdog]);
        assert!(
            n[0].summary.contains("published nothing for 60 s"),
            "{}",
            n[0].summary
        );
        assert!(e.tick(at(120), w).is_empty(), "told once");
        // Neither a retained copy nor an operator's command says the interlock lives.
        assert!(e
            .message("interlock/permits", b"{}", true, at(120), w)
            .is_empty());
        assert!(e
            .message("interlock/cmd/refresh", b"", false, at(120), w)
            .is_empty());
        assert_eq!(
            kinds(&e.message("interlock/permits", b"{}", false, at(121), w)),
            [Kind::Back]
        );
        // Offline (last will): after the grace, once; a quick restart is not told.
        e.message("interlock/online", b"false", false, at(130), w);
        e.message("interlock/online", b"true", false, at(135), w);
        assert!(e.tick(at(170), w).is_empty());
        e.message("dcs/online", b"false", false, at(200), w);
        e.message("interlock/online", b"false", false, at(200), w);
        let n = e.tick(at(230), w);
        assert_eq!(kinds(&n), [Kind::Watchdog, Kind::Watchdog]);
        assert!(n.iter().any(|x| x.summary.contains("safety interlock")));
        // Offline told: no separate "silent" notice for the same outage.
        assert!(e.tick(at(400), w).is_empty());
        assert_eq!(
            kinds(&e.message("dcs/online", b"true", false, at(401), w)),
            [Kind::Back]
        );
        // A service not watched is not told.
        e.message("julabo/online", b"false", false, at(402), w);
        // The broker: away longer than the grace, told once, back told.
        e.broker(false, at(500), w);
        assert!(e.tick(at(520), w).is_empty());
        assert_eq!(kinds(&e.tick(at(530), w)), [Kind::Watchdog]);
        assert_eq!(kinds(&e.broker(true, at(540), w)), [Kind::Back]);
    }

    fn shelved(state: &str, shelve: &str, unshelved: &str) -> Vec<u8> {
        format!(
            r#"{{"rule":"dew_point","severity":"critical","state":"{state}","condition":"unsafe","message":"too wet","actions":[],"acknowledged_by":null,"shelved":{shelve},"unshelved":{unshelved}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn a_shelved_alarm_is_journaled_but_not_told_until_the_shelve_ends() {
        let t0 = Instant::now();
        let w = |s: i64| UtcNanos(1_000_000_000_000 + s * 1_000_000_000);
        let mut e = Engine::new(&cfg(), t0);
        let t = "alarms/dew_point";
        let shelve = format!(
            r#"{{"by":"ana","reason":"sensor swap","until_ns":{}}}"#,
            w(1300).as_nanos()
        );
        let told = e.message(t, &shelved("cleared", &shelve, "null"), false, t0, w(0));
        assert_eq!(kinds(&told), [Kind::Shelved]);
        assert!(
            told[0].summary.contains("shelved by ana for 22 min"),
            "{}",
            told[0].summary
        );
        // Raised while shelved: journaled, not told; no reminder either.
        assert!(e
            .message(t, &shelved("active", &shelve, "null"), false, t0, w(1))
            .is_empty());
        assert!(e.tick(t0, w(1200)).is_empty(), "no reminder while shelved");
        // Its time is over, the interlock has not said so yet: still nothing.
        assert!(e.tick(t0, w(1301)).is_empty());
        assert!(e.tick(t0, w(1340)).is_empty());
        // The shelve ends (expired): told, with the alarm's state now.
        let expired = r#"{"by":null,"expired":true,"at_ns":1}"#;
        let told = e.message(t, &shelved("active", "null", expired), false, t0, w(1341));
        assert_eq!(kinds(&told), [Kind::Unshelved]);
        assert!(
            told[0].summary.contains("shelve expired"),
            "{}",
            told[0].summary
        );
        assert!(
            told[0].summary.contains("active (unsafe now)"),
            "{}",
            told[0].summary
        );
        // Reminders resume, counted from the end of the shelve.
        assert!(e.tick(t0, w(1900)).is_empty());
        assert_eq!(kinds(&e.tick(t0, w(1941))), [Kind::Reminder]);
        let j: Vec<(String, Option<String>)> = e
            .take_journal()
            .into_iter()
            .map(|x| (x.event, x.by))
            .collect();
        assert_eq!(
            j,
            [
                ("shelved".to_string(), Some("ana".to_string())),
                ("raised".to_string(), None),
                ("shelve_expired".to_string(), None),
            ]
        );
        // Shelved again, then unshelved by someone: both told and journaled by name.
        let later = format!(
            r#"{{"by":"ana","reason":"night","until_ns":{}}}"#,
            w(9000).as_nanos()
        );
        let again = e.message(t, &shelved("active", &later, "null"), false, t0, w(2000));
        assert_eq!(kinds(&again), [Kind::Shelved]);
        let by_bo = r#"{"by":"bo","expired":false,"at_ns":1}"#;
        let told = e.message(t, &shelved("active", "null", by_bo), false, t0, w(2100));
        assert!(told[0].summary.contains("unshelved by bo"));
        let j = e.take_journal();
        assert_eq!(j[1].event, "unshelved");
        assert_eq!(j[1].by.as_deref(), Some("bo"));
    }

    #[test]
    fn the_daily_message_once_a_day_after_its_hour() {
        let mut c = cfg();
        c.timing.daily_at = Some("00:00".into());
        let t0 = Instant::now();
        let mut e = Engine::new(&c, t0);
        // Local midnight of some day, whatever the machine's zone.
        let day = chrono::NaiveDate::from_ymd_opt(2026, 12, 7).unwrap();
        let midnight = day
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_local_timezone(chrono::Local)
            .earliest()
            .unwrap()
            .timestamp_nanos_opt()
            .unwrap();
        let at = |h: i64| UtcNanos(midnight + h * 3_600_000_000_000);
        // Started after today's hour: the first is tomorrow's.
        assert!(e.tick(t0, at(1)).is_empty());
        assert!(e.tick(t0, at(23)).is_empty());
        e.message(
            "alarms/dew_point",
            &alarm("active", SP, None),
            false,
            t0,
            at(23),
        );
        let d: Vec<_> = e
            .tick(t0, at(25))
            .into_iter()
            .filter(|n| n.kind == Kind::Daily)
            .collect();
        assert_eq!(d.len(), 1);
        assert!(
            d[0].summary
                .starts_with("not quiet: 1 open: dew_point (active)"),
            "{}",
            d[0].summary
        );
        assert!(
            e.tick(t0, at(26)).iter().all(|n| n.kind != Kind::Daily),
            "once a day"
        );
        e.message(
            "alarms/dew_point",
            &alarm("cleared", SP, Some("ana")),
            false,
            t0,
            at(30),
        );
        let d: Vec<_> = e
            .tick(t0, at(49))
            .into_iter()
            .filter(|n| n.kind == Kind::Daily)
            .collect();
        assert!(d[0].summary.starts_with("all quiet"), "{}", d[0].summary);
        assert!(d[0].summary.contains("2 alarm events"), "{}", d[0].summary);
    }
}
