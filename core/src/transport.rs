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
//! - **Never early.** A message is not handed to a consumer before its
//!   [`not_before`](Message::not_before), give or take the declared
//!   [`Capabilities::scheduling_precision`], and only ever *late* by that amount. The worker
//!   re-checks and parks anything that comes early, so handlers are never called early.
//! - **Settling consumes the delivery**: a delivery is settled once, which the type system
//!   enforces.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::message::{DeadLetterInfo, Message};
use crate::{Clock, Error, wire};

/// The stream of deliveries a consumer receives. An `Err` item reports a problem the transport
/// could not hide (it keeps the stream alive when it can recover); the end of the stream means the
/// consumer was closed.
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
    /// How late a scheduled message may arrive because of the transport's granularity (RabbitMQ
    /// rounds delays up to whole seconds: 1 s; in memory: zero). Messages are never early.
    pub scheduling_precision: Duration,
    /// The longest delay the transport can hold a message for, if limited.
    pub max_delay: Option<Duration>,
    /// Whether dead letters are kept by the broker's own dead-letter mechanism (with reason)
    /// rather than by the framework copying them to a queue.
    pub native_dead_lettering: bool,
}

impl Capabilities {
    /// Declares a transport's capabilities.
    pub fn new(
        scheduling_precision: Duration,
        max_delay: Option<Duration>,
        native_dead_lettering: bool,
    ) -> Self {
        Capabilities {
            scheduling_precision,
            max_delay,
            native_dead_lettering,
        }
    }

    /// Checks that a delay can be held by this transport.
    pub fn check_delay(&self, delay: Duration) -> Result<(), Error> {
        match self.max_delay {
            Some(max) if delay > max => Err(Error::invalid_message(format!(
                "a delay of {delay:?} is longer than this transport's longest delay of {max:?}"
            ))),
            _ => Ok(()),
        }
    }
}

/// How a delivery is settled; what a transport's [`Settle`] implementation must carry out.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Settlement {
    /// Done: remove the message.
    Complete,
    /// Put this message (same id; attempt, not-before and failure set by the framework) back
    /// on the same source, not to be delivered before its not-before, then remove the original.
    /// Used for retries and for parking a message that came early.
    Reschedule(Message),
    /// Move the message to the dead letters of its endpoint. The message carries the
    /// [`DeadLetterInfo`] and the attempt it failed on.
    DeadLetter(Message),
    /// Give the message back for immediate redelivery, unchanged (shutdown).
    Abandon,
}

/// What a transport did with a [`Settlement`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settled {
    /// What was asked.
    AsAsked,
    /// The message was dead-lettered instead, with this reason: the copy a retry or park would
    /// have stored was refused for what it is
    /// ([`COPY_REFUSED`](crate::reasons::COPY_REFUSED)), so storing it again would fail the
    /// same way.
    DeadLettered {
        /// The dead-letter reason.
        reason: String,
    },
}

/// How a transport carries out settlements. Implemented by transports, not applications.
///
/// The new copy of a [`Settlement::Reschedule`] or [`Settlement::DeadLetter`] must be stored
/// safely *before* the original is removed: a failure in between duplicates, never loses.
#[async_trait]
pub trait Settle: Send + 'static {
    /// Carries out `settlement` for the delivery this settler belongs to, and says what was
    /// done.
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<Settled, Error>;
}

/// A message handed to a consumer, to be settled exactly once.
///
/// Dropping a delivery without settling it gives the message back to the transport, which
/// delivers it again (immediately in memory; on brokers when the channel or lock goes away).
pub struct Delivery {
    message: Arc<Message>,
    source: Arc<Source>,
    problem: Option<String>,
    settler: Box<dyn Settle>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("source", &self.source)
            .field("problem", &self.problem)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// A delivery of `message` from `source`, settled through `settler`. A transport that hands
    /// out many deliveries from one source can pass the same `Arc<Source>` to each.
    pub fn new(
        message: impl Into<Arc<Message>>,
        source: impl Into<Arc<Source>>,
        settler: impl Settle,
    ) -> Self {
        Delivery {
            message: message.into(),
            source: source.into(),
            problem: None,
            settler: Box::new(settler),
        }
    }

    /// Marks the delivery as malformed (for example, unreadable framework headers; see
    /// [`wire::decode_headers`]). The worker dead-letters it with
    /// reason [`MALFORMED_HEADERS`](crate::reasons::MALFORMED_HEADERS) and this description
    /// instead of calling the handler.
    #[must_use]
    pub fn with_problem(mut self, problem: Option<String>) -> Self {
        self.problem = problem;
        self
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The message, shared (the worker hands it to the handler's [`Context`](crate::Context)
    /// without copying it).
    pub fn shared_message(&self) -> &Arc<Message> {
        &self.message
    }

    /// Where it was consumed from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// What is wrong with the delivery, if the transport found it malformed.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// Removes the message: it was handled.
    pub async fn complete(self) -> Result<Settled, Error> {
        self.settler.settle(Settlement::Complete).await
    }

    /// Schedules the next attempt (attempt + 1) not before `not_before`, recording `reason` (cut
    /// to [`wire::MAX_REASON_BYTES`]) and the chosen `delay`, then
    /// removes this delivery.
    pub async fn retry(
        self,
        not_before: DateTime<Utc>,
        reason: impl Into<String>,
        delay: Duration,
    ) -> Result<Settled, Error> {
        let reason = wire::truncate(reason.into(), wire::MAX_REASON_BYTES);
        let next = self.message.next_attempt(not_before, reason, delay);
        self.settler.settle(Settlement::Reschedule(next)).await
    }

    /// Puts a message that arrived before its not-before back, unchanged but for the
    /// not-before, without counting an attempt.
    pub async fn park(self, not_before: DateTime<Utc>) -> Result<Settled, Error> {
        let parked = Message::clone(&self.message).with_not_before(not_before);
        self.settler.settle(Settlement::Reschedule(parked)).await
    }

    /// Moves the message to its endpoint's dead letters, recording `reason` and `description`
    /// (cut to [`wire::MAX_REASON_BYTES`] and
    /// [`wire::MAX_DESCRIPTION_BYTES`]).
    pub async fn dead_letter(
        self,
        reason: impl Into<String>,
        description: Option<String>,
    ) -> Result<Settled, Error> {
        let dead = Message::clone(&self.message).with_dead_letter(Some(DeadLetterInfo {
            reason: wire::truncate(reason.into(), wire::MAX_REASON_BYTES),
            description: description.map(|d| wire::truncate(d, wire::MAX_DESCRIPTION_BYTES)),
        }));
        self.settler.settle(Settlement::DeadLetter(dead)).await
    }

    /// Gives the message back for immediate redelivery, attempt unchanged.
    pub async fn abandon(self) -> Result<Settled, Error> {
        self.settler.settle(Settlement::Abandon).await
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

    #[test]
    fn delays_beyond_the_longest_are_refused() {
        let caps = Capabilities::new(Duration::from_secs(1), Some(Duration::from_secs(10)), false);
        assert!(caps.check_delay(Duration::from_secs(10)).is_ok());
        let e = caps.check_delay(Duration::from_secs(11)).unwrap_err();
        assert!(e.to_string().contains("longest delay"), "{e}");
    }
}
