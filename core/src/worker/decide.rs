//! What happens to a delivery, decided once from what is known about it: its framework headers,
//! its not-before, and the handler's [`Outcome`]. Pure functions of their inputs ("now"
//! included), so that every rule is tested with exact figures.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::warn;

use crate::clock::{to_chrono, until};
use crate::message::Message;
use crate::outcome::{Outcome, RetryAfter};
use crate::retry::{FailedAttempt, RetryPolicy};
use crate::telemetry::DelaySource;

/// The longest delay the worker ever schedules, whatever the policy, a `Retry-After` or the
/// transport allow: 100 years. A not-before that far ahead is still a time every wire can carry
/// (a `Retry-After` of 2^64 seconds, from a misbehaving server, would not be).
const LONGEST_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// How a delivery ends up, decided before settling.
#[derive(Debug, PartialEq)]
pub(super) enum Disposition {
    Complete,
    Discard(String),
    DeadLetter {
        reason: String,
        description: Option<String>,
    },
    Retry {
        not_before: DateTime<Utc>,
        reason: String,
        delay: Duration,
        /// Whether the delay is the policy's or the handler's `Retry-After`.
        source: DelaySource,
    },
    /// Early: back to the transport, to be delivered at the not-before.
    Park(DateTime<Utc>),
    /// Early by less than the transport's precision: wait aside until the not-before.
    Wait(DateTime<Utc>),
    Abandon,
}

impl Disposition {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Disposition::Complete => "completed",
            Disposition::Discard(_) => "discarded",
            Disposition::DeadLetter { .. } => "dead-lettered",
            Disposition::Retry { .. } => "retried",
            Disposition::Park(_) => "parked",
            Disposition::Wait(_) => "waiting",
            Disposition::Abandon => "abandoned",
        }
    }
}

/// The rules of one worker.
#[derive(Debug)]
pub(super) struct Rules {
    pub(super) policy: Arc<dyn RetryPolicy>,
    /// How early the transport may deliver (see `Capabilities::scheduling_precision`).
    pub(super) precision: Duration,
    /// The longest delay the transport can hold.
    pub(super) max_delay: Option<Duration>,
    /// Whether the worker consumes dead letters, which have nowhere further to go.
    pub(super) dead_letters: bool,
}

impl Rules {
    /// What the not-before demands at `now`: `None` when the handler may be called.
    pub(super) fn before_handling(
        &self,
        not_before: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Option<Disposition> {
        let not_before = not_before?;
        let early_by = until(now, not_before);
        if early_by > self.precision {
            Some(Disposition::Park(not_before))
        } else if !early_by.is_zero() {
            // Early by less than the transport can schedule: wait, but not in a handler slot.
            Some(Disposition::Wait(not_before))
        } else {
            None
        }
    }

    /// What the handler's `outcome` for `message` means at `now`.
    pub(super) fn after_handling(
        &self,
        message: &Message,
        outcome: Outcome,
        now: DateTime<Utc>,
    ) -> Disposition {
        match outcome {
            Outcome::Success => Disposition::Complete,
            Outcome::Discard { reason } => Disposition::Discard(reason),
            Outcome::DeadLetter {
                reason,
                description,
            } => Disposition::DeadLetter {
                reason,
                description,
            },
            Outcome::Retry {
                reason,
                retry_after,
            } => self.retry_or_give_up(message, reason, retry_after, now),
        }
    }

    fn retry_or_give_up(
        &self,
        message: &Message,
        reason: String,
        retry_after: Option<RetryAfter>,
        now: DateTime<Utc>,
    ) -> Disposition {
        let attempt = message.attempt();
        let max_attempts = self.policy.max_attempts();
        if attempt >= max_attempts && !self.dead_letters {
            return Disposition::DeadLetter {
                description: Some(format!(
                    "gave up after attempt {attempt} of {max_attempts}; last failure: {reason}"
                )),
                reason,
            };
        }
        let floor = retry_after.map(|r| r.delay_from(now));
        let failed = FailedAttempt::new(attempt)
            .with_previous_delay(message.last_delay())
            .with_retry_after(floor);
        let backoff = self.policy.delay(&failed);
        let (mut delay, source) = match floor {
            Some(floor) if floor > backoff => (floor, DelaySource::RetryAfter),
            _ => (backoff, DelaySource::Backoff),
        };
        let max = self
            .max_delay
            .map_or(LONGEST_DELAY, |max| max.min(LONGEST_DELAY));
        if delay > max {
            warn!(
                ?delay,
                ?max,
                "the retry delay exceeds the longest delay the transport can hold; using the longest"
            );
            delay = max;
        }
        Disposition::Retry {
            not_before: now + to_chrono(delay),
            reason,
            delay,
            source,
        }
    }

    /// On a dead-letter source there is nowhere further to dead-letter to: a message that would
    /// be dead-lettered (handler's outcome, invalid payload, malformed headers) stays among the
    /// dead letters and is tried again after the policy's delay, without an attempt limit.
    pub(super) fn keep_dead_letters(
        &self,
        message: &Message,
        disposition: Disposition,
        now: DateTime<Utc>,
    ) -> Disposition {
        match disposition {
            Disposition::DeadLetter { reason, .. } if self.dead_letters => {
                warn!(
                    reason,
                    "a dead letter could not be handled; it stays a dead letter and is tried again later"
                );
                self.retry_or_give_up(message, reason, None, now)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::FrameworkState;
    use crate::retry::{Backoff, BackoffPolicy, Jitter};

    const S: Duration = Duration::from_secs(1);

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn rules(max_attempts: u32, precision: Duration, dead_letters: bool) -> Rules {
        let policy = BackoffPolicy::builder()
            .max_attempts(max_attempts)
            .backoff(Backoff::exponential(2 * S, 60 * S))
            .jitter(Jitter::None)
            .build()
            .unwrap();
        Rules {
            policy: Arc::new(policy),
            precision,
            max_delay: Some(100 * S),
            dead_letters,
        }
    }

    fn retry(reason: &str, retry_after: Option<RetryAfter>) -> Outcome {
        Outcome::Retry {
            reason: reason.into(),
            retry_after,
        }
    }

    #[test]
    fn early_deliveries_are_parked_or_waited_for_by_the_precision() {
        let r = rules(3, S, false);
        let at = |ms: i64| Some(now() + chrono::TimeDelta::milliseconds(ms));
        assert_eq!(r.before_handling(None, now()), None);
        assert_eq!(r.before_handling(at(0), now()), None, "due now");
        assert_eq!(r.before_handling(at(-5), now()), None, "late");
        assert_eq!(
            r.before_handling(at(400), now()),
            Some(Disposition::Wait(at(400).unwrap()))
        );
        assert_eq!(
            r.before_handling(at(1000), now()),
            Some(Disposition::Wait(at(1000).unwrap())),
            "early by exactly the precision"
        );
        assert_eq!(
            r.before_handling(at(1001), now()),
            Some(Disposition::Park(at(1001).unwrap()))
        );
        let exact = rules(3, Duration::ZERO, false);
        assert_eq!(
            exact.before_handling(at(1), now()),
            Some(Disposition::Park(at(1).unwrap())),
            "a transport that is never early never makes the worker wait"
        );
    }

    #[test]
    fn retries_follow_the_policy_until_the_last_attempt() {
        let r = rules(3, S, false);
        let first = Message::new("x");
        assert_eq!(
            r.after_handling(&first, retry("timeout", None), now()),
            Disposition::Retry {
                not_before: now() + chrono::TimeDelta::seconds(2),
                reason: "timeout".into(),
                delay: 2 * S,
                source: DelaySource::Backoff,
            }
        );
        let second = first.clone().with_attempt(2);
        assert_eq!(
            r.after_handling(&second, retry("timeout", None), now()),
            Disposition::Retry {
                not_before: now() + chrono::TimeDelta::seconds(4),
                reason: "timeout".into(),
                delay: 4 * S,
                source: DelaySource::Backoff,
            }
        );
        let last = first.with_attempt(3);
        assert_eq!(
            r.after_handling(&last, retry("timeout", None), now()),
            Disposition::DeadLetter {
                reason: "timeout".into(),
                description: Some("gave up after attempt 3 of 3; last failure: timeout".into()),
            }
        );
    }

    #[test]
    fn a_retry_after_is_a_floor_and_the_longest_delay_a_ceiling() {
        let r = rules(5, S, false);
        let m = Message::new("x");
        let after = |d: Duration| retry("429", Some(RetryAfter::Delay(d)));
        let Disposition::Retry { delay, source, .. } = r.after_handling(&m, after(30 * S), now())
        else {
            panic!()
        };
        assert_eq!(delay, 30 * S, "the floor wins over the policy's 2 s");
        assert_eq!(source, DelaySource::RetryAfter);
        let Disposition::Retry { delay, source, .. } = r.after_handling(&m, after(S), now()) else {
            panic!()
        };
        assert_eq!(delay, 2 * S, "the policy wins over a shorter Retry-After");
        assert_eq!(source, DelaySource::Backoff);
        let Disposition::Retry { delay, .. } = r.after_handling(&m, after(500 * S), now()) else {
            panic!()
        };
        assert_eq!(delay, 100 * S, "capped at the transport's longest delay");
    }

    #[test]
    fn a_retry_after_too_long_for_any_clock_is_capped_at_the_longest_delay() {
        let uncapped = Rules {
            max_delay: None,
            ..rules(5, S, false)
        };
        for value in ["18446744073709551615", "9999999999999"] {
            let outcome = crate::http::outcome_for_status(429, Some(value));
            let Disposition::Retry {
                delay, not_before, ..
            } = uncapped.after_handling(&Message::new("x"), outcome, now())
            else {
                panic!("a retry")
            };
            assert_eq!(delay, LONGEST_DELAY, "Retry-After: {value}");
            assert_eq!(not_before, now() + to_chrono(LONGEST_DELAY));
        }
    }

    #[test]
    fn outcomes_map_to_dispositions() {
        let r = rules(3, S, false);
        let m = Message::new("x");
        assert_eq!(
            r.after_handling(&m, Outcome::success(), now()),
            Disposition::Complete
        );
        assert_eq!(
            r.after_handling(&m, Outcome::discard("gone"), now()),
            Disposition::Discard("gone".into())
        );
        assert_eq!(
            r.after_handling(&m, Outcome::dead_letter_with("auth", "HTTP 401"), now()),
            Disposition::DeadLetter {
                reason: "auth".into(),
                description: Some("HTTP 401".into()),
            }
        );
    }

    #[test]
    fn dead_letters_stay_dead_letters_and_are_tried_again_without_a_limit() {
        let r = rules(3, S, true);
        let m = Message::new("x").with_attempt(40);
        let dead = Disposition::DeadLetter {
            reason: "still failing".into(),
            description: None,
        };
        assert_eq!(
            r.keep_dead_letters(&m, dead, now()),
            Disposition::Retry {
                not_before: now() + chrono::TimeDelta::seconds(60),
                reason: "still failing".into(),
                delay: 60 * S,
                source: DelaySource::Backoff,
            }
        );
        assert_eq!(
            r.after_handling(&m, retry("again", None), now()),
            Disposition::Retry {
                not_before: now() + chrono::TimeDelta::seconds(60),
                reason: "again".into(),
                delay: 60 * S,
                source: DelaySource::Backoff,
            },
            "no attempt limit among dead letters"
        );
        let endpoint = rules(3, S, false);
        let dead = Disposition::DeadLetter {
            reason: "x".into(),
            description: None,
        };
        assert!(matches!(
            endpoint.keep_dead_letters(&m, dead, now()),
            Disposition::DeadLetter { .. }
        ));
    }
}
