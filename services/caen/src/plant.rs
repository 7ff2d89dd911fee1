//! What the FSM knows of the supply: the last value and connection of every PV of every
//! channel, the derived states, and the `<name>/channels` objects. No I/O: CA events go
//! in, states and JSON come out.

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::ca::CaEvent;
use crate::config::Resolved;
use crate::fsm::{self, ChannelState, Link, SystemState};
use crate::pv::{self, Param, Side};

/// One watched PV.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Channel index in [`Plant::channels`].
    pub channel: usize,
    /// Supply.
    pub side: Side,
    /// Parameter.
    pub param: Param,
    /// Full PV name.
    pub pv: String,
}

/// A PV's last update.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Numeric value (enum index for enums).
    pub value: f64,
    /// Enum string, for enums.
    pub label: Option<String>,
}

/// The PVs of one supply.
#[derive(Debug, Clone, Default)]
pub struct Supply {
    connected: Vec<bool>,
    values: Vec<Option<Reading>>,
}

impl Supply {
    fn new(side: Side) -> Self {
        let n = side.params().len();
        Supply {
            connected: vec![false; n],
            values: vec![None; n],
        }
    }

    /// Last value of `param`, if known and connected.
    pub fn get(&self, side: Side, param: Param) -> Option<&Reading> {
        let i = param.index(side)?;
        self.values.get(i)?.as_ref()
    }

    fn all_connected(&self) -> bool {
        self.connected.iter().all(|c| *c)
    }
}

/// One channel: configuration, readings, state.
#[derive(Debug, Clone)]
pub struct Channel {
    /// Configuration with globals merged.
    pub cfg: Resolved,
    /// LV PVs.
    pub lv: Supply,
    /// HV PVs.
    pub hv: Supply,
    /// Current state.
    pub state: ChannelState,
    /// Whether every PV has been connected at least once since (re)load.
    pub ever_up: bool,
    /// Set-points given over MQTT since load; they win over the config on reconnect.
    pub set_v_override: [Option<f64>; 2],
    /// The service's writes of the configured settings since the last (re)connect all
    /// completed ([`Channel::generation`] tells which connection they were for).
    pub settings_written: bool,
    /// Which connection of the channel the settings were last written for.
    pub generation: u64,
    /// Every configured setting has been written and read back equal to its configured
    /// value since the last (re)connect or load: only then may the channel be switched
    /// on.
    pub ready: bool,
    dirty: bool,
}

impl Channel {
    /// The supply on `side`.
    pub fn supply(&self, side: Side) -> &Supply {
        match side {
            Side::Lv => &self.lv,
            Side::Hv => &self.hv,
        }
    }

    /// Last value of a parameter.
    pub fn value(&self, side: Side, param: Param) -> Option<f64> {
        self.supply(side).get(side, param).map(|r| r.value)
    }

    /// The status word of a supply.
    pub fn status(&self, side: Side) -> Option<i64> {
        self.value(side, Param::Status).map(|v| v as i64)
    }

    /// Whether the supply reports ON (status bit 0).
    pub fn is_on(&self, side: Side) -> bool {
        self.status(side).is_some_and(|s| s & 1 == 1)
    }

    /// Whether every PV of both supplies is connected.
    pub fn connected(&self) -> bool {
        self.lv.all_connected() && self.hv.all_connected()
    }

    /// The JSON object of SPEC 3.1 (field names kept from the Python original). While
    /// any PV of the channel is disconnected every reading is null: the PVs of a hung
    /// IOC drop one event at a time, and the ones not yet dropped are no fresher.
    pub fn to_json(&self) -> Value {
        let known = self.connected();
        let mut m = Map::new();
        m.insert("id".into(), json!(self.cfg.id));
        m.insert("module".into(), json!(self.cfg.module));
        m.insert("lv_board".into(), json!(self.cfg.lv_board));
        m.insert("lv_channel".into(), json!(self.cfg.lv_chan));
        m.insert("hv_board".into(), json!(self.cfg.hv_board));
        m.insert("hv_channel".into(), json!(self.cfg.hv_chan));
        for side in [Side::Lv, Side::Hv] {
            for param in side.params() {
                let Some(field) = param.field() else { continue };
                let v = match self.supply(side).get(side, *param).filter(|_| known) {
                    None => Value::Null,
                    Some(r) if param.is_enum() => match &r.label {
                        Some(l) => json!(l),
                        None => json!(r.value as i64),
                    },
                    Some(r) if param.is_integer() => json!(r.value as i64),
                    Some(r) => {
                        serde_json::Number::from_f64(r.value).map_or(Value::Null, Value::Number)
                    }
                };
                m.insert(format!("{}_{field}", side.as_str()), v);
            }
        }
        m.insert("fsm_state".into(), json!(self.state.as_str()));
        Value::Object(m)
    }
}

/// What an event changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing visible.
    None,
    /// Readings of the channel (republish it).
    Readings(usize),
    /// The channel just got every PV connected (write its settings).
    CameUp(usize),
}

/// Every channel of the supply.
#[derive(Debug, Clone)]
pub struct Plant {
    /// PV prefix.
    pub prefix: String,
    /// Channels in config order.
    pub channels: Vec<Channel>,
    /// Watched PVs; an event's `slot` indexes this.
    pub slots: Vec<Slot>,
    started: Instant,
    connect_timeout: Duration,
    system: SystemState,
}

impl Plant {
    /// A plant with nothing connected yet.
    pub fn new(prefix: &str, channels: Vec<Resolved>, connect_timeout: Duration) -> Plant {
        let mut slots = Vec::new();
        let channels: Vec<Channel> = channels
            .into_iter()
            .enumerate()
            .map(|(i, cfg)| {
                for side in [Side::Lv, Side::Hv] {
                    let (board, chan) = match side {
                        Side::Lv => (cfg.lv_board, cfg.lv_chan),
                        Side::Hv => (cfg.hv_board, cfg.hv_chan),
                    };
                    for param in side.params() {
                        slots.push(Slot {
                            channel: i,
                            side,
                            param: *param,
                            pv: pv::name(prefix, board, chan, *param),
                        });
                    }
                }
                Channel {
                    cfg,
                    lv: Supply::new(Side::Lv),
                    hv: Supply::new(Side::Hv),
                    state: ChannelState::Init,
                    ever_up: false,
                    set_v_override: [None, None],
                    settings_written: false,
                    generation: 0,
                    ready: false,
                    dirty: true,
                }
            })
            .collect();
        Plant {
            prefix: prefix.to_string(),
            channels,
            slots,
            started: Instant::now(),
            connect_timeout,
            system: SystemState::Init,
        }
    }

    /// Applies a CA event.
    pub fn apply(&mut self, ev: &CaEvent) -> Change {
        let slot = match ev {
            CaEvent::Connected { slot }
            | CaEvent::Disconnected { slot }
            | CaEvent::Value { slot, .. } => *slot,
        };
        let Some(s) = self.slots.get(slot) else {
            return Change::None;
        };
        let (ci, side, param) = (s.channel, s.side, s.param);
        let Some(ch) = self.channels.get_mut(ci) else {
            return Change::None;
        };
        let Some(pi) = param.index(side) else {
            return Change::None;
        };
        let was_up = ch.connected();
        let supply = match side {
            Side::Lv => &mut ch.lv,
            Side::Hv => &mut ch.hv,
        };
        match ev {
            // Connection alone changes nothing in the published object (the state is
            // re-derived separately): no republication for it.
            CaEvent::Connected { .. } => {
                supply.connected[pi] = true;
                if !was_up && ch.connected() {
                    ch.ever_up = true;
                    return Change::CameUp(ci);
                }
                return Change::None;
            }
            CaEvent::Disconnected { .. } => {
                supply.connected[pi] = false;
                // Stale values must not decide a state after the IOC comes back.
                supply.values[pi] = None;
                // An IOC restarted without autosave has forgotten the settings.
                ch.ready = false;
                ch.settings_written = false;
            }
            CaEvent::Value { value, label, .. } => {
                let new = Some(Reading {
                    value: *value,
                    label: label.clone(),
                });
                if supply.values[pi] == new {
                    return Change::None;
                }
                supply.values[pi] = new;
            }
        }
        ch.dirty = true;
        if !was_up && ch.connected() {
            ch.ever_up = true;
            return Change::CameUp(ci);
        }
        Change::Readings(ci)
    }

    fn link(&self, ch: &Channel, now: Instant) -> Link {
        if ch.connected() {
            Link::Up
        } else if !ch.ever_up && now.duration_since(self.started) < self.connect_timeout {
            Link::Init
        } else {
            Link::Down
        }
    }

    /// Re-derives every state; returns the indexes of channels whose state changed and
    /// whether the system state changed.
    pub fn update_states(&mut self, now: Instant) -> (Vec<usize>, bool) {
        let mut changed = Vec::new();
        for i in 0..self.channels.len() {
            let link = self.link(&self.channels[i], now);
            let ch = &mut self.channels[i];
            if !ch.ready
                && ch.connected()
                && (!ch.cfg.active()
                    || ch.settings_written && crate::control::pending_settings(ch, i).is_empty())
            {
                ch.ready = true;
                if ch.cfg.active() {
                    tracing::info!(channel = %ch.cfg.id, "settings confirmed: ready");
                }
            }
            let s = fsm::channel_state(link, ch.ready, ch.status(Side::Lv), ch.status(Side::Hv));
            if s != ch.state {
                ch.state = s;
                ch.dirty = true;
                changed.push(i);
            }
        }
        let active: Vec<ChannelState> = self
            .channels
            .iter()
            .filter(|c| c.cfg.active())
            .map(|c| c.state)
            .collect();
        let (system, gap) = fsm::system_state(&active);
        if let Some(gap) = gap {
            if system != self.system {
                tracing::error!(%gap, "system state undefined by the rules: reporting ERROR");
            }
        }
        let system_changed = system != self.system;
        self.system = system;
        (changed, system_changed)
    }

    /// The system state as of the last [`Plant::update_states`].
    pub fn system(&self) -> SystemState {
        self.system
    }

    /// Channels changed since the last call (clears the marks).
    pub fn take_dirty(&mut self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, c) in self.channels.iter_mut().enumerate() {
            if std::mem::take(&mut c.dirty) {
                out.push(i);
            }
        }
        out
    }

    /// Marks every channel for republication.
    pub fn mark_all_dirty(&mut self) {
        for c in &mut self.channels {
            c.dirty = true;
        }
    }

    /// The channel with this id.
    pub fn find(&self, id: &str) -> Option<usize> {
        self.channels.iter().position(|c| c.cfg.id == id)
    }

    /// PV name of a parameter of a channel.
    pub fn pv(&self, channel: usize, side: Side, param: Param) -> String {
        let c = &self.channels[channel].cfg;
        match side {
            Side::Lv => pv::name(&self.prefix, c.lv_board, c.lv_chan, param),
            Side::Hv => pv::name(&self.prefix, c.hv_board, c.hv_chan, param),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HvParams, LvParams};

    fn resolved(id: &str, module: Option<&str>, lv: (u8, u16), hv: (u8, u16)) -> Resolved {
        Resolved {
            id: id.into(),
            module: module.map(Into::into),
            lv_board: lv.0,
            lv_chan: lv.1,
            hv_board: hv.0,
            hv_chan: hv.1,
            lv: LvParams::default(),
            hv: HvParams::default(),
        }
    }

    fn plant() -> Plant {
        Plant::new(
            "lab",
            vec![
                resolved("0", Some("m0"), (0, 0), (12, 0)),
                resolved("2", None, (0, 2), (12, 2)),
            ],
            Duration::from_secs(5),
        )
    }

    fn connect_all(p: &mut Plant, channel: usize) -> Vec<Change> {
        let slots: Vec<usize> = (0..p.slots.len())
            .filter(|s| p.slots[*s].channel == channel)
            .collect();
        slots
            .into_iter()
            .map(|slot| p.apply(&CaEvent::Connected { slot }))
            .collect()
    }

    fn set(p: &mut Plant, channel: usize, side: Side, param: Param, value: f64) -> Change {
        let slot = p
            .slots
            .iter()
            .position(|s| s.channel == channel && s.side == side && s.param == param)
            .unwrap();
        p.apply(&CaEvent::Value {
            slot,
            value,
            label: None,
        })
    }

    #[test]
    fn slots_name_every_pv() {
        let p = plant();
        assert_eq!(p.slots.len(), 2 * (14 + 13));
        assert_eq!(p.slots[0].pv, "lab:00:000:V0Set");
        assert!(p.slots.iter().any(|s| s.pv == "lab:12:002:ImRange"));
    }

    #[test]
    fn states_follow_connection_and_status() {
        let mut p = plant();
        let now = Instant::now();
        p.update_states(now);
        assert_eq!(p.channels[0].state, ChannelState::Init);
        assert_eq!(p.system(), SystemState::Init);
        let changes = connect_all(&mut p, 0);
        assert_eq!(changes.last(), Some(&Change::CameUp(0)));
        p.update_states(now);
        assert_eq!(p.channels[0].state, ChannelState::Connected);
        set(&mut p, 0, Side::Lv, Param::Status, 1.0);
        set(&mut p, 0, Side::Hv, Param::Status, 3.0);
        p.update_states(now);
        assert_eq!(p.channels[0].state, ChannelState::HvRamp);
        assert_eq!(
            p.system(),
            SystemState::HvRamp,
            "channel 2 has no module: not counted"
        );
        // The IOC goes away: DISCONNECTED, and the old status word is forgotten.
        let slot = p
            .slots
            .iter()
            .position(|s| s.channel == 0 && s.param == Param::Status)
            .unwrap();
        p.apply(&CaEvent::Disconnected { slot });
        p.update_states(now);
        assert_eq!(p.system(), SystemState::Disconnected);
        assert_eq!(p.apply(&CaEvent::Connected { slot }), Change::CameUp(0));
        p.update_states(now);
        assert_eq!(
            p.channels[0].state,
            ChannelState::Connected,
            "until a fresh status word"
        );
        // A channel never heard from is DISCONNECTED after the timeout.
        p.update_states(now + Duration::from_secs(6));
        assert_eq!(p.channels[1].state, ChannelState::Disconnected);
    }

    #[test]
    fn json_has_the_contract_fields_and_types() {
        let mut p = plant();
        connect_all(&mut p, 0);
        set(&mut p, 0, Side::Lv, Param::Status, 1.0);
        set(&mut p, 0, Side::Hv, Param::Status, 0.0);
        set(&mut p, 0, Side::Lv, Param::VMon, 12.03);
        set(&mut p, 0, Side::Hv, Param::TripExt, 17.0);
        let slot = p
            .slots
            .iter()
            .position(|s| s.channel == 0 && s.param == Param::PDwn)
            .unwrap();
        p.apply(&CaEvent::Value {
            slot,
            value: 0.0,
            label: Some("Kill".into()),
        });
        p.update_states(Instant::now());
        let j = p.channels[0].to_json();
        assert_eq!(j["id"], "0");
        assert_eq!(j["module"], "m0");
        assert_eq!(j["hv_board"], 12);
        assert_eq!(j["lv_status"], 1);
        assert!(j["lv_status"].is_i64());
        assert_eq!(j["lv_vMon"], 12.03);
        assert_eq!(j["hv_tripExt"], 17);
        assert_eq!(j["hv_tripMode"], "Kill");
        assert_eq!(j["hv_iMon"], Value::Null);
        assert_eq!(j["fsm_state"], "LV_ON");
        assert_eq!(j.as_object().unwrap().len(), 6 + 25 + 1);
        // One PV drops (the first of a hung IOC's): nothing of the channel is known.
        let slot = p.slots.iter().position(|s| s.channel == 0).unwrap();
        p.apply(&CaEvent::Disconnected { slot });
        let j = p.channels[0].to_json();
        assert_eq!(j["lv_vMon"], Value::Null);
        assert_eq!(j["lv_status"], Value::Null);
        assert_eq!(j["hv_tripMode"], Value::Null);
        assert_eq!(j["id"], "0");
    }

    #[test]
    fn unchanged_values_are_not_changes() {
        let mut p = plant();
        connect_all(&mut p, 0);
        p.take_dirty();
        assert_eq!(
            set(&mut p, 0, Side::Lv, Param::VMon, 1.0),
            Change::Readings(0)
        );
        assert_eq!(set(&mut p, 0, Side::Lv, Param::VMon, 1.0), Change::None);
        assert_eq!(p.take_dirty(), vec![0]);
        assert!(p.take_dirty().is_empty());
    }
}
