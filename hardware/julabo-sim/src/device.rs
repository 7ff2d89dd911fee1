//! The simulated circulator: command handling, status codes, timing and a thermal
//! model. Pure: time is passed in, so every behaviour is unit-testable.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How the simulated unit is built.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// `VERSION` answer.
    pub version: String,
    /// Commands closer than this to the previous accepted one are dropped.
    pub min_spacing_ms: u64,
    /// Which of `IN_PV_01`/`IN_PV_02` is the heating/cooling power (the other is the
    /// external Pt100); it depends on the model.
    pub power_pv: u8,
    /// Time constant of the bath towards its set-point, seconds.
    pub tau_secs: f64,
    /// Room temperature the bath drifts to when stopped, degC.
    pub ambient: f64,
    /// Set-point range the unit accepts, degC.
    pub setpoint_min: f64,
    /// Upper end of that range.
    pub setpoint_max: f64,
    /// Start in remote control (status 02) rather than manual (00).
    pub remote: bool,
    /// Commands this model does not have (`IN_MODE_01` on some units and on lewis's
    /// emulator): no reply, and `-08 INVALID COMMAND` on the next STATUS.
    pub unsupported: Vec<String>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            version: "JULABO FP51-SL VERSION 1.0 (simulated)".into(),
            min_spacing_ms: 250,
            power_pv: 1,
            tau_secs: 60.0,
            ambient: 20.0,
            setpoint_min: -51.0,
            setpoint_max: 200.0,
            remote: true,
            unsupported: Vec::new(),
        }
    }
}

/// What a fault-injecting test has switched on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Faults {
    /// Answer nothing at all.
    pub silent: bool,
    /// Answer garbage instead of the reply.
    pub garbage: bool,
    /// A persistent alarm code (negative), reported by STATUS until cleared.
    pub alarm: Option<i8>,
}

/// Readable state, for the control interface and tests.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Status code STATUS would report now (without clearing anything).
    pub status: i8,
    /// Remote control on.
    pub remote: bool,
    /// Circulating.
    pub running: bool,
    /// Set-points 1..3.
    pub setpoints: [f64; 3],
    /// Active set-point, 0-based.
    pub active: u8,
    /// External Pt100 control.
    pub external: bool,
    /// Pump stage 1..4.
    pub pump: u8,
    /// Bath temperature.
    pub bath: f64,
    /// Heating (+) / cooling (-) power, %.
    pub power: f64,
    /// Commands accepted and dropped (too soon) so far.
    pub accepted: u64,
    /// Commands dropped because they came too soon.
    pub dropped: u64,
    /// Active faults.
    pub faults: Faults,
}

/// The unit.
#[derive(Debug)]
pub struct Device {
    cfg: DeviceConfig,
    remote: bool,
    running: bool,
    setpoints: [f64; 3],
    active: u8,
    external: bool,
    pump: u8,
    bath: f64,
    power: f64,
    /// Error of the last command, reported once by STATUS.
    last_error: Option<i8>,
    /// Active faults.
    pub faults: Faults,
    last_command: Option<Instant>,
    last_step: Instant,
    accepted: u64,
    dropped: u64,
}

fn status_text(code: i8) -> &'static str {
    match code {
        0 => "MANUAL STOP",
        1 => "MANUAL START",
        2 => "REMOTE STOP",
        3 => "REMOTE START",
        -1 => "LOW LEVEL",
        -2 => "COOLING UNIT",
        -3 => "EXCESS TEMP WARNING",
        -4 => "LOW TEMP WARNING",
        -5 => "WORKING SENSOR",
        -6 => "SENSOR DIFFERENCE",
        -7 => "I2C-BUS",
        -8 => "INVALID COMMAND",
        -9 => "NOT ALLOWED IN MODE",
        -10 => "VALUE TOO SMALL",
        -11 => "VALUE TOO LARGE",
        -12 => "TEMP MEASUREMENT",
        -13 => "VALUE EXCEEDS TEMP LIMITS",
        -14 => "TEMPERATURE/LEVEL ALARM",
        _ => "UNKNOWN",
    }
}

/// Whether `code` is an alarm the control interface may inject.
pub fn is_alarm(code: i8) -> bool {
    (-14..=-1).contains(&code)
}

impl Device {
    /// A unit at ambient temperature, stopped.
    pub fn new(cfg: DeviceConfig, now: Instant) -> Self {
        Device {
            remote: cfg.remote,
            running: false,
            setpoints: [20.0, 15.0, 10.0],
            active: 0,
            external: false,
            pump: 2,
            bath: cfg.ambient,
            power: 0.0,
            last_error: None,
            faults: Faults::default(),
            last_command: None,
            last_step: now,
            accepted: 0,
            dropped: 0,
            cfg,
        }
    }

    /// Switches between remote and manual control (the front-panel key).
    pub fn set_remote(&mut self, remote: bool) {
        self.remote = remote;
    }

    /// Sets set-point `index` (0..2) from the front panel: no remote mode, no spacing,
    /// only the unit's own range.
    pub fn panel_setpoint(&mut self, index: usize, t: f64) -> Result<(), &'static str> {
        if index > 2 {
            return Err("set-point must be 1..3");
        }
        if !(t.is_finite() && (self.cfg.setpoint_min..=self.cfg.setpoint_max).contains(&t)) {
            return Err("outside the unit's range");
        }
        self.setpoints[index] = t;
        Ok(())
    }

    fn mode_status(&self) -> i8 {
        match (self.remote, self.running) {
            (false, false) => 0,
            (false, true) => 1,
            (true, false) => 2,
            (true, true) => 3,
        }
    }

    /// State for the control interface, after advancing the model to `now`.
    pub fn snapshot(&mut self, now: Instant) -> Snapshot {
        self.step(now);
        Snapshot {
            status: self
                .faults
                .alarm
                .or(self.last_error)
                .unwrap_or(self.mode_status()),
            remote: self.remote,
            running: self.running,
            setpoints: self.setpoints,
            active: self.active,
            external: self.external,
            pump: self.pump,
            bath: self.bath,
            power: self.power,
            accepted: self.accepted,
            dropped: self.dropped,
            faults: self.faults.clone(),
        }
    }

    /// Advances the thermal model: first order towards the set-point when circulating,
    /// slowly towards ambient when stopped.
    fn step(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last_step).as_secs_f64();
        self.last_step = now;
        let (target, tau) = if self.running {
            (self.setpoints[usize::from(self.active)], self.cfg.tau_secs)
        } else {
            (self.cfg.ambient, self.cfg.tau_secs * 4.0)
        };
        self.bath += (target - self.bath) * (1.0 - (-dt / tau.max(0.1)).exp());
        self.power = if self.running {
            ((target - self.bath) * 10.0).clamp(-100.0, 100.0)
        } else {
            0.0
        };
    }

    /// Handles one command line (without terminator) received at `now`. Returns the
    /// reply line without terminator, or `None` when the unit stays silent (writes,
    /// dropped or unknown commands).
    pub fn handle(&mut self, line: &str, now: Instant) -> Option<String> {
        let line = line.trim();
        if line.is_empty() {
            return None;
        }
        let spacing = Duration::from_millis(self.cfg.min_spacing_ms);
        if self
            .last_command
            .is_some_and(|t| now.saturating_duration_since(t) < spacing)
        {
            self.dropped += 1;
            return None;
        }
        self.last_command = Some(now);
        self.accepted += 1;
        self.step(now);
        let upper = line.to_ascii_uppercase();
        let (cmd, arg) = match upper.split_once(char::is_whitespace) {
            Some((c, a)) => (c, Some(a.trim())),
            None => (upper.as_str(), None),
        };
        let t = |v: f64| Some(format!("{v:.2}"));
        let (pv1, pv2) = if self.cfg.power_pv == 2 {
            (self.bath + 0.5, self.power)
        } else {
            (self.power, self.bath + 0.5)
        };
        if self
            .cfg
            .unsupported
            .iter()
            .any(|u| u.eq_ignore_ascii_case(cmd))
        {
            self.last_error = Some(-8);
            return None;
        }
        match (cmd, arg) {
            ("VERSION", None) => Some(self.cfg.version.clone()),
            ("STATUS", None) => {
                let code = self
                    .faults
                    .alarm
                    .or(self.last_error.take())
                    .unwrap_or(self.mode_status());
                // Two digits after the sign: `-01 LOW LEVEL`, `03 REMOTE START`.
                let sign = if code < 0 { "-" } else { "" };
                Some(format!(
                    "{sign}{:02} {}",
                    code.unsigned_abs(),
                    status_text(code)
                ))
            }
            ("IN_PV_00", None) => t(self.bath),
            ("IN_PV_01", None) => t(pv1),
            ("IN_PV_02", None) => t(pv2),
            ("IN_SP_00", None) => t(self.setpoints[0]),
            ("IN_SP_01", None) => t(self.setpoints[1]),
            ("IN_SP_02", None) => t(self.setpoints[2]),
            ("IN_MODE_01", None) => Some(self.active.to_string()),
            ("IN_MODE_04", None) => Some(u8::from(self.external).to_string()),
            ("IN_MODE_05", None) => Some(u8::from(self.running).to_string()),
            (c, Some(a)) if c.starts_with("OUT_") => {
                if let Err(code) = self.write(c, a) {
                    self.last_error = Some(code);
                }
                None
            }
            _ => {
                self.last_error = Some(-8);
                None
            }
        }
    }

    fn write(&mut self, cmd: &str, arg: &str) -> Result<(), i8> {
        if !self.remote {
            return Err(-9);
        }
        let value: f64 = arg.parse().ok().filter(|v: &f64| v.is_finite()).ok_or(-8)?;
        let int = || -> Result<i64, i8> {
            if value.fract() == 0.0 {
                Ok(value as i64)
            } else {
                Err(-8)
            }
        };
        let range = |v: i64, lo: i64, hi: i64| -> Result<i64, i8> {
            match v {
                v if v < lo => Err(-10),
                v if v > hi => Err(-11),
                v => Ok(v),
            }
        };
        match cmd {
            "OUT_SP_00" | "OUT_SP_01" | "OUT_SP_02" => {
                if value < self.cfg.setpoint_min {
                    return Err(-10);
                }
                if value > self.cfg.setpoint_max {
                    return Err(-11);
                }
                let i = usize::from(cmd.as_bytes()[8] - b'0');
                self.setpoints[i] = value;
            }
            "OUT_SP_07" => self.pump = range(int()?, 1, 4)? as u8,
            "OUT_MODE_01" => self.active = range(int()?, 0, 2)? as u8,
            "OUT_MODE_04" => self.external = range(int()?, 0, 1)? == 1,
            "OUT_MODE_05" => self.running = range(int()?, 0, 1)? == 1,
            _ => return Err(-8),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (Device, Instant) {
        let now = Instant::now();
        (Device::new(DeviceConfig::default(), now), now)
    }

    /// Sends commands 300 ms apart, returning the replies.
    fn send(d: &mut Device, t: &mut Instant, lines: &[&str]) -> Vec<Option<String>> {
        lines
            .iter()
            .map(|l| {
                *t += Duration::from_millis(300);
                d.handle(l, *t)
            })
            .collect()
    }

    #[test]
    fn queries_answer_and_writes_are_silent() {
        let (mut d, mut t) = dev();
        let r = send(
            &mut d,
            &mut t,
            &["version", "STATUS", "out_sp_00 -10.5", "in_sp_00", "STATUS"],
        );
        assert!(r[0].as_deref().unwrap().contains("JULABO"));
        assert_eq!(r[1].as_deref(), Some("02 REMOTE STOP"));
        assert_eq!(r[2], None);
        assert_eq!(r[3].as_deref(), Some("-10.50"));
        assert_eq!(r[4].as_deref(), Some("02 REMOTE STOP"));
    }

    #[test]
    fn unsupported_queries_are_invalid_commands() {
        let now = Instant::now();
        let mut d = Device::new(
            DeviceConfig {
                unsupported: vec!["IN_MODE_01".into()],
                ..DeviceConfig::default()
            },
            now,
        );
        let mut t = now;
        let r = send(
            &mut d,
            &mut t,
            &["IN_MODE_01", "STATUS", "STATUS", "IN_MODE_04"],
        );
        assert_eq!(r[0], None);
        assert_eq!(r[1].as_deref(), Some("-08 INVALID COMMAND"));
        assert_eq!(r[2].as_deref(), Some("02 REMOTE STOP"));
        assert_eq!(r[3].as_deref(), Some("0"));
    }

    #[test]
    fn commands_too_close_are_dropped() {
        let (mut d, t) = dev();
        assert!(d.handle("STATUS", t).is_some());
        assert!(d.handle("STATUS", t + Duration::from_millis(100)).is_none());
        assert!(d.handle("STATUS", t + Duration::from_millis(260)).is_some());
        let s = d.snapshot(t);
        assert_eq!((s.accepted, s.dropped), (2, 1));
    }

    #[test]
    fn errors_are_reported_once() {
        let (mut d, mut t) = dev();
        let r = send(
            &mut d,
            &mut t,
            &[
                "BOGUS",
                "STATUS",
                "STATUS",
                "OUT_SP_07 9",
                "STATUS",
                "OUT_SP_00 -80",
                "STATUS",
            ],
        );
        assert_eq!(r[1].as_deref(), Some("-08 INVALID COMMAND"));
        assert_eq!(r[2].as_deref(), Some("02 REMOTE STOP"));
        assert_eq!(r[4].as_deref(), Some("-11 VALUE TOO LARGE"));
        assert_eq!(r[6].as_deref(), Some("-10 VALUE TOO SMALL"));
    }

    #[test]
    fn manual_mode_refuses_writes() {
        let (mut d, mut t) = dev();
        d.set_remote(false);
        let r = send(
            &mut d,
            &mut t,
            &["STATUS", "OUT_MODE_05 1", "STATUS", "IN_MODE_05"],
        );
        assert_eq!(r[0].as_deref(), Some("00 MANUAL STOP"));
        assert_eq!(r[2].as_deref(), Some("-09 NOT ALLOWED IN MODE"));
        assert_eq!(r[3].as_deref(), Some("0"));
    }

    #[test]
    fn alarm_persists_until_cleared() {
        let (mut d, mut t) = dev();
        d.faults.alarm = Some(-1);
        let r = send(&mut d, &mut t, &["STATUS", "STATUS"]);
        assert_eq!(
            r,
            vec![Some("-01 LOW LEVEL".into()), Some("-01 LOW LEVEL".into())]
        );
        d.faults.alarm = None;
        assert_eq!(
            send(&mut d, &mut t, &["STATUS"])[0].as_deref(),
            Some("02 REMOTE STOP")
        );
    }

    #[test]
    fn bath_follows_the_active_setpoint() {
        let (mut d, mut t) = dev();
        send(
            &mut d,
            &mut t,
            &["OUT_SP_01 -20", "OUT_MODE_01 1", "OUT_MODE_05 1"],
        );
        let before = d.snapshot(t).bath;
        t += Duration::from_secs(60);
        let s = d.snapshot(t);
        assert!(s.running && s.active == 1);
        assert!(s.bath < before - 20.0, "{} -> {}", before, s.bath);
        assert!(s.power < 0.0, "cooling");
        assert_eq!(
            send(&mut d, &mut t, &["STATUS"])[0].as_deref(),
            Some("03 REMOTE START")
        );
        // The configured mapping: PV_01 is the power on this model.
        let pv1: f64 = send(&mut d, &mut t, &["IN_PV_01"])[0]
            .as_deref()
            .unwrap()
            .parse()
            .unwrap();
        assert!(pv1 < 0.0);
    }
}
