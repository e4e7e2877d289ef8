//! Settling a delivery of the in-memory transport: each of core's settlement steps is one change
//! of the state, and a delivery dropped unsettled goes back to the front of its queue.

use std::sync::Arc;

use async_trait::async_trait;
use redeliver_core::{Error, Message, Settle, Source, Stored};

use super::shared::ConsumerShared;
use crate::state::{Now, State};

/// Settles one delivery; holds its place within the consumer's prefetch until dropped.
pub(super) struct MemorySettler {
    consumer: Arc<ConsumerShared>,
    delivery: u64,
    settled: bool,
}

impl MemorySettler {
    /// The settler of delivery `delivery`, which holds one of `consumer`'s places.
    pub(super) fn new(consumer: Arc<ConsumerShared>, delivery: u64) -> Self {
        MemorySettler {
            consumer,
            delivery,
            settled: false,
        }
    }

    /// Takes the delivery out of flight and does `then` with it, in one change of the state:
    /// a copy and the removal of the original happen together.
    fn settle(
        &mut self,
        then: impl FnOnce(&mut State, &Source, Arc<Message>, &mut Now<'_>),
    ) -> Result<(), Error> {
        let delivery = self.delivery;
        self.settled = true;
        let source = &*self.consumer.source;
        self.consumer.inner.change(|state, now| {
            let original = state.queue(source).in_flight.remove(&delivery);
            let Some(original) = original else {
                return Err(Error::other(format!(
                    "delivery {delivery} of {source} is no longer in flight"
                )));
            };
            then(state, source, original, now);
            Ok(())
        })
    }
}

#[async_trait]
impl Settle for MemorySettler {
    async fn remove(&mut self) -> Result<(), Error> {
        self.settle(|_, _, _, _| {})
    }

    async fn give_back(&mut self) -> Result<(), Error> {
        self.settle(|state, source, original, _| {
            let queue = state.queue(source);
            queue.ready.push_front(unshare(original));
            queue.arrived.notify_waiters();
        })
    }

    async fn store_copy(&mut self, next: &Message) -> Result<Stored, Error> {
        let next = next.clone();
        self.settle(|state, source, _, now| state.enqueue(source, next, now))?;
        Ok(Stored::Moved)
    }

    async fn store_dead_letter(&mut self, dead: &Message) -> Result<Stored, Error> {
        let dead = dead.clone();
        self.settle(|state, source, _, now| {
            let dead_letters = Source::dead_letters(source.endpoint_name());
            state.enqueue(&dead_letters, dead, now);
        })?;
        Ok(Stored::Moved)
    }
}

/// The message itself, copied only if a handler still holds it.
fn unshare(message: Arc<Message>) -> Message {
    Arc::try_unwrap(message).unwrap_or_else(|shared| Message::clone(&shared))
}

impl Drop for MemorySettler {
    fn drop(&mut self) {
        let consumer = &*self.consumer;
        if !self.settled {
            // Dropped without being settled: give the message back, first in line.
            consumer.inner.change(|state, _| {
                let queue = state.queue(&consumer.source);
                if let Some(message) = queue.in_flight.remove(&self.delivery) {
                    queue.ready.push_front(unshare(message));
                    queue.arrived.notify_waiters();
                }
            });
        }
        consumer.give_back_place();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::TimeDelta;
    use redeliver_core::{Message, Source, Transport};

    use super::super::tests::{consume, next};
    use crate::MemoryTransport;

    #[tokio::test(start_paused = true)]
    async fn a_dropped_delivery_comes_back_first() {
        let t = MemoryTransport::new();
        t.send("q", Message::new("a").with_id("a")).await.unwrap();
        t.send("q", Message::new("b").with_id("b")).await.unwrap();
        let mut stream = consume(&t, Source::endpoint("q"), 2).await;

        let a = next(&mut stream).await;
        assert_eq!(a.message().id().as_str(), "a");
        assert_eq!(t.in_flight("q"), 1);
        drop(a);
        assert_eq!(t.in_flight("q"), 0);
        assert_eq!(next(&mut stream).await.message().id().as_str(), "a");
    }

    #[tokio::test(start_paused = true)]
    async fn settlements_move_messages_where_they_belong() {
        let t = MemoryTransport::new();
        t.send("q", Message::new("x").with_id("x")).await.unwrap();
        let mut stream = consume(&t, Source::endpoint("q"), 1).await;

        let at = t.clock().now() + TimeDelta::seconds(5);
        next(&mut stream)
            .await
            .retry(at, "boom", Duration::from_secs(5))
            .await
            .unwrap();
        let scheduled = t.scheduled("q");
        assert_eq!(
            (scheduled[0].attempt(), scheduled[0].not_before()),
            (2, Some(at))
        );

        next(&mut stream).await.abandon().await.unwrap();
        assert_eq!(t.pending("q")[0].attempt(), 2, "abandon keeps the attempt");

        next(&mut stream)
            .await
            .dead_letter("poison", Some("details".into()))
            .await
            .unwrap();
        let dead = t.dead_letters("q");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].dead_letter().unwrap().reason, "poison");
        assert_eq!(dead[0].attempt(), 2);

        let mut dead_stream = consume(&t, Source::dead_letters("q"), 1).await;
        let d = next(&mut dead_stream).await;
        assert_eq!(d.source(), &Source::dead_letters("q"));
        d.complete().await.unwrap();
        assert!(t.dead_letters("q").is_empty());
    }
}
