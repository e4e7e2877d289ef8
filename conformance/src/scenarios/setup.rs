//! What every scenario uses: the payload, unique names, the set-up and tear-down of a
//! transport, hosts with recording handlers.

use std::sync::Arc;

use redeliver_core::{
    Backoff, BackoffPolicy, Consumer, ConsumerSettings, Context, Host, Jitter, Message, Outcome,
    Source, Topology, Transport, WorkerStats,
};
use serde::{Deserialize, Serialize};

use crate::probe::{Calls, expect_within};
use crate::{Factory, Timing};

/// The payload every scenario sends.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Order {
    pub(super) id: u32,
}

pub(super) fn order(id: u32) -> Message {
    Message::json(&Order { id }).expect("an order serializes")
}

/// A name no other scenario or run uses (`<base>-<random>`).
pub(super) fn unique(base: &str) -> String {
    let suffix: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(8)
        .collect::<String>()
        .to_lowercase();
    format!("conformance-{base}-{suffix}")
}

/// A retry policy with `max_attempts` and a fixed delay of `timing.unit`, without jitter.
pub(super) fn fixed(timing: Timing, max_attempts: u32) -> BackoffPolicy {
    BackoffPolicy::builder()
        .max_attempts(max_attempts)
        .backoff(Backoff::fixed(timing.unit))
        .jitter(Jitter::None)
        .build()
        .expect("a valid policy")
}

/// One scenario's transport and topology, removed again by [`Setup::finish`].
pub(super) struct Setup<'f> {
    pub(super) factory: &'f dyn Factory,
    pub(super) topology: Topology,
    pub(super) transport: Arc<dyn Transport>,
    pub(super) timing: Timing,
    pub(super) calls: Calls,
}

impl<'f> Setup<'f> {
    /// `None` when the factory's broker is unavailable (the factory has said so).
    pub(super) async fn new(factory: &'f dyn Factory, topology: Topology) -> Option<Self> {
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
        let transport = expect_within(
            timing.patience,
            "the factory make a transport (Factory::create)",
            factory.create(&topology),
        )
        .await
        .expect("the factory makes a transport");
        let calls = Calls::new(transport.clock());
        Some(Setup {
            factory,
            topology,
            timing,
            calls,
            transport,
        })
    }

    pub(super) async fn send(&self, endpoint: &str, message: Message) {
        expect_within(
            self.timing.patience,
            "the transport accept a message (Transport::send)",
            self.transport.send(endpoint, message),
        )
        .await
        .expect("the transport accepts the message");
    }

    pub(super) async fn finish(self) {
        // Generous: removing is not under test, it only must not hang.
        let removed = expect_within(
            self.timing.patience * 3,
            "the factory remove the scenario's topology (Factory::remove)",
            self.factory.remove(&self.topology),
        )
        .await;
        if let Err(e) = removed {
            eprintln!("conformance: could not remove the scenario's topology: {e}");
        }
    }
}

/// The consumer of `source`, for a host.
pub(super) fn consumer(source: impl Into<Source>) -> ConsumerSettings {
    match source.into() {
        Source::Endpoint(endpoint) => Consumer::endpoint(endpoint),
        Source::DeadLetters(endpoint) => Consumer::dead_letters(endpoint),
    }
}

/// Starts a host with `consumer`, the scenarios' shutdown timeout, and nothing else: every
/// scenario runs through the application host.
pub(super) async fn host(setup: &Setup<'_>, consumer: Consumer) -> Host {
    let started = Host::builder(Arc::clone(&setup.transport))
        .shutdown_timeout(setup.timing.unit)
        .consumer(consumer)
        .start();
    expect_within(
        setup.timing.patience,
        "the host start (HostBuilder::start)",
        started,
    )
    .await
    .expect("the host starts")
}

/// Starts a consumer of `source` whose handler records the call and answers with `decide`.
pub(super) async fn worker(
    setup: &Setup<'_>,
    source: impl Into<Source>,
    policy: BackoffPolicy,
    decide: impl Fn(&Order, &Context) -> Outcome + Send + Sync + 'static,
) -> Host {
    let calls = setup.calls.clone();
    let consumer =
        consumer(source)
            .retry_policy(policy)
            .handler(move |order: Order, ctx: Context| {
                calls.record(&ctx);
                let outcome = decide(&order, &ctx);
                async move { outcome }
            });
    host(setup, consumer).await
}

/// Shuts `host` down (see [`Host::shutdown`]), failing the scenario if that takes longer than
/// the shutdown timeout (`timing.unit`) plus the patience; the statistics of its one consumer.
pub(super) async fn stop(host: Host, timing: Timing) -> WorkerStats {
    let stopped = expect_within(
        timing.unit + timing.patience,
        "the host shut down (Host::shutdown)",
        host.shutdown(),
    )
    .await;
    stopped.into_iter().next().expect("one consumer").1
}

pub(super) fn assert_stats(
    stats: WorkerStats,
    completed: u64,
    retried: u64,
    dead_lettered: u64,
    discarded: u64,
) {
    assert_eq!(
        (
            stats.completed,
            stats.retried,
            stats.dead_lettered,
            stats.discarded
        ),
        (completed, retried, dead_lettered, discarded),
        "(completed, retried, dead-lettered, discarded) in {stats:?}"
    );
}
