//! Clean shutdown on SIGTERM and SIGINT.
//!
//! A binary in a `FROM scratch` image is PID 1, which the kernel does not stop by
//! default signal handling: it must handle SIGTERM itself or every `podman stop` waits
//! 10 s and then kills it. Install the handlers with [`Signals::install`] *before*
//! announcing readiness, or a SIGTERM that arrives in between kills the process
//! uncleanly (or, as PID 1, is ignored).

use tokio::signal::unix::{signal, Signal, SignalKind};
pub use tokio_util::sync::CancellationToken;

/// Installed SIGTERM and SIGINT handlers.
pub struct Signals {
    handlers: Option<(Signal, Signal)>,
}

impl Signals {
    /// Installs the handlers now. Must be called within a tokio runtime. If they cannot
    /// be installed, [`Signals::recv`] waits forever and an error is logged.
    pub fn install() -> Signals {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => Signals {
                handlers: Some((t, i)),
            },
            _ => {
                tracing::error!("cannot install SIGTERM/SIGINT handlers; stop with SIGKILL");
                Signals { handlers: None }
            }
        }
    }

    /// Waits for SIGTERM or SIGINT and returns its name.
    pub async fn recv(&mut self) -> &'static str {
        let Some((term, int)) = self.handlers.as_mut() else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
}

/// Installs the handlers and returns a token cancelled when SIGTERM or SIGINT arrives;
/// clone it into every task.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    let mut signals = Signals::install();
    tokio::spawn(async move {
        let name = signals.recv().await;
        // Cancel first: nothing (not even logging) may stand between a signal and the stop.
        trigger.cancel();
        tracing::info!(signal = name, "shutting down");
    });
    token
}
