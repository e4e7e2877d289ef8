//! Request/reply with partners that speak plain AMQP (seed system 3): redeliver's requester
//! against a responder written with raw `lapin` only, and a raw `lapin` requester against
//! redeliver's responder, on the real broker.
//!
//! Both sides use a transport prefix, so a reply-to that named the endpoint instead of its queue
//! would go nowhere. Without a broker every test says so on stderr and skips, unless
//! `REDELIVER_REQUIRE_BROKERS=1`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicRejectOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use redeliver_core::request_reply::{
    APP_ID, MISSING_CORRELATION_ID, RequestOptions, Requester, StatusEnvelope, StatusMessage,
    UNKNOWN_CORRELATION_ID, reply_to,
};
use redeliver_core::{ConsumeOptions, Context, Outcome, Source, Topology, Worker};
use serde::{Deserialize, Serialize};
use serde_json::json;

use common::{Fixture, bounded, raw_connection};

/// How long a plain client waits for a reply in these tests.
const REPLY_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
struct QuoteRequest {
    case: String,
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Quote {
    price: u32,
}

/// The envelope with every optional field of the contract.
fn full_envelope() -> serde_json::Value {
    json!({
        "statusCode": 422,
        "statusMessage": "Unprocessable",
        "httpStatus": 400,
        "messages": [{
            "key": "vat",
            "severity": "error",
            "status": "INVALID",
            "text": "bad VAT number",
            "timestamp": "2026-12-01T10:00:00Z"
        }],
        "price": 0
    })
}

/// The envelope with only the required fields (and a detail with only its required fields).
fn minimal_envelope() -> serde_json::Value {
    json!({
        "statusCode": 200,
        "statusMessage": "OK",
        "messages": [{"key": "vat", "severity": "info"}],
        "price": 12
    })
}

fn text(value: &Option<ShortString>) -> Option<&str> {
    value.as_ref().map(ShortString::as_str)
}

/// A UUID in its usual text form: 8-4-4-4-12 hexadecimal digits.
fn is_uuid(value: &str) -> bool {
    let groups: Vec<&str> = value.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Publishes `body` the way a plain AMQP client does: default exchange, routing key = queue.
async fn publish_plain(channel: &Channel, queue: &str, body: &[u8], properties: BasicProperties) {
    bounded(&format!("publishing to `{queue}`"), async {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("the broker takes it")
    })
    .await;
}

/// The next delivery on `replies`, or `None` if none comes `within`.
async fn next_reply(
    replies: &mut lapin::Consumer,
    within: Duration,
) -> Option<lapin::message::Delivery> {
    match tokio::time::timeout(within, replies.next()).await {
        Ok(Some(delivery)) => Some(delivery.expect("a reply")),
        Ok(None) => panic!("the reply consumer ended"),
        Err(_) => None,
    }
}

/// What the plain responder saw of one request.
#[derive(Clone, Debug)]
struct SeenRequest {
    case: String,
    reply_to: Option<String>,
    correlation_id: Option<String>,
    app_id: Option<String>,
    content_type: Option<String>,
    delivery_mode: Option<u8>,
    header_keys: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_requester_against_a_plain_amqp_responder() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("quotes").endpoint("replies"))
        .await;
    let transport = fx.transport();
    let requester = Requester::start(
        Arc::clone(&transport),
        "replies",
        RequestOptions::default()
            .with_timeout(Duration::from_secs(2))
            .with_attempts(2)
            .with_app_id("web-shop")
            .with_unknown_replies(2, Duration::from_secs(1)),
    )
    .await
    .expect("start the requester");

    // The responder: raw lapin, nothing of redeliver. It publishes each reply to the default
    // exchange with the request's `reply_to` as routing key and copies `correlation_id`.
    // Case "late": it answers the first try only after the second, so the first answer is a
    // stray reply by then.
    let connection = raw_connection().await;
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirms");
    let mut consumer = channel
        .basic_consume(
            fx.transport.queue_name("quotes").as_str().into(),
            "plain-responder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume the request queue");
    let seen: Arc<Mutex<Vec<SeenRequest>>> = Arc::default();
    let responder = tokio::spawn({
        let seen = Arc::clone(&seen);
        let channel = channel.clone();
        async move {
            let mut held: Option<BasicProperties> = None;
            while let Some(delivery) = consumer.next().await {
                let delivery = delivery.expect("a delivery");
                let request: QuoteRequest =
                    serde_json::from_slice(&delivery.data).expect("a JSON request");
                let props = delivery.properties.clone();
                seen.lock().unwrap().push(SeenRequest {
                    case: request.case.clone(),
                    reply_to: text(props.reply_to()).map(str::to_owned),
                    correlation_id: text(props.correlation_id()).map(str::to_owned),
                    app_id: text(props.app_id()).map(str::to_owned),
                    content_type: text(props.content_type()).map(str::to_owned),
                    delivery_mode: *props.delivery_mode(),
                    header_keys: props
                        .headers()
                        .as_ref()
                        .map(|h| h.inner().keys().map(|k| k.as_str().to_owned()).collect())
                        .unwrap_or_default(),
                });
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("ack");
                let reply = |props: &BasicProperties, body: serde_json::Value| {
                    let channel = channel.clone();
                    let queue = text(props.reply_to()).unwrap_or("").to_owned();
                    let mut reply_props =
                        BasicProperties::default().with_content_type("application/json".into());
                    if let Some(id) = props.correlation_id() {
                        reply_props = reply_props.with_correlation_id(id.clone());
                    }
                    async move {
                        let body = serde_json::to_vec(&body).unwrap();
                        publish_plain(&channel, &queue, &body, reply_props).await;
                    }
                };
                match request.case.as_str() {
                    "full" => reply(&props, full_envelope()).await,
                    "minimal" => reply(&props, minimal_envelope()).await,
                    "late" => match held.take() {
                        None => held = Some(props),
                        Some(first) => {
                            reply(&props, minimal_envelope()).await;
                            reply(&first, full_envelope()).await;
                        }
                    },
                    other => panic!("unexpected case {other}"),
                }
            }
        }
    });

    let request = |case: &str| QuoteRequest {
        case: case.to_owned(),
    };
    // Every optional field of the envelope arrives.
    let full: StatusEnvelope<Quote> = requester
        .request("quotes", &request("full"))
        .await
        .expect("a reply with every optional field");
    assert_eq!(full.status_code, 422);
    assert_eq!(full.status_message, "Unprocessable");
    assert_eq!(full.http_status, Some(400));
    assert_eq!(
        full.messages,
        Some(vec![
            StatusMessage::new("vat", "error")
                .with_status("INVALID")
                .with_text("bad VAT number")
                .with_timestamp("2026-12-01T10:00:00Z")
        ])
    );
    assert_eq!(full.body, Quote { price: 0 });
    // Only the required fields: still a reply, not an error.
    let minimal: StatusEnvelope<Quote> = requester
        .request("quotes", &request("minimal"))
        .await
        .expect("a reply with only the required fields");
    assert!(minimal.is_success());
    assert_eq!(minimal.http_status, None);
    assert_eq!(
        minimal.messages,
        Some(vec![StatusMessage::new("vat", "info")])
    );
    assert_eq!(minimal.body, Quote { price: 12 });
    // The first try times out; the second is answered; the first's answer comes after it.
    let late: StatusEnvelope<Quote> = requester
        .request("quotes", &request("late"))
        .await
        .expect("the second try is answered");
    assert_eq!(late.body, Quote { price: 12 });

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().map(|s| s.case.as_str()).collect::<Vec<_>>(),
        ["full", "minimal", "late", "late"]
    );
    let reply_queue = fx.transport.queue_name("replies");
    assert_ne!(reply_queue, "replies", "the test runs with a prefix");
    for s in &seen {
        // The properties a plain client reads, where it reads them.
        assert_eq!(s.reply_to.as_deref(), Some(reply_queue.as_str()), "{s:?}");
        assert!(s.correlation_id.as_deref().is_some_and(is_uuid), "{s:?}");
        assert_eq!(s.app_id.as_deref(), Some("web-shop"), "{s:?}");
        assert_eq!(s.content_type.as_deref(), Some("application/json"), "{s:?}");
        assert_eq!(s.delivery_mode, Some(2), "{s:?}");
        assert!(!s.header_keys.iter().any(|k| k == APP_ID), "{s:?}");
    }
    let ids: std::collections::BTreeSet<_> =
        seen.iter().map(|s| s.correlation_id.clone()).collect();
    assert_eq!(ids.len(), 4, "every try has its own correlation id");

    // The stray answer to the first "late" try, and a reply without any correlation id, end in
    // the reply endpoint's dead letters with their reasons.
    publish_plain(
        &channel,
        &reply_queue,
        br#"{"statusCode":200,"statusMessage":"OK"}"#,
        BasicProperties::default().with_content_type("application/json".into()),
    )
    .await;
    let mut dead = transport
        .consume(&Source::dead_letters("replies"), ConsumeOptions::default())
        .await
        .expect("consume the reply dead letters");
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let delivery = bounded("a dead-lettered reply", dead.next())
            .await
            .expect("the stream goes on")
            .expect("a delivery");
        let message = delivery.message().clone();
        delivery.complete().await.expect("complete");
        let reason = message.dead_letter().expect("a reason").reason.clone();
        reasons.push((reason, message.correlation_id().map(str::to_owned)));
    }
    reasons.sort();
    let first_late = seen[2].correlation_id.clone();
    assert_eq!(
        reasons,
        [
            (MISSING_CORRELATION_ID.to_owned(), None),
            (UNKNOWN_CORRELATION_ID.to_owned(), first_late),
        ]
    );
    drop(dead);
    requester.shutdown().await;
    responder.abort();
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_amqp_requester_against_the_redeliver_responder() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("quotes")).await;
    let transport = fx.transport();

    // The responder: redeliver's worker answering with `request_reply::reply_to`. Case "late":
    // the first try is answered only after the second has been.
    // The app id and reply-to each request showed the handler.
    type Seen = Vec<(Option<String>, Option<String>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let (second_answered, _) = tokio::sync::watch::channel(false);
    let second_answered = Arc::new(second_answered);
    let late_tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let responder = Worker::builder(Arc::clone(&transport), "quotes")
        .concurrency(2)
        .start({
            let (transport, seen) = (Arc::clone(&transport), Arc::clone(&seen));
            move |request: QuoteRequest, ctx: Context| {
                let (transport, seen) = (Arc::clone(&transport), Arc::clone(&seen));
                let (second_answered, late_tries) =
                    (Arc::clone(&second_answered), Arc::clone(&late_tries));
                async move {
                    seen.lock().unwrap().push((
                        ctx.headers().get(APP_ID).map(str::to_owned),
                        ctx.reply_to().map(str::to_owned),
                    ));
                    let envelope = match request.case.as_str() {
                        "full" => StatusEnvelope::new(422, "Unprocessable", Quote { price: 0 })
                            .with_http_status(400)
                            .with_message(
                                StatusMessage::new("vat", "error")
                                    .with_status("INVALID")
                                    .with_text("bad VAT number")
                                    .with_timestamp("2026-12-01T10:00:00Z"),
                            ),
                        _ => StatusEnvelope::new(200, "OK", Quote { price: 12 })
                            .with_message(StatusMessage::new("vat", "info")),
                    };
                    let first_late = request.case == "late"
                        && late_tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
                    if first_late {
                        let mut answered = second_answered.subscribe();
                        let _ = answered.wait_for(|answered| *answered).await;
                    }
                    let (endpoint, reply) = match reply_to(&ctx, &envelope) {
                        Ok(reply) => reply,
                        Err(e) => return Outcome::dead_letter(e.to_string()),
                    };
                    if let Err(e) = transport.send(&endpoint, reply).await {
                        return Outcome::retry(e.to_string());
                    }
                    if request.case == "late" && !first_late {
                        second_answered.send_replace(true);
                    }
                    Outcome::success()
                }
            }
        })
        .await
        .expect("start the responder");

    // The requester: raw lapin, with a broker-named exclusive reply queue (`amq.gen-*`), as
    // RabbitMQ's own RPC tutorial does it.
    let connection = raw_connection().await;
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirms");
    let reply_queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("a server-named reply queue")
        .name()
        .as_str()
        .to_owned();
    assert!(reply_queue.starts_with("amq.gen-"), "{reply_queue}");
    let mut replies = channel
        .basic_consume(
            reply_queue.as_str().into(),
            "plain-requester".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume the reply queue");
    let request_queue = fx.transport.queue_name("quotes");
    let mut try_number = 0;
    let mut send = |case: &str| {
        try_number += 1;
        let correlation_id = format!("00000000-0000-4000-8000-{try_number:012x}");
        let props = BasicProperties::default()
            .with_reply_to(reply_queue.as_str().into())
            .with_correlation_id(correlation_id.as_str().into())
            .with_app_id("plain-client".into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let body = serde_json::to_vec(&json!({ "case": case })).unwrap();
        let (channel, queue) = (channel.clone(), request_queue.clone());
        async move {
            publish_plain(&channel, &queue, &body, props).await;
            correlation_id
        }
    };
    for case in ["full", "minimal"] {
        let correlation_id = send(case).await;
        let reply = next_reply(&mut replies, REPLY_WITHIN)
            .await
            .unwrap_or_else(|| panic!("no reply to `{case}` within {REPLY_WITHIN:?}"));
        let props = &reply.properties;
        assert_eq!(
            text(props.correlation_id()),
            Some(correlation_id.as_str()),
            "{case}"
        );
        assert_eq!(text(props.content_type()), Some("application/json"));
        assert_eq!(props.delivery_mode(), &Some(2));
        let body: serde_json::Value = serde_json::from_slice(&reply.data).expect("JSON");
        let expected = if case == "full" {
            full_envelope()
        } else {
            minimal_envelope()
        };
        assert_eq!(body, expected, "{case}");
        reply.acker.ack(BasicAckOptions::default()).await.unwrap();
    }

    // A time-out and a retry with a new correlation id: the answer to the retry comes first,
    // then the first try's, which the plain client rejects as stray.
    let first = send("late").await;
    assert!(
        next_reply(&mut replies, Duration::from_secs(1))
            .await
            .is_none(),
        "the first try is not answered before the second is sent"
    );
    let second = send("late").await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let reply = next_reply(&mut replies, REPLY_WITHIN)
            .await
            .expect("a reply to each try");
        let id = text(reply.properties.correlation_id()).map(str::to_owned);
        if id.as_deref() == Some(second.as_str()) {
            reply.acker.ack(BasicAckOptions::default()).await.unwrap();
        } else {
            reply
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await
                .unwrap();
        }
        got.push(id);
    }
    assert_eq!(got, [Some(second), Some(first)]);

    responder.shutdown().await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    for (app_id, reply_to) in &seen {
        assert_eq!(app_id.as_deref(), Some("plain-client"));
        assert_eq!(reply_to.as_deref(), Some(reply_queue.as_str()));
    }
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_requester_on_direct_reply_to_gets_its_answer() {
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("quotes")).await;
    let transport = fx.transport();
    let responder = Worker::builder(Arc::clone(&transport), "quotes")
        .start({
            let transport = Arc::clone(&transport);
            move |_: QuoteRequest, ctx: Context| {
                let transport = Arc::clone(&transport);
                async move {
                    let envelope = StatusEnvelope::new(200, "OK", Quote { price: 12 });
                    let (endpoint, reply) = match reply_to(&ctx, &envelope) {
                        Ok(reply) => reply,
                        Err(e) => return Outcome::dead_letter(e.to_string()),
                    };
                    match transport.send(&endpoint, reply).await {
                        Ok(()) => Outcome::success(),
                        Err(e) => Outcome::retry(e.to_string()),
                    }
                }
            }
        })
        .await
        .expect("start the responder");

    // RabbitMQ's direct reply-to: consume the pseudo-queue without acks, publish the request on
    // the same channel with `reply_to = amq.rabbitmq.reply-to`.
    let connection = raw_connection().await;
    let channel = connection.create_channel().await.expect("a channel");
    let mut replies = channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "plain-requester".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume direct reply-to");
    let correlation_id = "00000000-0000-4000-8000-00000000d1c7";
    let props = BasicProperties::default()
        .with_reply_to("amq.rabbitmq.reply-to".into())
        .with_correlation_id(correlation_id.into())
        .with_content_type("application/json".into());
    channel
        .basic_publish(
            "".into(),
            fx.transport.queue_name("quotes").as_str().into(),
            BasicPublishOptions::default(),
            br#"{"case":"direct"}"#,
            props,
        )
        .await
        .expect("publish the request");
    let reply = next_reply(&mut replies, REPLY_WITHIN)
        .await
        .unwrap_or_else(|| panic!("no reply on direct reply-to within {REPLY_WITHIN:?}"));
    assert_eq!(
        text(reply.properties.correlation_id()),
        Some(correlation_id)
    );
    let body: serde_json::Value = serde_json::from_slice(&reply.data).expect("JSON");
    assert_eq!(
        body,
        json!({"statusCode": 200, "statusMessage": "OK", "price": 12})
    );
    responder.shutdown().await;
    let _ = connection.close(200, "done".into()).await;
}
