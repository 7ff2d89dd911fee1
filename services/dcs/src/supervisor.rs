//! Runs components as child processes, restarts them with backoff when they die, and
//! stops them in order (services first, broker last) on shutdown.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcs_shared::backoff::Backoff;
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::UtcNanos;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, Notify};

/// Grace period between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// A child that ran this long before dying restarts after the shortest delay again.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// What the launcher reports about one component (on `dcs-launcher/status`).
#[derive(Debug, Clone, Serialize)]
pub struct ChildStatus {
    /// `starting`, `running`, `restarting`, `stopped`.
    pub state: &'static str,
    /// Process id while running.
    pub pid: Option<u32>,
    /// Restarts since `dcs up`.
    pub restarts: u32,
    /// How the last run ended, if it did.
    pub last_exit: Option<String>,
    /// When the state last changed (RFC 3339 UTC).
    pub since: String,
}

/// Shared view of every child's status, with a notification on each change.
#[derive(Clone, Default)]
pub struct StatusBoard {
    children: Arc<Mutex<BTreeMap<String, ChildStatus>>>,
    changed: Arc<Notify>,
}

impl StatusBoard {
    fn update(&self, name: &str, f: impl FnOnce(&mut ChildStatus)) {
        if let Ok(mut m) = self.children.lock() {
            let s = m.entry(name.to_string()).or_insert_with(|| ChildStatus {
                state: "starting",
                pid: None,
                restarts: 0,
                last_exit: None,
                since: UtcNanos::now().to_string(),
            });
            let before = s.state;
            f(s);
            if s.state != before {
                s.since = UtcNanos::now().to_string();
            }
        }
        self.changed.notify_waiters();
        self.changed.notify_one();
    }

    /// A copy of the current statuses.
    pub fn snapshot(&self) -> BTreeMap<String, ChildStatus> {
        self.children.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Waits for the next change.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// How to start one child.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// Component name (also the log prefix).
    pub name: String,
    /// The program (the `dcs` executable itself).
    pub program: PathBuf,
    /// Its arguments (`run NAME --config STACK`).
    pub args: Vec<String>,
}

/// Keeps one child running until `shutdown`; a message on `restart` restarts it now.
pub async fn supervise(
    spec: ChildSpec,
    board: StatusBoard,
    shutdown: CancellationToken,
    mut restart: mpsc::Receiver<()>,
) {
    let name = spec.name.as_str();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Own process group: a terminal's Ctrl-C reaches only the launcher, which
            // then stops the children in order.
            .process_group(0);
        // SAFETY: runs in the child between fork and exec; prctl(2) is async-signal-safe
        // and touches no memory of the parent. Set here rather than by the child itself so
        // that a launcher dying at any moment leaves no orphan.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(component = name, error = %e, retry_in = ?delay, "cannot start");
                board.update(name, |s| {
                    s.state = "restarting";
                    s.last_exit = Some(format!("cannot start: {e}"));
                });
                if wait_backoff(delay, &shutdown, &mut restart).await {
                    break;
                }
                continue;
            }
        };
        let pid = child.id();
        let copies = [
            forward(name, child.stdout.take()),
            forward(name, child.stderr.take()),
        ];
        tracing::info!(component = name, pid, "started");
        board.update(name, |s| {
            s.state = "running";
            s.pid = pid;
        });

        tokio::select! {
            status = child.wait() => {
                let how = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
                if started.elapsed() > HEALTHY_AFTER {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::error!(component = name, exit = %how, restart_in = ?delay, "exited unexpectedly; restarting");
                board.update(name, |s| {
                    s.state = "restarting";
                    s.pid = None;
                    s.last_exit = Some(how);
                    s.restarts += 1;
                });
                if wait_backoff(delay, &shutdown, &mut restart).await {
                    break;
                }
            }
            _ = shutdown.cancelled() => {
                let how = stop(name, &mut child).await;
                // Its last lines (the stop itself) are printed before it counts as stopped.
                for c in copies.into_iter().flatten() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), c).await;
                }
                board.update(name, |s| {
                    s.pid = None;
                    s.last_exit = Some(how);
                });
                break;
            }
            Some(()) = restart.recv() => {
                let how = stop(name, &mut child).await;
                tracing::info!(component = name, "restarting on request");
                backoff.reset();
                board.update(name, |s| {
                    s.state = "restarting";
                    s.pid = None;
                    s.last_exit = Some(how);
                    s.restarts += 1;
                });
            }
        }
    }
    board.update(name, |s| {
        s.state = "stopped";
        s.pid = None;
    });
}

/// Waits out a restart delay; a restart request ends it early (and is consumed, so it
/// does not also stop the child about to start). Returns true if shutdown came first.
async fn wait_backoff(
    delay: Duration,
    shutdown: &CancellationToken,
    restart: &mut mpsc::Receiver<()>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        Some(()) = restart.recv() => false,
        _ = shutdown.cancelled() => true,
    }
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`]. Returns how the child ended.
async fn stop(name: &str, child: &mut Child) -> String {
    let t0 = Instant::now();
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(Ok(status)) => {
            tracing::info!(component = name, took_ms = t0.elapsed().as_millis() as u64, %status, "stopped");
            status.to_string()
        }
        Ok(Err(e)) => format!("wait failed: {e}"),
        Err(_) => {
            tracing::warn!(
                component = name,
                "did not stop within {STOP_GRACE:?}; killing"
            );
            let _ = child.kill().await;
            "killed after the grace period".to_string()
        }
    }
}

/// Copies a child's output to our stderr, one line at a time, prefixed with its name.
/// Bytes that are not UTF-8 are shown lossily rather than ending the copy.
fn forward(
    name: &str,
    out: Option<impl AsyncRead + Unpin + Send + 'static>,
) -> Option<tokio::task::JoinHandle<()>> {
    let out = out?;
    let prefix = format!("{name:>12} | ");
    Some(tokio::spawn(async move {
        let mut reader = BufReader::new(out);
        let mut line = Vec::new();
        while matches!(reader.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
            let text = String::from_utf8_lossy(&line);
            eprintln!("{prefix}{}", text.trim_end_matches(['\n', '\r']));
            line.clear();
        }
    }))
}
