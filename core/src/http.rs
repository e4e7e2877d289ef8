//! Turning an HTTP response into an [`Outcome`], for handlers that call web services (webhooks,
//! APIs).
//!
//! The classification follows what integration platforms do: rate limiting, time-outs and server
//! errors are retried (honouring `Retry-After`); authentication and configuration problems are
//! not, because another attempt would fail the same way.

use std::fmt;

use crate::outcome::{Outcome, RetryAfter};

/// Why an HTTP call failed, which decides whether it is retried. The category's
/// [`as_str`](FailureCategory::as_str) becomes the retry or dead-letter reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureCategory {
    /// 429 Too Many Requests. Retried.
    RateLimited,
    /// 408, 500, 502, 504 and other 5xx. Retried.
    Transient,
    /// 503 Service Unavailable. Retried.
    ServiceUnavailable,
    /// 401 and 403. Not retried.
    Authentication,
    /// 404, 410, other 4xx, redirects (3xx) and 501. Not retried.
    Configuration,
    /// Anything else that is not a success (1xx, codes outside 100–599). Not retried.
    Permanent,
}

impl FailureCategory {
    /// The category of `status`, or `None` for a success (2xx).
    pub fn from_status(status: u16) -> Option<Self> {
        Some(match status {
            200..=299 => return None,
            429 => FailureCategory::RateLimited,
            408 => FailureCategory::Transient,
            401 | 403 => FailureCategory::Authentication,
            300..=399 | 400..=499 | 501 => FailureCategory::Configuration,
            503 => FailureCategory::ServiceUnavailable,
            500..=599 => FailureCategory::Transient,
            _ => FailureCategory::Permanent,
        })
    }

    /// Whether a failure of this category is worth another attempt.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            FailureCategory::RateLimited
                | FailureCategory::Transient
                | FailureCategory::ServiceUnavailable
        )
    }

    /// A stable name: `rate-limited`, `transient`, `service-unavailable`, `authentication`,
    /// `configuration` or `permanent`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCategory::RateLimited => "rate-limited",
            FailureCategory::Transient => "transient",
            FailureCategory::ServiceUnavailable => "service-unavailable",
            FailureCategory::Authentication => "authentication",
            FailureCategory::Configuration => "configuration",
            FailureCategory::Permanent => "permanent",
        }
    }
}

impl fmt::Display for FailureCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of an HTTP call that answered `status`, with the response's `Retry-After` header
/// value if it had one.
///
/// 2xx is a success. A retryable category is a retry whose reason is the category, carrying the
/// `Retry-After` (whole seconds or an HTTP date; an unreadable value is ignored). Any other
/// category is a dead letter with the category as reason and `HTTP <status>` as description.
/// `Retry-After` is only read on retryable failures.
///
/// # Examples
///
/// ```
/// # use redeliver_core as redeliver;
/// use std::time::Duration;
/// use redeliver::{Outcome, RetryAfter, outcome_for_status};
///
/// assert_eq!(outcome_for_status(204, None), Outcome::Success);
/// // Rate-limited: retried, and not before the server's Retry-After.
/// assert_eq!(
///     outcome_for_status(429, Some("120")),
///     Outcome::retry_after("rate-limited", RetryAfter::Delay(Duration::from_secs(120))),
/// );
/// // A server error is retried with the policy's back-off alone.
/// assert_eq!(outcome_for_status(502, None), Outcome::retry("transient"));
/// // Not found: a configuration problem, dead-lettered at once (Retry-After ignored).
/// assert_eq!(
///     outcome_for_status(404, Some("5")),
///     Outcome::dead_letter_with("configuration", "HTTP 404"),
/// );
/// ```
pub fn outcome_for_status(status: u16, retry_after: Option<&str>) -> Outcome {
    let Some(category) = FailureCategory::from_status(status) else {
        return Outcome::Success;
    };
    if category.is_retryable() {
        Outcome::Retry {
            reason: category.as_str().to_owned(),
            retry_after: retry_after.and_then(RetryAfter::parse),
        }
    } else {
        Outcome::dead_letter_with(category.as_str(), format!("HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn statuses_are_classified() {
        use FailureCategory::*;
        let cases = [
            (429, Some(RateLimited)),
            (408, Some(Transient)),
            (500, Some(Transient)),
            (502, Some(Transient)),
            (504, Some(Transient)),
            (599, Some(Transient)),
            (503, Some(ServiceUnavailable)),
            (401, Some(Authentication)),
            (403, Some(Authentication)),
            (404, Some(Configuration)),
            (410, Some(Configuration)),
            (422, Some(Configuration)),
            (301, Some(Configuration)),
            (501, Some(Configuration)),
            (101, Some(Permanent)),
            (700, Some(Permanent)),
            (200, None),
            (204, None),
        ];
        for (status, expected) in cases {
            assert_eq!(
                FailureCategory::from_status(status),
                expected,
                "status {status}"
            );
        }
    }

    #[test]
    fn retryable_statuses_carry_retry_after() {
        assert_eq!(
            outcome_for_status(429, Some("90")),
            Outcome::retry_after("rate-limited", RetryAfter::Delay(Duration::from_secs(90)))
        );
        assert_eq!(
            outcome_for_status(500, Some("not a date")),
            Outcome::retry("transient")
        );
    }

    #[test]
    fn permanent_statuses_dead_letter_and_ignore_retry_after() {
        assert_eq!(
            outcome_for_status(401, Some("90")),
            Outcome::dead_letter_with("authentication", "HTTP 401")
        );
        assert_eq!(
            outcome_for_status(501, None),
            Outcome::dead_letter_with("configuration", "HTTP 501")
        );
        assert_eq!(outcome_for_status(201, None), Outcome::Success);
    }
}
