//! Acceptance tests against a real RabbitMQ (`AMQP_URL`, default the local broker).
//!
//! Every test uses its own name prefix (queues, exchanges and the delay cascade) and deletes what
//! it made. Without a broker every test says so on stderr and skips, unless
//! `REDELIVER_REQUIRE_BROKERS=1`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use redeliver_core::{
    Backoff, BackoffPolicy, ConsumeOptions, Context, Error, Message, Outcome, RetryAfter, Source,
    Topology, Transport, Worker, wire,
};
use serde::{Deserialize, Serialize};

use common::{Fixture, Proxy, eventually, raw_connection, test_options};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Job {
    n: u32,
}

fn policy(max_attempts: u32, delay: Duration) -> BackoffPolicy {
    BackoffPolicy::builder()
        .max_attempts(max_attempts)
        .backoff(Backoff::fixed(delay))
        .build()
        .expect("a valid policy")
}

/// One handler call, as the handler saw it: which job, which attempt, when.
#[derive(Clone, Debug)]
struct Call {
    n: u32,
    attempt: u32,
    at: DateTime<Utc>,
}

/// The handler calls of these tests, by job number (the conformance suite's recorder knows
/// calls by message id, these tests by the job they sent).
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<Call>>>);

impl Calls {
    fn record(&self, job: &Job, ctx: &Context) {
        let call = Call {
            n: job.n,
            attempt: ctx.attempt(),
            at: Utc::now(),
        };
        // The promise checked on every call: never before the not-before.
        if let Some(nb) = ctx.not_before() {
            assert!(call.at >= nb, "handler called early: {call:?}");
        }
        self.0.lock().unwrap().push(call);
    }

    fn of(&self, n: u32) -> Vec<Call> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.n == n)
            .cloned()
            .collect()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// Takes `count` deliveries from `source`, completing each, within `within`.
async fn take(
    transport: &dyn Transport,
    source: Source,
    count: usize,
    within: Duration,
) -> Vec<(Message, DateTime<Utc>)> {
    let mut stream = transport
        .consume(&source, ConsumeOptions::default().with_prefetch(10))
        .await
        .expect("consume");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < count {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {count} deliveries from {source} within {within:?}",
                    got.len()
                )
            })
            .expect("the stream goes on")
            .expect("a delivery");
        let arrived = Utc::now();
        let message = next.message().clone();
        next.complete().await.expect("complete");
        got.push((message, arrived));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_reach_the_queue_less_than_a_second_early_and_at_most_half_a_second_late() {
    // The cascade rounds delays down to whole seconds: a consumer reading the queue itself (not
    // the worker, which waits out the rest aside) sees a delayed message up to a second early.
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("delays")).await;
    let transport = fx.transport();
    let mut sent = BTreeMap::new();
    for seconds in [0i64, 1, 2, 3, 10] {
        let not_before = Utc::now() + TimeDelta::seconds(seconds);
        let message = Message::new(seconds.to_string()).with_not_before(not_before);
        sent.insert(message.id().clone(), (seconds, not_before));
        transport.send("delays", message).await.unwrap();
    }
    let got = take(
        transport.as_ref(),
        Source::endpoint("delays"),
        5,
        Duration::from_secs(15),
    )
    .await;
    for (message, arrived) in got {
        let (seconds, not_before) = sent[message.id()];
        let late = arrived - not_before;
        eprintln!(
            "delay {seconds:>2} s: arrived {} ms after its not-before",
            late.num_milliseconds()
        );
        assert!(
            late > TimeDelta::seconds(-1),
            "a {seconds} s delay arrived {late} early"
        );
        assert!(
            late <= TimeDelta::milliseconds(500),
            "a {seconds} s delay arrived {late} late"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_twice_is_harmless_and_check_only_names_what_is_missing() {
    // The full default cascade (28 levels), as production uses it.
    let Some(fx) =
        Fixture::new(|o| o.with_delay_levels(redeliver_rabbitmq::MAX_DELAY_LEVELS)).await
    else {
        return;
    };
    let topology = Topology::new()
        .endpoint("orders")
        .subscribe("events", "audit");
    fx.declare(&topology).await;
    fx.declare(&topology).await;
    let transport = fx.transport();
    transport
        .send(
            "orders",
            Message::new("x").with_not_before(Utc::now() + TimeDelta::seconds(1)),
        )
        .await
        .unwrap();
    transport
        .publish("events", Message::new("e"))
        .await
        .unwrap();
    take(
        transport.as_ref(),
        Source::endpoint("orders"),
        1,
        Duration::from_secs(5),
    )
    .await;
    take(
        transport.as_ref(),
        Source::endpoint("audit"),
        1,
        Duration::from_secs(5),
    )
    .await;

    let checker = redeliver_rabbitmq::RabbitMqTransport::connect(
        fx.transport.options().clone().check_topology_only(),
    )
    .await
    .unwrap();
    checker.declare(&topology).await.expect("everything exists");
    let missing = Topology::new().endpoint("orders").endpoint("refunds");
    match checker.declare(&missing).await {
        Err(Error::NotFound {
            what, name, hint, ..
        }) => {
            assert_eq!(what, "queue");
            assert_eq!(name, format!("{}refunds", fx.prefix));
            assert!(hint.unwrap().contains("CheckOnly"));
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    // And nothing was created by checking.
    let channel = raw_connection().await.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let refunds = format!("{}refunds", fx.prefix);
    assert!(
        channel
            .queue_declare(refunds.as_str().into(), passive, FieldTable::default())
            .await
            .is_err()
    );
    checker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_and_refused_publishes_are_errors() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("known")).await;
    let transport = fx.transport();

    // No such queue: the mandatory publish comes back.
    let e = transport
        .send("nowhere", Message::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unroutable { .. }), "{e:?}");
    assert!(e.to_string().contains("nowhere"), "{e}");

    // Delayed to no such queue: refused before it enters the cascade.
    let later = Message::new("x").with_not_before(Utc::now() + TimeDelta::seconds(5));
    let e = transport.send("nowhere", later).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { what: "queue", .. }), "{e:?}");

    // No such topic exchange.
    let e = transport
        .publish("no-topic", Message::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::NotFound {
                what: "exchange",
                ..
            }
        ),
        "{e:?}"
    );

    // Longer than the cascade can hold (6 levels: 63 s; rounded down, 64.x s is 64 s).
    let far = Message::new("x").with_not_before(Utc::now() + TimeDelta::seconds(65));
    let e = transport.send("known", far).await.unwrap_err();
    assert!(matches!(e, Error::InvalidMessage { .. }), "{e:?}");
    assert!(e.to_string().contains("longest delay"), "{e}");

    // The broker refuses: a full queue with reject-publish answers with a negative confirm.
    let full = format!("{}full", fx.prefix);
    fx.track_queue(full.clone());
    declare_refusing_queue(&full, 0).await;
    let e = transport.send("full", Message::new("x")).await.unwrap_err();
    assert!(matches!(e, Error::Rejected { .. }), "{e:?}");

    // After all that the transport still works.
    transport.send("known", Message::new("ok")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_ttl_retry_queue_parks_early_returns_without_calling_the_handler() {
    let Some(fx) =
        Fixture::new(|o| o.with_fixed_ttl_retry_queue("-retry", Duration::from_secs(2))).await
    else {
        return;
    };
    fx.declare(&Topology::new().endpoint("hooks")).await;
    let transport = fx.transport();
    let calls = Calls::default();
    let worker = Worker::builder(Arc::clone(&transport), "hooks")
        .retry_policy(policy(5, Duration::from_secs(1)))
        .start({
            let calls = calls.clone();
            move |job: Job, ctx: Context| {
                let calls = calls.clone();
                async move {
                    calls.record(&job, &ctx);
                    if ctx.attempt() == 1 {
                        Outcome::retry_after("HTTP 429", RetryAfter::Delay(Duration::from_secs(5)))
                    } else {
                        Outcome::success()
                    }
                }
            }
        })
        .await
        .unwrap();
    transport
        .send("hooks", Message::json(&Job { n: 1 }).unwrap())
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "the retry", || calls.len() == 2).await;
    let stats = worker.shutdown().await;
    let calls = calls.of(1);
    assert_eq!(calls.len(), 2, "called once for the retry: {calls:?}");
    let gap = calls[1].at - calls[0].at;
    eprintln!("fixed-TTL mode: retry after {} ms", gap.num_milliseconds());
    assert!(gap >= TimeDelta::seconds(5), "retried after {gap}");
    assert!(stats.parked >= 1, "the early return was parked: {stats:?}");
    assert_eq!(stats.handled, 2, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_framework_headers_are_dead_lettered() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("strict")).await;
    let transport = fx.transport();
    let calls = Calls::default();
    let worker = Worker::builder(Arc::clone(&transport), "strict")
        .start({
            let calls = calls.clone();
            move |job: Job, ctx: Context| {
                let calls = calls.clone();
                async move {
                    calls.record(&job, &ctx);
                    Outcome::success()
                }
            }
        })
        .await
        .unwrap();
    // Another producer's messages with unreadable framework headers: a malformed text, and
    // values of a type the framework never writes.
    let channel = raw_connection().await.create_channel().await.unwrap();
    let mut array = lapin::types::FieldArray::default();
    array.push(AMQPValue::LongString("3".into()));
    let mistyped = [
        (wire::ATTEMPT, AMQPValue::LongString("zero".into())),
        (wire::ATTEMPT, AMQPValue::FieldArray(array)),
        (
            wire::NOT_BEFORE,
            AMQPValue::FieldTable(FieldTable::default()),
        ),
    ];
    for (n, (key, value)) in mistyped.iter().enumerate() {
        let mut headers = FieldTable::default();
        headers.insert((*key).into(), value.clone());
        channel
            .basic_publish(
                "".into(),
                fx.transport.queue_name("strict").as_str().into(),
                BasicPublishOptions::default(),
                format!(r#"{{"n":{n}}}"#).as_bytes(),
                BasicProperties::default()
                    .with_message_id(format!("bad-{n}").into())
                    .with_headers(headers),
            )
            .await
            .unwrap();
    }
    let dead = take(
        transport.as_ref(),
        Source::dead_letters("strict"),
        mistyped.len(),
        Duration::from_secs(10),
    )
    .await;
    for (message, _) in &dead {
        let n: usize = message.id().as_str()["bad-".len()..].parse().unwrap();
        let key = mistyped[n].0;
        let info = message.dead_letter().expect("a reason");
        assert_eq!(info.reason, "malformed headers", "{n}");
        let description = info.description.as_deref().unwrap();
        assert!(description.contains(key), "{n}: {description}");
    }
    worker.shutdown().await;
    assert_eq!(calls.len(), 0, "the handler never saw them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_loses_no_message() {
    if !common::broker_available().await {
        return;
    }
    let proxy = Proxy::start().await;
    let fx = Fixture::with_options(test_options(proxy.url())).await;
    fx.declare(&Topology::new().endpoint("cut")).await;
    let transport = fx.transport();
    let handled: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
    let started: Arc<Mutex<u32>> = Arc::default();
    let worker = Worker::builder(Arc::clone(&transport), "cut")
        .concurrency(4)
        .retry_policy(policy(5, Duration::from_secs(1)))
        .start({
            let handled = Arc::clone(&handled);
            let started = Arc::clone(&started);
            move |job: Job, _ctx: Context| {
                let handled = Arc::clone(&handled);
                let started = Arc::clone(&started);
                async move {
                    *started.lock().unwrap() += 1;
                    // Keep handlers in flight while the connection goes away.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    handled.lock().unwrap().insert(job.n);
                    Outcome::success()
                }
            }
        })
        .await
        .unwrap();
    for n in 0..20 {
        transport
            .send("cut", Message::json(&Job { n }).unwrap())
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(10), "handlers in flight", || {
        *started.lock().unwrap() >= 4
    })
    .await;
    proxy.cut();
    eventually(Duration::from_secs(30), "every message handled", || {
        handled.lock().unwrap().len() == 20
    })
    .await;
    // A message whose acknowledgement was lost with the connection is handled again (a
    // duplicate), never lost: once the worker stops, the queue is empty.
    let stats = worker.shutdown().await;
    eprintln!("after the cut: {stats:?}");
    let channel = raw_connection().await.create_channel().await.unwrap();
    let queue = fx.transport.queue_name("cut");
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let mut remaining = u32::MAX;
    for _ in 0..50 {
        remaining = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .unwrap()
            .message_count();
        if remaining == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(remaining, 0, "messages left behind in `{queue}`");
}

/// Closing waits for the broker's `close-ok` at most the publish timeout: a broker that stops
/// answering (here a frozen proxy; in the wild a lost `close-ok`) must not hang the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_an_unresponsive_connection_is_bounded() {
    if !common::broker_available().await {
        return;
    }
    let proxy = Proxy::start().await;
    let fx = Fixture::with_options(
        test_options(proxy.url()).with_operation_timeout(Duration::from_secs(1)),
    )
    .await;
    fx.declare(&Topology::new().endpoint("frozen")).await;
    proxy.freeze();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), fx.transport.close())
        .await
        .expect("close() returns within the publish timeout although the broker is silent");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "close() waited for the broker's answer before giving up ({:?})",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_while_disconnected_waits_within_the_bound_then_fails_clearly() {
    if !common::broker_available().await {
        return;
    }
    let proxy = Proxy::start().await;
    let fx = Fixture::with_options(
        test_options(proxy.url()).with_operation_timeout(Duration::from_secs(1)),
    )
    .await;
    fx.declare(&Topology::new().endpoint("offline")).await;
    let transport = fx.transport();
    proxy.set_accepting(false);
    proxy.cut();
    let e = transport
        .send("offline", Message::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains("recover"), "{e}");
    proxy.set_accepting(true);
    // Once the broker is reachable again the transport reconnects by itself.
    let mut sent = Err(e);
    for _ in 0..20 {
        sent = transport.send("offline", Message::new("y")).await;
        if sent.is_ok() {
            break;
        }
    }
    sent.expect("sending works again after reconnection");
    take(
        transport.as_ref(),
        Source::endpoint("offline"),
        1,
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test]
async fn start_up_retries_then_fails_loudly() {
    // Nothing listens on port 1: no broker needed.
    let options = redeliver_rabbitmq::RabbitMqOptions::new("amqp://guest:secret@127.0.0.1:1/%2f")
        .with_connect_attempts(3, Duration::from_millis(50));
    let e = redeliver_rabbitmq::RabbitMqTransport::connect(options)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Connection { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("after 3 attempt(s)"), "{text}");
    assert!(!text.contains("secret"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_dead_letters_at_the_delivery_limit_and_says_so() {
    let Some(fx) = Fixture::new(|o| o.with_delivery_limit(1)).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("poison")).await;
    let transport = fx.transport();
    transport
        .send("poison", Message::new("crash"))
        .await
        .unwrap();
    let mut stream = transport
        .consume(&Source::endpoint("poison"), ConsumeOptions::default())
        .await
        .unwrap();
    // As if the process crashed twice while handling it: handed out, never settled.
    for _ in 0..2 {
        let delivery = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("delivered again")
            .unwrap()
            .unwrap();
        delivery.abandon().await.unwrap();
    }
    let dead = take(
        transport.as_ref(),
        Source::dead_letters("poison"),
        1,
        Duration::from_secs(10),
    )
    .await;
    let info = dead[0].0.dead_letter().expect("a reason");
    assert!(info.reason.contains("delivery_limit"), "{info:?}");
    assert!(dead[0].0.headers().is_empty(), "no x-death for handlers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_back_handlers_in_flight_and_a_new_worker_handles_them() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("restart")).await;
    let transport = fx.transport();
    for n in 0..4 {
        transport
            .send("restart", Message::json(&Job { n }).unwrap())
            .await
            .unwrap();
    }
    let stuck = Calls::default();
    let first = Worker::builder(Arc::clone(&transport), "restart")
        .concurrency(2)
        .shutdown_timeout(Duration::from_millis(200))
        .start({
            let stuck = stuck.clone();
            move |job: Job, ctx: Context| {
                let stuck = stuck.clone();
                async move {
                    stuck.record(&job, &ctx);
                    std::future::pending::<Outcome>().await
                }
            }
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "two handlers in flight", || {
        stuck.len() == 2
    })
    .await;
    let stats = first.shutdown().await;
    assert_eq!(stats.abandoned, 2, "{stats:?}");

    let handled = Calls::default();
    let second = Worker::builder(Arc::clone(&transport), "restart")
        .concurrency(2)
        .start({
            let handled = handled.clone();
            move |job: Job, ctx: Context| {
                let handled = handled.clone();
                async move {
                    handled.record(&job, &ctx);
                    Outcome::success()
                }
            }
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "all four handled", || {
        handled.len() == 4
    })
    .await;
    second.shutdown().await;
    for call in stuck.0.lock().unwrap().iter() {
        let again = handled.of(call.n);
        assert_eq!(again.len(), 1);
        assert_eq!(
            again[0].attempt, 1,
            "an abandoned delivery keeps its attempt"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_handler_retries_on_the_dead_letters() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("loop")).await;
    let transport = fx.transport();
    let seen = Calls::default();
    // Seed system 2 "closes the loop": a handler on the dead letters, which must not lose any.
    let worker = Worker::builder(Arc::clone(&transport), Source::dead_letters("loop"))
        .retry_policy(policy(1, Duration::from_secs(1)))
        .start({
            let seen = seen.clone();
            move |job: Job, ctx: Context| {
                let seen = seen.clone();
                async move {
                    seen.record(&job, &ctx);
                    if seen.len() == 1 {
                        Outcome::retry("the entity store is down")
                    } else {
                        Outcome::success()
                    }
                }
            }
        })
        .await
        .unwrap();
    // Put a dead letter there the way a worker on the endpoint would.
    let mut endpoint = transport
        .consume(&Source::endpoint("loop"), ConsumeOptions::default())
        .await
        .unwrap();
    transport
        .send("loop", Message::json(&Job { n: 9 }).unwrap())
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(5), endpoint.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    delivery
        .dead_letter("rejected", Some("test".to_owned()))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the dead letter handled twice",
        || seen.len() == 2,
    )
    .await;
    worker.shutdown().await;
    let calls = seen.of(9);
    assert!(calls[1].at - calls[0].at >= TimeDelta::seconds(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topology_is_declared_again_after_a_reconnection() {
    if !common::broker_available().await {
        return;
    }
    let proxy = Proxy::start().await;
    let fx = Fixture::with_options(test_options(proxy.url())).await;
    fx.declare(&Topology::new().endpoint("again")).await;
    let transport = fx.transport();
    // Someone deletes the queue; the connection then drops.
    let queue = fx.transport.queue_name("again");
    let channel = raw_connection().await.create_channel().await.unwrap();
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    proxy.cut();
    // Sends wait for the reconnection, which declared the queue again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match transport.send("again", Message::new("x")).await {
            Ok(()) => break,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "the queue was not declared again after the reconnection: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Closes, from the broker's side, the connections whose name contains `name`, with
/// `rabbitmqctl` (the broker's own tool). `false` when the tool is not available here, may not
/// talk to the node, or manages another broker than `AMQP_URL`'s.
fn close_from_broker(name: &str) -> bool {
    let Ok(listed) = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties"])
        .output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&listed.stdout);
    let pids: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(name))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    if !listed.status.success() || pids.is_empty() {
        return false;
    }
    for pid in pids {
        let closed = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "closed by a redeliver test"])
            .status()
            .expect("run rabbitmqctl");
        assert!(closed.success());
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_by_the_broker_is_recovered() {
    let name = format!("redeliver-test-{:08x}", fastrand::u32(..));
    let Some(fx) = Fixture::new(|o| o.with_connection_name(name.clone())).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("forced")).await;
    let transport = fx.transport();
    let handled: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
    let worker = Worker::builder(Arc::clone(&transport), "forced")
        .start({
            let handled = Arc::clone(&handled);
            move |job: Job, _ctx: Context| {
                let handled = Arc::clone(&handled);
                async move {
                    handled.lock().unwrap().insert(job.n);
                    Outcome::success()
                }
            }
        })
        .await
        .unwrap();
    transport
        .send("forced", Message::json(&Job { n: 0 }).unwrap())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the first message", || {
        handled.lock().unwrap().len() == 1
    })
    .await;
    let closer = name.clone();
    let available = tokio::task::spawn_blocking(move || close_from_broker(&closer))
        .await
        .unwrap();
    if !available {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (part): rabbitmqctl cannot close this test's connection here; the TCP \
             proxy tests cover recovery"
        );
        worker.shutdown().await;
        return;
    }
    // Sends wait for the reconnection; the worker's consumer resumes on the new connection. A
    // send that raced the close itself fails as a connection error and is sent again, as an
    // application would (at-least-once: the first may have been stored too).
    for n in 1..5 {
        let message = Message::json(&Job { n }).unwrap();
        if let Err(e) = transport.send("forced", message.clone()).await {
            assert!(matches!(e, Error::Connection { .. }), "{e:?}");
            transport.send("forced", message).await.unwrap();
        }
    }
    eventually(
        Duration::from_secs(15),
        "every message after the reconnection",
        || handled.lock().unwrap().len() == 5,
    )
    .await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_limits_the_deliveries_handed_out() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("prefetch")).await;
    let transport = fx.transport();
    for n in 0..3 {
        transport
            .send("prefetch", Message::json(&Job { n }).unwrap())
            .await
            .unwrap();
    }
    let mut stream = transport
        .consume(
            &Source::endpoint("prefetch"),
            ConsumeOptions::default().with_prefetch(2),
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    // With two deliveries unsettled the broker keeps the third in the queue.
    let channel = raw_connection().await.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = fx.transport.queue_name("prefetch");
    let ready = channel
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
        .unwrap()
        .message_count();
    assert_eq!(ready, 1);
    for delivery in held {
        delivery.complete().await.unwrap();
    }
    let third = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the third once the others are settled")
        .unwrap()
        .unwrap();
    third.complete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_whose_queue_was_deleted_does_not_block_the_cascade() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("doomed").endpoint("alive"))
        .await;
    let transport = fx.transport();
    // Due in 2 s: one second in level 0 (a delay under a second would not enter the cascade).
    let orphan = Message::new("orphan").with_not_before(Utc::now() + TimeDelta::seconds(2));
    let orphan_id = orphan.id().clone();
    transport.send("doomed", orphan).await.unwrap();
    // The destination disappears while the message waits in level 0.
    let channel = raw_connection().await.create_channel().await.unwrap();
    let doomed = fx.transport.queue_name("doomed");
    channel
        .queue_delete(doomed.as_str().into(), Default::default())
        .await
        .unwrap();
    let later = Message::new("alive").with_not_before(Utc::now() + TimeDelta::seconds(2));
    transport.send("alive", later).await.unwrap();

    // The level is not blocked: the next message through it arrives.
    take(
        transport.as_ref(),
        Source::endpoint("alive"),
        1,
        Duration::from_secs(5),
    )
    .await;
    // The orphan is kept for an operator in the unroutable queue, not lost.
    let queues = fx.transport.infrastructure().queues;
    let unroutable = queues
        .iter()
        .find(|q| q.ends_with("unroutable"))
        .expect("an unroutable queue")
        .clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let parked = loop {
        let got = channel
            .basic_get(unroutable.as_str().into(), Default::default())
            .await
            .unwrap();
        if let Some(got) = got {
            break got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the orphan did not reach `{unroutable}`"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let id = parked.delivery.properties.message_id().clone().unwrap();
    assert_eq!(id.as_str(), orphan_id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_endpoint_queues_work_the_same() {
    let Some(fx) =
        Fixture::new(|o| o.with_queue_type(redeliver_rabbitmq::QueueType::Classic)).await
    else {
        return;
    };
    fx.declare(&Topology::new().endpoint("classic")).await;
    let transport = fx.transport();
    let calls = Calls::default();
    let worker = Worker::builder(Arc::clone(&transport), "classic")
        .retry_policy(policy(2, Duration::from_secs(1)))
        .start({
            let calls = calls.clone();
            move |job: Job, ctx: Context| {
                let calls = calls.clone();
                async move {
                    calls.record(&job, &ctx);
                    Outcome::retry("still failing")
                }
            }
        })
        .await
        .unwrap();
    transport
        .send("classic", Message::json(&Job { n: 1 }).unwrap())
        .await
        .unwrap();
    let dead = take(
        transport.as_ref(),
        Source::dead_letters("classic"),
        1,
        Duration::from_secs(10),
    )
    .await;
    worker.shutdown().await;
    assert_eq!(dead[0].0.attempt(), 2);
    assert_eq!(calls.len(), 2);
}

/// Acks are coalesced into `multiple` acks: settling out of order, with requeues and a dropped
/// delivery in between, must neither ack a delivery that was given back (nor close the channel
/// over a delivery tag acked twice) nor hold acks behind one still being handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_out_of_order_with_requeues_settle_exactly_what_they_name() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("coalesced")).await;
    let transport = fx.transport();
    let mut stream = transport
        .consume(
            &Source::endpoint("coalesced"),
            ConsumeOptions::default().with_prefetch(20),
        )
        .await
        .unwrap();
    let n_of = |d: &redeliver_core::Delivery| d.message().decode::<Job>().unwrap().n;
    // First round: everything settles at once, latest first. Second round: the first delivery
    // is still "being handled" while the later ones settle; their acks must not wait for it.
    for hold_first in [false, true] {
        for n in 0..20 {
            transport
                .send("coalesced", Message::json(&Job { n }).unwrap())
                .await
                .unwrap();
        }
        let mut held = Vec::new();
        for _ in 0..20 {
            let delivery = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("all 20 within the prefetch")
                .unwrap()
                .unwrap();
            held.push(delivery);
        }
        let first = if hold_first {
            Some(held.remove(0))
        } else {
            None
        };
        let mut given_back = BTreeSet::new();
        let mut settling = Vec::new();
        for delivery in held.into_iter().rev() {
            let n = n_of(&delivery);
            match n % 5 {
                2 => {
                    given_back.insert(n);
                    settling.push(tokio::spawn(async move { delivery.abandon().await }));
                }
                4 => {
                    given_back.insert(n);
                    drop(delivery);
                }
                _ => settling.push(tokio::spawn(async move { delivery.complete().await })),
            }
        }
        let settled =
            tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(settling))
                .await
                .expect("acks behind an unsettled delivery are not held back");
        for result in settled {
            result.unwrap().expect("settled");
        }
        // The given-back ones come again, and only they.
        let mut again = BTreeSet::new();
        for _ in 0..given_back.len() {
            let delivery = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("a given-back delivery comes again")
                .unwrap()
                .unwrap();
            again.insert(n_of(&delivery));
            delivery.complete().await.unwrap();
        }
        assert_eq!(again, given_back);
        if let Some(first) = first {
            first.complete().await.unwrap();
        }
        let more = tokio::time::timeout(Duration::from_millis(1000), stream.next()).await;
        assert!(more.is_err(), "nothing else is delivered: {more:?}");
    }
    drop(stream);
    let channel = raw_connection().await.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = fx.transport.queue_name("coalesced");
    // The consumer's channel closes once everything is settled, and the broker gives back what
    // a closed channel left unacked as it removes the consumer: once the queue has no consumer,
    // a delivery left unacked would be ready again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let state = loop {
        let state = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .unwrap();
        if state.consumer_count() == 0 {
            break state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumer's channel was not closed within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(state.message_count(), 0, "every delivery was acknowledged");
}

/// Declares `queue` holding at most `max_length` messages and refusing more with a negative
/// confirm (`reject-publish`); returns the raw channel it used.
async fn declare_refusing_queue(queue: &str, max_length: i64) -> lapin::Channel {
    let channel = raw_connection().await.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(max_length));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    channel
}

/// Signals once the transport logs that it publishes again after a negative confirm.
struct NackSeen(Arc<tokio::sync::Notify>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for NackSeen {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        if text.0.contains("negative confirm") {
            self.0.notify_one();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_refused_for_a_moment_is_published_again() {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    use tracing_subscriber::layer::SubscriberExt;

    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    let transport = fx.transport();
    // A queue that holds one message and refuses more with a negative confirm, as a quorum
    // queue does for seconds while it elects a leader.
    let narrow = format!("{}narrow", fx.prefix);
    fx.track_queue(narrow.clone());
    let channel = declare_refusing_queue(&narrow, 1).await;
    transport
        .send("narrow", Message::new("first"))
        .await
        .unwrap();

    let nacked = Arc::new(tokio::sync::Notify::new());
    let _logs = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(NackSeen(nacked.clone())),
    );
    let send = transport.send("narrow", Message::new("second"));
    tokio::pin!(send);
    tokio::select! {
        result = &mut send => panic!("the refused publish ended at once: {result:?}"),
        () = nacked.notified() => {}
    }
    // Room again: the publish goes through within the publish timeout.
    let first = channel
        .basic_get(narrow.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the first message");
    first.ack(BasicAckOptions::default()).await.unwrap();
    send.await.expect("published again once there was room");

    let second = channel
        .basic_get(narrow.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the second message");
    assert_eq!(second.data, b"second");
}
