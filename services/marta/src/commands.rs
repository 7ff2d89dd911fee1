//! MQTT commands of SPEC 10, parsed, then planned against the plant's state: a plan is
//! the register writes a command makes, or the reason it is refused. No I/O.

use std::time::Duration;

use dcs_shared::command::{self, show_number, Command, CommandError};

use crate::config::Limits;
use crate::fsm::{self, State};
use crate::registers::{Bit, Controls};

/// A command on `MARTA/cmd/<verb>`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MartaCommand {
    /// Start the chiller stage.
    StartChiller,
    /// Start the CO2 loop (the chiller must be running).
    StartCo2,
    /// Stop the CO2 loop.
    StopCo2,
    /// Stop the chiller stage (the CO2 loop must be stopped).
    StopChiller,
    /// Flow control on or off.
    SetFlowActive(bool),
    /// CO2 temperature set-point, degC.
    SetTemperature(f64),
    /// Pump speed set-point, rpm.
    SetSpeed(f64),
    /// Flow set-point, g/s.
    SetFlow(f64),
    /// Clear the start bits, then pulse the alarm reset.
    ClearAlarms,
    /// Close the connection and connect again.
    Reconnect,
    /// Poll and publish now.
    Refresh,
}

impl Command for MartaCommand {
    fn parse(path: &[&str], payload: &[u8]) -> Result<Self, CommandError> {
        let none = |c: MartaCommand| command::expect_empty(payload).map(|_| c);
        match path {
            ["start_chiller"] => none(MartaCommand::StartChiller),
            ["start_co2"] => none(MartaCommand::StartCo2),
            ["stop_co2"] => none(MartaCommand::StopCo2),
            ["stop_chiller"] => none(MartaCommand::StopChiller),
            ["clear_alarms"] => none(MartaCommand::ClearAlarms),
            ["reconnect"] => none(MartaCommand::Reconnect),
            ["refresh"] => none(MartaCommand::Refresh),
            ["set_flow_active"] => match command::text(payload)?.trim() {
                "1" | "true" | "on" => Ok(MartaCommand::SetFlowActive(true)),
                "0" | "false" | "off" => Ok(MartaCommand::SetFlowActive(false)),
                other => Err(CommandError::new(format!(
                    "payload must be 0 or 1, got `{}`",
                    command::truncate(other, 40)
                ))),
            },
            ["set_temperature_setpoint"] => command::number(payload).map(MartaCommand::SetTemperature),
            ["set_speed_setpoint"] => command::number(payload).map(MartaCommand::SetSpeed),
            ["set_flow_setpoint"] => command::number(payload).map(MartaCommand::SetFlow),
            _ => Err(CommandError::new(format!(
                "unknown command `{}`: use start_chiller, start_co2, stop_co2, stop_chiller, set_flow_active, set_temperature_setpoint, set_speed_setpoint, set_flow_setpoint, clear_alarms, reconnect, refresh",
                command::truncate(&path.join("/"), 40)
            ))),
        }
    }
}

/// One step of a plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// Read the control word `register`, check that the bits of `require` are set
    /// (the plant may have changed since the plan: nothing is written otherwise), set
    /// the bits of `set`, clear those of `clear`, write it whole, read it back: the
    /// bits of `confirm` must read as asked.
    Bits {
        /// The control word.
        register: u16,
        /// Bits to set.
        set: u16,
        /// Bits to clear.
        clear: u16,
        /// Bits that must be set when the word is read, before writing.
        require: u16,
        /// Bits whose read-back must be as asked (a PLC may clear a pulse bit itself).
        confirm: u16,
    },
    /// Write a float32 set-point and read it back.
    Float {
        /// First register.
        register: u16,
        /// Value.
        value: f32,
    },
    /// Let the PLC see the previous write in one of its scans.
    Pause(Duration),
}

fn bits(b: Bit, on: bool) -> Op {
    Op::Bits {
        register: b.register,
        set: if on { b.mask() } else { 0 },
        clear: if on { 0 } else { b.mask() },
        require: 0,
        confirm: b.mask(),
    }
}

/// What the plan is checked against: the plant read just before.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// The state.
    pub state: State,
    /// The chiller start bit.
    pub chiller_bit: bool,
    /// The CO2 start bit.
    pub co2_bit: bool,
    /// The status word (`None` when not read).
    pub status_word: Option<u16>,
}

/// What a command does: its writes, or why it is refused (nothing is written then).
/// `Refresh` and `Reconnect` have no writes; the service carries them out itself.
pub fn plan(
    cmd: MartaCommand,
    now: Snapshot,
    controls: &Controls,
    limits: &Limits,
    reset_pulse: Duration,
) -> Result<Vec<Op>, String> {
    use MartaCommand as C;
    if matches!(cmd, C::Refresh | C::Reconnect) {
        return Ok(Vec::new());
    }
    if matches!(now.state, State::Init | State::Disconnected) {
        return Err(format!(
            "MARTA is {}: nothing can be written until it answers",
            now.state.as_str()
        ));
    }
    let alarm = now.state == State::Alarm;
    // A start bit is not a running stage: starts need the PLC ready (status 1 or 2).
    let startable = || {
        if alarm {
            return Err("MARTA is in ALARM: clear_alarms first".to_string());
        }
        match now.status_word {
            Some(fsm::status::READY | fsm::status::CO2_RUNNING) => Ok(()),
            Some(w) => Err(format!(
                "MARTA is not ready (status word {w}): nothing is started"
            )),
            None => Err("MARTA's status word is unknown: nothing is started".to_string()),
        }
    };
    let range = |what: &str, v: f64, [lo, hi]: [f64; 2], unit: &str| {
        if (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err(format!(
                "{what} {} {unit} is outside {} .. {} {unit}",
                show_number(v),
                show_number(lo),
                show_number(hi)
            ))
        }
    };
    Ok(match cmd {
        C::StartChiller => {
            startable()?;
            vec![bits(controls.start_chiller, true)]
        }
        C::StartCo2 => {
            startable()?;
            if !now.chiller_bit || !matches!(now.state, State::ChillerRunning | State::Co2Running) {
                return Err(format!(
                    "start_chiller first: CO2 starts only with the chiller running (state {})",
                    now.state.as_str()
                ));
            }
            // The chiller bit must still be set when the word is read for the write.
            let b = controls.start_co2;
            vec![Op::Bits {
                register: b.register,
                set: b.mask(),
                clear: 0,
                require: controls.start_chiller.mask(),
                confirm: b.mask(),
            }]
        }
        C::StopCo2 => vec![bits(controls.start_co2, false)],
        C::StopChiller => {
            if now.co2_bit {
                return Err(
                    "stop_co2 first: the chiller stops only with the CO2 loop stopped".into(),
                );
            }
            vec![bits(controls.start_chiller, false)]
        }
        C::SetFlowActive(on) => vec![bits(controls.flow_active, on)],
        C::SetTemperature(v) => {
            range("temperature set-point", v, limits.temperature, "degC")?;
            vec![Op::Float {
                register: controls.temperature_setpoint,
                value: v as f32,
            }]
        }
        C::SetSpeed(v) => {
            range("speed set-point", v, limits.speed, "rpm")?;
            vec![Op::Float {
                register: controls.speed_setpoint,
                value: v as f32,
            }]
        }
        C::SetFlow(v) => {
            range("flow set-point", v, limits.flow, "g/s")?;
            vec![Op::Float {
                register: controls.flow_setpoint,
                value: v as f32,
            }]
        }
        C::ClearAlarms => {
            // It stops the plant: only when the plant is tripped or stopped already.
            if !alarm && (now.chiller_bit || now.co2_bit) {
                return Err(format!(
                    "MARTA is {} and not in ALARM: clear_alarms would stop it; stop_co2 and stop_chiller first",
                    now.state.as_str()
                ));
            }
            // The start bits first, so that nothing restarts by itself once the alarm
            // is reset, with the reset bit (a pulse cut short must not hide this one's
            // rising edge); then the reset bit set and cleared again. A PLC may clear
            // the reset bit itself: its setting need not read back.
            let mut ops: Vec<Op> = Vec::new();
            for b in [
                controls.start_co2,
                controls.start_chiller,
                controls.alarm_reset,
            ] {
                match ops
                    .iter_mut()
                    .find(|o| matches!(o, Op::Bits { register, .. } if *register == b.register))
                {
                    Some(Op::Bits { clear, confirm, .. }) => {
                        *clear |= b.mask();
                        *confirm |= b.mask();
                    }
                    _ => ops.push(bits(b, false)),
                }
            }
            let r = controls.alarm_reset;
            ops.push(Op::Bits {
                register: r.register,
                set: r.mask(),
                clear: 0,
                require: 0,
                confirm: 0,
            });
            ops.push(Op::Pause(reset_pulse));
            ops.push(bits(r, false));
            ops
        }
        C::Refresh | C::Reconnect => Vec::new(),
    })
}

/// The word to write for `Op::Bits` over what was read.
pub fn apply_bits(read: u16, set: u16, clear: u16) -> u16 {
    (read & !clear) | set
}

/// Whether a read-back confirms `Op::Bits`: the bits of `confirm` as asked (the PLC
/// may change others, e.g. clear a start bit on a trip, between the write and the
/// read).
pub fn bits_confirmed(read_back: u16, set: u16, confirm: u16) -> bool {
    read_back & confirm == set & confirm
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controls() -> Controls {
        let b = |bit| Bit { register: 305, bit };
        Controls {
            start_chiller: b(0),
            start_co2: b(1),
            flow_active: b(2),
            alarm_reset: b(3),
            temperature_setpoint: 310,
            speed_setpoint: 312,
            flow_setpoint: 314,
        }
    }

    /// A snapshot whose status word is what the state implies.
    fn snap(state: State, chiller_bit: bool, co2_bit: bool) -> Snapshot {
        let status_word = match state {
            State::Alarm => Some(3),
            State::Co2Running => Some(2),
            State::Init | State::Disconnected => None,
            _ => Some(1),
        };
        Snapshot {
            state,
            chiller_bit,
            co2_bit,
            status_word,
        }
    }

    fn p(cmd: MartaCommand, s: Snapshot) -> Result<Vec<Op>, String> {
        plan(
            cmd,
            s,
            &controls(),
            &Limits::default(),
            Duration::from_millis(500),
        )
    }

    fn parse(verb: &str, payload: &str) -> Result<MartaCommand, CommandError> {
        MartaCommand::parse(&[verb], payload.as_bytes())
    }

    #[test]
    fn parsing() {
        assert_eq!(parse("start_co2", ""), Ok(MartaCommand::StartCo2));
        assert_eq!(
            parse("set_flow_active", "1"),
            Ok(MartaCommand::SetFlowActive(true))
        );
        assert_eq!(
            parse("set_flow_active", "0"),
            Ok(MartaCommand::SetFlowActive(false))
        );
        assert_eq!(
            parse("set_temperature_setpoint", "-30.5"),
            Ok(MartaCommand::SetTemperature(-30.5))
        );
        assert!(parse("set_flow_active", "2")
            .unwrap_err()
            .0
            .contains("0 or 1"));
        assert!(parse("set_speed_setpoint", "fast")
            .unwrap_err()
            .0
            .contains("must be a number"));
        assert!(parse("set_flow_setpoint", "NaN")
            .unwrap_err()
            .0
            .contains("must be a number"));
        assert!(parse("start_chiller", "now")
            .unwrap_err()
            .0
            .contains("no payload"));
        assert!(parse("explode", "")
            .unwrap_err()
            .0
            .contains("unknown command `explode`"));
    }

    #[test]
    fn starts_and_stops_follow_the_plant() {
        let idle = snap(State::Connected, false, false);
        let chiller = snap(State::ChillerRunning, true, false);
        let co2 = snap(State::Co2Running, true, true);
        let alarm = snap(State::Alarm, true, true);
        let set = |bit: u8, require: u16| {
            Ok(vec![Op::Bits {
                register: 305,
                set: 1 << bit,
                clear: 0,
                require,
                confirm: 1 << bit,
            }])
        };
        let clear = |bit: u8| {
            Ok(vec![Op::Bits {
                register: 305,
                set: 0,
                clear: 1 << bit,
                require: 0,
                confirm: 1 << bit,
            }])
        };
        assert_eq!(p(MartaCommand::StartChiller, idle), set(0, 0));
        assert!(p(MartaCommand::StartCo2, idle)
            .unwrap_err()
            .contains("start_chiller first"));
        // CO2 requires the chiller bit still set when the word is read for the write.
        assert_eq!(p(MartaCommand::StartCo2, chiller), set(1, 0b1));
        // A start bit is not a running stage: the PLC must say it is ready.
        for w in [0, 7] {
            let not_ready = Snapshot {
                status_word: Some(w),
                ..chiller
            };
            assert!(p(MartaCommand::StartCo2, not_ready)
                .unwrap_err()
                .contains("not ready"));
            let idle0 = Snapshot {
                status_word: Some(w),
                ..idle
            };
            assert!(p(MartaCommand::StartChiller, idle0)
                .unwrap_err()
                .contains("not ready"));
        }
        assert!(p(MartaCommand::StopChiller, co2)
            .unwrap_err()
            .contains("stop_co2 first"));
        assert_eq!(p(MartaCommand::StopCo2, co2), clear(1));
        assert_eq!(p(MartaCommand::StopChiller, chiller), clear(0));
        // In ALARM: nothing starts; stopping is always allowed.
        assert!(p(MartaCommand::StartChiller, alarm)
            .unwrap_err()
            .contains("clear_alarms first"));
        assert!(p(MartaCommand::StartCo2, alarm)
            .unwrap_err()
            .contains("clear_alarms first"));
        assert_eq!(p(MartaCommand::StopCo2, alarm), clear(1));
        // Not connected: nothing is written.
        for s in [State::Init, State::Disconnected] {
            assert!(p(MartaCommand::StopCo2, snap(s, false, false))
                .unwrap_err()
                .contains("nothing can be written"));
        }
        assert_eq!(
            p(
                MartaCommand::Refresh,
                snap(State::Disconnected, false, false)
            ),
            Ok(vec![])
        );
    }

    #[test]
    fn setpoints_are_range_checked() {
        let s = snap(State::Co2Running, true, true);
        assert_eq!(
            p(MartaCommand::SetTemperature(-35.0), s),
            Ok(vec![Op::Float {
                register: 310,
                value: -35.0
            }])
        );
        let e = p(MartaCommand::SetTemperature(-40.0), s).unwrap_err();
        assert_eq!(
            e,
            "temperature set-point -40 degC is outside -35 .. 25 degC"
        );
        assert!(p(MartaCommand::SetSpeed(6000.5), s)
            .unwrap_err()
            .contains("0 .. 6000 rpm"));
        assert!(p(MartaCommand::SetFlow(-0.1), s)
            .unwrap_err()
            .contains("0 .. 5 g/s"));
        assert_eq!(
            p(MartaCommand::SetFlow(2.5), s),
            Ok(vec![Op::Float {
                register: 314,
                value: 2.5
            }])
        );
        // A safe set-point can be set during an alarm (the interlock does).
        assert!(p(
            MartaCommand::SetTemperature(20.0),
            snap(State::Alarm, false, false)
        )
        .is_ok());
    }

    #[test]
    fn clear_alarms_clears_the_start_bits_before_the_reset_pulse() {
        let ops = p(MartaCommand::ClearAlarms, snap(State::Alarm, true, true)).unwrap();
        assert_eq!(
            ops,
            vec![
                // Start bits and a reset bit left over, read back cleared.
                Op::Bits {
                    register: 305,
                    set: 0,
                    clear: 0b1011,
                    require: 0,
                    confirm: 0b1011
                },
                // The PLC may clear the reset bit itself: not required to read back.
                Op::Bits {
                    register: 305,
                    set: 0b1000,
                    clear: 0,
                    require: 0,
                    confirm: 0
                },
                Op::Pause(Duration::from_millis(500)),
                Op::Bits {
                    register: 305,
                    set: 0,
                    clear: 0b1000,
                    require: 0,
                    confirm: 0b1000
                },
            ]
        );
        // Not in ALARM, running: it would stop the plant; refused. Stopped: allowed.
        let e = p(
            MartaCommand::ClearAlarms,
            snap(State::Co2Running, true, true),
        )
        .unwrap_err();
        assert!(e.contains("would stop it"), "{e}");
        assert!(p(
            MartaCommand::ClearAlarms,
            snap(State::ChillerRunning, true, false)
        )
        .is_err());
        assert!(p(
            MartaCommand::ClearAlarms,
            snap(State::Connected, false, false)
        )
        .is_ok());
    }

    #[test]
    fn read_modify_write_keeps_other_bits() {
        // Flow active (bit 2) survives starting CO2.
        assert_eq!(apply_bits(0b0101, 0b0010, 0), 0b0111);
        assert_eq!(apply_bits(0b0111, 0, 0b0011), 0b0100);
        assert!(bits_confirmed(0b0111, 0b0010, 0b0010));
        assert!(!bits_confirmed(0b0101, 0b0010, 0b0010));
        // The PLC dropped another bit meanwhile: still confirmed.
        assert!(bits_confirmed(0b0010, 0b0010, 0b0010));
        assert!(bits_confirmed(0b0100, 0, 0b0011));
        assert!(!bits_confirmed(0b0101, 0, 0b0011));
        // A bit outside `confirm` (a pulse the PLC clears itself) is not checked.
        assert!(bits_confirmed(0b0000, 0b1000, 0));
    }

    mod properties {
        //! No sequence of commands and plant events makes the driver write an unsafe
        //! control word: the CO2 start bit never set without the chiller's, no start
        //! while the plant is in ALARM, the reset bit never left set, no set-point
        //! outside the limits, nothing written while the plant does not answer.
        use super::*;
        use crate::fsm;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Step {
            /// A command; the PLC clears the bits of the mask between the plan and
            /// its writes (a trip racing the command).
            Command(MartaCommand, u16),
            /// The PLC's status word changes (0..3, or nonsense).
            Status(u16),
            /// A trip: the PLC (or a front panel) clears start bits of its own.
            PlcClears(u16),
            /// The connection comes and goes.
            Link(bool),
        }

        fn command() -> impl Strategy<Value = MartaCommand> {
            use MartaCommand as C;
            prop_oneof![
                Just(C::StartChiller),
                Just(C::StartCo2),
                Just(C::StopCo2),
                Just(C::StopChiller),
                Just(C::ClearAlarms),
                Just(C::Refresh),
                Just(C::Reconnect),
                any::<bool>().prop_map(C::SetFlowActive),
                (-60.0..60.0f64).prop_map(C::SetTemperature),
                (-100.0..7000.0f64).prop_map(C::SetSpeed),
                (-1.0..7.0f64).prop_map(C::SetFlow),
            ]
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                6 => (command(), prop_oneof![4 => Just(0u16), 1 => 0u16..4]).prop_map(|(c, r)| Step::Command(c, r)),
                2 => (0u16..6).prop_map(Step::Status),
                1 => (0u16..16).prop_map(Step::PlcClears),
                1 => any::<bool>().prop_map(Step::Link),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]
            #[test]
            fn no_sequence_writes_an_unsafe_control_word(steps in proptest::collection::vec(step(), 1..40)) {
                let c = controls();
                let limits = Limits::default();
                let (chiller, co2, reset) = (c.start_chiller.mask(), c.start_co2.mask(), c.alarm_reset.mask());
                let (mut word, mut status, mut connected) = (0u16, 1u16, true);
                for s in steps {
                    match s {
                        Step::Status(v) => status = v,
                        Step::PlcClears(m) => word &= !m,
                        Step::Link(up) => connected = up,
                        Step::Command(cmd, race) => {
                            let (state, _) = fsm::state(status, word & chiller != 0, word & co2 != 0);
                            let state = if connected { state } else { State::Disconnected };
                            let snap = Snapshot {
                                state,
                                chiller_bit: word & chiller != 0,
                                co2_bit: word & co2 != 0,
                                status_word: connected.then_some(status),
                            };
                            let Ok(ops) = plan(cmd, snap, &c, &limits, Duration::from_millis(1)) else { continue };
                            prop_assert!(connected || ops.is_empty(), "{cmd:?} wrote while disconnected");
                            word &= !race;
                            for op in &ops {
                                match *op {
                                    Op::Bits { register, set, clear, require, .. } => {
                                        prop_assert_eq!(register, 305);
                                        // The driver writes nothing when a required bit is gone.
                                        if word & require != require {
                                            break;
                                        }
                                        let before = word;
                                        word = apply_bits(word, set, clear);
                                        let started = word & !before & (chiller | co2) != 0;
                                        prop_assert!(!(started && state == State::Alarm), "{cmd:?} started something in ALARM");
                                        prop_assert!(!started || matches!(status, 1 | 2), "{cmd:?} started something with status word {status}");
                                        // A CO2 start bit the driver sets or keeps needs the chiller's.
                                        prop_assert!(
                                            word & co2 == 0 || word & chiller != 0 || before & co2 != 0 && before & chiller == 0,
                                            "{cmd:?}: CO2 bit without the chiller's: {before:#b} -> {word:#b}"
                                        );
                                    }
                                    Op::Float { register, value } => {
                                        let [lo, hi] = match register {
                                            310 => limits.temperature,
                                            312 => limits.speed,
                                            314 => limits.flow,
                                            r => return Err(TestCaseError::fail(format!("write to {r}"))),
                                        };
                                        prop_assert!((lo..=hi).contains(&f64::from(value)), "{cmd:?} wrote {value}");
                                    }
                                    Op::Pause(_) => {}
                                }
                            }
                            prop_assert_eq!(word & reset, 0, "{:?} left the reset bit set", cmd);
                            if cmd == MartaCommand::ClearAlarms {
                                prop_assert_eq!(word & (chiller | co2), 0);
                            }
                        }
                    }
                }
            }
        }
    }
}
