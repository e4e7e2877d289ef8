//! Resilience against retry storms, per consumer: a retry budget, a circuit breaker,
//! throttle-aware pausing and ramp-up.
//!
//! When a downstream service falls over, every message fails, every failure becomes a retry,
//! and the retries arrive while the service is trying to come back. A consumer given a
//! [`Resilience`] ([`ConsumerSettings::resilience`](super::ConsumerSettings::resilience), or
//! `[consumers.<name>.resilience]` in a [`HostConfig`](super::HostConfig)) takes part in it
//! instead of hammering: each mechanism is opt-in, and all work the same on every transport,
//! because they act on what the worker takes and on the outcomes it carries out, never on the
//! broker.
//!
//! | mechanism | what it does |
//! |---|---|
//! | [`RetryBudget`] | at most `min_retries` + `ratio` × first attempts retries over the last `window`; a retry over budget is delayed (or dead-lettered, by option) and counted |
//! | [`CircuitBreaker`] | after `consecutive_failures` transient failures in a row (or a [`FailureRate`]), the consumer takes no deliveries for `cool_down`; then one probe delivery at a time; a success closes it |
//! | [`Throttle`] | a `Retry-After` from a downstream (`429`, `503`: see [`outcome_for_status`](crate::outcome_for_status)) pauses the consumer, or only that key, until then |
//! | [`RampUp`] | after the circuit closes or a pause ends, concurrency grows back by `step` every `every` from `initial`; a throttle cuts it by `decrease` |
//!
//! # What each mechanism guarantees
//! - **At-least-once is kept; nothing is lost.** The circuit, a pause and the ramp only change
//!   how many deliveries the worker *takes* (its [`Admission`](crate::worker::admission)):
//!   while they allow none, deliveries stay with the transport. A delivery taken just before
//!   room was withdrawn (at most one per handler slot) is held by the worker — not by a
//!   handler, unsettled — until there is room again; a delivery of a paused key is put back
//!   until the pause ends (parked). Neither counts an attempt, and at shutdown a held delivery
//!   is given back to the transport. (A broker may take back a delivery held for very long —
//!   RabbitMQ's consumer timeout, a Service Bus lock — and deliver it again: at-least-once.)
//! - **Nothing is dead-lettered because a circuit was open.** While it is open no handler is
//!   called and no attempt is counted. Handler calls under way when it opens finish, and their
//!   outcomes are carried out as always (they do not count for the breaker).
//! - **Half-open means one call.** After the cool-down exactly one handler call runs at a time
//!   (once every call admitted before it has finished): a success closes the circuit, a
//!   transient failure opens it for another cool-down, and an outcome that says nothing about
//!   the downstream (a dead letter, a discard, a throttle that pauses) lets the next delivery
//!   be the probe. A probe delivery that never reaches the handler (invalid payload, early)
//!   makes the next delivery the probe.
//! - **Transient failures** are [`Outcome::Retry`](crate::Outcome::Retry) — including panics and
//!   time-outs — except that, with a [`Throttle`], a retry with a `Retry-After` is a throttle,
//!   not a failure. Successes reset the count of consecutive failures.
//! - **Retries within the budget.** In any window the retries that go ahead are at most
//!   `min_retries` + ⌊`ratio` × first attempts in the window⌋ (the window slides in tenths).
//!   A retry is counted when the handler asks for it and attempts are left (the last attempt
//!   is dead-lettered by the worker, not retried). Over budget, [`OverBudget::Delay`]
//!   schedules it not before one window from now — one more window for each budget's worth
//!   already over budget in this window, so delayed retries do not come back at once — and
//!   [`OverBudget::DeadLetter`] dead-letters it with reason
//!   [`RETRY_BUDGET_EXHAUSTED`](crate::reasons::RETRY_BUDGET_EXHAUSTED). Either way the
//!   attempt counts, as the handler was called, and [`ResilienceStats`] counts it.
//! - **A pause is exact.** A retry with a `Retry-After` (capped at
//!   [`Throttle::max_pause`]) pauses the consumer from the moment the outcome is known: no
//!   handler call starts before the `Retry-After` has passed. Calls under way finish (a
//!   further `Retry-After` extends the pause). The throttled message itself is retried not
//!   before its `Retry-After`, as always. When the pause ends, a [`RampUp`] resumes at the
//!   concurrency before the throttle times `decrease`.
//! - **Keys.** With [`Resilience::keyed_by`] (or `key_header` in configuration), the retry
//!   budget and the throttle apply per key — a downstream, a tenant — named by each message:
//!   a throttled key's deliveries are parked until its `Retry-After` while the other keys go
//!   on. A message without a key uses the consumer's. The circuit breaker and the ramp are the
//!   consumer's.
//! - **Ramp-up** starts at `initial` calls at once when the circuit closes, and grows by `step`
//!   every `every` up to the consumer's concurrency (additive increase); a throttle multiplies
//!   the concurrency by `decrease` (multiplicative decrease). Without a [`RampUp`], full
//!   concurrency comes back at once.
//! - **Observable.** Each change — circuit opened, half-open, closed; pause started and over;
//!   ramp-up done; budget exhausted and with room again — is logged once (`tracing`, `warn`
//!   when a consumer slows down, `info` when it recovers), with the consumer's name. The state,
//!   the budget left and the counts are in [`Host::health`](super::Host::health) and
//!   [`Host::resilience`](super::Host::resilience).
//!
//! # In code
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use redeliver_core::{Consumer, Context, Host, Outcome, Transport, outcome_for_status};
//! use redeliver_core::host::resilience::{CircuitBreaker, Resilience, RetryBudget};
//!
//! async fn call_payments(_: serde_json::Value, _: Context) -> Outcome {
//!     let (status, retry_after) = (503, Some("30")); // from the HTTP response
//!     outcome_for_status(status, retry_after)
//! }
//!
//! async fn run(transport: Arc<dyn Transport>) -> Result<(), redeliver_core::Error> {
//!     let resilience = Resilience::recommended()
//!         .retry_budget(RetryBudget::builder().ratio(0.1).min_retries(5).build()?)
//!         .circuit_breaker(
//!             CircuitBreaker::builder()
//!                 .consecutive_failures(5)
//!                 .cool_down(Duration::from_secs(30))
//!                 .build()?,
//!         );
//!     let host = Host::builder(transport)
//!         .consumer(
//!             Consumer::endpoint("payments")
//!                 .concurrency(16)
//!                 .resilience(resilience)
//!                 .handler(call_payments),
//!         )
//!         .start()
//!         .await?;
//!     println!("{:?}", host.resilience("payments").map(|r| r.snapshot()));
//!     host.shutdown().await;
//!     Ok(())
//! }
//! ```
//!
//! # In configuration
//!
//! Each table turns its mechanism on, with the defaults for what it leaves out:
//!
//! ```toml
//! [consumers.payments]
//! concurrency = 16
//!
//! [consumers.payments.resilience]
//! key_header = "downstream"  # optional: budgets and pauses per value of this header
//! retry_budget = { ratio = 0.1, min_retries = 5, window = "1m", over_budget = "delay" }
//! circuit_breaker = { consecutive_failures = 5, cool_down = "30s" }
//! # or: circuit_breaker = { failure_rate = { rate = 0.5, min_calls = 20, window = "1m" } }
//! throttle = { max_pause = "5m" }
//! ramp_up = { initial = 1, step = 1, every = "1s", decrease = 0.5 }
//! ```
//!
//! A wrong value is an [`Error::Config`](crate::Error::Config) naming its path
//! (`consumers.payments.resilience.retry_budget.ratio`).

mod breaker;
mod budget;
mod config;
mod controller;
mod ramp;
mod throttle;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::message::Message;

pub use breaker::{CircuitBreaker, CircuitBreakerBuilder, FailureRate};
pub use budget::{OverBudget, RetryBudget, RetryBudgetBuilder};
pub use config::{
    CircuitBreakerConfig, FailureRateConfig, RampUpConfig, ResilienceConfig, RetryBudgetConfig,
    ThrottleConfig,
};
pub use ramp::{RampUp, RampUpBuilder};
pub use throttle::Throttle;

pub(crate) use controller::{Controller, Layer};

/// Which mechanisms protect a consumer's downstream; see the [module docs](self). Nothing is on
/// in [`Resilience::new`]; [`Resilience::recommended`] turns every mechanism on with its
/// defaults.
#[must_use]
#[derive(Clone, Default)]
pub struct Resilience {
    retry_budget: Option<RetryBudget>,
    circuit_breaker: Option<CircuitBreaker>,
    throttle: Option<Throttle>,
    ramp_up: Option<RampUp>,
    key: Option<KeyFn>,
}

/// How a message names its key.
#[derive(Clone)]
struct KeyFn(Arc<KeyOf>);

type KeyOf = dyn Fn(&Message) -> Option<String> + Send + Sync;

impl fmt::Debug for Resilience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resilience")
            .field("retry_budget", &self.retry_budget)
            .field("circuit_breaker", &self.circuit_breaker)
            .field("throttle", &self.throttle)
            .field("ramp_up", &self.ramp_up)
            .field("keyed", &self.key.is_some())
            .finish()
    }
}

impl Resilience {
    /// Nothing on yet.
    pub fn new() -> Self {
        Resilience::default()
    }

    /// Every mechanism on, with its defaults: [`RetryBudget::default`],
    /// [`CircuitBreaker::default`], [`Throttle::default`], [`RampUp::default`].
    pub fn recommended() -> Self {
        Resilience::new()
            .retry_budget(RetryBudget::default())
            .circuit_breaker(CircuitBreaker::default())
            .throttle(Throttle::default())
            .ramp_up(RampUp::default())
    }

    /// Limits retries to `budget`.
    pub fn retry_budget(mut self, budget: RetryBudget) -> Self {
        self.retry_budget = Some(budget);
        self
    }

    /// Stops taking deliveries while the downstream fails, as `breaker` says.
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.circuit_breaker = Some(breaker);
        self
    }

    /// Pauses on a downstream's `Retry-After`.
    pub fn throttle(mut self, throttle: Throttle) -> Self {
        self.throttle = Some(throttle);
        self
    }

    /// Grows concurrency back gradually after the circuit closes or a pause ends.
    pub fn ramp_up(mut self, ramp: RampUp) -> Self {
        self.ramp_up = Some(ramp);
        self
    }

    /// Budgets and pauses per key, the one `key` names for each message (`None`: the
    /// consumer's).
    pub fn keyed_by(
        mut self,
        key: impl Fn(&Message) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.key = Some(KeyFn(Arc::new(key)));
        self
    }

    /// Budgets and pauses per value of the header `name`.
    pub fn keyed_by_header(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.keyed_by(move |message| message.headers().get(&name).map(str::to_owned))
    }
}

/// A running consumer's resilience, to watch it ([`Host::resilience`](super::Host::resilience)).
/// Cheap to clone.
#[derive(Clone)]
pub struct ResilienceMonitor {
    controller: Arc<Controller>,
}

impl fmt::Debug for ResilienceMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ResilienceMonitor")
            .field(&self.snapshot())
            .finish()
    }
}

impl ResilienceMonitor {
    pub(super) fn new(controller: Arc<Controller>) -> Self {
        ResilienceMonitor { controller }
    }

    /// The state now.
    pub fn snapshot(&self) -> ResilienceSnapshot {
        self.controller.snapshot()
    }
}

/// A consumer's resilience at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResilienceSnapshot {
    /// The circuit, if the consumer has a breaker.
    pub circuit: Option<CircuitState>,
    /// How long the consumer stays paused by a `Retry-After`, if it is.
    pub throttled_for: Option<Duration>,
    /// How many keys are paused by a `Retry-After`.
    pub throttled_keys: usize,
    /// Handler calls allowed at once now (0 while open or paused, 1 while half-open, growing
    /// during a ramp-up, else the consumer's concurrency).
    pub allowed_concurrency: usize,
    /// Deliveries admitted to the handler and not yet settled.
    pub in_flight: usize,
    /// Retries left in the consumer's budget's window, if it has one (keys' budgets are not
    /// included).
    pub budget_left: Option<u64>,
    /// What it has done so far.
    pub stats: ResilienceStats,
}

/// Where a consumer's circuit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CircuitState {
    /// Deliveries are taken as the concurrency (and a ramp-up) allow.
    Closed,
    /// No delivery is taken for this long yet.
    Open {
        /// Until the cool-down is over.
        remaining: Duration,
    },
    /// One probe delivery at a time.
    HalfOpen,
}

/// Counts of what a consumer's resilience did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResilienceStats {
    /// Retries within the budget.
    pub retries_within_budget: u64,
    /// Retries over budget, delayed.
    pub retries_delayed_over_budget: u64,
    /// Retries over budget, dead-lettered.
    pub retries_dead_lettered_over_budget: u64,
    /// How often the circuit opened (a failed probe opens it again).
    pub circuit_opened: u64,
    /// Probe deliveries handed to the handler while half-open.
    pub probes: u64,
    /// Pauses started by a `Retry-After`, of the consumer or of a key.
    pub throttle_pauses: u64,
    /// Deliveries parked because their key was paused.
    pub parked: u64,
}
