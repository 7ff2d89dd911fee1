//! The chiller's state machine: `DISCONNECTED, CONNECTED, OFF, ON, ERROR` (SPEC 3.2).

use serde::Serialize;

use crate::protocol::Status;

/// The state published as `fsm_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// No line to the unit, or it does not answer.
    Disconnected,
    /// Line open, no status read yet, or the latest poll got no reply (the status
    /// is unknown: neither ON nor OFF).
    Connected,
    /// Remote control, circulator stopped (status 02).
    Off,
    /// Remote control, circulating (status 03).
    On,
    /// Manual control (00, 01), an alarm (negative code), or replies that make no sense.
    Error,
}

impl State {
    /// The name as published.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Disconnected => "DISCONNECTED",
            State::Connected => "CONNECTED",
            State::Off => "OFF",
            State::On => "ON",
            State::Error => "ERROR",
        }
    }

    /// The state a status reply puts the chiller in. Manual control is an error for
    /// us: the suite cannot act on the unit.
    pub fn from_status(s: &Status) -> State {
        match s.code {
            2 => State::Off,
            3 => State::On,
            _ => State::Error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::parse_status;

    #[test]
    fn status_codes_map_to_states() {
        let st = |r: &str| State::from_status(&parse_status(r).unwrap());
        assert_eq!(st("02 REMOTE STOP"), State::Off);
        assert_eq!(st("03 REMOTE START"), State::On);
        assert_eq!(st("00 MANUAL STOP"), State::Error);
        assert_eq!(st("01 MANUAL START"), State::Error);
        assert_eq!(st("-01 LOW LEVEL"), State::Error);
        assert_eq!(
            serde_json::to_string(&State::Disconnected).unwrap(),
            "\"DISCONNECTED\""
        );
    }
}
