//! One consumer's resilience: the worker's [`Admission`] (how many deliveries it may take) and
//! the middleware that reports every handler call's outcome to it (and applies the budget).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::breaker::{Breaker, CallResult, Change, Circuit, Why};
use super::budget::{OverBudget, Spending, Withdrawal};
use super::ramp::Ramp;
use super::{CircuitState, Resilience, ResilienceSnapshot, ResilienceStats};
use crate::clock::{Clock, to_chrono};
use crate::handler::Context;
use crate::host::middleware::{BoxOutcome, Middleware, Next};
use crate::message::Message;
use crate::outcome::{Outcome, RetryAfter};
use crate::reasons::RETRY_BUDGET_EXHAUSTED;
use crate::worker::admission::{Admission, Verdict};

/// What one consumer's resilience knows; shared by its admission and its middleware.
pub(crate) struct Controller {
    /// The consumer's name, for logs.
    name: String,
    settings: Resilience,
    /// The consumer's concurrency: the most the admission ever allows.
    concurrency: usize,
    /// The retry policy's attempts; `None` where retries are unlimited (dead letters).
    max_attempts: Option<u32>,
    clock: Clock,
    state: Mutex<State>,
    /// Told whenever a place may have become free.
    changed: Notify,
}

#[derive(Debug)]
struct State {
    /// Places taken: deliveries admitted and not yet settled.
    in_use: usize,
    breaker: Option<Breaker>,
    /// The consumer is paused by a Retry-After until then.
    throttled_until: Option<Instant>,
    /// The concurrency to ramp up from when the pause ends.
    resume_from: Option<usize>,
    /// A ramp under way.
    ramp: Option<Ramp>,
    budget: Option<Spending>,
    keys: HashMap<String, Key>,
    /// How many keys there were after the last clean-up.
    keys_kept: usize,
    stats: ResilienceStats,
}

#[derive(Debug, Default)]
struct Key {
    budget: Option<Spending>,
    /// The key is paused by a Retry-After until then, on the transport's clock.
    throttled_until: Option<DateTime<Utc>>,
}

impl Controller {
    pub(crate) fn new(
        name: String,
        settings: Resilience,
        concurrency: usize,
        max_attempts: Option<u32>,
        clock: Clock,
    ) -> Self {
        let now = Instant::now();
        let state = State {
            in_use: 0,
            breaker: settings.circuit_breaker.map(|b| Breaker::new(b, now)),
            throttled_until: None,
            resume_from: None,
            ramp: None,
            budget: settings.retry_budget.map(|b| Spending::new(&b, now)),
            keys: HashMap::new(),
            keys_kept: 0,
            stats: ResilienceStats::default(),
        };
        Controller {
            name,
            settings,
            concurrency: concurrency.max(1),
            max_attempts,
            clock,
            state: Mutex::new(state),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change leaves the state consistent before anything that could panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, message: &Message) -> Option<String> {
        self.settings.key.as_ref().and_then(|key| key.0(message))
    }

    /// Applies what time alone changes: the circuit half-opens after its cool-down, a pause
    /// ends, a ramp reaches the full concurrency. Each change is logged here, once.
    fn refresh(&self, st: &mut State, now: Instant) {
        let consumer = self.name.as_str();
        if let Some(Change::HalfOpen) = st.breaker.as_mut().and_then(|b| b.refresh(now)) {
            info!(consumer, "circuit half-open: one probe delivery at a time");
        }
        if st.throttled_until.is_some_and(|until| now >= until) {
            let until = st.throttled_until.take().expect("checked above");
            match (self.settings.ramp_up, st.resume_from.take()) {
                (Some(_), Some(from)) if from < self.concurrency => {
                    st.ramp = Some(Ramp { from, since: until });
                    info!(consumer, from, "throttle pause over; ramping up");
                }
                _ => info!(consumer, "throttle pause over"),
            }
        }
        if let (Some(settings), Some(ramp)) = (self.settings.ramp_up, st.ramp)
            && ramp.limit(&settings, self.concurrency, now) >= self.concurrency
        {
            st.ramp = None;
            info!(
                consumer,
                concurrency = self.concurrency,
                "ramp-up done: full concurrency"
            );
        }
    }

    /// Handler calls allowed at once at `now` (after [`refresh`](Self::refresh)).
    fn limit(&self, st: &State, now: Instant) -> usize {
        if st.throttled_until.is_some() {
            return 0;
        }
        match st.breaker.as_ref().map(|b| b.circuit) {
            Some(Circuit::Open { .. }) => 0,
            Some(Circuit::HalfOpen { .. }) => 1,
            Some(Circuit::Closed) | None => match (self.settings.ramp_up, st.ramp) {
                (Some(settings), Some(ramp)) => ramp.limit(&settings, self.concurrency, now),
                _ => self.concurrency,
            },
        }
    }

    /// Whether a place is free at `now` (after [`refresh`](Self::refresh)).
    fn has_place(&self, st: &State, now: Instant) -> bool {
        match st.breaker.as_ref().map(|b| b.circuit) {
            // One probe at a time, and only once every call admitted before it is done.
            Some(Circuit::HalfOpen { probing }) => !probing && st.in_use == 0,
            _ => st.in_use < self.limit(st, now),
        }
    }

    /// When time alone may free a place next.
    fn next_change(&self, st: &State, now: Instant) -> Option<Instant> {
        let open_until = match st.breaker.as_ref().map(|b| b.circuit) {
            Some(Circuit::Open { until }) => Some(until),
            _ => None,
        };
        let ramp_step = match (self.settings.ramp_up, st.ramp) {
            (Some(settings), Some(ramp)) => ramp.next_step(&settings, self.concurrency, now),
            _ => None,
        };
        [st.throttled_until, open_until, ramp_step]
            .into_iter()
            .flatten()
            .min()
    }

    /// A handler call of `message` starts: a first attempt adds to the budget.
    fn called(&self, message: &Message, key: Option<&str>) {
        let Some(budget) = self.settings.retry_budget else {
            return;
        };
        if message.attempt() != 1 {
            return;
        }
        let now = Instant::now();
        let mut st = self.lock();
        self.spending(&mut st, key, now)
            .get_or_insert_with(|| Spending::new(&budget, now))
            .first_attempt(now);
    }

    /// The budget that `key`'s retries spend: the key's own, or the consumer's.
    fn spending<'s>(
        &self,
        st: &'s mut State,
        key: Option<&str>,
        now: Instant,
    ) -> &'s mut Option<Spending> {
        match key {
            None => &mut st.budget,
            Some(key) => &mut self.key_state(st, key, now).budget,
        }
    }

    /// What is known about `key`, made if need be. Keys with nothing left to remember are
    /// forgotten now and then, so that many keys do not grow the state for ever.
    fn key_state<'s>(&self, st: &'s mut State, key: &str, now: Instant) -> &'s mut Key {
        if st.keys.len() > (st.keys_kept * 2).max(64) {
            self.forget_idle_keys(st, now);
        }
        // Look up before inserting: `entry` would allocate the key on every call.
        if !st.keys.contains_key(key) {
            st.keys.insert(key.to_owned(), Key::default());
        }
        st.keys
            .get_mut(key)
            .expect("inserted above if it was missing")
    }

    fn forget_idle_keys(&self, st: &mut State, now: Instant) {
        let wall = self.clock.now();
        st.keys.retain(|_, k| {
            k.throttled_until.is_some_and(|until| until > wall)
                || k.budget.as_mut().is_some_and(|b| !b.is_empty(now))
        });
        st.keys_kept = st.keys.len();
    }

    /// A handler call of `message` ended with `outcome`: updates the breaker, pauses on a
    /// Retry-After, and applies the budget to a retry. Returns the outcome the worker carries
    /// out.
    fn handled(&self, message: &Message, key: Option<&str>, outcome: Outcome) -> Outcome {
        let now = Instant::now();
        let wall = self.clock.now();
        let consumer = self.name.as_str();
        let throttled_for = match &outcome {
            Outcome::Retry {
                retry_after: Some(after),
                ..
            } => Some(after.delay_from(wall)).filter(|d| !d.is_zero()),
            _ => None,
        };
        let mut st = self.lock();
        self.refresh(&mut st, now);
        let mut freed = false;

        if let Some(breaker) = st.breaker.as_mut() {
            let result = match &outcome {
                Outcome::Success => CallResult::Success,
                // A pause deals with a throttle; without one, it is a failure like any other.
                Outcome::Retry { .. }
                    if throttled_for.is_some() && self.settings.throttle.is_some() =>
                {
                    CallResult::Neutral
                }
                Outcome::Retry { .. } => CallResult::Failure,
                _ => CallResult::Neutral,
            };
            let probing = breaker.circuit == (Circuit::HalfOpen { probing: true });
            match breaker.record(result, now) {
                Some(Change::Opened { why, until }) => {
                    st.stats.circuit_opened += 1;
                    let cool_down = until - now;
                    match why {
                        Why::Consecutive(failures) => warn!(
                            consumer,
                            failures,
                            ?cool_down,
                            "circuit open after consecutive transient failures; taking no deliveries"
                        ),
                        Why::Rate { failed, calls } => warn!(
                            consumer,
                            failed,
                            calls,
                            ?cool_down,
                            "circuit open: too many recent calls failed; taking no deliveries"
                        ),
                    }
                }
                Some(Change::Reopened { until }) => {
                    st.stats.circuit_opened += 1;
                    warn!(consumer, cool_down = ?(until - now), "the probe failed; circuit open again");
                }
                Some(Change::Closed) => {
                    freed = true;
                    match self.settings.ramp_up {
                        Some(ramp) if ramp.initial() < self.concurrency => {
                            st.ramp = Some(Ramp {
                                from: ramp.initial(),
                                since: now,
                            });
                            info!(
                                consumer,
                                from = ramp.initial(),
                                "the probe succeeded; circuit closed, ramping up"
                            );
                        }
                        _ => {
                            st.ramp = None;
                            info!(consumer, "the probe succeeded; circuit closed");
                        }
                    }
                }
                Some(Change::HalfOpen) | None => {
                    // A probe that said nothing: the next delivery is the probe.
                    freed |= probing;
                }
            }
        }

        if let Some(delay) = throttled_for {
            self.throttled(&mut st, key, delay, now, wall);
        }

        let outcome = self.budgeted(&mut st, message, key, outcome, now, wall);
        drop(st);
        if freed {
            self.changed.notify_waiters();
        }
        outcome
    }

    /// A downstream asked to wait `delay`: pauses the consumer or the key, and cuts the
    /// concurrency it ramps up from.
    fn throttled(
        &self,
        st: &mut State,
        key: Option<&str>,
        delay: Duration,
        now: Instant,
        wall: DateTime<Utc>,
    ) {
        let consumer = self.name.as_str();
        let current = self.limit(st, now).max(1);
        let Some(throttle) = self.settings.throttle else {
            // No pause: only the concurrency drops, and grows back from now.
            if let Some(ramp) = self.settings.ramp_up
                && key.is_none()
            {
                let from = ramp.decreased(current);
                st.ramp = Some(Ramp { from, since: now });
                info!(
                    consumer,
                    from, "throttled; concurrency cut, ramping up again"
                );
            }
            return;
        };
        let pause = delay.min(throttle.max_pause());
        match key {
            Some(key) => {
                let until = wall + to_chrono(pause);
                let entry = self.key_state(st, key, now);
                let paused = entry.throttled_until.is_some_and(|u| u > wall);
                if entry.throttled_until.is_none_or(|u| u < until) {
                    entry.throttled_until = Some(until);
                }
                if !paused {
                    st.stats.throttle_pauses += 1;
                    warn!(
                        consumer,
                        key,
                        ?pause,
                        "throttled by the downstream; deliveries of this key are put off"
                    );
                } else {
                    debug!(
                        consumer,
                        key,
                        ?pause,
                        "throttled again; the key's pause is extended"
                    );
                }
            }
            None => {
                let until = now + pause;
                if st.throttled_until.is_none() {
                    st.stats.throttle_pauses += 1;
                    st.resume_from = self.settings.ramp_up.map(|r| r.decreased(current));
                    st.ramp = None;
                    warn!(
                        consumer,
                        ?pause,
                        "throttled by the downstream; taking no deliveries until the Retry-After"
                    );
                } else {
                    debug!(consumer, ?pause, "throttled again; the pause is extended");
                }
                if st.throttled_until.is_none_or(|u| u < until) {
                    st.throttled_until = Some(until);
                }
            }
        }
    }

    /// Applies the retry budget to `outcome`, if it is a retry.
    fn budgeted(
        &self,
        st: &mut State,
        message: &Message,
        key: Option<&str>,
        outcome: Outcome,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Outcome {
        let Some(budget) = self.settings.retry_budget else {
            return outcome;
        };
        let Outcome::Retry {
            reason,
            retry_after,
        } = outcome
        else {
            return outcome;
        };
        // The last attempt is dead-lettered by the worker, not retried: nothing to spend.
        if self
            .max_attempts
            .is_some_and(|max| message.attempt() >= max)
        {
            return Outcome::Retry {
                reason,
                retry_after,
            };
        }
        let consumer = self.name.as_str();
        let spending = self
            .spending(st, key, now)
            .get_or_insert_with(|| Spending::new(&budget, now));
        let withdrawal = spending.withdraw(&budget, now);
        let was_exhausted = spending.exhausted;
        spending.exhausted = matches!(withdrawal, Withdrawal::Over { .. });
        match withdrawal {
            Withdrawal::Allowed => {
                if was_exhausted {
                    info!(consumer, key, "the retry budget has room again");
                }
                st.stats.retries_within_budget += 1;
                Outcome::Retry {
                    reason,
                    retry_after,
                }
            }
            Withdrawal::Over { stretch } => {
                if !was_exhausted {
                    warn!(consumer, key, over_budget = ?budget.over_budget(), "the retry budget is exhausted");
                }
                match budget.over_budget() {
                    OverBudget::Delay => {
                        st.stats.retries_delayed_over_budget += 1;
                        let asked = retry_after.map_or(Duration::ZERO, |r| r.delay_from(wall));
                        debug!(consumer, key, delay = ?stretch.max(asked), "retry over budget; delayed");
                        Outcome::Retry {
                            reason,
                            retry_after: Some(RetryAfter::Delay(stretch.max(asked))),
                        }
                    }
                    OverBudget::DeadLetter => {
                        st.stats.retries_dead_lettered_over_budget += 1;
                        Outcome::dead_letter_with(
                            RETRY_BUDGET_EXHAUSTED,
                            format!(
                                "the retries of this consumer were over budget; last failure: {reason}"
                            ),
                        )
                    }
                }
            }
        }
    }

    pub(super) fn snapshot(&self) -> ResilienceSnapshot {
        let now = Instant::now();
        let wall = self.clock.now();
        let mut st = self.lock();
        self.refresh(&mut st, now);
        let circuit = st.breaker.as_ref().map(|b| match b.circuit {
            Circuit::Closed => CircuitState::Closed,
            Circuit::Open { until } => CircuitState::Open {
                remaining: until - now,
            },
            Circuit::HalfOpen { .. } => CircuitState::HalfOpen,
        });
        let budget_left = match (self.settings.retry_budget, st.budget.as_mut()) {
            (Some(budget), Some(spending)) => Some(spending.left(&budget, now)),
            (Some(budget), None) => Some(u64::from(budget.min_retries())),
            (None, _) => None,
        };
        ResilienceSnapshot {
            circuit,
            throttled_for: st.throttled_until.map(|until| until - now),
            throttled_keys: st
                .keys
                .values()
                .filter(|k| k.throttled_until.is_some_and(|u| u > wall))
                .count(),
            allowed_concurrency: self.limit(&st, now),
            in_flight: st.in_use,
            budget_left,
            stats: st.stats,
        }
    }
}

impl Admission for Controller {
    fn has_room(&self) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        self.refresh(&mut st, now);
        self.has_place(&st, now)
    }

    fn room(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                // Registered before looking, so that a change in between is not missed.
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let wake = {
                    let now = Instant::now();
                    let mut st = self.lock();
                    self.refresh(&mut st, now);
                    if self.has_place(&st, now) {
                        return;
                    }
                    self.next_change(&st, now)
                };
                match wake {
                    Some(at) => {
                        tokio::select! {
                            _ = changed => {}
                            _ = tokio::time::sleep_until(at) => {}
                        }
                    }
                    None => changed.await,
                }
            }
        })
    }

    fn check(&self, message: &Message) -> Verdict {
        let now = Instant::now();
        let mut st = self.lock();
        self.refresh(&mut st, now);
        if !self.has_place(&st, now) {
            return Verdict::Wait;
        }
        if let Some(key) = self.key(message) {
            let wall = self.clock.now();
            if let Some(until) = st
                .keys
                .get(&key)
                .and_then(|k| k.throttled_until)
                .filter(|until| *until > wall)
            {
                st.stats.parked += 1;
                return Verdict::Park(until);
            }
        }
        st.in_use += 1;
        if let Some(breaker) = st.breaker.as_mut()
            && breaker.circuit == (Circuit::HalfOpen { probing: false })
        {
            breaker.probe();
            st.stats.probes += 1;
            debug!(consumer = %self.name, message_id = %message.id(), "probe delivery");
        }
        Verdict::Handle
    }

    fn leave(&self) {
        {
            let mut st = self.lock();
            st.in_use = st.in_use.saturating_sub(1);
            // While probing, the only place taken is the probe's: if it had a result, the
            // circuit has moved on already.
            if let Some(breaker) = st.breaker.as_mut() {
                breaker.probe_ended_without_result();
            }
        }
        self.changed.notify_waiters();
    }
}

/// Reports every handler call of a consumer to its [`Controller`]: outermost, so that it sees
/// the outcome the worker carries out.
pub(crate) struct Layer(pub(crate) Arc<Controller>);

impl<S: Send + Sync + 'static> Middleware<S> for Layer {
    fn handle<'a>(&'a self, context: &'a Context<S>, next: Next<'a>) -> BoxOutcome<'a> {
        Box::pin(async move {
            let message = context.message();
            let key = self.0.key(message);
            self.0.called(message, key.as_deref());
            let outcome = next.run().await;
            self.0.handled(message, key.as_deref(), outcome)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::resilience::RetryBudget;

    #[tokio::test(start_paused = true)]
    async fn keys_with_nothing_to_remember_are_forgotten() {
        let resilience = Resilience::new()
            .retry_budget(RetryBudget::default())
            .keyed_by_header("tenant");
        let controller = Controller::new("c".into(), resilience, 4, Some(5), Clock::tokio());
        let message = |key: usize| Message::new("x").with_header("tenant", key.to_string());
        for key in 0..1000 {
            let m = message(key);
            controller.called(&m, controller.key(&m).as_deref());
        }
        assert_eq!(controller.lock().keys.len(), 1000, "all in the window");
        tokio::time::advance(Duration::from_secs(61)).await;
        // Forgotten once the keys have doubled since the last clean-up (at 527 keys).
        for key in 1000..1060 {
            let m = message(key);
            controller.called(&m, controller.key(&m).as_deref());
        }
        let st = controller.lock();
        assert_eq!(st.keys.len(), 60, "only the new ones");
        assert!((1000..1060).all(|key| st.keys.contains_key(&key.to_string())));
    }
}
