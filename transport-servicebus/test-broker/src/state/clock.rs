//! The two clocks: the tokio clock that locks and schedules run on, and the wall clock of the
//! timestamps on the wire.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Milliseconds since the Unix epoch of the wall clock.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(super) fn ms_of(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The instant at which wall-clock time `at_ms` is reached.
pub(super) fn instant_of(at_ms: i64, now: Instant, now_ms: i64) -> Instant {
    let delta = at_ms.saturating_sub(now_ms);
    if delta <= 0 {
        now
    } else {
        now + Duration::from_millis(u64::try_from(delta).unwrap_or(u64::MAX))
    }
}
