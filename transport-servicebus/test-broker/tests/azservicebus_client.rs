//! The broker driven over the wire by the real `azservicebus` 0.25.1 client.
#![allow(missing_docs)]

use std::time::Duration;

use azservicebus::core::BasicRetryPolicy;
use azservicebus::receiver::DeadLetterOptions;
use azservicebus::{
    ServiceBusClient, ServiceBusClientOptions, ServiceBusMessage, ServiceBusReceiveMode,
    ServiceBusReceivedMessage, ServiceBusReceiver, ServiceBusReceiverOptions,
    ServiceBusRetryOptions, ServiceBusSender, ServiceBusSenderOptions, SubQueue,
};
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue};
use redeliver_servicebus_testbroker::{
    BrokerHandle, BrokerOptions, QueueOptions, SubscriptionOptions, TopicOptions, start,
};
use serde_amqp::Value;
use time::OffsetDateTime;

/// Upper bound for anything that should happen promptly.
const PROMPT: Duration = Duration::from_secs(10);

type Client = ServiceBusClient<BasicRetryPolicy>;

async fn broker() -> BrokerHandle {
    start(BrokerOptions::default())
        .await
        .expect("broker starts")
}

/// A client that does not retry: a refused operation must surface as an error.
async fn client(broker: &BrokerHandle) -> Client {
    let options = ServiceBusClientOptions {
        retry_options: ServiceBusRetryOptions {
            max_retries: 0,
            try_timeout: Duration::from_secs(10),
            ..ServiceBusRetryOptions::default()
        },
        ..ServiceBusClientOptions::default()
    };
    ServiceBusClient::<BasicRetryPolicy>::unsecured()
        .new_from_connection_string(broker.connection_string(), options)
        .await
        .expect("client connects")
}

async fn sender(client: &mut Client, entity: &str) -> ServiceBusSender {
    client
        .create_sender(entity, ServiceBusSenderOptions::default())
        .await
        .expect("sender attaches")
}

async fn receiver(
    client: &mut Client,
    queue: &str,
    mode: ServiceBusReceiveMode,
) -> ServiceBusReceiver {
    client
        .create_receiver_for_queue(
            queue,
            ServiceBusReceiverOptions {
                receive_mode: mode,
                ..ServiceBusReceiverOptions::default()
            },
        )
        .await
        .expect("receiver attaches")
}

async fn dead_letter_receiver(client: &mut Client, queue: &str) -> ServiceBusReceiver {
    client
        .create_receiver_for_queue(
            queue,
            ServiceBusReceiverOptions {
                sub_queue: SubQueue::DeadLetter,
                ..ServiceBusReceiverOptions::default()
            },
        )
        .await
        .expect("dead-letter receiver attaches")
}

/// Sends one message and closes the sender properly.
///
/// Dropping an `azservicebus` sender without `dispose` detaches it without waiting for the
/// broker's answering detach, which then ends the client's whole AMQP session.
async fn send_one(client: &mut Client, entity: &str, message: ServiceBusMessage) {
    let mut sender = sender(client, entity).await;
    sender.send_message(message).await.expect("send accepted");
    sender.dispose().await.expect("sender closes");
}

fn message(id: &str, body: &str) -> ServiceBusMessage {
    let mut message = ServiceBusMessage::new(body.as_bytes().to_vec());
    message.set_message_id(id.to_owned()).expect("valid id");
    message
}

async fn receive(
    receiver: &mut ServiceBusReceiver,
    wait: Duration,
) -> Option<ServiceBusReceivedMessage> {
    receiver
        .receive_message_with_max_wait_time(wait)
        .await
        .expect("receive does not fail")
}

fn id_of(message: &ServiceBusReceivedMessage) -> String {
    message.message_id().expect("message id").into_owned()
}

#[tokio::test]
async fn send_receive_complete_round_trip_with_service_bus_annotations() {
    let broker = broker().await;
    broker
        .create_queue("orders", QueueOptions::default())
        .unwrap();
    let mut client = client(&broker).await;
    let mut sender = sender(&mut client, "orders").await;
    let before = OffsetDateTime::now_utc() - Duration::from_secs(1);
    sender
        .send_message(message("m1", "hello"))
        .await
        .expect("send accepted");
    assert_eq!(broker.active_message_count("orders").unwrap(), 1);

    let mut receiver = receiver(&mut client, "orders", ServiceBusReceiveMode::PeekLock).await;
    let received = receive(&mut receiver, PROMPT).await.expect("a message");
    assert_eq!(received.body().unwrap(), b"hello");
    assert_eq!(id_of(&received), "m1");
    assert_eq!(received.delivery_count(), Some(1));
    assert!(received.sequence_number() > 0);
    assert!(received.enqueued_time() >= before);
    let locked_until = received.locked_until().expect("locked until");
    assert!(locked_until > OffsetDateTime::now_utc() + Duration::from_secs(30));

    receiver
        .complete_message(&received)
        .await
        .expect("complete");
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("orders").unwrap() == 0)
            .await,
        "completed message is removed"
    );
    assert_eq!(broker.dead_letter_message_count("orders").unwrap(), 0);
}

#[tokio::test]
async fn abandon_makes_message_available_again_with_delivery_count_plus_one_and_modified_properties()
 {
    let broker = broker().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let mut client = client(&broker).await;
    send_one(&mut client, "q", message("a", "x")).await;
    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;

    let first = receive(&mut receiver, PROMPT)
        .await
        .expect("first delivery");
    assert_eq!(first.delivery_count(), Some(1));
    let mut properties = OrderedMap::new();
    properties.insert("last-error".to_owned(), Value::String("timeout".to_owned()));
    receiver
        .abandon_message(&first, Some(properties))
        .await
        .unwrap();

    let second = receive(&mut receiver, PROMPT).await.expect("redelivery");
    assert_eq!(id_of(&second), "a");
    assert_eq!(second.delivery_count(), Some(2));
    assert_eq!(second.sequence_number(), first.sequence_number());
    let last_error = second
        .application_properties()
        .and_then(|p| p.0.get("last-error").cloned());
    assert_eq!(last_error, Some(SimpleValue::String("timeout".to_owned())));
}

#[tokio::test]
async fn abandon_at_max_delivery_count_dead_letters_with_reason() {
    let broker = broker().await;
    broker
        .create_queue("q", QueueOptions::default().with_max_delivery_count(2))
        .unwrap();
    let mut client = client(&broker).await;
    send_one(&mut client, "q", message("poison", "x")).await;
    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;
    for attempt in 1..=2 {
        let delivery = receive(&mut receiver, PROMPT).await.expect("delivery");
        assert_eq!(delivery.delivery_count(), Some(attempt));
        receiver.abandon_message(&delivery, None).await.unwrap();
    }
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 1)
            .await
    );
    assert_eq!(broker.active_message_count("q").unwrap(), 0);
    assert!(
        receive(&mut receiver, Duration::from_millis(300))
            .await
            .is_none()
    );

    let mut dlq = dead_letter_receiver(&mut client, "q").await;
    let dead = receive(&mut dlq, PROMPT).await.expect("dead letter");
    assert_eq!(id_of(&dead), "poison");
    assert_eq!(dead.dead_letter_reason(), Some("MaxDeliveryCountExceeded"));
    dlq.complete_message(&dead).await.unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 0)
            .await
    );
}

#[tokio::test]
async fn dead_letter_keeps_reason_description_and_modified_properties_in_the_dead_letter_queue() {
    let broker = broker().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let mut client = client(&broker).await;
    send_one(&mut client, "q", message("bad", "body")).await;
    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;
    let delivery = receive(&mut receiver, PROMPT).await.unwrap();
    let mut properties = OrderedMap::new();
    properties.insert("attempt".to_owned(), Value::String("3".to_owned()));
    receiver
        .dead_letter_message(
            &delivery,
            DeadLetterOptions {
                dead_letter_reason: Some("ValidationFailed".into()),
                dead_letter_error_description: Some("amount is negative".into()),
                properties_to_modify: Some(properties),
            },
        )
        .await
        .unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 1)
            .await
    );
    let letters = broker.dead_letters("q").unwrap();
    assert_eq!(letters[0].reason.as_deref(), Some("ValidationFailed"));
    assert_eq!(
        letters[0].description.as_deref(),
        Some("amount is negative")
    );
    assert_eq!(letters[0].body, b"body");

    let mut dlq = dead_letter_receiver(&mut client, "q").await;
    let dead = receive(&mut dlq, PROMPT).await.expect("dead letter");
    assert_eq!(dead.dead_letter_reason(), Some("ValidationFailed"));
    assert_eq!(
        dead.dead_letter_error_description(),
        Some("amount is negative")
    );
    assert_eq!(dead.body().unwrap(), b"body");
    let attempt = dead
        .application_properties()
        .and_then(|p| p.0.get("attempt").cloned());
    assert_eq!(
        attempt,
        Some(SimpleValue::String("3".to_owned())),
        "properties to modify are applied"
    );
}

#[tokio::test]
async fn deferred_message_is_only_received_by_sequence_number() {
    let broker = broker().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let mut client = client(&broker).await;
    send_one(&mut client, "q", message("d", "x")).await;
    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;
    let delivery = receive(&mut receiver, PROMPT).await.unwrap();
    receiver.defer_message(&delivery, None).await.unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.deferred_message_count("q").unwrap() == 1)
            .await
    );
    assert_eq!(broker.active_message_count("q").unwrap(), 0);
    assert!(
        receive(&mut receiver, Duration::from_millis(300))
            .await
            .is_none()
    );

    let deferred = receiver
        .receive_deferred_message(delivery.sequence_number())
        .await
        .unwrap()
        .expect("deferred message by sequence number");
    assert_eq!(id_of(&deferred), "d");
    assert_eq!(deferred.delivery_count(), Some(2));
    // Settled through the management link: the message was not received on the data link.
    receiver.complete_message(&deferred).await.unwrap();
    assert_eq!(broker.deferred_message_count("q").unwrap(), 0);
    assert_eq!(broker.active_message_count("q").unwrap(), 0);
}

#[tokio::test]
async fn peek_shows_messages_without_locking_them() {
    let broker = broker().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let mut client = client(&broker).await;
    send_one(&mut client, "q", message("p1", "x")).await;
    send_one(&mut client, "q", message("p2", "y")).await;
    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;
    let peeked = receiver.peek_messages(10, None).await.unwrap();
    let ids: Vec<_> = peeked
        .iter()
        .map(|m| m.message_id().unwrap().into_owned())
        .collect();
    assert_eq!(ids, ["p1", "p2"]);
    assert!(
        receiver.peek_messages(10, None).await.unwrap().is_empty(),
        "peek continues after the last one"
    );
    let delivery = receive(&mut receiver, PROMPT)
        .await
        .expect("peeked message still available");
    assert_eq!(id_of(&delivery), "p1");
    assert_eq!(delivery.delivery_count(), Some(1));
}

#[tokio::test]
async fn receive_and_delete_removes_the_message_on_transfer() {
    let broker = broker().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let mut client = client(&broker).await;
    send_one(&mut client, "q", message("r", "x")).await;
    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::ReceiveAndDelete).await;
    let delivery = receive(&mut receiver, PROMPT).await.expect("a message");
    assert_eq!(id_of(&delivery), "r");
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("q").unwrap() == 0)
            .await
    );
    assert!(
        receive(&mut receiver, Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn scheduled_enqueue_time_holds_the_message_until_then() {
    let broker = broker().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let mut client = client(&broker).await;
    let not_before = OffsetDateTime::now_utc() + Duration::from_millis(1500);
    let mut later = message("later", "x");
    later.set_scheduled_enqueue_time(not_before);
    send_one(&mut client, "q", later).await;
    assert_eq!(broker.scheduled_message_count("q").unwrap(), 1);
    assert_eq!(broker.active_message_count("q").unwrap(), 0);

    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;
    let delivery = receive(&mut receiver, PROMPT)
        .await
        .expect("delivered eventually");
    // Wall-clock timestamps on the wire have millisecond precision.
    assert!(OffsetDateTime::now_utc() >= not_before - Duration::from_millis(5));
    assert!(delivery.enqueued_time() >= not_before - Duration::from_millis(5));
    assert_eq!(broker.scheduled_message_count("q").unwrap(), 0);
}

#[tokio::test]
async fn schedule_message_returns_sequence_numbers_and_cancel_removes_it() {
    let broker = broker().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let mut client = client(&broker).await;
    let mut sender = sender(&mut client, "q").await;
    let far = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    let kept = sender
        .schedule_message(message("kept", "x"), far)
        .await
        .unwrap();
    let cancelled = sender
        .schedule_message(message("gone", "x"), far)
        .await
        .unwrap();
    assert_ne!(kept, cancelled);
    assert_eq!(broker.scheduled_message_count("q").unwrap(), 2);

    sender.cancel_scheduled_message(cancelled).await.unwrap();
    assert_eq!(broker.scheduled_message_count("q").unwrap(), 1);

    let soon = OffsetDateTime::now_utc() + Duration::from_millis(500);
    let soon_number = sender
        .schedule_message(message("soon", "x"), soon)
        .await
        .unwrap();
    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;
    let delivery = receive(&mut receiver, PROMPT)
        .await
        .expect("scheduled message arrives");
    assert_eq!(id_of(&delivery), "soon");
    // As on Service Bus, the enqueued message gets a new sequence number.
    assert!(
        delivery.sequence_number() > soon_number,
        "{} after {soon_number}",
        delivery.sequence_number()
    );
    assert!(OffsetDateTime::now_utc() >= soon - Duration::from_millis(5));
    // A schedule that fired cannot be cancelled any more (Service Bus: MessageNotFound).
    assert!(sender.cancel_scheduled_message(soon_number).await.is_err());
    // Peek shows the message that is still scheduled, under its scheduled sequence number.
    let peeked = receiver.peek_messages(10, None).await.unwrap();
    let scheduled: Vec<_> = peeked
        .iter()
        .filter(|m| m.message_id().is_some_and(|id| id == "kept"))
        .map(|m| m.sequence_number())
        .collect();
    assert_eq!(scheduled, [kept]);
}

#[tokio::test]
async fn renew_lock_extends_locked_until() {
    let broker = broker().await;
    broker
        .create_queue(
            "q",
            QueueOptions::default().with_lock_duration(Duration::from_secs(2)),
        )
        .unwrap();
    let mut client = client(&broker).await;
    send_one(&mut client, "q", message("l", "x")).await;
    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;
    let mut delivery = receive(&mut receiver, PROMPT).await.unwrap();
    let first = delivery.locked_until().unwrap();
    // A renewal locks for a whole lock duration from the moment of renewing.
    let renewing_at = OffsetDateTime::now_utc();
    receiver
        .renew_message_lock(&mut delivery)
        .await
        .expect("renew");
    let renewed = delivery.locked_until().unwrap();
    // The wire carries milliseconds: allow the truncation.
    let at_least = renewing_at + Duration::from_secs(2) - Duration::from_millis(1);
    assert!(
        renewed >= at_least,
        "renewed until {renewed}, expected at least {at_least}"
    );
    assert!(renewed >= first, "{renewed} >= {first}");
    receiver.complete_message(&delivery).await.unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("q").unwrap() == 0)
            .await
    );
}

#[tokio::test]
async fn lock_expiry_redelivers_with_delivery_count_plus_one() {
    let broker = broker().await;
    broker
        .create_queue(
            "q",
            QueueOptions::default().with_lock_duration(Duration::from_secs(1)),
        )
        .unwrap();
    let mut client = client(&broker).await;
    send_one(&mut client, "q", message("e", "x")).await;
    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;
    let first = receive(&mut receiver, PROMPT).await.unwrap();
    let locked_until = first.locked_until().unwrap();
    // Not settled: the lock runs out and the message comes back.
    let second = receive(&mut receiver, PROMPT)
        .await
        .expect("redelivered after expiry");
    assert_eq!(id_of(&second), "e");
    assert_eq!(second.delivery_count(), Some(2));
    assert!(OffsetDateTime::now_utc() >= locked_until - Duration::from_millis(5));
    // Settling with the expired lock token changes nothing on the broker.
    receiver
        .complete_message(&first)
        .await
        .expect("the client does not wait for the broker's settlement");
    receiver.complete_message(&second).await.unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("q").unwrap() == 0)
            .await
    );
}

#[tokio::test]
async fn lock_expiry_at_max_delivery_count_dead_letters() {
    let broker = broker().await;
    broker
        .create_queue(
            "q",
            QueueOptions::default()
                .with_lock_duration(Duration::from_secs(1))
                .with_max_delivery_count(1),
        )
        .unwrap();
    let mut client = client(&broker).await;
    send_one(&mut client, "q", message("slow", "x")).await;
    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;
    let _held = receive(&mut receiver, PROMPT).await.unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("q").unwrap() == 1)
            .await
    );
    let letters = broker.dead_letters("q").unwrap();
    assert_eq!(
        letters[0].reason.as_deref(),
        Some("MaxDeliveryCountExceeded")
    );
    assert_eq!(letters[0].delivery_count, 1);
}

#[tokio::test]
async fn topic_fans_out_to_subscriptions_with_subject_filter_and_forwarding() {
    let broker = broker().await;
    broker
        .create_queue("inbox", QueueOptions::default())
        .unwrap();
    broker
        .create_topic("events", TopicOptions::default())
        .unwrap();
    broker
        .create_subscription("events", "all", SubscriptionOptions::default())
        .unwrap();
    broker
        .create_subscription(
            "events",
            "orders-only",
            SubscriptionOptions::default().with_subject_filter("order"),
        )
        .unwrap();
    broker
        .create_subscription(
            "events",
            "to-inbox",
            SubscriptionOptions::default().with_forward_to("inbox"),
        )
        .unwrap();
    let mut client = client(&broker).await;
    let mut sender = sender(&mut client, "events").await;
    for (id, subject) in [("o1", "order"), ("i1", "invoice")] {
        let mut m = message(id, "x");
        m.set_subject(subject.to_owned());
        sender.send_message(m).await.unwrap();
    }
    assert_eq!(
        broker
            .active_message_count("events/Subscriptions/all")
            .unwrap(),
        2
    );
    assert_eq!(
        broker
            .active_message_count("events/Subscriptions/orders-only")
            .unwrap(),
        1
    );
    assert_eq!(
        broker
            .active_message_count("events/Subscriptions/to-inbox")
            .unwrap(),
        0
    );
    assert_eq!(broker.active_message_count("inbox").unwrap(), 2);

    let mut receiver = client
        .create_receiver_for_subscription(
            "events",
            "orders-only",
            ServiceBusReceiverOptions::default(),
        )
        .await
        .unwrap();
    let delivery = receive(&mut receiver, PROMPT).await.unwrap();
    assert_eq!(id_of(&delivery), "o1");
    assert_eq!(delivery.subject(), Some("order"));
    receiver
        .dead_letter_message(
            &delivery,
            DeadLetterOptions {
                dead_letter_reason: Some("Nope".into()),
                dead_letter_error_description: None,
                properties_to_modify: None,
            },
        )
        .await
        .unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| {
                b.dead_letter_message_count("events/Subscriptions/orders-only")
                    .unwrap()
                    == 1
            })
            .await
    );
    let mut dlq = client
        .create_receiver_for_subscription(
            "events",
            "orders-only",
            ServiceBusReceiverOptions {
                sub_queue: SubQueue::DeadLetter,
                ..ServiceBusReceiverOptions::default()
            },
        )
        .await
        .unwrap();
    let dead = receive(&mut dlq, PROMPT)
        .await
        .expect("subscription dead letter");
    assert_eq!(dead.dead_letter_reason(), Some("Nope"));
}

#[tokio::test]
async fn batched_send_enqueues_every_message_in_order() {
    let broker = broker().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let mut client = client(&broker).await;
    let batch: Vec<_> = (1..=3).map(|i| message(&format!("b{i}"), "x")).collect();
    let mut batch_sender = sender(&mut client, "q").await;
    batch_sender.send_messages(batch).await.unwrap();
    batch_sender.dispose().await.unwrap();
    assert_eq!(broker.active_message_count("q").unwrap(), 3);
    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::ReceiveAndDelete).await;
    let mut ids = Vec::new();
    while ids.len() < 3 {
        let delivery = receive(&mut receiver, PROMPT).await.expect("batch member");
        ids.push(id_of(&delivery));
    }
    assert_eq!(ids, ["b1", "b2", "b3"]);
}

#[tokio::test]
async fn rejected_send_surfaces_as_an_error() {
    let broker = broker().await;
    broker
        .create_queue("q", QueueOptions::default().with_max_message_size(512))
        .unwrap();
    let mut client = client(&broker).await;
    let mut sender = sender(&mut client, "q").await;

    let too_large = ServiceBusMessage::new(vec![0u8; 4096]);
    assert!(
        sender.send_message(too_large).await.is_err(),
        "oversized send fails"
    );

    broker
        .set_reject_sends("q", Some("queue is read-only"))
        .unwrap();
    assert!(
        sender.send_message(message("no", "x")).await.is_err(),
        "refused send fails"
    );
    assert_eq!(broker.active_message_count("q").unwrap(), 0);

    broker.set_reject_sends("q", None).unwrap();
    sender
        .send_message(message("yes", "x"))
        .await
        .expect("accepted again");
    assert_eq!(broker.active_message_count("q").unwrap(), 1);
}

#[tokio::test]
async fn unknown_entities_are_errors() {
    let broker = broker().await;
    let mut client = client(&broker).await;
    let send_failed = match client
        .create_sender("missing", ServiceBusSenderOptions::default())
        .await
    {
        Err(_) => true,
        Ok(mut sender) => sender.send_message(message("x", "x")).await.is_err(),
    };
    assert!(send_failed, "sending to an unknown queue fails");
    // A fresh client, so that the failure cannot come from the first one's state.
    let mut client = self::client(&broker).await;
    let receive_failed = match client
        .create_receiver_for_queue("missing", ServiceBusReceiverOptions::default())
        .await
    {
        Err(_) => true,
        Ok(mut receiver) => receiver
            .receive_message_with_max_wait_time(Duration::from_secs(1))
            .await
            .is_err(),
    };
    assert!(receive_failed, "receiving from an unknown queue fails");
}

#[tokio::test]
async fn two_brokers_are_isolated() {
    let first = broker().await;
    let second = broker().await;
    assert_ne!(first.address(), second.address());
    first.create_queue("q", QueueOptions::default()).unwrap();
    second.create_queue("q", QueueOptions::default()).unwrap();
    let mut client = client(&first).await;
    send_one(&mut client, "q", message("1", "x")).await;
    assert_eq!(first.active_message_count("q").unwrap(), 1);
    assert_eq!(second.active_message_count("q").unwrap(), 0);
}

#[tokio::test]
async fn competing_receivers_each_get_their_own_messages() {
    let broker = broker().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let mut client = client(&broker).await;
    let mut first = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;
    let mut second = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;
    send_one(&mut client, "q", message("c1", "x")).await;
    send_one(&mut client, "q", message("c2", "x")).await;

    let a = receive(&mut first, PROMPT)
        .await
        .expect("first receiver gets one");
    let b = receive(&mut second, PROMPT)
        .await
        .expect("second receiver gets the other");
    let mut ids = [id_of(&a), id_of(&b)];
    ids.sort();
    assert_eq!(ids, ["c1", "c2"]);
    assert_eq!((a.delivery_count(), b.delivery_count()), (Some(1), Some(1)));
    first.complete_message(&a).await.unwrap();
    second.complete_message(&b).await.unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("q").unwrap() == 0)
            .await
    );
}

#[tokio::test]
async fn prefetching_receiver_gets_every_message_locked() {
    let broker = broker().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let mut client = client(&broker).await;
    let mut sender = sender(&mut client, "q").await;
    for i in 0..5 {
        sender
            .send_message(message(&format!("p{i}"), "x"))
            .await
            .unwrap();
    }
    sender.dispose().await.unwrap();
    let mut receiver = client
        .create_receiver_for_queue(
            "q",
            ServiceBusReceiverOptions {
                prefetch_count: 10,
                ..ServiceBusReceiverOptions::default()
            },
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    while ids.len() < 5 {
        let delivery = receive(&mut receiver, PROMPT)
            .await
            .expect("prefetched message");
        assert!(delivery.locked_until().is_some());
        receiver.complete_message(&delivery).await.unwrap();
        ids.push(id_of(&delivery));
    }
    assert_eq!(ids, ["p0", "p1", "p2", "p3", "p4"]);
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("q").unwrap() == 0)
            .await
    );
}

#[tokio::test]
async fn duplicate_detection_drops_a_resent_message_id() {
    let broker = broker().await;
    broker
        .create_queue(
            "q",
            QueueOptions::default().with_duplicate_detection(Duration::from_secs(600)),
        )
        .unwrap();
    let mut client = client(&broker).await;
    let mut sender = sender(&mut client, "q").await;
    sender.send_message(message("same", "1")).await.unwrap();
    sender
        .send_message(message("same", "2"))
        .await
        .expect("a duplicate is accepted");
    sender.send_message(message("other", "3")).await.unwrap();
    sender.dispose().await.unwrap();
    assert_eq!(broker.active_message_count("q").unwrap(), 2);
}

/// A receiver that never asks for a message is offered one (the broker cannot transfer
/// without credit), then its client goes away; the message must stay available, uncounted.
async fn offered_message_survives_a_vanishing_client(abrupt: bool) {
    let broker = broker().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let mut idle = client(&broker).await;
    let idle_receiver = receiver(&mut idle, "q", ServiceBusReceiveMode::PeekLock).await;
    let mut client = client(&broker).await;
    send_one(&mut client, "q", message("m", "x")).await;
    if abrupt {
        drop(idle_receiver);
        drop(idle);
    } else {
        idle_receiver.dispose().await.unwrap();
        idle.dispose().await.unwrap();
    }

    let mut receiver = receiver(&mut client, "q", ServiceBusReceiveMode::PeekLock).await;
    let delivery = receive(&mut receiver, PROMPT)
        .await
        .expect("message still available");
    assert_eq!(id_of(&delivery), "m");
    assert_eq!(delivery.delivery_count(), Some(1));
}

#[tokio::test]
async fn messages_offered_to_a_closed_client_stay_available_and_uncounted() {
    offered_message_survives_a_vanishing_client(false).await;
}

#[tokio::test]
async fn messages_offered_to_a_dropped_client_stay_available_and_uncounted() {
    offered_message_survives_a_vanishing_client(true).await;
}

#[tokio::test]
async fn expired_messages_are_dead_lettered_or_dropped_as_configured() {
    let broker = broker().await;
    broker
        .create_queue(
            "keeps",
            QueueOptions::default().with_dead_lettering_on_message_expiration(true),
        )
        .unwrap();
    broker
        .create_queue(
            "drops",
            QueueOptions::default().with_default_message_time_to_live(Duration::from_millis(300)),
        )
        .unwrap();
    let mut client = client(&broker).await;
    let mut short_lived = message("ttl", "x");
    short_lived
        .set_time_to_live(Some(Duration::from_millis(300)))
        .unwrap();
    send_one(&mut client, "keeps", short_lived).await;
    send_one(&mut client, "drops", message("ttl", "x")).await;

    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letter_message_count("keeps").unwrap()
                == 1)
            .await
    );
    let letters = broker.dead_letters("keeps").unwrap();
    assert_eq!(letters[0].reason.as_deref(), Some("TTLExpiredException"));
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("drops").unwrap() == 0)
            .await
    );
    assert_eq!(broker.dead_letter_message_count("drops").unwrap(), 0);
}
