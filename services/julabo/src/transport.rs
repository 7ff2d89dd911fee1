//! Getting bytes to and from the unit: a serial port or a raw TCP tunnel, and the
//! [`Link`] that paces commands and matches replies to them.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::config::SerialSettings;
use crate::protocol::{self, ProtocolError, Query, Status, Write};

/// Where the unit is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A serial device path.
    Serial(String),
    /// `tcp://host:port`.
    Tcp(String),
}

impl Endpoint {
    /// Parses a `port` setting.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(hp) = s.strip_prefix("tcp://") {
            let ok = hp
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            return if ok {
                Ok(Endpoint::Tcp(hp.to_string()))
            } else {
                Err(format!("`{s}`: expected tcp://host:port"))
            };
        }
        if s.starts_with("rfc2217://") {
            return Err(format!(
                "`{s}`: rfc2217 is not supported yet; run ser2net in raw mode and use tcp://host:port"
            ));
        }
        if s.contains("://") {
            return Err(format!(
                "`{s}`: use a device path (/dev/ttyUSB0) or tcp://host:port"
            ));
        }
        if s.is_empty() {
            return Err("no port given".into());
        }
        Ok(Endpoint::Serial(s.to_string()))
    }
}

/// A byte stream to the unit.
pub trait Port: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Port for T {}

/// Opens the port. Serial line settings are applied to a serial device only.
pub async fn open(
    endpoint: &Endpoint,
    serial: &SerialSettings,
    timeout: Duration,
) -> Result<Box<dyn Port>, LinkError> {
    match endpoint {
        Endpoint::Tcp(hp) => {
            let s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(hp))
                .await
                .map_err(|_| LinkError::Open(format!("tcp://{hp}: no answer within {timeout:?}")))?
                .map_err(|e| LinkError::Open(format!("tcp://{hp}: {e}")))?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        Endpoint::Serial(path) => {
            use tokio_serial::{DataBits, FlowControl, Parity, SerialPortBuilderExt, StopBits};
            let b = tokio_serial::new(path, serial.baud)
                .data_bits(if serial.data_bits == 7 {
                    DataBits::Seven
                } else {
                    DataBits::Eight
                })
                .parity(match serial.parity.as_str() {
                    "even" => Parity::Even,
                    "odd" => Parity::Odd,
                    _ => Parity::None,
                })
                .stop_bits(if serial.stop_bits == 2 {
                    StopBits::Two
                } else {
                    StopBits::One
                })
                .flow_control(match serial.flow_control.as_str() {
                    "rtscts" => FlowControl::Hardware,
                    "xonxoff" => FlowControl::Software,
                    _ => FlowControl::None,
                });
            let port = b.open_native_async().map_err(|e| {
                LinkError::Open(format!(
                    "{path}: {e} (line settings {} {}{}{} {})",
                    serial.baud,
                    serial.data_bits,
                    serial
                        .parity
                        .chars()
                        .next()
                        .unwrap_or('n')
                        .to_ascii_uppercase(),
                    serial.stop_bits,
                    serial.flow_control
                ))
            })?;
            Ok(Box::new(port))
        }
    }
}

/// Why a conversation with the unit failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The port could not be opened.
    #[error("cannot open {0}")]
    Open(String),
    /// No reply in time: the unit is off, silent, or the line settings are wrong.
    #[error("no reply to {0} within {1:?}")]
    Timeout(String, Duration),
    /// The other end closed the line (tunnel dropped, USB adapter unplugged).
    #[error("the line was closed")]
    Closed,
    /// Any other I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A reply that is not what the command answers.
    #[error("unexpected reply to {0}: {1}")]
    Garbled(String, ProtocolError),
    /// The unit rejected a write (its STATUS reports why).
    #[error("the chiller refused `{0}`: {1}")]
    Refused(String, Status),
    /// A write without read-back while the unit is in alarm: its STATUS shows the
    /// alarm, so a refusal would be hidden; nothing can confirm the write.
    #[error("`{0}` cannot be verified while the chiller reports {1}")]
    Unverified(String, Status),
    /// A write was not applied although the unit reported no error.
    #[error("`{0}` not applied: the chiller reads back {1}")]
    NotApplied(String, String),
}

impl LinkError {
    /// Whether the line itself is gone (reopen at once) rather than a bad reply.
    pub fn line_lost(&self) -> bool {
        matches!(
            self,
            LinkError::Closed | LinkError::Io(_) | LinkError::Open(_)
        )
    }
}

/// A conversation with the unit: one command at a time, never closer than the
/// configured spacing to the previous one (the unit drops such commands), each reply
/// matched to its command.
pub struct Link {
    port: Box<dyn Port>,
    buf: Vec<u8>,
    spacing: Duration,
    timeout: Duration,
    /// Time one character takes on the serial line (0 when unknown).
    char_time: Duration,
    last_sent: Option<Instant>,
    last_len: u32,
    /// Commands sent, for the benchmark and logs.
    pub commands_sent: u64,
}

impl Link {
    /// Wraps an open port.
    pub fn new(port: Box<dyn Port>, spacing: Duration, timeout: Duration) -> Link {
        Link {
            port,
            buf: Vec::new(),
            spacing,
            timeout,
            char_time: Duration::ZERO,
            last_sent: None,
            last_len: 0,
            commands_sent: 0,
        }
    }

    /// Counts the previous command's transmission time into the spacing. Writes return
    /// when the bytes are queued (socket, or kernel buffer of a serial port), not when
    /// they are on the wire: at 4800 baud a 17-character command takes 35 ms, enough to
    /// bring the next one under the unit's 250 ms.
    pub fn with_line_speed(mut self, serial: &SerialSettings) -> Link {
        let parity = u32::from(serial.parity != "none");
        let bits = 1 + u32::from(serial.data_bits) + parity + u32::from(serial.stop_bits);
        self.char_time = Duration::from_secs_f64(f64::from(bits) / f64::from(serial.baud.max(1)));
        self
    }

    /// Sends one command (CR-terminated), waiting only what the spacing still requires.
    pub async fn send(&mut self, text: &str) -> Result<(), LinkError> {
        if let Some(t) = self.last_sent {
            tokio::time::sleep_until(t + self.spacing + self.char_time * self.last_len).await;
        }
        self.discard_stale().await?;
        self.port.write_all(format!("{text}\r").as_bytes()).await?;
        self.port.flush().await?;
        self.last_sent = Some(Instant::now());
        self.last_len = u32::try_from(text.len() + 1).unwrap_or(u32::MAX);
        self.commands_sent += 1;
        Ok(())
    }

    /// Drops bytes that arrived unasked (a late reply to a timed-out query), so the
    /// next reply is matched to the next command.
    async fn discard_stale(&mut self) -> Result<(), LinkError> {
        self.buf.clear();
        let mut scratch = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::ZERO, self.port.read(&mut scratch)).await {
                Ok(Ok(0)) => return Err(LinkError::Closed),
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Ok(()),
            }
        }
    }

    async fn read_line(&mut self, what: &str) -> Result<String, LinkError> {
        let deadline = Instant::now() + self.timeout;
        let mut scratch = [0u8; 256];
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let (mut lines, _) = protocol::split_lines(&line);
                return Ok(lines.pop().unwrap_or_default());
            }
            if self.buf.len() > 1024 {
                let junk = String::from_utf8_lossy(&self.buf).into_owned();
                self.buf.clear();
                return Err(LinkError::Garbled(
                    what.into(),
                    ProtocolError(format!(
                        "{} bytes without a line end: {junk:.40}",
                        junk.len()
                    )),
                ));
            }
            match tokio::time::timeout_at(deadline, self.port.read(&mut scratch)).await {
                Err(_) => return Err(LinkError::Timeout(what.into(), self.timeout)),
                Ok(Ok(0)) => return Err(LinkError::Closed),
                Ok(Ok(n)) => self.buf.extend_from_slice(&scratch[..n]),
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// Sends a query and returns its reply line.
    pub async fn query(&mut self, q: Query) -> Result<String, LinkError> {
        let text = q.text();
        self.send(&text).await?;
        self.read_line(&text).await
    }

    /// Reads a number.
    pub async fn float(&mut self, q: Query) -> Result<f64, LinkError> {
        let r = self.query(q).await?;
        protocol::parse_float(&r).map_err(|e| LinkError::Garbled(q.text(), e))
    }

    /// Reads an integer.
    pub async fn int(&mut self, q: Query) -> Result<i64, LinkError> {
        let r = self.query(q).await?;
        protocol::parse_int(&r).map_err(|e| LinkError::Garbled(q.text(), e))
    }

    /// Reads the status.
    pub async fn status(&mut self) -> Result<Status, LinkError> {
        let r = self.query(Query::Status).await?;
        protocol::parse_status(&r).map_err(|e| LinkError::Garbled("STATUS".into(), e))
    }

    /// Writes and verifies. The unit answers nothing to a write, so the value is read
    /// back at once where the unit can (one slot, not two); STATUS is asked only to
    /// explain a read-back that differs (did the unit refuse it?) or, for a write
    /// without read-back, to see that it was not refused. A start or stop is confirmed
    /// by STATUS itself (03 / 02).
    pub async fn write(&mut self, w: Write) -> Result<Verified, LinkError> {
        let text = w.text();
        self.send(&text).await?;
        if let Write::Run(on) = w {
            // STATUS shows a start or stop at once (03 / 02), and the state is what the
            // caller needs next: one slot confirms both. An alarm or manual mode hides
            // the run state: then IN_MODE_05 says.
            let status = self.status().await?;
            if status.is_command_error() {
                return Err(LinkError::Refused(text, status));
            }
            if status.code == if on { 3 } else { 2 } {
                return Ok(Verified {
                    readback: None,
                    status: Some(status),
                });
            }
        }
        let Some(q) = w.readback() else {
            let status = self.status().await?;
            if status.is_command_error() {
                return Err(LinkError::Refused(text, status));
            }
            if status.is_error() {
                return Err(LinkError::Unverified(text, status));
            }
            return Ok(Verified {
                readback: None,
                status: Some(status),
            });
        };
        let reply = self.query(q).await?;
        if w.confirmed_by(&reply) == Ok(true) {
            return Ok(Verified {
                readback: Some((q, reply)),
                status: None,
            });
        }
        let status = self.status().await?;
        if status.is_command_error() {
            return Err(LinkError::Refused(text, status));
        }
        Err(match w.confirmed_by(&reply) {
            Err(e) => LinkError::Garbled(q.text(), e),
            Ok(_) => LinkError::NotApplied(text, reply),
        })
    }
}

/// What a confirmed write read to confirm it, so the caller can keep it as current.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The read-back query and its reply.
    pub readback: Option<(Query, String)>,
    /// The STATUS read (writes without read-back).
    pub status: Option<Status>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("/dev/ttyUSB0"),
            Ok(Endpoint::Serial("/dev/ttyUSB0".into()))
        );
        assert_eq!(
            Endpoint::parse("tcp://lab-pc:8000"),
            Ok(Endpoint::Tcp("lab-pc:8000".into()))
        );
        assert!(Endpoint::parse("tcp://lab-pc")
            .unwrap_err()
            .contains("tcp://host:port"));
        assert!(Endpoint::parse("rfc2217://x:1")
            .unwrap_err()
            .contains("raw mode"));
        assert!(Endpoint::parse("udp://x:1").is_err());
        assert!(Endpoint::parse("").is_err());
    }

    /// The link against an in-memory peer (a tokio duplex pipe) that plays the unit.
    #[tokio::test(start_paused = true)]
    async fn paces_commands_and_verifies_writes() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let peer = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            let mut times = Vec::new();
            while let Ok(n) = theirs.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                times.push(Instant::now());
                let cmd = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                let reply = match cmd.as_str() {
                    "STATUS" => Some("03 REMOTE START"),
                    "IN_SP_00" => Some("-5.00"),
                    _ => None,
                };
                got.push(cmd);
                if let Some(r) = reply {
                    theirs
                        .write_all(format!("{r}\r\n").as_bytes())
                        .await
                        .unwrap();
                }
            }
            (got, times)
        });
        let mut link = Link::new(
            Box::new(ours),
            Duration::from_millis(250),
            Duration::from_secs(1),
        );
        let v = link.write(Write::Setpoint(0, -5.0)).await.unwrap();
        assert_eq!(v.readback, Some((Query::Setpoint(0), "-5.00".into())));
        assert_eq!(link.status().await.unwrap().code, 3);
        drop(link);
        let (got, times) = peer.await.unwrap();
        // Read back at once; STATUS only when asked for.
        assert_eq!(got, vec!["OUT_SP_00 -5.00", "IN_SP_00", "STATUS"]);
        for w in times.windows(2) {
            assert!(
                w[1] - w[0] >= Duration::from_millis(250),
                "{:?}",
                w[1] - w[0]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_and_closed_lines_are_told_apart() {
        let (ours, theirs) = tokio::io::duplex(64);
        let mut link = Link::new(
            Box::new(ours),
            Duration::from_millis(250),
            Duration::from_millis(500),
        );
        let e = link.query(Query::BathTemp).await.unwrap_err();
        assert!(
            matches!(e, LinkError::Timeout(ref c, _) if c == "IN_PV_00"),
            "{e}"
        );
        drop(theirs);
        let e = link.query(Query::BathTemp).await.unwrap_err();
        assert!(e.line_lost(), "{e}");
    }
}
