//! The InfluxDB side: batches from the spool, written with retry, acknowledged in the
//! spool only once InfluxDB has them. Runs on a thread of its own (blocking HTTP).
//!
//! - Timeouts, refused connections, 5xx, 408 and 429: the batch stays in the spool and
//!   is retried with exponential backoff.
//! - 401, 403 and 404 (bad credentials, missing database or bucket) say nothing about
//!   the data: delivery pauses, the data stays in the spool, retried with backoff until
//!   someone fixes the setup.
//! - Other 4xx (a type conflict, a bad line): the batch is halved until the messages
//!   InfluxDB refuses are isolated; those go to the dead-letter file with the server's
//!   message, the others are written. InfluxDB writes are idempotent (same series and
//!   timestamp overwrite), so writing a half twice is harmless.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dcs_shared::backoff::Backoff;
use dcs_shared::influx::{InfluxWriter, WriteError};
use dcs_shared::spool::Spool;
use dcs_shared::UtcNanos;

use crate::config::{BatchSettings, RetrySettings};
use crate::record;
use crate::stats::Stats;

/// Wakes the sink (new data) and tells it to stop.
#[derive(Default)]
pub struct Control {
    state: Mutex<ControlState>,
    cv: Condvar,
}

#[derive(Default)]
struct ControlState {
    woken: bool,
    drain_until: Option<Instant>,
}

impl Control {
    /// New data is in the spool.
    pub fn wake(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.woken = true;
            self.cv.notify_one();
        }
    }

    /// Deliver what can be delivered before `deadline`, then return.
    pub fn stop(&self, deadline: Instant) {
        if let Ok(mut s) = self.state.lock() {
            s.drain_until = Some(deadline);
            self.cv.notify_one();
        }
    }

    fn drain_until(&self) -> Option<Instant> {
        self.state.lock().ok().and_then(|s| s.drain_until)
    }

    /// Sleeps up to `timeout`, less if woken or stopped.
    fn wait(&self, timeout: Duration) {
        self.sleep(timeout, true);
    }

    /// Sleeps `timeout` unless stopped (new data does not shorten a backoff).
    fn pause(&self, timeout: Duration) {
        self.sleep(timeout, false);
    }

    fn sleep(&self, timeout: Duration, wake_on_data: bool) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        let end = Instant::now() + timeout;
        while !(wake_on_data && s.woken) && s.drain_until.is_none() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.cv.wait_timeout(s, left) {
                Ok((g, _)) => s = g,
                Err(_) => return,
            }
        }
        if wake_on_data {
            s.woken = false;
        }
    }
}

/// The InfluxDB side.
pub struct Sink {
    /// The spool shared with the MQTT side.
    pub spool: Arc<Mutex<Spool>>,
    /// HTTP writer.
    pub writer: InfluxWriter,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Batching.
    pub batch: BatchSettings,
    /// Backoff.
    pub retry: RetrySettings,
    /// Where refused lines go.
    pub dead_letter: PathBuf,
    /// Wake-ups and stop.
    pub control: Arc<Control>,
}

enum Outcome {
    /// Everything written or dead-lettered.
    Done,
    /// Try again later: the server is unreachable or failing, or (`blocked`) the setup
    /// is wrong (credentials, database).
    Failed { blocked: bool, error: String },
}

impl Sink {
    /// Delivers until stopped.
    pub fn run(self) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.retry.initial_ms),
            Duration::from_secs(self.retry.max_secs),
        );
        let interval = Duration::from_millis(self.batch.interval_ms);
        let mut failing = false;
        loop {
            let draining = self.control.drain_until();
            if draining.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let read = self
                .spool
                .lock()
                .map_err(|_| "spool lock poisoned".to_string())
                .and_then(|mut s| {
                    self.stats
                        .spool_bytes
                        .store(s.pending_bytes(), Ordering::Relaxed);
                    s.read(self.batch.size, self.batch.max_bytes)
                        .map_err(|e| e.to_string())
                });
            let (records, pos) = match read {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the spool; retrying");
                    self.control.pause(Duration::from_secs(1));
                    continue;
                }
            };
            if records.is_empty() {
                if draining.is_some() {
                    break;
                }
                self.control.wait(interval);
                continue;
            }
            let decoded: Vec<(i64, &str)> = records
                .iter()
                .filter_map(|r| {
                    let d = record::decode(r);
                    if d.is_none() {
                        tracing::error!("spool record in an unknown format skipped");
                    }
                    d
                })
                .collect();
            let oldest = decoded.iter().map(|(t, _)| *t).min().unwrap_or(i64::MAX);
            let age = Duration::from_nanos(
                u64::try_from(UtcNanos::now().as_nanos().saturating_sub(oldest)).unwrap_or(0),
            );
            let bytes: usize = decoded.iter().map(|(_, l)| l.len()).sum();
            let full = records.len() >= self.batch.size || bytes as u64 >= self.batch.max_bytes;
            if !full && age < interval && draining.is_none() {
                self.control.wait(interval - age);
                continue;
            }
            let lines: Vec<&str> = decoded.iter().map(|(_, l)| *l).collect();
            match self.deliver(&lines) {
                Outcome::Done => {
                    if let Ok(mut s) = self.spool.lock() {
                        if let Err(e) = s.ack(pos) {
                            // Not fatal: the batch will be written again (idempotent).
                            tracing::error!(error = %e, "cannot record delivery in the spool");
                        }
                        self.stats
                            .spool_bytes
                            .store(s.pending_bytes(), Ordering::Relaxed);
                    }
                    let lag = UtcNanos::now().as_nanos().saturating_sub(oldest) / 1_000_000;
                    self.stats.lag_ms.store(lag, Ordering::Relaxed);
                    if failing {
                        tracing::info!(
                            attempts = backoff.attempts(),
                            "InfluxDB writes succeed again"
                        );
                        failing = false;
                    }
                    self.stats.set_output("ok");
                    backoff.reset();
                }
                Outcome::Failed { error, .. } if draining.is_some() => {
                    tracing::warn!(%error, "InfluxDB unavailable at shutdown; the rest stays in the spool");
                    break;
                }
                Outcome::Failed { blocked, error } => {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        if blocked {
                            tracing::error!(%error, "InfluxDB refuses every write: check the output's database/bucket and credentials; data is kept in the spool");
                        } else {
                            tracing::warn!(%error, "InfluxDB write failed; spooling and retrying with backoff");
                        }
                        failing = true;
                    }
                    let state = if blocked { "blocked" } else { "retrying" };
                    self.stats.set_output(&format!("{state}: {error}"));
                    self.control.pause(backoff.next_delay());
                }
            }
        }
    }

    /// Writes `records` (each the lines of one message), isolating the refused ones.
    fn deliver(&self, records: &[&str]) -> Outcome {
        let body = records.concat();
        let lines = body.lines().count() as u64;
        match self.writer.write(&body) {
            Ok(()) => {
                self.stats.written.fetch_add(lines, Ordering::Relaxed);
                Outcome::Done
            }
            Err(WriteError::Retry(error)) => Outcome::Failed {
                blocked: false,
                error,
            },
            Err(WriteError::Rejected { status, message }) if matches!(status, 401 | 403 | 404) => {
                Outcome::Failed {
                    blocked: true,
                    error: format!("HTTP {status}: {message}"),
                }
            }
            Err(WriteError::Rejected { status, message }) => {
                if records.len() == 1 {
                    self.dead_letter(records[0], status, &message);
                    self.stats.rejected.fetch_add(lines, Ordering::Relaxed);
                    return Outcome::Done;
                }
                let (a, b) = records.split_at(records.len() / 2);
                match self.deliver(a) {
                    Outcome::Done => self.deliver(b),
                    other => other,
                }
            }
        }
    }

    fn dead_letter(&self, lines: &str, status: u16, message: &str) {
        tracing::error!(status, error = message, file = %self.dead_letter.display(), "InfluxDB refused data; kept in the dead-letter file");
        let entry = serde_json::json!({
            "time": humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
            "status": status,
            "error": message,
            "lines": lines,
        });
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.dead_letter)
            .and_then(|mut f| {
                let mut text = entry.to_string();
                text.push('\n');
                f.write_all(text.as_bytes())?;
                f.sync_data()
            });
        if let Err(e) = written {
            // The refused data would be lost: say it loudly, with the data.
            tracing::error!(error = %e, lines, "cannot write the dead-letter file");
        }
    }
}
