//! A channel's rate limit: at most `max` messages in any `window`; what is held back
//! is counted and folded into one summary, sent as soon as the window has room. No I/O.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::Severity;
use crate::engine::{Kind, Notification};

/// One channel's limit and what it holds back.
#[derive(Debug)]
pub struct RateLimit {
    max: usize,
    window: Duration,
    sent: VecDeque<Instant>,
    folded: Vec<Notification>,
}

/// Subjects listed in a summary; the rest are only counted.
const LISTED: usize = 10;

impl RateLimit {
    /// `max` messages per `window`.
    pub fn new(max: u32, window: Duration) -> Self {
        RateLimit {
            max: max.max(1) as usize,
            window,
            sent: VecDeque::new(),
            folded: Vec::new(),
        }
    }

    fn room(&mut self, now: Instant) -> bool {
        while self
            .sent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.window)
        {
            self.sent.pop_front();
        }
        self.sent.len() < self.max
    }

    /// `n` goes out now (`Some`), or is folded (`None`). A summary already owed goes
    /// first: nothing is sent past folded messages.
    pub fn admit(&mut self, n: Notification, now: Instant) -> Vec<Notification> {
        let mut out = self.flush(now);
        // The watchdog is never held back behind a flood: it says the safety chain
        // itself is in doubt.
        if matches!(n.kind, Kind::Watchdog | Kind::Back) {
            out.push(n);
            return out;
        }
        if self.folded.is_empty() && self.room(now) {
            self.sent.push_back(now);
            out.push(n);
        } else {
            self.folded.push(n);
        }
        out
    }

    /// The summary of what was folded, once the window has room (one slot: a summary
    /// counts as one message).
    pub fn flush(&mut self, now: Instant) -> Vec<Notification> {
        if self.folded.is_empty() || !self.room(now) {
            return Vec::new();
        }
        self.sent.push_back(now);
        let folded = std::mem::take(&mut self.folded);
        if folded.len() == 1 {
            return folded;
        }
        let worst = folded
            .iter()
            .map(|n| n.severity)
            .max()
            .unwrap_or(Severity::Info);
        let first = &folded[0];
        let mut lines: Vec<String> = folded
            .iter()
            .take(LISTED)
            .map(|n| format!("{} {}", n.kind.as_str(), n.summary))
            .collect();
        if folded.len() > LISTED {
            lines.push(format!("... and {} more", folded.len() - LISTED));
        }
        vec![Notification {
            kind: Kind::Folded,
            severity: worst,
            station: first.station.clone(),
            subject_of: "notifications".into(),
            summary: format!("{} notifications folded by the rate limit", folded.len()),
            details: serde_json::json!({ "folded": folded.len(), "notifications": lines }),
            at_ns: folded.last().map_or(first.at_ns, |n| n.at_ns),
        }]
    }

    /// Everything held back, at once (shutdown: nothing is left in memory).
    pub fn drain(&mut self) -> Vec<Notification> {
        self.sent.clear();
        self.flush(Instant::now())
    }

    /// How many are held back now.
    pub fn held(&self) -> usize {
        self.folded.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: usize) -> Notification {
        Notification {
            kind: Kind::Raised,
            severity: if i == 7 {
                Severity::Critical
            } else {
                Severity::Warning
            },
            station: "s".into(),
            subject_of: format!("r{i}"),
            summary: format!("rule {i}"),
            details: serde_json::Value::Null,
            at_ns: i as i64,
        }
    }

    #[test]
    fn a_flood_becomes_a_few_messages_and_one_summary_with_the_count() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(5, Duration::from_secs(60));
        let mut sent = Vec::new();
        for i in 0..200 {
            sent.extend(r.admit(n(i), t0 + Duration::from_millis(i as u64 * 5)));
        }
        assert_eq!(sent.len(), 5);
        assert_eq!(r.held(), 195);
        assert!(r.flush(t0 + Duration::from_secs(59)).is_empty());
        let s = r.flush(t0 + Duration::from_secs(60));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].kind, Kind::Folded);
        assert_eq!(s[0].details["folded"], 195);
        assert_eq!(
            s[0].severity,
            Severity::Critical,
            "the worst of what was folded"
        );
        assert_eq!(
            s[0].details["notifications"].as_array().unwrap().len(),
            LISTED + 1
        );
        assert_eq!(r.held(), 0);
        // Order is kept: a new message waits behind a summary that is owed.
        let mut r = RateLimit::new(1, Duration::from_secs(10));
        assert_eq!(r.admit(n(1), t0).len(), 1);
        assert!(r.admit(n(2), t0).is_empty());
        let later = r.admit(n(3), t0 + Duration::from_secs(10));
        // The one held back goes first, as itself; the new one waits.
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].summary, "rule 2");
        assert_eq!(r.held(), 1);
        // The watchdog passes a full window; a drain empties what is held.
        let mut w = n(9);
        w.kind = Kind::Watchdog;
        assert_eq!(r.admit(w, t0 + Duration::from_secs(10)).len(), 1);
        assert_eq!(r.held(), 1);
        let mut r2 = RateLimit::new(1, Duration::from_secs(10));
        r2.admit(n(1), t0);
        r2.admit(n(2), t0);
        r2.admit(n(3), t0);
        assert_eq!(r2.drain()[0].details["folded"], 2);
        // One held back alone goes out as itself.
        assert_eq!(r.flush(t0 + Duration::from_secs(20))[0].summary, "rule 3");
    }
}
