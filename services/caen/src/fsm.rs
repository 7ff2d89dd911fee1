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
    LvOn,
    HvRamp,
    HvOn,
    Error,
}

/// State of the whole supply (its active channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum SystemState {
    Init,
    Disconnected,
    Connected,
    LvOff,
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

/// SPEC 4.4: HV status > 5 or LV status > 1 is ERROR; LV on with HV status 3 or 5 is
/// HV_RAMP, with HV 1 is HV_ON, otherwise LV_ON; LV off is LV_OFF. Before both status
/// words are known the channel is CONNECTED.
pub fn channel_state(link: Link, lv_status: Option<i64>, hv_status: Option<i64>) -> ChannelState {
    match link {
        Link::Init => return ChannelState::Init,
        Link::Down => return ChannelState::Disconnected,
        Link::Up => {}
    }
    let (Some(lv), Some(hv)) = (lv_status, hv_status) else {
        return ChannelState::Connected;
    };
    if hv > 5 || lv > 1 {
        return ChannelState::Error;
    }
    if lv & 1 == 0 {
        return ChannelState::LvOff;
    }
    match hv {
        3 | 5 => ChannelState::HvRamp,
        1 => ChannelState::HvOn,
        _ => ChannelState::LvOn,
    }
}

/// The system state and, when no rule of SPEC 4.4 matched, a description of the
/// combination (a gap the Python code had too: the caller logs it loudly and the
/// system reports ERROR, the safe reading).
pub fn system_state(channels: &[ChannelState]) -> (SystemState, Option<String>) {
    use ChannelState as C;
    let any = |s: C| channels.contains(&s);
    let all = |s: C| channels.iter().all(|c| *c == s);
    let state = if any(C::Error) {
        SystemState::Error
    } else if any(C::Disconnected) {
        SystemState::Disconnected
    } else if any(C::Init) {
        // Not in SPEC's list, which starts from connected channels; INIT is the
        // system's own first state, kept until every channel has been heard from.
        SystemState::Init
    } else if all(C::Connected) {
        SystemState::Connected
    } else if any(C::Connected) {
        // Not in SPEC either: some channels are connected but their first status word
        // is still on its way (a few ms at start and after an IOC restart). Without
        // this the rules below fall through to ERROR at every start.
        SystemState::Connected
    } else if all(C::LvOff) {
        SystemState::LvOff
    } else if any(C::LvOff) && any(C::HvOn) {
        SystemState::Error
    } else if any(C::LvOff) && any(C::LvOn) {
        SystemState::LvMix
    } else if all(C::LvOn) {
        SystemState::LvOn
    } else if all(C::HvOn) {
        SystemState::HvOn
    } else if any(C::HvRamp) {
        SystemState::HvRamp
    } else if any(C::LvOn) && any(C::HvOn) {
        SystemState::HvMix
    } else {
        let mut names: Vec<&str> = channels.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        return (
            SystemState::Error,
            Some(format!("no rule for channel states {}", names.join(", "))),
        );
    };
    (state, None)
}

#[cfg(test)]
mod tests {
    use super::ChannelState as C;
    use super::SystemState as S;
    use super::*;

    #[test]
    fn channel_rules_of_spec_4_4() {
        let up = |lv, hv| channel_state(Link::Up, Some(lv), Some(hv));
        assert_eq!(channel_state(Link::Init, None, None), C::Init);
        assert_eq!(channel_state(Link::Down, Some(1), Some(1)), C::Disconnected);
        assert_eq!(channel_state(Link::Up, Some(1), None), C::Connected);
        assert_eq!(up(0, 0), C::LvOff);
        assert_eq!(up(1, 0), C::LvOn);
        assert_eq!(up(1, 3), C::HvRamp);
        assert_eq!(up(1, 5), C::HvRamp);
        assert_eq!(up(1, 1), C::HvOn);
        assert_eq!(up(1, 4), C::LvOn, "HV ramping down after off");
        assert_eq!(up(1, 1 << 9), C::Error, "HV internal trip");
        assert_eq!(
            up(3, 0),
            C::Error,
            "LV status > 1 is ERROR, as in the original"
        );
        assert_eq!(
            up(0, 1),
            C::LvOff,
            "HV on with LV off: the system rule catches it"
        );
        assert_eq!(up(1 << 11, 0), C::Error, "unplugged");
    }

    #[test]
    fn system_rules_in_order() {
        let s = |v: &[C]| system_state(v).0;
        assert_eq!(s(&[C::LvOn, C::Error, C::Disconnected]), S::Error);
        assert_eq!(s(&[C::LvOn, C::Disconnected]), S::Disconnected);
        assert_eq!(s(&[C::Init, C::LvOn]), S::Init);
        assert_eq!(s(&[C::Connected, C::Connected]), S::Connected);
        assert_eq!(s(&[C::LvOff, C::LvOff]), S::LvOff);
        assert_eq!(s(&[C::LvOff, C::HvOn]), S::Error);
        assert_eq!(s(&[C::LvOff, C::LvOn, C::HvRamp]), S::LvMix);
        assert_eq!(s(&[C::LvOn, C::LvOn]), S::LvOn);
        assert_eq!(s(&[C::HvOn, C::HvOn]), S::HvOn);
        assert_eq!(s(&[C::HvOn, C::HvRamp]), S::HvRamp);
        assert_eq!(s(&[C::LvOn, C::HvOn]), S::HvMix);
    }

    #[test]
    fn start_up_transients_are_not_errors() {
        // Channels connected but not yet read: CONNECTED, not a rule gap.
        assert_eq!(
            system_state(&[C::LvOn, C::Connected, C::LvOff]),
            (S::Connected, None)
        );
        // SPEC's own example of a gap, LV_OFF with HV_RAMP, is caught by "any HV_RAMP"
        // when the rules are applied in order.
        assert_eq!(system_state(&[C::LvOff, C::HvRamp]), (S::HvRamp, None));
        // No combination of the remaining states falls through the rules.
        let all = [C::LvOff, C::LvOn, C::HvRamp, C::HvOn];
        for mask in 1u32..16 {
            let set: Vec<C> = (0..4)
                .filter(|i| mask >> i & 1 == 1)
                .map(|i| all[i])
                .collect();
            assert_eq!(system_state(&set).1, None, "{set:?}");
        }
    }
}
