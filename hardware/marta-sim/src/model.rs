//! The plant behind the registers: a chiller stage that cools, a CO2 loop that follows
//! its set-point with a first-order lag once started, pump and flow following their
//! set-points, the accumulator heater, pressures from the saturation curves, and the
//! PLC's alarm logic (latched bits, a trip that stops the plant, reset on the rising
//! edge of the reset bit). Pure: time comes in as seconds elapsed.

use std::collections::BTreeSet;

use marta::fsm::status;
use marta::registers::{decode_f32, encode_f32, Image, RegisterMap, Severity, Span};
use serde::{Deserialize, Serialize};

/// The plant's physical parameters (real time: the same scale as the other simulators).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlantConfig {
    /// Room temperature, degC: where everything drifts when stopped.
    pub ambient: f64,
    /// Time constant of the chiller stage, s.
    pub chiller_tau_secs: f64,
    /// Time constant of the CO2 loop towards its set-point, s.
    pub co2_tau_secs: f64,
    /// Coldest the chiller stage gets, degC (the CO2 loop stays a few degrees above).
    pub chiller_floor: f64,
    /// The set-point range the PLC accepts without an alarm, degC.
    pub setpoint_range: [f64; 2],
    /// How long the CO2 start bit may stay set without the chiller before the pump
    /// suction alarm trips, s.
    pub co2_without_chiller_secs: f64,
}

impl Default for PlantConfig {
    fn default() -> Self {
        PlantConfig {
            ambient: 20.0,
            chiller_tau_secs: 10.0,
            co2_tau_secs: 20.0,
            chiller_floor: -42.0,
            setpoint_range: [-35.0, 25.0],
            co2_without_chiller_secs: 2.0,
        }
    }
}

/// What the control port's `state` shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    /// Control word as written.
    pub control: u16,
    /// Status word.
    pub status: u16,
    /// Set-points as written.
    pub temperature_setpoint: f32,
    /// rpm.
    pub speed_setpoint: f32,
    /// g/s.
    pub flow_setpoint: f32,
    /// Chiller stage running.
    pub chiller_running: bool,
    /// CO2 loop running.
    pub co2_running: bool,
    /// Chiller stage temperature, degC.
    pub chiller_temp: f64,
    /// CO2 loop temperature, degC.
    pub co2_temp: f64,
    /// Latched alarm bits by name.
    pub alarms: Vec<String>,
    /// Emergency button pressed.
    pub emergency: bool,
}

/// CO2 saturation pressure, bar(a), from a Clausius-Clapeyron fit through -30 degC
/// (14.3 bar) and 20 degC (57.3 bar).
pub fn co2_pressure(t: f64) -> f64 {
    (10.80 - 1980.0 / (t + 273.15)).exp()
}

/// R452A saturation pressure, bar(a), fitted through -40 degC (1.3) and 40 degC (18).
pub fn r452a_pressure(t: f64) -> f64 {
    (10.55 - 2398.0 / (t + 273.15)).exp()
}

/// The plant.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: PlantConfig,
    map: RegisterMap,
    /// Registers as written by clients (control word, set-points).
    written: Image,
    chiller_t: f64,
    co2_t: f64,
    speed: f64,
    flow: f64,
    latched: BTreeSet<usize>,
    emergency: bool,
    reset_was: bool,
    co2_alone_secs: f64,
}

impl Model {
    /// A plant at rest at ambient, set-points 20 degC, 3000 rpm, 2 g/s.
    pub fn new(cfg: PlantConfig, map: RegisterMap) -> Self {
        let mut written = Image::default();
        let c = map.controls;
        for b in [c.start_chiller, c.start_co2, c.flow_active, c.alarm_reset] {
            written.fill(
                Span {
                    start: b.register,
                    count: 1,
                },
                &[0],
            );
        }
        for (r, v) in [
            (c.temperature_setpoint, 20.0),
            (c.speed_setpoint, 3000.0),
            (c.flow_setpoint, 2.0),
        ] {
            written.fill(Span { start: r, count: 2 }, &encode_f32(v, map.word_order));
        }
        let ambient = cfg.ambient;
        Model {
            cfg,
            map,
            written,
            chiller_t: ambient,
            co2_t: ambient,
            speed: 0.0,
            flow: 0.0,
            latched: BTreeSet::new(),
            emergency: false,
            reset_was: false,
            co2_alone_secs: 0.0,
        }
    }

    fn bit(&self, b: marta::registers::Bit) -> bool {
        self.written
            .word(b.register)
            .is_some_and(|w| w & b.mask() != 0)
    }

    fn float(&self, register: u16) -> f64 {
        let w = |r| self.written.word(r).unwrap_or(0);
        f64::from(decode_f32(
            [w(register), w(register + 1)],
            self.map.word_order,
        ))
    }

    fn alarm_index(&self, name: &str) -> Option<usize> {
        self.map.alarms.iter().position(|a| a.name == name)
    }

    /// A latched fault stops the plant (warnings do not).
    pub fn tripped(&self) -> bool {
        self.latched
            .iter()
            .any(|&i| self.map.alarms[i].severity != Severity::Warning)
    }

    fn chiller_running(&self) -> bool {
        self.bit(self.map.controls.start_chiller) && !self.tripped()
    }

    fn co2_running(&self) -> bool {
        self.bit(self.map.controls.start_co2) && self.chiller_running()
    }

    /// Latches the alarm bit `name` (the control port's `alarm NAME`).
    pub fn raise(&mut self, name: &str) -> Result<(), String> {
        let i = self
            .alarm_index(name)
            .ok_or_else(|| format!("no alarm bit `{name}` in the map"))?;
        self.latched.insert(i);
        Ok(())
    }

    /// Presses or releases the emergency button (alarm `EB_FS` while pressed).
    pub fn set_emergency(&mut self, pressed: bool) {
        self.emergency = pressed;
    }

    /// Conditions that keep raising their alarm while they hold.
    fn conditions(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.emergency {
            out.push("EB_FS");
        }
        let sp = self.float(self.map.controls.temperature_setpoint);
        let [lo, hi] = self.cfg.setpoint_range;
        if self.bit(self.map.controls.start_co2) {
            if sp < lo {
                out.push("TT01_CO2_LT_FS");
            } else if sp > hi {
                out.push("PT04_CO2_HP_FS");
            }
        }
        if self.co2_alone_secs >= self.cfg.co2_without_chiller_secs {
            out.push("SC01_CO2_FS");
        }
        out
    }

    /// Advances the plant by `dt` seconds.
    pub fn advance(&mut self, dt: f64) {
        let dt = dt.max(0.0);
        let c = self.map.controls;
        // Rising edge of the reset bit: clear what no longer holds.
        let reset = self.bit(c.alarm_reset);
        if reset && !self.reset_was {
            let holding: Vec<usize> = self
                .conditions()
                .iter()
                .filter_map(|n| self.alarm_index(n))
                .collect();
            self.latched.retain(|i| holding.contains(i));
        }
        self.reset_was = reset;
        if self.bit(c.start_co2) && !self.bit(c.start_chiller) {
            self.co2_alone_secs += dt;
        } else {
            self.co2_alone_secs = 0.0;
        }
        for n in self.conditions() {
            if let Some(i) = self.alarm_index(n) {
                self.latched.insert(i);
            }
        }
        let lag =
            |x: f64, target: f64, tau: f64| target + (x - target) * (-dt / tau.max(1e-3)).exp();
        let ambient = self.cfg.ambient;
        let chiller_target = if self.chiller_running() {
            self.cfg.chiller_floor
        } else {
            ambient
        };
        self.chiller_t = lag(self.chiller_t, chiller_target, self.cfg.chiller_tau_secs);
        let (co2_target, speed_target, flow_target) = if self.co2_running() {
            let sp = self.float(c.temperature_setpoint);
            // The loop cannot be colder than the stage that cools it.
            let t = sp.max(self.chiller_t + 3.0);
            let speed = self.float(c.speed_setpoint).clamp(0.0, 6000.0);
            let flow = self.float(c.flow_setpoint).clamp(0.0, 5.0);
            if self.bit(c.flow_active) {
                (t, flow / 5.0 * 6000.0, flow)
            } else {
                (t, speed, speed / 6000.0 * 5.0)
            }
        } else {
            (ambient, 0.0, 0.0)
        };
        self.co2_t = lag(self.co2_t, co2_target, self.cfg.co2_tau_secs);
        self.speed = lag(self.speed, speed_target, 1.0);
        self.flow = lag(self.flow, flow_target, 1.0);
    }

    /// A client wrote `words` from `register`; `Err` names a register that is not
    /// writable.
    pub fn write(&mut self, register: u16, words: &[u16]) -> Result<(), String> {
        let writable = self.map.writable();
        let regs = register..register.saturating_add(words.len() as u16);
        if words.is_empty() || regs.len() != words.len() {
            return Err(format!("{} registers from {register}", words.len()));
        }
        if let Some(r) = regs.clone().find(|r| !writable.contains(r)) {
            return Err(format!("register {r} is not writable"));
        }
        self.written.fill(
            Span {
                start: register,
                count: words.len() as u16,
            },
            words,
        );
        Ok(())
    }

    /// The status word.
    pub fn status(&self) -> u16 {
        if self.tripped() {
            status::ALARM
        } else if self.co2_running() {
            status::CO2_RUNNING
        } else {
            status::READY
        }
    }

    /// Every mapped register as a client reads it.
    pub fn image(&self) -> Image {
        let mut img = self.written.clone();
        let ord = self.map.word_order;
        let c = self.map.controls;
        let run_c = self.chiller_running();
        let run_co2 = self.co2_running();
        let (tc, t) = (self.chiller_t, self.co2_t);
        let ambient = self.cfg.ambient;
        let sp = self.float(c.temperature_setpoint);
        let heater = if run_co2 {
            ((t - tc) * 40.0).clamp(0.0, 3000.0)
        } else {
            0.0
        };
        let p_co2 = co2_pressure(t);
        let dp_pump = self.speed / 6000.0 * 3.0;
        let discharge = if run_c { ambient + 25.0 } else { ambient };
        // A value while `on`, 0 otherwise (valve openings, superheat, subcooling).
        let valve = |on: bool, v: f64| if on { v } else { 0.0 };
        for r in &self.map.readings {
            let v = match r.name.as_str() {
                "PT01_R452A" => r452a_pressure(discharge),
                "PT03_R452A" | "PT04_R452A" => r452a_pressure(tc),
                "PT01_CO2" | "PT04_CO2" => p_co2,
                "PT02_CO2" => p_co2 + dp_pump,
                "PT03_CO2" => p_co2 + dp_pump * 0.8,
                "PT05_CO2" | "PT06_CO2" => p_co2 + dp_pump * 0.3,
                "TT01_R452A" => discharge + 10.0,
                "TT02_R452A" => discharge - 5.0,
                "TT03_R452A" => tc + 5.0,
                "TT04_R452A" => tc + 8.0,
                "TT04_CO2" => t + heater / 100.0,
                n if n.starts_with("TT") && n.ends_with("_CO2") => t,
                "FT01_CO2" => self.flow,
                "SH01_R452A_calc" | "SH03_R452A_calc" => valve(run_c, 5.0),
                "ST01_R452A_calc" | "ST03_R452A_calc" => tc,
                n if n.starts_with("ST0") && n.ends_with("_CO2_calc") => t,
                n if n.starts_with("SC0") => valve(run_co2, (t - tc).max(0.0)),
                n if n.starts_with("DP0") => dp_pump * 0.2,
                "DP_EV3C_CO2_calc" => dp_pump * 0.1,
                "DT02_CO2_calc" | "DT03_CO2_calc" => valve(run_co2, 1.0),
                "EV1_valve_pos" => valve(run_c, 60.0),
                "EV2_valve_pos" => valve(run_c, 40.0),
                "EV3_valve_pos" | "EV3C_valve_pos" => valve(run_co2, 50.0),
                "LP_speed" => self.speed,
                "EH_power" => heater,
                "temperature_setpoint" | "TC04_TSP" => sp,
                "speed_setpoint" => self.float(c.speed_setpoint),
                "flow_setpoint" => self.float(c.flow_setpoint),
                _ => 0.0,
            };
            // Rounded as a PLC's analog input is: readings do not jitter in the last bit.
            let v = (v * 1000.0).round() / 1000.0;
            img.fill(
                Span {
                    start: r.register,
                    count: 2,
                },
                &encode_f32(v as f32, ord),
            );
        }
        for a in &self.map.alarms {
            if img.word(a.register).is_none() {
                img.fill(
                    Span {
                        start: a.register,
                        count: 1,
                    },
                    &[0],
                );
            }
        }
        for &i in &self.latched {
            let a = &self.map.alarms[i];
            let w = img.word(a.register).unwrap_or(0) | (1 << a.bit);
            img.fill(
                Span {
                    start: a.register,
                    count: 1,
                },
                &[w],
            );
        }
        img.fill(
            Span {
                start: self.map.status,
                count: 1,
            },
            &[self.status()],
        );
        img
    }

    /// For the control port.
    pub fn snapshot(&self) -> Snapshot {
        let c = self.map.controls;
        Snapshot {
            control: self.written.word(c.start_chiller.register).unwrap_or(0),
            status: self.status(),
            temperature_setpoint: self.float(c.temperature_setpoint) as f32,
            speed_setpoint: self.float(c.speed_setpoint) as f32,
            flow_setpoint: self.float(c.flow_setpoint) as f32,
            chiller_running: self.chiller_running(),
            co2_running: self.co2_running(),
            chiller_temp: self.chiller_t,
            co2_temp: self.co2_t,
            alarms: self
                .latched
                .iter()
                .map(|&i| self.map.alarms[i].name.clone())
                .collect(),
            emergency: self.emergency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        let text = include_str!("../../../deploy/marta-registers.yaml");
        let map = serde_yaml::from_str::<marta::registers::MapFile>(text)
            .unwrap()
            .check()
            .unwrap();
        Model::new(PlantConfig::default(), map)
    }

    fn run(m: &mut Model, secs: f64) {
        for _ in 0..(secs * 10.0) as usize {
            m.advance(0.1);
        }
    }

    fn reading(m: &Model, name: &str) -> f64 {
        let map = &m.map;
        map.value(map.reading(name).unwrap(), &m.image()).unwrap()
    }

    #[test]
    fn the_loop_cools_to_its_setpoint_once_started_with_the_chiller() {
        let mut m = model();
        m.write(310, &encode_f32(-30.0, m.map.word_order)).unwrap();
        m.write(305, &[0b001]).unwrap();
        run(&mut m, 60.0);
        assert_eq!(m.status(), status::READY);
        assert!(reading(&m, "TT03_R452A") < -30.0);
        assert!(
            (reading(&m, "TT05_CO2") - 20.0).abs() < 0.01,
            "the loop is not started"
        );
        m.write(305, &[0b011]).unwrap();
        run(&mut m, 180.0);
        assert_eq!(m.status(), status::CO2_RUNNING);
        assert!((reading(&m, "TT05_CO2") + 30.0).abs() < 0.1);
        assert!((reading(&m, "LP_speed") - 3000.0).abs() < 1.0);
        assert!((reading(&m, "PT01_CO2") - co2_pressure(-30.0)).abs() < 0.1);
        assert!(
            (co2_pressure(-30.0) - 14.3).abs() < 0.3 && (co2_pressure(20.0) - 57.3).abs() < 0.5
        );
        assert!(reading(&m, "EH_power") > 0.0);
        // Flow control: the flow follows its set-point.
        m.write(305, &[0b111]).unwrap();
        run(&mut m, 10.0);
        assert!((reading(&m, "FT01_CO2") - 2.0).abs() < 0.01);
        assert!(m.snapshot().alarms.is_empty());
    }

    #[test]
    fn co2_without_the_chiller_trips_and_reset_needs_the_cause_gone() {
        let mut m = model();
        m.write(305, &[0b010]).unwrap();
        run(&mut m, 3.0);
        assert_eq!(m.status(), status::ALARM);
        assert_eq!(m.snapshot().alarms, ["SC01_CO2_FS"]);
        // Reset with the bit still set: the cause holds, the alarm stays.
        m.write(305, &[0b1010]).unwrap();
        m.advance(0.1);
        assert_eq!(m.status(), status::ALARM);
        // Start bits cleared, reset pulsed: clear.
        m.write(305, &[0]).unwrap();
        m.advance(0.1);
        m.write(305, &[0b1000]).unwrap();
        m.advance(0.1);
        assert_eq!(m.status(), status::READY);
    }

    #[test]
    fn a_trip_stops_the_plant_with_the_start_bits_still_set() {
        let mut m = model();
        m.write(305, &[0b011]).unwrap();
        run(&mut m, 5.0);
        assert_eq!(m.status(), status::CO2_RUNNING);
        m.set_emergency(true);
        m.advance(0.1);
        assert_eq!(m.status(), status::ALARM);
        assert!(!m.snapshot().chiller_running && !m.snapshot().co2_running);
        assert_eq!(m.snapshot().control, 0b011);
        // Out of range set-point while CO2 is started: its alarm too.
        m.write(310, &encode_f32(-40.0, m.map.word_order)).unwrap();
        m.advance(0.1);
        assert!(m.snapshot().alarms.contains(&"TT01_CO2_LT_FS".to_string()));
        // A warning alone does not trip.
        let mut w = model();
        w.raise("CP_HP_W").unwrap();
        assert_eq!(w.status(), status::READY);
        assert!(w.raise("NOPE").is_err());
    }

    #[test]
    fn only_control_registers_are_writable() {
        let mut m = model();
        assert!(m.write(305, &[1]).is_ok());
        assert!(m.write(310, &[0, 0]).is_ok());
        assert!(m.write(320, &[1]).is_err());
        assert!(m.write(100, &[1]).is_err());
        assert!(
            m.write(314, &[0, 0, 0]).is_err(),
            "316 is not a control register"
        );
    }
}
