//! Physics of one mainframe channel (pure: no I/O, no clock; the caller passes `dt`).
//!
//! A [`Channel`] holds its settings, its power state and its output. [`Channel::step`]
//! advances it by `dt` seconds: ramps, load current, overcurrent and trip. The status
//! word follows SPEC 4.2 (see the `BIT_*` constants).

use serde::{Deserialize, Serialize};

/// Status bit 0: channel on.
pub const BIT_ON: u32 = 1 << 0;
/// Status bit 1: ramping up.
pub const BIT_RAMP_UP: u32 = 1 << 1;
/// Status bit 2: ramping down.
pub const BIT_RAMP_DOWN: u32 = 1 << 2;
/// Status bit 3: overcurrent (while it lasts).
pub const BIT_OVERCURRENT: u32 = 1 << 3;
/// Status bit 9: internal trip (latched until ClearAlarm).
pub const BIT_INTERNAL_TRIP: u32 = 1 << 9;
/// Status bit 11: unplugged.
pub const BIT_UNPLUGGED: u32 = 1 << 11;

/// A ramp this close to its target (V) has arrived.
const SNAP_V: f64 = 1e-9;

/// Ambient temperature of an LV board, degC.
pub const AMBIENT_C: f64 = 25.0;
/// LV board heating, degC per ampere of output.
pub const HEATING_C_PER_A: f64 = 2.0;

/// Which kind of board a channel sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Low voltage: volts and amperes, ramps given as durations.
    Lv,
    /// High voltage: volts and microamperes, ramps given as rates.
    Hv,
}

/// HV behaviour on switch-off (PV `PDwn`; index 0 = Kill, 1 = Ramp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PowerDown {
    /// Output drops to 0 at once.
    Kill,
    /// Output ramps down at `RDWn`.
    Ramp,
}

/// HV current monitor range (PV `ImRange`; index 0 = Low, 1 = High). Stored only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CurrentRange {
    /// 350 uA full scale.
    Low,
    /// 3.5 mA full scale.
    High,
}

/// The settings of a channel, as written through the PVs. Units: V, A (LV) or uA (HV),
/// s, V/s. A kind ignores the settings of the other kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// `V0Set`: voltage set-point.
    pub v0set: f64,
    /// `I0Set`: current limit (A for LV, uA for HV).
    pub i0set: f64,
    /// `Trip`: how long an overcurrent may last before the channel trips, s.
    pub trip: f64,
    /// `TripInt`: internal trip propagation mask (stored only).
    pub trip_int: f64,
    /// `TripExt`: external trip propagation mask (stored only).
    pub trip_ext: f64,
    /// `UNVThr` (LV): undervoltage threshold (stored only).
    pub unv_thr: f64,
    /// `OVVThr` (LV): overvoltage threshold (stored only).
    pub ovv_thr: f64,
    /// `RUpTime` (LV): ramp-up duration, s; 0 = instant.
    pub rup_time: f64,
    /// `RDwTime` (LV): ramp-down duration, s; 0 = instant.
    pub rdw_time: f64,
    /// `RUp` (HV): ramp-up rate, V/s; 0 = instant.
    pub rup: f64,
    /// `RDWn` (HV): ramp-down rate, V/s; 0 = instant.
    pub rdwn: f64,
    /// `PDwn` (HV): what switching off does.
    pub pdwn: PowerDown,
    /// `ImRange` (HV).
    pub im_range: CurrentRange,
}

impl Settings {
    /// The mainframe's power-on defaults.
    pub fn defaults(kind: Kind) -> Settings {
        Settings {
            v0set: 0.0,
            i0set: match kind {
                Kind::Lv => 5.0,
                Kind::Hv => 500.0,
            },
            trip: 1.0,
            trip_int: 0.0,
            trip_ext: 0.0,
            unv_thr: 0.0,
            ovv_thr: 16.0,
            rup_time: 1.0,
            rdw_time: 1.0,
            rup: 50.0,
            rdwn: 50.0,
            pdwn: PowerDown::Kill,
            im_range: CurrentRange::Low,
        }
    }

    /// The first numeric setting that is not finite and >= 0, by PV name.
    pub fn invalid_field(&self) -> Option<&'static str> {
        [
            ("V0Set", self.v0set),
            ("I0Set", self.i0set),
            ("Trip", self.trip),
            ("TripInt", self.trip_int),
            ("TripExt", self.trip_ext),
            ("UNVThr", self.unv_thr),
            ("OVVThr", self.ovv_thr),
            ("RUpTime", self.rup_time),
            ("RDwTime", self.rdw_time),
            ("RUp", self.rup),
            ("RDWn", self.rdwn),
        ]
        .into_iter()
        .find(|(_, v)| !valid_setting(*v))
        .map(|(name, _)| name)
    }
}

/// A numeric setting must be finite and non-negative.
pub fn valid_setting(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

/// What survives a restart of the simulator (the mainframe keeps it; see the state file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// All settings.
    pub settings: Settings,
    /// Power switch.
    pub pw: bool,
    /// Output voltage (without jitter).
    pub vmon: f64,
    /// Latched internal trip.
    pub tripped: bool,
    /// Unplugged (fault injection).
    pub unplugged: bool,
    /// Load override (ohm or MOhm); 0 = the configured default.
    pub load: f64,
}

/// A silicon sensor's leakage current, in microamps, as a bias scan sees it: rising
/// as the square root of the voltage up to full depletion (bulk generation current
/// grows with the depleted volume), then exponentially above a breakdown voltage
/// (e-fold every 10 V), capped at 1 A so a runaway stays finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sensor {
    /// Leakage at 100 V, uA.
    pub leak_ua: f64,
    /// Breakdown voltage, V (magnitude); `None`: none within range.
    pub breakdown_v: Option<f64>,
}

impl Sensor {
    /// Leakage current at `v` volts (magnitude), uA.
    pub fn current_ua(&self, v: f64) -> f64 {
        let v = v.abs();
        let bulk = self.leak_ua * (v / 100.0).sqrt();
        let avalanche = self.breakdown_v.filter(|b| v > *b).map_or(0.0, |b| {
            self.leak_ua * (((v - b) / 10.0).min(50.0).exp() - 1.0)
        });
        (bulk + avalanche).min(1e6)
    }
}

/// One mainframe channel.
#[derive(Debug, Clone)]
pub struct Channel {
    kind: Kind,
    settings: Settings,
    pw: bool,
    /// Output voltage without jitter: the quantity that ramps.
    vmon: f64,
    /// Noise added to the published VMon this tick.
    jitter: f64,
    imon: f64,
    /// How long the current overcurrent has lasted, s.
    overcurrent_s: f64,
    tripped: bool,
    unplugged: bool,
    load: f64,
    default_load: f64,
    /// The sensor behind an HV channel (leakage, breakdown), if modelled.
    sensor: Option<Sensor>,
    noise: f64,
    rng: u64,
    /// Ramp target seen by the previous step and VMon when it last changed: the LV ramp
    /// covers the whole change in RUpTime/RDwTime, whatever the steps in between.
    last_target: f64,
    ramp_start: f64,
}

impl Channel {
    /// A channel at power-on defaults. `default_load` is in ohm (LV) or MOhm (HV),
    /// `noise` the VMon jitter amplitude in V, `seed` makes each channel's jitter differ.
    pub fn new(kind: Kind, default_load: f64, noise: f64, seed: u64) -> Channel {
        Channel {
            kind,
            settings: Settings::defaults(kind),
            pw: false,
            vmon: 0.0,
            jitter: 0.0,
            imon: 0.0,
            overcurrent_s: 0.0,
            tripped: false,
            unplugged: false,
            load: 0.0,
            default_load,
            sensor: None,
            noise,
            // xorshift must not start at 0; spread small seeds apart.
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            last_target: 0.0,
            ramp_start: 0.0,
        }
    }

    /// LV or HV.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Current settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Settings to change; the caller validates values (see [`valid_setting`]).
    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }

    /// The power switch (`Pw`).
    pub fn pw(&self) -> bool {
        self.pw
    }

    /// Switches the channel on or off, as a `Pw` write. Returns false (and does
    /// nothing) when the channel is unplugged. Switching HV off with `PDwn = Kill`
    /// drops the output at once.
    pub fn set_pw(&mut self, on: bool) -> bool {
        if self.unplugged {
            return false;
        }
        if self.pw && !on && self.kind == Kind::Hv && self.settings.pdwn == PowerDown::Kill {
            self.vmon = 0.0;
        }
        self.pw = on;
        self.update_current();
        true
    }

    /// Published output voltage (with jitter).
    pub fn vmon(&self) -> f64 {
        if self.unplugged {
            return 0.0;
        }
        if self.pw {
            self.vmon + self.jitter
        } else {
            self.vmon
        }
    }

    /// Output current (A for LV, uA for HV).
    pub fn imon(&self) -> f64 {
        self.imon
    }

    /// LV board temperature, degC.
    pub fn temp(&self) -> f64 {
        AMBIENT_C + HEATING_C_PER_A * self.imon
    }

    /// Whether the internal trip is latched.
    pub fn tripped(&self) -> bool {
        self.tripped
    }

    /// Whether the channel is unplugged (fault injection).
    pub fn unplugged(&self) -> bool {
        self.unplugged
    }

    /// Unplugs (output 0, `Pw` writes ignored) or replugs the channel. A replugged
    /// channel that is still on ramps up again from 0.
    pub fn set_unplugged(&mut self, unplugged: bool) {
        self.unplugged = unplugged;
        if unplugged {
            self.vmon = 0.0;
            self.jitter = 0.0;
            self.overcurrent_s = 0.0;
        }
        self.update_current();
    }

    /// Load override (ohm for LV, MOhm for HV); 0 = the configured default.
    pub fn load(&self) -> f64 {
        self.load
    }

    /// Overrides the load; 0 restores the default. Non-finite or negative is ignored.
    pub fn set_load(&mut self, load: f64) {
        if valid_setting(load) {
            self.load = load;
            self.update_current();
        }
    }

    /// The CAEN status word (SPEC 4.2).
    pub fn status(&self) -> u32 {
        let latched = if self.tripped { BIT_INTERNAL_TRIP } else { 0 };
        if self.unplugged {
            return BIT_UNPLUGGED | latched;
        }
        let mut bits = latched;
        if self.pw {
            bits |= BIT_ON;
        }
        let target = self.target();
        if self.vmon < target {
            bits |= BIT_RAMP_UP;
        } else if self.vmon > target {
            bits |= BIT_RAMP_DOWN;
        }
        if self.overcurrent() {
            bits |= BIT_OVERCURRENT;
        }
        bits
    }

    /// Trips the channel now, as a sustained overcurrent would: it switches off (HV
    /// follows `PDwn`, LV drops at once) and bit 9 latches. Ignored while unplugged.
    pub fn force_trip(&mut self) {
        if self.unplugged {
            return;
        }
        self.pw = false;
        self.tripped = true;
        self.overcurrent_s = 0.0;
        if self.kind == Kind::Lv || self.settings.pdwn == PowerDown::Kill {
            self.vmon = 0.0;
        }
        self.update_current();
    }

    /// Clears the latched bits (ClearAlarm).
    pub fn clear_alarm(&mut self) {
        self.tripped = false;
        self.overcurrent_s = 0.0;
    }

    /// Advances the channel by `dt` seconds. `step(0.0)` completes instant ramps
    /// (ramp time or rate 0) and refreshes the outputs without moving time.
    pub fn step(&mut self, dt: f64) {
        let dt = if dt.is_finite() && dt > 0.0 { dt } else { 0.0 };
        if self.unplugged {
            self.vmon = 0.0;
            self.jitter = 0.0;
            self.imon = 0.0;
            self.overcurrent_s = 0.0;
            return;
        }
        let target = self.target();
        if target != self.last_target {
            self.last_target = target;
            self.ramp_start = self.vmon;
        }
        if self.vmon < target {
            self.vmon = match self.up_rate() {
                Some(rate) => (self.vmon + rate * dt).min(target),
                None => target,
            };
        } else if self.vmon > target {
            self.vmon = match self.down_rate() {
                Some(rate) => (self.vmon - rate * dt).max(target),
                None => target,
            };
        }
        // Rounding leaves a femtovolt ramp that would show bit 1/2 for one tick more.
        if (self.vmon - target).abs() < SNAP_V {
            self.vmon = target;
        }
        // New jitter per tick only: a write (`step(0.0)`) must not move VMon by itself.
        if dt > 0.0 {
            self.jitter = if self.pw && self.noise > 0.0 {
                self.noise * self.next_unit()
            } else {
                0.0
            };
        }
        self.update_current();
        if self.overcurrent() {
            self.overcurrent_s += dt;
            if self.pw && self.overcurrent_s > self.settings.trip {
                self.force_trip();
            }
        } else {
            self.overcurrent_s = 0.0;
        }
    }

    /// What should be saved to survive a restart.
    pub fn saved(&self) -> Saved {
        Saved {
            settings: self.settings.clone(),
            pw: self.pw,
            vmon: self.vmon,
            tripped: self.tripped,
            unplugged: self.unplugged,
            load: self.load,
        }
    }

    /// Restores a saved state. Refuses (returning the reason) values that are not
    /// finite and >= 0, leaving the channel untouched.
    pub fn restore(&mut self, saved: &Saved) -> Result<(), String> {
        if let Some(field) = saved.settings.invalid_field() {
            return Err(format!("{field} is not a finite number >= 0"));
        }
        if !valid_setting(saved.vmon) || !valid_setting(saved.load) {
            return Err("vmon or load is not a finite number >= 0".into());
        }
        self.settings = saved.settings.clone();
        self.pw = saved.pw;
        self.vmon = saved.vmon;
        self.tripped = saved.tripped;
        self.unplugged = saved.unplugged;
        self.load = saved.load;
        self.overcurrent_s = 0.0;
        self.jitter = 0.0;
        // A restored ramp continues as if it had started from here.
        self.last_target = self.target();
        self.ramp_start = self.vmon;
        self.update_current();
        Ok(())
    }

    /// Where the output is heading.
    fn target(&self) -> f64 {
        if self.pw && !self.unplugged {
            self.settings.v0set
        } else {
            0.0
        }
    }

    /// Ramp-up rate in V/s; `None` means instant.
    fn up_rate(&self) -> Option<f64> {
        match self.kind {
            Kind::Hv => positive(self.settings.rup),
            Kind::Lv => self.lv_rate(self.settings.rup_time),
        }
    }

    /// Ramp-down rate in V/s; `None` means instant.
    fn down_rate(&self) -> Option<f64> {
        match self.kind {
            Kind::Hv => positive(self.settings.rdwn),
            Kind::Lv => self.lv_rate(self.settings.rdw_time),
        }
    }

    /// LV ramps cover the change in `duration`: V0Set / duration from 0, and the larger
    /// of V0Set and the starting VMon when the set-point was lowered.
    fn lv_rate(&self, duration: f64) -> Option<f64> {
        let span = self.settings.v0set.max(self.ramp_start);
        positive(duration).and_then(|d| positive(span / d))
    }

    /// Puts a silicon sensor behind this (HV) channel: its current adds to the load's.
    pub fn with_sensor(mut self, sensor: Option<Sensor>) -> Channel {
        self.sensor = sensor.filter(|_| self.kind == Kind::Hv);
        self
    }

    fn load_value(&self) -> f64 {
        if self.load > 0.0 {
            self.load
        } else {
            self.default_load
        }
    }

    fn update_current(&mut self) {
        let r = self.load_value();
        self.imon = if self.unplugged || !r.is_finite() || r <= 0.0 {
            0.0
        } else {
            let v = self.vmon();
            v / r + self.sensor.map_or(0.0, |s| s.current_ua(v))
        };
    }

    fn overcurrent(&self) -> bool {
        self.imon > self.settings.i0set
    }

    /// Uniform in [-1, 1) from a xorshift64 generator: reproducible runs, no dependency.
    fn next_unit(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// `Some(v)` for a finite positive value, `None` (meaning "instant") otherwise.
fn positive(v: f64) -> Option<f64> {
    (v.is_finite() && v > 0.0).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DT: f64 = 0.05;

    fn hv() -> Channel {
        Channel::new(Kind::Hv, 100.0, 0.0, 1)
    }

    fn lv() -> Channel {
        Channel::new(Kind::Lv, 10.0, 0.0, 2)
    }

    /// Steps `secs` seconds in ticks of DT.
    fn run(ch: &mut Channel, secs: f64) {
        let n = (secs / DT).round() as usize;
        for _ in 0..n {
            ch.step(DT);
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn defaults() {
        let ch = hv();
        assert_eq!(ch.settings().i0set, 500.0);
        assert_eq!(lv().settings().i0set, 5.0);
        assert_eq!(ch.settings().pdwn, PowerDown::Kill);
        assert_eq!(ch.settings().im_range, CurrentRange::Low);
        assert_eq!(ch.status(), 0);
        assert_eq!(lv().temp(), 25.0);
    }

    #[test]
    fn hv_ramps_at_rup_then_is_steady() {
        let mut ch = hv();
        ch.settings_mut().v0set = 100.0;
        ch.settings_mut().rup = 50.0;
        assert!(ch.set_pw(true));
        assert_eq!(ch.status(), BIT_ON | BIT_RAMP_UP);
        run(&mut ch, 1.0);
        assert!(close(ch.vmon(), 50.0), "{}", ch.vmon());
        assert_eq!(ch.status(), 3);
        run(&mut ch, 1.0);
        assert!(close(ch.vmon(), 100.0));
        assert_eq!(ch.status(), 1);
        assert!(close(ch.imon(), 1.0), "100 V on 100 MOhm is 1 uA");
    }

    #[test]
    fn hv_follows_a_new_set_point_while_on() {
        let mut ch = hv();
        ch.settings_mut().v0set = 100.0;
        ch.settings_mut().rup = 0.0; // instant
        ch.set_pw(true);
        ch.step(0.0);
        assert_eq!(ch.vmon(), 100.0);
        ch.settings_mut().v0set = 50.0;
        ch.settings_mut().rdwn = 25.0;
        ch.step(DT);
        assert_eq!(ch.status(), BIT_ON | BIT_RAMP_DOWN);
        run(&mut ch, 2.0);
        assert_eq!(ch.vmon(), 50.0);
        assert_eq!(ch.status(), 1);
    }

    #[test]
    fn hv_off_with_ramp_ramps_down_with_bit_2() {
        let mut ch = hv();
        ch.settings_mut().v0set = 100.0;
        ch.settings_mut().rup = 1000.0;
        ch.settings_mut().rdwn = 100.0;
        ch.settings_mut().pdwn = PowerDown::Ramp;
        ch.set_pw(true);
        run(&mut ch, 0.2);
        assert_eq!(ch.status(), 1);
        ch.set_pw(false);
        assert_eq!(ch.status(), BIT_RAMP_DOWN);
        run(&mut ch, 0.5);
        assert!(close(ch.vmon(), 50.0), "{}", ch.vmon());
        assert_eq!(ch.status(), 4);
        run(&mut ch, 0.5);
        assert_eq!(ch.vmon(), 0.0);
        assert_eq!(ch.status(), 0);
    }

    #[test]
    fn hv_off_with_kill_drops_at_once() {
        let mut ch = hv();
        ch.settings_mut().v0set = 100.0;
        ch.settings_mut().rup = 1000.0;
        ch.set_pw(true);
        run(&mut ch, 0.2);
        ch.set_pw(false);
        assert_eq!(ch.vmon(), 0.0);
        assert_eq!(ch.imon(), 0.0);
        assert_eq!(ch.status(), 0);
    }

    #[test]
    fn lv_ramps_over_rup_time_and_down_over_rdw_time() {
        let mut ch = lv();
        ch.settings_mut().v0set = 12.0;
        ch.settings_mut().rup_time = 2.0;
        ch.settings_mut().rdw_time = 1.0;
        ch.set_pw(true);
        run(&mut ch, 1.0);
        assert!(close(ch.vmon(), 6.0), "{}", ch.vmon());
        assert_eq!(ch.status(), 3);
        run(&mut ch, 1.0);
        assert!(close(ch.vmon(), 12.0));
        assert_eq!(ch.status(), 1);
        assert!(close(ch.imon(), 1.2));
        assert!(close(ch.temp(), 27.4));
        ch.set_pw(false);
        run(&mut ch, 0.5);
        assert!(close(ch.vmon(), 6.0), "{}", ch.vmon());
        assert_eq!(ch.status(), 4);
        run(&mut ch, 0.5);
        assert_eq!(ch.vmon(), 0.0);
        assert_eq!(ch.status(), 0);
    }

    #[test]
    fn lv_lowered_to_zero_while_on_still_ramps_down() {
        let mut ch = lv();
        ch.settings_mut().v0set = 10.0;
        ch.settings_mut().rup_time = 0.0;
        ch.set_pw(true);
        ch.step(0.0);
        assert_eq!(ch.vmon(), 10.0);
        ch.settings_mut().v0set = 0.0;
        run(&mut ch, 0.5);
        assert!(close(ch.vmon(), 5.0), "{}", ch.vmon());
        run(&mut ch, 0.5);
        assert_eq!(ch.vmon(), 0.0);
        assert_eq!(ch.status(), 1);
    }

    #[test]
    fn lv_zero_ramp_times_are_instant() {
        let mut ch = lv();
        ch.settings_mut().v0set = 13.0;
        ch.settings_mut().rup_time = 0.0;
        ch.settings_mut().rdw_time = 0.0;
        ch.set_pw(true);
        ch.step(0.0);
        assert_eq!((ch.vmon(), ch.status()), (13.0, 1));
        ch.set_pw(false);
        ch.step(0.0);
        assert_eq!((ch.vmon(), ch.status()), (0.0, 0));
    }

    #[test]
    fn sustained_overcurrent_trips_and_latches_until_clear() {
        let mut ch = lv();
        ch.settings_mut().v0set = 10.0;
        ch.settings_mut().rup_time = 0.0;
        ch.settings_mut().i0set = 2.0;
        ch.settings_mut().trip = 0.5;
        ch.set_load(2.0); // 10 V / 2 ohm = 5 A > 2 A
        ch.set_pw(true);
        ch.step(0.0);
        assert_eq!(ch.status(), BIT_ON | BIT_OVERCURRENT);
        run(&mut ch, 0.4);
        assert!(ch.pw(), "not yet: overcurrent shorter than Trip");
        assert_eq!(ch.status(), 9);
        run(&mut ch, 0.2);
        assert!(!ch.pw());
        assert!(ch.tripped());
        assert_eq!(ch.vmon(), 0.0, "LV drops at once");
        assert_eq!(ch.status(), BIT_INTERNAL_TRIP);
        run(&mut ch, 1.0);
        assert_eq!(ch.status(), 512, "latched");
        ch.clear_alarm();
        assert_eq!(ch.status(), 0);
    }

    #[test]
    fn short_overcurrent_does_not_trip() {
        let mut ch = hv();
        ch.settings_mut().v0set = 100.0;
        ch.settings_mut().rup = 0.0;
        ch.settings_mut().i0set = 5.0;
        ch.settings_mut().trip = 1.0;
        ch.set_pw(true);
        ch.set_load(10.0); // 10 uA
        run(&mut ch, 0.5);
        assert_eq!(ch.status(), 9);
        ch.set_load(0.0); // back to 100 MOhm: 1 uA
        ch.step(DT);
        assert_eq!(ch.status(), 1);
        run(&mut ch, 0.7);
        assert_eq!(ch.status(), 1);
        assert!(!ch.tripped());
    }

    #[test]
    fn hv_trip_with_ramp_ramps_down_showing_overcurrent() {
        let mut ch = hv();
        ch.settings_mut().v0set = 100.0;
        ch.settings_mut().rup = 0.0;
        ch.settings_mut().rdwn = 100.0;
        ch.settings_mut().pdwn = PowerDown::Ramp;
        ch.settings_mut().i0set = 5.0;
        ch.settings_mut().trip = 0.1;
        ch.set_load(10.0);
        ch.set_pw(true);
        run(&mut ch, 0.2);
        assert!(ch.tripped());
        assert_eq!(ch.status(), 512 + 8 + 4);
        run(&mut ch, 1.0);
        assert_eq!(ch.status(), 512);
    }

    #[test]
    fn sim_trip_trips_now() {
        let mut ch = hv();
        ch.settings_mut().v0set = 100.0;
        ch.settings_mut().rup = 0.0;
        ch.set_pw(true);
        ch.step(DT);
        ch.force_trip();
        assert!(!ch.pw());
        assert_eq!(ch.vmon(), 0.0, "Kill");
        assert_eq!(ch.status(), 512);
        // Switching on again works but the latch stays until ClearAlarm.
        ch.set_pw(true);
        run(&mut ch, 0.1);
        assert_eq!(ch.status(), 513);
        ch.clear_alarm();
        assert_eq!(ch.status(), 1);
    }

    #[test]
    fn unplugged_ignores_pw_and_reads_zero() {
        let mut ch = lv();
        ch.settings_mut().v0set = 10.0;
        ch.settings_mut().rup_time = 0.0;
        ch.set_pw(true);
        ch.step(DT);
        ch.set_unplugged(true);
        assert_eq!((ch.vmon(), ch.imon()), (0.0, 0.0));
        assert_eq!(ch.status(), BIT_UNPLUGGED);
        assert!(!ch.set_pw(false), "ignored");
        assert!(ch.pw());
        run(&mut ch, 0.2);
        assert_eq!(ch.vmon(), 0.0);
        ch.set_unplugged(false);
        ch.step(DT);
        assert_eq!((ch.vmon(), ch.status()), (10.0, 1));
    }

    #[test]
    fn noise_jitters_vmon_only_when_on() {
        let mut ch = Channel::new(Kind::Hv, 100.0, 0.5, 7);
        ch.settings_mut().v0set = 100.0;
        ch.settings_mut().rup = 0.0;
        run(&mut ch, 0.2);
        assert_eq!(ch.vmon(), 0.0);
        ch.set_pw(true);
        let mut seen = Vec::new();
        for _ in 0..20 {
            ch.step(DT);
            let v = ch.vmon();
            assert!((v - 100.0).abs() <= 0.5, "{v}");
            seen.push(v);
        }
        assert!(seen.windows(2).any(|w| w[0] != w[1]));
        assert_eq!(ch.status(), 1, "jitter does not count as ramping");
    }

    #[test]
    fn save_and_restore() {
        let mut ch = hv();
        ch.settings_mut().v0set = 100.0;
        ch.settings_mut().rup = 100.0;
        ch.set_pw(true);
        run(&mut ch, 0.5);
        let saved = ch.saved();
        let mut again = hv();
        again.restore(&saved).unwrap();
        assert_eq!(again.saved(), saved);
        assert_eq!(again.status(), 3);
        run(&mut again, 0.5);
        assert!(close(again.vmon(), 100.0));
        let mut bad = saved.clone();
        bad.settings.i0set = f64::NAN;
        assert!(hv().restore(&bad).is_err());
    }

    #[test]
    fn a_sensor_leaks_as_the_root_of_the_bias_and_breaks_down_above_its_voltage() {
        let s = Sensor {
            leak_ua: 0.1,
            breakdown_v: Some(500.0),
        };
        assert_eq!(s.current_ua(0.0), 0.0);
        assert!((s.current_ua(100.0) - 0.1).abs() < 1e-12);
        assert!((s.current_ua(400.0) - 0.2).abs() < 1e-12);
        // 50 V past breakdown: e^5 - 1 more leakage units.
        let at = s.current_ua(550.0) - 0.1 * 5.5f64.sqrt();
        assert!((at - 0.1 * (5f64.exp() - 1.0)).abs() < 1e-9);
        assert!(s.current_ua(1e6).is_finite());
        // Added to the load's current on an HV channel.
        let mut ch = Channel::new(Kind::Hv, 100.0, 0.0, 1).with_sensor(Some(s));
        ch.vmon = 100.0;
        ch.update_current();
        assert!((ch.imon() - 1.1).abs() < 1e-9);
    }
}
