//! The Julabo circulator's serial protocol: bytes in, values out. No I/O here.
//!
//! A command is ASCII text terminated by CR. Only queries (`IN_*`, `VERSION`, `STATUS`)
//! answer, with a line ending in LF (usually CRLF); writes (`OUT_*`) are silent, so a
//! write is verified by reading the value back. The device drops a command that comes
//! less than [`MIN_SPACING`] after the previous one.

use std::fmt;
use std::time::Duration;

/// The unit's minimum spacing between two commands (SPEC 5.1).
pub const MIN_SPACING: Duration = Duration::from_millis(250);

/// A query: a command that answers with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Query {
    /// `VERSION`: model string.
    Version,
    /// `STATUS`: `NN TEXT`.
    Status,
    /// `IN_PV_00`: bath temperature, degC.
    BathTemp,
    /// `IN_PV_01` (heating/cooling power or external Pt100, by model).
    Pv1,
    /// `IN_PV_02` (the other one).
    Pv2,
    /// `IN_SP_0n`, n = 0..2: set-point n+1, degC.
    Setpoint(u8),
    /// `IN_MODE_01`: active set-point, 0-based.
    ActiveSetpoint,
    /// `IN_MODE_04`: 0 internal, 1 external Pt100 control.
    ExternalControl,
    /// `IN_MODE_05`: 0 stopped, 1 circulating.
    Running,
}

impl Query {
    /// The command text, without terminator.
    pub fn text(self) -> String {
        match self {
            Query::Version => "VERSION".into(),
            Query::Status => "STATUS".into(),
            Query::BathTemp => "IN_PV_00".into(),
            Query::Pv1 => "IN_PV_01".into(),
            Query::Pv2 => "IN_PV_02".into(),
            Query::Setpoint(n) => format!("IN_SP_{n:02}"),
            Query::ActiveSetpoint => "IN_MODE_01".into(),
            Query::ExternalControl => "IN_MODE_04".into(),
            Query::Running => "IN_MODE_05".into(),
        }
    }
}

/// A write: silent on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Write {
    /// `OUT_SP_0n t`: set-point n+1 (n = 0..2) to t degC.
    Setpoint(u8, f64),
    /// `OUT_MODE_01 n`: use set-point n+1.
    ActiveSetpoint(u8),
    /// `OUT_MODE_04 0|1`: internal / external Pt100 control.
    ExternalControl(bool),
    /// `OUT_SP_07 p`: pump pressure stage 1..4.
    PumpStage(u8),
    /// `OUT_MODE_05 1|0`: start / stop circulating.
    Run(bool),
}

impl Write {
    /// The command text, without terminator.
    pub fn text(self) -> String {
        match self {
            Write::Setpoint(n, t) => format!("OUT_SP_{n:02} {t:.2}"),
            Write::ActiveSetpoint(n) => format!("OUT_MODE_01 {n}"),
            Write::ExternalControl(on) => format!("OUT_MODE_04 {}", u8::from(on)),
            Write::PumpStage(p) => format!("OUT_SP_07 {p}"),
            Write::Run(on) => format!("OUT_MODE_05 {}", u8::from(on)),
        }
    }

    /// The query that reads the written value back, if the unit has one.
    pub fn readback(self) -> Option<Query> {
        match self {
            Write::Setpoint(n, _) => Some(Query::Setpoint(n)),
            Write::ActiveSetpoint(_) => Some(Query::ActiveSetpoint),
            Write::ExternalControl(_) => Some(Query::ExternalControl),
            Write::Run(_) => Some(Query::Running),
            // No IN_ command for the pump stage: verified through STATUS only.
            Write::PumpStage(_) => None,
        }
    }

    /// Whether a read-back reply shows the write took effect.
    pub fn confirmed_by(self, reply: &str) -> Result<bool, ProtocolError> {
        Ok(match self {
            Write::Setpoint(_, t) => (parse_float(reply)? - t).abs() < 0.05,
            Write::ActiveSetpoint(n) => parse_int(reply)? == i64::from(n),
            Write::ExternalControl(on) => parse_int(reply)? == i64::from(on),
            Write::Run(on) => parse_int(reply)? == i64::from(on),
            Write::PumpStage(_) => true,
        })
    }
}

/// A reply that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtocolError {}

fn quoted(reply: &str) -> String {
    let shown: String = reply
        .chars()
        .take(40)
        .flat_map(char::escape_default)
        .collect();
    format!("`{shown}`")
}

/// Parses a temperature or power reply (`  21.53`).
pub fn parse_float(reply: &str) -> Result<f64, ProtocolError> {
    let t = reply.trim();
    t.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| ProtocolError(format!("expected a number, got {}", quoted(reply))))
}

/// Parses an integer reply (`1`).
pub fn parse_int(reply: &str) -> Result<i64, ProtocolError> {
    let t = reply.trim();
    t.parse::<i64>()
        .ok()
        .or_else(|| {
            t.parse::<f64>()
                .ok()
                .filter(|f| f.fract() == 0.0)
                .map(|f| f as i64)
        })
        .ok_or_else(|| ProtocolError(format!("expected an integer, got {}", quoted(reply))))
}

/// The unit's status: code and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// `3` for `03 REMOTE START`, `-8` for `-08 INVALID COMMAND`.
    pub code: i8,
    /// The text as the unit sent it (or from the code table when it sent none).
    pub text: String,
}

impl Status {
    /// Manual control (00, 01): the front panel has it, remote writes are refused.
    pub fn is_manual(&self) -> bool {
        self.code == 0 || self.code == 1
    }

    /// Negative codes are alarms and errors.
    pub fn is_error(&self) -> bool {
        self.code < 0
    }

    /// -08 .. -13: the unit reports once that it rejected the previous command; this
    /// says nothing about its operating state, which STATUS gives again next time.
    pub fn is_command_error(&self) -> bool {
        (-13..=-8).contains(&self.code)
    }
}

impl fmt::Display for Status {
    /// As the unit writes it: `03 REMOTE START`, `-01 LOW LEVEL`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.code < 0 { "-" } else { "" };
        write!(f, "{sign}{:02} {}", self.code.unsigned_abs(), self.text)
    }
}

/// Meaning of every status code of SPEC 5.1.
pub fn status_text(code: i8) -> Option<&'static str> {
    Some(match code {
        0 => "MANUAL STOP",
        1 => "MANUAL START",
        2 => "REMOTE STOP",
        3 => "REMOTE START",
        -1 => "LOW LEVEL",
        -2 => "COOLING UNIT",
        -3 => "EXCESS TEMP WARNING",
        -4 => "LOW TEMP WARNING",
        -5 => "WORKING SENSOR",
        -6 => "SENSOR DIFFERENCE",
        -7 => "I2C-BUS",
        -8 => "INVALID COMMAND",
        -9 => "NOT ALLOWED IN MODE",
        -10 => "VALUE TOO SMALL",
        -11 => "VALUE TOO LARGE",
        -12 => "TEMP MEASUREMENT",
        -13 => "VALUE EXCEEDS TEMP LIMITS",
        -14 => "TEMPERATURE/LEVEL ALARM",
        _ => return None,
    })
}

/// Parses a `STATUS` reply: `03 REMOTE START`, `-08 INVALID COMMAND`, or a bare code.
pub fn parse_status(reply: &str) -> Result<Status, ProtocolError> {
    let t = reply.trim();
    let (code, text) = match t.split_once(char::is_whitespace) {
        Some((c, rest)) => (c, rest.trim()),
        None => (t, ""),
    };
    let code: i8 = code
        .parse()
        .ok()
        .filter(|c: &i8| status_text(*c).is_some())
        .ok_or_else(|| {
            ProtocolError(format!("expected `NN TEXT` status, got {}", quoted(reply)))
        })?;
    let text = if text.is_empty() {
        status_text(code).unwrap_or("").to_string()
    } else {
        text.to_string()
    };
    Ok(Status { code, text })
}

/// A reply, parsed for the query it answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// STATUS.
    Status(Status),
    /// A temperature, power or set-point.
    Float(f64),
    /// A mode (`IN_MODE_0n`).
    Int(i64),
}

/// Parses the reply to `q`. The active set-point must be 0, 1 or 2 and the modes 0
/// or 1: anything else is not an answer this driver can act on.
pub fn parse_reply(q: Query, reply: &str) -> Result<Value, ProtocolError> {
    match q {
        Query::Status => parse_status(reply).map(Value::Status),
        Query::Version => Ok(Value::Int(0)),
        Query::BathTemp | Query::Pv1 | Query::Pv2 | Query::Setpoint(_) => {
            parse_float(reply).map(Value::Float)
        }
        Query::ActiveSetpoint | Query::ExternalControl | Query::Running => {
            let max = if q == Query::ActiveSetpoint { 2 } else { 1 };
            let v = parse_int(reply)?;
            if (0..=max).contains(&v) {
                Ok(Value::Int(v))
            } else {
                Err(ProtocolError(format!("expected 0 .. {max}, got {v}")))
            }
        }
    }
}

/// Splits received bytes into reply lines: each ends at LF; a CR before it and
/// surrounding whitespace are dropped. Returns the lines and the unfinished rest.
pub fn split_lines(buf: &[u8]) -> (Vec<String>, &[u8]) {
    let mut lines = Vec::new();
    let mut rest = buf;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(&rest[..i]).trim().to_string();
        lines.push(line);
        rest = &rest[i + 1..];
    }
    (lines, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_texts() {
        assert_eq!(Query::Setpoint(2).text(), "IN_SP_02");
        assert_eq!(Query::ActiveSetpoint.text(), "IN_MODE_01");
        assert_eq!(Write::Setpoint(0, -12.345).text(), "OUT_SP_00 -12.35");
        assert_eq!(Write::ExternalControl(true).text(), "OUT_MODE_04 1");
        assert_eq!(Write::Run(false).text(), "OUT_MODE_05 0");
        assert_eq!(Write::PumpStage(3).text(), "OUT_SP_07 3");
    }

    #[test]
    fn readback_confirms() {
        assert_eq!(
            Write::Setpoint(1, 18.0).readback(),
            Some(Query::Setpoint(1))
        );
        assert!(Write::Setpoint(1, 18.0).confirmed_by(" 18.00").unwrap());
        assert!(!Write::Setpoint(1, 18.0).confirmed_by("20.00").unwrap());
        assert!(Write::ActiveSetpoint(2).confirmed_by("2").unwrap());
        assert!(Write::Run(true).confirmed_by("1").unwrap());
        assert!(Write::Setpoint(0, 1.0).confirmed_by("ERR").is_err());
        assert_eq!(Write::PumpStage(2).readback(), None);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_float("  21.53 "), Ok(21.53));
        assert_eq!(parse_float("-5"), Ok(-5.0));
        assert!(parse_float("").unwrap_err().0.contains("expected a number"));
        assert!(parse_float("NaN").is_err());
        assert!(parse_float("\u{1}\u{2}zz")
            .unwrap_err()
            .0
            .contains("\\u{1}"));
        assert_eq!(parse_int("1"), Ok(1));
        assert_eq!(parse_int("2.0"), Ok(2));
        assert!(parse_int("2.5").is_err());
    }

    #[test]
    fn statuses() {
        let s = parse_status("03 REMOTE START\r").unwrap();
        assert_eq!((s.code, s.text.as_str()), (3, "REMOTE START"));
        assert!(!s.is_manual() && !s.is_error());
        let s = parse_status("-08 INVALID COMMAND").unwrap();
        assert!(s.is_error());
        assert_eq!(s.to_string(), "-08 INVALID COMMAND");
        assert_eq!(s.code, -8);
        assert!(parse_status("01").unwrap().is_manual());
        assert_eq!(parse_status("-14").unwrap().text, "TEMPERATURE/LEVEL ALARM");
        assert!(parse_status("99 WHAT").is_err());
        assert!(parse_status("garbage").is_err());
        assert!(parse_status("").is_err());
    }

    #[test]
    fn replies_are_parsed_for_their_query() {
        assert_eq!(
            parse_reply(Query::Setpoint(1), " 18.00"),
            Ok(Value::Float(18.0))
        );
        assert_eq!(parse_reply(Query::ActiveSetpoint, "2"), Ok(Value::Int(2)));
        assert!(parse_reply(Query::ActiveSetpoint, "3")
            .unwrap_err()
            .0
            .contains("0 .. 2"));
        assert!(parse_reply(Query::ExternalControl, "2").is_err());
        assert!(parse_reply(Query::BathTemp, "03 REMOTE START").is_err());
        assert!(matches!(
            parse_reply(Query::Status, "-08 INVALID COMMAND"),
            Ok(Value::Status(s)) if s.is_command_error()
        ));
        assert!(!parse_status("-01 LOW LEVEL").unwrap().is_command_error());
    }

    #[test]
    fn line_splitting() {
        let (lines, rest) = split_lines(b"21.5\r\n03 REMOTE START\r\n-1");
        assert_eq!(lines, vec!["21.5", "03 REMOTE START"]);
        assert_eq!(rest, b"-1");
        let (lines, rest) = split_lines(b"\xff\xfe\n");
        assert_eq!(lines.len(), 1);
        assert!(rest.is_empty());
    }
}
