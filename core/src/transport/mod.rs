//! The transport contract: what every broker adapter provides.
//!
//! A transport moves [`Message`]s between endpoints (queues) and topics, holds messages until
//! their not-before, keeps dead letters, and hands messages to consumers as [`Delivery`] values
//! that must be settled. The worker is written against this trait only, so a handler runs
//! unchanged on every transport.
//!
//! # Guarantees every transport gives
//! - **At-least-once.** A message that was accepted by [`Transport::send`] or
//!   [`Transport::publish`] (the call returned `Ok`) is handed to a consumer until it is settled,
//!   or it is dead-lettered. A delivery that is never settled (the process dies, the delivery is
//!   dropped, the connection is lost) comes back. Duplicates are possible; see each transport's
//!   documentation for where.
//! - **Never early.** A message is not handed to a consumer more than the declared
//!   [`Capabilities::scheduling_precision`] before its [`not_before`](Message::not_before)
//!   (RabbitMQ hands delayed messages over up to that early on purpose), and not later than
//!   that after it. The worker re-checks every delivery: it waits out what came early by at
//!   most the precision and parks anything earlier, so handlers are never called early.
//! - **Settling consumes the delivery**: a delivery is settled once, which the type system
//!   enforces. A transport provides the steps ([`Settle`]); the order that makes them
//!   at-least-once is kept in one place, [`Delivery`] (see [`delivery`]).
//! - **One clock.** Whoever computes a delay or compares a not-before for a transport (the
//!   worker, the transport itself) reads [`Transport::clock`].
//!
//! # Reconnecting
//! A transport recovers from a lost connection *inside* its [`DeliveryStream`]: while the broker
//! cannot be reached, the stream yields `Err` items (the worker logs each and backs off before
//! it polls again) and then goes on with deliveries from the new connection. Deliveries handed
//! out on the old connection can no longer be settled; the broker delivers them again. The end
//! of a stream means the consumer was closed; should a stream end while its worker still runs,
//! the worker consumes again, backing off.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::message::Message;
use crate::{Clock, Error};

pub mod delivery;

pub use crate::message::FrameworkState;
pub use delivery::{Delivery, PassedOver, Settle, Settled, Stored};

/// The stream of deliveries a consumer receives. An `Err` item reports a problem the transport
/// could not hide, and the stream goes on (see [Reconnecting](self#reconnecting)); the end of the
/// stream means the consumer was closed.
pub type DeliveryStream = BoxStream<'static, Result<Delivery, Error>>;

/// A message transport: RabbitMQ, Azure Service Bus, in memory, or your own.
///
/// Object safe: the worker holds an `Arc<dyn Transport>`, which prints with `{:?}` (a
/// transport's `Debug` form never shows a password or key).
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Transport: fmt::Debug + Send + Sync + 'static {
    /// What this transport can do; see [`Capabilities`].
    fn capabilities(&self) -> Capabilities;

    /// The clock not-before instants are compared with. Brokers use the system clock; the
    /// in-memory transport uses a [`Clock::tokio`] so tests can control time.
    fn clock(&self) -> Clock {
        Clock::system()
    }

    /// Makes sure `topology` exists: creates what is missing, or, for transports configured to
    /// only check, fails with [`Error::NotFound`] naming the first missing piece. Idempotent.
    async fn declare(&self, topology: &Topology) -> Result<(), Error>;

    /// Sends `message` to `endpoint`. If the message has a
    /// [`not_before`](Message::not_before) in the future, the transport holds it until then.
    ///
    /// Returns only once the broker has taken responsibility for the message; an error means it
    /// may not have.
    async fn send(&self, endpoint: &str, message: Message) -> Result<(), Error>;

    /// Publishes `message` to `topic`; every endpoint subscribed to the topic gets a copy. The
    /// message's not-before is honoured as in [`send`](Transport::send). Publishing to a topic
    /// with no subscriber is not an error (there is nobody to deliver to).
    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error>;

    /// Starts consuming `source`. At most `options.prefetch` deliveries are handed out and not
    /// yet settled at any time.
    async fn consume(
        &self,
        source: &Source,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, Error>;

    /// Up to `max` dead letters of `endpoint`, oldest first, **left in place and in order**
    /// (a peek, or a browse that puts every message back where it was). Dead letters being
    /// handled by a consumer at the time may be missing. The default fails with
    /// [`Error::Unsupported`]. See [`DeadLetters`](crate::dead_letters::DeadLetters).
    async fn peek_dead_letters(&self, endpoint: &str, max: usize) -> Result<Vec<Message>, Error> {
        let _ = (endpoint, max);
        Err(Error::unsupported("browsing dead letters"))
    }

    /// The dead letters of `endpoint` to take one by one in a pass that settles each before the
    /// next (a replay or purge, see [`DeadLetters`](crate::dead_letters::DeadLetters)), at most
    /// `held` of them held unsettled at once. The default consumes
    /// [`Source::DeadLetters`] with a prefetch of `held + 1`; a broker that pushes deliveries
    /// ahead (and would have to give back those the pass does not get to) can hand them out
    /// on demand instead, as RabbitMQ does with `basic.get`.
    async fn take_dead_letters(
        &self,
        endpoint: &str,
        held: usize,
    ) -> Result<DeliveryStream, Error> {
        let options = ConsumeOptions::default().with_prefetch(held.saturating_add(1));
        self.consume(&Source::dead_letters(endpoint), options).await
    }

    /// How many dead letters `endpoint` has waiting (not counting those being handled by a
    /// consumer at the time, on brokers that cannot tell). The default fails with
    /// [`Error::Unsupported`].
    async fn count_dead_letters(&self, endpoint: &str) -> Result<u64, Error> {
        let _ = endpoint;
        Err(Error::unsupported("counting dead letters"))
    }

    /// Closes the transport's connections, once the consumers whose delivery streams were
    /// dropped have given back the messages they still held. Call it before a process ends (a
    /// command-line tool, a test) so that no message waits for a lock or a broker time-out to
    /// run out before it is delivered again; a process that ends without it loses nothing
    /// either. Close after the workers have shut down. The default does nothing.
    async fn close(&self) {}
}

/// What can be consumed: an endpoint's queue, or the dead letters of an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// The endpoint's own queue.
    Endpoint(String),
    /// The dead letters of the endpoint.
    DeadLetters(String),
}

impl Source {
    /// The queue of `endpoint`.
    pub fn endpoint(name: impl Into<String>) -> Self {
        Source::Endpoint(name.into())
    }

    /// The dead letters of `endpoint`.
    pub fn dead_letters(name: impl Into<String>) -> Self {
        Source::DeadLetters(name.into())
    }

    /// The endpoint this source belongs to.
    pub fn endpoint_name(&self) -> &str {
        match self {
            Source::Endpoint(name) | Source::DeadLetters(name) => name,
        }
    }

    /// Whether this is a dead-letter source.
    pub fn is_dead_letters(&self) -> bool {
        matches!(self, Source::DeadLetters(_))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Endpoint(name) => f.write_str(name),
            Source::DeadLetters(name) => write!(f, "{name} (dead letters)"),
        }
    }
}

impl From<&str> for Source {
    fn from(endpoint: &str) -> Self {
        Source::endpoint(endpoint)
    }
}

impl From<String> for Source {
    fn from(endpoint: String) -> Self {
        Source::Endpoint(endpoint)
    }
}

/// Options for [`Transport::consume`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConsumeOptions {
    /// How many deliveries may be outstanding (handed out, not settled) at once. The worker sets
    /// it to its concurrency.
    pub prefetch: usize,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions { prefetch: 1 }
    }
}

impl ConsumeOptions {
    /// Sets [`prefetch`](ConsumeOptions::prefetch).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }
}

/// The endpoints and topic subscriptions an application needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    endpoints: BTreeSet<String>,
    subscriptions: BTreeMap<String, BTreeSet<String>>,
}

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Topology::default()
    }

    /// Adds an endpoint (its queue and its dead letters).
    #[must_use]
    pub fn endpoint(mut self, name: impl Into<String>) -> Self {
        self.endpoints.insert(name.into());
        self
    }

    /// Subscribes `endpoint` to `topic` (adding both).
    #[must_use]
    pub fn subscribe(mut self, topic: impl Into<String>, endpoint: impl Into<String>) -> Self {
        let endpoint = endpoint.into();
        self.endpoints.insert(endpoint.clone());
        self.subscriptions
            .entry(topic.into())
            .or_default()
            .insert(endpoint);
        self
    }

    /// The endpoints, in name order.
    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        self.endpoints.iter().map(String::as_str)
    }

    /// The topics with their subscribed endpoints, in name order.
    pub fn topics(&self) -> impl Iterator<Item = (&str, impl Iterator<Item = &str>)> {
        self.subscriptions
            .iter()
            .map(|(topic, eps)| (topic.as_str(), eps.iter().map(String::as_str)))
    }
}

/// What a transport can do, so that the worker and applications can check before relying on it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// How far from its not-before a scheduled message may arrive because of the transport's
    /// granularity (RabbitMQ rounds delays down to whole seconds, so up to 1 s early; in memory:
    /// zero). The worker waits out an early arrival within it, so handlers are never early.
    pub scheduling_precision: Duration,
    /// The longest delay the transport can hold a message for, if limited.
    pub max_delay: Option<Duration>,
    /// The transport's `messaging.system` in OpenTelemetry's messaging conventions
    /// (`rabbitmq`, `servicebus`, `memory`), recorded on spans and metrics
    /// ([`telemetry`](crate::telemetry)). Default: `redeliver`.
    pub messaging_system: &'static str,
}

impl Capabilities {
    /// A transport that delivers scheduled messages at most `scheduling_precision` late and
    /// holds delays of any length.
    pub fn new(scheduling_precision: Duration) -> Self {
        Capabilities {
            scheduling_precision,
            max_delay: None,
            messaging_system: "redeliver",
        }
    }

    /// Declares the transport's `messaging.system` (see
    /// [`messaging_system`](Capabilities::messaging_system)).
    #[must_use]
    pub fn with_messaging_system(mut self, system: &'static str) -> Self {
        self.messaging_system = system;
        self
    }

    /// Declares the longest delay the transport can hold.
    #[must_use]
    pub fn with_max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = Some(max_delay);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Compile-time check that the contract stays object safe, and printable as an object.
    fn _object_safe(transport: &dyn Transport, _: &dyn Settle) -> String {
        format!("{transport:?}")
    }

    #[test]
    fn topology_collects_subscriptions() {
        let t = Topology::new()
            .endpoint("a")
            .subscribe("events", "b")
            .subscribe("events", "c");
        assert_eq!(t.endpoints().collect::<Vec<_>>(), ["a", "b", "c"]);
        let topics: Vec<(String, Vec<String>)> = t
            .topics()
            .map(|(t, eps)| (t.to_owned(), eps.map(str::to_owned).collect()))
            .collect();
        assert_eq!(
            topics,
            [("events".to_owned(), vec!["b".to_owned(), "c".to_owned()])]
        );
    }
}
