//! Ramp-up: after the circuit closes or a throttle pause ends, concurrency grows back by steps
//! (additive increase), and a throttle cuts it by a factor (multiplicative decrease).

use std::time::Duration;

use tokio::time::Instant;

use crate::Error;

/// How concurrency grows back. See the [module docs](super).
///
/// ```
/// use std::time::Duration;
/// use redeliver_core::host::resilience::RampUp;
///
/// // From 2 handler calls at once, one more every 500 ms; halved by a throttle.
/// let ramp = RampUp::builder()
///     .initial(2)
///     .step(1)
///     .every(Duration::from_millis(500))
///     .decrease(0.5)
///     .build()?;
/// assert_eq!(ramp.initial(), 2);
/// # Ok::<(), redeliver_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RampUp {
    initial: usize,
    step: usize,
    every: Duration,
    decrease: f64,
}

impl RampUp {
    /// A builder, starting from the [defaults](RampUp::default).
    pub fn builder() -> RampUpBuilder {
        RampUpBuilder {
            ramp: RampUp::default(),
        }
    }

    /// Handler calls at once when the circuit closes.
    pub fn initial(&self) -> usize {
        self.initial
    }

    /// Calls added at each step.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The time between steps.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// The factor a throttle multiplies the concurrency by.
    pub fn decrease(&self) -> f64 {
        self.decrease
    }

    /// The concurrency after a throttle at `current`: at least 1.
    pub(super) fn decreased(&self, current: usize) -> usize {
        ((current as f64 * self.decrease).floor() as usize).max(1)
    }
}

/// From 1 call at once, one more every second; a throttle halves it.
impl Default for RampUp {
    fn default() -> Self {
        RampUp {
            initial: 1,
            step: 1,
            every: Duration::from_secs(1),
            decrease: 0.5,
        }
    }
}

/// Builds a [`RampUp`], checking it in [`build`](RampUpBuilder::build).
#[must_use]
#[derive(Clone, Debug)]
pub struct RampUpBuilder {
    ramp: RampUp,
}

impl RampUpBuilder {
    /// Handler calls at once when the circuit closes (1 or more; above the consumer's
    /// concurrency means all of it).
    pub fn initial(mut self, initial: usize) -> Self {
        self.ramp.initial = initial;
        self
    }

    /// Calls added at each step (1 or more).
    pub fn step(mut self, step: usize) -> Self {
        self.ramp.step = step;
        self
    }

    /// The time between steps (more than zero).
    pub fn every(mut self, every: Duration) -> Self {
        self.ramp.every = every;
        self
    }

    /// The factor a throttle multiplies the concurrency by, above 0 and below 1.
    pub fn decrease(mut self, decrease: f64) -> Self {
        self.ramp.decrease = decrease;
        self
    }

    /// The ramp, or an [`Error::Config`] naming the field out of range.
    pub fn build(self) -> Result<RampUp, Error> {
        let r = self.ramp;
        if r.initial == 0 {
            return Err(Error::config("initial", "must be at least 1, got 0"));
        }
        if r.step == 0 {
            return Err(Error::config("step", "must be at least 1, got 0"));
        }
        if r.every.is_zero() {
            return Err(Error::config("every", "must be longer than zero"));
        }
        if !(r.decrease > 0.0 && r.decrease < 1.0) {
            return Err(Error::config(
                "decrease",
                format!(
                    "must be above 0 and below 1 (0.5 halves), got {}",
                    r.decrease
                ),
            ));
        }
        Ok(r)
    }
}

/// A ramp under way: `from` calls at once at `since`, `step` more after every `every`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ramp {
    pub(super) from: usize,
    pub(super) since: Instant,
}

impl Ramp {
    /// The concurrency at `now`, at most `max`.
    pub(super) fn limit(&self, settings: &RampUp, max: usize, now: Instant) -> usize {
        let steps =
            now.saturating_duration_since(self.since).as_nanos() / settings.every.as_nanos();
        let grown = usize::try_from(steps)
            .unwrap_or(usize::MAX)
            .saturating_mul(settings.step);
        self.from.saturating_add(grown).min(max)
    }

    /// When the concurrency grows next, if it is below `max` at `now`.
    pub(super) fn next_step(&self, settings: &RampUp, max: usize, now: Instant) -> Option<Instant> {
        if self.limit(settings, max, now) >= max {
            return None;
        }
        if now < self.since {
            return Some(self.since + settings.every);
        }
        let steps = (now - self.since).as_nanos() / settings.every.as_nanos();
        let next = u32::try_from(steps + 1).ok()?;
        Some(self.since + settings.every.saturating_mul(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn concurrency_grows_by_steps_up_to_the_maximum() {
        let settings = RampUp::builder()
            .initial(1)
            .step(2)
            .every(S)
            .build()
            .unwrap();
        let t0 = Instant::now();
        let ramp = Ramp { from: 1, since: t0 };
        let limits: Vec<usize> = (0..6)
            .map(|s| ramp.limit(&settings, 8, t0 + s * S))
            .collect();
        assert_eq!(limits, [1, 3, 5, 7, 8, 8]);
        assert_eq!(ramp.limit(&settings, 8, t0 + Duration::from_millis(999)), 1);
        assert_eq!(ramp.next_step(&settings, 8, t0), Some(t0 + S));
        assert_eq!(
            ramp.next_step(&settings, 8, t0 + Duration::from_millis(2500)),
            Some(t0 + 3 * S)
        );
        assert_eq!(ramp.next_step(&settings, 8, t0 + 4 * S), None, "full");
        let later = Ramp {
            from: 2,
            since: t0 + 30 * S,
        };
        assert_eq!(later.limit(&settings, 8, t0), 2, "before it starts");
        assert_eq!(later.next_step(&settings, 8, t0), Some(t0 + 31 * S));
    }

    #[test]
    fn a_throttle_cuts_by_the_factor_but_never_to_zero() {
        let settings = RampUp::default();
        assert_eq!(settings.decreased(10), 5);
        assert_eq!(settings.decreased(5), 2);
        assert_eq!(settings.decreased(1), 1);
    }

    #[test]
    fn impossible_ramps_name_their_field() {
        let field = |b: RampUpBuilder| match b.build().unwrap_err() {
            Error::Config { field, .. } => field,
            other => panic!("unexpected {other}"),
        };
        assert_eq!(field(RampUp::builder().initial(0)), "initial");
        assert_eq!(field(RampUp::builder().step(0)), "step");
        assert_eq!(field(RampUp::builder().every(Duration::ZERO)), "every");
        assert_eq!(field(RampUp::builder().decrease(1.0)), "decrease");
        assert_eq!(field(RampUp::builder().decrease(0.0)), "decrease");
    }
}
