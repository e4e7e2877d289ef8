//! The application host: many typed consumers on one transport, started, watched and stopped
//! together.
//!
//! A [`Host`] is built from [`Consumer`]s — an endpoint, a topic subscription or an endpoint's
//! dead letters, each with its handler, concurrency, retry policy and handler time-out — and an
//! application state every handler shares. [`start`](HostBuilder::start) declares the topology
//! the consumers need (every endpoint, every subscription: no name is written twice) and starts
//! a [`Worker`] per consumer; [`shutdown`](Host::shutdown) stops them all with one deadline.
//! Dropping a host without shutting it down stops its consumers too, without waiting for them:
//! handlers in flight finish in the background, and what was not handled is delivered again.
//!
//! - [`middleware`]: code around every handler call, per consumer or for the whole host
//!   ([`Timeout`], [`ConcurrencyLimit`] for
//!   [`HostBuilder::max_concurrency`]).
//! - [`Routes`]: several message types on one endpoint, by the `message-type` header.
//! - [`HostConfig`]: consumer settings and retry policies from a configuration file, applied
//!   with [`HostBuilder::configure`]; a bad value names its path.
//! - [`Host::health`], [`Host::pause`] / [`Host::resume`]: for probes and operators.
//! - [`resilience`]: retry budgets, circuit breaking, throttle-aware pausing and ramp-up per
//!   consumer, against retry storms ([`ConsumerSettings::resilience`]).
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use redeliver_core::{Consumer, Context, Failure, Host, Message, Transport};
//!
//! struct App { tax_rate: f64 }
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct OrderPlaced { order_id: u64, amount: f64 }
//!
//! async fn on_order(order: OrderPlaced, ctx: Context<App>) -> Result<(), Failure> {
//!     let total = order.amount * (1.0 + ctx.state().tax_rate);
//!     ctx.send("invoices", Message::json(&total)?).await?; // correlated with the order
//!     Ok(())
//! }
//!
//! async fn on_invoice(_total: f64, _: Context<App>) -> Result<(), Failure> {
//!     Ok(())
//! }
//!
//! async fn run(transport: Arc<dyn Transport>) -> Result<(), redeliver_core::Error> {
//!     let host = Host::with_state(transport, App { tax_rate: 0.2 })
//!         .consumer(Consumer::subscription("orders", "billing").concurrency(8).handler(on_order))
//!         .consumer(
//!             Consumer::endpoint("invoices")
//!                 .timeout(Duration::from_secs(30))
//!                 .handler(on_invoice),
//!         )
//!         .start()
//!         .await?;
//!     host.run_until_signal().await; // Ctrl-C or SIGTERM, then a graceful shutdown
//!     Ok(())
//! }
//! ```

mod config;
pub mod middleware;
pub mod resilience;
mod routes;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use crate::Error;
use crate::handler::Handler;
use crate::payload::Payload;
use crate::retry::{BackoffPolicy, RetryPolicy};
use crate::transport::{Source, Topology, Transport};
use crate::worker::{InvalidPayload, Worker, WorkerBuilder, WorkerStats};

pub use config::{BackoffConfig, ConsumerConfig, HostConfig, RetryConfig};
use middleware::{ConcurrencyLimit, Layered, Middleware, Timeout};
use resilience::{Resilience, ResilienceMonitor, ResilienceSnapshot};
pub use routes::Routes;

type Starting = Pin<Box<dyn Future<Output = Result<Worker, Error>> + Send>>;
/// Starts a consumer's worker, given the builder and the host's layers.
type Start<S> = Box<dyn FnOnce(WorkerBuilder<S>, Vec<Arc<dyn Middleware<S>>>) -> Starting + Send>;

/// One consumer of a [`Host`]: what it consumes, how, and its handler.
pub struct Consumer<S = ()> {
    settings: ConsumerSettings,
    layers: Vec<Arc<dyn Middleware<S>>>,
    start: Start<S>,
}

impl<S> fmt::Debug for Consumer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A consumer's settings before its handler is given; see [`Consumer::endpoint`].
#[must_use]
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    source: Source,
    topic: Option<String>,
    concurrency: usize,
    policy: Option<Arc<dyn RetryPolicy>>,
    timeout: Option<Duration>,
    invalid_payload: InvalidPayload,
    resilience: Option<Resilience>,
}

impl Consumer {
    /// A consumer of `endpoint`'s queue.
    pub fn endpoint(endpoint: impl Into<String>) -> ConsumerSettings {
        ConsumerSettings::new(Source::endpoint(endpoint), None)
    }

    /// A consumer of `endpoint`, subscribed to `topic`.
    pub fn subscription(topic: impl Into<String>, endpoint: impl Into<String>) -> ConsumerSettings {
        ConsumerSettings::new(Source::endpoint(endpoint), Some(topic.into()))
    }

    /// A consumer of `endpoint`'s dead letters.
    pub fn dead_letters(endpoint: impl Into<String>) -> ConsumerSettings {
        ConsumerSettings::new(Source::dead_letters(endpoint), None)
    }
}

impl ConsumerSettings {
    /// The consumer's name in configuration: its endpoint, or `<endpoint>.dead-letters`.
    pub fn name(&self) -> String {
        match &self.source {
            Source::Endpoint(endpoint) => endpoint.clone(),
            Source::DeadLetters(endpoint) => format!("{endpoint}.dead-letters"),
        }
    }

    fn new(source: Source, topic: Option<String>) -> Self {
        ConsumerSettings {
            source,
            topic,
            concurrency: 1,
            policy: None,
            timeout: None,
            invalid_payload: InvalidPayload::default(),
            resilience: None,
        }
    }

    /// How many handler calls of this consumer may run at once. Default 1.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// This consumer's retry policy. Default: the worker's default policy.
    pub fn retry_policy(mut self, policy: impl RetryPolicy) -> Self {
        self.policy = Some(Arc::new(policy));
        self
    }

    /// A handler call that takes longer than `timeout` is stopped and the message retried with
    /// the reason `handler timed out after ...` (the [`Timeout`] layer, innermost). Default: no
    /// time-out.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// What to do with payloads that cannot be decoded. Default: dead-letter.
    pub fn on_invalid_payload(mut self, action: InvalidPayload) -> Self {
        self.invalid_payload = action;
        self
    }

    /// Protects this consumer's downstream with `resilience`: a retry budget, a circuit
    /// breaker, throttle-aware pausing, ramp-up (see [`resilience`]). Default: none.
    pub fn resilience(mut self, resilience: Resilience) -> Self {
        self.resilience = Some(resilience);
        self
    }

    /// The consumer, handling messages of type `T` with `handler`.
    pub fn handler<T, S, H>(self, handler: H) -> Consumer<S>
    where
        T: Payload,
        S: Send + Sync + 'static,
        H: Handler<T, S>,
    {
        let start: Start<S> = Box::new(move |builder: WorkerBuilder<S>, layers| {
            Box::pin(async move {
                if layers.is_empty() {
                    builder.start(handler).await
                } else {
                    let layers = layers.into();
                    builder.start(Layered { handler, layers }).await
                }
            }) as Starting
        });
        Consumer {
            settings: self,
            layers: Vec::new(),
            start,
        }
    }
}

impl ConsumerSettings {
    /// The consumer, handing each message to the route of its message type.
    pub fn routes<S: Send + Sync + 'static>(self, routes: Routes<S>) -> Consumer<S> {
        self.handler::<crate::payload::RawBody, S, Routes<S>>(routes)
    }
}

impl<S: Send + Sync + 'static> Consumer<S> {
    /// Runs `layer` around this consumer's handler calls, inside the host's layers.
    #[must_use]
    pub fn layer(mut self, layer: impl Middleware<S>) -> Self {
        self.layers.push(Arc::new(layer));
        self
    }
}

/// Builds a [`Host`]; see the [module docs](self).
#[must_use]
pub struct HostBuilder<S = ()> {
    transport: Arc<dyn Transport>,
    state: Arc<S>,
    consumers: Vec<Consumer<S>>,
    layers: Vec<Arc<dyn Middleware<S>>>,
    shutdown_timeout: Duration,
}

impl<S> fmt::Debug for HostBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostBuilder")
            .field("transport", &self.transport)
            .field("consumers", &self.consumers)
            .finish_non_exhaustive()
    }
}

impl<S: Send + Sync + 'static> HostBuilder<S> {
    /// Adds a consumer.
    pub fn consumer(mut self, consumer: Consumer<S>) -> Self {
        self.consumers.push(consumer);
        self
    }

    /// Runs `layer` around the handler calls of every consumer (outside each consumer's own
    /// layers).
    pub fn layer(mut self, layer: impl Middleware<S>) -> Self {
        self.layers.push(Arc::new(layer));
        self
    }

    /// At most `limit` handler calls at once across every consumer of the host, whatever their
    /// own concurrency (a [`ConcurrencyLimit`] layer).
    pub fn max_concurrency(self, limit: usize) -> Self {
        self.layer(ConcurrencyLimit::new(limit))
    }

    /// How long [`Host::shutdown`] lets handlers in flight finish, for every consumer at once.
    /// Default 30 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Applies `config` (see [`HostConfig`]): each entry of its consumers to the consumer of
    /// that name, overriding what code set. An impossible value, or an entry that names no
    /// consumer, is an [`Error::Config`] naming its path (`consumers.webhook.retry.backoff.max`).
    pub fn configure(mut self, config: &HostConfig) -> Result<Self, Error> {
        for (name, entry) in &config.consumers {
            let path = format!("consumers.{name}");
            let names: Vec<String> = self
                .consumers
                .iter()
                .map(|c| format!("`{}`", c.settings.name()))
                .collect();
            let Some(consumer) = self
                .consumers
                .iter_mut()
                .find(|c| c.settings.name() == *name)
            else {
                return Err(Error::config(
                    path,
                    format!(
                        "no consumer has this name; the host has {}",
                        names.join(", ")
                    ),
                ));
            };
            let settings = &mut consumer.settings;
            if let Some(concurrency) = entry.concurrency {
                if concurrency == 0 {
                    return Err(Error::config(
                        format!("{path}.concurrency"),
                        "must be at least 1, got 0",
                    ));
                }
                settings.concurrency = concurrency;
            }
            if let Some(timeout) = entry.timeout {
                settings.timeout = Some(timeout);
            }
            if let Some(invalid_payload) = entry.invalid_payload {
                settings.invalid_payload = invalid_payload;
            }
            if let Some(resilience) = &entry.resilience {
                let current = settings.resilience.take().unwrap_or_default();
                let applied = resilience
                    .apply(current)
                    .map_err(|e| config::under(&format!("{path}.resilience"), e))?;
                settings.resilience = Some(applied);
            }
            if let Some(retry) = &entry.retry {
                let policy = retry
                    .build()
                    .map_err(|e| config::under(&format!("{path}.retry"), e))?;
                settings.policy = Some(Arc::new(policy));
            }
        }
        if let Some(limit) = config.max_concurrency {
            if limit == 0 {
                return Err(Error::config(
                    "max_concurrency",
                    "must be at least 1, got 0",
                ));
            }
            self = self.max_concurrency(limit);
        }
        if let Some(timeout) = config.shutdown_timeout {
            self.shutdown_timeout = timeout;
        }
        Ok(self)
    }

    /// The topology the consumers need: every endpoint and every subscription.
    pub fn topology(&self) -> Topology {
        self.consumers
            .iter()
            .fold(Topology::new(), |topology, c| match &c.settings.topic {
                Some(topic) => topology.subscribe(topic, c.settings.source.endpoint_name()),
                None => topology.endpoint(c.settings.source.endpoint_name()),
            })
    }

    /// Declares the topology, then starts every consumer. If one cannot start, those already
    /// started are shut down and the error says which consumer failed.
    pub async fn start(self) -> Result<Host, Error> {
        self.transport.declare(&self.topology()).await?;
        let mut workers = Vec::with_capacity(self.consumers.len());
        let mut monitors = Vec::with_capacity(self.consumers.len());
        for consumer in self.consumers {
            let settings = consumer.settings;
            let mut builder = Worker::builder(Arc::clone(&self.transport), settings.source.clone())
                .shared_state(Arc::clone(&self.state))
                .concurrency(settings.concurrency)
                .on_invalid_payload(settings.invalid_payload)
                .shutdown_timeout(self.shutdown_timeout);
            if let Some(policy) = settings.policy.clone() {
                builder = builder.shared_retry_policy(policy);
            }
            let mut layers = self.layers.clone();
            layers.extend(consumer.layers);
            if let Some(limit) = settings.timeout {
                layers.push(Arc::new(Timeout::new(limit)));
            }
            let mut monitor = None;
            if let Some(r) = settings.resilience.clone() {
                let max_attempts = (!settings.source.is_dead_letters()).then(|| {
                    settings
                        .policy
                        .as_ref()
                        .map_or(BackoffPolicy::default().max_attempts(), |p| {
                            p.max_attempts()
                        })
                });
                let controller = Arc::new(resilience::Controller::new(
                    settings.name(),
                    r,
                    settings.concurrency,
                    max_attempts,
                    self.transport.clock(),
                ));
                // Outermost, to see the outcome the worker carries out.
                layers.insert(0, Arc::new(resilience::Layer(Arc::clone(&controller))));
                builder = builder.admission(controller.clone());
                monitor = Some(ResilienceMonitor::new(controller));
            }
            match (consumer.start)(builder, layers).await {
                Ok(worker) => {
                    workers.push(worker);
                    monitors.push(monitor);
                }
                Err(e) => {
                    let _ = Host::stop_all(&mut workers).await;
                    return Err(e.in_consumer(&settings.name()));
                }
            }
        }
        info!(consumers = workers.len(), "host started");
        Ok(Host { workers, monitors })
    }
}

/// Running consumers; see the [module docs](self).
#[derive(Debug)]
pub struct Host {
    workers: Vec<Worker>,
    /// Each worker's resilience, if it has one.
    monitors: Vec<Option<ResilienceMonitor>>,
}

/// How one consumer of a host is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerHealth {
    /// What it consumes.
    pub source: Source,
    /// Whether its consumer is open (false while the transport reconnects).
    pub consuming: bool,
    /// Whether it was paused.
    pub paused: bool,
    /// What it has done so far.
    pub stats: WorkerStats,
    /// Its resilience (circuit, pauses, budget left), if it has one.
    pub resilience: Option<ResilienceSnapshot>,
}

impl ConsumerHealth {
    /// Whether the consumer is connected and taking deliveries: its consumer is open and it is
    /// not paused. For a readiness probe; a consumer that is reconnecting is not ready.
    pub fn is_ready(&self) -> bool {
        self.consuming && !self.paused
    }
}

impl Host {
    /// A builder for a host on `transport`, with no application state.
    pub fn builder(transport: Arc<dyn Transport>) -> HostBuilder<()> {
        Host::with_state(transport, ())
    }

    /// A builder for a host on `transport` whose handlers share `state`
    /// ([`Context::state`](crate::Context::state)).
    pub fn with_state<S: Send + Sync + 'static>(
        transport: Arc<dyn Transport>,
        state: S,
    ) -> HostBuilder<S> {
        HostBuilder {
            transport,
            state: Arc::new(state),
            consumers: Vec::new(),
            layers: Vec::new(),
            shutdown_timeout: Duration::from_secs(30),
        }
    }

    /// Every consumer's health, in the order they were added.
    pub fn health(&self) -> Vec<ConsumerHealth> {
        self.workers
            .iter()
            .zip(&self.monitors)
            .map(|(w, monitor)| ConsumerHealth {
                source: w.source().clone(),
                consuming: w.is_consuming(),
                paused: w.is_paused(),
                stats: w.stats(),
                resilience: monitor.as_ref().map(ResilienceMonitor::snapshot),
            })
            .collect()
    }

    /// Whether every consumer [is ready](ConsumerHealth::is_ready) (for a readiness probe).
    pub fn is_ready(&self) -> bool {
        self.health().iter().all(ConsumerHealth::is_ready)
    }

    /// The resilience of the first consumer of `source` that has one, to watch it.
    pub fn resilience(&self, source: impl Into<Source>) -> Option<ResilienceMonitor> {
        let source = source.into();
        self.workers
            .iter()
            .zip(&self.monitors)
            .filter(|(w, _)| *w.source() == source)
            .find_map(|(_, monitor)| monitor.clone())
    }

    /// Whether every consumer is consuming (a readiness probe).
    pub fn is_healthy(&self) -> bool {
        self.workers.iter().all(Worker::is_consuming)
    }

    /// Pauses the consumers of `source` (an endpoint name or [`Source::dead_letters`]); false
    /// if the host has none.
    pub fn pause(&self, source: impl Into<Source>) -> bool {
        self.each_of(source.into(), Worker::pause)
    }

    /// Resumes the consumers of `source`; false if the host has none.
    pub fn resume(&self, source: impl Into<Source>) -> bool {
        self.each_of(source.into(), Worker::resume)
    }

    fn each_of(&self, source: Source, act: impl Fn(&Worker)) -> bool {
        let mut found = false;
        for worker in self.workers.iter().filter(|w| *w.source() == source) {
            act(worker);
            found = true;
        }
        found
    }

    /// Stops every consumer at once: no more deliveries are taken, handlers in flight finish
    /// until the shutdown timeout, the rest are given back. Returns each consumer's final
    /// statistics.
    pub async fn shutdown(mut self) -> Vec<(Source, WorkerStats)> {
        Host::stop_all(&mut self.workers).await
    }

    async fn stop_all(workers: &mut Vec<Worker>) -> Vec<(Source, WorkerStats)> {
        let stopping = workers.drain(..).map(|worker| async move {
            let source = worker.source().clone();
            (source, worker.shutdown().await)
        });
        futures::future::join_all(stopping).await
    }

    /// Runs until the process is asked to stop (Ctrl-C, or SIGTERM on Unix), then shuts down.
    pub async fn run_until_signal(self) -> Vec<(Source, WorkerStats)> {
        shutdown_signal().await;
        info!("stop requested; shutting down");
        self.shutdown().await
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.stop();
        }
    }
}

/// Returns when the process gets Ctrl-C, or SIGTERM on Unix.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
