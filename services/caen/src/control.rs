//! The safety core of the CAEN service (SPEC 4.4), pure: the plant, a command, the
//! permit and the clock go in; the writes to make, or the refusal, come out. The
//! service carries the writes out over Channel Access and feeds back which failed;
//! nothing here awaits or touches the network, so every rule is tested without an
//! IOC, by property tests over random command and plant sequences.
//!
//! The rules:
//! - a channel takes no switch-on until every configured setting has been read back
//!   equal to its configured value since the last (re)connect or reload (`ready`);
//! - LV on needs the interlock's permit; HV on needs that channel's LV on (not
//!   ramping, no fault);
//! - set-points within the configured limits only;
//! - LV off on a channel whose HV is not down switches HV off first and switches LV
//!   off only once HV `VMon` is below the safe voltage and HV reports off; if that does
//!   not happen within the timeout, LV is left on and the command fails saying so;
//! - a channel in an LV-off sequence takes no other command until it is answered.

use std::time::{Duration, Instant};

use crate::ca::PutValue;
use crate::config::Safety;
use crate::fsm::{ChannelState, StatusWord};
use crate::plant::{Channel, Plant, Reading};
use crate::pv::{Param, Side};

/// A command's outcome: `Err` is the refusal or failure sent back to the operator.
pub type Outcome = Result<(), String>;

/// One Channel Access write.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// Channel index in the plant.
    pub channel: usize,
    /// Supply.
    pub side: Side,
    /// Parameter.
    pub param: Param,
    /// Value.
    pub value: PutValue,
}

impl Write {
    fn pw(channel: usize, side: Side, on: bool) -> Write {
        Write {
            channel,
            side,
            param: Param::Pw,
            value: PutValue::Label(if on { "On" } else { "Off" }.into()),
        }
    }

    /// Whether this write switches a supply on.
    pub fn switches_on(&self) -> bool {
        self.param == Param::Pw && self.value == PutValue::Label("On".into())
    }

    /// Whether this write switches a supply off.
    pub fn switches_off(&self) -> bool {
        self.param == Param::Pw && self.value == PutValue::Label("Off".into())
    }
}

/// The configured settings of a channel (index `ci`) in the order they are written:
/// protections first (trip time and masks, voltage thresholds, current limits, trip
/// mode, current range), then ramp rates, set-points last. None of them switches
/// anything on; the order only makes sure no set-point is applied under the IOC's old
/// protections.
pub fn settings(ch: &Channel, ci: usize) -> Vec<Write> {
    let (lv, hv) = (&ch.cfg.lv, &ch.cfg.hv);
    let num = |v: Option<f64>| v.map(PutValue::Number);
    let int = |v: Option<i64>| v.map(|i| PutValue::Number(i as f64));
    let list: [(Side, Param, Option<PutValue>); 18] = [
        (Side::Lv, Param::TripInt, int(lv.trip_int)),
        (Side::Lv, Param::TripExt, int(lv.trip_ext)),
        (Side::Lv, Param::Trip, num(lv.trip_time)),
        (Side::Lv, Param::OvVThr, num(lv.ov_v_thr)),
        (Side::Lv, Param::UnVThr, num(lv.un_v_thr)),
        (Side::Lv, Param::I0Set, num(lv.max_i)),
        (Side::Hv, Param::TripInt, int(hv.trip_int)),
        (Side::Hv, Param::TripExt, int(hv.trip_ext)),
        (Side::Hv, Param::Trip, num(hv.trip_time)),
        (Side::Hv, Param::I0Set, num(hv.max_i)),
        (
            Side::Hv,
            Param::PDwn,
            hv.trip_mode.map(|m| PutValue::Label(m.label().into())),
        ),
        (
            Side::Hv,
            Param::ImRange,
            hv.im_range.map(|m| PutValue::Label(m.label().into())),
        ),
        (Side::Lv, Param::RUpTime, num(lv.ramp_up_time)),
        (Side::Lv, Param::RDwTime, num(lv.ramp_dwn_time)),
        (Side::Hv, Param::RUp, num(hv.ramp_up_speed)),
        (Side::Hv, Param::RDwn, num(hv.ramp_dwn_speed)),
        (
            Side::Lv,
            Param::V0Set,
            num(ch.set_v_override[0].or(lv.set_v)),
        ),
        (
            Side::Hv,
            Param::V0Set,
            num(ch.set_v_override[1].or(hv.set_v)),
        ),
    ];
    list.into_iter()
        .filter_map(|(side, param, v)| {
            Some(Write {
                channel: ci,
                side,
                param,
                value: v?,
            })
        })
        .collect()
}

fn read_back_equal(r: Option<&Reading>, v: &PutValue) -> bool {
    match (r, v) {
        (Some(r), PutValue::Number(want)) => {
            // Float32 PVs: equal to a few parts in 1e6.
            (r.value - want).abs() <= 1e-6 + want.abs() * 1e-5
        }
        (Some(r), PutValue::Label(want)) => r.label.as_deref() == Some(want.as_str()),
        (None, _) => false,
    }
}

/// The settings of `ch` whose read-back is not (yet) the configured value, as
/// `LV OVVThr reads 0, configured 15`.
pub fn pending_settings(ch: &Channel, ci: usize) -> Vec<String> {
    settings(ch, ci)
        .into_iter()
        .filter_map(|w| {
            let r = ch.supply(w.side).get(w.side, w.param);
            if read_back_equal(r, &w.value) {
                return None;
            }
            let now = match r {
                None => "nothing yet".to_string(),
                Some(r) => r.label.clone().unwrap_or_else(|| r.value.to_string()),
            };
            Some(format!(
                "{} {} reads {now}, configured {}",
                w.side.as_str().to_uppercase(),
                w.param.suffix(),
                w.value
            ))
        })
        .collect()
}

/// Whether a channel's HV is down: reports off and `VMon` below the safe voltage.
pub fn hv_is_down(ch: &Channel, safe_v: f64) -> bool {
    ch.status(Side::Hv).is_some_and(|s| !StatusWord(s).on())
        && ch
            .value(Side::Hv, Param::VMon)
            .is_some_and(|v| v.abs() < safe_v)
}

/// Channels a command addresses: one (it must exist and have a module) or every
/// channel with a module.
pub fn targets(plant: &Plant, channel: Option<&str>) -> Result<Vec<usize>, String> {
    match channel {
        Some(id) => {
            let ci = plant.find(id).ok_or_else(|| {
                format!(
                    "no channel `{}` in the config",
                    dcs_shared::command::truncate(id, 30)
                )
            })?;
            if !plant.channels[ci].cfg.active() {
                return Err(format!(
                    "channel {id} has no module: it is monitored, not commanded"
                ));
            }
            Ok(vec![ci])
        }
        None => Ok((0..plant.channels.len())
            .filter(|i| plant.channels[*i].cfg.active())
            .collect()),
    }
}

fn ids(plant: &Plant, cis: impl IntoIterator<Item = usize>) -> String {
    cis.into_iter()
        .map(|c| plant.channels[c].cfg.id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An LV switch-off in progress (SPEC 4.4): HV first, LV once HV is down.
#[derive(Debug, Clone)]
pub struct LvOff {
    /// HV switched off (or off already), waiting for it to be down.
    waiting: Vec<usize>,
    /// LV off written, result not fed back yet.
    switching: Vec<usize>,
    done: Vec<usize>,
    failed: Vec<String>,
    deadline: Instant,
}

impl LvOff {
    /// Starts on `targets`: LV off now where HV is down, HV off first elsewhere.
    fn start(
        plant: &Plant,
        targets: &[usize],
        safety: &Safety,
        now: Instant,
    ) -> (LvOff, Vec<Write>) {
        let mut seq = LvOff {
            waiting: Vec::new(),
            switching: Vec::new(),
            done: Vec::new(),
            failed: Vec::new(),
            deadline: now + secs(safety.hv_off_timeout_secs),
        };
        let mut writes = Vec::new();
        for &c in targets {
            let ch = &plant.channels[c];
            if hv_is_down(ch, safety.hv_safe_voltage) {
                writes.push(Write::pw(c, Side::Lv, false));
                seq.switching.push(c);
            } else {
                // Off already but still above the safe voltage: just wait for it.
                if ch.status(Side::Hv).is_none_or(|s| StatusWord(s).on()) {
                    writes.push(Write::pw(c, Side::Hv, false));
                }
                seq.waiting.push(c);
            }
        }
        (seq, writes)
    }

    /// Channels this sequence holds.
    pub fn channels(&self) -> impl Iterator<Item = usize> + '_ {
        self.waiting.iter().chain(&self.switching).copied()
    }

    /// Feeds back the result of `writes`: `failed` are those that failed, with why.
    fn written(&mut self, plant: &Plant, writes: &[Write], failed: &[(Write, String)]) {
        for w in writes {
            let c = w.channel;
            let why = failed.iter().find(|(f, _)| f == w).map(|(_, e)| e);
            let id = &plant.channels[c].cfg.id;
            match (w.side, why) {
                (Side::Lv, None) => {
                    if let Some(i) = self.switching.iter().position(|x| *x == c) {
                        self.switching.remove(i);
                        self.done.push(c);
                    }
                }
                (Side::Lv, Some(e)) => {
                    self.switching.retain(|x| *x != c);
                    self.failed.push(format!("channel {id}: {e}"));
                }
                (Side::Hv, Some(e)) => {
                    self.waiting.retain(|x| *x != c);
                    self.failed
                        .push(format!("channel {id}: HV off failed ({e}), LV left on"));
                }
                (Side::Hv, None) => {}
            }
        }
    }

    /// Moves on at `now`: LV off where HV is down now; at the deadline the channels
    /// still waiting fail with LV left on.
    fn step(&mut self, plant: &Plant, safety: &Safety, now: Instant) -> Vec<Write> {
        let ready: Vec<usize> = self
            .waiting
            .iter()
            .copied()
            .filter(|c| hv_is_down(&plant.channels[*c], safety.hv_safe_voltage))
            .collect();
        self.waiting.retain(|c| !ready.contains(c));
        self.switching.extend(&ready);
        if now >= self.deadline {
            for c in std::mem::take(&mut self.waiting) {
                let ch = &plant.channels[c];
                let v = ch
                    .value(Side::Hv, Param::VMon)
                    .map_or("unknown".to_string(), |v| format!("{v:.1} V"));
                self.failed.push(format!(
                    "channel {}: HV still at {v} after {} s, LV left on",
                    ch.cfg.id, safety.hv_off_timeout_secs
                ));
            }
        }
        ready
            .into_iter()
            .map(|c| Write::pw(c, Side::Lv, false))
            .collect()
    }

    /// The reply, once nothing is pending.
    fn outcome(&self, plant: &Plant) -> Option<Outcome> {
        if !self.waiting.is_empty() || !self.switching.is_empty() {
            return None;
        }
        Some(if self.failed.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "LV off failed on {}{}",
                self.failed.join("; "),
                if self.done.is_empty() {
                    String::new()
                } else {
                    format!(" (done on {})", ids(plant, self.done.iter().copied()))
                }
            ))
        })
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::from_secs(1))
}

/// What a command needs next.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Answer now.
    Reply(Outcome),
    /// Carry out these writes (concurrently), then feed the failures to
    /// [`Control::written`] with this token.
    Write(Vec<Write>, Then),
}

/// What to do with the result of a [`Plan::Write`].
#[derive(Debug, Clone, PartialEq)]
pub enum Then {
    /// A switch: fails if any write failed.
    Switch {
        /// Supply.
        side: Side,
        /// On or off.
        on: bool,
    },
    /// A set-point: kept for the next reconnect once written.
    SetV {
        /// Channel index.
        channel: usize,
        /// Supply.
        side: Side,
        /// Volts.
        volts: f64,
    },
    /// Writes of the LV-off sequence answering request `req`.
    LvOff(u64),
}

/// What [`Control::step`] gives: writes to carry out per request, and the replies of
/// sequences that ended.
pub type Progress = (Vec<(u64, Vec<Write>)>, Vec<(u64, Outcome)>);

/// The plant and the LV-off sequences: everything the safety rules decide on.
pub struct Control {
    /// What is known of the supply.
    pub plant: Plant,
    /// HV/LV sequencing settings.
    pub safety: Safety,
    sequences: Vec<(u64, LvOff)>,
}

impl Control {
    /// A core for `plant`.
    pub fn new(plant: Plant, safety: Safety) -> Control {
        Control {
            plant,
            safety,
            sequences: Vec::new(),
        }
    }

    /// Whether an LV-off sequence is going on.
    pub fn in_sequence(&self) -> bool {
        !self.sequences.is_empty()
    }

    /// The requests whose LV-off sequence is going on (to answer at shutdown).
    pub fn abort_sequences(&mut self) -> Vec<u64> {
        self.sequences.drain(..).map(|(r, _)| r).collect()
    }

    fn check_usable(&self, targets: &[usize]) -> Outcome {
        for (_, s) in &self.sequences {
            if let Some(c) = s.channels().find(|c| targets.contains(c)) {
                return Err(format!(
                    "channel {} is switching LV off (waiting for its HV to ramp down); \
                     try again when that command has been answered",
                    self.plant.channels[c].cfg.id
                ));
            }
        }
        let down: Vec<usize> = targets
            .iter()
            .copied()
            .filter(|c| !self.plant.channels[*c].connected())
            .collect();
        if !down.is_empty() {
            return Err(format!(
                "not connected to the supply for channel(s) {}: nothing was changed",
                ids(&self.plant, down)
            ));
        }
        Ok(())
    }

    /// A set-point (`<name>/cmd/setv/<side>`).
    pub fn setv(&self, side: Side, channel: &str, volts: f64) -> Plan {
        let plan = || -> Result<(usize, Write), String> {
            let targets = targets(&self.plant, Some(channel))?;
            let ci = targets[0];
            let cfg = &self.plant.channels[ci].cfg;
            let limit = match side {
                Side::Lv => cfg.lv.limit_v,
                Side::Hv => cfg.hv.limit_v,
            }
            .unwrap_or(0.0);
            if !(0.0..=limit).contains(&volts) {
                return Err(format!(
                    "{} V is outside the {} limits of channel {channel}: 0 .. {limit} V",
                    dcs_shared::command::show_number(volts),
                    side.as_str().to_uppercase()
                ));
            }
            self.check_usable(&targets)?;
            if !self.plant.channels[ci].ready {
                // The settings task writes the set-point too: it would overwrite this one.
                return Err(format!(
                    "channel {channel} is still getting its configured settings: try again in a moment"
                ));
            }
            Ok((
                ci,
                Write {
                    channel: ci,
                    side,
                    param: Param::V0Set,
                    value: PutValue::Number(volts),
                },
            ))
        };
        match plan() {
            Ok((channel, w)) => Plan::Write(
                vec![w],
                Then::SetV {
                    channel,
                    side,
                    volts,
                },
            ),
            Err(e) => Plan::Reply(Err(e)),
        }
    }

    /// A switch (`<name>/cmd/switch/<side>[/<channel>]`), request `req`. `permit` is
    /// the interlock's say on LV on at `now`.
    pub fn switch(
        &mut self,
        req: u64,
        side: Side,
        on: bool,
        channel: Option<&str>,
        permit: Outcome,
        now: Instant,
    ) -> Plan {
        let targets = match targets(&self.plant, channel) {
            Ok(t) if t.is_empty() => {
                return Plan::Reply(Err("no channel has a module: nothing to switch".into()))
            }
            Ok(t) => t,
            Err(e) => return Plan::Reply(Err(e)),
        };
        if let Err(e) = self.check_usable(&targets) {
            return Plan::Reply(Err(e));
        }
        if on {
            let unready: Vec<String> = targets
                .iter()
                .filter(|c| !self.plant.channels[**c].ready)
                .map(|c| {
                    let ch = &self.plant.channels[*c];
                    let pending = pending_settings(ch, *c);
                    format!(
                        "channel {}: settings not confirmed yet ({})",
                        ch.cfg.id,
                        pending
                            .first()
                            .map_or("waiting for read-back", String::as_str)
                    )
                })
                .collect();
            if !unready.is_empty() {
                return Plan::Reply(Err(format!(
                    "{} on refused: {}; try again in a moment. Nothing was changed",
                    side.as_str().to_uppercase(),
                    unready.join("; ")
                )));
            }
        }
        match (side, on) {
            (Side::Lv, true) => {
                if let Err(e) = permit {
                    return Plan::Reply(Err(e));
                }
            }
            (Side::Hv, true) => {
                let lv_not_on: Vec<usize> = targets
                    .iter()
                    .copied()
                    .filter(|c| {
                        !matches!(
                            self.plant.channels[*c].state,
                            ChannelState::LvOn | ChannelState::HvRamp | ChannelState::HvOn
                        )
                    })
                    .collect();
                if !lv_not_on.is_empty() {
                    return Plan::Reply(Err(format!(
                        "HV on refused: LV is not on (off, ramping or in error) on channel(s) {}; \
                         switch LV on first. Nothing was changed",
                        ids(&self.plant, lv_not_on)
                    )));
                }
            }
            (Side::Lv, false) => {
                let (seq, writes) = LvOff::start(&self.plant, &targets, &self.safety, now);
                if seq.waiting.iter().any(|_| true) {
                    tracing::info!(
                        channels = %ids(&self.plant, seq.waiting.iter().copied()),
                        safe_v = self.safety.hv_safe_voltage,
                        "LV off: HV switched off first, waiting for it to ramp down"
                    );
                }
                self.sequences.push((req, seq));
                return Plan::Write(writes, Then::LvOff(req));
            }
            (Side::Hv, false) => {}
        }
        Plan::Write(
            targets.iter().map(|c| Write::pw(*c, side, on)).collect(),
            Then::Switch { side, on },
        )
    }

    /// Feeds back the writes of a plan: `failed` are the ones that failed, with why.
    /// Returns the reply, or `None` when it comes later (an LV-off sequence waiting).
    pub fn written(
        &mut self,
        writes: &[Write],
        then: Then,
        failed: &[(Write, String)],
    ) -> Option<Outcome> {
        let describe = |f: &[(Write, String)]| {
            f.iter()
                .map(|(w, e)| format!("channel {}: {e}", self.plant.channels[w.channel].cfg.id))
                .collect::<Vec<_>>()
                .join("; ")
        };
        match then {
            Then::Switch { side, on } => Some(if failed.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} {} failed on {} (the other channels were switched)",
                    side.as_str().to_uppercase(),
                    if on { "on" } else { "off" },
                    describe(failed)
                ))
            }),
            Then::SetV {
                channel,
                side,
                volts,
            } => Some(if failed.is_empty() {
                self.plant.channels[channel].set_v_override[side as usize] = Some(volts);
                Ok(())
            } else {
                Err(describe(failed))
            }),
            Then::LvOff(req) => {
                let i = self.sequences.iter().position(|(r, _)| *r == req)?;
                self.sequences[i].1.written(&self.plant, writes, failed);
                let out = self.sequences[i].1.outcome(&self.plant)?;
                self.sequences.remove(i);
                Some(out)
            }
        }
    }

    /// Moves the LV-off sequences on at `now`: the writes to carry out for each (fed
    /// back with [`Control::written`] and `Then::LvOff(req)`), and the sequences that
    /// ended without more writes (their replies).
    pub fn step(&mut self, now: Instant) -> Progress {
        let mut writes = Vec::new();
        let mut replies = Vec::new();
        let mut i = 0;
        while i < self.sequences.len() {
            let (req, seq) = &mut self.sequences[i];
            let w = seq.step(&self.plant, &self.safety, now);
            if !w.is_empty() {
                writes.push((*req, w));
            }
            match seq.outcome(&self.plant) {
                Some(out) => {
                    replies.push((*req, out));
                    self.sequences.remove(i);
                }
                None => i += 1,
            }
        }
        (writes, replies)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::ca::CaEvent;
    use crate::config::CaenConfig;
    use crate::fsm::StatusWord;

    const SAFE_V: f64 = 5.0;
    const HV_OFF_TIMEOUT: f64 = 30.0;

    fn config(n: usize) -> CaenConfig {
        let mut channels = String::new();
        for i in 0..n {
            channels.push_str(&format!(
                "  \"{i}\": {{lv: {{board: 0, chan: {i}}}, hv: {{board: 12, chan: {i}}}, module: m{i}}}\n"
            ));
        }
        let y = format!(
            "name: dcs\nprefix: t\nchannels:\n{channels}global:\n  lv: {{setV: 12.0, maxI: 2.5, ovVThr: 15.0, unVThr: 0.0, tripTime: 10.0, tripInt: 0, tripExt: 17, rampUpTime: 100.0, rampDwnTime: 100.0, limitV: 14}}\n  hv: {{setV: 200.0, maxI: 500.0, rampUpSpeed: 50.0, rampDwnSpeed: 50.0, tripTime: 10.0, tripInt: 0, tripExt: 17, tripMode: Kill, imRange: Low, limitV: 300}}\nsafety: {{hv_safe_voltage: {SAFE_V}, hv_off_timeout_secs: {HV_OFF_TIMEOUT}}}\n"
        );
        dcs_shared::config::from_str::<CaenConfig>(&y, std::path::Path::new("caen.yaml")).unwrap()
    }

    /// The supply as the tests play it: every PV of every channel, answering writes
    /// the way a mainframe does (ramps over time, faults, disconnects).
    #[derive(Debug, Clone)]
    struct Ioc {
        /// (channel, side) -> (status word, VMon, V0Set).
        out: HashMap<(usize, Side), (i64, f64, f64)>,
        connected: Vec<bool>,
        writes_fail: bool,
    }

    fn slot(p: &Plant, ci: usize, side: Side, param: Param) -> usize {
        p.slots
            .iter()
            .position(|s| s.channel == ci && s.side == side && s.param == param)
            .unwrap()
    }

    fn set(p: &mut Plant, ci: usize, side: Side, param: Param, v: &PutValue) {
        let (value, label) = match v {
            PutValue::Number(n) => (*n, None),
            PutValue::Label(l) => (
                match l.as_str() {
                    "Ramp" | "High" | "On" => 1.0,
                    _ => 0.0,
                },
                Some(l.clone()),
            ),
        };
        let slot = slot(p, ci, side, param);
        p.apply(&CaEvent::Value { slot, value, label });
    }

    impl Ioc {
        fn new(n: usize) -> Ioc {
            let mut out = HashMap::new();
            for c in 0..n {
                out.insert((c, Side::Lv), (0, 0.0, 12.0));
                out.insert((c, Side::Hv), (0, 0.0, 200.0));
            }
            Ioc {
                out,
                connected: vec![true; n],
                writes_fail: false,
            }
        }

        /// Sends everything of channel `c` to the plant (connect and values), with the
        /// settings the service writes when a channel comes up.
        fn publish(&mut self, p: &mut Plant, c: usize) {
            for s in 0..p.slots.len() {
                if p.slots[s].channel == c {
                    p.apply(&CaEvent::Connected { slot: s });
                }
            }
            for w in settings(&p.channels[c].clone(), c) {
                if let (Param::V0Set, PutValue::Number(v)) = (w.param, &w.value) {
                    self.out.get_mut(&(c, w.side)).unwrap().2 = *v;
                }
                set(p, c, w.side, w.param, &w.value);
            }
            p.channels[c].settings_written = true;
            for side in [Side::Lv, Side::Hv] {
                let (st, vmon, v0) = self.out[&(c, side)];
                set(p, c, side, Param::Status, &PutValue::Number(st as f64));
                set(p, c, side, Param::VMon, &PutValue::Number(vmon));
                set(p, c, side, Param::V0Set, &PutValue::Number(v0));
            }
        }

        fn disconnect(&mut self, p: &mut Plant, c: usize) {
            self.connected[c] = false;
            for s in 0..p.slots.len() {
                if p.slots[s].channel == c {
                    p.apply(&CaEvent::Disconnected { slot: s });
                }
            }
        }

        /// A write reaching the supply; `Err` when it fails.
        fn write(&mut self, p: &mut Plant, w: &Write) -> Result<(), String> {
            if self.writes_fail || !self.connected[w.channel] {
                return Err("no answer".into());
            }
            let e = self.out.get_mut(&(w.channel, w.side)).unwrap();
            match (&w.param, &w.value) {
                (Param::Pw, PutValue::Label(l)) if l == "On" && !StatusWord(e.0).fault() => {
                    e.0 = 0b011;
                }
                (Param::Pw, _) if StatusWord(e.0).energised() && !w.switches_on() => {
                    e.0 = 0b100 | (e.0 & !0b111);
                }
                (Param::V0Set, PutValue::Number(v)) => e.2 = *v,
                _ => {}
            }
            let (st, vmon, v0) = *e;
            set(
                p,
                w.channel,
                w.side,
                Param::Status,
                &PutValue::Number(st as f64),
            );
            set(p, w.channel, w.side, Param::VMon, &PutValue::Number(vmon));
            set(p, w.channel, w.side, Param::V0Set, &PutValue::Number(v0));
            Ok(())
        }

        /// One second of ramping: up by half the set-point, down by 40 V.
        fn tick(&mut self, p: &mut Plant) {
            let keys: Vec<(usize, Side)> = self.out.keys().copied().collect();
            for k in keys {
                if !self.connected[k.0] {
                    continue;
                }
                let e = self.out.get_mut(&k).unwrap();
                let fault = e.0 & !0b111;
                if e.0 & 0b010 != 0 {
                    e.1 = (e.1 + e.2 / 2.0).min(e.2);
                    if e.1 >= e.2 {
                        e.0 = 1 | fault;
                    }
                } else if e.0 & 0b100 != 0 {
                    e.1 = (e.1 - 40.0).max(0.0);
                    if e.1 <= 0.0 {
                        e.0 = fault;
                    }
                }
                let (st, vmon, _) = *e;
                set(p, k.0, k.1, Param::Status, &PutValue::Number(st as f64));
                set(p, k.0, k.1, Param::VMon, &PutValue::Number(vmon));
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Switch(Side, bool, Option<usize>),
        SetV(Side, usize, f64),
        Permit(bool),
        Seconds(u8),
        Fault(usize, Side, u8),
        Disconnect(usize),
        Reconnect(usize),
        WritesFail(bool),
        Clear,
        Reload,
    }

    fn side() -> impl Strategy<Value = Side> {
        prop_oneof![Just(Side::Lv), Just(Side::Hv)]
    }

    fn step(n: usize) -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (side(), any::<bool>(), proptest::option::of(0..n)).prop_map(|(s, o, c)| Step::Switch(s, o, c)),
            1 => (side(), 0..n, -20.0..320.0f64).prop_map(|(s, c, v)| Step::SetV(s, c, v)),
            1 => any::<bool>().prop_map(Step::Permit),
            3 => (0u8..40).prop_map(Step::Seconds),
            1 => (0..n, side(), 3u8..16).prop_map(|(c, s, b)| Step::Fault(c, s, b)),
            1 => (0..n).prop_map(Step::Disconnect),
            1 => (0..n).prop_map(Step::Reconnect),
            1 => any::<bool>().prop_map(Step::WritesFail),
            1 => Just(Step::Clear),
            1 => Just(Step::Reload),
        ]
    }

    /// Carries out `writes` on the IOC, checking each against the safety rules at the
    /// moment it is made; returns the failed ones.
    fn carry_out(
        ctl: &mut Control,
        ioc: &mut Ioc,
        writes: &[Write],
        permit_at_plan: bool,
    ) -> Vec<(Write, String)> {
        let mut failed = Vec::new();
        for w in writes {
            let ch = &ctl.plant.channels[w.channel];
            let lv = StatusWord(ch.status(Side::Lv).unwrap_or(-1));
            if w.switches_on() && w.side == Side::Hv {
                assert!(
                    lv.on() && !lv.ramping() && !lv.fault(),
                    "HV on with LV {lv:?} on channel {}",
                    w.channel
                );
            }
            if w.switches_on() && w.side == Side::Lv {
                assert!(permit_at_plan, "LV on without the permit");
                assert!(ch.ready, "LV on before the settings were confirmed");
            }
            if w.switches_off() && w.side == Side::Lv {
                assert!(
                    hv_is_down(ch, SAFE_V),
                    "LV off with HV status {:?}, VMon {:?}",
                    ch.status(Side::Hv),
                    ch.value(Side::Hv, Param::VMon)
                );
            }
            if w.param == Param::V0Set {
                let PutValue::Number(v) = w.value else {
                    panic!("{w:?}")
                };
                let limit = if w.side == Side::Lv { 14.0 } else { 300.0 };
                assert!(
                    (0.0..=limit).contains(&v),
                    "set-point {v} outside 0..{limit}"
                );
            }
            if let Err(e) = ioc.write(&mut ctl.plant, w) {
                failed.push((w.clone(), e));
            }
        }
        failed
    }

    fn run(n: usize, steps: Vec<Step>) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut ctl = Control::new(
            Plant::new("t", config(n).resolved(), Duration::ZERO),
            config(n).safety,
        );
        let mut ioc = Ioc::new(n);
        for c in 0..n {
            ioc.publish(&mut ctl.plant, c);
        }
        ctl.plant.update_states(now);
        let mut permit = true;
        let mut replies: HashMap<u64, u32> = HashMap::new();
        let mut sent = 0u64;
        let reply = |replies: &mut HashMap<u64, u32>, req: u64| {
            let n = replies.entry(req).or_default();
            *n += 1;
            assert_eq!(*n, 1, "request {req} answered twice");
        };
        let advance =
            |ctl: &mut Control, ioc: &mut Ioc, now: Instant, replies: &mut HashMap<u64, u32>| {
                ctl.plant.update_states(now);
                let (writes, ended) = ctl.step(now);
                for (req, _) in ended {
                    reply(replies, req);
                }
                for (req, w) in writes {
                    let failed = carry_out(ctl, ioc, &w, true);
                    if ctl.written(&w, Then::LvOff(req), &failed).is_some() {
                        reply(replies, req);
                    }
                }
                ctl.plant.update_states(now);
            };
        for s in steps {
            match s {
                Step::Switch(side, on, c) => {
                    sent += 1;
                    let id = c.map(|c| c.to_string());
                    let p = if permit {
                        Ok(())
                    } else {
                        Err("no permit".to_string())
                    };
                    match ctl.switch(sent, side, on, id.as_deref(), p, now) {
                        Plan::Reply(_) => reply(&mut replies, sent),
                        Plan::Write(w, then) => {
                            let failed = carry_out(&mut ctl, &mut ioc, &w, permit);
                            if ctl.written(&w, then, &failed).is_some() {
                                reply(&mut replies, sent);
                            }
                        }
                    }
                }
                Step::SetV(side, c, v) => {
                    sent += 1;
                    match ctl.setv(side, &c.to_string(), v) {
                        Plan::Reply(_) => reply(&mut replies, sent),
                        Plan::Write(w, then) => {
                            let failed = carry_out(&mut ctl, &mut ioc, &w, permit);
                            assert!(ctl.written(&w, then, &failed).is_some());
                            reply(&mut replies, sent);
                        }
                    }
                }
                Step::Permit(p) => permit = p,
                Step::Seconds(k) => {
                    for _ in 0..k {
                        now += Duration::from_secs(1);
                        ioc.tick(&mut ctl.plant);
                        advance(&mut ctl, &mut ioc, now, &mut replies);
                    }
                }
                Step::Fault(c, side, bit) => {
                    let e = ioc.out.get_mut(&(c, side)).unwrap();
                    e.0 |= 1 << bit;
                    if ioc.connected[c] {
                        let st = e.0 as f64;
                        set(
                            &mut ctl.plant,
                            c,
                            side,
                            Param::Status,
                            &PutValue::Number(st),
                        );
                    }
                }
                Step::Disconnect(c) => ioc.disconnect(&mut ctl.plant, c),
                Step::Reconnect(c) => {
                    ioc.connected[c] = true;
                    ioc.publish(&mut ctl.plant, c);
                }
                Step::WritesFail(f) => ioc.writes_fail = f,
                Step::Clear => {
                    for c in 0..n {
                        for side in [Side::Lv, Side::Hv] {
                            let e = ioc.out.get_mut(&(c, side)).unwrap();
                            e.0 &= 0b111;
                            if ioc.connected[c] {
                                let st = e.0 as f64;
                                set(
                                    &mut ctl.plant,
                                    c,
                                    side,
                                    Param::Status,
                                    &PutValue::Number(st),
                                );
                            }
                        }
                    }
                }
                // The service refuses a reload during an LV-off sequence; otherwise a new
                // plant, every channel not ready until its settings read back again.
                Step::Reload if !ctl.in_sequence() => {
                    ctl = Control::new(
                        Plant::new("t", config(n).resolved(), Duration::ZERO),
                        config(n).safety,
                    );
                    for c in 0..n {
                        if ioc.connected[c] {
                            ioc.publish(&mut ctl.plant, c);
                        }
                    }
                }
                Step::Reload => {}
            }
            advance(&mut ctl, &mut ioc, now, &mut replies);
        }
        // Every sequence ends by its timeout at the latest: then every command has
        // had exactly one reply.
        for _ in 0..(HV_OFF_TIMEOUT as u32 + 2) {
            now += Duration::from_secs(1);
            ioc.tick(&mut ctl.plant);
            advance(&mut ctl, &mut ioc, now, &mut replies);
        }
        assert!(!ctl.in_sequence());
        for req in 1..=sent {
            assert_eq!(replies.get(&req), Some(&1), "request {req}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// No sequence of commands, permit changes and plant events (ramps, faults,
        /// disconnects, failing writes) makes a write that turns HV on without LV on,
        /// LV on without the permit or before the settings are confirmed, LV off
        /// before its HV is down, or a set-point outside the limits; and every
        /// command gets exactly one reply.
        #[test]
        fn no_sequence_reaches_an_unsafe_write(
            n in 1usize..4,
            steps in proptest::collection::vec(step(3), 1..40),
        ) {
            let steps = steps
                .into_iter()
                .map(|s| match s {
                    Step::Switch(a, b, c) => Step::Switch(a, b, c.map(|c| c % n)),
                    Step::SetV(a, c, v) => Step::SetV(a, c % n, v),
                    Step::Fault(c, a, b) => Step::Fault(c % n, a, b),
                    Step::Disconnect(c) => Step::Disconnect(c % n),
                    Step::Reconnect(c) => Step::Reconnect(c % n),
                    other => other,
                })
                .collect();
            run(n, steps);
        }
    }

    fn ready_control(n: usize) -> (Control, Ioc) {
        let mut ctl = Control::new(
            Plant::new("t", config(n).resolved(), Duration::ZERO),
            config(n).safety,
        );
        let mut ioc = Ioc::new(n);
        for c in 0..n {
            ioc.publish(&mut ctl.plant, c);
        }
        ctl.plant.update_states(Instant::now());
        (ctl, ioc)
    }

    #[test]
    fn settings_protections_first_set_points_last() {
        let (ctl, _) = ready_control(1);
        let order: Vec<String> = settings(&ctl.plant.channels[0], 0)
            .iter()
            .map(|w| format!("{}:{}", w.side.as_str(), w.param.suffix()))
            .collect();
        assert_eq!(order.first().map(String::as_str), Some("lv:TripInt"));
        let last2: Vec<&str> = order[order.len() - 2..]
            .iter()
            .map(String::as_str)
            .collect();
        assert_eq!(last2, ["lv:V0Set", "hv:V0Set"]);
        assert!(!order.iter().any(|o| o.ends_with(":Pw")));
    }

    #[test]
    fn a_channel_is_not_ready_until_every_setting_reads_back() {
        let mut ctl = Control::new(
            Plant::new("t", config(1).resolved(), Duration::ZERO),
            config(1).safety,
        );
        for s in 0..ctl.plant.slots.len() {
            ctl.plant.apply(&CaEvent::Connected { slot: s });
        }
        for side in [Side::Lv, Side::Hv] {
            set(
                &mut ctl.plant,
                0,
                side,
                Param::Status,
                &PutValue::Number(0.0),
            );
        }
        ctl.plant.update_states(Instant::now());
        assert_eq!(ctl.plant.channels[0].state, ChannelState::Connected);
        let Plan::Reply(Err(e)) = ctl.switch(1, Side::Lv, true, None, Ok(()), Instant::now())
        else {
            panic!("LV on accepted before the settings")
        };
        assert!(
            e.contains("settings not confirmed") && e.contains("LV TripInt"),
            "{e}"
        );
        // Nor a set-point: the settings being written would overwrite it.
        let Plan::Reply(Err(e)) = ctl.setv(Side::Lv, "0", 10.0) else {
            panic!("setv accepted before the settings")
        };
        assert!(e.contains("still getting its configured settings"), "{e}");
        for w in settings(&ctl.plant.channels[0].clone(), 0) {
            set(&mut ctl.plant, 0, w.side, w.param, &w.value);
        }
        ctl.plant.update_states(Instant::now());
        assert_eq!(
            ctl.plant.channels[0].state,
            ChannelState::Connected,
            "read back equal, but not written since the connect"
        );
        ctl.plant.channels[0].settings_written = true;
        ctl.plant.update_states(Instant::now());
        assert_eq!(ctl.plant.channels[0].state, ChannelState::LvOff);
        assert!(matches!(
            ctl.switch(2, Side::Lv, true, None, Ok(()), Instant::now()),
            Plan::Write(..)
        ));
    }

    #[test]
    fn lv_off_waits_for_hv_and_gives_up_leaving_lv_on() {
        let (mut ctl, mut ioc) = ready_control(1);
        let now = Instant::now();
        for side in [Side::Lv, Side::Hv] {
            ioc.write(&mut ctl.plant, &Write::pw(0, side, true))
                .unwrap();
            for _ in 0..3 {
                ioc.tick(&mut ctl.plant);
            }
            ctl.plant.update_states(now);
        }
        assert_eq!(ctl.plant.channels[0].state, ChannelState::HvOn);
        let Plan::Write(w, then) = ctl.switch(1, Side::Lv, false, Some("0"), Ok(()), now) else {
            panic!()
        };
        assert_eq!(w, [Write::pw(0, Side::Hv, false)], "HV first");
        // The HV off is lost: HV never comes down.
        assert_eq!(ctl.written(&w, then, &[]), None, "answered later");
        let (writes, ended) = ctl.step(now + Duration::from_secs(10));
        assert!(writes.is_empty() && ended.is_empty());
        let Plan::Reply(Err(e)) = ctl.switch(2, Side::Hv, true, Some("0"), Ok(()), now) else {
            panic!()
        };
        assert!(e.contains("switching LV off"), "{e}");
        let (writes, ended) = ctl.step(now + Duration::from_secs(31));
        assert!(writes.is_empty());
        let (req, Err(e)) = &ended[0] else { panic!() };
        assert_eq!(*req, 1);
        assert!(
            e.contains("HV still at 200.0 V after 30 s, LV left on"),
            "{e}"
        );
    }
}
