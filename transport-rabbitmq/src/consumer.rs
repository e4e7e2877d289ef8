//! Consuming: a delivery stream that survives reconnections, and settlement of deliveries.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Consumer};
use redeliver_core::{Delivery, DeliveryStream, Error, Message, MessageId, Settle, Source, Stored};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::RabbitMqTransport;
use crate::acks::Acks;
use crate::connection::{Connected, Shared, bounded, close_connection};
use crate::convert;
use crate::errors;
use crate::naming::Scheduler;

/// For how many reconnect delays a consumer takes one delivery at a time after lapin could not
/// read one, so that the messages behind an unreadable one are not handed out (and returned,
/// counting towards their delivery limit) each time it closes the connection. The unreadable
/// message comes back about once per reconnect delay: quiet for this many, it is gone.
const CAREFUL_DELAYS: u32 = 30;

/// A consumer's own connection: a delivery lapin cannot read ends the connection it came on,
/// and must not take the transport's publishing or other consumers down with it. Closed once
/// the consumer and every channel on it are done, or when the transport is closed.
struct Own {
    conn: Arc<Connected>,
    done: CancellationToken,
}

impl Own {
    fn start(shared: &Shared, conn: Arc<Connected>) -> Arc<Own> {
        let done = CancellationToken::new();
        let closed = shared.closed_token().clone();
        let timeout = shared.options.operation_timeout;
        tokio::spawn({
            let conn = Arc::clone(&conn);
            let done = done.clone();
            async move {
                tokio::select! {
                    _ = closed.cancelled() => {}
                    _ = done.cancelled() => {}
                }
                close_connection(&conn, timeout).await;
            }
        });
        Arc::new(Own { conn, done })
    }
}

impl Drop for Own {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

/// A consumer on one channel of the consumer's connection.
struct Open {
    own: Arc<Own>,
    channel: Channel,
    consumer: Consumer,
    /// Sends the acks and nacks of the channel, which it keeps open until all are settled.
    acks: Acks,
}

struct State {
    transport: RabbitMqTransport,
    /// Shared with every delivery and settler: a delivery copies no name.
    source: Arc<Source>,
    queue: Arc<str>,
    prefetch: u16,
    current: Option<Open>,
    /// The consumer's connection, reused for a new channel while it is up.
    connection: Option<Arc<Own>>,
    /// Back-off before opening a consumer again after it ended or failed.
    pause: Option<Duration>,
    /// Taking one delivery at a time until then, after lapin could not read one.
    careful_until: Option<Instant>,
    /// The careful period is over: the consumer was cancelled, to be opened again with the
    /// full prefetch.
    leaving_careful: bool,
    /// Whether an unreadable delivery was reported (once per stream, not at every return).
    poison_reported: bool,
    /// The pause after the last unreadable delivery in a row, growing when the queue has no
    /// delivery limit (the same message comes back for ever: no reconnection storm).
    unreadable_pause: Option<Duration>,
}

/// Opens a consumer on `queue`; see [`RabbitMqTransport`]'s `consume`.
pub(crate) async fn consume(
    transport: RabbitMqTransport,
    source: Source,
    prefetch: u16,
) -> Result<DeliveryStream, Error> {
    let shared = Arc::clone(&transport.shared);
    let queue = shared.names.source_queue(&source);
    let deadline = Instant::now() + shared.options.operation_timeout;
    // Once the transport's connection is up, the topology is declared.
    shared
        .current(deadline, None, &format!("consuming queue `{queue}`"))
        .await?;
    let first = open(&shared, None, &queue, prefetch).await?;
    let state = State {
        transport,
        source: Arc::new(source),
        queue: queue.into(),
        prefetch,
        connection: Some(Arc::clone(&first.own)),
        current: Some(first),
        pause: None,
        careful_until: None,
        leaving_careful: false,
        poison_reported: false,
        unreadable_pause: None,
    };
    Ok(futures::stream::unfold(state, next).boxed())
}

/// Opens a consumer, on `connection` if it is still up, else on a new connection.
async fn open(
    shared: &Shared,
    connection: Option<Arc<Own>>,
    queue: &str,
    prefetch: u16,
) -> Result<Open, Error> {
    let after = shared.options.operation_timeout;
    let deadline = Instant::now() + after;
    let own = match connection.filter(|own| own.conn.is_up()) {
        Some(own) => own,
        None => {
            let conn = shared.open(Some(&format!("consumer of {queue}"))).await?;
            Own::start(shared, conn)
        }
    };
    bounded(
        deadline,
        after,
        || format!("opening a consumer on `{queue}`"),
        open_unbounded(own, queue, prefetch),
    )
    .await
}

async fn open_unbounded(own: Arc<Own>, queue: &str, prefetch: u16) -> Result<Open, Error> {
    let channel =
        own.conn.connection.create_channel().await.map_err(|e| {
            errors::from_client(e, format!("opening a channel to consume `{queue}`"))
        })?;
    // Per consumer (global = false): at most `prefetch` unsettled deliveries at once.
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .map_err(|e| errors::from_client(e, format!("setting the prefetch of `{queue}`")))?;
    let consumer = channel
        .basic_consume(
            convert::short("queue name", queue)?,
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            if errors::is_not_found(&e) {
                Error::not_found("queue", queue.to_owned())
                    .with_hint("declare the topology first (Transport::declare)".to_owned())
            } else {
                errors::from_client(e, format!("consuming queue `{queue}`"))
            }
        })?;
    Ok(Open {
        acks: Acks::start(channel.clone(), Arc::clone(&own)),
        own,
        channel,
        consumer,
    })
}

impl State {
    fn careful(&self) -> bool {
        self.careful_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// Where the broker moves a message of this queue that reaches the delivery limit.
    fn limit_destination(&self) -> String {
        let names = &self.transport.shared.names;
        let endpoint = self.source.endpoint_name();
        if self.source.is_dead_letters() {
            format!(
                "the quarantine queue `{}`",
                names.quarantine_queue(endpoint)
            )
        } else {
            format!(
                "the dead-letter queue `{}`",
                names.dead_letter_queue(endpoint)
            )
        }
    }

    /// lapin could not read a delivery, which ended the connection: say so once, and take one
    /// delivery at a time for a while.
    fn unreadable(&mut self, error: &lapin::Error) {
        let period = self.transport.shared.options.reconnect_delay * CAREFUL_DELAYS;
        self.careful_until = Some(Instant::now() + period);
        if self.poison_reported {
            debug!(queue = %self.queue, error = %error, "an unreadable delivery again");
            return;
        }
        self.poison_reported = true;
        let options = &self.transport.shared.options;
        let fate = match options.delivery_limit() {
            Some(limit) => format!(
                "the broker delivers it again and, once it has come back {limit} times, \
                 dead-letters it into {} (reason `delivery_limit` in its `x-death` header)",
                self.limit_destination()
            ),
            None => "the queue has no delivery limit, so the broker delivers it again for \
                     ever: remove it by hand (or set a delivery limit)"
                .to_owned(),
        };
        warn!(
            queue = %self.queue,
            error = %error,
            "a delivery could not be read (properties that are not valid AMQP, such as a \
             content type that is not UTF-8, or headers too large for a frame), which closed \
             the consumer's connection; {fate}. Meanwhile this consumer takes one delivery at a time. \
             Further returns of it are logged at debug level."
        );
    }
}

async fn next(mut state: State) -> Option<(Result<Delivery, Error>, State)> {
    let shared = Arc::clone(&state.transport.shared);
    loop {
        if shared.is_closed() {
            return None;
        }
        if state.current.is_none() {
            if let Some(pause) = state.pause
                && !shared.pause(pause).await
            {
                return None;
            }
            // Wait for the transport's connection, which is up only once the topology is
            // declared again after a reconnection.
            shared.connected_eventually(None).await.ok()?;
            let prefetch = if state.careful() { 1 } else { state.prefetch };
            match open(&shared, state.connection.take(), &state.queue, prefetch).await {
                Ok(open) => {
                    if state.poison_reported && state.careful() {
                        debug!(queue = %state.queue, "consuming again, one delivery at a time");
                    } else {
                        info!(queue = %state.queue, prefetch, "consuming again");
                    }
                    state.connection = Some(Arc::clone(&open.own));
                    state.current = Some(open);
                    state.pause = None;
                }
                Err(e) => {
                    state.pause = Some(next_pause(state.pause, &shared.options));
                    if matches!(e, Error::Connection { .. } | Error::Timeout { .. }) {
                        debug!(queue = %state.queue, error = %e, "could not open a consumer yet");
                        continue;
                    }
                    // For example the queue was deleted: tell the consumer, keep trying.
                    return Some((Err(e), state));
                }
            }
        }
        let careful_until = state.careful_until.filter(|_| !state.leaving_careful);
        let open = state.current.as_mut().expect("opened above");
        let received = match careful_until {
            Some(until) => {
                tokio::select! {
                    received = open.consumer.next() => Some(received),
                    _ = tokio::time::sleep_until(until) => None,
                }
            }
            None => Some(open.consumer.next().await),
        };
        let Some(received) = received else {
            // The careful period is over: cancel this consumer (what it already received is
            // still handed out) and open one with the full prefetch.
            state.careful_until = None;
            state.leaving_careful = true;
            let tag = open.consumer.tag();
            let cancel = open
                .channel
                .basic_cancel(tag, BasicCancelOptions::default());
            if tokio::time::timeout(shared.options.operation_timeout, cancel)
                .await
                .map_or(true, |r| r.is_err())
            {
                state.current = None;
                state.leaving_careful = false;
            }
            continue;
        };
        match received {
            Some(Ok(delivery)) => {
                state.unreadable_pause = None;
                open.acks.delivered(delivery.delivery_tag);
                let (message, problem) = convert::incoming(
                    &state.transport.shared.options.prefix,
                    &delivery.properties,
                    delivery.data,
                    state.source.is_dead_letters(),
                );
                let settler = RabbitSettler {
                    transport: state.transport.clone(),
                    acks: open.acks.clone(),
                    tag: delivery.delivery_tag,
                    acker: delivery.acker.clone(),
                    source: Arc::clone(&state.source),
                    queue: Arc::clone(&state.queue),
                    message_id: message.id().clone(),
                    settled: false,
                };
                let delivery = Delivery::new(message, Arc::clone(&state.source), settler)
                    .with_problem(problem);
                return Some((Ok(delivery), state));
            }
            None if state.leaving_careful => {
                state.leaving_careful = false;
                state.current = None;
                info!(
                    queue = %state.queue,
                    prefetch = state.prefetch,
                    "no unreadable delivery for a while; taking the full prefetch again"
                );
            }
            ended => {
                // An error (lost connection, closed channel, a delivery lapin cannot read) or a
                // cancellation by the broker (the queue was deleted): open a new consumer, on a
                // new connection if needed.
                let mut pause = next_pause(state.pause, &shared.options);
                match ended {
                    Some(Err(e)) if errors::is_unreadable(&e) => {
                        state.unreadable(&e);
                        // With a delivery limit, every return brings the broker closer to
                        // moving the message on: come back soon. Without one it returns for
                        // ever, so back off up to the longest reconnect delay.
                        if shared.options.delivery_limit().is_none() {
                            pause = next_pause(state.unreadable_pause, &shared.options);
                            state.unreadable_pause = Some(pause);
                        }
                    }
                    Some(Err(e)) => warn!(queue = %state.queue, error = %e, "the consumer failed"),
                    _ => warn!(queue = %state.queue, "the consumer was cancelled"),
                }
                state.leaving_careful = false;
                state.current = None;
                state.pause = Some(pause);
            }
        }
    }
}

fn next_pause(previous: Option<Duration>, options: &crate::RabbitMqOptions) -> Duration {
    previous.map_or(options.reconnect_delay, |p| {
        (p * 2).min(options.reconnect_max_delay)
    })
}

/// Settles one delivery through its channel's [`Acks`], which hold the channel open until then:
/// closing the channel would hand the message to another consumer while the handler still runs.
struct RabbitSettler {
    transport: RabbitMqTransport,
    acks: Acks,
    tag: u64,
    acker: Acker,
    source: Arc<Source>,
    queue: Arc<str>,
    /// The delivered message's id, for the logs.
    message_id: MessageId,
    settled: bool,
}

impl RabbitSettler {
    /// Rejects the delivery without requeue: its queue dead-letters it (broker side) into the
    /// dead-letter queue, or from the dead-letter queue into the quarantine, keeping it whole.
    async fn reject(&self, error: Error) -> Result<(), Error> {
        let names = &self.transport.shared.names;
        let endpoint = self.source.endpoint_name();
        let target = if self.source.is_dead_letters() {
            names.quarantine_queue(endpoint)
        } else {
            names.dead_letter_queue(endpoint)
        };
        warn!(
            queue = %self.queue,
            message_id = %self.message_id,
            error = %error,
            "the dead-letter copy was refused too; rejecting the delivery so that the broker \
             moves the original into `{target}`"
        );
        let after = self.transport.shared.options.operation_timeout;
        let rejected = tokio::time::timeout(after, self.acks.reject(self.tag, self.acker.clone()))
            .await
            .map_err(|_| {
                Error::timeout(format!("rejecting a delivery from `{}`", self.queue), after)
            })?;
        match rejected {
            Ok(true) => Ok(()),
            Ok(false) => Err(lost_channel(&self.queue)),
            Err(e) => Err(errors::from_client(
                e,
                format!(
                    "rejecting a delivery from `{}`; the broker will deliver it again",
                    self.queue
                ),
            )),
        }
    }

    async fn ack(&self) -> Result<(), Error> {
        let after = self.transport.shared.options.operation_timeout;
        let acked = tokio::time::timeout(after, self.acks.ack(self.tag, self.acker.clone()))
            .await
            .map_err(|_| {
                Error::timeout(
                    format!("acknowledging a delivery from `{}`", self.queue),
                    after,
                )
            })?;
        match acked {
            Ok(true) => Ok(()),
            Ok(false) => Err(lost_channel(&self.queue)),
            Err(e) => Err(errors::from_client(
                e,
                format!(
                    "acknowledging a delivery from `{}`; the broker will deliver it again",
                    self.queue
                ),
            )),
        }
    }

    async fn requeue(&self) -> Result<(), Error> {
        let after = self.transport.shared.options.operation_timeout;
        tokio::time::timeout(
            after,
            requeue(&self.acks, self.tag, &self.acker, &self.queue),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Error::timeout(
                format!("giving back a delivery to `{}`", self.queue),
                after,
            ))
        })
    }
}

async fn requeue(acks: &Acks, tag: u64, acker: &Acker, queue: &str) -> Result<(), Error> {
    match acks.requeue(tag, acker.clone()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(lost_channel(queue)),
        Err(e) => Err(errors::from_client(
            e,
            format!("giving a delivery back to `{queue}`; the broker will deliver it again"),
        )),
    }
}

fn lost_channel(queue: &str) -> Error {
    Error::connection_lost(format!(
        "the channel of a delivery from `{queue}` was closed before it was settled; the \
             broker delivers the message again"
    ))
}

#[async_trait]
impl Settle for RabbitSettler {
    fn check_held(&self) -> Result<(), Error> {
        // The channel is gone, so the broker delivers the original again: publishing a copy
        // now would only add a duplicate.
        if self.acker.usable() {
            Ok(())
        } else {
            Err(lost_channel(&self.queue))
        }
    }

    async fn remove(&mut self) -> Result<(), Error> {
        self.settled = true;
        self.ack().await
    }

    async fn give_back(&mut self) -> Result<(), Error> {
        self.settled = true;
        self.requeue().await
    }

    async fn store_copy(&mut self, next: &Message) -> Result<Stored, Error> {
        self.transport
            .schedule(&self.queue, next, Scheduler::Worker)
            .await?;
        Ok(Stored::Copy)
    }

    /// Stores the dead-letter copy, or, if even that is refused for its size, rejects the
    /// original so that the broker dead-letters it. (Not when the dead-letter queue is missing:
    /// the broker would drop a message it cannot dead-letter anywhere.)
    async fn store_dead_letter(&mut self, dead: &Message) -> Result<Stored, Error> {
        let names = &self.transport.shared.names;
        let queue = names.dead_letter_queue(self.source.endpoint_name());
        match self.transport.send_now(&queue, dead).await {
            Ok(()) => Ok(Stored::Copy),
            Err(e @ Error::InvalidMessage { .. }) => {
                self.settled = true;
                self.reject(e).await?;
                Ok(Stored::Moved)
            }
            Err(e) => Err(e),
        }
    }

    /// A copy at the end of the queue, confirmed, and then the original acknowledged: giving
    /// it back would count toward a quorum queue's delivery limit.
    async fn pass_over(&mut self, message: &Message) -> Result<Option<Stored>, Error> {
        self.transport.send_now(&self.queue, message).await?;
        Ok(Some(Stored::Copy))
    }
}

impl Drop for RabbitSettler {
    /// A delivery dropped without being settled is given back at once (`basic.nack` with
    /// requeue), by its channel's [`Acks`] task; if that is gone, the message comes back when
    /// the channel closes.
    fn drop(&mut self) {
        if self.settled || !self.acker.usable() {
            return;
        }
        debug!(queue = %self.queue, "giving back a delivery dropped unsettled");
        self.acks.requeue_later(self.tag, self.acker.clone());
    }
}
