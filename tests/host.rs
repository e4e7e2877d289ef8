//! The application host on the in-memory transport, with tokio's clock paused: exact figures.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use redeliver::host::Routes;
use redeliver::host::middleware::{BoxOutcome, Middleware, Next};
use redeliver::memory::MemoryTransport;
use redeliver::{
    Backoff, BackoffPolicy, Consumer, Context, Error, Host, Jitter, Message, Outcome, Source,
    Transport,
};
use support::{secs, within};

fn setup() -> (MemoryTransport, Arc<dyn Transport>) {
    let memory = MemoryTransport::new();
    (memory.clone(), Arc::new(memory))
}

fn one_attempt() -> BackoffPolicy {
    BackoffPolicy::builder()
        .max_attempts(1)
        .backoff(Backoff::fixed(secs(1)))
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

#[derive(Default)]
struct Counts {
    orders: AtomicU32,
    audit: AtomicU32,
}

async fn count_order(_: serde_json::Value, ctx: Context<Counts>) -> Outcome {
    ctx.state().orders.fetch_add(1, Ordering::SeqCst);
    Outcome::success()
}

async fn count_audit(_: serde_json::Value, ctx: Context<Counts>) -> Outcome {
    ctx.state().audit.fetch_add(1, Ordering::SeqCst);
    Outcome::success()
}

#[tokio::test(start_paused = true)]
async fn the_host_declares_what_its_consumers_need_and_runs_them_all() {
    let (memory, transport) = setup();
    let builder = Host::with_state(transport.clone(), Counts::default())
        .consumer(Consumer::subscription("placed", "orders").handler(count_order))
        .consumer(Consumer::subscription("placed", "audit").handler(count_audit));
    assert_eq!(
        builder
            .topology()
            .topics()
            .map(|(topic, endpoints)| (topic.to_owned(), endpoints.count()))
            .collect::<Vec<_>>(),
        [("placed".to_owned(), 2)]
    );
    let host = builder.start().await.unwrap();

    transport
        .publish("placed", Message::json(&1).unwrap())
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;

    assert!(host.is_healthy());
    let stats = host.shutdown().await;
    let completed: Vec<(Source, u64)> = stats.into_iter().map(|(s, w)| (s, w.completed)).collect();
    assert_eq!(
        completed,
        [
            (Source::endpoint("orders"), 1),
            (Source::endpoint("audit"), 1)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn every_consumer_stops_at_one_deadline() {
    let (memory, transport) = setup();
    let slow = |_: serde_json::Value, _: Context| async {
        tokio::time::sleep(secs(60)).await;
        Outcome::success()
    };
    let host = Host::builder(transport.clone())
        .shutdown_timeout(secs(5))
        .consumer(Consumer::endpoint("a").handler(slow))
        .consumer(Consumer::endpoint("b").handler(slow))
        .start()
        .await
        .unwrap();
    for endpoint in ["a", "b"] {
        transport
            .send(endpoint, Message::json(&1).unwrap())
            .await
            .unwrap();
    }
    within(
        "both in flight",
        memory.wait_until(|m| m.in_flight("a") == 1 && m.in_flight("b") == 1),
    )
    .await;

    let started = tokio::time::Instant::now();
    let stats = host.shutdown().await;

    assert_eq!(
        started.elapsed(),
        secs(5),
        "one deadline for both, not one after the other"
    );
    assert!(stats.iter().all(|(_, s)| s.abandoned == 1), "{stats:?}");
    assert_eq!(
        (memory.pending("a").len(), memory.pending("b").len()),
        (1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_paused_consumer_takes_nothing_until_resumed() {
    let (memory, transport) = setup();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let host = Host::builder(transport.clone())
        .consumer(
            Consumer::endpoint("orders").handler(move |_: serde_json::Value, _: Context| {
                seen.fetch_add(1, Ordering::SeqCst);
                async { Outcome::success() }
            }),
        )
        .start()
        .await
        .unwrap();

    assert!(host.pause("orders"));
    assert!(!host.pause("nobody"));
    assert!(host.health()[0].paused);
    transport
        .send("orders", Message::json(&1).unwrap())
        .await
        .unwrap();
    tokio::time::sleep(secs(3600)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "nothing handled while paused"
    );
    assert_eq!(
        memory.pending("orders").len() + memory.in_flight("orders"),
        1
    );

    assert!(host.resume("orders"));
    within("idle", memory.wait_until_idle()).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    host.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_handler_over_its_time_out_is_retried_with_the_reason_named() {
    let (memory, transport) = setup();
    let host = Host::builder(transport.clone())
        .consumer(
            Consumer::endpoint("hooks")
                .timeout(secs(3))
                .retry_policy(one_attempt())
                .handler(|_: serde_json::Value, _: Context| async {
                    tokio::time::sleep(secs(10)).await;
                    Outcome::success()
                }),
        )
        .start()
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    transport
        .send("hooks", Message::json(&1).unwrap())
        .await
        .unwrap();
    within(
        "the dead letter",
        memory.wait_until(|m| m.dead_letters("hooks").len() == 1),
    )
    .await;

    assert_eq!(started.elapsed(), secs(3));
    let dead = memory.dead_letters("hooks");
    assert_eq!(
        dead[0].dead_letter().unwrap().reason,
        "handler timed out after 3s"
    );
    host.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_dropped_host_stops_its_consumers() {
    let (memory, transport) = setup();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let host = Host::builder(transport.clone())
        .consumer(
            Consumer::endpoint("orders").handler(move |_: serde_json::Value, _: Context| {
                seen.fetch_add(1, Ordering::SeqCst);
                async { Outcome::success() }
            }),
        )
        .start()
        .await
        .unwrap();
    drop(host);
    tokio::time::sleep(secs(1)).await;
    transport
        .send("orders", Message::json(&1).unwrap())
        .await
        .unwrap();
    tokio::time::sleep(secs(3600)).await;

    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        memory.pending("orders").len(),
        1,
        "kept for the next consumer"
    );
}

#[tokio::test(start_paused = true)]
async fn a_consumer_that_cannot_start_is_named() {
    let (_, transport) = setup();
    let e = Host::builder(transport)
        .consumer(Consumer::endpoint("fine").handler(count))
        .consumer(Consumer::endpoint("orders").concurrency(0).handler(count))
        .start()
        .await
        .unwrap_err();
    match e {
        Error::Config { field, .. } => assert_eq!(field, "consumers.orders.concurrency"),
        other => panic!("unexpected {other}"),
    }
}

async fn count(_: serde_json::Value, _: Context) -> Outcome {
    Outcome::success()
}

#[tokio::test(start_paused = true)]
async fn health_reports_each_consumer() {
    let (_, transport) = setup();
    let host = Host::builder(transport)
        .consumer(Consumer::endpoint("orders").handler(count))
        .consumer(Consumer::dead_letters("orders").handler(count))
        .start()
        .await
        .unwrap();
    let health = host.health();
    let shown: Vec<(String, bool, bool)> = health
        .iter()
        .map(|h| (h.source.to_string(), h.consuming, h.paused))
        .collect();
    assert_eq!(
        shown,
        [
            ("orders".to_owned(), true, false),
            ("orders (dead letters)".to_owned(), true, false)
        ]
    );
    host.shutdown().await;
}

/// Records the order layers run in, and turns messages marked `poison` into dead letters
/// without calling the handler.
struct Tag {
    name: &'static str,
    seen: Arc<std::sync::Mutex<Vec<&'static str>>>,
}

impl<S: Send + Sync + 'static> Middleware<S> for Tag {
    fn handle<'a>(&'a self, context: &'a Context<S>, next: Next<'a>) -> BoxOutcome<'a> {
        Box::pin(async move {
            self.seen.lock().unwrap().push(self.name);
            if context.headers().get("poison").is_some() {
                return Outcome::dead_letter("poison");
            }
            next.run().await
        })
    }
}

#[tokio::test(start_paused = true)]
async fn layers_run_around_handlers_outermost_first_and_may_decide() {
    let (memory, transport) = setup();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&calls);
    let host = Host::builder(transport.clone())
        .layer(Tag {
            name: "host",
            seen: Arc::clone(&seen),
        })
        .consumer(
            Consumer::endpoint("orders")
                .handler(move |_: serde_json::Value, _: Context| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async { Outcome::success() }
                })
                .layer(Tag {
                    name: "consumer",
                    seen: Arc::clone(&seen),
                }),
        )
        .start()
        .await
        .unwrap();
    transport
        .send("orders", Message::json(&1).unwrap())
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;
    transport
        .send(
            "orders",
            Message::json(&2).unwrap().with_header("poison", "1"),
        )
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;
    host.shutdown().await;

    assert_eq!(*seen.lock().unwrap(), ["host", "consumer", "host"]);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the poison never reached the handler"
    );
    assert_eq!(
        memory.dead_letters("orders")[0]
            .dead_letter()
            .unwrap()
            .reason,
        "poison"
    );
}

#[tokio::test(start_paused = true)]
async fn max_concurrency_bounds_handler_calls_across_consumers() {
    let (memory, transport) = setup();
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let handler = {
        let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
        move |_: serde_json::Value, _: Context| {
            let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(secs(1)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Outcome::success()
            }
        }
    };
    let host = Host::builder(transport.clone())
        .max_concurrency(3)
        .consumer(
            Consumer::endpoint("a")
                .concurrency(4)
                .handler(handler.clone()),
        )
        .consumer(Consumer::endpoint("b").concurrency(4).handler(handler))
        .start()
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    for n in 0..6 {
        for endpoint in ["a", "b"] {
            transport
                .send(endpoint, Message::json(&n).unwrap())
                .await
                .unwrap();
        }
    }
    within("idle", memory.wait_until_idle()).await;
    host.shutdown().await;

    assert_eq!(peak.load(Ordering::SeqCst), 3);
    assert_eq!(started.elapsed(), secs(4), "12 calls of 1 s, 3 at a time");
}

#[derive(serde::Deserialize)]
struct Placed {
    order_id: u64,
}

#[derive(serde::Deserialize)]
struct Cancelled {
    order_id: u64,
}

#[tokio::test(start_paused = true)]
async fn several_message_types_on_one_endpoint_go_to_their_handlers() {
    let (memory, transport) = setup();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (on_placed, on_cancelled) = (Arc::clone(&seen), Arc::clone(&seen));
    let routes = Routes::new()
        .route("order-placed", move |m: Placed, _: Context| {
            on_placed
                .lock()
                .unwrap()
                .push(format!("placed {}", m.order_id));
            async { Outcome::success() }
        })
        .route("order-cancelled", move |m: Cancelled, _: Context| {
            on_cancelled
                .lock()
                .unwrap()
                .push(format!("cancelled {}", m.order_id));
            async { Outcome::success() }
        });
    let host = Host::builder(transport.clone())
        .consumer(Consumer::endpoint("orders").routes(routes))
        .start()
        .await
        .unwrap();
    let typed = |t: &str, json: &str| Message::new(json.to_owned()).with_message_type(t);
    for message in [
        typed("order-placed", r#"{"order_id":1}"#),
        typed("order-cancelled", r#"{"order_id":1}"#),
        typed("order-shipped", r#"{"order_id":1}"#),
        Message::new(r#"{"order_id":2}"#),
        typed("order-placed", "not json"),
    ] {
        transport.send("orders", message).await.unwrap();
    }
    within("idle", memory.wait_until_idle()).await;
    host.shutdown().await;

    assert_eq!(*seen.lock().unwrap(), ["placed 1", "cancelled 1"]);
    let dead: Vec<(String, String)> = memory
        .dead_letters("orders")
        .iter()
        .map(|m| {
            let info = m.dead_letter().unwrap();
            (info.reason.clone(), info.description.clone().unwrap())
        })
        .collect();
    assert_eq!(dead[0].0, "unknown message type");
    assert_eq!(
        dead[0].1,
        "message type `order-shipped`; this endpoint takes `order-cancelled`, `order-placed`"
    );
    assert_eq!(dead[1].0, "unknown message type");
    assert!(
        dead[1].1.starts_with("no `message-type` header"),
        "{}",
        dead[1].1
    );
    assert_eq!(dead[2].0, "invalid payload");
    assert_eq!(dead.len(), 3);
}
