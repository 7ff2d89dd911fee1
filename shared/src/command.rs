//! The command/reply envelope of SPEC 3.4.
//!
//! A service named `<name>` takes commands on `<name>/cmd/<verb>[/<args>...]`. Each
//! service parses them into its own enum by implementing [`Command`]; anything that does
//! not parse becomes a [`CommandError`] whose text is sent back to the operator. Every
//! command gets exactly one [`Reply`] on `<name>/reply` (see
//! [`Session::reply`](crate::mqtt::Session::reply)), and on the MQTT 5 response topic
//! with the correlation data when the client set them.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::mqtt::Message;

/// Why a command was refused, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError(pub String);

impl CommandError {
    /// Builds an error from any message. Control characters (which a payload quoted
    /// back may hold: NUL, escape sequences) are written as escapes, so the reply and
    /// the log line show them instead of acting on a terminal.
    pub fn new(message: impl Into<String>) -> Self {
        CommandError(escape_controls(&message.into()))
    }
}

/// `s` with every control character written as its Rust escape (`\u{0}`, `\n`).
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Letters, digits, `_`, `-`, `.`; 1..=64 bytes. Names that can never be read as
/// options, paths or shell syntax.
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with(['-', '.'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A number for a message: as written for ordinary magnitudes, in exponent form for
/// huge or tiny ones (`1e308` is not printed as 309 digits).
pub fn show_number(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && a.is_finite() && !(1e-4..1e9).contains(&a) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CommandError {}

/// A service's command set, parsed from the topic levels after `<name>/cmd/` and the
/// payload. Parsing is pure: no I/O, so it is unit-testable and cannot block.
pub trait Command: Sized {
    /// `path` holds the levels after `cmd` (`["switch", "lv", "3"]`), never empty.
    fn parse(path: &[&str], payload: &[u8]) -> Result<Self, CommandError>;
}

/// The one reply to a command, published on `<name>/reply`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Reply {
    /// The command topic this answers.
    pub topic: String,
    /// Whether the command was accepted and carried out.
    pub ok: bool,
    /// Why it was refused or failed; absent when `ok` is true.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// The service's state machine state after the command.
    pub state: String,
}

impl Reply {
    /// A success reply.
    pub fn ok(topic: &str, state: impl Into<String>) -> Self {
        Reply {
            topic: topic.to_string(),
            ok: true,
            error: None,
            state: state.into(),
        }
    }

    /// `ok` or `err` from the outcome of a command.
    pub fn from_result<E: std::fmt::Display>(
        topic: &str,
        result: Result<(), E>,
        state: impl Into<String>,
    ) -> Self {
        match result {
            Ok(()) => Reply::ok(topic, state),
            Err(e) => Reply::err(topic, e, state),
        }
    }

    /// A refusal or failure reply.
    pub fn err(topic: &str, error: impl std::fmt::Display, state: impl Into<String>) -> Self {
        Reply {
            topic: topic.to_string(),
            ok: false,
            error: Some(error.to_string()),
            state: state.into(),
        }
    }
}

/// Parses `msg` as a command of service `name`.
///
/// Returns `None` when the topic is not a command topic of this service (the caller
/// handles it otherwise), `Some(Err)` when it is one but does not parse.
pub fn parse<C: Command>(name: &str, msg: &Message) -> Option<Result<C, CommandError>> {
    let rest = msg.topic.strip_prefix(name)?.strip_prefix("/cmd")?;
    let path: Vec<&str> = match rest {
        "" => Vec::new(),
        r => r.strip_prefix('/')?.split('/').collect(),
    };
    if msg.retain {
        // Delivered from the broker's retained store: executing it would repeat the
        // command after every reconnect or restart, long after the operator sent it.
        return Some(Err(CommandError::new(format!(
            "`{}` was published retained and is not executed: send commands without the \
             retain flag. To remove it from the broker, stop `{name}` first, then publish an \
             empty retained message on that topic (while `{name}` runs, an empty message \
             there is a command it would execute)",
            msg.topic
        ))));
    }
    if path.is_empty() || path.iter().any(|p| p.is_empty()) {
        return Some(Err(CommandError::new(format!(
            "`{}` names no command: use {name}/cmd/<command>",
            msg.topic
        ))));
    }
    Some(C::parse(&path, &msg.payload))
}

/// The payload as UTF-8 text, trimmed.
pub fn text(payload: &[u8]) -> Result<&str, CommandError> {
    std::str::from_utf8(payload)
        .map(str::trim)
        .map_err(|_| CommandError::new("payload is not UTF-8 text"))
}

/// Refuses a payload on a command that takes none (a typo'd value must not be ignored).
pub fn expect_empty(payload: &[u8]) -> Result<(), CommandError> {
    match text(payload)? {
        "" => Ok(()),
        other => Err(CommandError::new(format!(
            "this command takes no payload, got `{}`",
            truncate(other, 40)
        ))),
    }
}

/// Parses a bare finite number (`12.5`). `-0` is 0: a negative zero would be written
/// to the device and published as `-0.0`.
pub fn number(payload: &[u8]) -> Result<f64, CommandError> {
    let t = text(payload)?;
    match t.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(if v == 0.0 { 0.0 } else { v }),
        _ => Err(CommandError::new(format!(
            "payload must be a number, got `{}`",
            truncate(t, 40)
        ))),
    }
}

/// Parses a JSON object payload into `T`, explaining what is wrong with it.
///
/// Only an object is accepted: serde would also read a struct from an array
/// (`[3, 10.5]` for `{"setpoint": 3, "value": 10.5}`), which the contract does not
/// allow and which silently depends on field order. A negative zero anywhere in it is
/// read as 0.
pub fn json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CommandError> {
    let t = text(payload)?;
    if t.is_empty() {
        return Err(CommandError::new(
            "payload must be a JSON object, got nothing",
        ));
    }
    let mut doc: serde_json::Value = serde_json::from_str(t)
        .map_err(|e| CommandError::new(format!("payload is not valid: {e}")))?;
    let kind = match &doc {
        serde_json::Value::Object(_) => None,
        serde_json::Value::Array(_) => Some("an array"),
        serde_json::Value::String(_) => Some("a string"),
        serde_json::Value::Number(_) => Some("a number"),
        serde_json::Value::Bool(_) => Some("a boolean"),
        serde_json::Value::Null => Some("null"),
    };
    if let Some(kind) = kind {
        return Err(CommandError::new(format!(
            "payload must be a JSON object ({{\"key\": value, ...}}), got {kind}"
        )));
    }
    let result = if positive_zeros(&mut doc) {
        serde_json::from_value(doc)
    } else {
        // Straight from the text: duplicate keys are refused and errors keep positions.
        serde_json::from_str(t)
    };
    result.map_err(|e| CommandError::new(format!("payload is not valid: {e}")))
}

/// Replaces every `-0.0` in `v` by `0.0`; whether there was one.
fn positive_zeros(v: &mut serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) if n.as_f64() == Some(0.0) && n.is_f64() => {
            let negative = n.as_f64().is_some_and(f64::is_sign_negative);
            if negative {
                *v = serde_json::Value::from(0.0);
            }
            negative
        }
        serde_json::Value::Array(a) => a.iter_mut().fold(false, |f, x| positive_zeros(x) | f),
        serde_json::Value::Object(o) => o.values_mut().fold(false, |f, x| positive_zeros(x) | f),
        _ => false,
    }
}

/// Cuts untrusted text quoted back in messages, on a char boundary, with control
/// characters escaped.
pub fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}...", escape_controls(&s[..i])),
        None => escape_controls(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[derive(Debug, PartialEq)]
    enum Cmd {
        Switch { on: bool },
        SetV(f64),
        Refresh,
    }

    impl Command for Cmd {
        fn parse(path: &[&str], payload: &[u8]) -> Result<Self, CommandError> {
            match path {
                ["switch"] => match text(payload)? {
                    "on" => Ok(Cmd::Switch { on: true }),
                    "off" => Ok(Cmd::Switch { on: false }),
                    p => Err(CommandError::new(format!("expected on or off, got `{p}`"))),
                },
                ["setv"] => number(payload).map(Cmd::SetV),
                ["refresh"] => expect_empty(payload).map(|_| Cmd::Refresh),
                _ => Err(CommandError::new(format!(
                    "unknown command `{}`",
                    path.join("/")
                ))),
            }
        }
    }

    #[test]
    fn retained_commands_are_not_executed() {
        let mut m = msg("dcs/cmd/switch", b"on");
        m.retain = true;
        let e = parse::<Cmd>("dcs", &m).unwrap().unwrap_err();
        assert!(e.0.contains("published retained"), "{e}");
    }

    fn msg(topic: &str, payload: &'static [u8]) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            retain: false,
            response_topic: None,
            correlation_data: None,
            ack: None,
        }
    }

    #[test]
    fn parses_topics_of_this_service_only() {
        assert_eq!(
            parse::<Cmd>("dcs", &msg("dcs/cmd/switch", b"on")),
            Some(Ok(Cmd::Switch { on: true }))
        );
        assert_eq!(parse::<Cmd>("dcs", &msg("julabo/cmd/switch", b"on")), None);
        assert_eq!(parse::<Cmd>("dcs", &msg("dcs/status", b"")), None);
        assert_eq!(parse::<Cmd>("dcs", &msg("dcsx/cmd/switch", b"")), None);
        assert!(matches!(
            parse::<Cmd>("dcs", &msg("dcs/cmd", b"")),
            Some(Err(_))
        ));
        assert!(matches!(
            parse::<Cmd>("dcs", &msg("dcs/cmd//x", b"")),
            Some(Err(_))
        ));
    }

    #[test]
    fn bad_payloads_are_explained() {
        let e = parse::<Cmd>("dcs", &msg("dcs/cmd/setv", b"twelve"))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.0, "payload must be a number, got `twelve`");
        let e = parse::<Cmd>("dcs", &msg("dcs/cmd/setv", b"NaN"))
            .unwrap()
            .unwrap_err();
        assert!(e.0.contains("number"));
        let e = parse::<Cmd>("dcs", &msg("dcs/cmd/switch", b"\xff\xfe"))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.0, "payload is not UTF-8 text");
        let e = parse::<Cmd>("dcs", &msg("dcs/cmd/refresh", b"now"))
            .unwrap()
            .unwrap_err();
        assert!(e.0.contains("takes no payload"));
        let e = parse::<Cmd>("dcs", &msg("dcs/cmd/explode", b""))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.0, "unknown command `explode`");
    }

    #[test]
    fn json_errors_say_where() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct P {
            setpoint: u8,
        }
        let e = json::<P>(b"{\"setpoint\": \"x\"}").unwrap_err();
        assert!(e.0.contains("invalid type"), "{e}");
        let e = json::<P>(b"{").unwrap_err();
        assert!(e.0.contains("EOF"), "{e}");
        assert!(json::<P>(b"").unwrap_err().0.contains("got nothing"));
        assert_eq!(json::<P>(b" {\"setpoint\": 2} ").unwrap().setpoint, 2);
        // The contract says object: an array, a number or null is refused, said so.
        for (bad, kind) in [
            (&b"[2]"[..], "an array"),
            (b"2", "a number"),
            (b"null", "null"),
        ] {
            let e = json::<P>(bad).unwrap_err();
            assert!(
                e.0.contains("must be a JSON object") && e.0.contains(kind),
                "{e}"
            );
        }
        let e = json::<P>(b"{\"setpoint\": 2, \"setpoint\": 3}").unwrap_err();
        assert!(e.0.contains("duplicate field"), "{e}");
    }

    #[test]
    fn negative_zero_is_zero() {
        #[derive(serde::Deserialize, Debug)]
        struct V {
            value: f64,
            list: Vec<f64>,
        }
        let v = json::<V>(br#"{"value": -0.0, "list": [1.5, -0.0]}"#).unwrap();
        assert!(v.value == 0.0 && v.value.is_sign_positive());
        assert!(v.list[1].is_sign_positive() && v.list[0] == 1.5);
        let v = json::<V>(br#"{"value": -0, "list": []}"#).unwrap();
        assert!(v.value.is_sign_positive());
        for t in [&b"-0"[..], b"-0.0", b" -0e3 "] {
            let n = number(t).unwrap();
            assert!(n == 0.0 && n.is_sign_positive(), "{t:?}");
        }
        assert_eq!(number(b"-1.5").unwrap(), -1.5);
    }

    #[test]
    fn quoted_text_is_safe_to_print() {
        assert_eq!(truncate("a\0b\x1b[2J", 10), "a\\u{0}b\\u{1b}[2J");
        assert_eq!(truncate("\n\nabc", 2), "\\n\\n...");
        let e = CommandError::new("unknown field `\0`");
        assert_eq!(e.0, "unknown field `\\u{0}`");
        assert_eq!(show_number(1e308), "1e308");
        assert_eq!(show_number(-2.5e-9), "-2.5e-9");
        assert_eq!(show_number(12.5), "12.5");
        assert_eq!(show_number(0.0), "0");
        assert_eq!(show_number(-35.0), "-35");
    }

    #[test]
    fn reply_json_shape() {
        let ok = serde_json::to_value(Reply::ok("dcs/cmd/refresh", "LV_ON")).unwrap();
        assert_eq!(
            ok,
            serde_json::json!({"topic": "dcs/cmd/refresh", "ok": true, "state": "LV_ON"})
        );
        let err = serde_json::to_value(Reply::err("dcs/cmd/x", "no", "LV_ON")).unwrap();
        assert_eq!(err["error"], "no");
        assert_eq!(err["ok"], false);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "hé...");
        assert_eq!(truncate("hi", 5), "hi");
    }
}
