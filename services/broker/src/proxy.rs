//! The front end: dcs-broker's own public listeners, in front of rumqttd.
//!
//! rumqttd 0.20 has no publish hook and its accept path cannot be replaced, so
//! dcs-broker accepts the clients itself and pipes each connection to rumqttd listening
//! on 127.0.0.1 (internal ports). This gives it two things rumqttd lacks:
//! - TCP_NODELAY on every socket: the accepted public ones (set at accept, and on the
//!   listeners), the front's connections to rumqttd, and the sockets rumqttd accepts
//!   from the front (they inherit it from rumqttd's listeners, fixed by
//!   [`set_nodelay_on_own_listener`] before any public listener opens). Without it,
//!   a broker writing two small packets in a row (PUBACK, then a reply) holds the second
//!   ~40 ms for the client's delayed ACK.
//! - the client -> broker stream is read packet by packet ([`crate::front`]) and a
//!   retained command is replaced by its refusal before rumqttd sees it.
//!
//! The websocket listener terminates the WebSocket here and pipes the MQTT bytes to
//! rumqttd's TCP listener for the client's protocol level (so MQTT 5 works over
//! websockets too). The broker -> client direction is copied as is.

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::HeaderValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::front::{self, Inspector};

/// Which public listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// MQTT 3.1.1 over TCP.
    Mqtt,
    /// MQTT 5 over TCP.
    Mqtt5,
    /// MQTT (3.1.1 or 5) over websockets.
    Websocket,
}

impl Kind {
    /// The config key of this listener.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Mqtt => "mqtt",
            Kind::Mqtt5 => "mqtt5",
            Kind::Websocket => "websocket",
        }
    }
}

/// Where rumqttd listens, and the bounds the front applies.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// rumqttd's MQTT 3.1.1 listener.
    pub v4: SocketAddr,
    /// rumqttd's MQTT 5 listener.
    pub v5: SocketAddr,
    /// Largest remaining length accepted (rumqttd's `max_payload_size`).
    pub max_packet: usize,
    /// Time to complete the websocket handshake and send CONNECT.
    pub connect_timeout: Duration,
}

/// A free port on 127.0.0.1 for one of rumqttd's internal listeners. (rumqttd binds the
/// address itself; if someone takes the port first, [`set_nodelay_on_own_listener`]
/// does not find our listener and start-up fails.)
pub fn free_loopback_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot pick an internal port")?;
    Ok(l.local_addr()?)
}

/// Finds the listening socket of this process bound to `addr` (one of rumqttd's
/// internal listeners), sets TCP_NODELAY on it and reads it back. On Linux an accepted
/// socket inherits TCP_NODELAY from its listener, so every connection rumqttd accepts
/// has it from its first byte.
///
/// rumqttd binds its listeners on threads of its own and never exposes them, so they
/// are found among `/proc/self/fd` by local address. Fails if there is none (rumqttd did
/// not bind it, or a future rumqttd binds differently): the broker must not run with
/// Nagle on its connections.
pub fn set_nodelay_on_own_listener(addr: SocketAddr) -> anyhow::Result<()> {
    let dir = std::fs::read_dir("/proc/self/fd").context("cannot list /proc/self/fd")?;
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the fd is only borrowed for the option calls below. rumqttd keeps its
        // listeners open for the life of the process; had the fd been closed and reused
        // since the listing, the calls fail (EBADF) or read another socket whose address
        // does not match, and nothing is changed.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let matches = sock
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a == addr);
        if !matches || !sock.is_listener().unwrap_or(false) {
            continue;
        }
        sock.set_nodelay(true)
            .with_context(|| format!("cannot set TCP_NODELAY on rumqttd's listener {addr}"))?;
        if !sock.nodelay().unwrap_or(false) {
            bail!("TCP_NODELAY did not stick on rumqttd's listener {addr}");
        }
        return Ok(());
    }
    bail!(
        "rumqttd's internal listener {addr} is not a socket of this process: cannot set \
         TCP_NODELAY on it (port taken by someone else, or rumqttd changed how it listens)"
    )
}

/// Binds a public listener with TCP_NODELAY (inherited by accepted sockets; it is also
/// set on each at accept).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.set_nodelay(true)?;
    s.bind(addr)?;
    s.listen(1024)
}

/// Accepts on `listener` for ever, one task per connection.
pub async fn serve(listener: TcpListener, kind: Kind, up: Arc<Upstream>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::error!(listener = kind.name(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(%peer, error = %e, "cannot set TCP_NODELAY; connection closed");
            continue;
        }
        let up = up.clone();
        tokio::spawn(async move {
            if kind == Kind::Websocket {
                let handshake =
                    async_tungstenite::tokio::accept_hdr_async(stream, mqtt_subprotocol);
                match tokio::time::timeout(up.connect_timeout, handshake).await {
                    Ok(Ok(ws)) => {
                        let (r, w) = tokio::io::split(ws_stream_tungstenite::WsStream::new(ws));
                        connection(r, w, peer, kind, &up).await
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "websocket handshake failed"),
                    Err(_) => tracing::warn!(%peer, "websocket handshake timed out"),
                }
            } else {
                // Owned halves: no lock shared by the two directions.
                let (r, w) = stream.into_split();
                connection(r, w, peer, kind, &up).await
            }
        });
    }
}

/// Answers with the `mqtt` subprotocol when the client offers it (as MQTT over
/// websockets requires; rumqttd's own listener always sent it).
#[allow(clippy::result_large_err)] // the signature tungstenite asks for
fn mqtt_subprotocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let offered = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("mqtt"));
    if offered {
        resp.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
    }
    Ok(resp)
}

/// Reads one whole packet into `buf` (which may already hold some bytes); `Ok(None)` at
/// end of stream.
async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> anyhow::Result<Option<usize>> {
    loop {
        if let Some((h, n)) = front::frame(buf, max)? {
            if buf.len() >= h + n {
                return Ok(Some(h + n));
            }
        }
        buf.reserve(8192);
        if r.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// One client connection, from its CONNECT to its end.
async fn connection<R, W>(mut cr: R, mut cw: W, peer: SocketAddr, kind: Kind, up: &Upstream)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let first = tokio::time::timeout(
        up.connect_timeout,
        read_packet(&mut cr, &mut buf, up.max_packet),
    );
    let len = match first.await {
        Ok(Ok(Some(len))) => len,
        Ok(Ok(None)) => return tracing::debug!(%peer, "closed before CONNECT"),
        Ok(Err(e)) => return tracing::warn!(%peer, error = %e, "connection closed"),
        Err(_) => return tracing::warn!(%peer, "no CONNECT in time; connection closed"),
    };
    let connect = match front::parse_connect(&buf[..len]) {
        Ok(c) => c,
        Err(e) => return tracing::warn!(%peer, error = %e, "malformed CONNECT; connection closed"),
    };
    let client_id = connect.client_id.clone();
    if let Some(topic) = connect.retained_command_will() {
        tracing::warn!(
            %client_id, %topic, %peer,
            "connection refused: its will is a retained command (it would be stored and executed)"
        );
        let _ = cw.write_all(connect.connack_not_authorized()).await;
        let _ = cw.shutdown().await;
        return;
    }
    let target = match (kind, connect.level) {
        (Kind::Mqtt, _) => up.v4,
        (Kind::Mqtt5, _) => up.v5,
        (Kind::Websocket, 5) => up.v5,
        (Kind::Websocket, _) => up.v4,
    };
    let upstream = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => return tracing::error!(%peer, %target, error = %e, "cannot reach rumqttd"),
    };
    if let Err(e) = upstream.set_nodelay(true) {
        return tracing::error!(%peer, error = %e, "cannot set TCP_NODELAY towards rumqttd");
    }
    tracing::debug!(
        %peer, %client_id, listener = kind.name(),
        via = %upstream.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        "connection"
    );
    let (mut ur, mut uw) = upstream.into_split();
    let mut inspector = Inspector::new(&connect, up.max_packet);

    let to_broker = async {
        let mut out: Vec<u8> = buf.drain(..len).collect();
        loop {
            match inspector.process(&mut buf, &mut out) {
                Ok(refused) => {
                    for r in refused {
                        tracing::warn!(
                            %client_id, topic = %r.topic, reply_topic = %r.reply_topic,
                            "retained command refused: not stored, not delivered"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(%client_id, %peer, error = %e, "malformed MQTT; connection closed");
                    return;
                }
            }
            if !out.is_empty() {
                if uw.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
            buf.reserve(8192);
            match cr.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let to_client = async {
        let mut b = vec![0u8; 16384];
        loop {
            match ur.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if cw.write_all(&b[..n]).await.is_err() || cw.flush().await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::select! {
        () = to_broker => {}
        () = to_client => {}
    }
}
