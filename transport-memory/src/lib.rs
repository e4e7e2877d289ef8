//! The in-memory transport of redeliver: for unit tests of handlers, for examples, and for
//! applications that only need retries inside one process.
//!
//! - **Exact scheduling.** A message is delivered at its not-before, to the microsecond of the
//!   transport's [`Clock`], never before.
//! - **A controllable clock.** The transport runs on [`Clock::tokio`], so under
//!   `#[tokio::test(start_paused = true)]` a back-off schedule of hours runs in milliseconds:
//!   tokio advances its paused clock straight to the next scheduled message whenever every task
//!   is waiting.
//! - **Dead letters** are kept per endpoint with their reason, description and the attempt they
//!   failed on, and can be consumed through [`Source::DeadLetters`].
//! - **Nothing is lost.** A delivery dropped without being settled goes back to the front of its
//!   queue and is delivered again.
//! - **Inspection**: [`pending`](MemoryTransport::pending),
//!   [`scheduled`](MemoryTransport::scheduled), [`in_flight`](MemoryTransport::in_flight),
//!   [`dead_letters`](MemoryTransport::dead_letters), and waiting for a condition with
//!   [`wait_until`](MemoryTransport::wait_until) / [`wait_until_idle`](MemoryTransport::wait_until_idle)
//!   instead of sleeping.
//!
//! Endpoints are created on first use (or by [`Transport::declare`]); a topic delivers to the
//! endpoints subscribed to it through [`Transport::declare`], and publishing to a topic with no
//! subscriber delivers nowhere. Everything lives in this process: messages do not survive it.
//!
//! ```
//! use std::sync::Arc;
//! use redeliver_core::{Message, Transport};
//! use redeliver_memory::MemoryTransport;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), redeliver_core::Error> {
//! let transport = MemoryTransport::new();
//! transport.send("orders", Message::json(&42)?).await?;
//! assert_eq!(transport.pending("orders").len(), 1);
//! let shared: Arc<dyn Transport> = Arc::new(transport);
//! # let _ = shared; Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use redeliver_core::{
    Capabilities, Clock, ConsumeOptions, Delivery, DeliveryStream, Error, Message, Settle, Source,
    Stored, Topology, Transport,
};
use rustc_hash::FxBuildHasher;
use tokio::sync::{Notify, watch};

mod connector;

pub use connector::MemoryConnector;

/// The in-memory transport. Cheap to clone: clones share the same queues.
#[derive(Clone, Debug)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    clock: Clock,
    state: Mutex<State>,
    /// Bumped on every change, so tests can wait for a condition.
    version: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    endpoints: HashMap<String, Endpoint, FxBuildHasher>,
    topics: HashMap<String, BTreeSet<String>>,
    next_sequence: u64,
    next_delivery: u64,
}

#[derive(Debug, Default)]
struct Endpoint {
    main: Queue,
    dead: Queue,
}

#[derive(Debug, Default)]
struct Queue {
    ready: VecDeque<Message>,
    /// Ordered by not-before, then by arrival.
    scheduled: BTreeMap<(DateTime<Utc>, u64), Message>,
    /// Shared with the delivery: handing a message out copies nothing.
    in_flight: HashMap<u64, Arc<Message>, FxBuildHasher>,
    arrived: Arc<Notify>,
}

impl Queue {
    fn is_idle(&self) -> bool {
        self.ready.is_empty() && self.scheduled.is_empty() && self.in_flight.is_empty()
    }

    /// Moves every scheduled message whose not-before has come into the ready queue.
    fn promote_due(&mut self, now: &mut Now<'_>) {
        if self.scheduled.is_empty() {
            return;
        }
        let now = now.get();
        while let Some(entry) = self.scheduled.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
        }
    }
}

/// The transport's clock, read at most once per change and only if the change needs it (taking
/// or completing an unscheduled message does not).
struct Now<'a> {
    clock: &'a Clock,
    read: Option<DateTime<Utc>>,
}

impl Now<'_> {
    fn get(&mut self) -> DateTime<Utc> {
        *self.read.get_or_insert_with(|| self.clock.now())
    }
}

impl State {
    fn queue(&mut self, source: &Source) -> &mut Queue {
        let name = source.endpoint_name();
        // Look up before inserting: `entry` would allocate the name on every take and settle.
        if !self.endpoints.contains_key(name) {
            self.endpoints.insert(name.to_owned(), Endpoint::default());
        }
        let endpoint = self
            .endpoints
            .get_mut(name)
            .expect("inserted above if it was missing");
        match source {
            Source::Endpoint(_) => &mut endpoint.main,
            Source::DeadLetters(_) => &mut endpoint.dead,
        }
    }

    fn enqueue(&mut self, source: &Source, message: Message, now: &mut Now<'_>) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let queue = self.queue(source);
        match message.not_before() {
            Some(at) if at > now.get() => {
                queue.scheduled.insert((at, sequence), message);
            }
            _ => queue.ready.push_back(message),
        }
        queue.arrived.notify_waiters();
    }
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryTransport {
    /// A transport on [`Clock::tokio`], starting at the current wall-clock time.
    pub fn new() -> Self {
        Self::with_clock(Clock::tokio())
    }

    /// A transport on the given clock (for example [`Clock::tokio_at`] a fixed instant, for
    /// reproducible timelines).
    pub fn with_clock(clock: Clock) -> Self {
        MemoryTransport {
            inner: Arc::new(Inner {
                clock,
                state: Mutex::new(State::default()),
                version: watch::Sender::new(0),
            }),
        }
    }

    /// Messages of `endpoint` ready for delivery and not yet handed out, in delivery order.
    pub fn pending(&self, endpoint: &str) -> Vec<Message> {
        self.inspect(endpoint, |e| e.main.ready.iter().cloned().collect())
    }

    /// Messages of `endpoint` waiting for their not-before, earliest first.
    pub fn scheduled(&self, endpoint: &str) -> Vec<Message> {
        self.inspect(endpoint, |e| e.main.scheduled.values().cloned().collect())
    }

    /// How many deliveries of `endpoint` are handed out and not yet settled.
    pub fn in_flight(&self, endpoint: &str) -> usize {
        self.inspect(endpoint, |e| e.main.in_flight.len())
    }

    /// The dead letters of `endpoint`, oldest first. Each carries its
    /// [`dead_letter`](Message::dead_letter) reason and the [`attempt`](Message::attempt) it
    /// failed on. Dead letters being handled by a dead-letter consumer are included.
    pub fn dead_letters(&self, endpoint: &str) -> Vec<Message> {
        self.inspect(endpoint, |e| {
            let mut all: Vec<Message> = e
                .dead
                .in_flight
                .values()
                .map(|m| Message::clone(m))
                .collect();
            all.extend(e.dead.ready.iter().cloned());
            all.extend(e.dead.scheduled.values().cloned());
            all
        })
    }

    /// Waits until `condition` holds, checking it now and after every change to the queues.
    /// Wrap it in [`tokio::time::timeout`] in tests, so that a condition that never comes fails
    /// the test instead of hanging it.
    pub async fn wait_until(&self, mut condition: impl FnMut(&MemoryTransport) -> bool) {
        let mut changes = self.inner.version.subscribe();
        loop {
            changes.borrow_and_update();
            if condition(self) {
                return;
            }
            // The sender lives as long as `self`, so this cannot fail.
            let _ = changes.changed().await;
        }
    }

    /// Waits until no endpoint has a message ready, scheduled or in flight (dead letters that
    /// nobody is handling do not count): everything sent has been settled.
    pub async fn wait_until_idle(&self) {
        self.wait_until(|t| {
            t.lock().endpoints.values().all(|e| {
                e.main.is_idle() && e.dead.in_flight.is_empty() && e.dead.scheduled.is_empty()
            })
        })
        .await
    }

    fn inspect<R: Default>(&self, endpoint: &str, read: impl FnOnce(&Endpoint) -> R) -> R {
        self.lock()
            .endpoints
            .get(endpoint)
            .map(read)
            .unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// Runs `change` on the state and tells waiters.
    fn change<R>(&self, change: impl FnOnce(&mut State, &mut Now<'_>) -> R) -> R {
        self.inner.change(change)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the queues half-changed in a way that
        // matters more than losing the whole transport would, so keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn change<R>(&self, change: impl FnOnce(&mut State, &mut Now<'_>) -> R) -> R {
        let mut now = Now {
            clock: &self.clock,
            read: None,
        };
        let result = change(&mut self.lock(), &mut now);
        // Only tests wait for changes; without a waiter, skip the notification on this hot path.
        if self.version.receiver_count() > 0 {
            self.version.send_modify(|v| *v = v.wrapping_add(1));
        }
        result
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Duration::ZERO)
    }

    fn clock(&self) -> Clock {
        self.inner.clock.clone()
    }

    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.change(|state, _| {
            for endpoint in topology.endpoints() {
                state.endpoints.entry(endpoint.to_owned()).or_default();
            }
            for (topic, endpoints) in topology.topics() {
                let subscribers = state.topics.entry(topic.to_owned()).or_default();
                subscribers.extend(endpoints.map(str::to_owned));
            }
        });
        Ok(())
    }

    async fn send(&self, endpoint: &str, message: Message) -> Result<(), Error> {
        self.change(|state, now| state.enqueue(&Source::endpoint(endpoint), message, now));
        Ok(())
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error> {
        self.change(|state, now| {
            let subscribers: Vec<String> = state
                .topics
                .get(topic)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            for endpoint in subscribers {
                state.enqueue(&Source::Endpoint(endpoint), message.clone(), &mut *now);
            }
        });
        Ok(())
    }

    async fn consume(
        &self,
        source: &Source,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, Error> {
        let consumer = Consumer {
            shared: Arc::new(ConsumerShared {
                inner: Arc::clone(&self.inner),
                source: Arc::new(source.clone()),
                limit: options.prefetch.max(1),
                out: AtomicUsize::new(0),
                settled: Notify::new(),
            }),
        };
        self.change(|state, _| {
            state.queue(source);
        });
        Ok(futures::stream::unfold(consumer, |consumer| async move {
            let delivery = consumer.next().await;
            Some((Ok(delivery), consumer))
        })
        .boxed())
    }
}

struct Consumer {
    shared: Arc<ConsumerShared>,
}

/// What a consumer shares with its deliveries' settlers: one reference count per delivery
/// rather than one per piece.
struct ConsumerShared {
    inner: Arc<Inner>,
    /// Shared with every delivery, so a delivery copies no name.
    source: Arc<Source>,
    /// The prefetch: at most `limit` deliveries `out` (handed out, not settled). Cheaper than a
    /// semaphore on the path of every delivery: taking and giving back a place are single
    /// atomic operations, and only a consumer at its limit waits for `settled`.
    limit: usize,
    out: AtomicUsize,
    settled: Notify,
}

impl ConsumerShared {
    fn try_take_place(&self) -> bool {
        self.out
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |out| {
                (out < self.limit).then_some(out + 1)
            })
            .is_ok()
    }

    /// Waits for a place within the prefetch; give it back with [`Self::give_back_place`].
    async fn take_place(&self) {
        if self.try_take_place() {
            return;
        }
        loop {
            // Register before looking again, so that a place given back in between is not
            // missed.
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.try_take_place() {
                return;
            }
            settled.await;
        }
    }

    fn give_back_place(&self) {
        if self.out.fetch_sub(1, Ordering::AcqRel) == self.limit {
            // The consumer may be waiting for this place (one consumer per prefetch).
            self.settled.notify_one();
        }
    }
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
        let settler = MemorySettler {
            consumer: Arc::clone(&self.shared),
            delivery: id,
            settled: false,
        };
        Delivery::new(message, Arc::clone(&self.shared.source), settler)
    }
}

/// Gives a prefetch place back if a take is abandoned half-way.
struct PlaceGuard<'a>(&'a ConsumerShared);

impl Drop for PlaceGuard<'_> {
    fn drop(&mut self) {
        self.0.give_back_place();
    }
}

/// Settles one delivery; holds its place within the consumer's prefetch until dropped.
struct MemorySettler {
    consumer: Arc<ConsumerShared>,
    delivery: u64,
    settled: bool,
}

impl MemorySettler {
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
    use futures::StreamExt;
    use redeliver_core::{ConsumeOptions, Message, Source, Topology, Transport};

    use super::*;

    async fn next(stream: &mut DeliveryStream) -> Delivery {
        tokio::time::timeout(Duration::from_secs(3600), stream.next())
            .await
            .expect("a delivery within the hour")
            .expect("the stream does not end")
            .expect("no consumer error")
    }

    async fn consume(t: &MemoryTransport, source: Source, prefetch: usize) -> DeliveryStream {
        t.consume(&source, ConsumeOptions::default().with_prefetch(prefetch))
            .await
            .unwrap()
    }

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

    #[tokio::test(start_paused = true)]
    async fn topics_copy_to_every_subscriber_and_nowhere_without_one() {
        let t = MemoryTransport::new();
        t.declare(
            &Topology::new()
                .subscribe("events", "a")
                .subscribe("events", "b"),
        )
        .await
        .unwrap();
        t.publish("events", Message::new("e")).await.unwrap();
        t.publish("nobody-listens", Message::new("e"))
            .await
            .unwrap();
        assert_eq!(t.pending("a").len(), 1);
        assert_eq!(t.pending("b").len(), 1);
        assert_eq!(t.pending("a")[0].id(), t.pending("b")[0].id());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_until_wakes_on_changes() {
        let t = MemoryTransport::new();
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.wait_until(|t| t.pending("q").len() == 2).await })
        };
        t.send("q", Message::new("1")).await.unwrap();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one message is not two");
        t.send("q", Message::new("2")).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
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
