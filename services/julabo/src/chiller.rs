//! The chiller as the service sees it: the line (opened and reopened with backoff),
//! the last status read, the state machine, and the commands carried out on it.
//!
//! Freshness: a [`Reading`] carries the instant it was measured, and the chiller keeps
//! one only while the latest poll succeeded. A poll that fails (no reply, garbage, the
//! line closed) drops it, so `julabo/status` then carries nulls and the reason, never
//! the previous values as if they were new.

use std::time::Duration;

use dcs_shared::backoff::Backoff;
use dcs_shared::UtcNanos;
use serde_json::json;
use tokio::time::Instant;

use crate::commands::JulaboCommand;
use crate::config::JulaboConfig;
use crate::fsm::State;
use crate::protocol::{Query, Status, Write};
use crate::transport::{self, Endpoint, Link, LinkError};

/// One full read of the unit: the nine queries behind `julabo/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// When the read began (STATUS, the first of the nine queries, was about to be
    /// sent). Every value was measured at or after it, so an age counted from it is
    /// never too young; the whole read takes about 9 x `min_spacing_ms`.
    pub measured_at: UtcNanos,
    /// STATUS.
    pub status: Status,
    /// IN_PV_00.
    pub internal_temp: f64,
    /// The Pt100 of IN_PV_01/02.
    pub external_temp: f64,
    /// The power of IN_PV_01/02, %.
    pub power: f64,
    /// IN_SP_00..02.
    pub setpoints: [f64; 3],
    /// IN_MODE_01 + 1.
    pub used_setpoint: u8,
    /// IN_MODE_04.
    pub ext_is_used: bool,
}

/// Reads everything `julabo/status` carries: 9 commands.
pub async fn read_all(link: &mut Link, power_pv: u8) -> Result<Reading, LinkError> {
    let measured_at = UtcNanos::now();
    let status = link.status().await?;
    let internal_temp = link.float(Query::BathTemp).await?;
    let pv1 = link.float(Query::Pv1).await?;
    let pv2 = link.float(Query::Pv2).await?;
    let (power, external_temp) = if power_pv == 2 {
        (pv2, pv1)
    } else {
        (pv1, pv2)
    };
    let mut setpoints = [0.0; 3];
    for (i, sp) in setpoints.iter_mut().enumerate() {
        *sp = link.float(Query::Setpoint(i as u8)).await?;
    }
    let active = link.int(Query::ActiveSetpoint).await?;
    if !(0..=2).contains(&active) {
        return Err(LinkError::Garbled(
            "IN_MODE_01".into(),
            crate::protocol::ProtocolError(format!("active set-point {active} is not 0, 1 or 2")),
        ));
    }
    let ext = link.int(Query::ExternalControl).await?;
    Ok(Reading {
        measured_at,
        status,
        internal_temp,
        external_temp,
        power,
        setpoints,
        used_setpoint: active as u8 + 1,
        ext_is_used: ext == 1,
    })
}

/// The chiller, its line and what is known about it.
pub struct Chiller {
    cfg: JulaboConfig,
    endpoint: Endpoint,
    link: Option<Link>,
    /// Current state.
    pub state: State,
    /// The reading of the latest poll; `None` when that poll failed, before the first
    /// one, and while the line is closed (never an older reading kept as current).
    pub reading: Option<Reading>,
    /// Last problem, for the status message.
    pub error: Option<String>,
    failures: u32,
    backoff: Backoff,
    next_open: Instant,
}

impl Chiller {
    /// A chiller not yet connected. `cfg` must have been validated.
    pub fn new(cfg: JulaboConfig) -> Result<Chiller, String> {
        let endpoint = Endpoint::parse(&cfg.port)?;
        Ok(Chiller {
            cfg,
            endpoint,
            link: None,
            state: State::Disconnected,
            reading: None,
            error: None,
            failures: 0,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            next_open: Instant::now(),
        })
    }

    /// Opens the line if it is closed and the backoff allows it. Returns whether it is open.
    pub async fn ensure_open(&mut self) -> bool {
        if self.link.is_some() {
            return true;
        }
        if Instant::now() < self.next_open {
            return false;
        }
        let t = &self.cfg.timing;
        match transport::open(&self.endpoint, &self.cfg.serial, Duration::from_secs(3)).await {
            Ok(port) => {
                tracing::info!(port = %self.cfg.port, "line open");
                self.link = Some(
                    Link::new(
                        port,
                        Duration::from_millis(t.min_spacing_ms),
                        Duration::from_millis(t.reply_timeout_ms),
                    )
                    .with_line_speed(&self.cfg.serial),
                );
                self.state = State::Connected;
                self.failures = 0;
                true
            }
            Err(e) => {
                self.lost(e.to_string());
                false
            }
        }
    }

    /// Closes the line now; it is reopened on the next poll (after the backoff).
    pub fn close(&mut self, why: String) {
        self.link = None;
        self.lost(why);
    }

    fn lost(&mut self, why: String) {
        let delay = self.backoff.next_delay();
        if self.state != State::Disconnected || self.error.as_deref() != Some(why.as_str()) {
            tracing::warn!(error = %why, retry_in = ?delay, "chiller disconnected");
        }
        self.link = None;
        // A reopened line starts with nothing known: the unit must answer again first.
        self.reading = None;
        self.state = State::Disconnected;
        self.error = Some(why);
        self.next_open = Instant::now() + delay;
    }

    /// Reads the unit once and updates the state.
    pub async fn poll(&mut self) {
        if !self.ensure_open().await {
            return;
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        match read_all(link, self.cfg.power_pv).await {
            Ok(r) => {
                let state = State::from_status(&r.status);
                self.error = match (state, r.status.code) {
                    (State::Error, 0 | 1) => Some(format!(
                        "the chiller is under manual control ({}): switch it to remote on its front panel",
                        r.status
                    )),
                    (State::Error, _) => Some(format!("chiller alarm {}", r.status)),
                    _ => None,
                };
                if state != self.state {
                    tracing::info!(from = self.state.as_str(), to = state.as_str(), status = %r.status.text, "chiller state");
                }
                self.state = state;
                self.reading = Some(r);
                self.failures = 0;
                self.backoff.reset();
            }
            Err(e) => self.failed(e),
        }
    }

    fn failed(&mut self, e: LinkError) {
        self.failures += 1;
        // Whatever was read before is not what the unit says now: publishing it again
        // would make an old value look new (issue 15).
        self.reading = None;
        let why = e.to_string();
        if e.line_lost() || self.failures >= self.cfg.timing.failures_before_reconnect {
            let why = if e.line_lost() {
                why
            } else {
                format!("{why} ({} times in a row)", self.failures)
            };
            self.close(why);
            return;
        }
        tracing::warn!(error = %why, failures = self.failures, "chiller poll failed");
        let state = if matches!(e, LinkError::Garbled(..)) {
            State::Error
        } else {
            // The line is open but the status is unknown: not ON or OFF any more.
            State::Connected
        };
        if state != self.state {
            tracing::info!(
                from = self.state.as_str(),
                to = state.as_str(),
                "chiller state"
            );
        }
        self.state = state;
        self.error = Some(why);
    }

    /// Carries out a command; `Err` is the refusal sent back to the operator.
    pub async fn execute(&mut self, cmd: &JulaboCommand) -> Result<(), String> {
        if let JulaboCommand::SetWT { temp, .. } = cmd {
            let l = &self.cfg.limits;
            if !(l.temp_min..=l.temp_max).contains(temp) {
                return Err(format!(
                    "temp {} is outside the configured limits {} .. {} degC",
                    dcs_shared::command::show_number(*temp),
                    l.temp_min,
                    l.temp_max
                ));
            }
        }
        match cmd {
            JulaboCommand::Refresh | JulaboCommand::Reconnect => {
                if *cmd == JulaboCommand::Reconnect {
                    self.link = None;
                    self.reading = None;
                    self.state = State::Disconnected;
                    self.next_open = Instant::now();
                    self.backoff.reset();
                }
                self.poll().await;
                if self.state == State::Connected {
                    // The first query after opening may be lost (SPEC 5.1): once more.
                    self.poll().await;
                }
                // Only a status actually read counts as done.
                return match self.state {
                    State::Disconnected | State::Connected => Err(format!(
                        "no status from the chiller: {}",
                        self.error.as_deref().unwrap_or("not connected")
                    )),
                    _ => Ok(()),
                };
            }
            _ => {}
        }
        if self.link.is_none() {
            return Err(format!(
                "the chiller is not connected ({})",
                self.error.as_deref().unwrap_or("line closed")
            ));
        }
        if let Some(r) = &self.reading {
            if r.status.is_manual() {
                return Err(format!(
                    "the chiller is under manual control ({}): switch it to remote on its front panel",
                    r.status
                ));
            }
        }
        let write = match *cmd {
            JulaboCommand::Start => Write::Run(true),
            JulaboCommand::Stop => Write::Run(false),
            JulaboCommand::UseExt => Write::ExternalControl(true),
            JulaboCommand::UseInt => Write::ExternalControl(false),
            JulaboCommand::SetWT { setpoint, temp } => Write::Setpoint(setpoint - 1, temp),
            JulaboCommand::UseSP(n) => Write::ActiveSetpoint(n - 1),
            JulaboCommand::SetPress(p) => Write::PumpStage(p),
            JulaboCommand::Refresh | JulaboCommand::Reconnect => return Ok(()),
        };
        let Some(link) = self.link.as_mut() else {
            return Err("the chiller is not connected".into());
        };
        // A set-point stored out of range (from the front panel, say) must not become
        // the one the unit drives to.
        let activates = match *cmd {
            JulaboCommand::UseSP(n) => Some(Ok(n - 1)),
            JulaboCommand::Start => Some(
                link.int(Query::ActiveSetpoint)
                    .await
                    .map(|i| i.clamp(0, 2) as u8),
            ),
            _ => None,
        };
        if let Some(index) = activates {
            let checked = match index {
                Ok(i) => link.float(Query::Setpoint(i)).await.map(|t| (i, t)),
                Err(e) => Err(e),
            };
            let (index, t) = match checked {
                Ok(v) => v,
                Err(e) => return Err(self.command_failed(e)),
            };
            let l = &self.cfg.limits;
            if !(l.temp_min..=l.temp_max).contains(&t) {
                return Err(format!(
                    "set-point {} is {t} degC, outside the configured limits {} .. {} degC: set it with setWT first",
                    index + 1,
                    l.temp_min,
                    l.temp_max
                ));
            }
        }
        let result = link.write(write).await;
        match result {
            Ok(()) => {
                self.poll().await;
                Ok(())
            }
            Err(e) => Err(self.command_failed(e)),
        }
    }

    /// A command's conversation failed: the refusal text. A unit that does not answer
    /// (or a line that is gone) counts as a failed poll, so its last reading is not
    /// published again as current.
    fn command_failed(&mut self, e: LinkError) -> String {
        let msg = e.to_string();
        if e.line_lost() || matches!(e, LinkError::Timeout(..)) {
            self.failed(e);
        }
        msg
    }

    /// The `julabo/status` payload (the Python stack's fields, plus `status_text`,
    /// `running`, `error` and `measured_at`, nanoseconds since the Unix epoch, UTC, as
    /// the suite's `time` fields). Without a reading of the latest poll every reading
    /// field and `measured_at` are null and `error` says why. Published again without
    /// a new poll (after a refused command, say), it keeps the reading's `measured_at`.
    pub fn status_json(&self) -> serde_json::Value {
        let r = self
            .reading
            .as_ref()
            .filter(|_| self.state != State::Disconnected);
        json!({
            "status_code": r.map(|r| r.status.code),
            "status_text": r.map(|r| r.status.text.clone()),
            "internal_temp": r.map(|r| r.internal_temp),
            "external_temp": r.map(|r| r.external_temp),
            "setpoint_1": r.map(|r| r.setpoints[0]),
            "setpoint_2": r.map(|r| r.setpoints[1]),
            "setpoint_3": r.map(|r| r.setpoints[2]),
            "used_setpoint": r.map(|r| r.used_setpoint),
            "power": r.map(|r| r.power),
            "ext_is_used": r.map(|r| r.ext_is_used),
            "running": r.map(|r| r.status.code == 3 || r.status.code == 1),
            "fsm_state": self.state.as_str(),
            "error": self.error,
            "measured_at": r.map(|r| r.measured_at.as_nanos()),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A unit on an in-memory pipe, running at 5 degC; `silent` stops its replies.
    fn fake_unit(silent: Arc<AtomicBool>) -> Link {
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
                    let reply = match cmd.as_str() {
                        "STATUS" => "03 REMOTE START",
                        "IN_PV_00" => "5.10",
                        "IN_PV_01" => "-40.0",
                        "IN_PV_02" => "6.20",
                        "IN_SP_00" => "5.00",
                        "IN_SP_01" => "10.00",
                        "IN_SP_02" => "15.00",
                        "IN_MODE_01" | "IN_MODE_04" => "0",
                        _ => continue,
                    };
                    if !silent.load(Ordering::SeqCst)
                        && theirs
                            .write_all(format!("{reply}\r\n").as_bytes())
                            .await
                            .is_err()
                    {
                        return;
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

    fn chiller(failures_before_reconnect: u32, silent: Arc<AtomicBool>) -> Chiller {
        let cfg: JulaboConfig = serde_json::from_value(json!({
            "port": "tcp://127.0.0.1:1",
            "timing": {"failures_before_reconnect": failures_before_reconnect},
        }))
        .unwrap();
        let mut c = Chiller::new(cfg).unwrap();
        c.link = Some(fake_unit(silent));
        c.state = State::Connected;
        c
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
    async fn a_reading_carries_when_it_was_measured() {
        let mut c = chiller(3, Arc::default());
        let before = UtcNanos::now();
        c.poll().await;
        let s = c.status_json();
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
        // Published again without a poll: the same instant, not a new one.
        assert_eq!(c.status_json()["measured_at"], at);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_poll_publishes_nulls_and_why_never_the_last_reading() {
        let silent = Arc::new(AtomicBool::new(false));
        let mut c = chiller(3, silent.clone());
        c.poll().await;
        assert_eq!(c.status_json()["running"], true);

        silent.store(true, Ordering::SeqCst);
        c.poll().await;
        let s = c.status_json();
        for k in READINGS.iter().chain(&["measured_at"]) {
            assert!(s[k].is_null(), "{k} after a failed poll: {s}");
        }
        assert_eq!(s["fsm_state"], "CONNECTED", "{s}");
        assert_eq!(s["error"], "no reply to STATUS within 1s", "{s}");

        // The unit answers again: a new reading, measured after the old one.
        silent.store(false, Ordering::SeqCst);
        c.poll().await;
        let s = c.status_json();
        assert_eq!(
            (&s["running"], &s["error"]),
            (&json!(true), &serde_json::Value::Null)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reopened_line_shows_nothing_until_the_unit_answers() {
        let silent = Arc::new(AtomicBool::new(false));
        let mut c = chiller(1, silent.clone());
        c.poll().await;
        assert_eq!(c.status_json()["running"], true);
        silent.store(true, Ordering::SeqCst);
        c.poll().await; // one failure closes the line
        assert_eq!(c.state, State::Disconnected);
        // Reopened by hand (the backoff would reopen tcp://127.0.0.1:1 and fail).
        c.link = Some(fake_unit(silent.clone()));
        c.state = State::Connected;
        let s = c.status_json();
        for k in READINGS.iter().chain(&["measured_at"]) {
            assert!(s[k].is_null(), "{k} after a reopen: {s}");
        }
        assert!(s["error"].as_str().unwrap().contains("no reply"), "{s}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_the_unit_does_not_answer_drops_the_reading() {
        let silent = Arc::new(AtomicBool::new(false));
        let mut c = chiller(3, silent.clone());
        c.poll().await;
        silent.store(true, Ordering::SeqCst);
        let e = c.execute(&JulaboCommand::Start).await.unwrap_err();
        assert!(e.contains("no reply"), "{e}");
        assert!(c.status_json()["running"].is_null());
    }
}
