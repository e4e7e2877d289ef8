//! The in-memory transport of redeliver: for unit tests of handlers, for examples, and for
//! applications that only need retries inside one process.
//!
//! - **Exact scheduling.** A message is delivered at its not-before, to the microsecond of the
//!   transport's [`Clock`], never before.
//! - **A controllable clock.** The transport runs on [`Clock::tokio`], so under
//!   `#[tokio::test(start_paused = true)]` a back-off schedule of hours runs in milliseconds:
//!   tokio advances its paused clock straight to the next scheduled message whenever every task
//!   is waiting.
//! - **Dead letters** are kept per endpoint with their reason, description and the attempt they
//!   failed on, and can be consumed through [`Source::DeadLetters`].
//! - **Nothing is lost.** A delivery dropped without being settled goes back to the front of its
//!   queue and is delivered again.
//! - **Dead-letter operations** ([`DeadLetters`](redeliver_core::DeadLetters)): a peek of the
//!   dead letters, which are held in place while a replay passes over them.
//! - **Inspection**: [`pending`](MemoryTransport::pending),
//!   [`scheduled`](MemoryTransport::scheduled), [`in_flight`](MemoryTransport::in_flight),
//!   [`dead_letters`](MemoryTransport::dead_letters), and waiting for a condition with
//!   [`wait_until`](MemoryTransport::wait_until) / [`wait_until_idle`](MemoryTransport::wait_until_idle)
//!   instead of sleeping.
//!
//! Endpoints are created on first use (or by [`Transport::declare`]); a topic delivers to the
//! endpoints subscribed to it through [`Transport::declare`], and publishing to a topic with no
//! subscriber delivers nowhere. Everything lives in this process: messages do not survive it.
//!
//! ```
//! use std::sync::Arc;
//! use redeliver_core::{Message, Transport};
//! use redeliver_memory::MemoryTransport;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), redeliver_core::Error> {
//! let transport = MemoryTransport::new();
//! transport.send("orders", Message::json(&42)?).await?;
//! assert_eq!(transport.pending("orders").len(), 1);
//! let shared: Arc<dyn Transport> = Arc::new(transport);
//! # let _ = shared; Ok(()) }
//! ```

use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use redeliver_core::telemetry::{self, Operation};
use redeliver_core::{
    Capabilities, Clock, ConsumeOptions, DeliveryStream, Error, Message, Source, Topology,
    Transport,
};

mod connector;
mod consumer;
mod state;

pub use connector::MemoryConnector;

use crate::state::{Endpoint, Inner, Now, State};

/// The `messaging.system` this transport's spans and metrics carry.
pub const MESSAGING_SYSTEM: &str = "memory";

/// The in-memory transport. Cheap to clone: clones share the same queues.
#[derive(Clone, Debug)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryTransport {
    /// A transport on [`Clock::tokio`], starting at the current wall-clock time.
    pub fn new() -> Self {
        Self::with_clock(Clock::tokio())
    }

    /// A transport on the given clock (for example [`Clock::tokio_at`] a fixed instant, for
    /// reproducible timelines).
    pub fn with_clock(clock: Clock) -> Self {
        MemoryTransport {
            inner: Arc::new(Inner::new(clock)),
        }
    }

    /// Messages of `endpoint` ready for delivery and not yet handed out, in delivery order.
    pub fn pending(&self, endpoint: &str) -> Vec<Message> {
        self.inspect(endpoint, |e| e.main.ready.iter().cloned().collect())
    }

    /// Messages of `endpoint` waiting for their not-before, earliest first.
    pub fn scheduled(&self, endpoint: &str) -> Vec<Message> {
        self.inspect(endpoint, |e| e.main.scheduled.values().cloned().collect())
    }

    /// How many deliveries of `endpoint` are handed out and not yet settled.
    pub fn in_flight(&self, endpoint: &str) -> usize {
        self.inspect(endpoint, |e| e.main.in_flight.len())
    }

    /// The dead letters of `endpoint`, oldest first. Each carries its
    /// [`dead_letter`](Message::dead_letter) reason and the [`attempt`](Message::attempt) it
    /// failed on. Dead letters being handled by a dead-letter consumer are included.
    pub fn dead_letters(&self, endpoint: &str) -> Vec<Message> {
        self.inspect(endpoint, |e| {
            let mut all: Vec<Message> = e
                .dead
                .in_flight
                .values()
                .map(|m| Message::clone(m))
                .collect();
            all.extend(e.dead.ready.iter().cloned());
            all.extend(e.dead.scheduled.values().cloned());
            all
        })
    }

    /// Waits until `condition` holds, checking it now and after every change to the queues.
    /// Wrap it in [`tokio::time::timeout`] in tests, so that a condition that never comes fails
    /// the test instead of hanging it.
    pub async fn wait_until(&self, mut condition: impl FnMut(&MemoryTransport) -> bool) {
        let mut changes = self.inner.version.subscribe();
        loop {
            changes.borrow_and_update();
            if condition(self) {
                return;
            }
            // The sender lives as long as `self`, so this cannot fail.
            let _ = changes.changed().await;
        }
    }

    /// Waits until no endpoint has a message ready, scheduled or in flight (dead letters that
    /// nobody is handling do not count): everything sent has been settled.
    pub async fn wait_until_idle(&self) {
        self.wait_until(|t| {
            t.lock().endpoints.values().all(|e| {
                e.main.is_idle() && e.dead.in_flight.is_empty() && e.dead.scheduled.is_empty()
            })
        })
        .await
    }

    fn inspect<R: Default>(&self, endpoint: &str, read: impl FnOnce(&Endpoint) -> R) -> R {
        self.lock()
            .endpoints
            .get(endpoint)
            .map(read)
            .unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// Runs `change` on the state and tells waiters.
    fn change<R>(&self, change: impl FnOnce(&mut State, &mut Now<'_>) -> R) -> R {
        self.inner.change(change)
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Duration::ZERO).with_messaging_system(MESSAGING_SYSTEM)
    }

    fn clock(&self) -> Clock {
        self.inner.clock.clone()
    }

    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.change(|state, _| {
            for endpoint in topology.endpoints() {
                state.endpoints.entry(endpoint.to_owned()).or_default();
            }
            for (topic, endpoints) in topology.topics() {
                let subscribers = state.topics.entry(topic.to_owned()).or_default();
                subscribers.extend(endpoints.map(str::to_owned));
            }
        });
        Ok(())
    }

    async fn send(&self, endpoint: &str, message: Message) -> Result<(), Error> {
        let (message, span) =
            telemetry::produce(MESSAGING_SYSTEM, Operation::Send, endpoint, message);
        self.change(|state, now| state.enqueue(&Source::endpoint(endpoint), message, now));
        span.finish(&Ok(()));
        Ok(())
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error> {
        let (message, span) =
            telemetry::produce(MESSAGING_SYSTEM, Operation::Publish, topic, message);
        self.change(|state, now| {
            let subscribers: Vec<String> = state
                .topics
                .get(topic)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            for endpoint in subscribers {
                state.enqueue(&Source::Endpoint(endpoint), message.clone(), &mut *now);
            }
        });
        span.finish(&Ok(()));
        Ok(())
    }

    async fn consume(
        &self,
        source: &Source,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, Error> {
        Ok(consumer::consume(&self.inner, source, options))
    }

    /// The dead letters ready for delivery, in delivery order, then those waiting for a
    /// not-before; not those a consumer holds.
    async fn peek_dead_letters(&self, endpoint: &str, max: usize) -> Result<Vec<Message>, Error> {
        Ok(self.inspect(endpoint, |e| {
            e.dead
                .ready
                .iter()
                .chain(e.dead.scheduled.values())
                .take(max)
                .cloned()
                .collect()
        }))
    }

    async fn count_dead_letters(&self, endpoint: &str) -> Result<u64, Error> {
        Ok(self.inspect(endpoint, |e| {
            (e.dead.ready.len() + e.dead.scheduled.len()) as u64
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use redeliver_core::{Message, Topology, Transport};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn topics_copy_to_every_subscriber_and_nowhere_without_one() {
        let t = MemoryTransport::new();
        t.declare(
            &Topology::new()
                .subscribe("events", "a")
                .subscribe("events", "b"),
        )
        .await
        .unwrap();
        t.publish("events", Message::new("e")).await.unwrap();
        t.publish("nobody-listens", Message::new("e"))
            .await
            .unwrap();
        assert_eq!(t.pending("a").len(), 1);
        assert_eq!(t.pending("b").len(), 1);
        assert_eq!(t.pending("a")[0].id(), t.pending("b")[0].id());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_until_wakes_on_changes() {
        let t = MemoryTransport::new();
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.wait_until(|t| t.pending("q").len() == 2).await })
        };
        t.send("q", Message::new("1")).await.unwrap();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one message is not two");
        t.send("q", Message::new("2")).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
