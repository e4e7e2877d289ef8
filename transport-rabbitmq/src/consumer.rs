//! Consuming: a delivery stream that survives reconnections, and settlement of deliveries.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Acker, Consumer};
use redeliver_core::{Delivery, DeliveryStream, Error, Settle, Settlement, Source};
use tracing::{debug, info, warn};

use crate::RabbitMqTransport;
use crate::acks::Acks;
use crate::connection::{Link, bounded};
use crate::convert;
use crate::errors;

/// A consumer on one connection.
struct Open {
    link: Arc<Link>,
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
    /// A connection known to be lost, not to be used again.
    stale: Option<u64>,
    /// Back-off before opening a consumer again after it ended or failed.
    pause: Option<Duration>,
}

/// Opens a consumer on `queue`; see [`RabbitMqTransport`]'s `consume`.
pub(crate) async fn consume(
    transport: RabbitMqTransport,
    source: Source,
    prefetch: u16,
) -> Result<DeliveryStream, Error> {
    let shared = Arc::clone(&transport.shared);
    let queue = shared.names.source_queue(&source);
    let deadline = tokio::time::Instant::now() + shared.options.publish_timeout;
    let link = shared
        .link(deadline, None, &format!("consuming queue `{queue}`"))
        .await?;
    let first = open(link, &queue, prefetch, &shared.options).await?;
    let state = State {
        transport,
        source: Arc::new(source),
        queue: queue.into(),
        prefetch,
        current: Some(first),
        stale: None,
        pause: None,
    };
    Ok(futures::stream::unfold(state, next).boxed())
}

async fn open(
    link: Arc<Link>,
    queue: &str,
    prefetch: u16,
    options: &crate::RabbitMqOptions,
) -> Result<Open, Error> {
    let after = options.publish_timeout;
    let deadline = tokio::time::Instant::now() + after;
    bounded(
        deadline,
        after,
        || format!("opening a consumer on `{queue}`"),
        open_unbounded(link, queue, prefetch),
    )
    .await
}

async fn open_unbounded(link: Arc<Link>, queue: &str, prefetch: u16) -> Result<Open, Error> {
    let channel = link
        .connection
        .create_channel()
        .await
        .map_err(|e| errors::map(e, format!("opening a channel to consume `{queue}`")))?;
    // Per consumer (global = false): at most `prefetch` unsettled deliveries at once.
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .map_err(|e| errors::map(e, format!("setting the prefetch of `{queue}`")))?;
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
                Error::NotFound {
                    what: "queue",
                    name: queue.to_owned(),
                    hint: Some("declare the topology first (Transport::declare)".to_owned()),
                }
            } else {
                errors::map(e, format!("consuming queue `{queue}`"))
            }
        })?;
    Ok(Open {
        link,
        consumer,
        acks: Acks::start(channel),
    })
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
            let link = shared.link_eventually(state.stale).await.ok()?;
            let generation = link.generation;
            match open(
                Arc::clone(&link),
                &state.queue,
                state.prefetch,
                &shared.options,
            )
            .await
            {
                Ok(open) => {
                    info!(queue = %state.queue, "consuming again");
                    state.current = Some(open);
                    state.pause = None;
                }
                Err(e) => {
                    state.pause = Some(next_pause(state.pause, &shared.options));
                    if !link.is_up() {
                        shared.report_broken();
                        state.stale = Some(generation);
                        continue;
                    }
                    // For example the queue was deleted: tell the consumer, keep trying.
                    return Some((Err(e), state));
                }
            }
        }
        let open = state.current.as_mut().expect("opened above");
        match open.consumer.next().await {
            Some(Ok(delivery)) => {
                open.acks.delivered(delivery.delivery_tag);
                let settler = RabbitSettler {
                    transport: state.transport.clone(),
                    acks: open.acks.clone(),
                    tag: delivery.delivery_tag,
                    acker: delivery.acker.clone(),
                    source: Arc::clone(&state.source),
                    queue: Arc::clone(&state.queue),
                    settled: false,
                };
                let (message, problem) = convert::incoming(
                    &state.transport.shared.options.prefix,
                    &delivery.properties,
                    delivery.data,
                    state.source.is_dead_letters(),
                );
                let delivery = Delivery::new(message, Arc::clone(&state.source), settler)
                    .with_problem(problem);
                return Some((Ok(delivery), state));
            }
            ended => {
                // An error (lost connection, closed channel) or a cancellation by the broker
                // (the queue was deleted): open a new consumer, on a new connection if needed.
                match ended {
                    Some(Err(e)) => warn!(queue = %state.queue, error = %e, "the consumer failed"),
                    _ => warn!(queue = %state.queue, "the consumer was cancelled"),
                }
                if !open.link.is_up() {
                    shared.report_broken();
                    state.stale = Some(open.link.generation);
                }
                state.current = None;
                state.pause = Some(next_pause(state.pause, &shared.options));
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
    settled: bool,
}

impl RabbitSettler {
    async fn ack(&self) -> Result<(), Error> {
        let after = self.transport.shared.options.publish_timeout;
        let acked = tokio::time::timeout(after, self.acks.ack(self.tag, self.acker.clone()))
            .await
            .map_err(|_| Error::Timeout {
                operation: format!("acknowledging a delivery from `{}`", self.queue),
                after,
            })?;
        match acked {
            Ok(true) => Ok(()),
            Ok(false) => Err(lost_channel(&self.queue)),
            Err(e) => Err(errors::map(
                e,
                format!(
                    "acknowledging a delivery from `{}`; the broker will deliver it again",
                    self.queue
                ),
            )),
        }
    }

    async fn requeue(&self) -> Result<(), Error> {
        let after = self.transport.shared.options.publish_timeout;
        tokio::time::timeout(
            after,
            requeue(&self.acks, self.tag, &self.acker, &self.queue),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Error::Timeout {
                operation: format!("giving back a delivery to `{}`", self.queue),
                after,
            })
        })
    }
}

async fn requeue(acks: &Acks, tag: u64, acker: &Acker, queue: &str) -> Result<(), Error> {
    match acks.requeue(tag, acker.clone()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(lost_channel(queue)),
        Err(e) => Err(errors::map(
            e,
            format!("giving a delivery back to `{queue}`; the broker will deliver it again"),
        )),
    }
}

fn lost_channel(queue: &str) -> Error {
    Error::Connection {
        message: format!(
            "the channel of a delivery from `{queue}` was closed before it was settled; the \
             broker delivers the message again"
        ),
        source: None,
    }
}

#[async_trait]
impl Settle for RabbitSettler {
    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), Error> {
        if !self.acker.usable() {
            // The channel is gone, so the broker delivers the original again: publishing a copy
            // now would only add a duplicate.
            self.settled = true;
            return Err(lost_channel(&self.queue));
        }
        let result = match settlement {
            Settlement::Complete => self.ack().await,
            Settlement::Abandon => self.requeue().await,
            Settlement::Reschedule(message) => {
                // The copy is confirmed before the original is acknowledged: a failure in
                // between duplicates the message, never loses it.
                match self.transport.schedule(&self.queue, &message, true).await {
                    Ok(()) => self.ack().await,
                    Err(e) => {
                        let _ = self.requeue().await;
                        Err(e)
                    }
                }
            }
            Settlement::DeadLetter(message) => {
                let dead = self
                    .transport
                    .shared
                    .names
                    .dead_letter_queue(self.source.endpoint_name());
                match self.transport.send_now(&dead, &message).await {
                    Ok(()) => self.ack().await,
                    Err(e) => {
                        let _ = self.requeue().await;
                        Err(e)
                    }
                }
            }
            other => {
                let _ = self.requeue().await;
                Err(Error::Other {
                    message: format!("unsupported settlement {other:?}; the message was requeued"),
                    source: None,
                })
            }
        };
        self.settled = true;
        result
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
