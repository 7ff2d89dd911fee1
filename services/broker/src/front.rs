//! What the front end (see [`crate::proxy`]) reads of the client -> broker byte stream,
//! as pure functions: MQTT framing (fixed header + remaining length), the CONNECT
//! (protocol level, client id, will) and the PUBLISH (topic, QoS, packet id, MQTT 5
//! properties incl. topic alias), and the one rewrite it makes.
//!
//! The rewrite: rumqttd stores every retained PUBLISH and forwards it live with the retain
//! flag cleared (and an empty retained payload clears the stored copy), so a retained
//! command would be executed by a connected service, then stay in the broker and be
//! executed again by every service that subscribes later. A retained PUBLISH on a
//! command topic (one with a level exactly `cmd`) is therefore replaced by a
//! non-retained PUBLISH of the refusal on the reply topic, with the same QoS and packet
//! id, so the client's PUBACK / PUBREC flow with the broker is unchanged. Nothing is
//! stored and no service sees the command.
//!
//! Everything else goes through byte for byte. Nothing here panics on any input:
//! malformed input is an [`Malformed`] error and the connection is closed.

use std::collections::HashMap;

use dcs_shared::command::Reply;
pub use dcs_shared::topic::is_command_topic;

/// Why a client's byte stream cannot be read as MQTT; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Malformed {}

fn malformed<T>(why: impl Into<String>) -> Result<T, Malformed> {
    Err(Malformed(why.into()))
}

/// The packet at the start of `buf`: `Ok(None)` until its fixed header is complete,
/// then `(header length, remaining length)`. A remaining length above `max_remaining`
/// (rumqttd refuses those too) or encoded in more than 4 bytes is malformed.
pub fn frame(buf: &[u8], max_remaining: usize) -> Result<Option<(usize, usize)>, Malformed> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if len > max_remaining {
                return malformed(format!(
                    "packet of {len} bytes, above max_payload_size ({max_remaining})"
                ));
            }
            return Ok(Some((2 + i, len)));
        }
    }
    malformed("remaining length encoded in more than 4 bytes")
}

/// Appends the MQTT variable byte integer encoding of `n` (n < 2^28).
fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A cursor over a packet body; every read is bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Malformed> {
        if n > self.b.len() {
            return malformed(format!("packet ends inside its {what}"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, Malformed> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, Malformed> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// A 2-byte length followed by that many bytes (MQTT string or binary data).
    fn bin(&mut self, what: &str) -> Result<&'a [u8], Malformed> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
    fn varint(&mut self, what: &str) -> Result<usize, Malformed> {
        let mut n = 0usize;
        for i in 0..4 {
            let b = self.u8(what)?;
            n |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        malformed(format!("{what}: variable integer longer than 4 bytes"))
    }
    /// MQTT 5 properties (length + list); returns the topic alias if there is one.
    fn properties(&mut self) -> Result<Option<u16>, Malformed> {
        let n = self.varint("property length")?;
        let mut p = Reader {
            b: self.take(n, "properties")?,
        };
        let mut alias = None;
        while !p.b.is_empty() {
            let id = p.varint("property id")?;
            match id {
                // Byte.
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                    p.u8("property")?;
                }
                // Two-byte integer; 0x23 is the topic alias.
                0x13 | 0x21 | 0x22 => {
                    p.u16("property")?;
                }
                0x23 => alias = Some(p.u16("topic alias")?),
                // Four-byte integer.
                0x02 | 0x11 | 0x18 | 0x27 => {
                    p.take(4, "property")?;
                }
                // Variable byte integer (subscription identifier).
                0x0B => {
                    p.varint("property")?;
                }
                // UTF-8 string or binary data.
                0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                    p.bin("property")?;
                }
                // User property: string pair.
                0x26 => {
                    p.bin("user property")?;
                    p.bin("user property")?;
                }
                other => return malformed(format!("unknown MQTT 5 property id {other:#x}")),
            }
        }
        Ok(alias)
    }
}

/// What the front end needs of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol level: 4 = MQTT 3.1.1, 5 = MQTT 5.
    pub level: u8,
    /// The client id as sent (lossy UTF-8, for logs).
    pub client_id: String,
    /// The username, if any (lossy UTF-8, for logs).
    pub user: Option<String>,
    /// Will topic and retain flag, if the client set a will.
    pub will: Option<(Vec<u8>, bool)>,
}

impl Connect {
    /// A retained will on a command topic: the broker would store the command when the
    /// client drops, so such a CONNECT is refused.
    pub fn retained_command_will(&self) -> Option<String> {
        match &self.will {
            Some((topic, true)) => std::str::from_utf8(topic)
                .ok()
                .filter(|t| is_command_topic(t))
                .map(str::to_string),
            _ => None,
        }
    }

    /// CONNACK "not authorized" in this client's protocol version.
    pub fn connack_not_authorized(&self) -> &'static [u8] {
        if self.level == 5 {
            &[0x20, 3, 0, 0x87, 0]
        } else {
            &[0x20, 2, 0, 5]
        }
    }
}

/// Parses a whole CONNECT packet (fixed header included).
pub fn parse_connect(packet: &[u8]) -> Result<Connect, Malformed> {
    let Some((h, n)) = frame(packet, usize::MAX)? else {
        return malformed("empty packet");
    };
    if packet[0] != 0x10 {
        return malformed(format!(
            "the first packet is not a CONNECT (type {})",
            packet[0] >> 4
        ));
    }
    let mut r = Reader {
        b: packet.get(h..h + n).unwrap_or_default(),
    };
    r.bin("protocol name")?;
    let level = r.u8("protocol level")?;
    let flags = r.u8("connect flags")?;
    r.u16("keep alive")?;
    if level == 5 {
        r.properties()?;
    }
    let client_id = String::from_utf8_lossy(r.bin("client id")?).into_owned();
    let will = if flags & 0x04 != 0 {
        if level == 5 {
            r.properties()?;
        }
        let topic = r.bin("will topic")?.to_vec();
        r.bin("will payload")?;
        Some((topic, flags & 0x20 != 0))
    } else {
        None
    };
    let user = if flags & 0x80 != 0 {
        Some(String::from_utf8_lossy(r.bin("username")?).into_owned())
    } else {
        None
    };
    Ok(Connect {
        level,
        client_id,
        user,
        will,
    })
}

/// Where the refusal of a command goes: `<name>/reply`, `<name>` being the levels before
/// the first `cmd` level (the service's name, SPEC 3.4); `dcs-broker/reply` when the
/// topic starts with `cmd`.
pub fn reply_topic(topic: &str) -> String {
    let levels: Vec<&str> = topic.split('/').collect();
    let name = match levels.iter().position(|l| *l == "cmd") {
        Some(0) | None => "dcs-broker".to_string(),
        Some(i) => levels[..i].join("/"),
    };
    format!("{name}/reply")
}

/// The refusal's payload, a [`Reply`] of SPEC 3.4. `state` is the service's state,
/// which the broker does not know.
pub fn refusal(topic: &str) -> Vec<u8> {
    let reply = Reply::err(
        topic,
        format!(
            "{topic} was published retained and is refused by the broker: send commands \
             without the retain flag (nothing was stored or executed)"
        ),
        "unknown",
    );
    serde_json::to_vec(&reply).unwrap_or_default()
}

/// Encodes a non-retained PUBLISH (no MQTT 5 properties).
pub fn encode_publish(
    v5: bool,
    qos: u8,
    dup: bool,
    pkid: u16,
    topic: &str,
    payload: &[u8],
) -> Vec<u8> {
    let qos = qos & 3;
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + usize::from(v5) + payload.len();
    let mut out = Vec::with_capacity(len + 5);
    out.push(0x30 | (u8::from(dup) << 3) | (qos << 1));
    put_varint(&mut out, len);
    // Topics come from a 2-byte length field plus a short suffix; cap to be safe.
    let t = topic.as_bytes();
    let t = &t[..t.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(t.len() as u16).to_be_bytes());
    out.extend_from_slice(t);
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        out.push(0);
    }
    out.extend_from_slice(payload);
    out
}

/// A retained command that was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The command topic.
    pub topic: String,
    /// Where the refusal went.
    pub reply_topic: String,
}

/// Most topic aliases a client may set. rumqttd announces no Topic Alias Maximum (so
/// clients must not use any, and it ignores them); this bounds what we track.
const MAX_ALIASES: usize = 256;

/// The client -> broker direction of one connection, after its CONNECT.
#[derive(Debug)]
pub struct Inspector {
    v5: bool,
    max_remaining: usize,
    /// Topic aliases the client set (MQTT 5), so a PUBLISH by alias is seen with its
    /// topic. A rewritten PUBLISH carries no alias: a broker that honours aliases would
    /// then refuse a later PUBLISH by that alias (fail closed).
    aliases: HashMap<u16, String>,
}

impl Inspector {
    /// For a connection whose CONNECT was `connect`.
    pub fn new(connect: &Connect, max_remaining: usize) -> Self {
        Inspector {
            v5: connect.level == 5,
            max_remaining,
            aliases: HashMap::new(),
        }
    }

    /// Moves every complete packet at the front of `buf` to `out`, rewritten if it is a
    /// retained command; an incomplete packet stays in `buf`. Returns the refusals made.
    pub fn process(
        &mut self,
        buf: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<Vec<Refused>, Malformed> {
        let mut refused = Vec::new();
        let mut at = 0;
        let result = loop {
            let rest = &buf[at..];
            let (h, n) = match frame(rest, self.max_remaining) {
                Ok(Some((h, n))) if rest.len() >= h + n => (h, n),
                Ok(_) => break Ok(()),
                Err(e) => break Err(e),
            };
            let packet = &rest[..h + n];
            match self.inspect(packet) {
                Ok(None) => out.extend_from_slice(packet),
                Ok(Some((r, rewritten))) => {
                    out.extend_from_slice(&rewritten);
                    refused.push(r);
                }
                Err(e) => break Err(e),
            }
            at += h + n;
        };
        buf.drain(..at);
        result.map(|()| refused)
    }

    /// One whole packet: `None` to forward it as is, or the refusal and its replacement.
    fn inspect(&mut self, packet: &[u8]) -> Result<Option<(Refused, Vec<u8>)>, Malformed> {
        let byte0 = packet[0];
        match byte0 >> 4 {
            1 => return malformed("a second CONNECT"),
            3 => {}
            _ => return Ok(None),
        }
        let (h, _) = frame(packet, usize::MAX)?.unwrap_or((packet.len(), 0));
        let mut r = Reader {
            b: packet.get(h..).unwrap_or_default(),
        };
        let qos = (byte0 >> 1) & 3;
        if qos == 3 {
            return malformed("PUBLISH with QoS 3");
        }
        let topic = r.bin("topic")?;
        let pkid = if qos > 0 { r.u16("packet id")? } else { 0 };
        let alias = if self.v5 { r.properties()? } else { None };
        let Ok(topic) = std::str::from_utf8(topic) else {
            return Ok(None); // rumqttd refuses a topic that is not UTF-8
        };
        let topic = match alias {
            Some(a) if topic.is_empty() => match self.aliases.get(&a) {
                Some(t) => t.clone(),
                None => return Ok(None),
            },
            Some(a) => {
                if self.aliases.len() >= MAX_ALIASES && !self.aliases.contains_key(&a) {
                    return malformed(format!("more than {MAX_ALIASES} topic aliases"));
                }
                self.aliases.insert(a, topic.to_string());
                topic.to_string()
            }
            None => topic.to_string(),
        };
        let retain = byte0 & 1 != 0;
        if !(retain && is_command_topic(&topic)) {
            return Ok(None);
        }
        let reply_topic = reply_topic(&topic);
        let dup = byte0 & 0x08 != 0;
        let rewritten = encode_publish(self.v5, qos, dup, pkid, &reply_topic, &refusal(&topic));
        Ok(Some((Refused { topic, reply_topic }, rewritten)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn connect(level: u8, client_id: &str, will: Option<(&str, bool)>) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', level]);
        let mut flags = 0x02 | 0x80;
        if let Some((_, retain)) = will {
            flags |= 0x04 | 0x08 | if retain { 0x20 } else { 0 };
        }
        body.push(flags);
        body.extend_from_slice(&[0, 30]);
        if level == 5 {
            body.push(0);
        }
        let s = |body: &mut Vec<u8>, s: &str| {
            body.extend_from_slice(&(s.len() as u16).to_be_bytes());
            body.extend_from_slice(s.as_bytes());
        };
        s(&mut body, client_id);
        if let Some((t, _)) = will {
            if level == 5 {
                body.push(0);
            }
            s(&mut body, t);
            s(&mut body, "false");
        }
        s(&mut body, "alice");
        let mut p = vec![0x10];
        put_varint(&mut p, body.len());
        p.extend(body);
        p
    }

    /// A PUBLISH with optional MQTT 5 properties (raw).
    fn publish(
        qos: u8,
        retain: bool,
        topic: &str,
        props: Option<&[u8]>,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&[0x12, 0x34]);
        }
        if let Some(p) = props {
            put_varint(&mut body, p.len());
            body.extend_from_slice(p);
        }
        body.extend_from_slice(payload);
        let mut p = vec![0x30 | (qos << 1) | u8::from(retain)];
        put_varint(&mut p, body.len());
        p.extend(body);
        p
    }

    fn run(level: u8, input: &[u8]) -> (Vec<u8>, Vec<Refused>, Result<(), Malformed>) {
        let mut i = Inspector::new(&parse_connect(&connect(level, "c", None)).unwrap(), 1 << 20);
        let (mut buf, mut out) = (input.to_vec(), Vec::new());
        match i.process(&mut buf, &mut out) {
            Ok(r) => (out, r, Ok(())),
            Err(e) => (out, vec![], Err(e)),
        }
    }

    #[test]
    fn framing() {
        assert_eq!(frame(&[], 10), Ok(None));
        assert_eq!(frame(&[0x30], 10), Ok(None));
        assert_eq!(frame(&[0x30, 0], 10), Ok(Some((2, 0))));
        assert_eq!(frame(&[0x30, 0x80], 1000), Ok(None));
        assert_eq!(frame(&[0x30, 0x80, 0x01], 1000), Ok(Some((3, 128))));
        assert_eq!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0x7f], usize::MAX),
            Ok(Some((5, 268_435_455)))
        );
        assert!(frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX).is_err());
        assert!(frame(&[0x30, 0x80, 0x01], 127)
            .unwrap_err()
            .0
            .contains("max_payload_size"));
        for n in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            268_435_455,
        ] {
            let mut v = vec![0x30];
            put_varint(&mut v, n);
            assert_eq!(frame(&v, usize::MAX), Ok(Some((v.len(), n))), "{n}");
        }
    }

    #[test]
    fn connect_is_read() {
        let c = parse_connect(&connect(4, "interlock", Some(("interlock/online", true)))).unwrap();
        assert_eq!(c.level, 4);
        assert_eq!(c.client_id, "interlock");
        assert_eq!(c.user.as_deref(), Some("alice"));
        assert_eq!(c.retained_command_will(), None);
        let c = parse_connect(&connect(5, "x", Some(("julabo/cmd/start", true)))).unwrap();
        assert_eq!(c.level, 5);
        assert_eq!(
            c.retained_command_will().as_deref(),
            Some("julabo/cmd/start")
        );
        assert_eq!(c.connack_not_authorized(), &[0x20, 3, 0, 0x87, 0]);
        let c = parse_connect(&connect(4, "x", Some(("julabo/cmd/start", false)))).unwrap();
        assert_eq!(c.retained_command_will(), None);
        assert!(parse_connect(&[0x30, 0])
            .unwrap_err()
            .0
            .contains("not a CONNECT"));
        let mut cut = connect(4, "x", None);
        cut.truncate(cut.len() - 3);
        cut[1] -= 3;
        assert!(parse_connect(&cut).is_err());
    }

    #[test]
    fn command_topics() {
        assert!(is_command_topic("julabo/cmd/start"));
        assert!(is_command_topic("dcs/cmd/switch/lv"));
        assert!(is_command_topic("alarms/cmd"));
        assert!(is_command_topic("cmd"));
        assert!(!is_command_topic("julabo/status"));
        assert!(!is_command_topic("julabo/cmds/x"));
        assert!(!is_command_topic("julabo/xcmd"));
        assert_eq!(reply_topic("julabo/cmd/start"), "julabo/reply");
        assert_eq!(reply_topic("dcs/cmd/switch/lv"), "dcs/reply");
        assert_eq!(reply_topic("alarms/cmd"), "alarms/reply");
        assert_eq!(reply_topic("cmd/x"), "dcs-broker/reply");
    }

    #[test]
    fn refusal_is_a_reply() {
        let r: Reply = serde_json::from_slice(&refusal("julabo/cmd/start")).unwrap();
        assert_eq!(r.topic, "julabo/cmd/start");
        assert!(!r.ok);
        assert_eq!(
            r.error.as_deref(),
            Some(
                "julabo/cmd/start was published retained and is refused by the broker: send \
                 commands without the retain flag (nothing was stored or executed)"
            )
        );
        // Control characters in a topic are escaped, not echoed raw.
        let v: serde_json::Value = serde_json::from_slice(&refusal("a/cmd/\u{1}\"")).unwrap();
        assert_eq!(v["topic"], "a/cmd/\u{1}\"");
    }

    #[test]
    fn retained_commands_are_rewritten_same_qos_and_packet_id() {
        for level in [4, 5] {
            let props: Option<&[u8]> = (level == 5).then_some(&[]);
            for qos in [0, 1, 2] {
                let p = publish(qos, true, "julabo/cmd/start", props, b"");
                let (out, refused, res) = run(level, &p);
                res.unwrap();
                assert_eq!(
                    refused,
                    vec![Refused {
                        topic: "julabo/cmd/start".into(),
                        reply_topic: "julabo/reply".into()
                    }]
                );
                let want = encode_publish(
                    level == 5,
                    qos,
                    false,
                    0x1234,
                    "julabo/reply",
                    &refusal("julabo/cmd/start"),
                );
                assert_eq!(out, want);
                assert_eq!(out[0], 0x30 | (qos << 1), "not retained, same QoS");
                if qos > 0 {
                    let (h, _) = frame(&out, usize::MAX).unwrap().unwrap();
                    let at = h + 2 + "julabo/reply".len();
                    assert_eq!(&out[at..at + 2], &[0x12, 0x34], "same packet id");
                }
            }
        }
    }

    #[test]
    fn everything_else_passes_untouched() {
        let mut input = Vec::new();
        input.extend(publish(1, false, "julabo/cmd/start", None, b""));
        input.extend(publish(1, true, "julabo/status", None, b"{}"));
        input.extend(publish(0, true, "dcs/cmdx/a", None, b"on"));
        input.extend([0x82, 6, 0, 1, 0, 1, b'#', 1]); // SUBSCRIBE
        input.extend([0xc0, 0]); // PINGREQ
        let (out, refused, res) = run(4, &input);
        res.unwrap();
        assert!(refused.is_empty());
        assert_eq!(out, input);
    }

    #[test]
    fn topic_alias_is_followed() {
        // Set alias 7 on a state topic, then publish retained by alias: untouched.
        let set = publish(1, false, "dcs/cmd/switch/lv", Some(&[0x23, 0, 7]), b"on");
        let by_alias = publish(1, true, "", Some(&[0x23, 0, 7, 0x01, 1]), b"on");
        let (out, refused, res) = run(5, &[set.clone(), by_alias].concat());
        res.unwrap();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].topic, "dcs/cmd/switch/lv");
        assert!(out.starts_with(&set));
        // Unknown property id, bad alias length: malformed.
        let bad = publish(1, true, "x", Some(&[0x7f, 0]), b"");
        assert!(run(5, &bad).2.is_err());
        let bad = publish(1, true, "x", Some(&[0x23, 0]), b"");
        assert!(run(5, &bad).2.is_err());
    }

    #[test]
    fn malformed_input_is_refused() {
        assert!(run(4, &[0x32, 3, 0, 5, b'a'])
            .2
            .unwrap_err()
            .0
            .contains("topic"));
        assert!(run(4, &[0x36, 2, 0, 0]).2.unwrap_err().0.contains("QoS 3"));
        assert!(run(4, &[0x10, 0])
            .2
            .unwrap_err()
            .0
            .contains("second CONNECT"));
        assert!(run(4, &[0x30, 0xff, 0xff, 0xff, 0xff, 1]).2.is_err());
    }

    proptest! {
        /// Garbage never panics; whatever it is, chunking does not change the result.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                cut in 0usize..600, level in prop_oneof![Just(4u8), Just(5u8)]) {
            let _ = parse_connect(&bytes);
            let _ = frame(&bytes, 300);
            let whole = run(level, &bytes);
            // Fed in two pieces.
            let cut = cut.min(bytes.len());
            let mut i = Inspector::new(&parse_connect(&connect(level, "c", None)).unwrap(), 1 << 20);
            let (mut buf, mut out) = (bytes[..cut].to_vec(), Vec::new());
            let first = i.process(&mut buf, &mut out);
            let second = first.clone().and_then(|mut r| {
                buf.extend_from_slice(&bytes[cut..]);
                r.extend(i.process(&mut buf, &mut out)?);
                Ok(r)
            });
            prop_assert_eq!(whole.2.is_err(), second.is_err());
            if let Ok(r) = second {
                prop_assert_eq!(&whole.0, &out);
                prop_assert_eq!(whole.1, r);
            }
        }

        /// Valid publish streams: only retained command topics are changed.
        #[test]
        fn valid_streams(pubs in proptest::collection::vec(
            (0u8..3, any::<bool>(), prop_oneof![Just("a/cmd/x"), Just("a/status"), Just("cmd"), Just("")],
             proptest::collection::vec(any::<u8>(), 0..50)), 0..20)) {
            let mut input = Vec::new();
            let mut expected = Vec::new();
            let mut n = 0;
            for (qos, retain, topic, payload) in &pubs {
                let p = publish(*qos, *retain, topic, None, payload);
                input.extend(&p);
                if *retain && is_command_topic(topic) {
                    n += 1;
                    expected.extend(encode_publish(false, *qos, false, 0x1234, &reply_topic(topic), &refusal(topic)));
                } else {
                    expected.extend(p);
                }
            }
            let (out, refused, res) = run(4, &input);
            prop_assert!(res.is_ok());
            prop_assert_eq!(refused.len(), n);
            prop_assert_eq!(out, expected);
        }
    }
}
