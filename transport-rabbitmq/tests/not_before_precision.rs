//! Not-before to the tens of milliseconds on the real broker (`AMQP_URL`, default the local
//! one): the delay cascade rounds down to whole seconds and the worker waits out the last
//! fraction of a second aside, holding only the unacknowledged delivery.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::StreamExt;
use redeliver_core::{Context, Message, Outcome, Topology, Transport, Worker};
use tokio::sync::watch;

use common::{Fixture, eventually};

/// One handler call: which message, and when (by the UTC clock the worker checks against).
type Call = (String, DateTime<Utc>);

/// The handler calls, in call order.
#[derive(Clone)]
struct Calls {
    calls: Arc<Mutex<Vec<Call>>>,
    count: watch::Sender<usize>,
}

impl Calls {
    fn new() -> Self {
        Calls {
            calls: Arc::default(),
            count: watch::Sender::new(0),
        }
    }

    fn record(&self, name: String) {
        let at = Utc::now();
        let len = {
            let mut calls = self.calls.lock().unwrap();
            calls.push((name, at));
            calls.len()
        };
        self.count.send_replace(len);
    }

    /// Waits until `n` calls were made (at most `within`), then returns them in call order.
    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Call> {
        let mut count = self.count.subscribe();
        tokio::time::timeout(within, count.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {n} handler calls within {within:?}: {:?}",
                    *self.count.borrow(),
                    self.snapshot()
                )
            })
            .expect("the sender is alive");
        self.snapshot()
    }

    fn snapshot(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

async fn start(
    transport: Arc<dyn Transport>,
    endpoint: &str,
    concurrency: usize,
) -> (Worker, Calls) {
    let calls = Calls::new();
    let worker = Worker::builder(transport, endpoint)
        .concurrency(concurrency)
        .start({
            let calls = calls.clone();
            move |name: String, _: Context| {
                calls.record(name);
                async { Outcome::success() }
            }
        })
        .await
        .unwrap();
    (worker, calls)
}

async fn send_at(transport: &dyn Transport, endpoint: &str, name: &str, at: DateTime<Utc>) {
    let message = Message::json(&name).unwrap().with_not_before(at);
    transport.send(endpoint, message).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_due_in_1_3_s_is_handled_within_200_ms_of_its_not_before() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("soon")).await;
    let transport = fx.transport();
    let (worker, calls) = start(Arc::clone(&transport), "soon", 1).await;

    let not_before = Utc::now() + TimeDelta::milliseconds(1300);
    send_at(transport.as_ref(), "soon", "soon", not_before).await;
    let calls = calls.wait_for(1, Duration::from_secs(10)).await;
    let stats = worker.shutdown().await;

    let late = calls[0].1 - not_before;
    assert!(late >= TimeDelta::zero(), "handled {late} early");
    // Generous: rounding the delay up to whole seconds made it about 700 ms late.
    assert!(
        late < TimeDelta::milliseconds(200),
        "handled {} ms late",
        late.num_milliseconds()
    );
    assert_eq!((stats.parked, stats.completed), (0, 1), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_random_delays_are_never_handled_early() {
    const MESSAGES: usize = 1000;
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("random")).await;
    let transport = fx.transport();
    // About a third of the delays end within any one second, and each waits aside for less
    // than a second: fewer than 500 wait at once, so the waiting room (the concurrency) never
    // overflows into parking.
    let (worker, calls) = start(Arc::clone(&transport), "random", 500).await;

    let due: HashMap<String, DateTime<Utc>> = (0..MESSAGES)
        .map(|i| {
            let delay = TimeDelta::milliseconds(fastrand::i64(0..3000));
            (format!("m{i}"), Utc::now() + delay)
        })
        .collect();
    futures::stream::iter(due.iter())
        .for_each_concurrent(50, |(name, at)| {
            let transport = Arc::clone(&transport);
            async move { send_at(transport.as_ref(), "random", name, *at).await }
        })
        .await;
    let calls = calls.wait_for(MESSAGES, Duration::from_secs(30)).await;
    let stats = worker.shutdown().await;

    let mut late_ms = Vec::with_capacity(calls.len());
    for (name, at) in &calls {
        let not_before = due[name];
        assert!(
            *at >= not_before,
            "`{name}` handled {} early",
            not_before - *at
        );
        late_ms.push((*at - not_before).num_milliseconds());
    }
    late_ms.sort_unstable();
    let median = late_ms[late_ms.len() / 2];
    eprintln!(
        "lateness of {MESSAGES} random delays (0-3 s): median {median} ms, max {} ms; {stats:?}",
        late_ms[late_ms.len() - 1]
    );
    assert_eq!(stats.parked, 0, "the waiting room overflowed: {stats:?}");
    // Generous: rounding up to whole seconds made the median about 500 ms.
    assert!(median < 250, "median lateness {median} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_waiting_for_its_not_before_holds_no_handler_slot() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("aside")).await;
    let transport = fx.transport();
    // One handler slot: the message behind can only be handled while the other waits if the
    // waiting one does not hold it.
    let (worker, calls) = start(Arc::clone(&transport), "aside", 1).await;

    // One second in the cascade, then it waits aside for the remaining 0.8 s.
    let not_before = Utc::now() + TimeDelta::milliseconds(1800);
    send_at(transport.as_ref(), "aside", "waiting", not_before).await;
    eventually(Duration::from_secs(10), "the early delivery", || {
        worker.stats().received == 1
    })
    .await;
    assert_eq!(worker.stats().handled, 0, "handled before its not-before");
    transport
        .send("aside", Message::json(&"behind").unwrap())
        .await
        .unwrap();
    let calls = calls.wait_for(2, Duration::from_secs(10)).await;
    let stats = worker.shutdown().await;

    let names: Vec<&str> = calls.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["behind", "waiting"], "{calls:?}");
    assert!(
        calls[0].1 < not_before,
        "the message behind waited for the other: {calls:?}"
    );
    assert!(calls[1].1 >= not_before, "never early: {calls:?}");
    assert_eq!((stats.parked, stats.completed), (0, 2), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_waiting_room_an_early_delivery_goes_back_through_the_cascade_once() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("full")).await;
    let transport = fx.transport();
    // Concurrency 1: room for one delivery waiting aside.
    let (worker, calls) = start(Arc::clone(&transport), "full", 1).await;

    // Both come out of the cascade about 0.8 s early: one waits aside, the other is parked.
    let not_before = Utc::now() + TimeDelta::milliseconds(1800);
    send_at(transport.as_ref(), "full", "first", not_before).await;
    send_at(transport.as_ref(), "full", "second", not_before).await;
    let calls = calls.wait_for(2, Duration::from_secs(10)).await;
    let stats = worker.shutdown().await;

    for (name, at) in &calls {
        assert!(*at >= not_before, "`{name}` handled early: {calls:?}");
    }
    // Parked once, through the 1 s level: a park straight back to the queue would come back at
    // once, and be parked again and again until its not-before.
    assert_eq!((stats.parked, stats.completed), (1, 2), "{stats:?}");
    assert_eq!(stats.received, 3, "{stats:?}");
}
