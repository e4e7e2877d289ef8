//! The circuit breaker: closed, open for a cool-down, then half-open with one probe at a time.

use std::time::Duration;

use tokio::time::Instant;

use crate::Error;

/// When a consumer's circuit opens, and for how long. See the [module docs](super).
///
/// ```
/// use std::time::Duration;
/// use redeliver_core::host::resilience::{CircuitBreaker, FailureRate};
///
/// // Open after 5 transient failures in a row, or when half the calls of the last minute
/// // failed (once there were 20); try again after 30 s.
/// let breaker = CircuitBreaker::builder()
///     .consecutive_failures(5)
///     .failure_rate(FailureRate::new(0.5, 20, Duration::from_secs(60))?)
///     .cool_down(Duration::from_secs(30))
///     .build()?;
/// assert_eq!(breaker.consecutive_failures(), Some(5));
/// # Ok::<(), redeliver_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CircuitBreaker {
    consecutive_failures: Option<u32>,
    failure_rate: Option<FailureRate>,
    cool_down: Duration,
}

/// A failure rate that opens the circuit: at least `rate` of the calls over the last `window`
/// failed, and there were at least `min_calls` of them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailureRate {
    rate: f64,
    min_calls: u32,
    window: Duration,
}

impl FailureRate {
    /// A rate in `(0, 1]`, over at least `min_calls` (1 or more) in `window` (at least 10 ms).
    pub fn new(rate: f64, min_calls: u32, window: Duration) -> Result<Self, Error> {
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(Error::config(
                "rate",
                format!("must be a share of the calls above 0 and at most 1, got {rate}"),
            ));
        }
        if min_calls == 0 {
            return Err(Error::config("min_calls", "must be at least 1, got 0"));
        }
        if window < Duration::from_millis(10) {
            return Err(Error::config(
                "window",
                format!("must be at least 10ms, got {window:?}"),
            ));
        }
        Ok(FailureRate {
            rate,
            min_calls,
            window,
        })
    }

    /// The share of failed calls.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The fewest calls in the window for the rate to count.
    pub fn min_calls(&self) -> u32 {
        self.min_calls
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }
}

impl CircuitBreaker {
    /// A builder: without a trigger given, the circuit opens after 5 consecutive failures; the
    /// cool-down is 30 s.
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder {
            consecutive_failures: None,
            failure_rate: None,
            cool_down: Duration::from_secs(30),
        }
    }

    /// Transient failures in a row that open the circuit, if that triggers it.
    pub fn consecutive_failures(&self) -> Option<u32> {
        self.consecutive_failures
    }

    /// The failure rate that opens the circuit, if that triggers it.
    pub fn failure_rate(&self) -> Option<FailureRate> {
        self.failure_rate
    }

    /// How long the circuit stays open before a probe.
    pub fn cool_down(&self) -> Duration {
        self.cool_down
    }
}

/// Opens after 5 consecutive transient failures, for 30 s.
impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            consecutive_failures: Some(DEFAULT_CONSECUTIVE_FAILURES),
            failure_rate: None,
            cool_down: Duration::from_secs(30),
        }
    }
}

const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;

/// Builds a [`CircuitBreaker`], checking it in [`build`](CircuitBreakerBuilder::build).
#[must_use]
#[derive(Clone, Debug)]
pub struct CircuitBreakerBuilder {
    consecutive_failures: Option<u32>,
    failure_rate: Option<FailureRate>,
    cool_down: Duration,
}

impl CircuitBreakerBuilder {
    /// Open after this many transient failures in a row (1 or more).
    pub fn consecutive_failures(mut self, failures: u32) -> Self {
        self.consecutive_failures = Some(failures);
        self
    }

    /// Open when this share of recent calls failed. Given alone, only the rate opens the
    /// circuit.
    pub fn failure_rate(mut self, rate: FailureRate) -> Self {
        self.failure_rate = Some(rate);
        self
    }

    /// How long the circuit stays open before one probe is let through (more than zero).
    pub fn cool_down(mut self, cool_down: Duration) -> Self {
        self.cool_down = cool_down;
        self
    }

    /// The breaker, or an [`Error::Config`] naming the field out of range.
    pub fn build(self) -> Result<CircuitBreaker, Error> {
        if self.consecutive_failures == Some(0) {
            return Err(Error::config(
                "consecutive_failures",
                "must be at least 1, got 0",
            ));
        }
        if self.cool_down.is_zero() {
            return Err(Error::config(
                "cool_down",
                "must be longer than zero (the circuit would never stay open)",
            ));
        }
        let consecutive_failures = match (self.consecutive_failures, self.failure_rate) {
            (None, None) => Some(DEFAULT_CONSECUTIVE_FAILURES),
            (given, _) => given,
        };
        Ok(CircuitBreaker {
            consecutive_failures,
            failure_rate: self.failure_rate,
            cool_down: self.cool_down,
        })
    }
}

/// What a handler call told the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CallResult {
    Success,
    /// A transient failure: the call should work later.
    Failure,
    /// Says nothing about the downstream (a dead letter, a discard, a throttle that pauses).
    Neutral,
}

/// Where the circuit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Circuit {
    Closed,
    Open {
        until: Instant,
    },
    /// `probing` while the one probe call is under way.
    HalfOpen {
        probing: bool,
    },
}

/// A change of the circuit, to log and count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Change {
    Opened {
        why: Why,
        until: Instant,
    },
    HalfOpen,
    Closed,
    /// The probe failed.
    Reopened {
        until: Instant,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Why {
    Consecutive(u32),
    /// Failed calls of all calls in the window.
    Rate {
        failed: u64,
        calls: u64,
    },
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    calls: u64,
    failed: u64,
}

const SLOTS: usize = 10;

/// Calls and failures over a window, in tenths.
#[derive(Debug)]
struct Calls {
    slots: [Slot; SLOTS],
    current: usize,
    current_start: Instant,
    slot: Duration,
}

impl Calls {
    fn new(window: Duration, now: Instant) -> Self {
        Calls {
            slots: [Slot::default(); SLOTS],
            current: 0,
            current_start: now,
            slot: window / SLOTS as u32,
        }
    }

    fn record(&mut self, failed: bool, now: Instant) -> (u64, u64) {
        let elapsed = now.saturating_duration_since(self.current_start);
        let steps = elapsed.as_nanos() / self.slot.as_nanos();
        if steps >= SLOTS as u128 {
            self.slots = [Slot::default(); SLOTS];
        } else {
            for _ in 0..steps {
                self.current = (self.current + 1) % SLOTS;
                self.slots[self.current] = Slot::default();
            }
        }
        if steps > 0 {
            let into_slot = (elapsed.as_nanos() % self.slot.as_nanos()) as u64;
            self.current_start = now - Duration::from_nanos(into_slot);
        }
        let slot = &mut self.slots[self.current];
        slot.calls += 1;
        slot.failed += u64::from(failed);
        let calls = self.slots.iter().map(|s| s.calls).sum();
        let failed = self.slots.iter().map(|s| s.failed).sum();
        (failed, calls)
    }

    fn clear(&mut self) {
        self.slots = [Slot::default(); SLOTS];
    }
}

/// A breaker's state.
#[derive(Debug)]
pub(super) struct Breaker {
    settings: CircuitBreaker,
    pub(super) circuit: Circuit,
    consecutive: u32,
    calls: Option<Calls>,
}

impl Breaker {
    pub(super) fn new(settings: CircuitBreaker, now: Instant) -> Self {
        Breaker {
            settings,
            circuit: Circuit::Closed,
            consecutive: 0,
            calls: settings.failure_rate.map(|r| Calls::new(r.window, now)),
        }
    }

    /// Half-opens the circuit if its cool-down is over at `now`.
    pub(super) fn refresh(&mut self, now: Instant) -> Option<Change> {
        match self.circuit {
            Circuit::Open { until } if now >= until => {
                self.circuit = Circuit::HalfOpen { probing: false };
                Some(Change::HalfOpen)
            }
            _ => None,
        }
    }

    /// Records the result of a call that ended at `now`.
    pub(super) fn record(&mut self, result: CallResult, now: Instant) -> Option<Change> {
        match self.circuit {
            Circuit::Closed => self.record_closed(result, now),
            // A call admitted before the circuit opened: it says nothing new.
            Circuit::Open { .. } | Circuit::HalfOpen { probing: false } => None,
            Circuit::HalfOpen { probing: true } => match result {
                CallResult::Success => {
                    self.circuit = Circuit::Closed;
                    Some(Change::Closed)
                }
                CallResult::Failure => {
                    let until = now + self.settings.cool_down;
                    self.circuit = Circuit::Open { until };
                    Some(Change::Reopened { until })
                }
                CallResult::Neutral => {
                    self.circuit = Circuit::HalfOpen { probing: false };
                    None
                }
            },
        }
    }

    fn record_closed(&mut self, result: CallResult, now: Instant) -> Option<Change> {
        let failed = match result {
            CallResult::Neutral => return None,
            CallResult::Success => false,
            CallResult::Failure => true,
        };
        self.consecutive = if failed { self.consecutive + 1 } else { 0 };
        let rate = self.calls.as_mut().map(|c| c.record(failed, now));
        if !failed {
            return None;
        }
        let why = match (
            self.settings.consecutive_failures,
            self.settings.failure_rate,
        ) {
            (Some(limit), _) if self.consecutive >= limit => Why::Consecutive(self.consecutive),
            (_, Some(r)) => match rate {
                Some((failed, calls))
                    if calls >= u64::from(r.min_calls)
                        && failed as f64 >= r.rate * calls as f64 =>
                {
                    Why::Rate { failed, calls }
                }
                _ => return None,
            },
            _ => return None,
        };
        let until = now + self.settings.cool_down;
        self.circuit = Circuit::Open { until };
        // A fresh start when the circuit closes again.
        self.consecutive = 0;
        if let Some(calls) = self.calls.as_mut() {
            calls.clear();
        }
        Some(Change::Opened { why, until })
    }

    /// The probe call starts.
    pub(super) fn probe(&mut self) {
        self.circuit = Circuit::HalfOpen { probing: true };
    }

    /// The probe ended without a result (it was not handed to the handler): the next delivery
    /// is the probe.
    pub(super) fn probe_ended_without_result(&mut self) {
        if self.circuit == (Circuit::HalfOpen { probing: true }) {
            self.circuit = Circuit::HalfOpen { probing: false };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn breaker(settings: CircuitBreaker) -> (Breaker, Instant) {
        let now = Instant::now();
        (Breaker::new(settings, now), now)
    }

    #[test]
    fn consecutive_failures_open_then_one_probe_closes() {
        let settings = CircuitBreaker::builder()
            .consecutive_failures(3)
            .cool_down(30 * S)
            .build()
            .unwrap();
        let (mut b, t0) = breaker(settings);
        assert_eq!(b.record(CallResult::Failure, t0), None);
        assert_eq!(b.record(CallResult::Failure, t0), None);
        assert_eq!(b.record(CallResult::Success, t0), None, "a success resets");
        assert_eq!(b.record(CallResult::Neutral, t0), None);
        assert_eq!(b.record(CallResult::Failure, t0), None);
        assert_eq!(b.record(CallResult::Failure, t0), None);
        let until = t0 + 30 * S;
        assert_eq!(
            b.record(CallResult::Failure, t0),
            Some(Change::Opened {
                why: Why::Consecutive(3),
                until
            })
        );
        assert_eq!(
            b.record(CallResult::Success, t0),
            None,
            "calls admitted before the opening say nothing"
        );
        assert_eq!(b.refresh(t0 + 29 * S), None);
        assert_eq!(b.refresh(until), Some(Change::HalfOpen));
        assert_eq!(b.record(CallResult::Success, until), None, "not the probe");
        b.probe();
        assert_eq!(
            b.record(CallResult::Failure, until + S),
            Some(Change::Reopened {
                until: until + 31 * S
            })
        );
        assert_eq!(b.refresh(until + 31 * S), Some(Change::HalfOpen));
        b.probe();
        b.probe_ended_without_result();
        assert_eq!(b.circuit, Circuit::HalfOpen { probing: false });
        b.probe();
        assert_eq!(b.record(CallResult::Neutral, until + 31 * S), None);
        assert_eq!(b.circuit, Circuit::HalfOpen { probing: false });
        b.probe();
        assert_eq!(
            b.record(CallResult::Success, until + 32 * S),
            Some(Change::Closed)
        );
        // Counting starts again from zero.
        assert_eq!(b.record(CallResult::Failure, until + 33 * S), None);
        assert_eq!(b.record(CallResult::Failure, until + 33 * S), None);
        assert!(matches!(
            b.record(CallResult::Failure, until + 33 * S),
            Some(Change::Opened { .. })
        ));
    }

    #[test]
    fn a_failure_rate_over_enough_calls_opens() {
        let rate = FailureRate::new(0.5, 4, 10 * S).unwrap();
        let settings = CircuitBreaker::builder()
            .failure_rate(rate)
            .build()
            .unwrap();
        assert_eq!(settings.consecutive_failures(), None, "the rate alone");
        let (mut b, t0) = breaker(settings);
        assert_eq!(
            b.record(CallResult::Failure, t0),
            None,
            "1 of 1, too few calls"
        );
        assert_eq!(b.record(CallResult::Success, t0), None);
        assert_eq!(b.record(CallResult::Success, t0), None);
        assert_eq!(
            b.record(CallResult::Failure, t0),
            Some(Change::Opened {
                why: Why::Rate {
                    failed: 2,
                    calls: 4
                },
                until: t0 + 30 * S
            }),
            "2 of 4 is half"
        );
        let (mut b, t0) = breaker(settings);
        for _ in 0..3 {
            b.record(CallResult::Success, t0);
        }
        assert_eq!(b.record(CallResult::Failure, t0), None, "1 of 4");
        // The successes leave the window; the failure stays in it for a while yet.
        assert_eq!(
            b.record(CallResult::Failure, t0 + 10 * S),
            None,
            "1 of 1 after the window moved"
        );
        for _ in 0..2 {
            b.record(CallResult::Success, t0 + 10 * S);
        }
        assert_eq!(
            b.record(CallResult::Failure, t0 + 10 * S),
            Some(Change::Opened {
                why: Why::Rate {
                    failed: 2,
                    calls: 4
                },
                until: t0 + 40 * S
            })
        );
    }

    #[test]
    fn impossible_breakers_name_their_field() {
        let field = |e: Error| match e {
            Error::Config { field, .. } => field,
            other => panic!("unexpected {other}"),
        };
        let e = CircuitBreaker::builder()
            .consecutive_failures(0)
            .build()
            .unwrap_err();
        assert_eq!(field(e), "consecutive_failures");
        let e = CircuitBreaker::builder()
            .cool_down(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(field(e), "cool_down");
        assert_eq!(field(FailureRate::new(0.0, 1, S).unwrap_err()), "rate");
        assert_eq!(field(FailureRate::new(1.5, 1, S).unwrap_err()), "rate");
        assert_eq!(field(FailureRate::new(0.5, 0, S).unwrap_err()), "min_calls");
        assert_eq!(
            field(FailureRate::new(0.5, 1, Duration::ZERO).unwrap_err()),
            "window"
        );
        assert_eq!(
            CircuitBreaker::builder().build().unwrap(),
            CircuitBreaker::default()
        );
    }
}
