//! The plant's state (SPEC 10): `INIT, DISCONNECTED, CONNECTED, CHILLER_RUNNING,
//! CO2_RUNNING, ALARM`, from the status word and the control word's start bits.

use serde::Serialize;

/// The state published as `fsm_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Started, not yet connected.
    Init,
    /// No answer from the PLC (timeout, exception, connection lost): the reason is in
    /// the status's `error`.
    Disconnected,
    /// Answering, nothing started.
    Connected,
    /// The chiller stage is started.
    ChillerRunning,
    /// The CO2 loop is started (with the chiller).
    #[serde(rename = "CO2_RUNNING")]
    Co2Running,
    /// The PLC reports an alarm (status 3), or the words contradict each other.
    Alarm,
}

impl State {
    /// The name as published.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Init => "INIT",
            State::Disconnected => "DISCONNECTED",
            State::Connected => "CONNECTED",
            State::ChillerRunning => "CHILLER_RUNNING",
            State::Co2Running => "CO2_RUNNING",
            State::Alarm => "ALARM",
        }
    }
}

/// Status word values (register 320).
pub mod status {
    /// Not ready (the PLC is starting, or stopped).
    pub const NOT_READY: u16 = 0;
    /// Ready, or the chiller running.
    pub const READY: u16 = 1;
    /// The CO2 loop running.
    pub const CO2_RUNNING: u16 = 2;
    /// An alarm.
    pub const ALARM: u16 = 3;
}

/// The state the words put the plant in, and a fault to report when they contradict
/// each other (SPEC 10: CO2 started while the chiller is not is a fault, not noise).
pub fn state(status_word: u16, chiller_bit: bool, co2_bit: bool) -> (State, Option<String>) {
    match status_word {
        status::ALARM => (State::Alarm, None),
        s if s > status::ALARM => (
            State::Alarm,
            Some(format!(
                "status word {s} is not one the driver knows (0..3)"
            )),
        ),
        _ if co2_bit && !chiller_bit => (
            State::Alarm,
            Some("the CO2 start bit is set while the chiller's is not".into()),
        ),
        status::READY | status::CO2_RUNNING if co2_bit => (State::Co2Running, None),
        _ if chiller_bit => (State::ChillerRunning, None),
        // Not a danger (nothing counts as cooling), but not what the words should say.
        status::CO2_RUNNING => (
            State::Connected,
            Some("status word 2 (CO2 running) without the start bits".into()),
        ),
        _ => (State::Connected, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_and_bit_combination() {
        let mut seen = std::collections::BTreeSet::new();
        for s in 0..=5u16 {
            for chiller in [false, true] {
                for co2 in [false, true] {
                    let (st, fault) = state(s, chiller, co2);
                    seen.insert(st.as_str());
                    let want = match (s, chiller, co2) {
                        (3, ..) => State::Alarm,
                        (4.., ..) => State::Alarm,
                        (_, false, true) => State::Alarm,
                        (1 | 2, true, true) => State::Co2Running,
                        (_, true, _) => State::ChillerRunning,
                        _ => State::Connected,
                    };
                    assert_eq!(st, want, "status {s} chiller {chiller} co2 {co2}");
                    // A contradiction is always explained.
                    let odd = s > 3 || (s != 3 && co2 && !chiller) || (s == 2 && !chiller && !co2);
                    assert_eq!(
                        fault.is_some(),
                        odd,
                        "status {s} chiller {chiller} co2 {co2}"
                    );
                }
            }
        }
        assert_eq!(seen.len(), 4);
        assert_eq!(
            serde_json::to_string(&State::Co2Running).unwrap(),
            "\"CO2_RUNNING\""
        );
        assert_eq!(
            serde_json::to_string(&State::ChillerRunning).unwrap(),
            "\"CHILLER_RUNNING\""
        );
    }
}
