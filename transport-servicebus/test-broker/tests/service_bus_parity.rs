//! Wire details in which the broker behaves as Service Bus does, because Microsoft's SDKs
//! (Python, .NET) depend on them; driven by `fe2o3-amqp` directly so that the frames are
//! visible. The Python SDK itself is driven by `compat/python/run.sh`.
#![allow(missing_docs)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::ReceiverAttachError;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition};
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, FilterSet, Message, Outcome, Properties, Source,
};
use fe2o3_amqp::types::primitives::{Array, Binary, OrderedMap, SimpleValue, Symbol};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use redeliver_servicebus_testbroker::{BrokerHandle, BrokerOptions, QueueOptions, start};
use serde_amqp::Value;

const PROMPT: Duration = Duration::from_secs(10);

async fn broker_on_ephemeral_port() -> BrokerHandle {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    start(BrokerOptions::default().with_address(address))
        .await
        .expect("broker starts")
}

async fn connect(broker: &BrokerHandle) -> (ConnectionHandle<()>, SessionHandle<()>) {
    // User and password in the URL make fe2o3-amqp authenticate with SASL PLAIN.
    let url = format!("amqp://user:secret@{}", broker.address());
    let mut connection = Connection::open("parity-test", url.as_str())
        .await
        .expect("connection opens");
    let session = Session::begin(&mut connection)
        .await
        .expect("session begins");
    (connection, session)
}

fn data(body: &[u8]) -> Message<Body<Value>> {
    Message::builder()
        .body(Body::Data(
            vec![fe2o3_amqp::types::messaging::Data(Binary::from(
                body.to_vec(),
            ))]
            .into(),
        ))
        .build()
}

fn lock_token(message: &Message<Body<Value>>) -> [u8; 16] {
    let annotations = message.delivery_annotations.as_ref().expect("annotations");
    match annotations
        .0
        .get(&OwnedKey::Symbol(Symbol::from("x-opt-lock-token")))
    {
        Some(Value::Uuid(uuid)) => *uuid.as_inner(),
        other => panic!("x-opt-lock-token: {other:?}"),
    }
}

fn request(operation: &str, reply_to: Option<&str>, body: Value) -> Message<AmqpValue<Value>> {
    let mut properties = ApplicationProperties::default();
    properties
        .0
        .insert("operation".into(), SimpleValue::String(operation.into()));
    Message::builder()
        .properties(Properties {
            message_id: Some(1u64.into()),
            reply_to: reply_to.map(Into::into),
            ..Properties::default()
        })
        .application_properties(properties)
        .value(body)
        .build()
}

fn property<'a>(message: &'a Message<Body<Value>>, key: &str) -> Option<&'a SimpleValue> {
    message.application_properties.as_ref()?.0.get(key)
}

async fn next(receiver: &mut Receiver) -> fe2o3_amqp::link::delivery::Delivery<Body<Value>> {
    let delivery = tokio::time::timeout(PROMPT, receiver.recv::<Body<Value>>())
        .await
        .expect("a delivery in time")
        .expect("a delivery");
    receiver.accept(&delivery).await.expect("accepted");
    delivery
}

#[tokio::test]
async fn the_delivery_tag_is_the_lock_token_in_dotnet_guid_order() {
    let broker = broker_on_ephemeral_port().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let (mut connection, mut session) = connect(&broker).await;
    let mut sender = Sender::attach(&mut session, "s", "q").await.unwrap();
    let mut receiver = Receiver::attach(&mut session, "r", "q").await.unwrap();

    for body in [b"one".as_slice(), b"two".as_slice()] {
        sender.send(data(body)).await.unwrap();
        let delivery = tokio::time::timeout(PROMPT, receiver.recv::<Body<Value>>())
            .await
            .unwrap()
            .unwrap();
        let token = lock_token(delivery.message());
        let mut expected = token;
        expected[0..4].reverse();
        expected[4..6].reverse();
        expected[6..8].reverse();
        assert_eq!(delivery.delivery_tag().as_slice(), expected.as_slice());
        receiver.accept(&delivery).await.unwrap();
    }
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("q").unwrap() == 0)
            .await,
        "both settled by delivery id despite the rewritten tags"
    );
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    session.end().await.unwrap();
    connection.close().await.unwrap();
}

#[tokio::test]
async fn put_token_without_reply_to_is_answered_on_the_cbs_link_with_cbs_status_names() {
    let broker = broker_on_ephemeral_port().await;
    let (mut connection, mut session) = connect(&broker).await;
    let mut requests = Sender::attach(&mut session, "cbs-s", "$cbs").await.unwrap();
    // As the Python and .NET SDKs do: the reply link targets `$cbs` itself.
    let mut replies = Receiver::builder()
        .name("cbs-r")
        .source("$cbs")
        .target("$cbs")
        .attach(&mut session)
        .await
        .unwrap();

    let token = request("put-token", None, Value::String("any".into()));
    assert!(matches!(
        requests.send(token).await.unwrap(),
        Outcome::Accepted(_)
    ));
    let reply = next(&mut replies).await;
    let reply = reply.message();
    assert_eq!(property(reply, "status-code"), Some(&SimpleValue::Int(202)));
    assert!(matches!(
        property(reply, "status-description"),
        Some(SimpleValue::String(_))
    ));
    assert_eq!(property(reply, "statusCode"), None, "CBS names only");
    session.end().await.unwrap();
    connection.close().await.unwrap();
}

#[tokio::test]
async fn a_session_receiver_on_an_entity_without_sessions_is_refused() {
    let broker = broker_on_ephemeral_port().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let (mut connection, mut session) = connect(&broker).await;
    let mut filter = FilterSet::new();
    filter.insert(
        Symbol::from("com.microsoft:session-filter"),
        Value::String("s1".into()),
    );
    let source = Source::builder().address("q").filter(filter).build();
    let attached = Receiver::builder()
        .name("session-r")
        .source(source)
        .attach(&mut session)
        .await;
    match attached {
        Err(ReceiverAttachError::RemoteClosedWithError(error)) => {
            assert_eq!(
                error.condition,
                ErrorCondition::AmqpError(AmqpError::NotAllowed)
            );
        }
        other => panic!("expected not-allowed, got {other:?}"),
    }
    session.end().await.unwrap();
    connection.close().await.unwrap();
}

#[tokio::test]
async fn dead_lettering_a_dead_letter_is_refused_and_keeps_it() {
    let broker = broker_on_ephemeral_port().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let (mut connection, mut session) = connect(&broker).await;
    let mut sender = Sender::attach(&mut session, "s", "q").await.unwrap();
    sender.send(data(b"x")).await.unwrap();
    let mut receiver = Receiver::attach(&mut session, "r", "q").await.unwrap();
    let first = tokio::time::timeout(PROMPT, receiver.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    let mut info = OrderedMap::new();
    info.insert(
        Symbol::from("DeadLetterReason"),
        Value::String("first".into()),
    );
    receiver
        .reject(
            &first,
            fe2o3_amqp::types::definitions::Error::new(
                ErrorCondition::Custom(Symbol::from("com.microsoft:dead-letter")),
                None,
                Some(info),
            ),
        )
        .await
        .unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letters("q").unwrap().len() == 1)
            .await
    );

    let mut dead_letters = Receiver::attach(&mut session, "dlq", "q/$DeadLetterQueue")
        .await
        .unwrap();
    let letter = tokio::time::timeout(PROMPT, dead_letters.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    let token = lock_token(letter.message());

    // Dead-letter it again through the management node: refused, nothing changes.
    let mut requests = Sender::attach(&mut session, "m-s", "q/$DeadLetterQueue/$management")
        .await
        .unwrap();
    let mut replies = Receiver::builder()
        .name("m-r")
        .source("q/$DeadLetterQueue/$management")
        .target("m-client")
        .attach(&mut session)
        .await
        .unwrap();
    let mut body = OrderedMap::new();
    body.insert(
        Value::String("lock-tokens".into()),
        Value::Array(Array(vec![Value::Uuid(token.into())])),
    );
    body.insert(
        Value::String("disposition-status".into()),
        Value::String("suspended".into()),
    );
    body.insert(
        Value::String("deadletter-reason".into()),
        Value::String("second".into()),
    );
    let update = request(
        "com.microsoft:update-disposition",
        Some("m-client"),
        Value::Map(body),
    );
    requests.send(update).await.unwrap();
    let reply = next(&mut replies).await;
    assert_eq!(
        property(reply.message(), "statusCode"),
        Some(&SimpleValue::Int(400))
    );
    let letters = broker.dead_letters("q").unwrap();
    assert_eq!(letters.len(), 1, "still in the dead-letter queue");
    assert_eq!(letters[0].reason.as_deref(), Some("first"));

    // The lock is kept: completing works.
    dead_letters.accept(&letter).await.unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.dead_letters("q").unwrap().is_empty())
            .await
    );
    session.end().await.unwrap();
    connection.close().await.unwrap();
}

#[tokio::test]
async fn a_reply_link_without_target_address_is_found_by_its_name() {
    let broker = broker_on_ephemeral_port().await;
    let (mut connection, mut session) = connect(&broker).await;
    let mut requests = Sender::attach(&mut session, "cbs-s", "$cbs").await.unwrap();
    // As the JavaScript SDK does: `reply-to` is the reply link's name, its target has no
    // address.
    let mut replies = Receiver::builder()
        .name("cbs-reply-7")
        .source("$cbs")
        .attach(&mut session)
        .await
        .expect("a reply link without target address attaches");

    let token = request(
        "put-token",
        Some("cbs-reply-7"),
        Value::String("any".into()),
    );
    requests.send(token).await.unwrap();
    let reply = next(&mut replies).await;
    assert_eq!(
        property(reply.message(), "status-code"),
        Some(&SimpleValue::Int(202))
    );
    session.end().await.unwrap();
    connection.close().await.unwrap();
}

#[tokio::test]
async fn a_message_sent_without_message_id_gets_one() {
    let broker = broker_on_ephemeral_port().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let (mut connection, mut session) = connect(&broker).await;
    let mut sender = Sender::attach(&mut session, "s", "q").await.unwrap();
    sender.send(data(b"no id")).await.unwrap();
    let mut receiver = Receiver::attach(&mut session, "r", "q").await.unwrap();
    let delivery = next(&mut receiver).await;
    let id = delivery
        .message()
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone());
    match id {
        // A GUID without dashes, as Service Bus assigns.
        Some(fe2o3_amqp::types::messaging::MessageId::String(id)) => {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
        other => panic!("message id {other:?}"),
    }
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    session.end().await.unwrap();
    connection.close().await.unwrap();
}

#[tokio::test]
async fn a_message_larger_than_the_clients_frames_arrives_whole_with_its_lock_token_tag() {
    let broker = broker_on_ephemeral_port().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let url = format!("amqp://user:secret@{}", broker.address());
    // Small frames: the broker splits the transfer, and its first frame carries the longer tag.
    let mut connection = Connection::builder()
        .container_id("small-frames")
        .max_frame_size(1024)
        .open(url.as_str())
        .await
        .expect("connection opens");
    let mut session = Session::begin(&mut connection).await.unwrap();
    let body: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let mut sender = Sender::attach(&mut session, "s", "q").await.unwrap();
    sender.send(data(&body)).await.unwrap();
    let mut receiver = Receiver::attach(&mut session, "r", "q").await.unwrap();
    let delivery = tokio::time::timeout(PROMPT, receiver.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    let Body::Data(sections) = &delivery.message().body else {
        panic!("a data body");
    };
    let received: Vec<u8> = sections.iter().flat_map(|d| d.0.to_vec()).collect();
    assert_eq!(received, body);
    assert_eq!(delivery.delivery_tag().len(), 16);
    receiver.accept(&delivery).await.unwrap();
    assert!(
        broker
            .wait_until(PROMPT, |b| b.active_message_count("q").unwrap() == 0)
            .await
    );
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    session.end().await.unwrap();
    connection.close().await.unwrap();
}

/// After a drain, credit counts from the delivery count the drain's answer carries, as AMQP
/// defines it and as Microsoft's AMQP library counts it: credit granted before the answer
/// arrived names a delivery limit the drain has used up, and is worth nothing. A client that
/// grants credit right after draining (`fe2o3-amqp`'s receiver lets it) waits until it grants
/// again; this is what made the benchmark's scheduled messages a whole receive wait late.
#[tokio::test]
async fn credit_granted_before_a_drain_is_answered_counts_from_the_old_delivery_count() {
    use fe2o3_amqp::link::receiver::CreditMode;

    let broker = broker_on_ephemeral_port().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let (mut connection, mut session) = connect(&broker).await;
    let mut sender = Sender::attach(&mut session, "s", "q").await.unwrap();
    let mut receiver = Receiver::builder()
        .name("r")
        .source("q")
        .credit_mode(CreditMode::Manual)
        .attach(&mut session)
        .await
        .unwrap();

    receiver.set_credit(5).await.unwrap();
    receiver.drain().await.unwrap();
    // On this test's single thread, neither the broker nor the client's session has run since
    // the drain: this credit carries the delivery count from before the drain's answer.
    receiver.set_credit(1).await.unwrap();
    sender.send(data(b"waits")).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), receiver.recv::<Body<Value>>());
    assert!(early.await.is_err(), "no credit: nothing is delivered");

    // Granted again after the answer arrived, it counts.
    receiver.set_credit(1).await.unwrap();
    let delivery = tokio::time::timeout(PROMPT, receiver.recv::<Body<Value>>())
        .await
        .expect("delivered once credit counts")
        .unwrap();
    receiver.accept(&delivery).await.unwrap();
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    session.end().await.unwrap();
    connection.close().await.unwrap();
}
