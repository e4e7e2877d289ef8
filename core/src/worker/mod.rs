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
//! [`Outcome`]: crate::Outcome
//! [`MALFORMED_HEADERS`]: crate::reasons::MALFORMED_HEADERS

pub mod admission;
mod decide;
mod handling;
mod lanes;
mod signal;
mod stats;
mod waiting_room;

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::Error;
use crate::handler::Handler;
use crate::payload::Payload;
use crate::retry::{BackoffPolicy, RetryPolicy};
use crate::transport::{ConsumeOptions, Source, Transport};

use admission::Admission;
use decide::Rules;
use handling::Shared;
use stats::{Control, StatsSource};
use waiting_room::WaitingRoom;

/// What the worker does with a message whose body cannot be decoded into the handler's type.
/// In configuration: `dead-letter` or `discard`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum InvalidPayload {
    /// Dead-letter it with reason [`INVALID_PAYLOAD`](crate::reasons::INVALID_PAYLOAD) and the
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
pub struct WorkerBuilder<S = ()> {
    state: Arc<S>,
    transport: Arc<dyn Transport>,
    source: Source,
    concurrency: usize,
    policy: Arc<dyn RetryPolicy>,
    invalid_payload: InvalidPayload,
    shutdown_timeout: Duration,
    admission: Option<Arc<dyn Admission>>,
}

impl<S: Send + Sync + 'static> WorkerBuilder<S> {
    /// The application state handed to every handler call ([`Context::state`]): one value,
    /// shared, never copied per message. Default: none (`()`).
    ///
    /// [`Context::state`]: crate::Context::state
    pub fn state<S2: Send + Sync + 'static>(self, state: S2) -> WorkerBuilder<S2> {
        self.shared_state(Arc::new(state))
    }

    /// Like [`state`](WorkerBuilder::state), with a state that is already shared.
    pub fn shared_state<S2: Send + Sync + 'static>(self, state: Arc<S2>) -> WorkerBuilder<S2> {
        WorkerBuilder {
            state,
            transport: self.transport,
            source: self.source,
            concurrency: self.concurrency,
            policy: self.policy,
            invalid_payload: self.invalid_payload,
            shutdown_timeout: self.shutdown_timeout,
            admission: self.admission,
        }
    }

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

    /// Like [`retry_policy`](WorkerBuilder::retry_policy), with a policy that is already shared.
    pub fn shared_retry_policy(mut self, policy: Arc<dyn RetryPolicy>) -> Self {
        self.policy = policy;
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

    /// How many deliveries may be handled at once right now, below the concurrency (see
    /// [`admission`]). Default: none, the concurrency alone.
    pub fn admission(mut self, admission: Arc<dyn Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    /// Starts consuming and handling messages of type `T` with `handler`. Must be called inside
    /// a tokio runtime. Fails if the configuration is invalid or the transport cannot start
    /// consuming (for example, the endpoint does not exist).
    pub async fn start<T, H>(self, handler: H) -> Result<Worker, Error>
    where
        T: Payload,
        H: Handler<T, S>,
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
        let telemetry =
            crate::telemetry::WorkerTelemetry::new(capabilities.messaging_system, &self.source);
        let control = Arc::new(Control::new());
        let shared = Arc::new(Shared {
            control: Arc::clone(&control),
            state: self.state,
            clock: self.transport.clock(),
            transport: self.transport,
            rules: Rules {
                policy: self.policy,
                precision: capabilities.scheduling_precision,
                max_delay: capabilities.max_delay,
                dead_letters: self.source.is_dead_letters(),
            },
            source: Arc::new(self.source),
            handler,
            invalid_payload: self.invalid_payload,
            stats: Default::default(),
            waiting: WaitingRoom::new(waiting_capacity, ready_tx),
            telemetry,
            _payload: PhantomData,
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(lanes::run(
            Arc::clone(&shared),
            stream,
            ready_rx,
            options,
            lanes::Capacity {
                lanes: self.concurrency,
                admission: self.admission,
            },
            self.shutdown_timeout,
            cancel.clone(),
        ));
        let source = Arc::clone(&shared.source);
        let stats: Arc<dyn StatsSource> = shared;
        Ok(Worker {
            source,
            cancel,
            task,
            stats,
            control,
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
    source: Arc<Source>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
    stats: Arc<dyn StatsSource>,
    control: Arc<Control>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("source", &self.source)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A builder for a worker that consumes `source` (an endpoint name, or
    /// [`Source::dead_letters`]) from `transport`.
    pub fn builder(transport: Arc<dyn Transport>, source: impl Into<Source>) -> WorkerBuilder {
        WorkerBuilder {
            state: Arc::new(()),
            transport,
            source: source.into(),
            concurrency: 1,
            policy: Arc::new(BackoffPolicy::default()),
            invalid_payload: InvalidPayload::default(),
            shutdown_timeout: Duration::from_secs(30),
            admission: None,
        }
    }

    /// What the worker has done so far.
    pub fn stats(&self) -> WorkerStats {
        self.stats.snapshot()
    }

    /// What the worker consumes.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Stops taking deliveries until [`resume`](Worker::resume); handlers in flight finish.
    /// What the transport already handed over stays unhandled and unsettled meanwhile (a
    /// broker redelivers it if the connection goes away).
    pub fn pause(&self) {
        self.control.set_paused(true);
    }

    /// Takes deliveries again after [`pause`](Worker::pause).
    pub fn resume(&self) {
        self.control.set_paused(false);
    }

    /// Whether the worker is paused.
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Whether the worker's consumer is open: false from a consumer error or close until the
    /// worker has consumed again (for health checks).
    pub fn is_consuming(&self) -> bool {
        self.control.is_consuming()
    }

    /// Starts a graceful shutdown without waiting for it (used when an owner is dropped).
    pub(crate) fn stop(&self) {
        self.cancel.cancel();
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
