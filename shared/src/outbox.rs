//! Durable queues of records waiting for a store that may be away (a database, a mail
//! server, a webhook): one per store, so one outage never holds back another. A record
//! is on disk (the [`Spool`], fsynced) before the caller moves on, and leaves the queue
//! only once the store has acknowledged it: nothing is lost to a store that is down,
//! nor to a restart (delivery resumes from the queue). Used by the calibration bridge
//! (MongoDB, InfluxDB) and the notifier (SMTP, webhooks).

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backoff::Backoff;
use crate::shutdown::CancellationToken;
use crate::spool::{Overflow, Spool, SpoolConfig, SpoolError, MAX_RECORD};
use tokio::sync::Notify;

/// What a store did with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Stored.
    Done,
    /// Not now (store down, timeout): kept and retried with backoff.
    Retry(String),
    /// Refused for good (retrying cannot help): set aside in `<queue>.rejected`.
    Reject(String),
}

/// What the status shows of a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxState {
    /// Bytes waiting.
    pub pending_bytes: u64,
    /// Why the last attempt failed, while it keeps failing.
    pub error: Option<String>,
    /// Records stored since start.
    pub delivered: u64,
    /// Records refused for good since start (set aside in `<queue>.rejected`).
    pub rejected: u64,
}

/// A durable queue in front of one store.
#[derive(Clone)]
pub struct Outbox {
    name: String,
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
    state: Arc<Mutex<OutboxState>>,
    rejected: std::path::PathBuf,
}

impl Outbox {
    /// Opens (or creates) the queue `dir/name`.
    pub fn open(dir: &Path, name: &str) -> Result<Outbox, SpoolError> {
        let spool = Spool::open(SpoolConfig {
            dir: dir.join(name),
            segment_bytes: 16 * 1024 * 1024,
            max_bytes: 4 * 1024 * 1024 * 1024,
            // Never drop a run: a full queue refuses, and the service says so.
            overflow: Overflow::Refuse,
        })?;
        let state = OutboxState {
            pending_bytes: spool.pending_bytes(),
            ..Default::default()
        };
        Ok(Outbox {
            name: name.to_string(),
            spool: Arc::new(Mutex::new(spool)),
            wake: Arc::new(Notify::new()),
            state: Arc::new(Mutex::new(state)),
            rejected: dir.join(format!("{name}.rejected")),
        })
    }

    fn spool(&self) -> Result<std::sync::MutexGuard<'_, Spool>, SpoolError> {
        self.spool
            .lock()
            .map_err(|_| SpoolError::Io(std::io::Error::other("queue lock poisoned")))
    }

    /// Appends a record durably (fsync) and wakes the delivery task.
    pub fn push(&self, record: &[u8]) -> Result<(), SpoolError> {
        if record.len() as u64 > MAX_RECORD {
            return Err(SpoolError::TooLarge(record.len() as u64));
        }
        let mut spool = self.spool()?;
        spool.append(record)?;
        spool.sync()?;
        let pending = spool.pending_bytes();
        drop(spool);
        if let Ok(mut s) = self.state.lock() {
            s.pending_bytes = pending;
        }
        self.wake.notify_one();
        Ok(())
    }

    /// The queue's state for the status topic.
    pub fn state(&self) -> OutboxState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn set(&self, f: impl FnOnce(&mut OutboxState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
    }

    fn next(&self) -> Result<Option<(Vec<u8>, crate::spool::Position)>, SpoolError> {
        let mut spool = self.spool()?;
        let (mut records, pos) = spool.read(1, MAX_RECORD)?;
        Ok(records.pop().map(|r| (r, pos)))
    }

    fn ack(&self, pos: crate::spool::Position) -> Result<(), SpoolError> {
        let mut spool = self.spool()?;
        spool.ack(pos)?;
        let pending = spool.pending_bytes();
        drop(spool);
        self.set(|s| {
            s.pending_bytes = pending;
            s.delivered += 1;
            s.error = None;
        });
        Ok(())
    }

    fn set_aside(&self, record: &[u8], why: &str) {
        use std::io::Write as _;
        let line = serde_json::json!({
            "time": crate::UtcNanos::now().to_string(),
            "error": why,
            "record": String::from_utf8_lossy(record),
        });
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.rejected)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = r {
            tracing::error!(queue = %self.name, error = %e, "cannot write the rejected-records file");
        }
    }

    /// Delivers records in order with `deliver` until `shutdown`, retrying with backoff.
    pub async fn deliver<F, Fut>(self, mut deliver: F, shutdown: CancellationToken)
    where
        F: FnMut(Vec<u8>) -> Fut,
        Fut: Future<Output = Delivery>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            let (record, pos) = match self.next() {
                Ok(Some(x)) => x,
                Ok(None) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = self.wake.notified() => continue,
                    }
                }
                Err(e) => {
                    tracing::error!(queue = %self.name, error = %e, "cannot read the queue");
                    self.set(|s| s.error = Some(e.to_string()));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => continue,
                    }
                }
            };
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                d = deliver(record.clone()) => d,
            };
            match outcome {
                Delivery::Done => {
                    if backoff.attempts() > 0 {
                        tracing::info!(
                            queue = %self.name,
                            after_attempts = backoff.attempts(),
                            "store is back: queued records delivered"
                        );
                    }
                    backoff.reset();
                    if let Err(e) = self.ack(pos) {
                        tracing::error!(queue = %self.name, error = %e, "cannot advance the queue");
                    }
                }
                Delivery::Reject(why) => {
                    tracing::error!(queue = %self.name, error = %why,
                        file = %self.rejected.display(), "record refused by the store: set aside");
                    self.set_aside(&record, &why);
                    if let Err(e) = self.ack(pos) {
                        tracing::error!(queue = %self.name, error = %e, "cannot advance the queue");
                    }
                    // Not delivered: counted apart, and the reason stays on the status.
                    self.set(|s| {
                        s.delivered -= 1;
                        s.rejected += 1;
                        s.error = Some(format!("set aside: {why}"));
                    });
                }
                Delivery::Retry(why) => {
                    let delay = backoff.next_delay();
                    // One line when the outage starts, then one per ~minute of retries.
                    if backoff.attempts() == 1 || backoff.attempts().is_multiple_of(10) {
                        tracing::warn!(queue = %self.name, error = %why, attempts = backoff.attempts(),
                            retry_in_ms = delay.as_millis() as u64, "store unavailable: record kept in the queue");
                    }
                    self.set(|s| s.error = Some(why));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}
