//! The Service Bus transport against the test broker, over TCP through the real `azservicebus`
//! client: scheduling, lock renewal, delivery counts, refused sends, missing entities.
//!
//! Every test starts its own broker. Runtimes are current-thread (see
//! `conformance_servicebus.rs` for why).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use azservicebus::core::BasicRetryPolicy;
use azservicebus::{
    ServiceBusClient, ServiceBusClientOptions, ServiceBusMessage, ServiceBusRetryOptions,
    ServiceBusSenderOptions,
};
use chrono::{DateTime, TimeDelta, Utc};
use fe2o3_amqp_types::messaging::ApplicationProperties;
use fe2o3_amqp_types::primitives::SimpleValue;
use futures::StreamExt;
use redeliver_conformance::Calls;
use redeliver_core::{
    Backoff, BackoffPolicy, ConsumeOptions, Context, Delivery, DeliveryStream, Error, Jitter,
    Message, Outcome, Source, Topology, Transport, Worker, reasons, wire,
};
use redeliver_servicebus_testbroker::{QueueOptions, SubscriptionOptions, TopicOptions};
use serde::{Deserialize, Serialize};
use support::PROMPT;

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u32,
}

fn order(id: u32) -> Message {
    Message::json(&Order { id }).expect("an order serializes")
}

fn fixed(delay: Duration, max_attempts: u32) -> BackoffPolicy {
    BackoffPolicy::builder()
        .max_attempts(max_attempts)
        .backoff(Backoff::fixed(delay))
        .jitter(Jitter::None)
        .build()
        .expect("a valid policy")
}

async fn next(stream: &mut DeliveryStream) -> Delivery {
    support::next_within(stream, PROMPT).await
}

/// Whole milliseconds, the precision of timestamps on the wire.
fn millis(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).expect("in range")
}

#[tokio::test]
async fn declare_reports_a_missing_queue_topic_or_subscription_by_name() {
    let broker = support::broker().await;
    broker
        .create_queue("billing", QueueOptions::default())
        .unwrap();
    let transport = support::transport(&broker).await.unwrap();

    let e = transport
        .declare(&Topology::new().endpoint("billing").endpoint("shipping"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::NotFound { what: "queue", name, .. } if name == "shipping"),
        "{e:?}"
    );
    assert!(e.to_string().contains("`shipping`"), "{e}");

    let topology = Topology::new().subscribe("events", "billing");
    let e = transport.declare(&topology).await.unwrap_err();
    assert!(
        matches!(&e, Error::NotFound { what: "topic", name, .. } if name == "events"),
        "{e:?}"
    );

    broker
        .create_topic("events", TopicOptions::default())
        .unwrap();
    let e = transport.declare(&topology).await.unwrap_err();
    assert!(
        matches!(&e, Error::NotFound { what: "subscription", name, .. }
            if name == "events/Subscriptions/billing"),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("ForwardTo"),
        "the hint says how: {e}"
    );

    broker
        .create_subscription(
            "events",
            "billing",
            SubscriptionOptions::default().with_forward_to("billing"),
        )
        .unwrap();
    transport.declare(&topology).await.expect("now it exists");
    transport
        .publish("events", order(1))
        .await
        .expect("the transport still works after the refused checks");
    assert_eq!(broker.active_message_count("billing").unwrap(), 1);
}

#[tokio::test]
async fn sending_to_a_missing_queue_is_not_found_and_harms_nothing_else() {
    let (broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    let e = transport.send("nowhere", order(1)).await.unwrap_err();
    assert!(
        matches!(&e, Error::NotFound { what: "queue", name, .. } if name == "nowhere"),
        "{e:?}"
    );
    transport
        .send("q", order(2))
        .await
        .expect("other sends work");
    assert_eq!(broker.active_message_count("q").unwrap(), 1);
    let e = transport
        .consume(&Source::endpoint("nowhere"), ConsumeOptions::default())
        .await
        .err()
        .expect("consuming a missing queue fails");
    assert!(
        matches!(&e, Error::NotFound { what: "queue", name, .. } if name == "nowhere"),
        "{e:?}"
    );
}

#[tokio::test]
async fn native_properties_and_headers_survive_a_trip_through_a_topic() {
    let topology = Topology::new().subscribe("events", "q");
    let (_broker, transport) = support::setup(&topology, QueueOptions::default()).await;
    let mut stream = transport
        .consume(&Source::endpoint("q"), ConsumeOptions::default())
        .await
        .unwrap();
    let sent = order(1)
        .with_id("event-7")
        .with_correlation_id("request-3")
        .with_reply_to("replies")
        .with_subject("webhook")
        .with_header("tenant", "acme");
    transport.publish("events", sent.clone()).await.unwrap();

    let delivery = next(&mut stream).await;
    assert_eq!(delivery.problem(), None);
    assert_eq!(
        delivery.message(),
        &sent,
        "everything the message carries comes back"
    );
    delivery.complete().await.unwrap();
}

#[tokio::test]
async fn a_send_the_broker_rejects_is_an_error_not_a_silent_success() {
    let topology = Topology::new().subscribe("events", "q");
    let (broker, transport) = support::setup(
        &topology,
        QueueOptions::default().with_max_message_size(1024),
    )
    .await;

    let e = transport
        .send("q", Message::new(vec![0u8; 4096]))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidMessage { .. }) && e.is_message_refused(),
        "oversized: {e:?}"
    );

    broker
        .set_reject_sends("q", Some("queue is read-only"))
        .unwrap();
    let started = Instant::now();
    let e = transport.send("q", order(1)).await.unwrap_err();
    assert!(matches!(e, Error::Rejected { .. }), "refused: {e:?}");
    assert!(!e.is_transient(), "a refusal is not worth retrying");
    assert!(
        started.elapsed() < support::options().try_timeout,
        "answered at once, not after time-outs"
    );
    broker
        .set_reject_sends("events", Some("topic is read-only"))
        .unwrap();
    let e = transport.publish("events", order(2)).await.unwrap_err();
    assert!(
        matches!(e, Error::Rejected { .. }),
        "refused publish: {e:?}"
    );
    assert_eq!(broker.active_message_count("q").unwrap(), 0);

    broker.set_reject_sends("q", None).unwrap();
    transport.send("q", order(3)).await.expect("accepted again");
    assert_eq!(broker.active_message_count("q").unwrap(), 1);
}

#[tokio::test]
async fn a_retry_whose_copy_is_refused_gives_the_original_back() {
    let (broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    let mut stream = transport
        .consume(&Source::endpoint("q"), ConsumeOptions::default())
        .await
        .unwrap();
    transport.send("q", order(1)).await.unwrap();
    let first = next(&mut stream).await;
    let id = first.message().id().clone();

    broker
        .set_reject_sends("q", Some("queue is read-only"))
        .unwrap();
    let e = first
        .retry(Utc::now(), "failed", Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Rejected { .. }), "{e:?}");

    let again = next(&mut stream).await;
    assert_eq!(again.message().id(), &id, "the original came back");
    assert_eq!(again.message().attempt(), 1, "no attempt was recorded");
    broker.set_reject_sends("q", None).unwrap();
    again.complete().await.unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("q").unwrap() == 0)
            .await
    );
}

#[tokio::test]
async fn a_message_scheduled_three_seconds_ahead_is_not_delivered_before() {
    let (broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    let mut stream = transport
        .consume(&Source::endpoint("q"), ConsumeOptions::default())
        .await
        .unwrap();
    let not_before = millis(Utc::now() + TimeDelta::seconds(3));
    transport
        .send("q", order(1).with_not_before(not_before))
        .await
        .unwrap();
    assert_eq!(
        broker.scheduled_message_count("q").unwrap(),
        1,
        "the broker holds it (native scheduling)"
    );

    let delivery = next(&mut stream).await;
    let received_at = Utc::now();
    assert!(
        received_at >= not_before,
        "delivered at {received_at}, before {not_before}"
    );
    assert_eq!(delivery.message().not_before(), Some(not_before));
    assert_eq!(delivery.message().attempt(), 1);
    delivery.complete().await.unwrap();
}

#[tokio::test]
async fn scheduled_retries_keep_the_message_id_and_increase_the_attempt() {
    let (broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    let transport: Arc<dyn Transport> = Arc::new(transport);
    let calls = Calls::new(transport.clock());
    let unit = Duration::from_secs(1);
    let worker = {
        let calls = calls.clone();
        Worker::builder(Arc::clone(&transport), "q")
            .retry_policy(fixed(unit, 5))
            .start(move |_: Order, ctx: Context| {
                calls.record(&ctx);
                let attempt = ctx.attempt();
                async move {
                    if attempt < 3 {
                        Outcome::retry(format!("failure on attempt {attempt}"))
                    } else {
                        Outcome::success()
                    }
                }
            })
            .await
            .unwrap()
    };
    let message = order(1);
    let id = message.id().to_string();
    transport.send("q", message).await.unwrap();

    calls.wait_for(1, PROMPT).await;
    assert!(
        broker
            .wait_until(PROMPT, |b| b.scheduled_message_count("q").unwrap() == 1)
            .await,
        "the retry is a message the broker holds until its not-before"
    );
    calls.wait_for(3, PROMPT).await;
    let stats = worker.shutdown().await;
    assert_eq!((stats.retried, stats.completed), (2, 1), "{stats:?}");
    assert_eq!(calls.attempts(), [1, 2, 3]);
    assert!(calls.all().iter().all(|c| c.message_id == id), "same id");
    for gap in calls.gaps() {
        assert!(gap >= unit, "retried after {gap:?}");
    }
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("q").unwrap() == 0)
            .await
    );
}

#[tokio::test]
async fn a_handler_three_times_longer_than_the_lock_keeps_it_and_completes_once() {
    let lock = Duration::from_secs(1);
    let (broker, transport) = support::setup(
        &Topology::new().endpoint("q"),
        QueueOptions::default().with_lock_duration(lock),
    )
    .await;
    let transport: Arc<dyn Transport> = Arc::new(transport);
    let calls = Calls::new(transport.clock());
    let worker = {
        let calls = calls.clone();
        // Two slots: a message whose lock ran out would come back to this same worker.
        Worker::builder(Arc::clone(&transport), "q")
            .concurrency(2)
            .start(move |_: Order, ctx: Context| {
                calls.record(&ctx);
                async move {
                    // The slow handler is the behaviour under test, not a synchronisation.
                    tokio::time::sleep(lock * 3).await;
                    Outcome::success()
                }
            })
            .await
            .unwrap()
    };
    transport.send("q", order(1)).await.unwrap();
    calls.wait_for(1, PROMPT).await;
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("q").unwrap() == 0)
            .await,
        "completed"
    );
    let stats = worker.shutdown().await;
    assert_eq!(
        (stats.handled, stats.completed, stats.settle_failures),
        (1, 1, 0),
        "{stats:?}"
    );
    assert_eq!(calls.count(), 1, "never delivered again while held");
    assert_eq!(broker.dead_letter_message_count("q").unwrap(), 0);
}

#[tokio::test]
async fn max_delivery_count_dead_letters_a_message_whose_handler_keeps_dying() {
    let (broker, transport) = support::setup(
        &Topology::new().endpoint("q"),
        QueueOptions::default().with_max_delivery_count(3),
    )
    .await;
    let message = order(1);
    let id = message.id().clone();
    transport.send("q", message).await.unwrap();

    for _ in 0..3 {
        // A consumer takes the message and goes away without settling it, as a process that
        // dies in the handler would; the dropped delivery is given back at once.
        let mut stream = transport
            .consume(&Source::endpoint("q"), ConsumeOptions::default())
            .await
            .unwrap();
        let delivery = next(&mut stream).await;
        assert_eq!(delivery.message().id(), &id);
        assert_eq!(
            delivery.message().attempt(),
            1,
            "a crash is not a handler result"
        );
        drop(delivery);
        drop(stream);
    }
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 1)
            .await,
        "dead-lettered by the broker"
    );
    let letters = broker.dead_letters("q").unwrap();
    assert_eq!(
        letters[0].reason.as_deref(),
        Some("MaxDeliveryCountExceeded")
    );
    assert_eq!(letters[0].delivery_count, 3);

    let mut dead = transport
        .consume(&Source::dead_letters("q"), ConsumeOptions::default())
        .await
        .unwrap();
    let letter = next(&mut dead).await;
    assert_eq!(letter.message().id(), &id);
    assert_eq!(letter.message().attempt(), 1);
    assert_eq!(
        letter.message().dead_letter().map(|d| d.reason.as_str()),
        Some("MaxDeliveryCountExceeded"),
        "the broker's reason is readable from the dead letter"
    );
    letter.complete().await.unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 0)
            .await
    );
}

#[tokio::test]
async fn a_dead_letter_handlers_retry_comes_back_no_earlier_than_its_not_before() {
    let (broker, transport) = support::setup(
        &Topology::new().endpoint("q"),
        // Shorter than the retry delay: the dead letter is held by renewing its lock.
        QueueOptions::default().with_lock_duration(Duration::from_secs(1)),
    )
    .await;
    let transport: Arc<dyn Transport> = Arc::new(transport);
    let mut stream = transport
        .consume(&Source::endpoint("q"), ConsumeOptions::default())
        .await
        .unwrap();
    transport.send("q", order(1)).await.unwrap();
    next(&mut stream)
        .await
        .dead_letter("corrupt", Some("page 3".into()))
        .await
        .unwrap();
    drop(stream);
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 1)
            .await
    );

    let calls = Calls::new(transport.clock());
    let delay = Duration::from_secs(3);
    let listener = {
        let calls = calls.clone();
        Worker::builder(Arc::clone(&transport), Source::dead_letters("q"))
            .retry_policy(fixed(delay, 5))
            .start(move |_: Order, ctx: Context| {
                calls.record(&ctx);
                assert_eq!(
                    ctx.dead_letter().map(|d| d.reason.as_str()),
                    Some("corrupt")
                );
                let attempt = ctx.attempt();
                async move {
                    match attempt {
                        1 => Outcome::retry("the archive is down"),
                        _ => Outcome::success(),
                    }
                }
            })
            .await
            .unwrap()
    };
    calls.wait_for(2, PROMPT).await;
    let stats = listener.shutdown().await;
    assert_eq!((stats.retried, stats.completed), (1, 1), "{stats:?}");
    assert_eq!(calls.attempts(), [1, 2], "the retry counts an attempt");
    let gap = calls.gaps()[0];
    assert!(
        gap >= delay,
        "the retry came after {gap:?}, before {delay:?}"
    );
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 0)
            .await
    );
}

#[tokio::test]
async fn unreadable_framework_properties_are_a_problem_not_a_guess() {
    let (broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    // Another producer writes the framework's property with a value that means nothing.
    let mut client = ServiceBusClient::<BasicRetryPolicy>::unsecured()
        .new_from_connection_string(
            broker.connection_string(),
            ServiceBusClientOptions {
                retry_options: ServiceBusRetryOptions {
                    max_retries: 0,
                    ..ServiceBusRetryOptions::default()
                },
                ..ServiceBusClientOptions::default()
            },
        )
        .await
        .unwrap();
    let mut sender = client
        .create_sender("q", ServiceBusSenderOptions::default())
        .await
        .unwrap();
    let mut foreign = ServiceBusMessage::new(b"{\"id\":1}".to_vec());
    foreign.set_message_id("foreign").unwrap();
    let mut properties = ApplicationProperties::default();
    properties
        .0
        .insert(wire::ATTEMPT.to_owned(), SimpleValue::String("zero".into()));
    properties
        .0
        .insert("tenant".to_owned(), SimpleValue::Int(7));
    *foreign.application_properties_mut() = Some(properties);
    sender.send_message(foreign).await.unwrap();
    sender.dispose().await.unwrap();
    client.dispose().await.unwrap();

    let mut stream = transport
        .consume(&Source::endpoint("q"), ConsumeOptions::default())
        .await
        .unwrap();
    let delivery = next(&mut stream).await;
    assert_eq!(delivery.message().id().as_str(), "foreign");
    let problem = delivery.problem().expect("a problem is reported");
    assert!(problem.contains(wire::ATTEMPT), "{problem}");
    assert_eq!(
        delivery.message().headers().get("tenant"),
        Some("7"),
        "foreign scalar properties become text headers"
    );
    delivery.complete().await.unwrap();
}

/// Against a real namespace, only when `SERVICEBUS_CONNECTION_STRING` is set. The queue named
/// by `SERVICEBUS_QUEUE` (default `redeliver-test`) must exist. Not governed by
/// `REDELIVER_REQUIRE_BROKERS`: CI cannot reach Azure, and every other test here runs against
/// the test broker, which is always there.
#[tokio::test]
async fn real_namespace_round_trip_with_a_scheduled_message() {
    let Ok(connection_string) = std::env::var("SERVICEBUS_CONNECTION_STRING") else {
        println!("skipped: SERVICEBUS_CONNECTION_STRING is not set");
        return;
    };
    let queue = std::env::var("SERVICEBUS_QUEUE").unwrap_or_else(|_| "redeliver-test".into());
    let transport = redeliver_servicebus::ServiceBusTransport::connect(
        connection_string,
        redeliver_servicebus::ServiceBusOptions::default(),
    )
    .await
    .expect("connects to the namespace");
    transport
        .declare(&Topology::new().endpoint(&queue))
        .await
        .expect("the queue exists");
    let mut stream = transport
        .consume(&Source::endpoint(&queue), ConsumeOptions::default())
        .await
        .unwrap();
    let not_before = millis(Utc::now() + TimeDelta::seconds(3));
    let message = order(1).with_not_before(not_before);
    let id = message.id().clone();
    transport.send(&queue, message).await.unwrap();
    loop {
        let delivery = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("a delivery in time")
            .expect("the stream is open")
            .expect("no consumer error");
        let mine = delivery.message().id() == &id;
        if mine {
            assert!(Utc::now() >= not_before - TimeDelta::seconds(1));
        }
        if mine {
            delivery.complete().await.unwrap();
            break;
        }
        // Not ours: leave it for its owner.
        delivery.abandon().await.unwrap();
    }
    transport.close().await;
}

#[tokio::test]
async fn a_dropped_unsettled_delivery_comes_back_at_once() {
    let (_broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    let mut stream = transport
        .consume(&Source::endpoint("q"), ConsumeOptions::default())
        .await
        .unwrap();
    transport.send("q", order(1)).await.unwrap();
    let first = next(&mut stream).await;
    let id = first.message().id().clone();
    let started = Instant::now();
    drop(first);
    let again = next(&mut stream).await;
    assert_eq!(again.message().id(), &id);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "given back by abandoning, not by waiting out the 60 s lock"
    );
    again.complete().await.unwrap();
}

#[tokio::test]
async fn sending_and_consuming_resume_after_the_broker_restarts() {
    let topology = Topology::new().endpoint("q");
    let broker = support::broker().await;
    let address = broker.address();
    support::provision(&broker, &topology, &QueueOptions::default());
    let options = support::options()
        .with_try_timeout(Duration::from_secs(3))
        .with_receive_wait(Duration::from_secs(1));
    let transport: Arc<dyn Transport> = Arc::new(
        redeliver_servicebus::ServiceBusTransport::connect(broker.connection_string(), options)
            .await
            .unwrap(),
    );
    let calls = Calls::new(transport.clock());
    let worker = {
        let calls = calls.clone();
        Worker::builder(Arc::clone(&transport), "q")
            .start(move |_: Order, ctx: Context| {
                calls.record(&ctx);
                async { Outcome::success() }
            })
            .await
            .unwrap()
    };
    transport.send("q", order(1)).await.unwrap();
    calls.wait_for(1, PROMPT).await;

    broker.shutdown().await;
    let broker = redeliver_servicebus_testbroker::start(
        redeliver_servicebus_testbroker::BrokerOptions::default().with_address(address),
    )
    .await
    .expect("the address is free again");
    support::provision(&broker, &topology, &QueueOptions::default());

    // The transport's own retries cover noticing that the old connection is gone.
    transport
        .send("q", order(2))
        .await
        .expect("sending works again, within one call");
    calls.wait_for(2, Duration::from_secs(60)).await;
    worker.shutdown().await;
}

#[tokio::test]
async fn a_consumer_idle_for_longer_than_its_receive_wait_still_receives() {
    let topology = Topology::new().endpoint("q");
    let broker = support::broker().await;
    support::provision(&broker, &topology, &QueueOptions::default());
    let wait = Duration::from_secs(1);
    let transport = redeliver_servicebus::ServiceBusTransport::connect(
        broker.connection_string(),
        support::options().with_receive_wait(wait),
    )
    .await
    .unwrap();
    let mut stream = transport
        .consume(&Source::endpoint("q"), ConsumeOptions::default())
        .await
        .unwrap();
    // Idleness is what is tested: several receive waits pass with nothing to receive.
    tokio::time::sleep(wait * 3).await;
    transport.send("q", order(1)).await.unwrap();
    next(&mut stream).await.complete().await.unwrap();
}

#[tokio::test]
async fn dead_lettering_a_dead_letter_is_refused_and_gives_it_back() {
    let (broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    let mut stream = transport
        .consume(&Source::endpoint("q"), ConsumeOptions::default())
        .await
        .unwrap();
    transport.send("q", order(1)).await.unwrap();
    next(&mut stream)
        .await
        .dead_letter("corrupt", None)
        .await
        .unwrap();

    let mut dead = transport
        .consume(&Source::dead_letters("q"), ConsumeOptions::default())
        .await
        .unwrap();
    let letter = next(&mut dead).await;
    let id = letter.message().id().clone();
    let e = letter.dead_letter("again", None).await.unwrap_err();
    assert!(matches!(e, Error::InvalidMessage { .. }), "{e:?}");
    let again = next(&mut dead).await;
    assert_eq!(again.message().id(), &id, "still a dead letter, given back");
    assert_eq!(
        again.message().dead_letter().map(|d| d.reason.as_str()),
        Some("corrupt")
    );
    again.complete().await.unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 0)
            .await
    );
}

#[tokio::test]
async fn many_concurrent_sends_to_one_queue_all_arrive() {
    let topology = Topology::new().endpoint("q");
    let broker = support::broker().await;
    support::provision(&broker, &topology, &QueueOptions::default());
    let transport = redeliver_servicebus::ServiceBusTransport::connect(
        broker.connection_string(),
        support::options().with_senders_per_entity(4),
    )
    .await
    .unwrap();
    // More sends in flight than links: they share the links, and every one is stored.
    let sends = (0..64).map(|id| transport.send("q", order(id)));
    for result in futures::future::join_all(sends).await {
        result.expect("every send is stored");
    }
    assert_eq!(broker.active_message_count("q").unwrap(), 64);
    let mut stream = transport
        .consume(&Source::endpoint("q"), ConsumeOptions::default())
        .await
        .unwrap();
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let delivery = next(&mut stream).await;
        let order: Order = delivery.message().decode().unwrap();
        ids.insert(order.id);
        delivery.complete().await.unwrap();
    }
    assert_eq!(ids.len(), 64, "each message once");
    transport.close().await;
}

#[tokio::test]
async fn messages_received_in_a_batch_as_the_stream_closes_all_come_back() {
    let (_broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    for id in 0..8 {
        transport.send("q", order(id)).await.unwrap();
    }
    let mut stream = transport
        .consume(
            &Source::endpoint("q"),
            ConsumeOptions::default().with_prefetch(8),
        )
        .await
        .unwrap();
    // The first message makes the consumer ask for the next seven in one batch; the stream
    // closes with that batch under way or waiting in it, unsettled.
    let first = next(&mut stream).await;
    drop(stream);
    drop(first);
    // Given back, not left locked: another consumer gets all eight long before the 60 s
    // locks would run out.
    let mut again = transport
        .consume(
            &Source::endpoint("q"),
            ConsumeOptions::default().with_prefetch(8),
        )
        .await
        .unwrap();
    let mut ids = std::collections::BTreeSet::new();
    while ids.len() < 8 {
        let delivery = next(&mut again).await;
        let order: Order = delivery.message().decode().unwrap();
        ids.insert(order.id);
        delivery.complete().await.unwrap();
    }
}

#[tokio::test]
async fn a_batch_is_bounded_by_prefetch_and_every_message_arrives_once() {
    let (broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    for id in 0..40 {
        transport.send("q", order(id)).await.unwrap();
    }
    let mut stream = transport
        .consume(
            &Source::endpoint("q"),
            ConsumeOptions::default().with_prefetch(5),
        )
        .await
        .unwrap();
    // Hold five: no sixth is handed out while they are held.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(next(&mut stream).await);
    }
    assert!(
        futures::FutureExt::now_or_never(stream.next()).is_none(),
        "no more than prefetch handed out"
    );
    let mut ids = std::collections::BTreeSet::new();
    for delivery in held {
        let order: Order = delivery.message().decode().unwrap();
        assert!(ids.insert(order.id));
        delivery.complete().await.unwrap();
    }
    while ids.len() < 40 {
        let delivery = next(&mut stream).await;
        let order: Order = delivery.message().decode().unwrap();
        assert!(ids.insert(order.id), "message {} delivered twice", order.id);
        delivery.complete().await.unwrap();
    }
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("q").unwrap() == 0)
            .await
    );
}

#[tokio::test]
async fn retries_and_parks_survive_duplicate_detection() {
    let (broker, transport) = support::setup(
        &Topology::new().endpoint("q"),
        QueueOptions::default().with_duplicate_detection(Duration::from_secs(600)),
    )
    .await;
    let transport: Arc<dyn Transport> = Arc::new(transport);
    let calls = Calls::new(transport.clock());
    let worker = {
        let calls = calls.clone();
        Worker::builder(Arc::clone(&transport), "q")
            .retry_policy(fixed(Duration::from_millis(500), 5))
            .start(move |_: Order, ctx: Context| {
                calls.record(&ctx);
                let attempt = ctx.attempt();
                async move {
                    if attempt < 3 {
                        Outcome::retry(format!("failure on attempt {attempt}"))
                    } else {
                        Outcome::success()
                    }
                }
            })
            .await
            .unwrap()
    };
    let message = order(1).with_id("order-1");
    transport.send("q", message.clone()).await.unwrap();
    calls.wait_for(3, PROMPT).await;
    assert_eq!(calls.attempts(), [1, 2, 3], "each retry was kept");
    assert!(
        calls.all().iter().all(|c| c.message_id == "order-1"),
        "handlers see the framework's id on every copy"
    );

    // A message that arrives before its not-before (another producer set it without
    // scheduling) is parked: that copy is kept too. (Up to the declared scheduling precision
    // of 1 s early is handled at once.)
    let not_before = Utc::now() + TimeDelta::seconds(4);
    let mut early = ServiceBusMessage::new(b"{\"id\":2}".to_vec());
    early.set_message_id("order-2").unwrap();
    let mut properties = ApplicationProperties::default();
    properties.0.insert(
        wire::NOT_BEFORE.to_owned(),
        SimpleValue::String(not_before.to_rfc3339()),
    );
    properties
        .0
        .insert(wire::ATTEMPT.to_owned(), SimpleValue::String("3".into()));
    *early.application_properties_mut() = Some(properties);
    support::send_raw(&broker, "q", vec![early]).await;
    calls.wait_for(4, PROMPT).await;
    let parked = &calls.all()[3];
    assert_eq!((parked.message_id.as_str(), parked.attempt), ("order-2", 3));

    // The application's own second send of an id is still dropped as a duplicate.
    transport.send("q", message).await.unwrap();
    let stats = worker.shutdown().await;
    assert_eq!(
        (stats.retried, stats.parked, stats.completed),
        (2, 1, 2),
        "{stats:?}"
    );
    assert_eq!(calls.count(), 4, "the repeated send was not delivered");
    assert_eq!(broker.active_message_count("q").unwrap(), 0);
}

#[tokio::test]
async fn a_handler_failing_with_a_one_mib_reason_retries_then_dead_letters() {
    let (broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    let transport: Arc<dyn Transport> = Arc::new(transport);
    let calls = Calls::new(transport.clock());
    let reason = "e".repeat(1024 * 1024);
    let worker = {
        let calls = calls.clone();
        Worker::builder(Arc::clone(&transport), "q")
            .retry_policy(fixed(Duration::from_millis(200), 3))
            .start(move |_: Order, ctx: Context| {
                calls.record(&ctx);
                let reason = reason.clone();
                async move { Outcome::retry(reason) }
            })
            .await
            .unwrap()
    };
    let message = order(1);
    let id = message.id().clone();
    transport.send("q", message).await.unwrap();
    calls.wait_for(3, PROMPT).await;
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 1)
            .await,
        "dead-lettered after the last attempt"
    );
    let stats = worker.shutdown().await;
    assert_eq!(calls.attempts(), [1, 2, 3]);
    assert_eq!(
        (stats.retried, stats.dead_lettered, stats.settle_failures),
        (2, 1, 0),
        "{stats:?}"
    );
    let letter = &broker.dead_letters("q").unwrap()[0];
    let native_reason = letter.reason.as_deref().unwrap_or_default();
    assert!(
        native_reason.starts_with("eee") && native_reason.len() <= wire::MAX_REASON_BYTES,
        "cut to {} bytes",
        native_reason.len()
    );
    assert!(
        letter
            .description
            .as_deref()
            .is_some_and(|d| d.len() <= wire::MAX_DESCRIPTION_BYTES)
    );
    assert_eq!(broker.active_message_count("q").unwrap(), 0);

    // The dead letter is the third attempt's copy: it reads back with the framework's id.
    assert_ne!(
        letter.message_id.as_ref(),
        Some(&id.to_string()),
        "a native id of its own"
    );
    let mut dead = transport
        .consume(&Source::dead_letters("q"), ConsumeOptions::default())
        .await
        .unwrap();
    let letter = next(&mut dead).await;
    assert_eq!(letter.message().id(), &id);
    assert_eq!(letter.message().attempt(), 3);
    assert!(
        letter
            .message()
            .last_failure()
            .is_some_and(|f| f.len() <= wire::MAX_REASON_BYTES)
    );
    letter.complete().await.unwrap();
}

#[tokio::test]
async fn a_retry_whose_copy_cannot_fit_is_dead_lettered_not_looped() {
    let (broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    // Fits as sent; its retry copy, with the framework's state and a 1000-byte reason, does not.
    let size = redeliver_servicebus_testbroker::STANDARD_MAX_MESSAGE_SIZE - 512;
    // A JSON string, for a handler of `String`.
    let body: Vec<u8> = std::iter::once(b'"')
        .chain(std::iter::repeat_n(b'x', size - 2))
        .chain(std::iter::once(b'"'))
        .collect();
    let e = transport
        .send("q", Message::new(vec![b'x'; 300 * 1024]))
        .await
        .unwrap_err();
    assert!(e.is_message_refused() && !e.is_transient(), "{e:?}");
    transport
        .send("q", Message::new(body.clone()).with_id("big"))
        .await
        .expect("the message itself fits");

    let transport: Arc<dyn Transport> = Arc::new(transport);
    let calls = Calls::new(transport.clock());
    let worker = {
        let calls = calls.clone();
        Worker::builder(Arc::clone(&transport), "q")
            .retry_policy(fixed(Duration::from_millis(200), 5))
            .start(move |_: String, ctx: Context| {
                calls.record(&ctx);
                async { Outcome::retry("r".repeat(1000)) }
            })
            .await
            .unwrap()
    };
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 1)
            .await,
        "dead-lettered"
    );
    let stats = worker.shutdown().await;
    assert_eq!(calls.count(), 1, "handled once, not looping: {stats:?}");
    assert_eq!(
        (stats.retried, stats.dead_lettered),
        (0, 1),
        "counted as what happened: {stats:?}"
    );
    assert_eq!(stats.settle_failures, 0, "{stats:?}");
    assert_eq!(broker.active_message_count("q").unwrap(), 0);
    let letter = &broker.dead_letters("q").unwrap()[0];
    assert_eq!(letter.reason.as_deref(), Some(reasons::COPY_REFUSED));
    let description = letter.description.as_deref().unwrap_or_default();
    assert!(
        description.contains("refused the copy") && description.contains("retry"),
        "{description}"
    );
    assert!(description.len() <= wire::MAX_DESCRIPTION_BYTES);
    assert_eq!(letter.body, body, "the body is kept");

    let mut dead = transport
        .consume(&Source::dead_letters("q"), ConsumeOptions::default())
        .await
        .unwrap();
    let letter = next(&mut dead).await;
    assert_eq!(letter.message().id().as_str(), "big");
    assert_eq!(letter.message().attempt(), 1, "the attempt that ran");
    assert_eq!(
        letter.message().dead_letter().map(|d| d.reason.as_str()),
        Some(reasons::COPY_REFUSED)
    );
    assert_eq!(
        letter.message().last_failure(),
        Some("r".repeat(1000).as_str())
    );
    letter.complete().await.unwrap();
}

#[tokio::test]
async fn a_retry_whose_copy_has_too_many_properties_is_dead_lettered_not_looped() {
    let (broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    // Service Bus answers this with `amqp:internal-error` ("please retry"); the transport
    // refuses it itself, for what it is.
    let e = transport
        .send("q", order(1).with_header("big", "h".repeat(70 * 1024)))
        .await
        .unwrap_err();
    assert!(e.is_message_refused() && !e.is_transient(), "{e:?}");
    assert_eq!(broker.active_message_count("q").unwrap(), 0);

    // Fits as sent, 1 KiB under the limit; the retry copy's framework state does not.
    let header = "h".repeat(redeliver_servicebus_testbroker::STANDARD_MAX_HEADER_SIZE - 1024);
    transport
        .send("q", order(2).with_id("wide").with_header("big", header))
        .await
        .expect("the message itself fits");
    let transport: Arc<dyn Transport> = Arc::new(transport);
    let calls = Calls::new(transport.clock());
    let worker = {
        let calls = calls.clone();
        Worker::builder(Arc::clone(&transport), "q")
            .retry_policy(fixed(Duration::from_millis(200), 5))
            .start(move |_: Order, ctx: Context| {
                calls.record(&ctx);
                async { Outcome::retry("r".repeat(1000)) }
            })
            .await
            .unwrap()
    };
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 1)
            .await,
        "dead-lettered"
    );
    let stats = worker.shutdown().await;
    assert_eq!(calls.count(), 1, "handled once, not looping: {stats:?}");
    assert_eq!(
        (stats.retried, stats.dead_lettered),
        (0, 1),
        "counted as what happened: {stats:?}"
    );
    let letter = &broker.dead_letters("q").unwrap()[0];
    assert_eq!(letter.reason.as_deref(), Some(reasons::COPY_REFUSED));
    assert!(
        letter
            .description
            .as_deref()
            .is_some_and(|d| d.contains("65536")),
        "{:?}",
        letter.description
    );
}

#[tokio::test]
async fn framework_properties_of_the_wrong_type_are_dead_lettered_as_malformed() {
    let (broker, transport) =
        support::setup(&Topology::new().endpoint("q"), QueueOptions::default()).await;
    let described = |value: serde_amqp::Value| {
        SimpleValue::Described(Box::new(serde_amqp::described::Described {
            descriptor: serde_amqp::descriptor::Descriptor::Code(0x7265_6465),
            value,
        }))
    };
    let foreign = |id: &str, properties: Vec<(&str, SimpleValue)>| {
        let mut message = ServiceBusMessage::new(b"{\"id\":1}".to_vec());
        message.set_message_id(id).unwrap();
        let mut application = ApplicationProperties::default();
        for (key, value) in properties {
            application.0.insert(key.to_owned(), value);
        }
        *message.application_properties_mut() = Some(application);
        message
    };
    support::send_raw(
        &broker,
        "q",
        vec![
            foreign(
                "list-and-map",
                vec![
                    (
                        wire::ATTEMPT,
                        described(serde_amqp::Value::List(vec![serde_amqp::Value::Uint(2)])),
                    ),
                    (
                        wire::NOT_BEFORE,
                        described(serde_amqp::Value::Map(Default::default())),
                    ),
                ],
            ),
            foreign(
                "float",
                vec![(wire::ATTEMPT, SimpleValue::Double(2.0.into()))],
            ),
            // An integer attempt from another producer is a number, not a problem.
            foreign("integer", vec![(wire::ATTEMPT, SimpleValue::Long(2))]),
        ],
    )
    .await;

    let transport: Arc<dyn Transport> = Arc::new(transport);
    let calls = Calls::new(transport.clock());
    let worker = {
        let calls = calls.clone();
        Worker::builder(Arc::clone(&transport), "q")
            .start(move |_: Order, ctx: Context| {
                calls.record(&ctx);
                async { Outcome::success() }
            })
            .await
            .unwrap()
    };
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 2)
            .await,
        "both mistyped messages dead-lettered"
    );
    calls.wait_for(1, PROMPT).await;
    let stats = worker.shutdown().await;
    assert_eq!((stats.dead_lettered, stats.completed), (2, 1), "{stats:?}");
    assert_eq!(
        (calls.all()[0].message_id.as_str(), calls.attempts()),
        ("integer", vec![2])
    );
    let mut letters = broker.dead_letters("q").unwrap();
    letters.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    assert_eq!(letters[0].message_id.as_deref(), Some("float"));
    for letter in &letters {
        assert_eq!(letter.reason.as_deref(), Some(reasons::MALFORMED_HEADERS));
    }
    let description = |i: usize| letters[i].description.clone().unwrap_or_default();
    assert!(
        description(0).contains(&wire::mistyped(wire::ATTEMPT, "a floating-point number")),
        "{}",
        description(0)
    );
    assert!(
        description(1).contains(&wire::mistyped(wire::ATTEMPT, "a list"))
            && description(1).contains(&wire::mistyped(wire::NOT_BEFORE, "a map")),
        "{}",
        description(1)
    );
}
