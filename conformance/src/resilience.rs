//! Resilience scenarios (see `redeliver_core::host::resilience`): a downstream outage behind a
//! circuit breaker and a retry budget, and `Retry-After` pauses of a consumer and of a key.
//! They are part of [`conformance_tests!`](crate::conformance_tests) (re-exported from
//! [`scenarios`](crate::scenarios)) and assert what every transport must keep:
//! no handler call while the circuit is open, one call at a time while it is half-open, no
//! call during a pause, nothing lost and nothing dead-lettered.
//!
//! [`Downstream`] is the service the handlers call: it fails for a while, or answers one call
//! with `429` and a `Retry-After`, and records every call with the circuit's state at its
//! start. Tests of an application's own resilience settings can use it too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redeliver_core::host::resilience::{
    CircuitBreaker, CircuitState, OverBudget, RampUp, Resilience, ResilienceMonitor,
    ResilienceSnapshot, RetryBudget, Throttle,
};
use redeliver_core::{
    Backoff, BackoffPolicy, Consumer, Context, Host, Jitter, Message, Outcome, Topology, Transport,
    WorkerStats, outcome_for_status,
};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::probe::expect_within;
use crate::{Factory, Timing};

/// What the [`Downstream`] answered a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Answer {
    /// 200: the call worked.
    Ok,
    /// 503 without a `Retry-After`: a transient failure.
    Unavailable,
    /// 429 with a `Retry-After` of this many seconds.
    Throttled(u64),
}

/// One call to the [`Downstream`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DownstreamCall {
    /// When the call started, since the downstream was made.
    pub started: Duration,
    /// When it was answered.
    pub ended: Duration,
    /// The message's attempt.
    pub attempt: u32,
    /// The message's key (the downstream's key header), if any.
    pub key: Option<String>,
    /// The consumer's circuit when the call started, once [`Downstream::watch`] was called.
    pub circuit: Option<CircuitState>,
    /// Calls under way when it started, itself included.
    pub in_flight: usize,
    /// The delay before this attempt, on a retry.
    pub last_delay: Option<Duration>,
    /// What the downstream answered.
    pub answer: Answer,
}

/// A downstream service for resilience tests: answers after a latency, fails with 503 for
/// calls that start during an outage, answers one call with 429 and a `Retry-After`, and
/// records every call. Cheap to clone; clones share the record.
#[derive(Clone)]
pub struct Downstream {
    inner: Arc<Inner>,
}

struct Inner {
    origin: Instant,
    latency: Duration,
    outage: Duration,
    key_header: Option<String>,
    throttle: Mutex<Option<ThrottleOnce>>,
    monitor: OnceLock<ResilienceMonitor>,
    calls: Mutex<Vec<DownstreamCall>>,
    in_flight: AtomicUsize,
    successes: watch::Sender<usize>,
}

struct ThrottleOnce {
    key: Option<String>,
    retry_after: u64,
    answer_in: Duration,
}

impl Downstream {
    /// A healthy downstream answering every call after `latency`. Times are measured from now.
    pub fn new(latency: Duration) -> Self {
        Downstream {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                latency,
                outage: Duration::ZERO,
                key_header: None,
                throttle: Mutex::new(None),
                monitor: OnceLock::new(),
                calls: Mutex::new(Vec::new()),
                in_flight: AtomicUsize::new(0),
                successes: watch::Sender::new(0),
            }),
        }
    }

    fn change(mut self, change: impl FnOnce(&mut Inner)) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("configured before it is shared");
        change(inner);
        self
    }

    /// Calls that start within `outage` of the downstream's creation fail with 503.
    #[must_use]
    pub fn failing_for(self, outage: Duration) -> Self {
        self.change(|inner| inner.outage = outage)
    }

    /// The first call (of messages whose key is `key`, if given) is answered after `answer_in`
    /// with 429 and `Retry-After: <retry_after>`.
    #[must_use]
    pub fn throttling_once(self, key: Option<&str>, retry_after: u64, answer_in: Duration) -> Self {
        let throttle = ThrottleOnce {
            key: key.map(str::to_owned),
            retry_after,
            answer_in,
        };
        self.change(|inner| inner.throttle = Mutex::new(Some(throttle)))
    }

    /// A message's key is the value of its header `name`.
    #[must_use]
    pub fn keyed_by_header(self, name: &str) -> Self {
        self.change(|inner| inner.key_header = Some(name.to_owned()))
    }

    /// Records the consumer's circuit at the start of every call from now on.
    pub fn watch(&self, monitor: ResilienceMonitor) {
        let _ = self.inner.monitor.set(monitor);
    }

    /// When the downstream was made: the origin of the calls' times.
    pub fn origin(&self) -> Instant {
        self.inner.origin
    }

    /// Calls the downstream for the message of `ctx`, as a handler would, and returns the
    /// outcome of its HTTP status ([`outcome_for_status`]).
    pub async fn call<S>(&self, ctx: &Context<S>) -> Outcome {
        let inner = &*self.inner;
        let started = inner.origin.elapsed();
        let circuit = inner.monitor.get().and_then(|m| m.snapshot().circuit);
        let in_flight = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        // Counted down even if the call is given up half-way (a time-out, a shutdown).
        let _under_way = UnderWay(&inner.in_flight);
        let key = inner
            .key_header
            .as_deref()
            .and_then(|h| ctx.headers().get(h))
            .map(str::to_owned);
        let throttle = {
            let mut throttle = inner.throttle.lock().unwrap_or_else(|p| p.into_inner());
            match &*throttle {
                Some(t) if t.key.is_none() || t.key == key => throttle.take(),
                _ => None,
            }
        };
        let (answer, wait) = match throttle {
            Some(t) => (Answer::Throttled(t.retry_after), t.answer_in),
            None if started < inner.outage => (Answer::Unavailable, inner.latency),
            None => (Answer::Ok, inner.latency),
        };
        tokio::time::sleep(wait).await;
        let call = DownstreamCall {
            started,
            ended: inner.origin.elapsed(),
            attempt: ctx.attempt(),
            key,
            circuit,
            in_flight,
            last_delay: ctx.message().last_delay(),
            answer,
        };
        inner
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call);
        match answer {
            Answer::Ok => {
                inner.successes.send_modify(|n| *n += 1);
                Outcome::success()
            }
            Answer::Unavailable => outcome_for_status(503, None),
            Answer::Throttled(seconds) => outcome_for_status(429, Some(&seconds.to_string())),
        }
    }

    /// Every call answered so far, in the order they started.
    pub fn calls(&self) -> Vec<DownstreamCall> {
        let mut calls = self
            .inner
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        calls.sort_by_key(|c| c.started);
        calls
    }

    /// Calls answered with 200 so far.
    pub fn successes(&self) -> usize {
        *self.inner.successes.borrow()
    }

    /// Waits until `n` calls were answered with 200.
    ///
    /// # Panics
    /// After `patience` without them.
    pub async fn wait_for_successes(&self, n: usize, patience: Duration) {
        let mut successes = self.inner.successes.subscribe();
        let reached = successes.wait_for(|count| *count >= n);
        expect_within(
            patience,
            &format!("{n} successful downstream calls"),
            reached,
        )
        .await
        .expect("the downstream outlives its waiters");
    }
}

struct UnderWay<'a>(&'a AtomicUsize);

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A name no other scenario or run uses.
fn unique(base: &str) -> String {
    let suffix: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(8)
        .collect::<String>()
        .to_lowercase();
    format!("resilience-{base}-{suffix}")
}

/// One scenario's transport and topology.
struct Stage<'f> {
    factory: &'f dyn Factory,
    topology: Topology,
    transport: Arc<dyn Transport>,
    timing: Timing,
}

impl<'f> Stage<'f> {
    async fn new(factory: &'f dyn Factory, endpoint: &str) -> Option<Self> {
        let timing = factory.timing();
        let available = expect_within(
            timing.patience,
            "the factory tell whether the broker is available (Factory::available)",
            factory.available(),
        )
        .await;
        if !available {
            return None;
        }
        let topology = Topology::new().endpoint(endpoint);
        let transport = expect_within(
            timing.patience,
            "the factory make a transport (Factory::create)",
            factory.create(&topology),
        )
        .await
        .expect("the factory makes a transport");
        Some(Stage {
            factory,
            topology,
            transport,
            timing,
        })
    }

    /// Starts a host with one consumer of `endpoint` calling `downstream`, and watches it.
    async fn host(
        &self,
        endpoint: &str,
        concurrency: usize,
        resilience: Resilience,
        downstream: &Downstream,
    ) -> Host {
        let policy = BackoffPolicy::builder()
            .max_attempts(20)
            .backoff(Backoff::fixed(self.timing.unit))
            .jitter(Jitter::None)
            .build()
            .expect("a valid policy");
        let called = downstream.clone();
        let consumer = Consumer::endpoint(endpoint)
            .concurrency(concurrency)
            .retry_policy(policy)
            .resilience(resilience)
            .handler(move |_: u32, ctx: Context| {
                let downstream = called.clone();
                async move { downstream.call(&ctx).await }
            });
        let started = Host::builder(Arc::clone(&self.transport))
            .shutdown_timeout(self.timing.unit)
            .consumer(consumer)
            .start();
        let host = expect_within(self.timing.patience, "the host start", started)
            .await
            .expect("the host starts");
        downstream.watch(
            host.resilience(endpoint)
                .expect("the consumer has resilience"),
        );
        host
    }

    async fn send(&self, endpoint: &str, messages: impl IntoIterator<Item = Message>) {
        for message in messages {
            expect_within(
                self.timing.patience,
                "the transport accept a message",
                self.transport.send(endpoint, message),
            )
            .await
            .expect("the transport accepts the message");
        }
    }

    async fn stop(&self, host: Host) -> WorkerStats {
        let stopped = expect_within(
            self.timing.unit + self.timing.patience,
            "the host shut down",
            host.shutdown(),
        )
        .await;
        stopped.into_iter().next().expect("one consumer").1
    }

    async fn finish(self) {
        let removed = expect_within(
            self.timing.patience * 3,
            "the factory remove the scenario's topology",
            self.factory.remove(&self.topology),
        )
        .await;
        if let Err(e) = removed {
            eprintln!("conformance: could not remove the scenario's topology: {e}");
        }
    }
}

fn numbered(n: u32) -> impl Iterator<Item = Message> {
    (0..n).map(|i| Message::json(&i).expect("a number serializes"))
}

fn snapshot(host: &Host, endpoint: &str) -> ResilienceSnapshot {
    host.resilience(endpoint)
        .expect("the consumer has resilience")
        .snapshot()
}

/// A downstream fails for six delay units, then recovers; 24 messages, concurrency 3, a
/// breaker opening after 3 consecutive failures for 2 units, a retry budget: no handler call
/// while the circuit is open, one at a time while half-open, few calls during the outage,
/// every message completed after it, nothing dead-lettered.
pub async fn outage_then_recovery(factory: &dyn Factory) {
    const MESSAGES: u32 = 24;
    const CONCURRENCY: usize = 3;
    const CONSECUTIVE: u32 = 3;
    let endpoint = unique("outage");
    let Some(stage) = Stage::new(factory, &endpoint).await else {
        return;
    };
    let unit = stage.timing.unit;
    let outage = unit * 6;
    let cool_down = unit * 2;
    let window = unit * 10;
    let resilience = Resilience::new()
        .circuit_breaker(
            CircuitBreaker::builder()
                .consecutive_failures(CONSECUTIVE)
                .cool_down(cool_down)
                .build()
                .expect("a valid breaker"),
        )
        .retry_budget(
            RetryBudget::builder()
                .ratio(0.1)
                .min_retries(4)
                .window(window)
                .over_budget(OverBudget::Delay)
                .build()
                .expect("a valid budget"),
        )
        .ramp_up(
            RampUp::builder()
                .every(unit / 4)
                .build()
                .expect("a valid ramp"),
        );
    let downstream = Downstream::new(unit / 10).failing_for(outage);
    let host = stage
        .host(&endpoint, CONCURRENCY, resilience, &downstream)
        .await;
    stage.send(&endpoint, numbered(MESSAGES)).await;

    // Retries over budget wait a window or two.
    let patience = stage.timing.patience + outage + window * 2;
    downstream
        .wait_for_successes(MESSAGES as usize, patience)
        .await;
    let after = snapshot(&host, &endpoint);
    let stats = stage.stop(host).await;
    let calls = downstream.calls();

    assert_eq!(
        (stats.completed, stats.dead_lettered),
        (u64::from(MESSAGES), 0),
        "every message completed, none dead-lettered: {stats:?}"
    );
    assert_eq!(downstream.successes(), MESSAGES as usize);
    let open: Vec<_> = calls
        .iter()
        .filter(|c| matches!(c.circuit, Some(CircuitState::Open { .. })))
        .collect();
    assert!(open.is_empty(), "handler calls while open: {open:?}");
    let crowded: Vec<_> = calls
        .iter()
        .filter(|c| c.circuit == Some(CircuitState::HalfOpen) && c.in_flight != 1)
        .collect();
    assert!(crowded.is_empty(), "half-open calls not alone: {crowded:?}");
    let during: Vec<_> = calls.iter().filter(|c| c.started < outage).collect();
    let closed_during = during
        .iter()
        .filter(|c| c.circuit == Some(CircuitState::Closed))
        .count();
    let probes_during = during.len() - closed_during;
    // The failure that opens it is the last of `CONSECUTIVE`; at most the other lanes' calls
    // are under way then.
    assert!(
        closed_during < CONSECUTIVE as usize + CONCURRENCY,
        "{closed_during} calls before the circuit opened: {during:?}"
    );
    let most_probes = (outage.as_millis() / cool_down.as_millis()) as usize + 1;
    assert!(
        (1..=most_probes).contains(&probes_during),
        "{probes_during} probes during an outage of {outage:?} with a cool-down of {cool_down:?}"
    );
    assert!(after.stats.circuit_opened >= 1, "{after:?}");
    assert_eq!(after.circuit, Some(CircuitState::Closed), "{after:?}");
    assert_eq!(
        after.stats.retries_within_budget + after.stats.retries_delayed_over_budget,
        stats.retried,
        "every retry went through the budget: {after:?}, {stats:?}"
    );
    stage.finish().await;
}

/// The first call is answered 429 with `Retry-After: 2`: no handler call starts for the next
/// 2 s, then every message is completed.
pub async fn retry_after_pauses_the_consumer(factory: &dyn Factory) {
    const MESSAGES: u32 = 9;
    const RETRY_AFTER: u64 = 2;
    let endpoint = unique("retry-after");
    let Some(stage) = Stage::new(factory, &endpoint).await else {
        return;
    };
    let unit = stage.timing.unit;
    // Quick to throttle, slow to work: the calls under way end after the throttle is known.
    let downstream = Downstream::new(unit * 3 / 10).throttling_once(None, RETRY_AFTER, unit / 50);
    let resilience = Resilience::new()
        .throttle(Throttle::default())
        .ramp_up(RampUp::default());
    let host = stage.host(&endpoint, 3, resilience, &downstream).await;
    stage.send(&endpoint, numbered(MESSAGES)).await;

    let pause = Duration::from_secs(RETRY_AFTER);
    downstream
        .wait_for_successes(MESSAGES as usize, stage.timing.patience + pause)
        .await;
    let after = snapshot(&host, &endpoint);
    let stats = stage.stop(host).await;
    let calls = downstream.calls();

    assert_eq!(
        (stats.completed, stats.dead_lettered),
        (u64::from(MESSAGES), 0)
    );
    let throttled: Vec<_> = calls
        .iter()
        .filter(|c| matches!(c.answer, Answer::Throttled(_)))
        .collect();
    assert_eq!(throttled.len(), 1, "{calls:?}");
    let answered = throttled[0].ended;
    let in_pause: Vec<_> = calls
        .iter()
        .filter(|c| c.started > answered && c.started < answered + pause)
        .collect();
    assert!(
        in_pause.is_empty(),
        "calls during the pause of {pause:?} from {answered:?}: {in_pause:?}"
    );
    assert!(
        calls.iter().any(|c| c.started >= answered + pause),
        "calls resumed after the pause: {calls:?}"
    );
    assert_eq!(after.stats.throttle_pauses, 1, "{after:?}");
    stage.finish().await;
}

/// Messages of keys `a` and `b`; the first call for `a` is answered 429 with `Retry-After: 2`:
/// no call for `a` starts for 2 s while `b`'s go on; every message is completed.
pub async fn a_throttled_key_is_put_off(factory: &dyn Factory) {
    const PER_KEY: u32 = 6;
    const RETRY_AFTER: u64 = 2;
    let endpoint = unique("throttled-key");
    let Some(stage) = Stage::new(factory, &endpoint).await else {
        return;
    };
    let unit = stage.timing.unit;
    let downstream = Downstream::new(unit / 10)
        .keyed_by_header("downstream")
        .throttling_once(Some("a"), RETRY_AFTER, unit / 50);
    let resilience = Resilience::new()
        .throttle(Throttle::default())
        .keyed_by_header("downstream");
    let host = stage.host(&endpoint, 2, resilience, &downstream).await;
    let messages = (0..PER_KEY * 2).map(|i| {
        let key = if i % 2 == 0 { "a" } else { "b" };
        Message::json(&i)
            .expect("a number serializes")
            .with_header("downstream", key)
    });
    stage.send(&endpoint, messages).await;

    let pause = Duration::from_secs(RETRY_AFTER);
    downstream
        .wait_for_successes((PER_KEY * 2) as usize, stage.timing.patience + pause)
        .await;
    let after = snapshot(&host, &endpoint);
    let stats = stage.stop(host).await;
    let calls = downstream.calls();

    assert_eq!(
        (stats.completed, stats.dead_lettered),
        (u64::from(PER_KEY * 2), 0)
    );
    let throttled: Vec<_> = calls
        .iter()
        .filter(|c| matches!(c.answer, Answer::Throttled(_)))
        .collect();
    assert_eq!(throttled.len(), 1, "{calls:?}");
    let answered = throttled[0].ended;
    let during = |key: &str| {
        calls
            .iter()
            .filter(|c| c.key.as_deref() == Some(key))
            .filter(|c| c.started > answered && c.started < answered + pause)
            .count()
    };
    assert_eq!(during("a"), 0, "calls of the paused key: {calls:?}");
    assert!(during("b") >= 1, "the other key went on: {calls:?}");
    assert!(after.stats.parked >= 1, "{after:?}");
    assert!(
        stats.parked >= after.stats.parked,
        "every delivery put off was parked: {stats:?}, {after:?}"
    );
    stage.finish().await;
}
