//! The core issue's acceptance scenarios, on the in-memory transport with tokio's clock paused.
//! Every handler call asserts `now >= not_before` (see `support::Calls`).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redeliver::memory::MemoryTransport;
use redeliver::{
    Backoff, BackoffPolicy, Context, InvalidPayload, Jitter, Message, Outcome, RetryAfter, Source,
    Topology, Transport, Worker,
};
use serde::{Deserialize, Serialize};
use support::{Calls, secs, within};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u32,
}

fn policy(max_attempts: u32, backoff: Backoff) -> BackoffPolicy {
    BackoffPolicy::builder()
        .max_attempts(max_attempts)
        .backoff(backoff)
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

fn setup() -> (MemoryTransport, Arc<dyn Transport>, Calls) {
    let memory = MemoryTransport::new();
    let calls = Calls::new(memory.clock());
    (memory.clone(), Arc::new(memory), calls)
}

#[tokio::test(start_paused = true)]
async fn success_on_the_first_call_is_handled_once() {
    let (memory, transport, calls) = setup();
    let recorder = calls.clone();
    let worker = Worker::builder(transport.clone(), "orders")
        .start(move |_: Order, ctx: Context| {
            recorder.record(&ctx);
            async { Outcome::success() }
        })
        .await
        .unwrap();

    transport
        .send("orders", Message::json(&Order { id: 1 }).unwrap())
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;

    assert_eq!(calls.attempts(), [1]);
    assert!(memory.scheduled("orders").is_empty());
    assert!(memory.pending("orders").is_empty());
    assert!(memory.dead_letters("orders").is_empty());
    let stats = worker.shutdown().await;
    assert_eq!((stats.handled, stats.completed, stats.retried), (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn always_failing_handler_is_called_max_attempts_times_then_dead_lettered() {
    let (memory, transport, calls) = setup();
    let recorder = calls.clone();
    let worker = Worker::builder(transport.clone(), "orders")
        .retry_policy(policy(3, Backoff::list([secs(2), secs(7)])))
        .start(move |_: Order, ctx: Context| {
            let call = recorder.record(&ctx);
            async move { Outcome::retry(format!("upstream timed out on attempt {}", call.attempt)) }
        })
        .await
        .unwrap();

    let message = Message::json(&Order { id: 1 }).unwrap();
    let id = message.id().clone();
    transport.send("orders", message).await.unwrap();
    within("idle", memory.wait_until_idle()).await;

    assert_eq!(
        calls.attempts(),
        [1, 2, 3],
        "exactly max_attempts handler calls"
    );
    assert_eq!(
        calls.gaps(),
        [secs(2), secs(7)],
        "the delays follow the policy"
    );
    let dead = memory.dead_letters("orders");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id(), &id, "the id survives retries");
    assert_eq!(dead[0].attempt(), 3);
    let info = dead[0].dead_letter().unwrap();
    assert_eq!(
        info.reason, "upstream timed out on attempt 3",
        "the last failure's reason"
    );
    assert!(
        info.description
            .as_deref()
            .unwrap()
            .contains("attempt 3 of 3")
    );
    let stats = worker.shutdown().await;
    assert_eq!((stats.retried, stats.dead_lettered), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_a_floor_under_the_policy_delay() {
    let (memory, transport, calls) = setup();
    let recorder = calls.clone();
    Worker::builder(transport.clone(), "webhooks")
        .retry_policy(policy(5, Backoff::exponential(secs(2), secs(60))))
        .start(move |_: Order, ctx: Context| {
            let call = recorder.record(&ctx);
            async move {
                match call.attempt {
                    1 => Outcome::retry_after("rate-limited", RetryAfter::Delay(secs(90))),
                    _ => Outcome::success(),
                }
            }
        })
        .await
        .unwrap();

    transport
        .send("webhooks", Message::json(&Order { id: 1 }).unwrap())
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;

    assert_eq!(calls.attempts(), [1, 2]);
    assert!(
        calls.gaps()[0] >= secs(90),
        "second call after {:?}",
        calls.gaps()[0]
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_sent_not_before_an_instant_waits_for_it() {
    let (memory, transport, calls) = setup();
    let recorder = calls.clone();
    Worker::builder(transport.clone(), "reminders")
        .start(move |_: Order, ctx: Context| {
            recorder.record(&ctx);
            async { Outcome::success() }
        })
        .await
        .unwrap();

    let at = memory.clock().now() + chrono::TimeDelta::seconds(45);
    let message = Message::json(&Order { id: 1 }).unwrap().with_not_before(at);
    transport.send("reminders", message).await.unwrap();
    assert_eq!(memory.scheduled("reminders").len(), 1);
    within("idle", memory.wait_until_idle()).await;

    let call = &calls.all()[0];
    assert!(call.at >= at);
    assert_eq!(call.attempt, 1);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_payload_is_dead_lettered_without_calling_the_handler() {
    let (memory, transport, calls) = setup();
    let recorder = calls.clone();
    let worker = Worker::builder(transport.clone(), "orders")
        .start(move |_: Order, ctx: Context| {
            recorder.record(&ctx);
            async { Outcome::success() }
        })
        .await
        .unwrap();

    transport
        .send(
            "orders",
            Message::new("{not json").with_content_type("application/json"),
        )
        .await
        .unwrap();
    transport
        .send("orders", Message::json(&Order { id: 2 }).unwrap())
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;

    assert_eq!(
        calls.count(),
        1,
        "only the valid message reached the handler; the worker kept running"
    );
    let dead = memory.dead_letters("orders");
    assert_eq!(dead.len(), 1);
    let info = dead[0].dead_letter().unwrap();
    assert_eq!(info.reason, "invalid payload");
    assert!(
        info.description.as_deref().unwrap().contains("Order"),
        "{info:?}"
    );
    assert_eq!(dead[0].attempt(), 1, "never retried");
    let stats = worker.shutdown().await;
    assert_eq!((stats.dead_lettered, stats.retried), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn an_invalid_payload_can_be_discarded_instead() {
    let (memory, transport, _) = setup();
    let worker = Worker::builder(transport.clone(), "orders")
        .on_invalid_payload(InvalidPayload::Discard)
        .start(|_: Order, _: Context| async { Outcome::success() })
        .await
        .unwrap();

    transport.send("orders", Message::new("[]")).await.unwrap();
    within("idle", memory.wait_until_idle()).await;

    assert!(memory.dead_letters("orders").is_empty());
    assert_eq!(worker.shutdown().await.discarded, 1);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_is_retried_and_the_worker_survives() {
    let (memory, transport, calls) = setup();
    let recorder = calls.clone();
    let worker = Worker::builder(transport.clone(), "orders")
        .retry_policy(policy(3, Backoff::fixed(secs(1))))
        .start(move |order: Order, ctx: Context| {
            let call = recorder.record(&ctx);
            async move {
                if order.id == 1 && call.attempt == 1 {
                    panic!("bug in the handler");
                }
                Outcome::success()
            }
        })
        .await
        .unwrap();

    let first = Message::json(&Order { id: 1 }).unwrap();
    let first_id = first.id().to_string();
    transport.send("orders", first).await.unwrap();
    within("idle", memory.wait_until_idle()).await;
    transport
        .send("orders", Message::json(&Order { id: 2 }).unwrap())
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;

    let handled: Vec<(String, u32)> = calls
        .all()
        .into_iter()
        .map(|c| (c.message_id, c.attempt))
        .collect();
    assert_eq!(
        handled[..2],
        [(first_id.clone(), 1), (first_id, 2)],
        "retried after the panic"
    );
    assert_eq!(handled.len(), 3, "the worker handled the next message too");
    assert!(memory.dead_letters("orders").is_empty());
    let stats = worker.shutdown().await;
    assert_eq!((stats.retried, stats.completed), (1, 2));
}

#[tokio::test(start_paused = true)]
async fn shutdown_abandons_handlers_in_flight_and_a_restart_handles_everything() {
    let (memory, transport, _) = setup();
    let stuck = Arc::new(AtomicBool::new(true));
    let first_run = {
        let stuck = stuck.clone();
        move |order: Order, _: Context| {
            let stuck = stuck.load(Ordering::SeqCst);
            async move {
                if stuck && order.id.is_multiple_of(2) {
                    std::future::pending::<()>().await;
                }
                // Work that finishes within the shutdown timeout.
                tokio::time::sleep(Duration::from_millis(500)).await;
                Outcome::success()
            }
        }
    };
    let worker = Worker::builder(transport.clone(), "orders")
        .concurrency(4)
        .shutdown_timeout(secs(2))
        .start(first_run)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for id in 0..8 {
        let message = Message::json(&Order { id }).unwrap();
        ids.push(message.id().to_string());
        transport.send("orders", message).await.unwrap();
    }
    within(
        "4 in flight",
        memory.wait_until(|m| m.in_flight("orders") == 4),
    )
    .await;

    let stats = worker.shutdown().await;
    assert_eq!(stats.abandoned + stats.completed, 4, "{stats:?}");
    assert!(
        stats.abandoned >= 1,
        "the stuck handlers were abandoned: {stats:?}"
    );
    assert_eq!(memory.in_flight("orders"), 0);

    // Restart with a handler that works: every message not completed before is handled now.
    let (memory2, calls) = (memory.clone(), Calls::new(memory.clock()));
    let recorder = calls.clone();
    let worker = Worker::builder(transport.clone(), "orders")
        .concurrency(4)
        .start(move |_: Order, ctx: Context| {
            recorder.record(&ctx);
            async { Outcome::success() }
        })
        .await
        .unwrap();
    within("idle", memory2.wait_until_idle()).await;
    worker.shutdown().await;

    let mut handled: Vec<String> = calls.all().into_iter().map(|c| c.message_id).collect();
    assert_eq!(
        handled.len() as u64,
        8 - stats.completed,
        "each remaining message exactly once"
    );
    assert!(
        calls.attempts().iter().all(|&a| a == 1),
        "abandoning does not count an attempt"
    );
    handled.sort();
    handled.dedup();
    assert_eq!(handled.len() as u64, 8 - stats.completed);
    assert!(memory.dead_letters("orders").is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_retry_reaches_only_the_subscriber_that_failed() {
    let (memory, transport, calls) = setup();
    transport
        .declare(
            &Topology::new()
                .subscribe("order-events", "billing")
                .subscribe("order-events", "shipping"),
        )
        .await
        .unwrap();
    let start = |endpoint: &'static str, fail_first: bool| {
        let recorder = calls.clone();
        Worker::builder(transport.clone(), endpoint)
            .retry_policy(policy(3, Backoff::fixed(secs(5))))
            .start(move |_: Order, ctx: Context| {
                let call = recorder.record(&ctx);
                async move {
                    if fail_first && call.attempt == 1 {
                        Outcome::retry("billing system down")
                    } else {
                        Outcome::success()
                    }
                }
            })
    };
    let billing = start("billing", true).await.unwrap();
    let shipping = start("shipping", false).await.unwrap();

    transport
        .publish("order-events", Message::json(&Order { id: 1 }).unwrap())
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;

    let by = |endpoint: &str| -> Vec<u32> {
        calls
            .all()
            .iter()
            .filter(|c| c.endpoint == endpoint)
            .map(|c| c.attempt)
            .collect()
    };
    assert_eq!(by("billing"), [1, 2]);
    assert_eq!(by("shipping"), [1], "shipping never sees billing's retry");
    billing.shutdown().await;
    shipping.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn three_hours_of_back_off_run_in_under_a_second() {
    let (memory, transport, calls) = setup();
    let recorder = calls.clone();
    Worker::builder(transport.clone(), "slow")
        .retry_policy(policy(
            4,
            Backoff::exponential(Duration::from_secs(1200), secs(7200)),
        ))
        .start(move |_: Order, ctx: Context| {
            let call = recorder.record(&ctx);
            async move {
                if call.attempt < 4 {
                    Outcome::retry("not yet")
                } else {
                    Outcome::success()
                }
            }
        })
        .await
        .unwrap();

    let wall = std::time::Instant::now();
    transport
        .send("slow", Message::json(&Order { id: 1 }).unwrap())
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;

    assert_eq!(calls.gaps(), [secs(1200), secs(2400), secs(4800)]);
    let virtual_span = calls.all()[3].at - calls.all()[0].at;
    assert!(virtual_span >= chrono::TimeDelta::hours(2) + chrono::TimeDelta::minutes(20));
    assert!(
        wall.elapsed() < Duration::from_secs(1),
        "took {:?} of wall time",
        wall.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_handler_is_called_once_per_dead_letter() {
    let (memory, transport, _) = setup();
    Worker::builder(transport.clone(), "documents")
        .start(|_: Order, _: Context| async {
            Outcome::dead_letter_with("corrupt", "page 3 unreadable")
        })
        .await
        .unwrap();
    let seen = Calls::new(memory.clock());
    let recorder = seen.clone();
    let reasons = Arc::new(std::sync::Mutex::new(Vec::new()));
    let reasons2 = reasons.clone();
    Worker::builder(transport.clone(), Source::dead_letters("documents"))
        .start(move |order: Order, ctx: Context| {
            recorder.record(&ctx);
            reasons2
                .lock()
                .unwrap()
                .push((order.id, ctx.dead_letter().unwrap().reason.clone()));
            async { Outcome::success() }
        })
        .await
        .unwrap();

    for id in [1, 2] {
        transport
            .send("documents", Message::json(&Order { id }).unwrap())
            .await
            .unwrap();
    }
    within(
        "dead letters handled",
        memory.wait_until(|m| {
            m.dead_letters("documents").is_empty()
                && m.pending("documents").is_empty()
                && m.in_flight("documents") == 0
        }),
    )
    .await;
    within("idle", memory.wait_until_idle()).await;

    let mut reasons = reasons.lock().unwrap().clone();
    reasons.sort();
    assert_eq!(
        reasons,
        [(1, "corrupt".to_owned()), (2, "corrupt".to_owned())]
    );
    assert_eq!(seen.count(), 2);
}

/// Seed system 1's formula, as a user-supplied policy: not-before = (Retry-After, else now)
/// + 2^retryCount seconds (its 0–2 s jitter left out to keep the test exact); 3 handler calls.
#[derive(Debug)]
struct IntegrationPolicy;

impl redeliver::RetryPolicy for IntegrationPolicy {
    fn max_attempts(&self) -> u32 {
        3
    }

    fn delay(&self, failed: &redeliver::FailedAttempt) -> Duration {
        let retry_count = failed.attempt - 1;
        failed.retry_after.unwrap_or_default() + secs(1 << retry_count)
    }
}

#[tokio::test(start_paused = true)]
async fn a_custom_policy_decides_the_delays() {
    let (memory, transport, calls) = setup();
    let recorder = calls.clone();
    Worker::builder(transport.clone(), "slack")
        .retry_policy(IntegrationPolicy)
        .start(move |_: Order, ctx: Context| {
            let call = recorder.record(&ctx);
            async move {
                match call.attempt {
                    1 => Outcome::retry_after("rate-limited", RetryAfter::Delay(secs(10))),
                    _ => Outcome::retry("transient"),
                }
            }
        })
        .await
        .unwrap();

    transport
        .send("slack", Message::json(&Order { id: 1 }).unwrap())
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;

    assert_eq!(
        calls.gaps(),
        [secs(10 + 1), secs(2)],
        "Retry-After plus 2^retryCount"
    );
    let dead = memory.dead_letters("slack");
    assert_eq!(
        (
            dead[0].attempt(),
            dead[0].dead_letter().unwrap().reason.as_str()
        ),
        (3, "transient")
    );
}

#[tokio::test(start_paused = true)]
async fn an_undecodable_dead_letter_stays_a_dead_letter_unless_discarded() {
    let (memory, transport, calls) = setup();
    Worker::builder(transport.clone(), "scans")
        .start(|_: Order, _: Context| async { Outcome::success() })
        .await
        .unwrap();
    let recorder = calls.clone();
    let policy = BackoffPolicy::builder()
        .backoff(Backoff::fixed(secs(60)))
        .jitter(Jitter::None)
        .unlimited_attempts()
        .build()
        .unwrap();
    let listener = Worker::builder(transport.clone(), Source::dead_letters("scans"))
        .retry_policy(policy)
        .start(move |_: Order, ctx: Context| {
            recorder.record(&ctx);
            async { Outcome::success() }
        })
        .await
        .unwrap();

    transport
        .send("scans", Message::new("%PDF-1.7"))
        .await
        .unwrap();
    within(
        "rescheduled among the dead letters",
        memory.wait_until(|m| {
            m.dead_letters("scans")
                .first()
                .is_some_and(|d| d.attempt() == 3)
        }),
    )
    .await;
    let stats = listener.shutdown().await;
    assert_eq!(stats.handled, 0, "never decodable, never handled");
    assert_eq!(
        stats.dead_lettered, 0,
        "not dead-lettered again into its own queue"
    );
    assert!(stats.retried >= 2, "{stats:?}");
    assert_eq!(memory.dead_letters("scans").len(), 1, "kept, not lost");

    // Seed system 2 drops undecodable dead letters: that is the Discard setting.
    let listener = Worker::builder(transport.clone(), Source::dead_letters("scans"))
        .on_invalid_payload(InvalidPayload::Discard)
        .start(|_: Order, _: Context| async { Outcome::success() })
        .await
        .unwrap();
    within(
        "dropped",
        memory.wait_until(|m| m.dead_letters("scans").is_empty()),
    )
    .await;
    assert_eq!(listener.shutdown().await.discarded, 1);
    assert_eq!(calls.count(), 0);
}
