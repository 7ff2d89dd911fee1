//! UTC timestamps with nanosecond resolution.
//!
//! Every record the suite writes (InfluxDB points, MongoDB documents, alarms) carries a
//! [`UtcNanos`] taken by the service itself, so the two databases can be joined exactly.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcNanos(pub i64);

impl UtcNanos {
    /// The current instant from the system clock.
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        // i64 nanoseconds last until the year 2262.
        UtcNanos(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }

    /// Nanoseconds since the epoch.
    pub fn as_nanos(self) -> i64 {
        self.0
    }

    /// Milliseconds since the epoch (BSON dates, VictoriaMetrics).
    pub fn as_millis(self) -> i64 {
        self.0.div_euclid(1_000_000)
    }

    fn as_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_nanos(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(self.0.unsigned_abs())
        }
    }
}

impl fmt::Display for UtcNanos {
    /// RFC 3339 with nanoseconds: `2026-11-22T04:51:31.123456789Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            humantime::format_rfc3339_nanos(self.as_system_time())
        )
    }
}

/// A run id: the UTC start to the second and a random suffix, readable and sortable
/// (`20261122T101502Z-3f9a`); the suffix keeps two stations from colliding in one
/// central database.
pub fn run_id(start: UtcNanos) -> String {
    let t = start.to_string(); // 2026-11-22T10:15:02.123456789Z
    let compact: String = t
        .chars()
        .take(19)
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .collect();
    format!("{compact}Z-{:04x}", rand::random::<u16>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_nanos() {
        assert_eq!(UtcNanos(0).to_string(), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            UtcNanos(1_795_000_000_123_456_789).to_string(),
            "2026-11-18T11:06:40.123456789Z"
        );
        assert_eq!(UtcNanos(1_500_000_000).as_millis(), 1_500);
    }

    #[test]
    fn now_is_monotone_enough_and_recent() {
        let a = UtcNanos::now();
        let b = UtcNanos::now();
        assert!(b >= a);
        // After 2024-01-01: catches a clock read in the wrong unit.
        assert!(a.as_nanos() > 1_704_067_200_000_000_000);
    }
}
