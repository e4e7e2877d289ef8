//! [`RabbitMqTransport`]: the [`Transport`] implementation.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use redeliver_core::clock::until;
use redeliver_core::telemetry::{self, Operation};
use redeliver_core::{
    Capabilities, Clock, ConsumeOptions, DeliveryStream, Error, Message, Source, Topology,
    Transport,
};
use tracing::warn;

use crate::connection::{Shared, Target};
use crate::convert;
use crate::naming::{Destination, Scheduler, cascade_route, cascade_seconds, check_destination};
use crate::options::{DelayMode, RabbitMqOptions};

/// The `messaging.system` this transport's spans and metrics carry (OpenTelemetry's name for
/// RabbitMQ).
pub const MESSAGING_SYSTEM: &str = "rabbitmq";

/// The RabbitMQ transport. Cheap to clone; clones share one connection.
///
/// Create it with [`connect`](RabbitMqTransport::connect), declare the topology with
/// [`Transport::declare`], then hand it to a [`Worker`](redeliver_core::Worker) as an
/// `Arc<dyn Transport>`. The connection closes when the last clone (and the last delivery
/// stream) is dropped, or at [`close`](RabbitMqTransport::close).
#[derive(Clone)]
pub struct RabbitMqTransport {
    pub(crate) shared: Arc<Shared>,
    known_queues: Arc<Mutex<HashSet<String>>>,
    _alive: Arc<CloseOnDrop>,
}

impl std::fmt::Debug for RabbitMqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqTransport")
            .field("url", &self.shared.options.redacted_url())
            .field("closed", &self.shared.is_closed())
            .finish_non_exhaustive()
    }
}

struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let shared = Arc::clone(&self.0);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { shared.close().await });
        }
    }
}

impl RabbitMqTransport {
    /// Validates `options` and connects, trying the first connection
    /// [`connect_attempts`](RabbitMqOptions::with_connect_attempts) times before failing with an
    /// [`Error::Connection`] that names the (password-redacted) URL. Must be called inside a
    /// tokio runtime.
    pub async fn connect(options: RabbitMqOptions) -> Result<Self, Error> {
        let shared = Shared::connect(options).await?;
        Ok(RabbitMqTransport {
            _alive: Arc::new(CloseOnDrop(Arc::clone(&shared))),
            shared,
            known_queues: Arc::default(),
        })
    }

    /// Connects to `url` with default options.
    pub async fn connect_url(url: impl Into<String>) -> Result<Self, Error> {
        Self::connect(RabbitMqOptions::new(url)).await
    }

    /// The options this transport runs with.
    pub fn options(&self) -> &RabbitMqOptions {
        &self.shared.options
    }

    /// The queue of `endpoint`.
    pub fn queue_name(&self, endpoint: &str) -> String {
        self.shared.names.endpoint_queue(endpoint)
    }

    /// The dead-letter queue of `endpoint`.
    pub fn dead_letter_queue_name(&self, endpoint: &str) -> String {
        self.shared.names.dead_letter_queue(endpoint)
    }

    /// The quarantine queue of `endpoint`, where the broker moves a message that its dead-letter
    /// queue's readers could not settle within the delivery limit (see the
    /// [crate documentation](crate#poison-messages)). No reader of the framework consumes it.
    pub fn quarantine_queue_name(&self, endpoint: &str) -> String {
        self.shared.names.quarantine_queue(endpoint)
    }

    /// The exchange of `topic`.
    pub fn topic_exchange_name(&self, topic: &str) -> String {
        self.shared.names.topic_exchange(topic)
    }

    /// Every queue and exchange of the delay infrastructure this transport uses (in the order
    /// they can be deleted), for operators and tests that clean up.
    pub fn infrastructure(&self) -> Infrastructure {
        let names = &self.shared.names;
        let mut queues = Vec::new();
        let mut exchanges = Vec::new();
        if let Some(levels) = names.levels() {
            for level in 0..levels {
                queues.push(names.level(levels, level));
                exchanges.push(names.level(levels, level));
            }
            exchanges.push(names.delivery_exchange(levels));
            queues.push(names.unroutable());
            exchanges.push(names.unroutable());
        }
        Infrastructure { queues, exchanges }
    }

    /// Closes the connection. Deliveries not yet settled come back from the broker; sends and
    /// settlements after this fail with [`Error::Closed`]. Waits for the broker to confirm at
    /// most the [publish timeout](crate::RabbitMqOptions::with_operation_timeout), then gives up on the
    /// connection.
    pub async fn close(&self) {
        self.shared.close().await;
    }

    /// Publishes `message` straight to `queue` (through the default exchange).
    pub(crate) async fn send_now(&self, queue: &str, message: &Message) -> Result<(), Error> {
        let properties = convert::outgoing(&self.shared.names, message)?;
        self.shared
            .publish(
                Target {
                    exchange: "",
                    routing_key: queue,
                    mandatory: true,
                },
                &properties,
                message.body(),
                &format!("publishing message `{}` to queue `{queue}`", message.id()),
            )
            .await
    }

    /// Publishes `message` to `queue`, to be delivered (less than a second early, see
    /// [`cascade_seconds`]) at its not-before. A delay longer than the longest is refused, or,
    /// for the worker's copies (parking and retries, whose worker re-parks early arrivals),
    /// shortened to the longest.
    pub(crate) async fn schedule(
        &self,
        queue: &str,
        message: &Message,
        scheduler: Scheduler,
    ) -> Result<(), Error> {
        let clamp = scheduler == Scheduler::Worker;
        let delay = message
            .not_before()
            .map(|at| until(self.shared.clock.now(), at))
            .unwrap_or_default();
        let seconds = cascade_seconds(delay, scheduler);
        if seconds == 0 {
            return self.send_now(queue, message).await;
        }
        let doing = format!(
            "publishing message `{}` to queue `{queue}` with a delay of {seconds} s",
            message.id()
        );
        match &self.shared.options.delays {
            DelayMode::Cascade { levels } => {
                let max = (1u64 << levels) - 1;
                let seconds = if seconds > max {
                    if !clamp {
                        return Err(Error::invalid_message(format!(
                            "{doing}: the longest delay with {levels} delay levels is {max} s \
                             (2^{levels} - 1); raise RabbitMqOptions::with_delay_levels (at most \
                             28) or send later"
                        )));
                    }
                    max
                } else {
                    seconds
                };
                let destination = Destination::Queue(queue);
                check_destination(*levels, destination)?;
                let route = cascade_route(&self.shared.names, *levels, seconds, destination);
                let properties = convert::outgoing(&self.shared.names, message)?;
                self.shared
                    .publish(
                        Target {
                            exchange: &route.exchange,
                            routing_key: &route.routing_key,
                            mandatory: true,
                        },
                        &properties,
                        message.body(),
                        &doing,
                    )
                    .await
            }
            DelayMode::FixedTtlRetryQueue { .. } => {
                let retry = self
                    .shared
                    .names
                    .retry_queue(queue)
                    .expect("fixed-TTL mode");
                self.send_now(&retry, message).await
            }
        }
    }

    /// Checks once per queue name that `queue` exists: a delayed message to a missing queue
    /// would otherwise be accepted by the cascade and only found unroutable at the end.
    async fn ensure_queue(&self, queue: &str) -> Result<(), Error> {
        if self
            .known_queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(queue)
        {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.shared.options.operation_timeout;
        let conn = self
            .shared
            .current(deadline, None, &format!("checking queue `{queue}`"))
            .await?;
        let after = self.shared.options.operation_timeout;
        crate::connection::bounded(
            deadline,
            after,
            || format!("checking queue `{queue}`"),
            self.check_queue(&conn, queue),
        )
        .await
    }

    async fn check_queue(
        &self,
        conn: &crate::connection::Connected,
        queue: &str,
    ) -> Result<(), Error> {
        let channel = conn
            .connection
            .create_channel()
            .await
            .map_err(|e| crate::errors::from_client(e, "opening a channel to check a queue"))?;
        passive_declare(&channel, queue, &format!("checking queue `{queue}`")).await?;
        let _ = channel.close(200, "checked".into()).await;
        self.known_queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(queue.to_owned());
        Ok(())
    }
}

/// A passive declare of `queue` on `channel`: how many messages it holds ready, or
/// [`Error::NotFound`] if it does not exist; `doing` names any other failure.
pub(crate) async fn passive_declare(
    channel: &lapin::Channel,
    queue: &str,
    doing: &str,
) -> Result<u32, Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(
            convert::short("queue name", queue)?,
            passive,
            FieldTable::default(),
        )
        .await
        .map(|declared| declared.message_count())
        .map_err(|e| {
            if crate::errors::is_not_found(&e) {
                Error::not_found("queue", queue.to_owned())
                    .with_hint("declare the topology first (Transport::declare)".to_owned())
            } else {
                crate::errors::from_client(e, doing.to_owned())
            }
        })
}

/// The queues and exchanges of the delay infrastructure
/// ([`RabbitMqTransport::infrastructure`]), each in the order they can be deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Infrastructure {
    /// The queues.
    pub queues: Vec<String>,
    /// The exchanges.
    pub exchanges: Vec<String>,
}

#[async_trait]
impl Transport for RabbitMqTransport {
    fn clock(&self) -> Clock {
        self.shared.clock.clone()
    }

    fn capabilities(&self) -> Capabilities {
        let options = &self.shared.options;
        match (&options.delays, options.max_delay()) {
            (DelayMode::Cascade { .. }, Some(max)) => {
                Capabilities::new(Duration::from_secs(1)).with_max_delay(max)
            }
            (DelayMode::Cascade { .. }, None) => Capabilities::new(Duration::from_secs(1)),
            // Early returns come back every `ttl`; the worker waits out the rest in process
            // rather than parking once more for a whole `ttl`.
            (DelayMode::FixedTtlRetryQueue { ttl, .. }, _) => Capabilities::new(*ttl),
        }
        .with_messaging_system(MESSAGING_SYSTEM)
    }

    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.shared.declare(topology).await
    }

    /// Sends to the queue of `endpoint`, `{prefix}{endpoint}`; a broker-named queue (`amq.gen-*`,
    /// direct reply-to `amq.rabbitmq.reply-to.*`), as a plain AMQP requester puts in `reply_to`,
    /// is sent to as it is, so a responder can answer it with
    /// [`request_reply::reply_to`](redeliver_core::request_reply::reply_to) whatever the prefix.
    async fn send(&self, endpoint: &str, message: Message) -> Result<(), Error> {
        let (message, span) =
            telemetry::produce(MESSAGING_SYSTEM, Operation::Send, endpoint, message);
        let result = self.send_to_endpoint(endpoint, message).await;
        span.finish(&result);
        result
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error> {
        let (message, span) =
            telemetry::produce(MESSAGING_SYSTEM, Operation::Publish, topic, message);
        let result = self.publish_to_topic(topic, message).await;
        span.finish(&result);
        result
    }

    async fn consume(
        &self,
        source: &Source,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, Error> {
        let limit = self.shared.options.prefetch_limit;
        let prefetch = u16::try_from(options.prefetch)
            .unwrap_or(u16::MAX)
            .clamp(1, limit);
        if options.prefetch > usize::from(limit) {
            warn!(
                source = %source,
                asked = options.prefetch,
                limit,
                "the prefetch is capped at the prefetch limit (RabbitMqOptions::with_prefetch_limit): \
                 a worker asks for twice its concurrency, so that deliveries waiting aside for \
                 their not-before never take the handlers' share; with less, they can for up to \
                 a second each"
            );
        }
        crate::consumer::consume(self.clone(), source.clone(), prefetch).await
    }

    /// A browse once round the dead-letter queue: see the crate's "Dead letters: inspect,
    /// replay, purge".
    async fn peek_dead_letters(&self, endpoint: &str, max: usize) -> Result<Vec<Message>, Error> {
        let queue = self.shared.names.dead_letter_queue(endpoint);
        self.browse(&queue, max).await
    }

    async fn take_dead_letters(
        &self,
        endpoint: &str,
        _held: usize,
    ) -> Result<DeliveryStream, Error> {
        self.take(endpoint).await
    }

    async fn count_dead_letters(&self, endpoint: &str) -> Result<u64, Error> {
        let queue = self.shared.names.dead_letter_queue(endpoint);
        self.ready_count(&queue).await
    }

    async fn close(&self) {
        RabbitMqTransport::close(self).await;
    }
}

impl RabbitMqTransport {
    /// [`Transport::send`] once the trace context is in the headers.
    async fn send_to_endpoint(&self, endpoint: &str, message: Message) -> Result<(), Error> {
        let queue = convert::destination_queue(&self.shared.names, endpoint);
        let delayed = message.not_before().is_some_and(|at| {
            cascade_seconds(until(self.shared.clock.now(), at), Scheduler::Send) > 0
        });
        if delayed {
            self.ensure_queue(&queue).await?;
        }
        self.schedule(&queue, &message, Scheduler::Send).await
    }

    /// [`Transport::publish`] once the trace context is in the headers.
    async fn publish_to_topic(&self, topic: &str, message: Message) -> Result<(), Error> {
        let exchange = self.shared.names.topic_exchange(topic);
        let properties = convert::outgoing(&self.shared.names, &message)?;
        // Not mandatory: a topic nobody subscribes to drops the message, as the contract says.
        // A message with a future not-before is delivered at once and parked by each
        // subscriber's worker; see the crate documentation.
        self.shared
            .publish(
                Target {
                    exchange: &exchange,
                    routing_key: message.subject().unwrap_or(""),
                    mandatory: false,
                },
                &properties,
                message.body(),
                &format!("publishing message `{}` to topic `{topic}`", message.id()),
            )
            .await
    }
}
