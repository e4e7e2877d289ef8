//! The retry budget: retries limited to a share of first attempts over a sliding window.

use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::Error;

/// How many retries a consumer (or a key) may make: at most `min_retries` plus `ratio` times
/// the first attempts, over the last `window`. See the [module docs](super).
///
/// ```
/// use std::time::Duration;
/// use redeliver_core::host::resilience::{OverBudget, RetryBudget};
///
/// // One retry per ten first attempts, and at least 10 a minute, whatever the traffic.
/// let budget = RetryBudget::builder()
///     .ratio(0.1)
///     .min_retries(10)
///     .window(Duration::from_secs(60))
///     .over_budget(OverBudget::Delay)
///     .build()?;
/// assert_eq!(budget.ratio(), 0.1);
/// # Ok::<(), redeliver_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudget {
    ratio: f64,
    min_retries: u32,
    window: Duration,
    over_budget: OverBudget,
}

/// What happens to a retry over budget. In configuration: `delay` or `dead-letter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum OverBudget {
    /// The retry is scheduled later: not before one window from now, one more window for each
    /// budget's worth of retries already over budget in this window (a floor under the policy's
    /// delay, like a `Retry-After`). The attempt still counts.
    #[default]
    Delay,
    /// The message is dead-lettered with reason
    /// [`RETRY_BUDGET_EXHAUSTED`](crate::reasons::RETRY_BUDGET_EXHAUSTED).
    DeadLetter,
}

/// The budget's window moves in this many steps.
const SLOTS: usize = 10;

impl RetryBudget {
    /// A builder, starting from the [defaults](RetryBudget::default).
    pub fn builder() -> RetryBudgetBuilder {
        RetryBudgetBuilder {
            budget: RetryBudget::default(),
        }
    }

    /// Retries allowed per first attempt in the window.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// Retries allowed in the window whatever the traffic (the floor).
    pub fn min_retries(&self) -> u32 {
        self.min_retries
    }

    /// The sliding window (it moves in tenths).
    pub fn window(&self) -> Duration {
        self.window
    }

    /// What happens to a retry over budget.
    pub fn over_budget(&self) -> OverBudget {
        self.over_budget
    }
}

/// A ratio of 0.2 (one retry per five first attempts), at least 10 retries, over a minute;
/// retries over budget are delayed.
impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            ratio: 0.2,
            min_retries: 10,
            window: Duration::from_secs(60),
            over_budget: OverBudget::Delay,
        }
    }
}

/// Builds a [`RetryBudget`], checking it in [`build`](RetryBudgetBuilder::build).
#[must_use]
#[derive(Clone, Debug)]
pub struct RetryBudgetBuilder {
    budget: RetryBudget,
}

impl RetryBudgetBuilder {
    /// Retries allowed per first attempt (0 or more; 0.2 is one retry per five messages).
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.budget.ratio = ratio;
        self
    }

    /// Retries allowed in any window whatever the traffic, so that a quiet endpoint can
    /// still retry.
    pub fn min_retries(mut self, min_retries: u32) -> Self {
        self.budget.min_retries = min_retries;
        self
    }

    /// The sliding window: at least 10 ms.
    pub fn window(mut self, window: Duration) -> Self {
        self.budget.window = window;
        self
    }

    /// What happens to a retry over budget.
    pub fn over_budget(mut self, over_budget: OverBudget) -> Self {
        self.budget.over_budget = over_budget;
        self
    }

    /// The budget, or an [`Error::Config`] naming the field out of range.
    pub fn build(self) -> Result<RetryBudget, Error> {
        let b = self.budget;
        if !b.ratio.is_finite() || b.ratio < 0.0 {
            return Err(Error::config(
                "ratio",
                format!(
                    "must be a number of retries per first attempt, 0 or more (such as 0.2), got {}",
                    b.ratio
                ),
            ));
        }
        if b.ratio == 0.0 && b.min_retries == 0 {
            return Err(Error::config(
                "min_retries",
                "must be at least 1 when the ratio is 0, or no retry would ever be allowed",
            ));
        }
        if b.window < Duration::from_millis(10) {
            return Err(Error::config(
                "window",
                format!("must be at least 10ms, got {:?}", b.window),
            ));
        }
        Ok(b)
    }
}

/// What a budget says about one retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Withdrawal {
    /// Within the budget: spent.
    Allowed,
    /// Over budget; if delayed, not before this long from now.
    Over { stretch: Duration },
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    first_attempts: u64,
    retries: u64,
    over: u64,
}

/// What a budget has seen over its window: first attempts, retries spent and retries over
/// budget, in [`SLOTS`] steps of a tenth of the window each.
#[derive(Debug)]
pub(super) struct Spending {
    slots: [Slot; SLOTS],
    current: usize,
    current_start: Instant,
    slot: Duration,
    /// Whether the last retry was over budget (to log the change once).
    pub(super) exhausted: bool,
}

impl Spending {
    pub(super) fn new(budget: &RetryBudget, now: Instant) -> Self {
        Spending {
            slots: [Slot::default(); SLOTS],
            current: 0,
            current_start: now,
            slot: budget.window / SLOTS as u32,
            exhausted: false,
        }
    }

    /// Moves the window up to `now`, forgetting the slots that left it.
    fn advance(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.current_start);
        let slot = self.slot.as_nanos();
        let steps = elapsed.as_nanos() / slot;
        if steps == 0 {
            return;
        }
        if steps >= SLOTS as u128 {
            self.slots = [Slot::default(); SLOTS];
        } else {
            for _ in 0..steps {
                self.current = (self.current + 1) % SLOTS;
                self.slots[self.current] = Slot::default();
            }
        }
        // The current slot started a whole number of slots after the previous one.
        let into_slot = (elapsed.as_nanos() % slot) as u64;
        self.current_start = now - Duration::from_nanos(into_slot);
    }

    fn total(&self, field: impl Fn(&Slot) -> u64) -> u64 {
        self.slots.iter().map(field).sum()
    }

    pub(super) fn first_attempt(&mut self, now: Instant) {
        self.advance(now);
        self.slots[self.current].first_attempts += 1;
    }

    /// Retries allowed in the window as it is at the last change.
    fn allowance(&self, budget: &RetryBudget) -> u64 {
        let earned = (budget.ratio * self.total(|s| s.first_attempts) as f64).floor();
        // Saturating: a ratio of a million times a huge count is "unlimited".
        u64::from(budget.min_retries).saturating_add(earned as u64)
    }

    /// Retries left in the window at `now`.
    pub(super) fn left(&mut self, budget: &RetryBudget, now: Instant) -> u64 {
        self.advance(now);
        self.allowance(budget)
            .saturating_sub(self.total(|s| s.retries))
    }

    /// Spends one retry at `now` if the budget allows it.
    pub(super) fn withdraw(&mut self, budget: &RetryBudget, now: Instant) -> Withdrawal {
        self.advance(now);
        let allowance = self.allowance(budget);
        if self.total(|s| s.retries) < allowance {
            self.slots[self.current].retries += 1;
            return Withdrawal::Allowed;
        }
        // Spread what is over budget: a budget's worth per window, so that the delayed
        // retries do not all come back at once.
        let over = self.total(|s| s.over);
        self.slots[self.current].over += 1;
        let windows = 1 + over / allowance.max(1);
        let stretch = budget
            .window
            .saturating_mul(u32::try_from(windows).unwrap_or(u32::MAX));
        Withdrawal::Over { stretch }
    }

    /// Whether nothing is left in the window (the budget can be forgotten).
    pub(super) fn is_empty(&mut self, now: Instant) -> bool {
        self.advance(now);
        self.slots
            .iter()
            .all(|s| s.first_attempts == 0 && s.retries == 0 && s.over == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn budget(ratio: f64, min_retries: u32) -> RetryBudget {
        RetryBudget::builder()
            .ratio(ratio)
            .min_retries(min_retries)
            .window(60 * S)
            .build()
            .unwrap()
    }

    #[test]
    fn retries_are_a_share_of_first_attempts_above_a_floor() {
        let b = budget(0.1, 5);
        let t0 = Instant::now();
        let mut s = Spending::new(&b, t0);
        for _ in 0..30 {
            s.first_attempt(t0);
        }
        assert_eq!(s.left(&b, t0), 8, "5 + 0.1 x 30");
        for _ in 0..8 {
            assert_eq!(s.withdraw(&b, t0), Withdrawal::Allowed);
        }
        assert_eq!(s.left(&b, t0), 0);
        // Over budget: one window for the first 8 over, two for the next 8.
        for _ in 0..8 {
            assert_eq!(s.withdraw(&b, t0), Withdrawal::Over { stretch: 60 * S });
        }
        assert_eq!(s.withdraw(&b, t0), Withdrawal::Over { stretch: 120 * S });
    }

    #[test]
    fn the_window_slides_in_tenths() {
        let b = budget(0.0, 2);
        let t0 = Instant::now();
        let mut s = Spending::new(&b, t0);
        assert_eq!(s.withdraw(&b, t0), Withdrawal::Allowed);
        assert_eq!(s.withdraw(&b, t0 + 5 * S), Withdrawal::Allowed);
        assert!(matches!(
            s.withdraw(&b, t0 + 59 * S),
            Withdrawal::Over { .. }
        ));
        // The retry at 0 s left the window at 60 s (its slot was [0, 6 s)); the one at 5 s too.
        assert_eq!(s.left(&b, t0 + 60 * S), 2);
        assert!(
            !s.is_empty(t0 + 60 * S),
            "the over-budget retry at 59 s is still in it"
        );
        assert!(s.is_empty(t0 + 120 * S));
        assert_eq!(s.left(&b, t0 + 3600 * S), 2, "after a long quiet spell");
    }

    #[test]
    fn first_attempts_leave_the_window_too() {
        let b = budget(1.0, 0);
        let t0 = Instant::now();
        let mut s = Spending::new(&b, t0);
        s.first_attempt(t0);
        assert_eq!(s.left(&b, t0 + 59 * S), 1);
        assert_eq!(s.left(&b, t0 + 60 * S), 0);
    }

    #[test]
    fn impossible_budgets_name_their_field() {
        let field = |b: RetryBudgetBuilder| match b.build().unwrap_err() {
            Error::Config { field, .. } => field,
            other => panic!("unexpected {other}"),
        };
        assert_eq!(field(RetryBudget::builder().ratio(-0.1)), "ratio");
        assert_eq!(field(RetryBudget::builder().ratio(f64::NAN)), "ratio");
        assert_eq!(
            field(RetryBudget::builder().ratio(0.0).min_retries(0)),
            "min_retries"
        );
        assert_eq!(
            field(RetryBudget::builder().window(Duration::from_millis(5))),
            "window"
        );
        assert_eq!(
            RetryBudget::builder().build().unwrap(),
            RetryBudget::default()
        );
    }
}
