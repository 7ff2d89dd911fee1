//! Channel and system state machines (SPEC 4.4): pure functions of the connection state
//! and the CAEN status words, so they are tested without hardware.

/// State of one channel (an LV and an HV supply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum ChannelState {
    Init,
    Disconnected,
    Connected,
    LvOff,
    LvRamp,
    LvOn,
    HvRamp,
    HvOn,
    Error,
}

impl ChannelState {
    /// Whether the channel may carry voltage (on or ramping).
    pub fn powered(self) -> bool {
        matches!(
            self,
            ChannelState::LvRamp | ChannelState::LvOn | ChannelState::HvRamp | ChannelState::HvOn
        )
    }

    /// Every state, for exhaustive tests.
    pub const ALL: [ChannelState; 9] = [
        ChannelState::Init,
        ChannelState::Disconnected,
        ChannelState::Connected,
        ChannelState::LvOff,
        ChannelState::LvRamp,
        ChannelState::LvOn,
        ChannelState::HvRamp,
        ChannelState::HvOn,
        ChannelState::Error,
    ];
}

/// State of the whole supply (its active channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum SystemState {
    Init,
    Disconnected,
    Connected,
    LvOff,
    LvRamp,
    LvMix,
    LvOn,
    HvRamp,
    HvMix,
    HvOn,
    Error,
}

impl ChannelState {
    /// The name used on MQTT (`LV_ON`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelState::Init => "INIT",
            ChannelState::Disconnected => "DISCONNECTED",
            ChannelState::Connected => "CONNECTED",
            ChannelState::LvOff => "LV_OFF",
            ChannelState::LvRamp => "LV_RAMP",
            ChannelState::LvOn => "LV_ON",
            ChannelState::HvRamp => "HV_RAMP",
            ChannelState::HvOn => "HV_ON",
            ChannelState::Error => "ERROR",
        }
    }
}

impl SystemState {
    /// The name used on MQTT (`LV_MIX`).
    pub fn as_str(self) -> &'static str {
        match self {
            SystemState::Init => "INIT",
            SystemState::Disconnected => "DISCONNECTED",
            SystemState::Connected => "CONNECTED",
            SystemState::LvOff => "LV_OFF",
            SystemState::LvRamp => "LV_RAMP",
            SystemState::LvMix => "LV_MIX",
            SystemState::LvOn => "LV_ON",
            SystemState::HvRamp => "HV_RAMP",
            SystemState::HvMix => "HV_MIX",
            SystemState::HvOn => "HV_ON",
            SystemState::Error => "ERROR",
        }
    }
}

/// How far a channel's PVs are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Never connected yet, still within the connection timeout.
    Init,
    /// Some PV is not connected (lost, or never found within the timeout).
    Down,
    /// Every PV connected.
    Up,
}

/// The meaning of a CAEN channel status word (SPEC 4.2), decoded in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusWord(pub i64);

impl StatusWord {
    /// Bit 0: the output is on.
    pub fn on(self) -> bool {
        self.0 & 1 != 0
    }

    /// Bit 1 (ramping up) or bit 2 (ramping down): not a fault.
    pub fn ramping(self) -> bool {
        self.0 & 0b110 != 0
    }

    /// Any bit from 3 up: over-current, over/under-voltage, trips, max V, disabled,
    /// calibration error, unplugged, ... (a negative word counts as a fault too).
    pub fn fault(self) -> bool {
        self.0 < 0 || self.0 >> 3 != 0
    }

    /// On or still ramping: the output may carry voltage.
    pub fn energised(self) -> bool {
        self.on() || self.ramping()
    }
}

/// SPEC 4.4, first matching rule: any fault bit on LV or HV -> ERROR; LV ramping ->
/// LV_RAMP; LV on with HV ramping (up, or down after an off) -> HV_RAMP; LV on with HV
/// on -> HV_ON; LV on -> LV_ON; LV off with HV on -> ERROR; LV off -> LV_OFF. Before
/// both status words are known the channel is CONNECTED, and so is one that would be
/// LV_OFF but has not had its settings confirmed (`ready`): it must not look ready to
/// be switched on.
pub fn channel_state(
    link: Link,
    ready: bool,
    lv_status: Option<i64>,
    hv_status: Option<i64>,
) -> ChannelState {
    match link {
        Link::Init => return ChannelState::Init,
        Link::Down => return ChannelState::Disconnected,
        Link::Up => {}
    }
    let (Some(lv), Some(hv)) = (lv_status, hv_status) else {
        return ChannelState::Connected;
    };
    let (lv, hv) = (StatusWord(lv), StatusWord(hv));
    if lv.fault() || hv.fault() {
        ChannelState::Error
    } else if lv.ramping() {
        ChannelState::LvRamp
    } else if lv.on() && hv.ramping() {
        ChannelState::HvRamp
    } else if lv.on() && hv.on() {
        ChannelState::HvOn
    } else if lv.on() {
        ChannelState::LvOn
    } else if hv.on() {
        ChannelState::Error
    } else if !ready {
        ChannelState::Connected
    } else {
        ChannelState::LvOff
    }
}

/// The system state and, when no rule of SPEC 4.4 matched, a description of the
/// combination (the caller logs it loudly and the system reports ERROR, the safe
/// reading). Rules in order, first match wins.
pub fn system_state(channels: &[ChannelState]) -> (SystemState, Option<String>) {
    use ChannelState as C;
    // A channel connected but not (yet) read or set up counts as off while others are
    // powered: CONNECTED must never hide power on the system state.
    let powered = channels.iter().any(|c| c.powered());
    let norm: Vec<C> = channels
        .iter()
        .map(|c| match c {
            C::Connected if powered => C::LvOff,
            other => *other,
        })
        .collect();
    let any = |s: C| norm.contains(&s);
    let all = |s: C| norm.iter().all(|c| *c == s);
    let state = if any(C::Error) {
        SystemState::Error
    } else if any(C::Disconnected) {
        SystemState::Disconnected
    } else if any(C::Init) {
        // INIT is the system's own first state, kept until every channel is heard from.
        SystemState::Init
    } else if any(C::Connected) {
        // Some channels connected but not yet read (or not yet set up), none powered.
        SystemState::Connected
    } else if all(C::LvOff) {
        SystemState::LvOff
    } else if any(C::LvRamp) {
        SystemState::LvRamp
    } else if any(C::HvRamp) {
        SystemState::HvRamp
    } else if any(C::LvOff) && (any(C::LvOn) || any(C::HvOn)) {
        SystemState::LvMix
    } else if all(C::LvOn) {
        SystemState::LvOn
    } else if all(C::HvOn) {
        SystemState::HvOn
    } else if any(C::LvOn) && any(C::HvOn) {
        SystemState::HvMix
    } else {
        let mut names: Vec<&str> = channels.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        return (
            SystemState::Error,
            Some(format!("no rule for channel states [{}]", names.join(", "))),
        );
    };
    (state, None)
}

#[cfg(test)]
mod tests {
    use super::ChannelState as C;
    use super::SystemState as S;
    use super::*;

    const ON: i64 = 1;
    const UP: i64 = 0b10;
    const DOWN: i64 = 0b100;

    #[test]
    fn channel_rules_of_spec_4_4() {
        let up = |lv, hv| channel_state(Link::Up, true, Some(lv), Some(hv));
        assert_eq!(channel_state(Link::Init, true, None, None), C::Init);
        assert_eq!(
            channel_state(Link::Down, true, Some(1), Some(1)),
            C::Disconnected
        );
        assert_eq!(channel_state(Link::Up, true, Some(1), None), C::Connected);
        assert_eq!(up(0, 0), C::LvOff);
        assert_eq!(up(ON | UP, 0), C::LvRamp, "LV powering on is not an error");
        assert_eq!(up(DOWN, 0), C::LvRamp, "LV ramping down after an off");
        assert_eq!(up(ON, 0), C::LvOn);
        assert_eq!(up(ON, ON | UP), C::HvRamp);
        assert_eq!(up(ON, DOWN), C::HvRamp, "HV ramping down after an off");
        assert_eq!(up(ON, ON), C::HvOn);
        assert_eq!(up(ON, 1 << 9), C::Error, "HV internal trip");
        assert_eq!(up(1 << 11, 0), C::Error, "unplugged");
        assert_eq!(up(0, ON), C::Error, "HV on with LV off");
        // Not ready: never LV_OFF, but power is never hidden.
        let unready = |lv, hv| channel_state(Link::Up, false, Some(lv), Some(hv));
        assert_eq!(unready(0, 0), C::Connected);
        assert_eq!(unready(ON, ON), C::HvOn);
    }

    /// The words tried: each combination of the on and ramp bits, each fault bit alone
    /// and with the on bit, and a negative word.
    fn words() -> Vec<i64> {
        let mut w: Vec<i64> = (0..8).collect();
        for bit in 3..16 {
            w.push(1 << bit);
            w.push(1 << bit | 1);
        }
        w.push(-1);
        w
    }

    #[test]
    fn every_status_word_pair_and_link_falls_on_a_rule() {
        for link in [Link::Init, Link::Down, Link::Up] {
            for ready in [false, true] {
                for lv in words() {
                    for hv in words() {
                        let s = channel_state(link, ready, Some(lv), Some(hv));
                        let (l, h) = (StatusWord(lv), StatusWord(hv));
                        let expect = match link {
                            Link::Init => C::Init,
                            Link::Down => C::Disconnected,
                            Link::Up if l.fault() || h.fault() => C::Error,
                            Link::Up if l.ramping() => C::LvRamp,
                            Link::Up if l.on() && h.ramping() => C::HvRamp,
                            Link::Up if l.on() && h.on() => C::HvOn,
                            Link::Up if l.on() => C::LvOn,
                            Link::Up if h.on() => C::Error,
                            Link::Up if !ready => C::Connected,
                            Link::Up => C::LvOff,
                        };
                        assert_eq!(s, expect, "{link:?} ready {ready} lv {lv:#b} hv {hv:#b}");
                        // Safety reading: a channel shown LV_OFF has nothing energised
                        // but possibly HV ramping down, and never a fault.
                        if s == C::LvOff {
                            assert!(!l.energised() && !h.on() && !l.fault() && !h.fault());
                        }
                        if s == C::HvOn || s == C::LvOn {
                            assert!(l.on() && !l.ramping());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn system_rules_in_order() {
        let s = |v: &[C]| system_state(v).0;
        assert_eq!(s(&[C::LvOn, C::Error, C::Disconnected]), S::Error);
        assert_eq!(s(&[C::LvOn, C::Disconnected]), S::Disconnected);
        assert_eq!(s(&[C::Init, C::LvOn]), S::Init);
        assert_eq!(s(&[C::Connected, C::Connected]), S::Connected);
        assert_eq!(s(&[C::LvOff, C::Connected]), S::Connected);
        // Never CONNECTED while a channel is powered: the unready one counts as off.
        assert_eq!(s(&[C::HvOn, C::Connected]), S::LvMix);
        assert_eq!(s(&[C::LvOn, C::Connected, C::LvOff]), S::LvMix);
        assert_eq!(s(&[C::LvOff, C::LvOff]), S::LvOff);
        assert_eq!(s(&[C::LvOff, C::LvRamp]), S::LvRamp);
        assert_eq!(s(&[C::LvRamp, C::HvRamp]), S::LvRamp);
        assert_eq!(s(&[C::LvOff, C::HvRamp]), S::HvRamp);
        assert_eq!(s(&[C::LvOff, C::HvOn]), S::LvMix);
        assert_eq!(s(&[C::LvOff, C::LvOn]), S::LvMix);
        assert_eq!(s(&[C::LvOn, C::LvOn]), S::LvOn);
        assert_eq!(s(&[C::HvOn, C::HvOn]), S::HvOn);
        assert_eq!(s(&[C::HvOn, C::HvRamp]), S::HvRamp);
        assert_eq!(s(&[C::LvOn, C::HvOn]), S::HvMix);
    }

    #[test]
    fn every_combination_of_up_to_three_channels_falls_on_a_rule() {
        let all = C::ALL;
        let mut sets: Vec<Vec<C>> = all.iter().map(|a| vec![*a]).collect();
        for a in all {
            for b in all {
                sets.push(vec![a, b]);
                for c in all {
                    sets.push(vec![a, b, c]);
                }
            }
        }
        for set in sets {
            let (state, gap) = system_state(&set);
            assert_eq!(gap, None, "{set:?}");
            // The first rules decide, whatever else is there.
            if set.contains(&C::Error) {
                assert_eq!(state, S::Error, "{set:?}");
            } else if set.contains(&C::Disconnected) {
                assert_eq!(state, S::Disconnected, "{set:?}");
            }
            // Power is never hidden behind CONNECTED or LV_OFF.
            if set.iter().any(|c| c.powered()) && !set.contains(&C::Error) {
                assert!(
                    !matches!(state, S::Connected | S::LvOff),
                    "{set:?} -> {state:?}"
                );
            }
            // ON states only when every channel is there.
            if matches!(state, S::LvOn | S::HvOn | S::HvMix) {
                assert!(
                    set.iter().all(|c| matches!(c, C::LvOn | C::HvOn)),
                    "{set:?} -> {state:?}"
                );
            }
        }
    }
}
