//! A delivery that comes back early by less than the transport's precision is waited for
//! outside the worker's handler slots, on the real broker (`AMQP_URL`, default the local one).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use redeliver_core::{Context, Message, Outcome, Topology, Worker};

use common::{Fixture, eventually};

/// The handler calls: which message, and when.
type Calls = Arc<Mutex<Vec<(String, DateTime<Utc>)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_behind_one_waiting_for_its_not_before_is_handled_at_once() {
    // Fixed-TTL mode: a delayed message comes back after 3 s whatever its not-before, so one
    // due in 5 s comes back 2 s early and is waited for (the transport cannot do better).
    let Some(fx) =
        Fixture::new(|o| o.with_fixed_ttl_retry_queue("-retry", Duration::from_secs(3))).await
    else {
        return;
    };
    fx.declare(&Topology::new().endpoint("slots")).await;
    let transport = fx.transport();
    let calls: Calls = Arc::default();
    let worker = Worker::builder(Arc::clone(&transport), "slots")
        .concurrency(1)
        .start({
            let calls = Arc::clone(&calls);
            move |name: String, _: Context| {
                calls.lock().unwrap().push((name, Utc::now()));
                async { Outcome::success() }
            }
        })
        .await
        .unwrap();

    let not_before = Utc::now() + TimeDelta::seconds(5);
    transport
        .send(
            "slots",
            Message::json(&"waiting")
                .unwrap()
                .with_not_before(not_before),
        )
        .await
        .unwrap();
    // Back from the retry queue, early: the worker has it, and has not called the handler.
    eventually(Duration::from_secs(10), "the early return", || {
        worker.stats().received == 1
    })
    .await;
    assert!(calls.lock().unwrap().is_empty());
    transport
        .send("slots", Message::json(&"behind").unwrap())
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "both calls", || {
        calls.lock().unwrap().len() == 2
    })
    .await;
    let stats = worker.shutdown().await;

    let calls = calls.lock().unwrap().clone();
    let names: Vec<&str> = calls.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["behind", "waiting"], "{calls:?}");
    assert!(
        calls[0].1 < not_before,
        "the message behind was handled while the other waited: {calls:?}"
    );
    assert!(calls[1].1 >= not_before, "never early: {calls:?}");
    assert_eq!((stats.parked, stats.completed), (0, 2), "{stats:?}");
}
