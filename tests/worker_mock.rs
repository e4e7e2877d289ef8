//! Worker logic that needs a misbehaving or scripted transport, written against the
//! `mockall` mock of the transport trait.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::TimeDelta;
use futures::StreamExt;
use redeliver::transport::{Delivery, FrameworkState, Settle, Stored};
// The mock of the transport trait (the `mock` feature of `redeliver` re-exports it).
use redeliver::{Capabilities, Clock, Context, Error, Message, Outcome, Source, Transport, Worker};
use redeliver_core::MockTransport;
use support::{Calls, within};
use tokio::sync::mpsc;

/// How a delivery was settled: the step the transport was asked for.
#[derive(Debug, PartialEq)]
enum Settlement {
    Complete,
    Abandon,
    Reschedule(Message),
    DeadLetter(Message),
}

/// A settler that reports what it was asked to do, optionally failing. It stores copies as
/// moved, so that each settlement is one step.
struct Recorder {
    settlements: mpsc::UnboundedSender<Settlement>,
    fail: bool,
    /// Its channel or lock is gone: the broker delivers the message again.
    lost: bool,
}

impl Recorder {
    fn record(&self, settlement: Settlement) -> Result<(), Error> {
        let _ = self.settlements.send(settlement);
        if self.fail {
            return Err(Error::connection("lost", std::io::Error::other("reset")));
        }
        Ok(())
    }
}

#[async_trait]
impl Settle for Recorder {
    fn check_held(&self) -> Result<(), Error> {
        if self.lost {
            return Err(Error::connection("lost", std::io::Error::other("closed")));
        }
        Ok(())
    }

    async fn remove(&mut self) -> Result<(), Error> {
        self.record(Settlement::Complete)
    }

    async fn give_back(&mut self) -> Result<(), Error> {
        self.record(Settlement::Abandon)
    }

    async fn store_copy(&mut self, next: &Message) -> Result<Stored, Error> {
        self.record(Settlement::Reschedule(next.clone()))
            .map(|()| Stored::Moved)
    }

    async fn store_dead_letter(&mut self, dead: &Message) -> Result<Stored, Error> {
        self.record(Settlement::DeadLetter(dead.clone()))
            .map(|()| Stored::Moved)
    }
}

struct Script {
    transport: MockTransport,
    settlements: mpsc::UnboundedReceiver<Settlement>,
    tx: mpsc::UnboundedSender<Settlement>,
    calls: Calls,
}

impl Script {
    fn new(precision: Duration, clock: Clock) -> Self {
        let mut transport = MockTransport::new();
        transport
            .expect_capabilities()
            .returning(move || Capabilities::new(precision));
        let calls = Calls::new(clock.clone());
        transport.expect_clock().returning(move || clock.clone());
        let (tx, settlements) = mpsc::unbounded_channel();
        Script {
            transport,
            settlements,
            tx,
            calls,
        }
    }

    fn delivery(&self, message: Message, fail: bool) -> Delivery {
        let settler = Recorder {
            settlements: self.tx.clone(),
            fail,
            lost: false,
        };
        Delivery::new(message, Source::endpoint("q"), settler)
    }

    /// A delivery whose channel is already gone.
    fn lost_delivery(&self, message: Message) -> Delivery {
        let settler = Recorder {
            settlements: self.tx.clone(),
            fail: false,
            lost: true,
        };
        Delivery::new(message, Source::endpoint("q"), settler)
    }

    /// The consumer yields `deliveries`, then stays open.
    fn consume(&mut self, deliveries: Vec<Delivery>) {
        let mut once = Some(deliveries);
        self.transport
            .expect_consume()
            .times(1)
            .returning(move |_, _| {
                let items = once.take().expect("consumed once").into_iter().map(Ok);
                Ok(futures::stream::iter(items)
                    .chain(futures::stream::pending())
                    .boxed())
            });
    }
}

/// Starts a worker on `q` of `transport` whose handler records its calls in `calls` and
/// succeeds.
async fn start_recording(transport: MockTransport, calls: &Calls) -> Worker {
    Worker::builder(Arc::new(transport), "q")
        .start(recording_handler(calls.clone()))
        .await
        .unwrap()
}

/// Succeeds, recording the call (which asserts that it did not come before the not-before).
fn recording_handler(
    calls: Calls,
) -> impl Fn(serde_json::Value, Context) -> std::future::Ready<Outcome> + Send + Sync + 'static {
    move |_, ctx| {
        calls.record(&ctx);
        std::future::ready(Outcome::success())
    }
}

#[tokio::test(start_paused = true)]
async fn an_early_delivery_is_parked_without_calling_the_handler_or_counting_an_attempt() {
    let clock = Clock::tokio();
    let mut script = Script::new(Duration::ZERO, clock.clone());
    let not_before = clock.now() + TimeDelta::seconds(60);
    let early = Message::json(&1)
        .unwrap()
        .with_attempt(2)
        .with_not_before(not_before);
    let delivery = script.delivery(early.clone(), false);
    script.consume(vec![delivery]);
    let calls = script.calls.clone();

    let worker = start_recording(script.transport, &calls).await;
    let settlement = within("a settlement", script.settlements.recv())
        .await
        .unwrap();

    assert_eq!(
        settlement,
        Settlement::Reschedule(early),
        "put back unchanged: same attempt, same not-before"
    );
    assert_eq!(calls.count(), 0);
    let stats = worker.shutdown().await;
    assert_eq!((stats.parked, stats.handled), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn early_by_less_than_the_precision_is_waited_for_not_parked() {
    let clock = Clock::tokio();
    let mut script = Script::new(Duration::from_secs(1), clock.clone());
    let not_before = clock.now() + TimeDelta::milliseconds(400);
    let delivery = script.delivery(
        Message::json(&1).unwrap().with_not_before(not_before),
        false,
    );
    script.consume(vec![delivery]);
    let called_at = Arc::new(std::sync::Mutex::new(None));
    let (seen, handler_clock) = (called_at.clone(), clock.clone());

    let worker = Worker::builder(Arc::new(script.transport), "q")
        .start(move |_: serde_json::Value, _: Context| {
            *seen.lock().unwrap() = Some(handler_clock.now());
            async { Outcome::success() }
        })
        .await
        .unwrap();
    let settlement = within("a settlement", script.settlements.recv())
        .await
        .unwrap();

    assert_eq!(settlement, Settlement::Complete);
    assert!(called_at.lock().unwrap().unwrap() >= not_before);
    assert_eq!(worker.shutdown().await.parked, 0);
}

#[tokio::test(start_paused = true)]
async fn a_delivery_lost_while_it_waited_for_its_not_before_is_not_handled() {
    // The broker delivers a message again once the channel it came on is gone; handling the
    // copy that waited as well would handle it twice.
    let clock = Clock::tokio();
    let mut script = Script::new(Duration::from_secs(1), clock.clone());
    let not_before = clock.now() + TimeDelta::milliseconds(400);
    let delivery = script.lost_delivery(Message::json(&1).unwrap().with_not_before(not_before));
    script.consume(vec![delivery]);
    let calls = script.calls.clone();

    let worker = start_recording(script.transport, &calls).await;
    // Virtual time: well past the not-before, when the handler would have been called.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = worker.shutdown().await;

    assert_eq!(calls.count(), 0, "the handler was not called");
    assert_eq!(stats.handled, 0);
    assert!(
        script.settlements.try_recv().is_err(),
        "nothing was settled"
    );
}

#[tokio::test(start_paused = true)]
async fn a_delivery_waiting_for_its_not_before_holds_no_handler_slot() {
    let clock = Clock::tokio();
    let mut script = Script::new(Duration::from_secs(3), clock.clone());
    let start = clock.now();
    let not_before = start + TimeDelta::seconds(2);
    let waiting = script.delivery(
        Message::json(&"waiting")
            .unwrap()
            .with_not_before(not_before),
        false,
    );
    let behind = script.delivery(Message::json(&"behind").unwrap(), false);
    let mut once = Some(vec![waiting, behind]);
    script
        .transport
        .expect_consume()
        .times(1)
        .returning(move |_, options| {
            // One handler slot, and room for one delivery waiting aside.
            assert_eq!(options.prefetch, 2);
            let items = once.take().expect("consumed once").into_iter().map(Ok);
            Ok(futures::stream::iter(items)
                .chain(futures::stream::pending())
                .boxed())
        });
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen, handler_clock) = (handled.clone(), clock.clone());

    let worker = Worker::builder(Arc::new(script.transport), "q")
        .concurrency(1)
        .start(move |name: String, _: Context| {
            let after = handler_clock.now() - start;
            seen.lock().unwrap().push((name, after.num_milliseconds()));
            async { Outcome::success() }
        })
        .await
        .unwrap();
    for _ in 0..2 {
        let settlement = within("a settlement", script.settlements.recv())
            .await
            .unwrap();
        assert_eq!(settlement, Settlement::Complete);
    }

    assert_eq!(
        *handled.lock().unwrap(),
        [("behind".to_owned(), 0), ("waiting".to_owned(), 2000)],
        "the message behind is handled at once, the waiting one at its not-before"
    );
    let stats = worker.shutdown().await;
    assert_eq!(
        (stats.received, stats.handled, stats.completed, stats.parked),
        (2, 2, 2, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_delivery_waiting_aside_is_given_back_at_shutdown() {
    let clock = Clock::tokio();
    let mut script = Script::new(Duration::from_secs(3), clock.clone());
    let not_before = clock.now() + TimeDelta::seconds(2);
    let waiting = script.delivery(
        Message::json(&1).unwrap().with_not_before(not_before),
        false,
    );
    script.consume(vec![waiting]);
    let calls = script.calls.clone();

    let worker = start_recording(script.transport, &calls).await;
    // Let the worker take the delivery and put it aside (virtual time does not move).
    while worker.stats().received == 0 {
        tokio::task::yield_now().await;
    }
    let stats = worker.shutdown().await;

    assert_eq!(
        within("a settlement", script.settlements.recv()).await,
        Some(Settlement::Abandon)
    );
    assert_eq!((stats.abandoned, stats.handled), (1, 0));
    assert_eq!(calls.count(), 0);
}

#[tokio::test(start_paused = true)]
async fn malformed_headers_are_dead_lettered_with_the_problem() {
    let mut script = Script::new(Duration::ZERO, Clock::tokio());
    let delivery = script
        .delivery(Message::json(&1).unwrap(), false)
        .with_problem(Some("`redeliver-attempt` is `x`".into()));
    script.consume(vec![delivery]);
    let calls = script.calls.clone();

    let worker = start_recording(script.transport, &calls).await;
    let settlement = within("a settlement", script.settlements.recv())
        .await
        .unwrap();

    let Settlement::DeadLetter(dead) = settlement else {
        panic!("{settlement:?}")
    };
    let info = dead.dead_letter().unwrap();
    assert_eq!(info.reason, "malformed headers");
    assert_eq!(
        info.description.as_deref(),
        Some("`redeliver-attempt` is `x`")
    );
    assert_eq!(calls.count(), 0);
    worker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_settlement_is_reported_and_the_worker_goes_on() {
    let mut script = Script::new(Duration::ZERO, Clock::tokio());
    let failing = script.delivery(Message::json(&1).unwrap(), true);
    let fine = script.delivery(Message::json(&2).unwrap(), false);
    script.consume(vec![failing, fine]);
    let calls = script.calls.clone();

    let worker = start_recording(script.transport, &calls).await;
    for _ in 0..2 {
        within("a settlement", script.settlements.recv())
            .await
            .unwrap();
    }

    let stats = worker.shutdown().await;
    assert_eq!(
        (stats.handled, stats.completed, stats.settle_failures),
        (2, 1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_closed_consumer_is_opened_again() {
    let mut script = Script::new(Duration::ZERO, Clock::tokio());
    let first = script.delivery(Message::json(&1).unwrap(), false);
    let second = script.delivery(Message::json(&2).unwrap(), false);
    let mut batches = vec![vec![second], vec![first]];
    script
        .transport
        .expect_consume()
        .times(2)
        .returning(move |_, _| {
            let batch = batches.pop().unwrap().into_iter().map(Ok);
            let closes = batches.len() == 1; // the first consumer closes after its delivery
            let stream = futures::stream::iter(batch);
            Ok(if closes {
                stream.boxed()
            } else {
                stream.chain(futures::stream::pending()).boxed()
            })
        });
    let calls = script.calls.clone();

    let worker = start_recording(script.transport, &calls).await;
    for _ in 0..2 {
        within("a settlement", script.settlements.recv())
            .await
            .unwrap();
    }
    assert_eq!(calls.count(), 2);
    worker.shutdown().await;
}

#[tokio::test]
async fn invalid_worker_configuration_names_the_field() {
    let transport: Arc<dyn Transport> = Arc::new(MockTransport::new());
    let err = Worker::builder(transport, "q")
        .concurrency(0)
        .start(recording_handler(Calls::new(Clock::system())))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config { field, .. } if field == "concurrency"),
        "{err}"
    );
}

/// What the mock is for in applications: unit-testing code that sends messages.
#[tokio::test]
async fn application_code_that_sends_can_be_tested_with_the_mock() {
    async fn place_order(transport: &dyn Transport, id: u32) -> Result<(), Error> {
        transport
            .send("orders", Message::json(&id)?.with_subject("order-placed"))
            .await
    }

    let mut transport = MockTransport::new();
    transport
        .expect_send()
        .withf(|endpoint, message| {
            endpoint == "orders"
                && message.subject() == Some("order-placed")
                && message.decode::<u32>().ok() == Some(7)
        })
        .times(1)
        .returning(|_, _| Ok(()));
    place_order(&transport, 7).await.unwrap();
}
