//! Self-metrics: counters shared by the MQTT side and the InfluxDB side.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use dcs_shared::line_protocol::{FieldValue, Point};
use serde::Serialize;

/// Counters; all monotonic except the gauges `spool_bytes` and `lag_ms`.
#[derive(Debug, Default)]
pub struct Stats {
    /// MQTT messages received.
    pub received: AtomicU64,
    /// Messages that could not be read (or had fields that could not), see the log.
    pub malformed: AtomicU64,
    /// Messages on a topic no input maps.
    pub unmatched: AtomicU64,
    /// Lines InfluxDB accepted.
    pub written: AtomicU64,
    /// Lines InfluxDB refused (4xx), now in the dead-letter file.
    pub rejected: AtomicU64,
    /// Writes that failed and were retried (timeouts, 5xx, server gone).
    pub retried: AtomicU64,
    /// Undelivered records deleted by the spool's drop-oldest policy.
    pub dropped: AtomicU64,
    /// Undelivered bytes in the spool.
    pub spool_bytes: AtomicU64,
    /// Receive-to-acknowledged time of the oldest message of the last batch written, ms.
    pub lag_ms: AtomicI64,
    /// What the output is doing, for people.
    pub output: Mutex<String>,
}

/// A copy of the counters, as published on `<name>/stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// See [`Stats::received`].
    pub received: u64,
    /// See [`Stats::malformed`].
    pub malformed: u64,
    /// See [`Stats::unmatched`].
    pub unmatched: u64,
    /// See [`Stats::written`].
    pub written: u64,
    /// See [`Stats::rejected`].
    pub rejected: u64,
    /// See [`Stats::retried`].
    pub retried: u64,
    /// See [`Stats::dropped`].
    pub dropped: u64,
    /// See [`Stats::spool_bytes`].
    pub spool_bytes: u64,
    /// See [`Stats::lag_ms`].
    pub lag_ms: i64,
    /// See [`Stats::output`].
    pub output: String,
}

impl Stats {
    /// Sets the output state.
    pub fn set_output(&self, state: &str) {
        if let Ok(mut s) = self.output.lock() {
            if *s != state {
                state.clone_into(&mut s);
            }
        }
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> Snapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            received: g(&self.received),
            malformed: g(&self.malformed),
            unmatched: g(&self.unmatched),
            written: g(&self.written),
            rejected: g(&self.rejected),
            retried: g(&self.retried),
            dropped: g(&self.dropped),
            spool_bytes: g(&self.spool_bytes),
            lag_ms: self.lag_ms.load(Ordering::Relaxed),
            output: self.output.lock().map(|s| s.clone()).unwrap_or_default(),
        }
    }
}

impl Snapshot {
    /// The `telemetry_stats` point.
    pub fn point(&self, name: &str, timestamp_ns: i64) -> Point {
        let u = |v: u64| FieldValue::Int(i64::try_from(v).unwrap_or(i64::MAX));
        Point {
            measurement: "telemetry_stats".into(),
            tags: vec![("service".into(), name.into())],
            fields: vec![
                ("received".into(), u(self.received)),
                ("malformed".into(), u(self.malformed)),
                ("unmatched".into(), u(self.unmatched)),
                ("written".into(), u(self.written)),
                ("rejected".into(), u(self.rejected)),
                ("retried".into(), u(self.retried)),
                ("dropped".into(), u(self.dropped)),
                ("spool_bytes".into(), u(self.spool_bytes)),
                ("lag_ms".into(), FieldValue::Int(self.lag_ms)),
                ("output".into(), FieldValue::Str(self.output.clone())),
            ],
            timestamp_ns,
        }
    }
}
