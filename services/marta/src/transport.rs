//! Modbus TCP to the PLC: connect, read and write holding registers, each bounded by a
//! timeout. A timeout or an I/O error closes the connection (a late answer must not be
//! taken for the next request's); a Modbus exception keeps it (the PLC is there).

use std::net::SocketAddr;
use std::time::Duration;

use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::Slave;

use crate::registers::Span;

/// What went wrong talking to the PLC, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No connection (never made, or closed after an error).
    #[error("not connected")]
    NotConnected,
    /// Connecting failed.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    /// No answer in time.
    #[error("no answer within {ms} ms to {what}")]
    Timeout {
        /// The request.
        what: String,
        /// The timeout.
        ms: u64,
    },
    /// The PLC answered with a Modbus exception.
    #[error("Modbus exception {code} to {what}")]
    Exception {
        /// The request.
        what: String,
        /// The exception, as tokio-modbus names it.
        code: String,
    },
    /// The connection failed (closed by the PLC, reset, garbage).
    #[error("connection lost during {what}: {error}")]
    Io {
        /// The request.
        what: String,
        /// The error.
        error: String,
    },
}

impl TransportError {
    /// Whether the connection is closed after this error.
    pub fn closes(&self) -> bool {
        !matches!(self, TransportError::Exception { .. })
    }
}

/// A Modbus TCP client that can be disconnected and connected again.
pub struct Transport {
    host: String,
    port: u16,
    unit: u8,
    connect_timeout: Duration,
    request_timeout: Duration,
    ctx: Option<Context>,
}

impl Transport {
    /// A client for `host:port`, unit `unit`; not connected yet.
    pub fn new(
        host: &str,
        port: u16,
        unit: u8,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Self {
        Transport {
            host: host.to_string(),
            port,
            unit,
            connect_timeout,
            request_timeout,
            ctx: None,
        }
    }

    /// `host:port`.
    pub fn peer(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        self.ctx.is_some()
    }

    /// Connects (closing any connection first).
    pub async fn connect(&mut self) -> Result<(), TransportError> {
        self.close();
        let peer = self.peer();
        let fail = |e: String| TransportError::Connect(peer.clone(), e);
        let attempt = async {
            let addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|e| fail(e.to_string()))?;
            let mut last = fail("the name resolves to no address".into());
            for addr in addrs.collect::<Vec<SocketAddr>>() {
                match tokio_modbus::client::tcp::connect_slave(addr, Slave(self.unit)).await {
                    Ok(ctx) => return Ok(ctx),
                    Err(e) => last = fail(e.to_string()),
                }
            }
            Err(last)
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(ctx)) => {
                self.ctx = Some(ctx);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(fail(format!(
                "no answer within {} ms",
                self.connect_timeout.as_millis()
            ))),
        }
    }

    /// Closes the connection (without waiting for the PLC).
    pub fn close(&mut self) {
        self.ctx = None;
    }

    async fn call<T>(
        &mut self,
        what: String,
        f: impl AsyncFnOnce(&mut Context) -> tokio_modbus::Result<T>,
    ) -> Result<T, TransportError> {
        let Some(ctx) = self.ctx.as_mut() else {
            return Err(TransportError::NotConnected);
        };
        let result = match tokio::time::timeout(self.request_timeout, f(ctx)).await {
            Err(_) => Err(TransportError::Timeout {
                what,
                ms: self.request_timeout.as_millis() as u64,
            }),
            Ok(Err(e)) => Err(TransportError::Io {
                what,
                error: e.to_string(),
            }),
            Ok(Ok(Err(code))) => Err(TransportError::Exception {
                what,
                code: format!("{:#04x} ({code:?})", u8::from(code)),
            }),
            Ok(Ok(Ok(v))) => Ok(v),
        };
        if let Err(e) = &result {
            if e.closes() {
                self.close();
            }
        }
        result
    }

    /// Reads `span`.
    pub async fn read(&mut self, span: Span) -> Result<Vec<u16>, TransportError> {
        let what = format!("reading registers {}..{}", span.start, span.end() - 1);
        let words = self
            .call(what.clone(), async |c| {
                c.read_holding_registers(span.start, span.count).await
            })
            .await?;
        if words.len() != usize::from(span.count) {
            self.close();
            return Err(TransportError::Io {
                what,
                error: format!(
                    "{} registers in the answer, not {}",
                    words.len(),
                    span.count
                ),
            });
        }
        Ok(words)
    }

    /// Writes one register.
    pub async fn write_one(&mut self, register: u16, word: u16) -> Result<(), TransportError> {
        self.call(format!("writing register {register}"), async |c| {
            c.write_single_register(register, word).await
        })
        .await
    }

    /// Writes consecutive registers in one request (a float32 whole, never half).
    pub async fn write_many(&mut self, register: u16, words: &[u16]) -> Result<(), TransportError> {
        self.call(
            format!(
                "writing registers {register}..{}",
                usize::from(register) + words.len() - 1
            ),
            async |c| c.write_multiple_registers(register, words).await,
        )
        .await
    }
}
