//! [`Outcome`]: what a handler decided, and [`RetryAfter`], a server's request to wait.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// A server's request to wait before trying again (HTTP `Retry-After`).
///
/// The worker waits at least this long before the retry (the policy's delay if that is longer),
/// but never longer than the transport can hold a message, nor longer than 100 years: a
/// misbehaving server's `Retry-After` of 2^64 seconds is a retry in 100 years, not a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAfter {
    /// Not before this instant.
    At(DateTime<Utc>),
    /// Not before this long after the failure.
    Delay(Duration),
}

impl RetryAfter {
    /// Parses an HTTP `Retry-After` value: whole seconds (`120`) or an HTTP date
    /// (`Wed, 21 Oct 2026 07:28:00 GMT`, and the two obsolete HTTP date forms). Anything else is
    /// `None`.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(RetryAfter::Delay(Duration::from_secs(seconds)));
        }
        httpdate::parse_http_date(value)
            .ok()
            .map(|t| RetryAfter::At(DateTime::<Utc>::from(t)))
    }

    /// The delay from `now`, zero for a date in the past.
    pub fn delay_from(&self, now: DateTime<Utc>) -> Duration {
        match *self {
            RetryAfter::Delay(d) => d,
            RetryAfter::At(at) => crate::clock::until(now, at),
        }
    }
}

/// What a handler decided.
///
/// # Examples
///
/// A handler maps what happened to an outcome; the worker carries it out (completes, schedules
/// the retry after the policy's delay, or dead-letters) and counts the attempts.
///
/// ```
/// # use redeliver_core as redeliver;
/// use std::time::Duration;
/// use redeliver::{Outcome, RetryAfter};
///
/// enum Charge {
///     Done,
///     Busy { retry_in: Duration },
///     CardDeclined,
///     AlreadyRefunded,
/// }
///
/// fn outcome(charge: Charge) -> Outcome {
///     match charge {
///         Charge::Done => Outcome::success(),
///         // Tried again later, not before the payment service asked.
///         Charge::Busy { retry_in } => {
///             Outcome::retry_after("payment service busy", RetryAfter::Delay(retry_in))
///         }
///         // Another try would fail the same way: to the dead letters, with a reason.
///         Charge::CardDeclined => Outcome::dead_letter_with("card declined", "issuer said no"),
///         // Nothing to do any more: completed and logged, not dead-lettered.
///         Charge::AlreadyRefunded => Outcome::discard("order already refunded"),
///     }
/// }
///
/// assert_eq!(outcome(Charge::Done), Outcome::Success);
/// assert_eq!(outcome(Charge::Busy { retry_in: Duration::from_secs(30) }).kind(), "retry");
/// assert_eq!(outcome(Charge::CardDeclined).kind(), "dead-letter");
/// assert_eq!(outcome(Charge::AlreadyRefunded).kind(), "discard");
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// Handled: the message is completed.
    Success,
    /// Failed for now: try again after the retry policy's delay (and not before `retry_after`),
    /// or dead-letter with this reason once the policy's attempts are used up.
    Retry {
        /// Why, short and stable (it becomes the dead-letter reason if attempts run out).
        reason: String,
        /// A server's request to wait at least this long; a floor under the policy's delay.
        retry_after: Option<RetryAfter>,
    },
    /// Failed for good: dead-letter now, without further attempts.
    DeadLetter {
        /// Why, short and stable.
        reason: String,
        /// Details for a person.
        description: Option<String>,
    },
    /// Dropped on purpose (for example, a message about an entity that no longer exists): the
    /// message is completed and the reason logged.
    Discard {
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// [`Outcome::Success`].
    pub fn success() -> Self {
        Outcome::Success
    }

    /// [`Outcome::Retry`] without a Retry-After.
    pub fn retry(reason: impl Into<String>) -> Self {
        Outcome::Retry {
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// [`Outcome::Retry`] with a server's Retry-After.
    pub fn retry_after(reason: impl Into<String>, retry_after: RetryAfter) -> Self {
        Outcome::Retry {
            reason: reason.into(),
            retry_after: Some(retry_after),
        }
    }

    /// [`Outcome::DeadLetter`] without a description.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Outcome::DeadLetter {
            reason: reason.into(),
            description: None,
        }
    }

    /// [`Outcome::DeadLetter`] with a description.
    pub fn dead_letter_with(reason: impl Into<String>, description: impl Into<String>) -> Self {
        Outcome::DeadLetter {
            reason: reason.into(),
            description: Some(description.into()),
        }
    }

    /// [`Outcome::Discard`].
    pub fn discard(reason: impl Into<String>) -> Self {
        Outcome::Discard {
            reason: reason.into(),
        }
    }

    /// A short name for logs and spans: `success`, `retry`, `dead-letter` or `discard`.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Retry { .. } => "retry",
            Outcome::DeadLetter { .. } => "dead-letter",
            Outcome::Discard { .. } => "discard",
        }
    }
}

/// `Ok(())` is a success; an error is a retry whose reason is the error's message.
impl<E: std::fmt::Display> From<Result<(), E>> for Outcome {
    fn from(result: Result<(), E>) -> Self {
        match result {
            Ok(()) => Outcome::Success,
            Err(e) => Outcome::retry(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        assert_eq!(
            RetryAfter::parse(" 90 "),
            Some(RetryAfter::Delay(Duration::from_secs(90)))
        );
        let at = RetryAfter::parse("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let expected = DateTime::parse_from_rfc3339("1994-11-06T08:49:37Z").unwrap();
        assert_eq!(at, RetryAfter::At(expected.with_timezone(&Utc)));
        assert_eq!(
            RetryAfter::parse("Sunday, 06-Nov-94 08:49:37 GMT"),
            Some(at)
        );
        assert_eq!(RetryAfter::parse("soon"), None);
        assert_eq!(RetryAfter::parse("-5"), None);
    }

    #[test]
    fn retry_after_delay_from_now() {
        let now = Utc::now();
        let at = RetryAfter::At(now + chrono::TimeDelta::seconds(30));
        assert_eq!(at.delay_from(now), Duration::from_secs(30));
        assert_eq!(
            RetryAfter::At(now).delay_from(now + chrono::TimeDelta::seconds(1)),
            Duration::ZERO
        );
    }

    #[test]
    fn results_become_outcomes() {
        assert_eq!(Outcome::from(Ok::<(), String>(())), Outcome::Success);
        assert_eq!(
            Outcome::from(Err::<(), _>("timeout")),
            Outcome::retry("timeout")
        );
    }
}
