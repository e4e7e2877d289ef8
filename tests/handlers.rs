//! What handlers can be and do: application state by reference, sending from the context,
//! `Result` return values with `?`, undecoded bodies. On the in-memory transport with tokio's
//! clock paused.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use redeliver::memory::MemoryTransport;
use redeliver::{
    Backoff, BackoffPolicy, Context, Failure, Jitter, Message, Outcome, RawBody, ResultExt,
    Transport, Worker,
};
use serde::{Deserialize, Serialize};
use support::{secs, within};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u32,
}

fn setup() -> (MemoryTransport, Arc<dyn Transport>) {
    let memory = MemoryTransport::new();
    (memory.clone(), Arc::new(memory))
}

fn three_attempts() -> BackoffPolicy {
    BackoffPolicy::builder()
        .max_attempts(3)
        .backoff(Backoff::fixed(secs(1)))
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

/// State that must not be cloned per message: cloning it panics.
struct App {
    calls: AtomicU32,
}

impl Clone for App {
    fn clone(&self) -> Self {
        panic!("the state was cloned")
    }
}

#[tokio::test(start_paused = true)]
async fn every_handler_call_gets_the_one_state_by_reference() {
    let (memory, transport) = setup();
    let worker = Worker::builder(transport.clone(), "orders")
        .concurrency(4)
        .state(App {
            calls: AtomicU32::new(0),
        })
        .start(|_: Order, ctx: Context<App>| async move {
            ctx.state().calls.fetch_add(1, Ordering::SeqCst);
            Outcome::success()
        })
        .await
        .unwrap();
    for id in 0..10 {
        transport
            .send("orders", Message::json(&Order { id }).unwrap())
            .await
            .unwrap();
    }
    within("idle", memory.wait_until_idle()).await;
    assert_eq!(worker.shutdown().await.completed, 10);
}

#[tokio::test(start_paused = true)]
async fn a_message_sent_from_a_handler_carries_the_correlation_and_the_cause() {
    let (memory, transport) = setup();
    let worker = Worker::builder(transport.clone(), "orders")
        .start(|order: Order, ctx: Context| async move {
            ctx.send("invoices", Message::json(&order)?).await?;
            Ok::<(), Failure>(())
        })
        .await
        .unwrap();
    let correlated = Message::json(&Order { id: 1 })
        .unwrap()
        .with_correlation_id("conversation-7");
    let uncorrelated = Message::json(&Order { id: 2 }).unwrap();
    let (first, second) = (correlated.id().clone(), uncorrelated.id().clone());
    transport.send("orders", correlated).await.unwrap();
    transport.send("orders", uncorrelated).await.unwrap();
    within(
        "two invoices",
        memory.wait_until(|m| m.pending("invoices").len() == 2),
    )
    .await;
    worker.shutdown().await;

    let sent = memory.pending("invoices");
    let sent: Vec<(Option<&str>, Option<&str>)> = sent
        .iter()
        .map(|m| (m.correlation_id(), m.headers().get("causation-id")))
        .collect();
    assert_eq!(
        sent,
        [
            (Some("conversation-7"), Some(first.as_str())),
            // A conversation that starts here is correlated by the message that started it.
            (Some(second.as_str()), Some(second.as_str())),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn errors_returned_with_question_marks_are_retried_then_dead_lettered() {
    let (memory, transport) = setup();
    let attempts = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&attempts);
    let worker = Worker::builder(transport.clone(), "lines")
        .retry_policy(three_attempts())
        .start(move |line: String, _: Context| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move {
                let n: u32 = line.parse()?;
                Ok::<Outcome, Failure>(if n > 0 {
                    Outcome::success()
                } else {
                    Outcome::discard("zero")
                })
            }
        })
        .await
        .unwrap();
    transport
        .send("lines", Message::json(&"seven").unwrap())
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;
    let stats = worker.shutdown().await;

    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!((stats.retried, stats.dead_lettered), (2, 1));
    let dead = memory.dead_letters("lines");
    assert_eq!(
        dead[0].dead_letter().unwrap().reason,
        "invalid digit found in string"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failure_can_dead_letter_at_once() {
    let (memory, transport) = setup();
    let worker = Worker::builder(transport.clone(), "lines")
        .retry_policy(three_attempts())
        .start(|line: String, _: Context| async move {
            let _: u32 = line.parse().or_dead_letter("not a number")?;
            Ok::<(), Failure>(())
        })
        .await
        .unwrap();
    transport
        .send("lines", Message::json(&"seven").unwrap())
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;
    let stats = worker.shutdown().await;

    assert_eq!(
        (stats.handled, stats.retried, stats.dead_lettered),
        (1, 0, 1)
    );
    let info = memory.dead_letters("lines")[0]
        .dead_letter()
        .cloned()
        .unwrap();
    assert_eq!(info.reason, "not a number");
    assert_eq!(
        info.description.as_deref(),
        Some("invalid digit found in string")
    );
}

#[tokio::test(start_paused = true)]
async fn a_raw_body_handler_takes_what_json_handlers_cannot() {
    let (memory, transport) = setup();
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&bodies);
    let worker = Worker::builder(transport.clone(), "files")
        .start(move |body: RawBody, _: Context| {
            seen.lock().unwrap().push(body.0);
            async { Outcome::success() }
        })
        .await
        .unwrap();
    let binary = Message::new(vec![0xff, 0x00, 0xfe]).with_content_type("application/octet-stream");
    transport.send("files", binary).await.unwrap();
    within("idle", memory.wait_until_idle()).await;
    let stats = worker.shutdown().await;

    assert_eq!(*bodies.lock().unwrap(), [vec![0xff, 0x00, 0xfe]]);
    assert_eq!((stats.completed, stats.dead_lettered), (1, 0));
}
