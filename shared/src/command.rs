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
    /// Builds an error from any message.
    pub fn new(message: impl Into<String>) -> Self {
        CommandError(message.into())
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
             retain flag, and clear this one with an empty retained message",
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

/// Parses a bare finite number (`12.5`).
pub fn number(payload: &[u8]) -> Result<f64, CommandError> {
    let t = text(payload)?;
    match t.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(CommandError::new(format!(
            "payload must be a number, got `{}`",
            truncate(t, 40)
        ))),
    }
}

/// Parses a JSON payload into `T`, explaining what is wrong with it.
pub fn json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CommandError> {
    let t = text(payload)?;
    if t.is_empty() {
        return Err(CommandError::new(
            "payload must be a JSON object, got nothing",
        ));
    }
    serde_json::from_str(t).map_err(|e| CommandError::new(format!("payload is not valid: {e}")))
}

/// Cuts untrusted text quoted back in messages, on a char boundary.
pub fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
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
