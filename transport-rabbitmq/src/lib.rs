//! The RabbitMQ transport of [redeliver](https://docs.rs/redeliver): exact not-before without
//! plugins, publisher confirms, dead letters and recovery, on [`lapin`] 4 and tokio.
//!
//! ```no_run
//! use std::sync::Arc;
//! use redeliver_core::{Context, Message, Outcome, Topology, Transport, Worker};
//! use redeliver_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct OrderPlaced { order_id: u64 }
//!
//! # async fn run() -> Result<(), redeliver_core::Error> {
//! let transport = RabbitMqTransport::connect(
//!     RabbitMqOptions::new("amqp://guest:guest@localhost:5672/%2f"),
//! )
//! .await?;
//! transport.declare(&Topology::new().endpoint("orders")).await?;
//! let transport: Arc<dyn Transport> = Arc::new(transport);
//!
//! let worker = Worker::builder(Arc::clone(&transport), "orders")
//!     .concurrency(8)
//!     .start(|event: OrderPlaced, ctx: Context| async move {
//!         println!("order {} (attempt {})", event.order_id, ctx.attempt());
//!         Outcome::success()
//!     })
//!     .await?;
//! transport.send("orders", Message::json(&OrderPlaced { order_id: 1 })?).await?;
//! # worker.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Topology and names
//! [`Transport::declare`](redeliver_core::Transport::declare) creates, idempotently (declaring
//! twice is harmless), or with [`TopologyMode::CheckOnly`] only checks (a missing queue or
//! exchange is [`Error::NotFound`](redeliver_core::Error::NotFound) naming it):
//!
//! | what | name | kind |
//! |---|---|---|
//! | endpoint `E` | `{prefix}E` | durable quorum (or classic) queue, `x-delivery-limit` 20 (quorum); dead-letters (broker side) into the dead-letter queue |
//! | dead letters of `E` | `{prefix}E.dead-letters` | durable queue (suffix configurable), `x-delivery-limit` 20 (quorum); dead-letters (broker side) into the quarantine |
//! | quarantine of `E` | `{prefix}E.quarantine` | durable queue that no reader of the framework consumes: what the dead-letter queue's readers could not settle, for an operator |
//! | topic `T` | `{prefix}T` | durable **fanout** exchange, bound to every subscribed endpoint's queue |
//! | delay level `L` (cascade of `N` levels) | `{prefix}redeliver.delay.n{N}.l{LL}` | topic exchange + quorum queue with a TTL of 2^L s |
//! | end of the cascade | `{prefix}redeliver.delay.n{N}.deliver` | topic exchange bound to every endpoint and dead-letter queue |
//! | unroutable delayed messages | `{prefix}redeliver.delay.unroutable` | fanout exchange + quorum queue, the alternate exchange of `deliver` |
//! | fixed-TTL mode: retry queue of `Q` | `Q{suffix}` (for example `-retry`) | queue with a TTL, dead-lettering back to `Q` |
//!
//! The prefix is empty by default ([`RabbitMqOptions::with_prefix`]). In declare mode the topology
//! is declared again after every reconnection. Changing queue options (type, delivery limit) of
//! queues that already exist is refused by the broker; the error says which one. One exception,
//! so that an upgrade does not stop at `declare`: endpoint and dead-letter queues declared by
//! versions without the default delivery limit and quarantine are accepted as they are, with a
//! warning naming each (they lack the poison-message protection below until they are deleted
//! and declared again, or given a `delivery-limit` and dead-letter policy). Check-only mode does
//! not check the quarantine.
//!
//! # Delays: the binary cascade
//! A message with a not-before in the future is delayed by the broker, with nothing but core
//! features (no delayed-message plugin): the delay is rounded **down** to whole seconds (see
//! [the last second](#the-last-second-waited-out-by-the-worker)) and written in binary. Level `L` is a quorum queue whose every message waits 2^L
//! seconds, so its queue order is its expiry order and nothing waits behind a longer delay (no
//! head-of-line blocking). The routing key carries the bits, most significant first, then `q`
//! and the destination queue: `0.1.0.1.q.orders` waits 4 + 1 s for `orders`. The message is
//! published to the level of its highest set bit; each level's queue takes keys with its bit
//! set, its exchange passes the others down a level, and each level queue dead-letters (keeping
//! the key) into the level below, the last into the `deliver` exchange. Destination queues bind
//! to `deliver` with one `*` per bit and then their exact name, so `a.b` never receives `b`'s
//! messages. Level queues use `x-dead-letter-strategy=at-least-once` with
//! `x-overflow=reject-publish`, so a message is never lost between levels (RabbitMQ ≥ 3.10 with
//! the `stream_queue` feature flag).
//!
//! The **longest delay** is 2^N - 1 seconds for `N` levels: with the default 28 levels about 8.5
//! years, with [`with_delay_levels`](RabbitMqOptions::with_delay_levels)`(20)` about 12 days.
//! [`send`](redeliver_core::Transport::send) with a longer delay fails with
//! [`Error::InvalidMessage`](redeliver_core::Error::InvalidMessage); retries and parking are
//! capped at it (the worker parks again what comes back early). Destination names are limited to
//! 255 - 2N - 2 bytes (197 with 28 levels), since a routing key holds at most 255.
//!
//! Failure mode: a delayed message whose destination queue was deleted while it waited cannot be
//! routed out of the cascade; instead of blocking the last level (at-least-once dead-lettering
//! would retry it forever) it goes to the `unroutable` queue through the alternate exchange, for
//! an operator to inspect. [`send`](redeliver_core::Transport::send) checks once per queue that
//! the destination exists before a delayed publish. A scheduled message cannot be cancelled.
//!
//! ## The last second, waited out by the worker
//! Since the cascade rounds down, a delayed message reaches its queue up to a second *before*
//! its not-before (a send due in less than a second goes straight to the queue).
//! [`Capabilities::scheduling_precision`](redeliver_core::Capabilities) is 1 s, so the
//! [`Worker`](redeliver_core::Worker) does not call the handler for it: it waits out the rest
//! on a timer that holds only the unacknowledged delivery — no handler slot, so the messages
//! behind it are handled meanwhile — and then handles it. The handler is still never called
//! before the not-before (the worker checks it against the UTC clock when the timer fires, and
//! again before every call). Measured lateness (`bench/RESULTS.md` in the repository, 2,500
//! messages due over 1–10 s, sent at once) is about 1 ms at the median instead of about 600 ms;
//! the slowest 1% are 70–90 ms late, what the cascade's hops between levels add under that burst
//! (they added as much on top of the rounding before). Consumers other than the worker see the
//! message up to a second early.
//!
//! **What it costs in prefetch, and its bound.** A delivery waiting aside is unacknowledged, so
//! it counts against the consumer's prefetch. The worker asks for a prefetch of twice its
//! concurrency: `concurrency` for handling and up to `concurrency` deliveries waiting aside. A
//! delivery that arrives early while `concurrency` others already wait is **parked** instead:
//! acknowledged after a copy went back through the cascade, which for a copy due in less than a
//! second means its 1 s level (so that it does not come straight back). It is then up to a second
//! *late*, never early. So waiting deliveries never take the handlers' share of the prefetch and
//! cannot stall the endpoint, as long as twice the concurrency is within
//! [`with_prefetch_limit`](RabbitMqOptions::with_prefetch_limit) (1000 by default: a concurrency
//! up to 500); above it the prefetch is capped (with a warning) and waiting deliveries can hold,
//! for less than a second each, prefetch the handlers would have used. How many wait at once is
//! about the rate of delayed messages times half a second (Little's law: each waits the
//! fraction of a second its delay had beyond whole seconds): 1000 delayed messages a second keep
//! about 500 waiting, so a worker whose concurrency is below that parks some of them and those
//! are up to a second late. Retries and parks the worker schedules less than a second ahead wait
//! the cascade's 1 s level as well.
//!
//! **At-least-once while waiting.** The delivery is acknowledged only once it was handled and
//! settled. If the consumer's connection is lost while it waits, the broker delivers it again
//! (at once, still early, so it waits again). The copy that was waiting cannot be settled any
//! more: when its timer fires the worker sees that and drops it without calling the handler, so
//! the message is handled from the redelivered copy only. A connection lost after that check,
//! while the handler runs, gives a duplicate as it does for any delivery in flight. At shutdown
//! the deliveries waiting aside are given back at once.
//!
//! A message **published to a topic** with a future not-before is delivered to every subscribed
//! endpoint at once; each endpoint's worker then parks its copy in the cascade without calling
//! the handler, so handlers still never run early (a consumer other than the worker sees the
//! early copy). Routing the topic copy itself through the cascade would block a level whenever
//! the topic had no subscriber, since at-least-once dead-lettering keeps retrying a message that
//! routes nowhere.
//!
//! # Fixed-TTL compatibility mode
//! [`with_fixed_ttl_retry_queue`](RabbitMqOptions::with_fixed_ttl_retry_queue) reuses what
//! many RabbitMQ systems already deploy: one retry queue per queue with a fixed TTL that dead-letters back. Any
//! delayed message goes there and comes back after the TTL; if that is before its not-before the
//! worker parks it again without calling the handler or counting an attempt, and when it is
//! early by less than the TTL
//! ([`Capabilities::scheduling_precision`](redeliver_core::Capabilities)) the worker waits out
//! the rest itself. A consumer other than the worker sees these early returns.
//!
//! # Dead letters: inspect, replay, purge
//! [`DeadLetters`](redeliver_core::DeadLetters) works on RabbitMQ with these costs and
//! guarantees:
//! - **Browsing** (list, show, group, dry runs) goes once round the dead-letter queue: each
//!   message is taken with `basic.get`, its very properties and body are published to the end
//!   of the queue and confirmed, and only then is the original acknowledged. After as many steps
//!   as the queue held at the start, every message is back in its place and order. One get, one
//!   confirmed publish and one ack per dead letter; never a requeue, which a quorum queue would
//!   count toward `x-delivery-limit` (browsing often would then quarantine the dead letters). A
//!   stream queue would be non-destructive, but dead letters live in a quorum (or classic)
//!   queue that workers consume with acknowledgements. A crash half-way leaves at most one
//!   message twice, never one missing.
//! - **Replays and purges** take the dead letters one `basic.get` at a time on a channel of
//!   their own (no prefetch pushing messages that would have to be given back); a replayed
//!   copy is confirmed before its dead letter is acknowledged, and dead letters not selected are
//!   copied to the end the same way, once round the queue.
//! - Counts are the queue's ready messages (a passive declare): dead letters a consumer holds
//!   are not counted.
//!
//! # Poison messages
//! A message that can never be settled must not stop its endpoint. The broker's delivery count
//! is the back-stop: quorum endpoint and dead-letter queues get `x-delivery-limit`
//! [`DEFAULT_DELIVERY_LIMIT`] (20, RabbitMQ 4's default;
//! [`with_delivery_limit`](RabbitMqOptions::with_delivery_limit),
//! [`without_delivery_limit`](RabbitMqOptions::without_delivery_limit)). A message handed out
//! 21 times without being settled is dead-lettered by the broker: from the endpoint queue into
//! the dead-letter queue, from there into the quarantine queue, which no reader of the framework
//! consumes, so it cannot poison anything further. It arrives there whole, with the broker's
//! `x-death` header (reason `delivery_limit`, the queues it went through). On the dead letters,
//! a message the broker moved arrives with the reason `dead-lettered by the broker (...)`.
//!
//! **How the count relates to attempts.** The broker counts returns of one message: every
//! delivery that ends without a settlement (a crash, a lost connection, a delivery abandoned at
//! shutdown). A retry or a park is a new message whose count starts at zero, so the limit bounds
//! the unsettled returns of each attempt, and `max_attempts` of the retry policy still bounds the
//! attempts. A message in flight when its consumer's connection is lost counts one return.
//!
//! **A delivery lapin cannot read** — properties that are not valid AMQP, such as a content type
//! that is not UTF-8 from a foreign producer (the broker stores it), or headers that grew beyond
//! the negotiated `frame_max` — ends the connection it arrives on: lapin cannot skip it. Each
//! consumer therefore has its **own connection** (named after the connection name with
//! `(consumer of Q)`), so publishing, settling and other endpoints go on. The consumer logs a
//! warning once (naming the queue, what lapin said and where the broker will move the message),
//! later returns at debug level, reconnects after the reconnect delay, and for 30 reconnect delays (30 s by default) after the
//! last unreadable delivery takes one delivery at a time, so that the messages behind the unreadable one are not handed out and
//! returned with it each time (which would count towards their own limit). The messages behind
//! it are handled once the broker has moved it on, after at most 21 deliveries of it, about one
//! per reconnect delay (1 s by default). lapin itself logs each failed read at error level.
//!
//! Classic queues have no delivery limit (a RabbitMQ restriction), and neither has a quorum queue
//! with [`without_delivery_limit`](RabbitMqOptions::without_delivery_limit): there an unreadable
//! message is delivered again for ever and blocks its consumer; it must be removed by hand (the
//! warning says so). Meanwhile the consumer backs off between reconnections like after any
//! lost connection (the reconnect delay, doubling up to its maximum), so it does not reconnect in
//! a storm. Use quorum queues where foreign producers write. The count of RabbitMQ 4 may not
//! count returns after a lost connection the way 3.x does (measured on 3.10.8 here).
//!

//! - Every publish is persistent (delivery mode 2), `mandatory` (except to topics, where no
//!   subscriber is not an error), and waits for the broker's confirm: `Ok` means the broker has
//!   the message. A negative confirm is [`Error::Rejected`](redeliver_core::Error::Rejected), a
//!   message that matched no queue [`Error::Unroutable`](redeliver_core::Error::Unroutable), a
//!   missing exchange [`Error::NotFound`](redeliver_core::Error::NotFound).
//! - Deliveries use manual acknowledgements. A retry, park or dead letter is a new copy that is
//!   confirmed **before** the original is acknowledged.
//! - Sizes are checked before publishing: a content header (properties and headers) larger than
//!   the negotiated `frame_max` (128 KiB by default), or body and properties together larger than
//!   [`with_max_message_size`](RabbitMqOptions::with_max_message_size) (128 MiB, RabbitMQ's
//!   default), is [`Error::InvalidMessage`](redeliver_core::Error::InvalidMessage) and is not
//!   sent. The framework's own texts are bounded (see [`redeliver_core::wire`]).
//! - A retry or park copy the broker would never take (too large, unroutable:
//!   [`Error::is_message_refused`](redeliver_core::Error::is_message_refused)) is not tried again
//!   at the same attempt for ever: the message is dead-lettered with reason
//!   [`copy refused`](redeliver_core::reasons::COPY_REFUSED) and a description saying why. If the
//!   dead-letter copy does not fit either, the delivery is rejected without requeue and the
//!   broker dead-letters the original itself (reason `rejected` in `x-death`), so it is kept. If
//!   its headers then no longer fit a frame, its readers cannot read it and the delivery limit
//!   moves it on to the quarantine (see [Poison messages](#poison-messages)).
//! - Acknowledgements are coalesced per consumer channel: settlements that arrive together
//!   become one `basic.ack` with `multiple` for the deliveries with no unsettled one before
//!   them; an ack behind a delivery still being handled waits for it at most 10 ms, then goes
//!   alone. A settlement resolves once the ack covering it is sent.
//! - Duplicates arise (1) when a copy was confirmed but the acknowledgement of the original was
//!   lost (connection cut in between): both come back; (2) when a handler finished but its
//!   acknowledgement was lost with the connection: the broker delivers the message again and
//!   the handler runs again (same message id and attempt); (3) when the connection was lost
//!   while a publish waited for its confirm: the transport publishes it again on the next
//!   connection (within the publish timeout), and the first may have been stored too; the same
//!   holds when a publish fails with a time-out and the caller sends again. Handlers must be
//!   idempotent; use the message id.
//! - A [`Delivery`](redeliver_core::Delivery) dropped without settling is given back at once
//!   with `basic.nack` (requeue), by the task that settles its channel's deliveries; if that
//!   task is gone, it comes back when its channel closes. A consumer's channel stays open until every delivery
//!   taken from it is settled or dropped, so stopping to consume never hands a message that is
//!   still being handled to someone else.
//!
//! # Headers and properties
//! Message id, content type, correlation id and reply-to travel in the AMQP properties of those
//! names; the **subject** in the `type` property (and, when publishing to a topic, as the
//! routing key, so that direct or topic exchanges provisioned elsewhere can route on it). The
//! framework's state (attempt, not-before, last failure, dead-letter reason) travels in the
//! headers named in [`redeliver_core::wire`]; broker history (`x-death`, `x-first-death-*`,
//! `x-last-death-*`, `x-delivery-count`) is removed before handlers see the headers. A message
//! with unreadable framework headers (a malformed text, or a value of another AMQP type than
//! the text the framework writes: an array, a table) is handed over with a problem, and the
//! worker dead-letters it. A message the broker dead-lettered by itself (quorum `x-delivery-limit`) arrives on the
//! dead letters with the reason `dead-lettered by the broker (delivery_limit)`.
//!
//! # Recovery
//! - Start-up tries the first connection
//!   [`with_connect_attempts`](RabbitMqOptions::with_connect_attempts) times, all within
//!   [`with_connect_timeout`](RabbitMqOptions::with_connect_timeout) (10 s), then fails with
//!   [`Error::Connection`](redeliver_core::Error::Connection) naming the URL (password hidden),
//!   or [`Error::Timeout`](redeliver_core::Error::Timeout) naming the URL and the bound when the
//!   broker never answered (a host that accepts TCP and stays silent). Each reconnection attempt
//!   is bounded by the same timeout.
//! - A refusal — wrong user or password (`ACCESS_REFUSED`), an unknown virtual host or a user
//!   without access to it (`NOT_ALLOWED`) — fails at once with
//!   [`Error::AccessDenied`](redeliver_core::Error::AccessDenied), which is not transient and
//!   quotes the broker. A URL parameter lapin would reject (`?heartbeat=abc`) is an
//!   [`Error::Config`](redeliver_core::Error::Config) naming it.
//! - The URL is held as a [`SecretUrl`](redeliver_core::secret::SecretUrl): no `Debug`,
//!   `Display`, error or log line of this crate shows its password.
//! - A lost connection is replaced by a supervisor task, backing off from 1 s to 30 s
//!   ([`with_reconnect_delay`](RabbitMqOptions::with_reconnect_delay)) until it succeeds or the
//!   transport is closed; the topology is declared again before the new connection is used.
//! - Consumer streams survive: each consumer has its own connection (see
//!   [Poison messages](#poison-messages)) and opens a new one when it is lost, once the
//!   transport's connection is up (so that the topology is declared again first). Deliveries
//!   taken before the loss cannot be settled any more (their settlement fails); the broker
//!   delivers them again. A transport with `n` consumers holds `n + 1` connections.
//! - Sends and settlements while disconnected wait for the new connection up to
//!   [`with_operation_timeout`](RabbitMqOptions::with_operation_timeout) (30 s), then fail with
//!   [`Error::Timeout`](redeliver_core::Error::Timeout).
//! - A negative confirm (a quorum queue with `reject-publish` refuses while it elects a leader)
//!   is published again, pausing 100 ms doubling to 1 s, until the same bound; then it is
//!   [`Error::Rejected`](redeliver_core::Error::Rejected).
//!
//! # Clusters
//! List the nodes in the URL, separated by commas:
//! `amqp://user:password@node1:5672,node2:5672,node3:5672/%2f`. Every connection goes to the node
//! the transport is on, trying the others in list order when it does not answer; a lost
//! connection moves the transport to the next node first, where it declares the topology again
//! and its consumers resume. Endpoint, dead-letter and delay-level queues are quorum queues, so
//! they keep their messages while a minority of nodes is down.
//!
//! After a node is lost, a delay level's at-least-once dead-lettering into the next level (or
//! into the endpoint queue) may go unconfirmed while that target elects a new leader; RabbitMQ
//! tries such a hop again only after `dead_letter_worker_publisher_confirm_timeout`, 180 s by
//! default (3.10 to 4.x), and meanwhile the message waits in the level queue's dead-letter
//! outbox (counted in `messages`, neither ready nor unacknowledged). Nothing is lost, but those
//! messages come late: set it lower in `advanced.config`, for example
//! `[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].`
//! (`chaos/RESULTS.md` in the repository shows both.)
//!
//! Prefetch (`basic.qos`, per consumer) is what the consumer asks for
//! ([`ConsumeOptions::prefetch`](redeliver_core::ConsumeOptions); a worker asks for twice its
//! concurrency, see [the last second](#the-last-second-waited-out-by-the-worker)), capped at
//! [`with_prefetch_limit`](RabbitMqOptions::with_prefetch_limit).

mod acks;
mod browse;
mod connection;
mod connector;
mod consumer;
mod convert;
mod errors;
mod limits;
mod naming;
mod options;
mod topology;
mod transport;

/// Entry points for the fuzz targets in the repository's `fuzz/` (compiled only with
/// `--cfg fuzzing`, which `cargo fuzz` sets); not part of the API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    use lapin::BasicProperties;
    use redeliver_core::Message;

    /// The message a delivery with these properties and body becomes, for a consumer of
    /// `prefix`'s queues, and the problem found in its framework headers.
    pub fn incoming(
        prefix: &str,
        properties: &BasicProperties,
        body: Vec<u8>,
        from_dead_letters: bool,
    ) -> (Message, Option<String>) {
        crate::convert::incoming(prefix, properties, body, from_dead_letters)
    }

    /// The properties that carry `message`, or why it cannot be sent.
    pub fn properties(message: &Message) -> Result<BasicProperties, redeliver_core::Error> {
        crate::convert::properties(message)
    }
}

pub use connector::RabbitMqConnector;
pub use options::{
    DEFAULT_DELIVERY_LIMIT, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_URL, DelayMode, MAX_DELAY_LEVELS,
    QueueType, RabbitMqOptions, TopologyMode,
};
pub use transport::{Infrastructure, MESSAGING_SYSTEM, RabbitMqTransport};
