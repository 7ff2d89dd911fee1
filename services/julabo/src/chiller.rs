//! The chiller as the service sees it: the line (opened and reopened with backoff),
//! what the unit last said, field by field ([`Readings`]), the use of the line slot by
//! slot ([`Schedule`]: commands first), and the commands carried out on it.
//!
//! Liveness: STATUS is the probe, since every unit answers it. A query that gets no
//! valid reply leaves its field null with the reason and asks for a STATUS in the next
//! slot; the line counts as lost (closed, everything forgotten, reopened after the
//! backoff) at once when it closes, or when STATUS itself gets no valid reply
//! `failures_before_reconnect` times in a row. So a unit that lacks one query keeps
//! every other field and takes commands; a unit that stops answering is DISCONNECTED
//! within a few timeouts.

use std::time::Duration;

use dcs_shared::backoff::Backoff;
use dcs_shared::UtcNanos;
use tokio::time::Instant;

use crate::commands::JulaboCommand;
use crate::config::JulaboConfig;
use crate::fsm::State;
use crate::protocol::{parse_reply, Query, Value, Write};
use crate::readings::{Failure, Field, Readings, CYCLE};
use crate::schedule::{Schedule, Slot};
use crate::transport::{self, Endpoint, Link, LinkError};

/// Reads the nine queries behind `julabo/status` in one go, stopping at the first
/// failure (the bench and one-shot reads; the service polls slot by slot).
pub async fn read_all(link: &mut Link) -> Result<Readings, LinkError> {
    let mut r = Readings::default();
    for q in CYCLE {
        let at = UtcNanos::now();
        let reply = link.query(q).await?;
        let v = parse_reply(q, &reply).map_err(|e| LinkError::Garbled(q.text(), e))?;
        r.read(q, v, at);
    }
    Ok(r)
}

/// The chiller, its line and what is known about it.
pub struct Chiller {
    cfg: JulaboConfig,
    endpoint: Endpoint,
    link: Option<Link>,
    /// What the unit last said; empty while the line is closed and right after it
    /// opens (never an older reading kept as current).
    pub readings: Readings,
    schedule: Schedule,
    /// Why the line is closed, for `error` while DISCONNECTED.
    line_error: Option<String>,
    status_failures: u32,
    /// The previous STATUS reported a rejected command and is being asked again.
    status_reread: bool,
    backoff: Backoff,
    next_open: Instant,
    /// The state last logged.
    logged: State,
    /// The line was open at least once since the start.
    ever_open: bool,
}

/// Failed opens before a chiller (or ser2net tunnel, or simulator) that never answered
/// since the start is worth a warning: starting together with it is not.
const STARTUP_ATTEMPTS: u32 = 4;

impl Chiller {
    /// A chiller not yet connected. `cfg` must have been validated.
    pub fn new(cfg: JulaboConfig) -> Result<Chiller, String> {
        let endpoint = Endpoint::parse(&cfg.port)?;
        let interval = Duration::from_secs_f64(cfg.timing.poll_interval_secs);
        Ok(Chiller {
            cfg,
            endpoint,
            link: None,
            readings: Readings::default(),
            schedule: Schedule::new(interval, Instant::now()),
            line_error: None,
            status_failures: 0,
            status_reread: false,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            next_open: Instant::now(),
            logged: State::Disconnected,
            ever_open: false,
        })
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.readings.state(self.link.is_some())
    }

    /// The next use of the line (see [`Schedule`]).
    pub fn next_slot(&self, command_waiting: bool) -> Slot {
        let reopen = self.link.is_none().then_some(self.next_open);
        self.schedule.next(Instant::now(), command_waiting, reopen)
    }

    /// Uses one slot chosen by [`Chiller::next_slot`] (opening the line or asking one
    /// query). Returns whether `julabo/status` is to be published now: a cycle ended,
    /// a STATUS wanted by a command was read, or the line was lost. (Not after each
    /// query: a half-read cycle would publish nulls for the fields not read yet.)
    pub async fn step(&mut self, slot: Slot) -> bool {
        let was_open = self.link.is_some();
        let mut publish = false;
        match slot {
            Slot::Open => {
                self.open().await;
            }
            Slot::Query(q) => {
                publish = self.schedule.done(q, Instant::now());
                if self.ask(q).await.is_err_and(|_| self.link.is_none()) {
                    publish = false;
                } else if publish && self.status_reread {
                    // The STATUS read said only "rejected command": publish the next.
                    self.schedule.want_status(true);
                    publish = false;
                }
            }
            Slot::Command | Slot::Idle(_) => {}
        }
        self.note_state();
        publish || (was_open && self.link.is_none())
    }

    fn note_state(&mut self) -> State {
        let s = self.state();
        if s != self.logged {
            tracing::info!(
                from = self.logged.as_str(),
                to = s.as_str(),
                status = self.readings.status().map(|s| s.to_string()),
                "chiller state"
            );
            self.logged = s;
        }
        s
    }

    /// Opens the line. Returns whether it is open.
    async fn open(&mut self) -> bool {
        let t = &self.cfg.timing;
        match transport::open(&self.endpoint, &self.cfg.serial, Duration::from_secs(3)).await {
            Ok(port) => {
                tracing::info!(port = %self.cfg.port, "line open");
                self.ever_open = true;
                self.link = Some(
                    Link::new(
                        port,
                        Duration::from_millis(t.min_spacing_ms),
                        Duration::from_millis(t.reply_timeout_ms),
                    )
                    .with_line_speed(&self.cfg.serial),
                );
                // A reopened line starts with nothing known: the unit must answer again.
                self.readings.clear();
                self.status_failures = 0;
                self.status_reread = false;
                self.schedule.restart(Instant::now());
                true
            }
            Err(e) => {
                self.lost(e.to_string());
                false
            }
        }
    }

    /// Closes the line (if open) for `why`; it is reopened after the backoff.
    fn lost(&mut self, why: String) {
        let delay = self.backoff.next_delay();
        if !self.ever_open && self.backoff.attempts() < STARTUP_ATTEMPTS {
            tracing::info!(error = %why, retry_in = ?delay, "chiller not reachable yet");
        } else if !self.ever_open && self.backoff.attempts() == STARTUP_ATTEMPTS {
            tracing::warn!(error = %why, retry_in = ?delay, "the chiller has not answered since the start");
        } else if self.link.is_some() || self.line_error.as_deref() != Some(why.as_str()) {
            tracing::warn!(error = %why, retry_in = ?delay, "chiller disconnected");
        }
        self.link = None;
        self.readings.clear();
        self.line_error = Some(why);
        self.next_open = Instant::now() + delay;
    }

    /// Asks `q` and records the outcome in its field (see the module's liveness rule).
    async fn ask(&mut self, q: Query) -> Result<Value, LinkError> {
        let Some(link) = self.link.as_mut() else {
            return Err(LinkError::Closed);
        };
        let at = UtcNanos::now();
        let outcome = match link.query(q).await {
            Ok(reply) => parse_reply(q, &reply).map_err(|e| LinkError::Garbled(q.text(), e)),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(Value::Status(s)) if s.is_command_error() && !self.status_reread => {
                // Said once, about an earlier command (one of ours, or a query this unit
                // does not know): the unit's own state comes with the next STATUS.
                tracing::debug!(status = %s, "the chiller reports a rejected command");
                self.status_reread = true;
                self.schedule.want_status(false);
                Ok(Value::Status(s))
            }
            Ok(v) => {
                if q == Query::Status {
                    self.status_reread = false;
                    self.status_failures = 0;
                    self.backoff.reset();
                }
                if let Some(Field {
                    outcome: Err(f), ..
                }) = self.readings.read(q, v.clone(), at)
                {
                    tracing::info!(query = q.text(), was = f.reason, "chiller answers again");
                }
                Ok(v)
            }
            Err(e) if e.line_lost() => {
                self.lost(e.to_string());
                Err(e)
            }
            Err(e) => {
                let failure = Failure {
                    reason: e.to_string(),
                    garbled: matches!(e, LinkError::Garbled(..)),
                };
                let old = self.readings.failed(q, failure.clone(), at);
                if old.map(|f| f.outcome) != Some(Err(failure)) {
                    tracing::warn!(query = q.text(), error = %e, "chiller query failed");
                }
                if q == Query::Status {
                    self.status_failures += 1;
                    if self.status_failures >= self.cfg.timing.failures_before_reconnect {
                        self.lost(format!("{e} ({} times in a row)", self.status_failures));
                        return Err(e);
                    }
                }
                // Is the unit still there? STATUS in the next slot says.
                self.schedule.want_status(false);
                Err(e)
            }
        }
    }

    /// How long a query that got no reply is taken as "this unit does not answer it"
    /// by a command's checks: the poll going on (an interval and a cycle or two).
    fn unanswered_for(&self) -> Duration {
        let t = &self.cfg.timing;
        let cycle = Duration::from_millis(t.min_spacing_ms.max(250) + 50) * CYCLE.len() as u32;
        Duration::from_secs_f64(t.poll_interval_secs).max(cycle) + 2 * cycle
    }

    /// The unit's value of `q`, asked now: a command's safety check never relies on a
    /// polled value (the front panel may have changed it since). A query that got no
    /// reply in the poll going on is not asked again (it would only wait for another
    /// timeout) and gives its failure.
    async fn current(&mut self, q: Query) -> Result<Value, String> {
        if let Some(Field {
            outcome: Err(f), ..
        }) = self
            .readings
            .recent(q, UtcNanos::now(), self.unanswered_for())
        {
            if !f.garbled {
                return Err(f.reason.clone());
            }
        }
        self.ask(q).await.map_err(|e| e.to_string())
    }

    /// A set-point about to become the one the unit drives to (`index`, or the active
    /// one for a start) must be within the limits: one stored out of range from the
    /// front panel must not be used. When the unit does not say which set-point is
    /// active, all three must be.
    async fn check_setpoints(&mut self, index: Option<u8>) -> Result<(), String> {
        let (indices, unknown_active) = match index {
            Some(i) => (vec![i], None),
            None => match self.current(Query::ActiveSetpoint).await {
                Ok(Value::Int(i @ 0..=2)) => (vec![i as u8], None),
                _ if self.link.is_none() => {
                    return Err(format!(
                        "the chiller is not connected ({})",
                        self.line_error.as_deref().unwrap_or("line closed")
                    ))
                }
                Ok(_) => (vec![0, 1, 2], Some("an unexpected value".to_string())),
                Err(e) => (vec![0, 1, 2], Some(e)),
            },
        };
        let l = &self.cfg.limits;
        let (lo, hi) = (l.temp_min, l.temp_max);
        for i in indices {
            let t = match self.current(Query::Setpoint(i)).await {
                Ok(Value::Float(t)) => t,
                Ok(_) => return Err(format!("cannot check set-point {}", i + 1)),
                Err(e) => return Err(format!("cannot check set-point {}: {e}", i + 1)),
            };
            if !(lo..=hi).contains(&t) {
                let all = unknown_active.as_deref().map_or(String::new(), |why| {
                    format!(" (the chiller does not say which set-point is active: {why}; so all three must be within)")
                });
                return Err(format!(
                    "set-point {} is {t} degC, outside the configured limits {lo} .. {hi} degC{all}: set it with setWT first",
                    i + 1
                ));
            }
        }
        Ok(())
    }

    /// Reads a whole cycle now (`refresh`), reopening the line first for `reconnect`.
    /// Only a status actually read counts as done.
    async fn refresh(&mut self, reconnect: bool) -> Result<(), String> {
        if reconnect {
            tracing::info!("reconnect asked");
            self.link = None;
            self.readings.clear();
            self.backoff.reset();
        }
        if self.link.is_none() && !self.open().await {
            return Err(format!(
                "no status from the chiller: {}",
                self.line_error.as_deref().unwrap_or("not connected")
            ));
        }
        let started = Instant::now();
        let known = |r: &Result<Value, LinkError>| matches!(r, Ok(Value::Status(s)) if !s.is_command_error());
        let mut status_read = false;
        for q in CYCLE {
            if self.link.is_none() {
                break;
            }
            let r = self.ask(q).await;
            if q == Query::Status {
                status_read = known(&r);
            }
        }
        // The first query after opening may be lost (SPEC 5.1), and a rejected-command
        // report hides the state: once more.
        if !status_read && self.link.is_some() {
            status_read = known(&self.ask(Query::Status).await);
        }
        self.schedule.completed(started);
        if status_read && self.link.is_some() {
            return Ok(());
        }
        Err(format!(
            "no status from the chiller: {}",
            self.readings
                .problems()
                .or(self.line_error.clone())
                .unwrap_or("not connected".into())
        ))
    }

    /// Carries out a command; `Err` is the refusal sent back to the operator. A write
    /// is confirmed by reading the value back; start and stop by STATUS, read before
    /// the reply (which carries the new state). Other writes leave a STATUS owed to
    /// the next slot, published from there (see [`Chiller::step`],
    /// [`Chiller::status_owed`]).
    pub async fn execute(&mut self, cmd: &JulaboCommand) -> Result<(), String> {
        let result = self.carry_out(cmd).await;
        self.note_state();
        result
    }

    async fn carry_out(&mut self, cmd: &JulaboCommand) -> Result<(), String> {
        let l = &self.cfg.limits;
        if let JulaboCommand::SetWT { temp, .. } = cmd {
            if !(l.temp_min..=l.temp_max).contains(temp) {
                return Err(format!(
                    "temp {} is outside the configured limits {} .. {} degC",
                    dcs_shared::command::show_number(*temp),
                    l.temp_min,
                    l.temp_max
                ));
            }
        }
        let write = match *cmd {
            JulaboCommand::Refresh => return self.refresh(false).await,
            JulaboCommand::Reconnect => return self.refresh(true).await,
            JulaboCommand::Start => Write::Run(true),
            JulaboCommand::Stop => Write::Run(false),
            JulaboCommand::UseExt => Write::ExternalControl(true),
            JulaboCommand::UseInt => Write::ExternalControl(false),
            JulaboCommand::SetWT { setpoint, temp } => Write::Setpoint(setpoint - 1, temp),
            JulaboCommand::UseSP(n) => Write::ActiveSetpoint(n - 1),
            JulaboCommand::SetPress(p) => Write::PumpStage(p),
        };
        if self.link.is_none() {
            return Err(format!(
                "the chiller is not connected ({})",
                self.line_error.as_deref().unwrap_or("line closed")
            ));
        }
        if let Some(s) = self.readings.status().filter(|s| s.is_manual()) {
            return Err(format!(
                "the chiller is under manual control ({s}): switch it to remote on its front panel"
            ));
        }
        match *cmd {
            JulaboCommand::Start => self.check_setpoints(None).await?,
            JulaboCommand::UseSP(n) => self.check_setpoints(Some(n - 1)).await?,
            _ => {}
        }
        // A query the unit did not answer since the last STATUS (a probe is owed) may
        // have left a "rejected command" report for the next STATUS: take it now, so
        // it is not read as the unit refusing this write.
        if self.schedule.status_owed() {
            let _ = self.ask(Query::Status).await;
        }
        let Some(link) = self.link.as_mut() else {
            return Err(format!(
                "the chiller is not connected ({})",
                self.line_error.as_deref().unwrap_or("line closed")
            ));
        };
        let at = UtcNanos::now();
        let result = link.write(write).await;
        let outcome = match result {
            Ok(v) => {
                let confirmed_by_status = v.status.is_some();
                // What confirmed the write is the unit's current value: keep it.
                if let Some((q, reply)) = v.readback {
                    if let Ok(value) = parse_reply(q, &reply) {
                        self.readings.read(q, value, at);
                    }
                }
                if let Some(s) = v.status {
                    self.readings.read(Query::Status, Value::Status(s), at);
                }
                if matches!(write, Write::Run(_)) {
                    if confirmed_by_status {
                        return Ok(());
                    }
                    // Start and stop change the state: the reply carries it, read now.
                    let known = matches!(self.ask(Query::Status).await,
                        Ok(Value::Status(s)) if !s.is_command_error());
                    if known || self.link.is_none() {
                        return Ok(());
                    }
                }
                Ok(())
            }
            Err(e) if e.line_lost() => {
                let msg = e.to_string();
                self.lost(msg.clone());
                Err(msg)
            }
            Err(e) => Err(e.to_string()),
        };
        if self.link.is_some() {
            self.schedule.want_status(true);
        }
        outcome
    }

    /// Whether a STATUS is owed to a command and will be published once read.
    pub fn status_owed(&self) -> bool {
        self.schedule.publish_owed()
    }

    /// The `julabo/status` payload (see [`Readings::to_json`]); while DISCONNECTED
    /// every reading is null and `error` says why the line is down.
    pub fn status_json(&self) -> serde_json::Value {
        let state = self.state();
        let error = if state == State::Disconnected {
            self.line_error.clone()
        } else {
            self.readings.problems()
        };
        self.readings
            .to_json(state, error.as_deref(), self.cfg.power_pv)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// What the fake unit does: queries it does not know (no reply, and -08 once on
    /// the next STATUS, as a real unit), silence, and the commands it received.
    #[derive(Default)]
    struct Unit {
        unknown: HashSet<String>,
        silent: bool,
        running: bool,
        setpoints: [f64; 3],
        invalid: bool,
        got: Vec<String>,
    }

    /// A unit on an in-memory pipe, at 5 degC.
    fn fake_unit(unit: Arc<Mutex<Unit>>) -> Link {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 256];
            while let Ok(n) = theirs.read(&mut chunk).await {
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(i) = buf.iter().position(|&b| b == b'\r') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    let cmd = String::from_utf8_lossy(&line[..i]).into_owned();
                    let reply = {
                        let mut u = unit.lock().unwrap();
                        u.got.push(cmd.clone());
                        let word = cmd.split(' ').next().unwrap_or("").to_string();
                        if u.silent {
                            None
                        } else if u.unknown.contains(&word) {
                            u.invalid = true;
                            None
                        } else {
                            let arg = cmd.split(' ').nth(1).unwrap_or("");
                            match word.as_str() {
                                "STATUS" if std::mem::take(&mut u.invalid) => {
                                    Some("-08 INVALID COMMAND".to_string())
                                }
                                "STATUS" if u.running => Some("03 REMOTE START".into()),
                                "STATUS" => Some("02 REMOTE STOP".into()),
                                "IN_PV_00" => Some("5.10".into()),
                                "IN_PV_01" => Some("-40.0".into()),
                                "IN_PV_02" => Some("6.20".into()),
                                "IN_SP_00" => Some(format!("{:.2}", u.setpoints[0])),
                                "IN_SP_01" => Some(format!("{:.2}", u.setpoints[1])),
                                "IN_SP_02" => Some(format!("{:.2}", u.setpoints[2])),
                                "IN_MODE_01" | "IN_MODE_04" => Some("0".into()),
                                "IN_MODE_05" => Some(u8::from(u.running).to_string()),
                                "OUT_MODE_05" => {
                                    u.running = arg == "1";
                                    None
                                }
                                "OUT_SP_00" => {
                                    u.setpoints[0] = arg.parse().unwrap();
                                    None
                                }
                                _ => None,
                            }
                        }
                    };
                    if let Some(r) = reply {
                        if theirs
                            .write_all(format!("{r}\r\n").as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Link::new(
            Box::new(ours),
            Duration::from_millis(250),
            Duration::from_secs(1),
        )
    }

    fn unit() -> Arc<Mutex<Unit>> {
        Arc::new(Mutex::new(Unit {
            running: true,
            setpoints: [5.0, 10.0, 15.0],
            ..Unit::default()
        }))
    }

    fn chiller(u: &Arc<Mutex<Unit>>) -> Chiller {
        let cfg: JulaboConfig = serde_json::from_value(json!({
            "port": "tcp://127.0.0.1:1",
            "timing": {"failures_before_reconnect": 3},
        }))
        .unwrap();
        let mut c = Chiller::new(cfg).unwrap();
        c.link = Some(fake_unit(u.clone()));
        c.schedule.restart(Instant::now());
        c
    }

    /// Runs the schedule (no command) until it publishes with nothing left to do
    /// (a cycle ended, or the line closed); returns the status.
    async fn until_published(c: &mut Chiller) -> serde_json::Value {
        for _ in 0..100 {
            match c.next_slot(false) {
                Slot::Idle(t) => tokio::time::sleep_until(t).await,
                slot => {
                    if c.step(slot).await && matches!(c.next_slot(false), Slot::Idle(_)) {
                        return c.status_json();
                    }
                }
            }
        }
        panic!("never published");
    }

    const READINGS: [&str; 11] = [
        "status_code",
        "status_text",
        "internal_temp",
        "external_temp",
        "setpoint_1",
        "setpoint_2",
        "setpoint_3",
        "used_setpoint",
        "power",
        "ext_is_used",
        "running",
    ];

    #[tokio::test(start_paused = true)]
    async fn a_cycle_carries_when_it_was_measured() {
        let u = unit();
        let mut c = chiller(&u);
        let before = UtcNanos::now();
        let s = until_published(&mut c).await;
        assert_eq!(
            (&s["fsm_state"], &s["running"], &s["internal_temp"]),
            (&json!("ON"), &json!(true), &json!(5.1)),
            "{s}"
        );
        let at = s["measured_at"].as_i64().expect("measured_at, ns");
        assert!(
            at >= before.as_nanos() && at <= UtcNanos::now().as_nanos(),
            "{s}"
        );
        assert_eq!(c.status_json()["measured_at"], at);
        assert_eq!(u.lock().unwrap().got.len(), 9, "one query per field");
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_the_unit_does_not_know_blanks_only_its_field() {
        let u = unit();
        u.lock().unwrap().unknown.insert("IN_MODE_01".into());
        let mut c = chiller(&u);
        for _ in 0..3 {
            let s = until_published(&mut c).await;
            assert_eq!(s["used_setpoint"], serde_json::Value::Null, "{s}");
            assert_eq!(
                (
                    &s["fsm_state"],
                    &s["running"],
                    &s["setpoint_1"],
                    &s["ext_is_used"]
                ),
                (&json!("ON"), &json!(true), &json!(5.0), &json!(false)),
                "{s}"
            );
            assert_eq!(s["error"], "no reply to IN_MODE_01 within 1s", "{s}");
        }
        // The probe after the silence read the -08 and then the real status: the unit
        // never looked like it was in error, and the line stayed open.
        assert_eq!(c.state(), State::On);

        // Commands work, the start's set-point check included (the unit does not say
        // which set-point is active: all three are within the limits).
        u.lock().unwrap().running = false;
        c.execute(&JulaboCommand::SetWT {
            setpoint: 1,
            temp: -20.0,
        })
        .await
        .unwrap();
        c.execute(&JulaboCommand::Start).await.unwrap();
        let s = until_published(&mut c).await;
        assert_eq!(
            (&s["running"], &s["setpoint_1"]),
            (&json!(true), &json!(-20.0)),
            "{s}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_query_report_is_not_blamed_on_the_next_write() {
        let u = unit();
        u.lock().unwrap().unknown.insert("IN_MODE_01".into());
        let mut c = chiller(&u);
        until_published(&mut c).await;
        // Poll on until IN_MODE_01 has just gone unanswered: the unit now holds a -08
        // for the next STATUS, and a probe is owed.
        loop {
            let slot = c.next_slot(false);
            if let Slot::Idle(t) = slot {
                tokio::time::sleep_until(t).await;
                continue;
            }
            c.step(slot).await;
            if slot == Slot::Query(Query::ActiveSetpoint) {
                break;
            }
        }
        assert!(u.lock().unwrap().invalid);
        // A command takes the slot before the probe: the stop is carried out and
        // confirmed, not "refused".
        assert_eq!(c.execute(&JulaboCommand::Stop).await, Ok(()));
        assert!(!u.lock().unwrap().running);
        assert_eq!(c.state(), State::Off);
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_is_refused_when_a_setpoint_it_may_use_is_out_of_range() {
        let u = unit();
        u.lock().unwrap().unknown.insert("IN_MODE_01".into());
        u.lock().unwrap().setpoints[2] = 80.0;
        u.lock().unwrap().running = false;
        let mut c = chiller(&u);
        until_published(&mut c).await;
        let e = c.execute(&JulaboCommand::Start).await.unwrap_err();
        assert!(
            e.contains("set-point 3 is 80 degC") && e.contains("all three"),
            "{e}"
        );
        assert!(!u.lock().unwrap().running);
        assert!(!u.lock().unwrap().got.iter().any(|g| g.starts_with("OUT_")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_checks_the_setpoint_now_and_reads_back_at_once() {
        let u = unit();
        u.lock().unwrap().running = false;
        let mut c = chiller(&u);
        until_published(&mut c).await;
        u.lock().unwrap().got.clear();
        let t0 = Instant::now();
        c.execute(&JulaboCommand::Start).await.unwrap();
        // The active set-point and its value read now (never from the poll: the front
        // panel may have changed them), the write, and the STATUS that confirms it and
        // that the reply carries.
        assert_eq!(
            u.lock().unwrap().got,
            ["IN_MODE_01", "IN_SP_00", "OUT_MODE_05 1", "STATUS"]
        );
        assert!(
            t0.elapsed() < Duration::from_millis(1100),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!((c.state(), c.status_owed()), (State::On, false));
        assert_eq!(c.status_json()["running"], true);

        // Other writes reply after the read-back; their STATUS is owed and published.
        c.execute(&JulaboCommand::SetWT {
            setpoint: 1,
            temp: 7.0,
        })
        .await
        .unwrap();
        assert_eq!(c.status_json()["setpoint_1"], 7.0);
        assert!(c.status_owed());
        assert_eq!(c.next_slot(false), Slot::Query(Query::Status));
        assert!(c.step(Slot::Query(Query::Status)).await);
        assert!(!c.status_owed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_unit_is_disconnected_after_status_fails_three_times() {
        let u = unit();
        let mut c = chiller(&u);
        until_published(&mut c).await;
        u.lock().unwrap().silent = true;
        if let Slot::Idle(t) = c.next_slot(false) {
            tokio::time::sleep_until(t).await;
        }
        let t0 = Instant::now();
        let s = until_published(&mut c).await;
        assert_eq!(s["fsm_state"], "DISCONNECTED", "{s}");
        for k in READINGS.iter().chain(&["measured_at"]) {
            assert!(s[k].is_null(), "{k} after the unit went silent: {s}");
        }
        assert!(
            s["error"].as_str().unwrap().contains("3 times in a row"),
            "{s}"
        );
        // The cycle's STATUS and two probes, 1 s each plus spacing: not three cycles.
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_without_reply_shows_unknown_not_the_last_one() {
        let u = unit();
        let mut c = chiller(&u);
        until_published(&mut c).await;
        u.lock().unwrap().unknown.insert("STATUS".into());
        // First failure: the status is unknown, not ON any more.
        loop {
            let slot = c.next_slot(false);
            if let Slot::Idle(t) = slot {
                tokio::time::sleep_until(t).await;
                continue;
            }
            c.step(slot).await;
            if c.readings.status().is_none() {
                break;
            }
        }
        let s = c.status_json();
        assert_eq!(
            (&s["fsm_state"], &s["running"]),
            (&json!("CONNECTED"), &json!(null)),
            "{s}"
        );
        assert_eq!(s["internal_temp"], 5.1, "the other fields stay");
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_the_unit_does_not_answer_is_refused_and_probed() {
        let u = unit();
        let mut c = chiller(&u);
        until_published(&mut c).await;
        u.lock().unwrap().silent = true;
        let e = c.execute(&JulaboCommand::Stop).await.unwrap_err();
        assert!(e.contains("no reply"), "{e}");
        assert_eq!(c.next_slot(false), Slot::Query(Query::Status));
        c.step(Slot::Query(Query::Status)).await;
        assert!(c.status_json()["running"].is_null());
    }
}
