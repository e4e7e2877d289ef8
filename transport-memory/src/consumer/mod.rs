//! Consuming a queue: a stream that hands out the next ready message (or waits for the next
//! arrival or not-before), never more than the prefetch at once.

mod settler;
mod shared;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use redeliver_core::{ConsumeOptions, Delivery, DeliveryStream, Message, Source};

use self::settler::MemorySettler;
use self::shared::{ConsumerShared, PlaceGuard};
use crate::state::Inner;

/// Consumes `source` of the transport's state `inner` (creating its queue if it is new).
pub(crate) fn consume(
    inner: &Arc<Inner>,
    source: &Source,
    options: ConsumeOptions,
) -> DeliveryStream {
    let consumer = Consumer {
        shared: Arc::new(ConsumerShared::new(
            Arc::clone(inner),
            source.clone(),
            options.prefetch.max(1),
        )),
    };
    inner.change(|state, _| {
        state.queue(source);
    });
    futures::stream::unfold(consumer, |consumer| async move {
        let delivery = consumer.next().await;
        Some((Ok(delivery), consumer))
    })
    .boxed()
}

struct Consumer {
    shared: Arc<ConsumerShared>,
}

impl Consumer {
    async fn next(&self) -> Delivery {
        let shared = &*self.shared;
        shared.take_place().await;
        // From here on the place is owned by the settler of the delivery returned; this
        // future is only dropped before that if the whole stream is, so give it back then.
        let place = PlaceGuard(shared);
        loop {
            if let Ok(taken) = self.take() {
                std::mem::forget(place);
                return self.delivery(taken);
            }
            // Nothing ready: register for arrivals, then look once more, so that an arrival
            // between the first look and the registration is not missed.
            let arrived = shared.inner.lock().queue(&shared.source).arrived.clone();
            let notified = arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next_due = match self.take() {
                Ok(taken) => {
                    std::mem::forget(place);
                    return self.delivery(taken);
                }
                Err(next_due) => next_due,
            };
            match next_due {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = shared.inner.clock.sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Takes the next ready message (promoting those that came due), or says when the next
    /// scheduled one is due.
    fn take(&self) -> Result<(u64, Arc<Message>), Option<DateTime<Utc>>> {
        let source = &*self.shared.source;
        self.shared.inner.change(|state, now| {
            let id = state.next_delivery;
            let queue = state.queue(source);
            queue.promote_due(now);
            match queue.ready.pop_front() {
                Some(message) => {
                    let message = Arc::new(message);
                    queue.in_flight.insert(id, Arc::clone(&message));
                    state.next_delivery += 1;
                    Ok((id, message))
                }
                None => Err(queue.scheduled.keys().next().map(|(at, _)| *at)),
            }
        })
    }

    fn delivery(&self, (id, message): (u64, Arc<Message>)) -> Delivery {
        let settler = MemorySettler::new(Arc::clone(&self.shared), id);
        Delivery::new(message, Arc::clone(&self.shared.source), settler)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use chrono::TimeDelta;
    use futures::StreamExt;
    use redeliver_core::{ConsumeOptions, Delivery, DeliveryStream, Message, Source, Transport};

    use crate::MemoryTransport;

    pub(super) async fn next(stream: &mut DeliveryStream) -> Delivery {
        tokio::time::timeout(Duration::from_secs(3600), stream.next())
            .await
            .expect("a delivery within the hour")
            .expect("the stream does not end")
            .expect("no consumer error")
    }

    pub(super) async fn consume(
        t: &MemoryTransport,
        source: Source,
        prefetch: usize,
    ) -> DeliveryStream {
        t.consume(&source, ConsumeOptions::default().with_prefetch(prefetch))
            .await
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn scheduled_messages_arrive_exactly_at_their_not_before_in_time_order() {
        let t = MemoryTransport::new();
        let start = t.clock().now();
        for (id, secs) in [("late", 30), ("early", 1), ("middle", 10)] {
            let at = start + TimeDelta::seconds(secs);
            t.send("q", Message::new(id).with_id(id).with_not_before(at))
                .await
                .unwrap();
        }
        assert_eq!(t.scheduled("q").len(), 3);
        assert!(t.pending("q").is_empty());

        let mut stream = consume(&t, Source::endpoint("q"), 3).await;
        for (id, secs) in [("early", 1), ("middle", 10), ("late", 30)] {
            let delivery = next(&mut stream).await;
            assert_eq!(delivery.message().id().as_str(), id);
            assert_eq!(
                t.clock().now(),
                start + TimeDelta::seconds(secs),
                "exactly on time"
            );
            delivery.complete().await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn prefetch_bounds_unsettled_deliveries() {
        let t = MemoryTransport::new();
        for i in 0..3 {
            t.send("q", Message::new(format!("{i}"))).await.unwrap();
        }
        let mut stream = consume(&t, Source::endpoint("q"), 2).await;
        let first = next(&mut stream).await;
        let _second = next(&mut stream).await;
        let third = tokio::time::timeout(Duration::from_secs(60), stream.next()).await;
        assert!(third.is_err(), "a third delivery while two are unsettled");
        first.complete().await.unwrap();
        next(&mut stream).await;
    }

    #[tokio::test]
    async fn a_worker_whose_handlers_never_wait_still_lets_other_tasks_run() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use redeliver_core::{Context, Outcome, Worker};

        // Many ready messages and a handler that is done at its first poll: nothing in the
        // worker's loop has to wait until the queue is empty.
        const MESSAGES: usize = 10_000;
        let t = MemoryTransport::new();
        for i in 0..MESSAGES {
            t.send("q", Message::json(&i).unwrap()).await.unwrap();
        }
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let worker = Worker::builder(Arc::new(t.clone()), "q")
            .start(move |_: usize, _: Context| {
                counted.fetch_add(1, Ordering::Relaxed);
                async { Outcome::success() }
            })
            .await
            .unwrap();
        // On this single-threaded runtime, this task runs again only when the worker yields;
        // a worker that yields like any tokio primitive does so long before the queue is empty.
        while calls.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        let seen = calls.load(Ordering::Relaxed);
        assert!(
            seen < MESSAGES,
            "the worker ran {seen} handlers without yielding"
        );
        t.wait_until_idle().await;
        assert_eq!(worker.shutdown().await.completed, MESSAGES as u64);
    }
}
