//! Where "now" comes from.
//!
//! Not-before instants are UTC wall-clock times, because they travel between machines inside
//! messages. Brokers schedule against the system clock ([`Clock::system`]). The in-memory
//! transport uses [`Clock::tokio`], a UTC clock that advances with tokio's timer: under
//! `#[tokio::test(start_paused = true)]` (or `tokio::time::pause`) hours of back-off pass in
//! milliseconds, and the clock reads exactly the virtual time that the timers fire at.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// A source of UTC time that can also wait until a given instant. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Clock {
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    System,
    Tokio {
        origin_utc: DateTime<Utc>,
        origin: tokio::time::Instant,
    },
}

impl Clock {
    /// The machine's wall clock ([`Utc::now`]); timers run on tokio's clock and are re-checked
    /// against the wall clock, so a wait never ends early.
    pub fn system() -> Self {
        Clock { kind: Kind::System }
    }

    /// A UTC clock that follows tokio's clock from now on, starting at the current wall-clock
    /// time. When tokio's time is paused it is a virtual clock controlled by the test
    /// (`tokio::time::advance`, or auto-advance while every task waits on a timer).
    pub fn tokio() -> Self {
        Self::tokio_at(Utc::now())
    }

    /// Like [`Clock::tokio`], but reading `origin` now, which makes timelines printed by tests
    /// and examples reproducible.
    pub fn tokio_at(origin: DateTime<Utc>) -> Self {
        Clock {
            kind: Kind::Tokio {
                origin_utc: origin,
                origin: tokio::time::Instant::now(),
            },
        }
    }

    /// The current UTC time.
    pub fn now(&self) -> DateTime<Utc> {
        match &self.kind {
            Kind::System => Utc::now(),
            Kind::Tokio { origin_utc, origin } => *origin_utc + to_chrono(origin.elapsed()),
        }
    }

    /// Waits until [`now`](Clock::now) is at or after `at`. Never returns early.
    pub async fn sleep_until(&self, at: DateTime<Utc>) {
        loop {
            let remaining = until(self.now(), at);
            if remaining.is_zero() {
                return;
            }
            tokio::time::sleep(remaining).await;
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

/// The time from `now` until `at`, zero if `at` has passed.
pub fn until(now: DateTime<Utc>, at: DateTime<Utc>) -> Duration {
    (at - now).to_std().unwrap_or(Duration::ZERO)
}

/// Converts a [`std::time::Duration`] to a chrono duration, saturating at chrono's maximum.
pub fn to_chrono(duration: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(duration).unwrap_or(chrono::TimeDelta::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let origin = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let clock = Clock::tokio_at(origin);
        assert_eq!(clock.now(), origin);
        tokio::time::advance(Duration::from_secs(3 * 3600)).await;
        assert_eq!(clock.now(), origin + chrono::TimeDelta::hours(3));
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_until_wakes_exactly_at_the_instant() {
        let clock = Clock::tokio();
        let at = clock.now() + chrono::TimeDelta::milliseconds(90_500);
        clock.sleep_until(at).await;
        assert_eq!(clock.now(), at);
    }

    #[test]
    fn until_is_zero_for_the_past() {
        let now = Utc::now();
        assert_eq!(
            until(now, now - chrono::TimeDelta::seconds(1)),
            Duration::ZERO
        );
        assert_eq!(
            until(now, now + chrono::TimeDelta::seconds(2)),
            Duration::from_secs(2)
        );
    }
}
