//! Clean shutdown on SIGTERM and SIGINT.
//!
//! A binary in a `FROM scratch` image is PID 1, which the kernel does not stop by
//! default signal handling: it must handle SIGTERM itself or every `podman stop` waits
//! 10 s and then kills it.

pub use tokio_util::sync::CancellationToken;

/// Waits for SIGTERM or SIGINT and returns its name. If the handlers cannot be
/// installed (no signal support), waits forever rather than stopping at once.
pub async fn signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install SIGTERM/SIGINT handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// A token cancelled when SIGTERM or SIGINT arrives; clone it into every task.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let name = signal().await;
        tracing::info!(signal = name, "shutting down");
        trigger.cancel();
    });
    token
}
