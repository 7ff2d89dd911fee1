//! The MiddlewareController protocol of SPEC 6.1, bytes in and replies out, no I/O.
//!
//! Frames: a 4-byte big-endian length that counts itself, then UTF-8 text. The
//! [`Controller`] enforces the order of commands (`Initialize`, `Configure`, `Start`,
//! then `Status?`/`Pause`/`Resume`/`Stop`, `Halt`), as the real one does. Deliberately
//! written apart from the bridge's client, so each is checked against an independent
//! reading of the SPEC.

/// Largest frame accepted; the real messages are a few hundred bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// Frames `text` for the wire.
pub fn encode(text: &str) -> Vec<u8> {
    let len = (text.len() + 4) as u32;
    let mut out = Vec::with_capacity(text.len() + 4);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// Why a frame is unreadable (the connection is closed: the stream is out of step).
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Length below 4 or above [`MAX_FRAME`].
    BadLength(u32),
    /// Body is not UTF-8.
    NotText,
}

/// Takes one complete frame off the front of `buf`, if there is one.
pub fn decode(buf: &mut Vec<u8>) -> Result<Option<String>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 4 || len as usize > MAX_FRAME {
        return Err(FrameError::BadLength(len));
    }
    if buf.len() < len as usize {
        return Ok(None);
    }
    let body: Vec<u8> = buf.drain(..len as usize).skip(4).collect();
    String::from_utf8(body)
        .map(Some)
        .map_err(|_| FrameError::NotText)
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `Initialize`.
    Initialize,
    /// `Configure,Calibration:<name>,ConfigurationFile:<path>`.
    Configure {
        /// Calibration name.
        calibration: String,
        /// Path of the hardware description XML.
        config_file: String,
    },
    /// `Start:{RunNumber:<n>}`.
    Start {
        /// Run number chosen by the client.
        run_number: u64,
    },
    /// `Status?`.
    Status,
    /// `Stop`.
    Stop,
    /// `Halt`.
    Halt,
    /// `Pause`.
    Pause,
    /// `Resume`.
    Resume,
}

/// Parses one message; `None` for anything the real server would abort on.
pub fn parse(text: &str) -> Option<Request> {
    match text {
        "Initialize" => return Some(Request::Initialize),
        "Status?" => return Some(Request::Status),
        "Stop" => return Some(Request::Stop),
        "Halt" => return Some(Request::Halt),
        "Pause" => return Some(Request::Pause),
        "Resume" => return Some(Request::Resume),
        _ => {}
    }
    if let Some(rest) = text.strip_prefix("Configure,") {
        let mut calibration = None;
        let mut config_file = None;
        for part in rest.split(',') {
            if let Some(v) = part.strip_prefix("Calibration:") {
                calibration = Some(v.to_string());
            } else if let Some(v) = part.strip_prefix("ConfigurationFile:") {
                config_file = Some(v.to_string());
            } else {
                return None;
            }
        }
        return Some(Request::Configure {
            calibration: calibration.filter(|c| !c.is_empty())?,
            config_file: config_file.filter(|c| !c.is_empty())?,
        });
    }
    let n = text
        .strip_prefix("Start:{RunNumber:")?
        .strip_suffix('}')?
        .parse()
        .ok()?;
    Some(Request::Start { run_number: n })
}

/// Where the controller is in the run cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Fresh, or after `Halt`.
    Idle,
    /// After `Initialize`.
    Initialized,
    /// After `Configure` (and after a run ended by `Stop`).
    Configured,
    /// A run is going (or paused, or done but not yet stopped).
    Running,
}

/// What the server must do besides replying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Start run `run_number` of `calibration` with `config_file`.
    StartRun {
        /// Calibration.
        calibration: String,
        /// Hardware description.
        config_file: String,
        /// Run number.
        run_number: u64,
    },
    /// Stop the run (results are closed as they are).
    StopRun,
    /// Pause or resume the run.
    Pause(bool),
}

/// The run-cycle state machine of one server.
#[derive(Debug)]
pub struct Controller {
    phase: Phase,
    calibrations: Vec<String>,
    configured: Option<(String, String)>,
}

impl Controller {
    /// A controller knowing `calibrations`.
    pub fn new(calibrations: Vec<String>) -> Self {
        Controller {
            phase: Phase::Idle,
            calibrations,
            configured: None,
        }
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Handles `req`; `run_done` says whether the current run has finished. Returns
    /// the reply text and what to do.
    pub fn handle(&mut self, req: Request, run_done: bool) -> (String, Action) {
        use Phase::*;
        let refuse = |what: &str, phase: Phase| {
            (
                format!("Error:{what} is not valid in state {phase:?}"),
                Action::None,
            )
        };
        match (req, self.phase) {
            (Request::Initialize, Idle) => {
                self.phase = Initialized;
                ("InitializeDone".into(), Action::None)
            }
            (
                Request::Configure {
                    calibration,
                    config_file,
                },
                Initialized | Configured,
            ) => {
                if !self.calibrations.contains(&calibration) {
                    return (
                        format!("Error:unknown calibration {calibration}"),
                        Action::None,
                    );
                }
                self.configured = Some((calibration, config_file));
                self.phase = Configured;
                ("ConfigureDone".into(), Action::None)
            }
            (Request::Start { run_number }, Configured) => {
                let Some((calibration, config_file)) = self.configured.clone() else {
                    return refuse("Start", Configured);
                };
                self.phase = Running;
                (
                    "StartDone".into(),
                    Action::StartRun {
                        calibration,
                        config_file,
                        run_number,
                    },
                )
            }
            (Request::Status, Running) => (
                if run_done { "Done" } else { "Running" }.into(),
                Action::None,
            ),
            (Request::Status, p) => (format!("{p:?}"), Action::None),
            (Request::Stop, Running) => {
                self.phase = Configured;
                ("StopDone".into(), Action::StopRun)
            }
            (Request::Pause, Running) => ("PauseDone".into(), Action::Pause(true)),
            (Request::Resume, Running) => ("ResumeDone".into(), Action::Pause(false)),
            (Request::Halt, Running) => {
                self.phase = Idle;
                self.configured = None;
                ("HaltDone".into(), Action::StopRun)
            }
            (Request::Halt, _) => {
                self.phase = Idle;
                self.configured = None;
                ("HaltDone".into(), Action::None)
            }
            (req, p) => refuse(&format!("{req:?}"), p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_split() {
        let mut buf = encode("Status?");
        assert_eq!(&buf[..4], &[0, 0, 0, 11]);
        buf.extend(encode("Stop"));
        let mut partial = buf[..5].to_vec();
        assert_eq!(decode(&mut partial), Ok(None));
        assert_eq!(decode(&mut buf), Ok(Some("Status?".into())));
        assert_eq!(decode(&mut buf), Ok(Some("Stop".into())));
        assert!(buf.is_empty());
        assert_eq!(decode(&mut vec![0, 0, 0, 2]), Err(FrameError::BadLength(2)));
        assert_eq!(
            decode(&mut vec![0xff, 0, 0, 0, 1]),
            Err(FrameError::BadLength(0xff00_0000))
        );
        assert_eq!(
            decode(&mut vec![0, 0, 0, 5, 0xff]),
            Err(FrameError::NotText)
        );
    }

    #[test]
    fn parses_the_dialect() {
        assert_eq!(
            parse("Configure,Calibration:pedenoise,ConfigurationFile:/x/PS.xml"),
            Some(Request::Configure {
                calibration: "pedenoise".into(),
                config_file: "/x/PS.xml".into()
            })
        );
        assert_eq!(
            parse("Start:{RunNumber:500749}"),
            Some(Request::Start { run_number: 500749 })
        );
        for bad in [
            "start",
            "Configure,Calibration:x",
            "Configure,Calibration:x,ConfigurationFile:y,Z:1",
            "Start:{RunNumber:-1}",
            "Start:{RunNumber:1",
            "Status",
            "",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn commands_only_in_order() {
        let mut c = Controller::new(vec!["pedenoise".into()]);
        let start = Request::Start { run_number: 7 };
        assert!(c.handle(start.clone(), false).0.starts_with("Error:"));
        assert_eq!(c.handle(Request::Initialize, false).0, "InitializeDone");
        let cfg = |cal: &str| Request::Configure {
            calibration: cal.into(),
            config_file: "a.xml".into(),
        };
        assert_eq!(
            c.handle(cfg("nonsense"), false).0,
            "Error:unknown calibration nonsense"
        );
        assert!(c.handle(start.clone(), false).0.starts_with("Error:"));
        assert_eq!(c.handle(cfg("pedenoise"), false).0, "ConfigureDone");
        let (reply, action) = c.handle(start, false);
        assert_eq!(reply, "StartDone");
        assert!(matches!(action, Action::StartRun { run_number: 7, .. }));
        assert_eq!(c.handle(Request::Status, false).0, "Running");
        assert_eq!(c.handle(Request::Status, true).0, "Done");
        assert_eq!(
            c.handle(Request::Stop, true),
            ("StopDone".into(), Action::StopRun)
        );
        assert_eq!(c.phase(), Phase::Configured);
        assert_eq!(c.handle(Request::Halt, false).0, "HaltDone");
        assert_eq!(c.phase(), Phase::Idle);
    }
}
