//! What the line to the unit carries next. No I/O here.
//!
//! The unit takes one command every 250 ms, so the line is a scarce resource handed
//! out one slot at a time: a waiting command first (never after a whole poll cycle),
//! then a STATUS that a command or a failed query asked for, then the next query of
//! the poll cycle. A cycle starts every `interval` counted from the start of the
//! previous one; an interval shorter than a cycle means the unit is polled
//! continuously, with commands still taking the next free slot.

use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::Query;
use crate::readings::CYCLE;

/// The next use of the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Carry out the oldest waiting command.
    Command,
    /// Open the line (it is closed and its backoff has passed).
    Open,
    /// Ask this.
    Query(Query),
    /// Nothing to do before this instant (unless a command comes).
    Idle(Instant),
}

/// The poll cycle and what is owed to it.
#[derive(Debug, Clone)]
pub struct Schedule {
    interval: Duration,
    /// Index in [`CYCLE`] of the next query of the cycle in progress.
    pos: Option<usize>,
    /// When the next cycle may start.
    next_start: Instant,
    /// A STATUS is owed before the cycle goes on; `publish` says whether its result
    /// is to be published at once (after a command) or only feeds the cycle (a probe
    /// after a failed query).
    status: Option<bool>,
}

impl Schedule {
    /// A schedule whose first cycle is due at `now`.
    pub fn new(interval: Duration, now: Instant) -> Schedule {
        Schedule {
            interval,
            pos: None,
            next_start: now,
            status: None,
        }
    }

    /// The next use of the line, given whether a command waits and whether the line
    /// is open (and if not, from when it may be reopened).
    pub fn next(&self, now: Instant, command_waiting: bool, reopen_at: Option<Instant>) -> Slot {
        if command_waiting {
            return Slot::Command;
        }
        if let Some(at) = reopen_at {
            return if now >= at {
                Slot::Open
            } else {
                Slot::Idle(at)
            };
        }
        if self.status.is_some() {
            return Slot::Query(Query::Status);
        }
        match self.pos {
            Some(i) => Slot::Query(CYCLE[i]),
            None if now >= self.next_start => Slot::Query(CYCLE[0]),
            None => Slot::Idle(self.next_start),
        }
    }

    /// Asks for a STATUS in the next free slot; `publish` when the status is to go out
    /// right after it.
    pub fn want_status(&mut self, publish: bool) {
        self.status = Some(self.status.unwrap_or(false) || publish);
    }

    /// Whether a STATUS is owed (to a command, or as a probe after a failed query).
    pub fn status_owed(&self) -> bool {
        self.status.is_some()
    }

    /// Whether a STATUS is owed whose result is to be published.
    pub fn publish_owed(&self) -> bool {
        self.status == Some(true)
    }

    /// `q`, chosen by [`Schedule::next`] and sent at `started`, has been carried out.
    /// Returns whether it is time to publish: a cycle ended, or a STATUS wanted with
    /// `publish` was read.
    pub fn done(&mut self, q: Query, started: Instant) -> bool {
        if q == Query::Status {
            if let Some(publish) = self.status.take() {
                // Owed just as a cycle was due to start with STATUS: it counts for both.
                if self.pos.is_none() && started >= self.next_start {
                    self.next_start = started + self.interval;
                    self.pos = Some(1);
                }
                return publish;
            }
        }
        let i = match self.pos {
            Some(i) => i,
            None => {
                self.next_start = started + self.interval;
                0
            }
        };
        if CYCLE.get(i) != Some(&q) {
            // Not the query the cycle was at (cannot happen when `q` came from
            // `next`): leave the cycle where it is.
            return false;
        }
        if i + 1 == CYCLE.len() {
            self.pos = None;
            true
        } else {
            self.pos = Some(i + 1);
            false
        }
    }

    /// A whole cycle was read outside the schedule (a `refresh`), starting at
    /// `started`: the next one is an interval later, nothing is owed.
    pub fn completed(&mut self, started: Instant) {
        self.pos = None;
        self.status = None;
        self.next_start = started + self.interval;
    }

    /// The line was (re)opened: a new cycle starts at once, nothing is owed.
    pub fn restart(&mut self, now: Instant) {
        self.pos = None;
        self.status = None;
        self.next_start = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Runs the schedule over `n` slots with no command, each query taking `each`;
    /// returns the queries asked and the publish points.
    fn run(s: &mut Schedule, t: &mut Instant, n: usize, each: Duration) -> Vec<(Query, bool)> {
        let mut out = Vec::new();
        while out.len() < n {
            match s.next(*t, false, None) {
                Slot::Query(q) => {
                    let p = s.done(q, *t);
                    out.push((q, p));
                    *t += each;
                }
                Slot::Idle(until) => *t = until,
                other => panic!("{other:?}"),
            }
        }
        out
    }

    #[test]
    fn a_cycle_asks_every_query_once_then_publishes_then_waits() {
        let t0 = Instant::now();
        let mut t = t0;
        let mut s = Schedule::new(5 * S, t0);
        let got = run(&mut s, &mut t, 9, Duration::from_millis(260));
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), CYCLE.to_vec());
        assert_eq!(got.iter().filter(|g| g.1).count(), 1);
        assert!(got[8].1, "published at the end of the cycle");
        // The next cycle starts 5 s after the start of this one.
        assert_eq!(s.next(t, false, None), Slot::Idle(t0 + 5 * S));
    }

    #[test]
    fn an_interval_shorter_than_a_cycle_polls_continuously() {
        let t0 = Instant::now();
        let mut t = t0;
        let mut s = Schedule::new(Duration::from_millis(500), t0);
        let got = run(&mut s, &mut t, 18, Duration::from_millis(260));
        assert_eq!(got[9].0, Query::Status);
        assert_eq!(got.iter().filter(|g| g.1).count(), 2);
    }

    #[test]
    fn a_command_takes_the_next_slot_in_the_middle_of_a_cycle() {
        let t0 = Instant::now();
        let mut t = t0;
        let mut s = Schedule::new(5 * S, t0);
        run(&mut s, &mut t, 4, Duration::from_millis(260));
        assert_eq!(s.next(t, true, None), Slot::Command);
        // Even with the line closed: the command gets its refusal at once.
        assert_eq!(s.next(t, true, Some(t + S)), Slot::Command);
        // After the command its STATUS, published, then the cycle goes on where it was.
        s.want_status(true);
        assert_eq!(s.next(t, false, None), Slot::Query(Query::Status));
        assert!(s.done(Query::Status, t));
        assert_eq!(s.next(t, false, None), Slot::Query(CYCLE[4]));
    }

    #[test]
    fn a_probe_status_is_not_published_and_serves_a_cycle_about_to_start() {
        let t0 = Instant::now();
        let mut s = Schedule::new(5 * S, t0);
        s.want_status(false);
        assert_eq!(s.next(t0, false, None), Slot::Query(Query::Status));
        assert!(!s.done(Query::Status, t0));
        // The cycle was due to start with STATUS: that one counted, it goes on.
        assert_eq!(s.next(t0, false, None), Slot::Query(CYCLE[1]));
        // Owed while the next cycle is not due yet: the cycle still starts with STATUS.
        let mut s = Schedule::new(5 * S, t0 + S);
        s.want_status(false);
        assert!(!s.done(Query::Status, t0));
        assert_eq!(s.next(t0 + S, false, None), Slot::Query(Query::Status));
        // A probe and a publish asked together: published.
        s.want_status(false);
        s.want_status(true);
        assert!(s.done(Query::Status, t0));
    }

    #[test]
    fn a_closed_line_waits_for_its_backoff_and_a_reopen_starts_a_cycle() {
        let t0 = Instant::now();
        let mut s = Schedule::new(5 * S, t0);
        assert_eq!(s.next(t0, false, Some(t0 + S)), Slot::Idle(t0 + S));
        assert_eq!(s.next(t0 + S, false, Some(t0 + S)), Slot::Open);
        s.want_status(true);
        s.restart(t0 + S);
        assert_eq!(s.next(t0 + S, false, None), Slot::Query(Query::Status));
        assert!(!s.done(Query::Status, t0 + S), "a cycle's first query");
    }

    #[test]
    fn a_refresh_moves_the_next_cycle() {
        let t0 = Instant::now();
        let mut s = Schedule::new(5 * S, t0);
        s.want_status(false);
        s.completed(t0 + S);
        assert_eq!(s.next(t0 + S, false, None), Slot::Idle(t0 + 6 * S));
    }
}
