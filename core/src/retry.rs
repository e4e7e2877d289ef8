//! Retry policies: how many attempts, and how long to wait between them.
//!
//! A policy returns *how long* to wait, never sleeps: the worker turns the delay into a
//! not-before instant and the transport holds the message until then (a broker queue, a
//! scheduled message), so no worker task is tied up waiting.
//!
//! # What "max attempts" counts
//! [`RetryPolicy::max_attempts`] is the **total number of handler calls, including the first**.
//! With `max_attempts = 3` a message that always fails is handled three times (attempts 1, 2
//! and 3) and dead-lettered after the third failure, with that failure's reason. `1` means "never
//! retry".
//!
//! # Retry-After
//! When a handler returns a Retry-After (for example from an HTTP 429), it is a floor: the worker
//! never schedules the next attempt earlier than that, whatever the policy computes. The policy
//! also sees it in [`FailedAttempt::retry_after`], for designs that add their delay on top.

use std::fmt;
use std::time::Duration;

use crate::Error;

/// Decides how many attempts a message gets and how long to wait after each failure.
///
/// Implement it for a policy of your own; [`BackoffPolicy`] covers the usual ones.
pub trait RetryPolicy: Send + Sync + fmt::Debug + 'static {
    /// The total number of handler calls, including the first (at least 1). After a failure of
    /// attempt `max_attempts`, the message is dead-lettered.
    fn max_attempts(&self) -> u32;

    /// How long to wait after `failed` before the next attempt.
    fn delay(&self, failed: &FailedAttempt) -> Duration;
}

/// What a policy knows about the attempt that just failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailedAttempt {
    /// The attempt that failed: 1 for the first handler call.
    pub attempt: u32,
    /// The delay chosen after the previous failure of this message, if any.
    pub previous_delay: Option<Duration>,
    /// The server's Retry-After, as a delay from now, if the handler returned one.
    pub retry_after: Option<Duration>,
}

impl FailedAttempt {
    /// Attempt `attempt` failed, with no history and no Retry-After.
    pub fn new(attempt: u32) -> Self {
        FailedAttempt {
            attempt: attempt.max(1),
            previous_delay: None,
            retry_after: None,
        }
    }

    /// Sets [`previous_delay`](FailedAttempt::previous_delay).
    #[must_use]
    pub fn with_previous_delay(mut self, delay: Option<Duration>) -> Self {
        self.previous_delay = delay;
        self
    }

    /// Sets [`retry_after`](FailedAttempt::retry_after).
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }
}

/// How the delay grows from one attempt to the next (before jitter).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Backoff {
    /// The same delay every time.
    Fixed(Duration),
    /// `initial`, `initial + increment`, `initial + 2 × increment`, ...
    Linear {
        /// The first delay.
        initial: Duration,
        /// Added for each further attempt.
        increment: Duration,
    },
    /// `initial`, `initial × factor`, `initial × factor²`, ..., never more than `max`.
    Exponential {
        /// The first delay.
        initial: Duration,
        /// The growth factor (at least 1).
        factor: f64,
        /// The cap.
        max: Duration,
    },
    /// These delays in order; the last one repeats.
    List(Vec<Duration>),
    /// No delay at all: every retry is due at once. Asked for explicitly, because a back-off
    /// whose delays are all zero is otherwise refused: against a failing dependency it is a
    /// hot loop.
    Immediate,
}

impl Backoff {
    /// [`Backoff::Fixed`].
    pub fn fixed(delay: Duration) -> Self {
        Backoff::Fixed(delay)
    }

    /// [`Backoff::Linear`].
    pub fn linear(initial: Duration, increment: Duration) -> Self {
        Backoff::Linear { initial, increment }
    }

    /// [`Backoff::Exponential`] doubling from `initial` up to `max`.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Backoff::Exponential {
            initial,
            factor: 2.0,
            max,
        }
    }

    /// [`Backoff::Exponential`] with another factor.
    pub fn exponential_with_factor(initial: Duration, factor: f64, max: Duration) -> Self {
        Backoff::Exponential {
            initial,
            factor,
            max,
        }
    }

    /// [`Backoff::Immediate`]: retries without waiting, on purpose.
    pub fn immediate() -> Self {
        Backoff::Immediate
    }

    /// [`Backoff::List`].
    pub fn list(delays: impl IntoIterator<Item = Duration>) -> Self {
        Backoff::List(delays.into_iter().collect())
    }

    /// The delay after failed attempt `attempt` (1-based), before jitter and caps.
    pub fn delay(&self, attempt: u32) -> Duration {
        let n = attempt.max(1) - 1;
        match self {
            Backoff::Fixed(d) => *d,
            Backoff::Linear { initial, increment } => {
                initial.saturating_add(increment.saturating_mul(n))
            }
            Backoff::Exponential {
                initial,
                factor,
                max,
            } => {
                let secs = initial.as_secs_f64() * factor.powf(f64::from(n));
                if secs.is_finite() && secs < max.as_secs_f64() {
                    Duration::from_secs_f64(secs)
                } else {
                    *max
                }
            }
            Backoff::List(delays) => {
                let i = usize::try_from(n)
                    .unwrap_or(usize::MAX)
                    .min(delays.len().saturating_sub(1));
                delays.get(i).copied().unwrap_or_default()
            }
            Backoff::Immediate => Duration::ZERO,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        const IMMEDIATE: &str = "use Backoff::immediate() to retry without waiting on purpose";
        let all_zero = |field: &str| {
            Error::config(
                field,
                format!("must be longer than zero: every retry would run at once ({IMMEDIATE})"),
            )
        };
        match self {
            Backoff::Fixed(delay) if delay.is_zero() => return Err(all_zero("backoff.delay")),
            Backoff::Linear { initial, increment } if initial.is_zero() && increment.is_zero() => {
                return Err(all_zero("backoff.increment"));
            }
            Backoff::Exponential { initial, .. } if initial.is_zero() => {
                return Err(all_zero("backoff.initial"));
            }
            Backoff::List(delays) if !delays.is_empty() && delays.iter().all(Duration::is_zero) => {
                return Err(all_zero("backoff.delays"));
            }
            _ => {}
        }
        match self {
            Backoff::Exponential {
                initial,
                factor,
                max,
            } => {
                if !(factor.is_finite() && *factor >= 1.0) {
                    return Err(Error::config(
                        "backoff.factor",
                        format!("must be a finite number of at least 1.0, got {factor}"),
                    ));
                }
                if max < initial {
                    return Err(Error::config(
                        "backoff.max",
                        format!("must be at least backoff.initial ({initial:?}), got {max:?}"),
                    ));
                }
            }
            Backoff::List(delays) if delays.is_empty() => {
                return Err(Error::config(
                    "backoff.delays",
                    "must hold at least one delay",
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Randomness added to delays so that many failing messages do not retry in lock-step. In
/// configuration: `none`, `full`, `equal` or `decorrelated`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Jitter {
    /// Exactly the back-off's delay.
    #[default]
    None,
    /// Uniform between zero and the delay.
    Full,
    /// Half the delay plus uniform between zero and the other half.
    Equal,
    /// Uniform between the first delay and three times the previous delay, capped at the
    /// policy's `max_delay` (or, without one, at the back-off's delay for this attempt).
    Decorrelated,
}

impl Jitter {
    /// Applies the jitter to `delay` with `unit`, a number in `[0, 1]` (a random draw).
    /// `base` is the back-off's first delay and `previous` the previous delay, for
    /// [`Jitter::Decorrelated`]; `cap` bounds the result of that kind.
    pub(crate) fn apply(
        self,
        delay: Duration,
        base: Duration,
        previous: Option<Duration>,
        cap: Duration,
        unit: f64,
    ) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        match self {
            Jitter::None => delay,
            Jitter::Full => delay.mul_f64(unit),
            Jitter::Equal => delay / 2 + (delay / 2).mul_f64(unit),
            Jitter::Decorrelated => {
                let high = previous.unwrap_or(base).saturating_mul(3).max(base);
                let drawn = base + (high - base).mul_f64(unit);
                drawn.min(cap)
            }
        }
    }
}

/// The standard policy: a maximum number of attempts, a [`Backoff`], optional [`Jitter`] and
/// an optional cap on every delay. Built and validated by [`BackoffPolicy::builder`].
///
/// ```
/// use std::time::Duration;
/// use redeliver_core::{Backoff, BackoffPolicy, Jitter, RetryPolicy};
///
/// let policy = BackoffPolicy::builder()
///     .max_attempts(5)
///     .backoff(Backoff::exponential(Duration::from_secs(1), Duration::from_secs(300)))
///     .jitter(Jitter::Equal)
///     .build()?;
/// assert_eq!(policy.max_attempts(), 5);
/// # Ok::<(), redeliver_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BackoffPolicy {
    max_attempts: u32,
    backoff: Backoff,
    jitter: Jitter,
    max_delay: Option<Duration>,
}

impl BackoffPolicy {
    /// A builder, starting from the [default](BackoffPolicy::default) policy.
    pub fn builder() -> BackoffPolicyBuilder {
        BackoffPolicyBuilder {
            policy: BackoffPolicy::default(),
        }
    }

    /// The back-off.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The jitter.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The delay after failed attempt `attempt` before jitter, capped at `max_delay`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let d = self.backoff.delay(attempt);
        self.max_delay.map_or(d, |cap| d.min(cap))
    }

    /// The delay after `failed` with the jitter drawn as `unit` (in `[0, 1]`). [`delay`] is this
    /// with a random `unit`; tests use it to check the bounds exactly.
    ///
    /// [`delay`]: RetryPolicy::delay
    pub(crate) fn delay_with(&self, failed: &FailedAttempt, unit: f64) -> Duration {
        let delay = self.base_delay(failed.attempt);
        let cap = self.max_delay.unwrap_or(delay);
        self.jitter
            .apply(delay, self.base_delay(1), failed.previous_delay, cap, unit)
    }
}

/// Five attempts, exponential back-off from 1 s doubling up to 5 minutes, equal jitter.
impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            max_attempts: 5,
            backoff: Backoff::exponential(Duration::from_secs(1), Duration::from_secs(300)),
            jitter: Jitter::Equal,
            max_delay: None,
        }
    }
}

impl RetryPolicy for BackoffPolicy {
    fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    fn delay(&self, failed: &FailedAttempt) -> Duration {
        self.delay_with(failed, fastrand::f64())
    }
}

/// Builds a [`BackoffPolicy`]; [`build`](BackoffPolicyBuilder::build) validates it.
#[derive(Clone, Debug)]
#[must_use]
pub struct BackoffPolicyBuilder {
    policy: BackoffPolicy,
}

impl BackoffPolicyBuilder {
    /// Total handler calls including the first; at least 1. `1` never retries.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.policy.max_attempts = max_attempts;
        self
    }

    /// Retries without a limit on the number of attempts (for dead-letter handlers that must not
    /// give up).
    pub fn unlimited_attempts(mut self) -> Self {
        self.policy.max_attempts = u32::MAX;
        self
    }

    /// The back-off.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.policy.backoff = backoff;
        self
    }

    /// The jitter.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.policy.jitter = jitter;
        self
    }

    /// A cap on every delay, after back-off and before jitter.
    pub fn max_delay(mut self, max_delay: Duration) -> Self {
        self.policy.max_delay = Some(max_delay);
        self
    }

    /// The policy, or an [`Error::Config`] naming the first field that is out of range.
    pub fn build(self) -> Result<BackoffPolicy, Error> {
        let p = self.policy;
        if p.max_attempts == 0 {
            return Err(Error::config(
                "max_attempts",
                "must be at least 1 (it counts every handler call, the first included), got 0",
            ));
        }
        if p.max_delay == Some(Duration::ZERO) {
            return Err(Error::config(
                "max_delay",
                "must be longer than zero; leave it unset for no cap",
            ));
        }
        p.backoff.validate()?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn policy(backoff: Backoff, jitter: Jitter) -> BackoffPolicy {
        BackoffPolicy::builder()
            .backoff(backoff)
            .jitter(jitter)
            .build()
            .unwrap()
    }

    #[test]
    fn backoff_kinds_follow_their_formula() {
        let delays = |b: Backoff| (1..=5).map(|a| b.delay(a)).collect::<Vec<_>>();
        assert_eq!(delays(Backoff::fixed(2 * S)), [2 * S; 5]);
        assert_eq!(
            delays(Backoff::linear(S, 2 * S)),
            [S, 3 * S, 5 * S, 7 * S, 9 * S]
        );
        assert_eq!(
            delays(Backoff::exponential(S, 10 * S)),
            [S, 2 * S, 4 * S, 8 * S, 10 * S]
        );
        assert_eq!(
            delays(Backoff::exponential_with_factor(S, 3.0, 100 * S)),
            [S, 3 * S, 9 * S, 27 * S, 81 * S]
        );
        assert_eq!(
            delays(Backoff::list([S, 5 * S, 30 * S])),
            [S, 5 * S, 30 * S, 30 * S, 30 * S]
        );
    }

    #[test]
    fn immediate_retries_are_allowed_when_asked_for() {
        let p = policy(Backoff::immediate(), Jitter::None);
        assert_eq!(p.delay(&FailedAttempt::new(3)), Duration::ZERO);
        let message = BackoffPolicy::builder()
            .backoff(Backoff::exponential(Duration::ZERO, S))
            .build()
            .unwrap_err()
            .to_string();
        assert!(message.contains("Backoff::immediate()"), "{message}");
        // Delays that only start at zero are fine.
        assert!(
            BackoffPolicy::builder()
                .backoff(Backoff::linear(Duration::ZERO, S))
                .build()
                .is_ok()
        );
        assert!(
            BackoffPolicy::builder()
                .backoff(Backoff::list([Duration::ZERO, S]))
                .build()
                .is_ok()
        );
    }

    #[test]
    fn huge_attempt_numbers_saturate_instead_of_panicking() {
        assert_eq!(Backoff::exponential(S, 60 * S).delay(u32::MAX), 60 * S);
        assert!(Backoff::linear(S, S).delay(u32::MAX) > 1000 * S);
        assert_eq!(Backoff::list([S]).delay(u32::MAX), S);
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let failed = FailedAttempt::new(3);
        let none = policy(Backoff::fixed(8 * S), Jitter::None);
        assert_eq!(none.delay_with(&failed, 0.0), 8 * S);
        assert_eq!(none.delay_with(&failed, 1.0), 8 * S);

        let full = policy(Backoff::fixed(8 * S), Jitter::Full);
        assert_eq!(full.delay_with(&failed, 0.0), Duration::ZERO);
        assert_eq!(full.delay_with(&failed, 1.0), 8 * S);

        let equal = policy(Backoff::fixed(8 * S), Jitter::Equal);
        assert_eq!(equal.delay_with(&failed, 0.0), 4 * S);
        assert_eq!(equal.delay_with(&failed, 1.0), 8 * S);

        let decorrelated = BackoffPolicy::builder()
            .backoff(Backoff::exponential(S, 100 * S))
            .jitter(Jitter::Decorrelated)
            .max_delay(20 * S)
            .build()
            .unwrap();
        let after_5s = FailedAttempt::new(3).with_previous_delay(Some(5 * S));
        assert_eq!(decorrelated.delay_with(&after_5s, 0.0), S);
        assert_eq!(decorrelated.delay_with(&after_5s, 1.0), 15 * S);
        let after_10s = FailedAttempt::new(4).with_previous_delay(Some(10 * S));
        assert_eq!(decorrelated.delay_with(&after_10s, 1.0), 20 * S, "capped");
    }

    #[test]
    fn random_delays_stay_within_bounds() {
        let p = policy(Backoff::exponential(S, 60 * S), Jitter::Equal);
        for _ in 0..1000 {
            let d = p.delay(&FailedAttempt::new(4));
            assert!((4 * S..=8 * S).contains(&d), "{d:?}");
        }
    }

    #[test]
    fn max_delay_caps_every_kind() {
        let p = BackoffPolicy::builder()
            .backoff(Backoff::linear(S, 10 * S))
            .jitter(Jitter::None)
            .max_delay(15 * S)
            .build()
            .unwrap();
        assert_eq!(p.delay(&FailedAttempt::new(1)), S);
        assert_eq!(p.delay(&FailedAttempt::new(3)), 15 * S);
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let field = |b: BackoffPolicyBuilder| match b.build().unwrap_err() {
            Error::Config { field, .. } => field,
            other => panic!("unexpected {other}"),
        };
        assert_eq!(
            field(BackoffPolicy::builder().max_attempts(0)),
            "max_attempts"
        );
        assert_eq!(
            field(
                BackoffPolicy::builder().backoff(Backoff::exponential_with_factor(S, 0.5, 9 * S))
            ),
            "backoff.factor"
        );
        assert_eq!(
            field(
                BackoffPolicy::builder().backoff(Backoff::exponential_with_factor(
                    S,
                    f64::NAN,
                    9 * S
                ))
            ),
            "backoff.factor"
        );
        assert_eq!(
            field(BackoffPolicy::builder().backoff(Backoff::exponential(9 * S, S))),
            "backoff.max"
        );
        assert_eq!(
            field(BackoffPolicy::builder().backoff(Backoff::list([]))),
            "backoff.delays"
        );
        assert_eq!(
            field(BackoffPolicy::builder().max_delay(Duration::ZERO)),
            "max_delay"
        );
        let zero = Duration::ZERO;
        let backoff = |b: Backoff| field(BackoffPolicy::builder().backoff(b));
        assert_eq!(
            backoff(Backoff::exponential(zero, 9 * S)),
            "backoff.initial"
        );
        assert_eq!(backoff(Backoff::fixed(zero)), "backoff.delay");
        assert_eq!(backoff(Backoff::linear(zero, zero)), "backoff.increment");
        assert_eq!(backoff(Backoff::list([zero, zero])), "backoff.delays");
        let message = BackoffPolicy::builder()
            .max_attempts(0)
            .build()
            .unwrap_err()
            .to_string();
        assert!(message.contains("got 0"), "{message}");
    }
}
