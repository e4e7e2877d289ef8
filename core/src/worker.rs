//! The worker: runs a handler on a source with a concurrency limit and settles every delivery
//! from the handler's [`Outcome`].
//!
//! # What the worker guarantees
//! - **Never early.** The handler is not called before the message's not-before. A delivery that
//!   arrives early is put back (parked) without calling the handler and without counting an
//!   attempt; when it is early by less than the transport's scheduling precision the worker waits
//!   for it instead, since the transport could not do better. A delivery being waited for holds
//!   no handler slot: it waits aside (up to `concurrency` of them; the worker's prefetch grows by
//!   as much on transports that can deliver early), so the messages behind it are handled
//!   meanwhile. When that room is full, the delivery is parked instead.
//! - **Nothing lost.** Every delivery is settled: completed, retried, dead-lettered, discarded on
//!   the handler's request, or abandoned at shutdown. A payload that cannot be decoded is
//!   dead-lettered with reason [`INVALID_PAYLOAD`] (or discarded, if configured) and never
//!   retried; a delivery with malformed framework headers is dead-lettered with reason
//!   [`MALFORMED_HEADERS`]. A handler that panics counts as a retryable failure. If settling fails
//!   (a lost connection), the transport delivers the message again.
//! - **At-least-once, so duplicates are possible**: a handler that finished but whose settlement
//!   did not reach the broker runs again for the same message id. Make handlers idempotent.
//! - **Graceful shutdown.** [`Worker::shutdown`] stops taking deliveries, lets handlers in flight
//!   finish until the shutdown timeout, then abandons the rest, which are delivered again (their
//!   attempt unchanged, since no handler result was recorded).
//! - **Dead-letter handlers.** A worker on [`Source::DeadLetters`] never drops a dead letter that
//!   its handler did not complete or discard: a retry, and anything that would dead-letter again
//!   (a dead-letter outcome, an invalid payload, malformed headers), is rescheduled among the dead
//!   letters after the policy's delay, without the attempt limit. To drop dead letters whose
//!   payload cannot be decoded, use [`InvalidPayload::Discard`].
//!
//! Every delivery is handled inside a `tracing` span named `delivery` with the fields
//! `message_id`, `endpoint`, `attempt` and `outcome`.
//!
//! [`INVALID_PAYLOAD`]: crate::reasons::INVALID_PAYLOAD
//! [`MALFORMED_HEADERS`]: crate::reasons::MALFORMED_HEADERS

use std::any::Any;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex as AsyncMutex, Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::Error;
use crate::clock::{Clock, to_chrono, until};
use crate::handler::{Context, Handler, Outcome, RetryAfter};
use crate::reasons::{INVALID_PAYLOAD, MALFORMED_HEADERS};
use crate::retry::{BackoffPolicy, FailedAttempt, RetryPolicy};
use crate::transport::{ConsumeOptions, Delivery, DeliveryStream, Source, Transport};

/// What the worker does with a message whose body cannot be decoded into the handler's type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidPayload {
    /// Dead-letter it with reason [`INVALID_PAYLOAD`] and the
    /// decoder's error as description.
    #[default]
    DeadLetter,
    /// Drop it, logging the decoder's error.
    Discard,
}

/// Configures and starts a [`Worker`].
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use redeliver_core::{Backoff, BackoffPolicy, Context, InvalidPayload, Outcome, Transport, Worker};
///
/// #[derive(serde::Deserialize)]
/// struct Invoice { id: u64 }
///
/// async fn start(transport: Arc<dyn Transport>) -> Result<Worker, redeliver_core::Error> {
///     Worker::builder(transport, "invoices")
///         .concurrency(4)
///         .retry_policy(
///             BackoffPolicy::builder()
///                 .max_attempts(3)
///                 .backoff(Backoff::fixed(Duration::from_secs(30)))
///                 .build()?,
///         )
///         .on_invalid_payload(InvalidPayload::DeadLetter)
///         .shutdown_timeout(Duration::from_secs(10))
///         .start(|invoice: Invoice, ctx: Context| async move {
///             println!("invoice {} (attempt {})", invoice.id, ctx.attempt());
///             Outcome::success()
///         })
///         .await
/// }
/// ```
#[must_use]
pub struct WorkerBuilder {
    transport: Arc<dyn Transport>,
    source: Source,
    concurrency: usize,
    policy: Arc<dyn RetryPolicy>,
    invalid_payload: InvalidPayload,
    shutdown_timeout: Duration,
}

impl WorkerBuilder {
    /// How many handler calls may run at once (and so how many deliveries are prefetched).
    /// Default 1.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// The retry policy for this source. Default: [`BackoffPolicy::default`].
    pub fn retry_policy(mut self, policy: impl RetryPolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// What to do with payloads that cannot be decoded. Default: dead-letter.
    pub fn on_invalid_payload(mut self, action: InvalidPayload) -> Self {
        self.invalid_payload = action;
        self
    }

    /// How long [`Worker::shutdown`] lets handlers in flight finish before abandoning them.
    /// Default 30 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Starts consuming and handling messages of type `T` with `handler`. Must be called inside
    /// a tokio runtime. Fails if the configuration is invalid or the transport cannot start
    /// consuming (for example, the endpoint does not exist).
    pub async fn start<T, H>(self, handler: H) -> Result<Worker, Error>
    where
        T: DeserializeOwned + Send + 'static,
        H: Handler<T>,
    {
        if self.concurrency == 0 {
            return Err(Error::config("concurrency", "must be at least 1, got 0"));
        }
        if self.policy.max_attempts() == 0 {
            return Err(Error::config(
                "retry_policy.max_attempts",
                "must be at least 1 (it counts every handler call, the first included)",
            ));
        }
        let capabilities = self.transport.capabilities();
        // Deliveries that come early by less than the precision wait aside, outside the handler
        // slots; the transport must be allowed to hand out as many more.
        let waiting_capacity = if capabilities.scheduling_precision.is_zero() {
            0
        } else {
            self.concurrency
        };
        let options = ConsumeOptions::default()
            .with_prefetch(self.concurrency.saturating_add(waiting_capacity));
        let stream = self
            .transport
            .consume(&self.source, options.clone())
            .await?;
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            clock: self.transport.clock(),
            transport: self.transport,
            source: Arc::new(self.source),
            policy: self.policy,
            handler,
            invalid_payload: self.invalid_payload,
            precision: capabilities.scheduling_precision,
            max_delay: capabilities.max_delay,
            stats: Counters::default(),
            waiting: WaitingRoom {
                capacity: waiting_capacity,
                count: AtomicUsize::new(0),
                ready: ready_tx,
                tasks: TaskTracker::new(),
            },
            _payload: PhantomData,
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            Arc::clone(&shared),
            stream,
            ready_rx,
            options,
            self.concurrency,
            self.shutdown_timeout,
            cancel.clone(),
        ));
        let stats: Arc<dyn StatsSource> = shared;
        Ok(Worker {
            cancel,
            task,
            stats,
        })
    }
}

/// A running worker. Dropping it leaves it running until the runtime stops; call
/// [`shutdown`](Worker::shutdown) to stop it gracefully.
///
/// ```
/// use std::sync::Arc;
/// use redeliver_core::{Context, Outcome, Transport, Worker};
///
/// async fn run(transport: Arc<dyn Transport>) -> Result<(), redeliver_core::Error> {
///     let worker = Worker::builder(transport, "orders")
///         .start(|order: serde_json::Value, _: Context| async move {
///             println!("{order}");
///             Outcome::success()
///         })
///         .await?;
///     // ... until the application stops: handlers in flight finish, the rest come back later.
///     let stats = worker.shutdown().await;
///     println!("{} handled, {} retried", stats.handled, stats.retried);
///     Ok(())
/// }
/// ```
pub struct Worker {
    cancel: CancellationToken,
    task: JoinHandle<()>,
    stats: Arc<dyn StatsSource>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A builder for a worker that consumes `source` (an endpoint name, or
    /// [`Source::dead_letters`]) from `transport`.
    pub fn builder(transport: Arc<dyn Transport>, source: impl Into<Source>) -> WorkerBuilder {
        WorkerBuilder {
            transport,
            source: source.into(),
            concurrency: 1,
            policy: Arc::new(BackoffPolicy::default()),
            invalid_payload: InvalidPayload::default(),
            shutdown_timeout: Duration::from_secs(30),
        }
    }

    /// What the worker has done so far.
    pub fn stats(&self) -> WorkerStats {
        self.stats.snapshot()
    }

    /// Stops taking deliveries, waits for handlers in flight up to the shutdown timeout, then
    /// abandons the rest so the transport delivers them again. Returns the final statistics.
    pub async fn shutdown(self) -> WorkerStats {
        self.cancel.cancel();
        if let Err(e) = self.task.await {
            error!(error = %e, "the worker task failed");
        }
        self.stats.snapshot()
    }
}

/// Counts of what a worker did with its deliveries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Deliveries received.
    pub received: u64,
    /// Handler calls made.
    pub handled: u64,
    /// Deliveries completed after a success.
    pub completed: u64,
    /// Retries scheduled.
    pub retried: u64,
    /// Deliveries dead-lettered.
    pub dead_lettered: u64,
    /// Deliveries discarded (handler's request or invalid payload, if so configured).
    pub discarded: u64,
    /// Early deliveries put back without calling the handler.
    pub parked: u64,
    /// Deliveries given back at shutdown.
    pub abandoned: u64,
    /// Settlements that failed (the transport will deliver those messages again).
    pub settle_failures: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    handled: AtomicU64,
    completed: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    discarded: AtomicU64,
    parked: AtomicU64,
    abandoned: AtomicU64,
    settle_failures: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

trait StatsSource: Send + Sync {
    fn snapshot(&self) -> WorkerStats;
}

struct Shared<T, H> {
    transport: Arc<dyn Transport>,
    /// Shared with every handler's [`Context`], so a delivery copies no name.
    source: Arc<Source>,
    policy: Arc<dyn RetryPolicy>,
    handler: H,
    invalid_payload: InvalidPayload,
    clock: Clock,
    precision: Duration,
    max_delay: Option<Duration>,
    stats: Counters,
    waiting: WaitingRoom,
    _payload: PhantomData<fn() -> T>,
}

/// Deliveries that arrived early by less than the transport's precision, waiting for their
/// not-before outside the handler slots. Each waits in a task of its own and then goes back to
/// the lanes through `ready`, ahead of new deliveries.
struct WaitingRoom {
    /// How many may wait at once (0 where the transport is never early).
    capacity: usize,
    /// How many are waiting or ready and not yet taken by a lane.
    count: AtomicUsize,
    ready: mpsc::UnboundedSender<Delivery>,
    tasks: TaskTracker,
}

impl WaitingRoom {
    /// Takes a place, if one is free.
    fn enter(&self) -> bool {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    fn leave(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<T: Send + 'static, H: Send + Sync + 'static> StatsSource for Shared<T, H> {
    fn snapshot(&self) -> WorkerStats {
        let c = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkerStats {
            received: get(&c.received),
            handled: get(&c.handled),
            completed: get(&c.completed),
            retried: get(&c.retried),
            dead_lettered: get(&c.dead_lettered),
            discarded: get(&c.discarded),
            parked: get(&c.parked),
            abandoned: get(&c.abandoned),
            settle_failures: get(&c.settle_failures),
        }
    }
}

/// How a delivery ends up, decided before settling.
enum Disposition {
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
    },
    Park(DateTime<Utc>),
    /// Early by less than the transport's precision: wait aside until the not-before.
    Wait(DateTime<Utc>),
    Abandon,
}

impl Disposition {
    fn name(&self) -> &'static str {
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

/// A one-way flag that tasks can check cheaply (an atomic load, no lock) and wait for.
#[derive(Default)]
struct Signal {
    set: AtomicBool,
    notify: Notify,
}

impl Signal {
    fn fire(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Register before checking, so that a `fire` in between is not missed.
        notified.as_mut().enable();
        if self.is_set() {
            return;
        }
        notified.await;
    }
}

/// Where the lanes take deliveries from, one lane at a time.
struct Intake {
    /// `None` once the worker stops taking.
    stream: Option<DeliveryStream>,
    /// Deliveries back from the waiting room, taken before the stream's.
    ready: mpsc::UnboundedReceiver<Delivery>,
    options: ConsumeOptions,
    backoff: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs `concurrency` lanes, each taking one delivery at a time and handling it, until `cancel`;
/// then stops taking, lets handlers in flight finish until the deadline, and abandons the rest.
///
/// A lane per handler slot, rather than a task per delivery: a lane takes only when its
/// handler is done, so nothing waits unhandled in the worker, and the hot path spawns nothing.
async fn run<T, H>(
    shared: Arc<Shared<T, H>>,
    stream: DeliveryStream,
    ready: mpsc::UnboundedReceiver<Delivery>,
    options: ConsumeOptions,
    concurrency: usize,
    shutdown_timeout: Duration,
    cancel: CancellationToken,
) where
    T: DeserializeOwned + Send + 'static,
    H: Handler<T>,
{
    let stop_taking = Arc::new(Signal::default());
    let hard_stop = Arc::new(Signal::default());
    let intake = Arc::new(AsyncMutex::new(Intake {
        stream: Some(stream),
        ready,
        options,
        backoff: FIRST_BACKOFF,
    }));
    let mut lanes = JoinSet::new();
    for _ in 0..concurrency {
        lanes.spawn(lane(
            Arc::clone(&shared),
            Arc::clone(&intake),
            Arc::clone(&stop_taking),
            Arc::clone(&hard_stop),
        ));
    }

    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            // Lanes end only once taking stops: this would be a bug in the worker.
            Some(done) = lanes.join_next() => report_lane_end(done),
        }
    }

    // Stop taking deliveries, then let handlers in flight finish until the deadline. What waits
    // for its not-before has not started: give it back at once.
    stop_taking.fire();
    let mut back = {
        let mut intake = intake.lock().await;
        intake.stream = None;
        intake.ready.close();
        let mut back = Vec::new();
        while let Ok(delivery) = intake.ready.try_recv() {
            back.push(delivery);
        }
        back
    };
    for delivery in back.drain(..) {
        shared.waiting.leave();
        shared.settle(delivery, Disposition::Abandon).await;
    }
    shared.waiting.tasks.close();
    let deadline = tokio::time::sleep(shutdown_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            done = lanes.join_next() => match done {
                Some(done) => report_lane_end(done),
                None => break,
            },
            _ = &mut deadline, if !hard_stop.is_set() => {
                warn!(source = %shared.source, "shutdown timeout reached; abandoning handlers in flight");
                hard_stop.fire();
            }
        }
    }
    shared.waiting.tasks.wait().await;
}

/// One handler slot: takes a delivery, handles and settles it, and again, until taking stops.
///
/// Lanes take turns at the intake. A lane keeps its turn while its deliveries are handled
/// without waiting (their handler is done at its first poll), so a stream of quick handlers costs
/// no hand-over between tasks; it gives the turn up as soon as a handler waits (another lane
/// takes meanwhile, so `concurrency` handlers can be waiting at once), and before handling when
/// its handlers take long without waiting (so such handlers run in parallel on several threads
/// rather than one after another).
async fn lane<T, H>(
    shared: Arc<Shared<T, H>>,
    intake: Arc<AsyncMutex<Intake>>,
    stop_taking: Arc<Signal>,
    hard_stop: Arc<Signal>,
) where
    T: DeserializeOwned + Send + 'static,
    H: Handler<T>,
{
    /// A handling that takes longer than this without waiting is worth handing the intake over
    /// for (a hand-over costs around a microsecond).
    const LONG_HANDLING: Duration = Duration::from_micros(20);
    /// How often the duration of a handling is sampled (reading the clock costs too).
    const SAMPLE_EVERY: u32 = 8;

    let mut turn = None;
    let mut long_handlings = false;
    let mut handled_count: u32 = 0;
    loop {
        let intake_turn = match turn.as_mut() {
            Some(held) => held,
            None => turn.insert(intake.lock().await),
        };
        let Some((delivery, fresh)) = shared.take(intake_turn, &stop_taking).await else {
            break;
        };
        if long_handlings {
            turn = None;
        }
        let sampled = handled_count
            .is_multiple_of(SAMPLE_EVERY)
            .then(Instant::now);
        handled_count = handled_count.wrapping_add(1);
        // Handler panics are caught around the handler; a panic here is a bug in the worker or
        // the transport. The delivery was dropped, so the transport delivers it again; keep the
        // lane, so the worker keeps its concurrency.
        let handling = AssertUnwindSafe(shared.process(delivery, fresh, &hard_stop)).catch_unwind();
        tokio::pin!(handling);
        let handled = match futures::poll!(handling.as_mut()) {
            Poll::Ready(handled) => {
                if let Some(started) = sampled {
                    long_handlings = started.elapsed() > LONG_HANDLING;
                }
                handled
            }
            Poll::Pending => {
                turn = None;
                handling.await
            }
        };
        match handled {
            Ok(Some((delivery, not_before))) => {
                let room = Arc::clone(&shared);
                let stop = Arc::clone(&stop_taking);
                shared
                    .waiting
                    .tasks
                    .spawn(async move { room.wait_aside(delivery, not_before, &stop).await });
            }
            Ok(None) => {}
            Err(panic) => {
                error!(panic = %panic_text(&*panic), "handling a delivery panicked outside the handler");
            }
        }
        // Nothing above has to wait while deliveries are ready and handlers quick: give the
        // runtime its turn now and then, as any tokio primitive would.
        tokio::task::coop::consume_budget().await;
    }
}

/// Sleeps for `backoff` (doubling it up to `max`), returning `false` if stopped meanwhile.
async fn pause(stop: &Signal, backoff: &mut Duration, max: Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(max);
    tokio::select! {
        _ = stop.wait() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

fn report_lane_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        error!(error = %e, "a worker lane failed");
    }
}

impl<T, H> Shared<T, H>
where
    T: DeserializeOwned + Send + 'static,
    H: Handler<T>,
{
    /// The next delivery from the intake (the caller's turn), and whether it is fresh from the
    /// transport (rather than back from the waiting room), or `None` once taking stops.
    /// Re-opens the consumer if the transport closed it, backing off after errors.
    async fn take(&self, intake: &mut Intake, stop: &Signal) -> Option<(Delivery, bool)> {
        let waits = self.waiting.capacity > 0;
        loop {
            if stop.is_set() {
                return None;
            }
            let stream = intake.stream.as_mut()?;
            // Polled first, so that a ready delivery costs no registration with `stop`.
            let next = tokio::select! {
                biased;
                Some(back) = intake.ready.recv(), if waits => {
                    self.waiting.leave();
                    return Some((back, false));
                }
                next = stream.next() => next,
                _ = stop.wait() => return None,
            };
            match next {
                Some(Ok(delivery)) => {
                    intake.backoff = FIRST_BACKOFF;
                    return Some((delivery, true));
                }
                Some(Err(e)) => {
                    warn!(source = %self.source, error = %e, "the transport reported a consumer error");
                    if !pause(stop, &mut intake.backoff, MAX_BACKOFF).await {
                        return None;
                    }
                }
                None => {
                    // The transport closed the consumer (for example after losing its
                    // connection): open a new one, backing off, until it works or the worker is
                    // shut down.
                    warn!(source = %self.source, "the consumer was closed by the transport; consuming again");
                    intake.stream = None;
                    while intake.stream.is_none() {
                        if !pause(stop, &mut intake.backoff, MAX_BACKOFF).await {
                            return None;
                        }
                        let options = intake.options.clone();
                        match self.transport.consume(&self.source, options).await {
                            Ok(s) => intake.stream = Some(s),
                            Err(e) => {
                                error!(source = %self.source, error = %e, "could not consume again")
                            }
                        }
                    }
                }
            }
        }
    }

    /// Handles and settles `delivery`, or gives it back with its not-before to wait aside for.
    async fn process(
        &self,
        delivery: Delivery,
        fresh: bool,
        hard_stop: &Signal,
    ) -> Option<(Delivery, DateTime<Utc>)> {
        let message = delivery.message();
        let span = info_span!(
            "delivery",
            message_id = %message.id(),
            endpoint = %self.source,
            attempt = message.attempt(),
            outcome = tracing::field::Empty,
        );
        async {
            if fresh {
                bump(&self.stats.received);
            }
            let (delivery, disposition) = self.decide(delivery, hard_stop).await;
            let disposition = match disposition {
                Disposition::Wait(not_before) if self.waiting.enter() => {
                    debug!(%not_before, "arrived early by less than the transport's precision; waiting aside");
                    return Some((delivery, not_before));
                }
                // No room to wait aside: the transport holds it instead.
                Disposition::Wait(not_before) => Disposition::Park(not_before),
                other => self.keep_dead_letters(delivery.message(), other),
            };
            self.settle(delivery, disposition).await;
            None
        }
        .instrument(span)
        .await
    }

    /// Waits for `not_before` holding only the delivery, then hands it back to the lanes; gives
    /// it back to the transport if the worker stops taking meanwhile.
    async fn wait_aside(&self, delivery: Delivery, not_before: DateTime<Utc>, stop: &Signal) {
        tokio::select! {
            _ = self.clock.sleep_until(not_before) => {
                let Err(mpsc::error::SendError(delivery)) = self.waiting.ready.send(delivery) else {
                    return;
                };
                self.waiting.leave();
                self.settle(delivery, Disposition::Abandon).await;
            }
            _ = stop.wait() => {
                self.waiting.leave();
                self.settle(delivery, Disposition::Abandon).await;
            }
        }
    }

    async fn decide(&self, delivery: Delivery, hard_stop: &Signal) -> (Delivery, Disposition) {
        if let Some(problem) = delivery.problem() {
            let disposition = Disposition::DeadLetter {
                reason: MALFORMED_HEADERS.to_owned(),
                description: Some(problem.to_owned()),
            };
            return (delivery, disposition);
        }

        if let Some(not_before) = delivery.message().not_before() {
            let early_by = until(self.clock.now(), not_before);
            if early_by > self.precision {
                return (delivery, Disposition::Park(not_before));
            }
            if !early_by.is_zero() {
                // Early by less than the transport can schedule: wait, but not in a handler slot.
                return (delivery, Disposition::Wait(not_before));
            }
        }

        let payload = match delivery.message().decode::<T>() {
            Ok(payload) => payload,
            Err(e) => {
                let disposition = match self.invalid_payload {
                    InvalidPayload::DeadLetter => Disposition::DeadLetter {
                        reason: INVALID_PAYLOAD.to_owned(),
                        description: Some(e.to_string()),
                    },
                    InvalidPayload::Discard => {
                        Disposition::Discard(format!("{INVALID_PAYLOAD}: {e}"))
                    }
                };
                return (delivery, disposition);
            }
        };

        let context = Context::new(
            Arc::clone(delivery.shared_message()),
            Arc::clone(&self.source),
            self.clock.now(),
        );
        bump(&self.stats.handled);
        let outcome = tokio::select! {
            biased;
            outcome = call(&self.handler, payload, context) => outcome,
            _ = hard_stop.wait() => return (delivery, Disposition::Abandon),
        };
        let disposition = self.disposition(delivery.message(), outcome);
        (delivery, disposition)
    }

    fn disposition(&self, message: &crate::Message, outcome: Outcome) -> Disposition {
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
            } => self.retry_or_give_up(message, reason, retry_after),
        }
    }

    fn retry_or_give_up(
        &self,
        message: &crate::Message,
        reason: String,
        retry_after: Option<RetryAfter>,
    ) -> Disposition {
        let attempt = message.attempt();
        let max_attempts = self.policy.max_attempts();
        if attempt >= max_attempts && !self.source.is_dead_letters() {
            return Disposition::DeadLetter {
                description: Some(format!(
                    "gave up after attempt {attempt} of {max_attempts}; last failure: {reason}"
                )),
                reason,
            };
        }
        let now = self.clock.now();
        let floor = retry_after.map(|r| r.delay_from(now));
        let failed = FailedAttempt::new(attempt)
            .with_previous_delay(message.last_delay())
            .with_retry_after(floor);
        let mut delay = self.policy.delay(&failed).max(floor.unwrap_or_default());
        if let Some(max) = self.max_delay.filter(|max| delay > *max) {
            warn!(
                ?delay,
                ?max,
                "the retry delay exceeds the transport's longest delay; using the longest"
            );
            delay = max;
        }
        Disposition::Retry {
            not_before: now + to_chrono(delay),
            reason,
            delay,
        }
    }

    /// On a dead-letter source there is nowhere further to dead-letter to: a message that would
    /// be dead-lettered (handler's outcome, invalid payload, malformed headers) stays among the
    /// dead letters and is tried again after the policy's delay, without an attempt limit.
    fn keep_dead_letters(&self, message: &crate::Message, disposition: Disposition) -> Disposition {
        match disposition {
            Disposition::DeadLetter { reason, .. } if self.source.is_dead_letters() => {
                warn!(
                    reason,
                    "a dead letter could not be handled; it stays a dead letter and is tried again later"
                );
                self.retry_or_give_up(message, reason, None)
            }
            other => other,
        }
    }

    async fn settle(&self, delivery: Delivery, disposition: Disposition) {
        tracing::Span::current().record("outcome", disposition.name());
        let counter = match &disposition {
            Disposition::Complete => &self.stats.completed,
            Disposition::Discard(_) => &self.stats.discarded,
            Disposition::DeadLetter { .. } => &self.stats.dead_lettered,
            Disposition::Retry { .. } => &self.stats.retried,
            Disposition::Park(_) => &self.stats.parked,
            // Never settled: `process` hands a waiting delivery to the waiting room.
            Disposition::Wait(_) => return,
            Disposition::Abandon => &self.stats.abandoned,
        };
        let result = match disposition {
            Disposition::Complete => delivery.complete().await,
            Disposition::Discard(reason) => {
                info!(reason, "discarded");
                delivery.complete().await
            }
            Disposition::DeadLetter {
                reason,
                description,
            } => {
                warn!(reason, description, "dead-lettered");
                delivery.dead_letter(reason, description).await
            }
            Disposition::Retry {
                not_before,
                reason,
                delay,
            } => {
                info!(reason, %not_before, ?delay, "retry scheduled");
                delivery.retry(not_before, reason, delay).await
            }
            Disposition::Park(not_before) => {
                debug!(%not_before, "arrived before its not-before; parked again");
                delivery.park(not_before).await
            }
            Disposition::Abandon | Disposition::Wait(_) => delivery.abandon().await,
        };
        match result {
            Ok(()) => bump(counter),
            Err(e) => {
                bump(&self.stats.settle_failures);
                error!(error = %e, "could not settle the delivery; the transport will deliver it again");
            }
        }
    }
}

/// Calls the handler, turning a panic (while creating or polling its future) into a retry.
async fn call<T, H: Handler<T>>(handler: &H, payload: T, context: Context) -> Outcome {
    let future =
        match std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle(payload, context))) {
            Ok(future) => future,
            Err(panic) => return panicked(panic),
        };
    match AssertUnwindSafe(future).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(panic) => panicked(panic),
    }
}

fn panicked(panic: Box<dyn Any + Send>) -> Outcome {
    let text = panic_text(&*panic);
    error!(panic = %text, "the handler panicked; the message will be retried");
    Outcome::retry(format!("handler panicked: {text}"))
}

fn panic_text(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic payload".to_owned())
}
