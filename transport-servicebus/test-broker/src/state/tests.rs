//! The state's rules, exercised without a network: delivery counting, locks, limits,
//! duplicate detection, scheduling through topics and configuration checks.

use std::time::Duration;

use fe2o3_amqp_types::messaging::{ApplicationProperties, Body, Data, Message};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Timestamp};
use serde_amqp::Value;
use tokio::time::Instant;

use crate::error::Error;
use crate::options::{
    QueueOptions, STANDARD_MAX_HEADER_SIZE, STANDARD_MAX_MESSAGE_SIZE, SubscriptionOptions,
    TopicOptions,
};

use super::locks::{LockError, MAX_DELIVERY_COUNT_EXCEEDED, Settlement};
use super::message::{Msg, SCHEDULED_ENQUEUE_TIME, set_annotation};
use super::receiving::ReceiveMode;
use super::sending::Refusal;
use super::store::State;

const LOCK: Duration = Duration::from_secs(5);

fn state_with_queue(max_delivery_count: u32) -> State {
    let mut state = State::default();
    state
        .create_queue(
            "q",
            &QueueOptions::default()
                .with_lock_duration(LOCK)
                .with_max_delivery_count(max_delivery_count),
        )
        .unwrap();
    state
}

fn data(body: &[u8]) -> Msg {
    Message::builder()
        .body(Body::Data(vec![Data(Binary::from(body.to_vec()))].into()))
        .build()
}

/// Picks and transfers the next message of `q`; returns its token and header delivery count.
fn deliver(state: &mut State, now: Instant) -> ([u8; 16], u32) {
    let picked = state.lock_next("q", now, 0).expect("a message");
    let header_count = picked.message.header.as_ref().unwrap().delivery_count;
    (picked.lock_token, header_count)
}

#[test]
fn a_pick_that_is_not_transferred_is_not_counted_as_a_delivery() {
    let mut state = state_with_queue(10);
    let now = Instant::now();
    state.send("q", vec![data(b"x")], now, 0).unwrap();
    let picked = state.pick("q", ReceiveMode::PeekLock, 0).unwrap();
    assert!(
        state.pick("q", ReceiveMode::PeekLock, 0).is_none(),
        "in flight"
    );
    state.not_transferred("q", picked.sequence_number);
    let (_, header_count) = deliver(&mut state, now);
    assert_eq!(header_count, 0, "first real delivery has header count 0");
}

#[test]
fn lock_expiry_counts_and_dead_letters_at_the_maximum() {
    let mut state = state_with_queue(2);
    let start = Instant::now();
    state.send("q", vec![data(b"x")], start, 0).unwrap();
    let (_, first) = deliver(&mut state, start);
    assert_eq!(first, 0);
    assert_eq!(state.next_deadline(), Some(start + LOCK));
    assert!(!state.process_due(start + LOCK - Duration::from_millis(1), 0));
    assert!(state.process_due(start + LOCK, 0));
    let (_, second) = deliver(&mut state, start + LOCK);
    assert_eq!(second, 1);
    assert!(state.process_due(start + LOCK * 2, 0));
    assert_eq!(state.active_count("q").unwrap(), 0);
    let letters = state.dead_letters("q").unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].reason.as_deref(),
        Some(MAX_DELIVERY_COUNT_EXCEEDED)
    );
    assert_eq!(letters[0].delivery_count, 2);
}

#[test]
fn settling_with_an_expired_or_unknown_lock_fails_and_changes_nothing() {
    let mut state = state_with_queue(10);
    let start = Instant::now();
    state.send("q", vec![data(b"x")], start, 0).unwrap();
    let (token, _) = deliver(&mut state, start);
    assert_eq!(
        state.settle(token, Settlement::Complete, start + LOCK),
        Err(LockError::Lost)
    );
    assert_eq!(
        state.settle([0; 16], Settlement::Complete, start),
        Err(LockError::Lost)
    );
    assert_eq!(state.active_count("q").unwrap(), 1);
}

#[test]
fn renewing_a_lock_moves_its_expiry() {
    let mut state = state_with_queue(10);
    let start = Instant::now();
    state.send("q", vec![data(b"x")], start, 0).unwrap();
    let (token, _) = deliver(&mut state, start);
    let later = start + Duration::from_secs(3);
    let until_ms = state.renew_lock(token, later, 3_000).unwrap();
    assert_eq!(until_ms, 3_000 + 5_000);
    assert!(
        !state.process_due(start + LOCK, 0),
        "old expiry no longer applies"
    );
    assert!(
        state
            .settle(token, Settlement::Complete, start + LOCK)
            .is_ok()
    );
    assert_eq!(state.active_count("q").unwrap(), 0);
}

#[test]
fn refused_sends_enqueue_nothing() {
    let mut state = State::default();
    state
        .create_queue("q", &QueueOptions::default().with_max_message_size(64))
        .unwrap();
    let now = Instant::now();
    let result = state.send("q", vec![data(b"small"), data(&[0; 256])], now, 0);
    assert!(matches!(result, Err(Refusal::TooLarge { max: 64, .. })));
    assert_eq!(state.active_count("q").unwrap(), 0);
    assert!(matches!(
        state.send("nope", vec![data(b"x")], now, 0),
        Err(Refusal::NotFound(_))
    ));
}

#[test]
fn the_standard_tier_limits_apply_by_default() {
    let mut state = State::default();
    state.create_queue("q", &QueueOptions::default()).unwrap();
    let now = Instant::now();
    let fits = data(&vec![0; STANDARD_MAX_MESSAGE_SIZE - 1024]);
    state.send("q", vec![fits], now, 0).unwrap();
    let too_large = data(&vec![0; STANDARD_MAX_MESSAGE_SIZE]);
    assert!(matches!(
        state.send("q", vec![too_large], now, 0),
        Err(Refusal::TooLarge {
            max: STANDARD_MAX_MESSAGE_SIZE,
            ..
        })
    ));

    // Header sections over 64 KiB are refused even when the whole message fits.
    let with_property = |bytes: usize| {
        let mut message = data(b"x");
        message.application_properties = Some(ApplicationProperties(
            [("reason".to_owned(), SimpleValue::String("r".repeat(bytes)))]
                .into_iter()
                .collect(),
        ));
        message
    };
    state
        .send("q", vec![with_property(60 * 1024)], now, 0)
        .unwrap();
    assert!(matches!(
        state.send("q", vec![with_property(STANDARD_MAX_HEADER_SIZE)], now, 0),
        Err(Refusal::HeadersTooLarge {
            max: STANDARD_MAX_HEADER_SIZE,
            ..
        })
    ));
    assert_eq!(state.active_count("q").unwrap(), 2);
}

fn with_id(id: &str) -> Msg {
    let mut message = data(b"x");
    message.properties = Some(fe2o3_amqp_types::messaging::Properties {
        message_id: Some(id.to_owned().into()),
        ..Default::default()
    });
    message
}

#[test]
fn duplicate_detection_drops_repeated_ids_inside_the_window_only() {
    let mut state = State::default();
    state
        .create_queue(
            "q",
            &QueueOptions::default().with_duplicate_detection(Duration::from_secs(10)),
        )
        .unwrap();
    let start = Instant::now();
    state
        .send("q", vec![with_id("a"), with_id("a")], start, 0)
        .unwrap();
    state.send("q", vec![with_id("b")], start, 0).unwrap();
    assert_eq!(state.active_count("q").unwrap(), 2);
    let later = start + Duration::from_secs(10);
    state.send("q", vec![with_id("a")], later, 0).unwrap();
    assert_eq!(state.active_count("q").unwrap(), 3, "window has passed");
}

#[test]
fn scheduled_topic_messages_fan_out_when_due() {
    let mut state = State::default();
    state
        .create_queue("inbox", &QueueOptions::default())
        .unwrap();
    state.create_topic("t", &TopicOptions::default()).unwrap();
    state
        .create_subscription("t", "a", &SubscriptionOptions::default())
        .unwrap();
    state
        .create_subscription(
            "t",
            "fwd",
            &SubscriptionOptions::default().with_forward_to("inbox"),
        )
        .unwrap();
    let start = Instant::now();
    let mut message = data(b"x");
    set_annotation(
        &mut message,
        SCHEDULED_ENQUEUE_TIME,
        Value::Timestamp(Timestamp::from_milliseconds(1_000)),
    );
    let numbers = state.send("t", vec![message], start, 0).unwrap();
    assert_eq!(state.scheduled_count("t").unwrap(), 1);
    assert_eq!(state.active_count("t/Subscriptions/a").unwrap(), 0);
    assert_eq!(state.next_deadline(), Some(start + Duration::from_secs(1)));
    assert!(state.process_due(start + Duration::from_secs(1), 1_000));
    assert_eq!(state.active_count("t/subscriptions/A").unwrap(), 1);
    assert_eq!(state.active_count("inbox").unwrap(), 1);
    assert!(
        !state.is_scheduled("t", numbers[0]),
        "already enqueued: no longer cancellable"
    );
}

#[test]
fn invalid_configuration_names_the_field() {
    let mut state = State::default();
    let error = state
        .create_queue("q", &QueueOptions::default().with_max_delivery_count(0))
        .unwrap_err();
    assert!(error.to_string().contains("max_delivery_count"), "{error}");
    let error = state
        .create_queue("a/b", &QueueOptions::default())
        .unwrap_err();
    assert!(matches!(error, Error::InvalidConfiguration(_)));
    state.create_queue("q", &QueueOptions::default()).unwrap();
    assert!(matches!(
        state.create_queue("Q", &QueueOptions::default()),
        Err(Error::EntityExists(_))
    ));
}
