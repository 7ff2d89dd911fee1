//! The middleware server: one client at a time on TCP, the [`Controller`] deciding
//! what each message means, runs executed by a task that writes results as they go.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use dcs_shared::shutdown::CancellationToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::{FaultKind, SimConfig};
use crate::protocol::{self, Action, Controller};
use crate::run::RunWriter;

/// Progress of the current run, shared between the run task and the connection.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct RunFlags {
    done: bool,
    hung: bool,
    dropped: bool,
}

struct Shared {
    controller: Mutex<Controller>,
    flags: watch::Sender<RunFlags>,
    run: Mutex<Option<RunControl>>,
}

struct RunControl {
    stop: CancellationToken,
    pause: watch::Sender<bool>,
}

/// Serves the middleware protocol on `cfg.listen` until `shutdown`.
pub async fn run(cfg: SimConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    serve(listener, cfg, shutdown).await
}

/// Serves on an already bound listener (tests bind port 0).
pub async fn serve(
    listener: TcpListener,
    cfg: SimConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, base_dir = %cfg.base_dir.display(), run_secs = cfg.run_secs,
        fault = ?cfg.fault, "ph2acf-sim: middleware listening");
    let cfg = Arc::new(cfg);
    let shared = Arc::new(Shared {
        controller: Mutex::new(Controller::new(cfg.calibrations.clone())),
        flags: watch::channel(RunFlags::default()).0,
        run: Mutex::new(None),
    });
    let busy = Arc::new(tokio::sync::Mutex::new(()));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(guard) = busy.clone().try_lock_owned() else {
            tracing::warn!(%peer, "second client refused: one client at a time");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tracing::info!(%peer, "client connected");
        let (cfg, shared, shutdown) = (cfg.clone(), shared.clone(), shutdown.clone());
        tokio::spawn(async move {
            let why = connection(stream, &cfg, &shared, &shutdown).await;
            tracing::info!(%peer, reason = %why, "client disconnected");
            drop(guard);
        });
    }
    if let Some(r) = shared.run.lock().ok().and_then(|mut r| r.take()) {
        r.stop.cancel();
    }
    tracing::info!("ph2acf-sim: stopped");
    Ok(())
}

async fn connection(
    mut stream: TcpStream,
    cfg: &Arc<SimConfig>,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> String {
    let mut flags = shared.flags.subscribe();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = loop {
            match protocol::decode(&mut buf) {
                Ok(Some(t)) => break t,
                Ok(None) => {}
                Err(e) => return format!("unreadable frame: {e:?}"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return "shutdown".into(),
                changed = flags.changed() => {
                    if changed.is_ok() && flags.borrow_and_update().dropped {
                        return "fault injected: connection dropped".into();
                    }
                    continue;
                }
                r = stream.read(&mut chunk) => match r {
                    Ok(0) => return "closed by client".into(),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => return format!("read error: {e}"),
                },
            }
        };
        let state = *shared.flags.borrow();
        if state.hung {
            // Hung: swallow everything, answer nothing, keep the connection open.
            tracing::debug!(message = %text, "hung: not answering");
            continue;
        }
        let Some(req) = protocol::parse(&text) else {
            // The real server aborts here; the simulator drops the client instead.
            tracing::error!(message = %text, "unknown message: closing the connection");
            return format!("unknown message {text:?}");
        };
        let (reply, action) = match shared.controller.lock() {
            Ok(mut c) => c.handle(req, state.done),
            Err(_) => return "controller poisoned".into(),
        };
        tracing::info!(message = %text, %reply, "request");
        match action {
            Action::None => {}
            Action::StartRun {
                calibration,
                config_file,
                run_number,
            } => start_run(cfg, shared, &calibration, &config_file, run_number),
            Action::StopRun => {
                if let Some(r) = shared.run.lock().ok().and_then(|mut r| r.take()) {
                    r.stop.cancel();
                }
            }
            Action::Pause(p) => {
                if let Some(r) = shared.run.lock().ok().as_ref().and_then(|r| r.as_ref()) {
                    let _ = r.pause.send(p);
                }
            }
        }
        if let Err(e) = stream.write_all(&protocol::encode(&reply)).await {
            return format!("write error: {e}");
        }
    }
}

fn start_run(
    cfg: &Arc<SimConfig>,
    shared: &Arc<Shared>,
    calibration: &str,
    config_file: &str,
    run_number: u64,
) {
    let stop = CancellationToken::new();
    let (pause, paused) = watch::channel(false);
    if let Ok(mut r) = shared.run.lock() {
        if let Some(old) = r.replace(RunControl {
            stop: stop.clone(),
            pause,
        }) {
            old.stop.cancel();
        }
    }
    shared.flags.send_replace(RunFlags::default());
    let writer = RunWriter::begin(
        cfg,
        &cfg.base_dir,
        calibration,
        &PathBuf::from(config_file),
        run_number,
    );
    let (cfg, shared) = (cfg.clone(), shared.clone());
    tokio::spawn(async move {
        match writer {
            Ok(w) => execute(w, &cfg, &shared, stop, paused).await,
            Err(e) => {
                // The real software would end the run at once; "Done" with no results.
                tracing::error!(error = %e, run_number, "run failed to start");
                shared.flags.send_modify(|f| f.done = true);
            }
        }
    });
}

async fn execute(
    mut w: RunWriter,
    cfg: &SimConfig,
    shared: &Shared,
    stop: CancellationToken,
    mut paused: watch::Receiver<bool>,
) {
    let tick = Duration::from_millis(20);
    let total = cfg.run_secs.max(0.0);
    let mut elapsed = 0.0;
    tracing::info!(run_number = w.run_number, dir = %w.dir.display(), "run started");
    loop {
        let percent = if total == 0.0 {
            100.0
        } else {
            (elapsed / total * 100.0).min(100.0)
        };
        if let Some(f) = cfg.fault {
            if percent >= f.at_percent {
                match f.kind {
                    FaultKind::Crash => {
                        tracing::error!(percent, "fault injected: crashing");
                        std::process::abort();
                    }
                    FaultKind::Hang => {
                        tracing::warn!(percent, "fault injected: hanging");
                        shared.flags.send_modify(|f| f.hung = true);
                        stop.cancelled().await;
                        return;
                    }
                    FaultKind::Drop => {
                        if !shared.flags.borrow().dropped {
                            tracing::warn!(percent, "fault injected: dropping the client");
                            shared.flags.send_modify(|f| f.dropped = true);
                        }
                    }
                }
            }
        }
        if let Err(e) = w.advance(percent) {
            tracing::error!(error = %e, "cannot write results");
        }
        if percent >= 100.0 {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => {
                tracing::info!(percent, "run stopped before the end");
                break;
            }
            _ = tokio::time::sleep(tick) => {
                if !*paused.borrow_and_update() {
                    elapsed += tick.as_secs_f64();
                }
            }
        }
    }
    match tokio::task::spawn_blocking(move || w.finish()).await {
        Ok(Ok(path)) => tracing::info!(path = %path.display(), "Closing result file"),
        Ok(Err(e)) => tracing::error!(error = %e, "cannot close results"),
        Err(e) => tracing::error!(error = %e, "results writer panicked"),
    }
    shared.flags.send_modify(|f| f.done = true);
}
