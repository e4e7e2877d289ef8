//! The Azure Service Bus transport of [redeliver](https://docs.rs/redeliver): the same handlers
//! as on RabbitMQ or in memory, on Service Bus queues and topics, through the `azservicebus`
//! 0.25.1 AMQP client.
//!
//! ```no_run
//! # async fn demo() -> Result<(), redeliver_core::Error> {
//! use std::sync::Arc;
//! use redeliver_core::{Message, Topology, Transport};
//! use redeliver_servicebus::{ServiceBusOptions, ServiceBusTransport};
//!
//! let transport = ServiceBusTransport::connect(
//!     "Endpoint=sb://my-namespace.servicebus.windows.net/;SharedAccessKeyName=...;SharedAccessKey=...",
//!     ServiceBusOptions::default(),
//! )
//! .await?;
//! // Checks that the queues, topics and subscriptions exist (they are provisioned outside AMQP).
//! transport
//!     .declare(&Topology::new().endpoint("webhook").subscribe("events", "webhook"))
//!     .await?;
//! transport.send("webhook", Message::json(&"hello")?).await?;
//! # let _: Arc<dyn Transport> = Arc::new(transport);
//! # Ok(()) }
//! ```
//!
//! # Connecting
//! [`ServiceBusTransport::connect`] checks the connection string before connecting: it needs
//! an `Endpoint=sb://<namespace>/` and either `SharedAccessKeyName` with `SharedAccessKey`, or
//! `SharedAccessSignature`; `UseDevelopmentEmulator=true` (the Service Bus emulator) needs no
//! key and always connects over plain AMQP. A mistake is an [`Error::Config`] that names what is
//! missing or wrong. The client connects to port 5671 (TLS) or 5672 (plain AMQP) of the host
//! whatever the endpoint says, so an endpoint naming another port is refused rather than
//! silently not honoured. Making a connection takes at most
//! [`ServiceBusOptions::connect_timeout`] (default 10 s), then fails with [`Error::Timeout`]
//! naming the host and port. Credentials the namespace refuses are [`Error::AccessDenied`].
//! The shared access key (or signature) never appears in an error, a log line or a `Debug`
//! form: the connection string is held as a [`SecretUrl`] and shown redacted.
//!
//! # Entities, and how to provision them
//! Service Bus entities cannot be created over AMQP, so [`Transport::declare`] only **checks**
//! that they exist and fails with [`Error::NotFound`] naming the first one missing. Provision,
//! with the Azure portal, CLI, Bicep or Terraform:
//! - one **queue per endpoint**, named like the endpoint; its dead-letter sub-queue
//!   (`<queue>/$DeadLetterQueue`) holds the endpoint's dead letters;
//! - for each topic, a **topic** of that name and, for every endpoint subscribed to it, a
//!   **subscription named like the endpoint** with **`ForwardTo` = the endpoint's queue**.
//!
//! A message published to a topic reaches every subscribed endpoint's queue. A retry is sent
//! straight to the queue of the endpoint that failed, so the other endpoints never see it.
//! Queue settings that matter: the lock duration (locks are renewed, see below), the maximum
//! delivery count (deliveries that end without a settlement — a crash, a lost lock — count
//! towards it; the framework's own retries do not, since each retry is a new message), and the
//! maximum message size (see "Size limits"). **Duplicate detection** may be on (see "Which id
//! is which").
//!
//! # What goes where
//! - Content type, correlation id, reply-to and subject are the native properties
//!   (`ContentType`, `CorrelationId`, `ReplyTo`, `Subject`); the message id is described below.
//! - Application headers and the framework's state (attempt, not-before, last failure, dead-letter
//!   reason; names in [`redeliver_core::wire`]) are application properties. A message whose
//!   framework properties cannot be read is handed over with a problem (see
//!   [`Delivery::with_problem`](redeliver_core::Delivery::with_problem)) and dead-lettered by the
//!   worker with reason [`MALFORMED_HEADERS`](redeliver_core::reasons::MALFORMED_HEADERS). The
//!   framework writes its properties as strings; from other producers it also reads a whole
//!   number as the attempt or the last delay and an AMQP timestamp as the not-before. Any other
//!   type in a framework property (a number where text is expected, a boolean, a float, binary
//!   data, a UUID, a described list or map) is such a problem, never ignored or guessed at.
//!   Application properties that are not strings become text headers (numbers, booleans,
//!   UUIDs) or, without a text form (binary, described values), are left out.
//! - A not-before in the future is the scheduled enqueue time (`ScheduledEnqueueTime`): the
//!   broker holds the message. It is rounded up to the millisecond, so never early; the
//!   declared [`scheduling_precision`](Capabilities::scheduling_precision) is 1 s to absorb
//!   clock differences between this machine and the broker. There is no longest delay.
//!
//! # Which id is which
//! - A message the application sends has the framework's message id as its native
//!   `MessageId`. With duplicate detection on, an application's second send of the same id
//!   within the window is dropped by Service Bus, as it would be without this framework.
//! - A **copy** — the message a retry or a park sends in place of the delivery it settles — has
//!   a native `MessageId` of its own, `redeliver:<sequence number of that delivery>:<id>` (cut to
//!   the 128 bytes the client allows), and carries the framework's id in the application property
//!   [`MESSAGE_ID_PROPERTY`] (`redeliver-message-id`). Handlers, dead-letter handlers and
//!   [`Message::id`](redeliver_core::Message::id) always see the framework's id.
//!   So duplicate detection never drops a retry or a park, since no two deliveries make a copy
//!   with the same native id, while a copy sent twice for the same delivery (after a time-out, or
//!   by a process that crashed before completing the original and got it again) is dropped
//!   as the duplicate it is. Tools looking at a queue see the native id; match on the property
//!   to follow one message through its retries.
//!
//! # Size limits
//! A standard-tier Service Bus entity accepts messages up to 256 KiB (premium: configurable),
//! and on every tier at most 64 KiB of header sections (properties, application properties and
//! annotations, encoded). A message over the size limit is refused by Service Bus with
//! `amqp:link:message-size-exceeded`; one over the header limit was reported to be refused with
//! `amqp:internal-error` ("please retry the operation"), so the transport refuses it itself
//! before sending. Both are [`Error::InvalidMessage`] ([`Error::is_message_refused`]: sending
//! it again fails the same way), never retried. The framework's
//! state adds well under 8 KiB to a copy (failure and dead-letter texts are cut to
//! [`wire::MAX_REASON_BYTES`](redeliver_core::wire::MAX_REASON_BYTES) and
//! [`wire::MAX_DESCRIPTION_BYTES`](redeliver_core::wire::MAX_DESCRIPTION_BYTES)), but a message
//! close to the limit can fit while its copy does not: such a retry or park dead-letters the
//! message (see below) instead of giving it back to be refused again for ever.
//!
//! # Consuming and settling
//! Consumers receive in peek-lock mode and hand out at most [`ConsumeOptions::prefetch`]
//! deliveries unsettled (the worker's concurrency). While the queue seems empty they ask for
//! one message at a time; once messages come, they ask for as many as the worker can take in
//! one call, which waits at most [`ServiceBusOptions::receive_batch_wait`] for the batch to
//! fill. Every message received is handed out or given back (abandoned), never left locked
//! unseen. Each consumer has its own connection.
//! - **Complete** completes the message.
//! - **Retry / park** ([`Delivery::retry`](redeliver_core::Delivery::retry),
//!   [`park`](redeliver_core::Delivery::park)) sends a copy to the same queue, scheduled at its not-before, with the framework's message id
//!   (see "Which id is which") and the attempt the framework gave it, **then** completes the
//!   original. If the process stops in between, the original comes back too: **duplicates are
//!   possible, loss is not**. If the copy cannot be sent, the original is abandoned (delivered
//!   again at once) and the settlement reports the error — except when the broker refuses the
//!   copy for what it is ([`Error::is_message_refused`], for example too large): then the
//!   original is dead-lettered natively (its body kept) with reason
//!   [`COPY_REFUSED`](redeliver_core::reasons::COPY_REFUSED), a description saying why (at most
//!   [`wire::MAX_DESCRIPTION_BYTES`](redeliver_core::wire::MAX_DESCRIPTION_BYTES), within the
//!   4096 characters Microsoft's SDKs allow a `DeadLetterErrorDescription`), its attempt, and the
//!   failure that asked for the retry, and the settlement answers
//!   [`Settled::DeadLettered`](redeliver_core::Settled::DeadLettered) (the worker counts it as
//!   dead-lettered; a warning is logged). The order of these steps is core's, the same on every
//!   transport (see [`redeliver_core::transport::delivery`]).
//! - **Dead-letter** uses Service Bus dead-lettering with `DeadLetterReason` and
//!   `DeadLetterErrorDescription` from the message's dead-letter info, and passes the
//!   framework's state as properties to modify. The message keeps its application properties,
//!   so attempt and last failure are readable from the dead letter; its reason and description
//!   are read back from the native properties when the framework's are absent (for example,
//!   when the broker itself dead-lettered it with `MaxDeliveryCountExceeded`).
//! - **Abandon** abandons: the message is available again at once and its delivery count grows.
//! - **Dead letters** are consumed from `<queue>/$DeadLetterQueue`. A dead letter cannot be sent
//!   back to a dead-letter sub-queue, so a dead-letter handler's retry keeps the dead letter
//!   **locked until its not-before** (renewing the lock), then abandons it with the new framework
//!   state, so it is delivered again no earlier than asked. If the consumer closes first, such
//!   dead letters are abandoned at once and parked again by the next worker. Dead-lettering a
//!   dead letter is refused with an error (the worker never asks for it) and gives it back.
//! - **Dead-letter operations** ([`redeliver_core::dead_letters`]): listing and grouping peek at
//!   `<queue>/$DeadLetterQueue` (nothing is locked or moved); counting peeks through every dead
//!   letter, in pages of 250, because Service Bus counts only through its administration API;
//!   a replay or purge takes them in peek-lock and settles each after its copy is sent.
//! - **Lock renewal.** A delivery's lock is renewed halfway to `locked_until` for as long as it
//!   is held, and no longer once settled. If a renewal fails it is logged and not retried: the
//!   lock runs out and the broker delivers the message again. Settling after the lock ran out
//!   reports an error (the client does not wait for the broker's answer, so the transport
//!   checks the lock's end itself).
//! - **A delivery dropped unsettled** is abandoned by its consumer at once (the drop sends the
//!   consumer a message; no task is spawned). If the whole process dies, the lock runs out and
//!   the broker delivers the message again.
//!
//! # Sending, and the lost-send hazard
//! `azservicebus` 0.25.1 was seen to report a send the broker *rejected* as a success when its
//! own retries are on. This transport sets the client's `max_retries` to 0 and retries itself:
//! [`ServiceBusOptions::send_attempts`] tries in all, with doubling pauses, only for transient
//! errors (connection, time-out). A rejected send (`amqp:not-allowed`) is [`Error::Rejected`]
//! at once, a message over a size limit [`Error::InvalidMessage`]; a missing entity is
//! [`Error::NotFound`]. A send retried after a time-out may have reached the broker the first
//! time: again, duplicates, never loss (a retry's or a park's copy sent twice has the same
//! native id, so duplicate detection, when on, drops the second).
//!
//! Each send waits for the broker's answer on its link, and the client's send holds the link
//! until then, so the transport keeps up to [`ServiceBusOptions::senders_per_entity`] sender
//! links per queue or topic, opened as concurrent sends need them, and a send takes a free one.
//! Every link is handled on its own as above: one whose send failed transiently is closed and
//! made again for the next send; a lost connection is made again too, and the other links on
//! it fail their next send (transiently, so it is retried) and are made again in turn. Sends
//! from one task, one after the other, still reach the broker in order; concurrent sends never
//! had an order.
//!
//! # Closing
//! Consumers close themselves once their stream is dropped and every delivery is settled:
//! they give back (abandon) what they still hold, including messages received ahead of the
//! stream, and close their receiver. Call [`ServiceBusTransport::close`] before the process
//! ends: it waits for those consumers, then closes the senders and the connection with
//! `dispose()`. A process that ends without it loses nothing, but the messages its consumers
//! held stay locked until their lock duration runs out. (Dropping `azservicebus` links without
//! `dispose()` can end the client's whole AMQP session.) Dropping the transport closes the
//! sending connection in the background.
//!
//! # Known limits of the client stack (`azservicebus` 0.25.1, `fe2o3-amqp` 0.14.1)
//! - `fe2o3-amqp` files a sent transfer (and a management or CBS request) as unsettled only
//!   *after* writing it. On a multi-threaded runtime, a peer that answers within microseconds
//!   (a broker on loopback) can have its outcome processed first, and the outcome is lost: the
//!   call fails after [`ServiceBusOptions::try_timeout`]. For a send this means a retry and a
//!   possible duplicate, never a loss. Over a real network the window is far shorter than a
//!   round trip; the tests of this crate, which use a broker on loopback, run on current-thread
//!   runtimes.
//! - When a receive call's own wait ends, the client drains the link's credit (an earlier test
//!   broker then delivered nothing more on that link; the current one does). Idle
//!   single-message receives are therefore given up by the consumer itself (after
//!   [`ServiceBusOptions::receive_wait`]) before the client's wait ends, leaving a credit of one
//!   message open; only batch receives, which follow a received message, end by draining.
//! - A receive call for several messages keeps those it has received inside itself until it
//!   returns: dropped half-way, they would stay locked and unseen until their locks ran out.
//!   Batch receives are never dropped (the consumer waits for them, bounded by
//!   [`ServiceBusOptions::try_timeout`] plus a margin for a connection that hangs).
//! - Link prefetch (the client's automatic credit) is not used: it sets the credit back to its
//!   full value on every few settlements, whatever the client already holds, so a consumer
//!   slower than its queue would end up holding ever more messages locked.
//! - The management client takes the next reply on its link as the answer, without matching
//!   it to the request; a renewal whose reply is lost or late is reported as failed (the lock
//!   then runs out and the message is delivered again).
//! - A message whose application properties hold a bare list, map or array (AMQP allows only
//!   simple and described values there) cannot be decoded by `fe2o3-amqp`: the receive call
//!   fails, so the message is never handed out (messages received in the same batch stay
//!   locked, unseen, until their locks run out); the consumer reports the error and the worker
//!   consumes again. Service Bus delivers such a message again when its lock runs out, until
//!   its maximum delivery count dead-letters it (`MaxDeliveryCountExceeded`). Described lists
//!   and maps, which the client can decode, are reported as malformed headers as above.
//! - Subscriptions are checked by attaching a receiver that never asks for a message. On a
//!   namespace that forbids receiving from a forwarding subscription, check with the Azure
//!   tooling instead and skip [`Transport::declare`].

mod connection_string;
mod connector;
mod consumer;
mod convert;
mod errors;
mod options;
mod peek;
mod shared;

/// Entry points for the fuzz targets in the repository's `fuzz/` (compiled only with
/// `--cfg fuzzing`, which `cargo fuzz` sets); not part of the API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    use fe2o3_amqp_types::messaging::{Body, Message as AmqpMessage};
    use redeliver_core::Message;
    use serde_amqp::Value;

    /// The message a received AMQP message becomes, and the problem found in its properties.
    pub fn from_amqp(
        raw: &AmqpMessage<Body<Value>>,
        sequence_number: i64,
        dead_letter: bool,
    ) -> (Message, Option<String>) {
        let received = crate::convert::incoming::from_amqp(raw, sequence_number, dead_letter);
        (received.message, received.problem)
    }
}

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redeliver_core::secret::SecretUrl;
use redeliver_core::telemetry::{self, Operation};
use redeliver_core::{
    Capabilities, Clock, ConsumeOptions, DeliveryStream, Error, Message, Source, Topology,
    Transport,
};

pub use crate::connector::ServiceBusConnector;
pub use crate::convert::ids::MESSAGE_ID_PROPERTY;
pub use crate::options::ServiceBusOptions;
use crate::shared::Shared;

/// Redeliver's transport on Azure Service Bus. See the [crate docs](crate) for the entities it
/// expects and how each settlement is carried out.
///
/// Cheap to clone: clones share the sending connection.
#[derive(Clone)]
pub struct ServiceBusTransport {
    shared: Arc<Shared>,
}

impl fmt::Debug for ServiceBusTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceBusTransport")
            .field("connection_string", &self.shared.connection_string)
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl ServiceBusTransport {
    /// Connects to the namespace of `connection_string`
    /// (`Endpoint=sb://<namespace>/;SharedAccessKeyName=...;SharedAccessKey=...`, or
    /// `SharedAccessSignature=...` instead of the key; `UseDevelopmentEmulator=true` for the
    /// Service Bus emulator, which needs no key and is always plain AMQP). The connection
    /// string is checked before connecting; its key never appears in an error, a log line or
    /// a `Debug` form.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field if `options` are invalid, or naming what is wrong
    /// with the connection string (a missing key, an `Endpoint` with a port the client would
    /// not use, not a connection string at all); [`Error::Timeout`] naming the host if
    /// connecting takes longer than [`ServiceBusOptions::connect_timeout`];
    /// [`Error::AccessDenied`] if the namespace refuses the credentials;
    /// [`Error::Connection`] if it cannot be reached.
    pub async fn connect(
        connection_string: impl Into<SecretUrl>,
        options: ServiceBusOptions,
    ) -> Result<Self, Error> {
        let shared = Arc::new(Shared::new(connection_string.into(), options)?);
        shared.connect().await?;
        Ok(ServiceBusTransport { shared })
    }

    /// The options in use.
    pub fn options(&self) -> &ServiceBusOptions {
        &self.shared.options
    }

    /// Waits for the consumers whose delivery streams were dropped to give back the messages
    /// they still hold (locked deliveries not yet settled, and any received ahead) and close
    /// (at most [`ServiceBusOptions::try_timeout`]), then closes every sender and the sending
    /// connection with `dispose()`. Sending afterwards connects again. Consumers whose streams
    /// are still open are not affected: they close when their stream is dropped.
    pub async fn close(&self) {
        self.shared.close().await;
    }
}

/// The `messaging.system` this transport's spans and metrics carry (OpenTelemetry's name for
/// Azure Service Bus).
pub const MESSAGING_SYSTEM: &str = "servicebus";

#[async_trait]
impl Transport for ServiceBusTransport {
    fn clock(&self) -> Clock {
        self.shared.clock.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Duration::from_secs(1)).with_messaging_system(MESSAGING_SYSTEM)
    }

    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.shared.check(topology).await
    }

    async fn send(&self, endpoint: &str, message: Message) -> Result<(), Error> {
        let (message, span) =
            telemetry::produce(MESSAGING_SYSTEM, Operation::Send, endpoint, message);
        let result = self
            .shared
            .send_entity(endpoint, "queue", &message, None)
            .await;
        span.finish(&result);
        result
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error> {
        let (message, span) =
            telemetry::produce(MESSAGING_SYSTEM, Operation::Publish, topic, message);
        let result = self
            .shared
            .send_entity(topic, "topic", &message, None)
            .await;
        span.finish(&result);
        result
    }

    async fn consume(
        &self,
        source: &Source,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, Error> {
        consumer::consume(&self.shared, source, options).await
    }

    /// A peek at `<queue>/$DeadLetterQueue`: nothing is locked or moved.
    async fn peek_dead_letters(&self, endpoint: &str, max: usize) -> Result<Vec<Message>, Error> {
        peek::dead_letters(&self.shared, endpoint, Some(max)).await
    }

    /// Service Bus counts messages only through its administration API, which the transport
    /// does not use: the count is a peek through every dead letter, in pages of 250.
    async fn count_dead_letters(&self, endpoint: &str) -> Result<u64, Error> {
        let all = peek::dead_letters(&self.shared, endpoint, None).await?;
        Ok(u64::try_from(all.len()).unwrap_or(u64::MAX))
    }

    async fn close(&self) {
        ServiceBusTransport::close(self).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn invalid_options_are_refused_before_connecting() {
        let options = ServiceBusOptions::default().with_send_attempts(0);
        let e = ServiceBusTransport::connect("Endpoint=sb://127.0.0.1/", options)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::Config { field, .. } if field == "send_attempts"),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_string_that_cannot_be_parsed_names_the_field() {
        let e =
            ServiceBusTransport::connect("not a connection string", ServiceBusOptions::default())
                .await
                .unwrap_err();
        assert!(
            matches!(&e, Error::Config { field, .. } if field == "connection_string"),
            "{e:?}"
        );
    }

    #[test]
    fn debug_output_hides_the_connection_string() {
        let connection_string =
            SecretUrl::new("Endpoint=sb://x/;SharedAccessKeyName=n;SharedAccessKey=secret");
        let shared = Shared::new(connection_string, ServiceBusOptions::default()).unwrap();
        let transport = ServiceBusTransport {
            shared: Arc::new(shared),
        };
        let shown = format!("{transport:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("Endpoint=sb://x/"), "{shown}");
    }
}
