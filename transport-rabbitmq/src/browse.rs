//! Browsing a dead-letter queue without removing anything.
//!
//! AMQP 0-9-1 cannot peek: a message is only seen by taking it. Giving it back (`basic.nack`
//! with requeue) would count toward the delivery limit of a quorum queue, so that browsing the
//! dead letters often enough would move them to the quarantine. A browse therefore goes once
//! round the queue: it takes each message (`basic.get`), publishes the very same properties and
//! body to the end of the queue, waits for the broker's confirm, and only then acknowledges
//! the original. After as many steps as the queue held when the browse started, every message
//! is back in its place and its order (a message that arrives meanwhile lands among them).
//! It costs one get, one confirmed publish and one ack per dead letter; a crash half-way
//! leaves at most one message twice, never one missing.
//!
//! A stream queue would be truly non-destructive, but the dead-letter queue is a quorum (or
//! classic) queue that its workers consume with acknowledgements, which a stream cannot serve.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::{Acker, Channel, Connection};
use redeliver_core::{Delivery, DeliveryStream, Error, Message, Settle, Source, Stored};
use tokio::time::Instant;

use crate::RabbitMqTransport;
use crate::connection::{Target, bounded};
use crate::{convert, errors};

impl RabbitMqTransport {
    /// A channel of its own on the current connection, opened within the operation time-out.
    async fn browse_channel(&self, doing: &str) -> Result<Channel, Error> {
        let after = self.shared.options.operation_timeout;
        let deadline = Instant::now() + after;
        let conn = self.shared.current(deadline, None, doing).await?;
        let connection: &Connection = &conn.connection;
        bounded(
            deadline,
            after,
            || format!("opening a channel for {doing}"),
            async {
                connection
                    .create_channel()
                    .await
                    .map_err(|e| errors::from_client(e, format!("opening a channel for {doing}")))
            },
        )
        .await
    }

    /// How many messages `queue` holds ready (not those handed out and unacknowledged).
    pub(crate) async fn ready_count(&self, queue: &str) -> Result<u64, Error> {
        let doing = format!("counting the messages of queue `{queue}`");
        let channel = self.browse_channel(&doing).await?;
        let count = self.count_on(&channel, queue).await;
        let _ = channel.close(200, "counted".into()).await;
        count
    }

    async fn count_on(&self, channel: &Channel, queue: &str) -> Result<u64, Error> {
        let doing = format!("counting the messages of queue `{queue}`");
        Ok(u64::from(
            crate::transport::passive_declare(channel, queue, &doing).await?,
        ))
    }

    /// The dead letters of `endpoint` one `basic.get` at a time on a channel of their own, so
    /// that a replay or purge is handed nothing beyond what it takes (a consumer's prefetch
    /// would push messages it must then give back, counting toward the delivery limit). The
    /// stream ends when the queue is empty.
    pub(crate) async fn take(&self, endpoint: &str) -> Result<DeliveryStream, Error> {
        let queue: Arc<str> = self.shared.names.dead_letter_queue(endpoint).into();
        let channel = self
            .browse_channel(&format!("taking the dead letters of `{queue}`"))
            .await?;
        let source = Arc::new(Source::dead_letters(endpoint));
        let transport = self.clone();
        let closer = Arc::new(CloseOnDrop(channel.clone()));
        let stream = futures::stream::unfold(Some(channel), move |channel| {
            let _closer = Arc::clone(&closer);
            let (transport, queue, source) =
                (transport.clone(), Arc::clone(&queue), Arc::clone(&source));
            async move {
                let channel = channel?;
                match transport.get_one(&channel, &queue).await {
                    Ok(None) => None,
                    Ok(Some(got)) => {
                        let lapin::message::BasicGetMessage { delivery, .. } = got;
                        let (message, problem) = convert::incoming(
                            &transport.shared.options.prefix,
                            &delivery.properties,
                            delivery.data,
                            true,
                        );
                        let settler = GetSettler {
                            transport: transport.clone(),
                            acker: delivery.acker,
                            queue: Arc::clone(&queue),
                            settled: false,
                            _channel: channel.clone(),
                        };
                        let delivery =
                            Delivery::new(message, source, settler).with_problem(problem);
                        Some((Ok(delivery), Some(channel)))
                    }
                    Err(e) => Some((Err(e), None)),
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn get_one(
        &self,
        channel: &Channel,
        queue: &str,
    ) -> Result<Option<lapin::message::BasicGetMessage>, Error> {
        let after = self.shared.options.operation_timeout;
        tokio::time::timeout(
            after,
            channel.basic_get(
                convert::short("queue name", queue)?,
                BasicGetOptions { no_ack: false },
            ),
        )
        .await
        .map_err(|_| Error::timeout(format!("taking a message from `{queue}`"), after))?
        .map_err(|e| errors::from_client(e, format!("taking a message from `{queue}`")))
    }

    /// Up to `max` messages of `queue`, oldest first, after going once round the queue (see
    /// the [module documentation](self)).
    pub(crate) async fn browse(&self, queue: &str, max: usize) -> Result<Vec<Message>, Error> {
        let doing = format!("browsing queue `{queue}`");
        let channel = self.browse_channel(&doing).await?;
        let result = self.browse_on(&channel, queue, max).await;
        let _ = channel.close(200, "browsed".into()).await;
        result
    }

    async fn browse_on(
        &self,
        channel: &Channel,
        queue: &str,
        max: usize,
    ) -> Result<Vec<Message>, Error> {
        let count = self.count_on(channel, queue).await?;
        let after = self.shared.options.operation_timeout;
        let mut seen = Vec::new();
        for _ in 0..count {
            let got = self.get_one(channel, queue).await?;
            // Fewer than counted: a consumer took some meanwhile.
            let Some(got) = got else { break };
            let delivery = got.delivery;
            if seen.len() < max {
                let (message, _) = convert::incoming(
                    &self.shared.options.prefix,
                    &delivery.properties,
                    delivery.data.clone(),
                    true,
                );
                seen.push(message);
            }
            self.shared
                .publish(
                    Target {
                        exchange: "",
                        routing_key: queue,
                        mandatory: true,
                    },
                    &delivery.properties,
                    &delivery.data,
                    &format!("putting a browsed message back at the end of `{queue}`"),
                )
                .await?;
            tokio::time::timeout(after, delivery.acker.ack(BasicAckOptions::default()))
                .await
                .map_err(|_| {
                    Error::timeout(
                        format!("acknowledging a browsed message of `{queue}`"),
                        after,
                    )
                })?
                .map_err(|e| {
                    errors::from_client(e, format!("acknowledging a browsed message of `{queue}`"))
                })?;
        }
        Ok(seen)
    }
}

/// Settles a dead letter taken with `basic.get`.
struct GetSettler {
    transport: RabbitMqTransport,
    acker: Acker,
    queue: Arc<str>,
    settled: bool,
    /// Kept open as long as a delivery taken on it is unsettled.
    _channel: Channel,
}

impl GetSettler {
    async fn answer(&mut self, ack: bool) -> Result<(), Error> {
        self.settled = true;
        let after = self.transport.shared.options.operation_timeout;
        let doing = format!("settling a dead letter taken from `{}`", self.queue);
        let sent = if ack {
            tokio::time::timeout(after, self.acker.ack(BasicAckOptions::default())).await
        } else {
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            tokio::time::timeout(after, self.acker.nack(requeue)).await
        };
        match sent {
            Err(_) => Err(Error::timeout(doing, after)),
            Ok(Err(e)) => Err(errors::from_client(e, doing)),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

#[async_trait]
impl Settle for GetSettler {
    fn check_held(&self) -> Result<(), Error> {
        if self.acker.usable() {
            Ok(())
        } else {
            Err(Error::connection_lost(format!(
                "the channel of a dead letter taken from `{}` was closed; the broker keeps it",
                self.queue
            )))
        }
    }

    async fn remove(&mut self) -> Result<(), Error> {
        self.answer(true).await
    }

    async fn give_back(&mut self) -> Result<(), Error> {
        self.answer(false).await
    }

    async fn store_copy(&mut self, next: &Message) -> Result<Stored, Error> {
        self.transport.send_now(&self.queue, next).await?;
        Ok(Stored::Copy)
    }

    async fn store_dead_letter(&mut self, dead: &Message) -> Result<Stored, Error> {
        self.transport.send_now(&self.queue, dead).await?;
        Ok(Stored::Copy)
    }

    async fn pass_over(&mut self, message: &Message) -> Result<Option<Stored>, Error> {
        self.transport.send_now(&self.queue, message).await?;
        Ok(Some(Stored::Copy))
    }
}

impl Drop for GetSettler {
    /// Dropped unsettled (a replay stopped half-way): given back at once, or when the channel
    /// closes.
    fn drop(&mut self) {
        if self.settled || !self.acker.usable() {
            return;
        }
        let acker = self.acker.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let requeue = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                let _ = acker.nack(requeue).await;
            });
        }
    }
}

/// Closes the channel of [`RabbitMqTransport::take`] once its stream is dropped.
struct CloseOnDrop(Channel);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let channel = self.0.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = channel.close(200, "taken".into()).await;
            });
        }
    }
}
