//! The broker driven by `fe2o3-amqp` directly: exact wire types, SASL PLAIN, explicit
//! addresses, refused attaches and the management request/response contract.
#![allow(missing_docs)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{ReceiverAttachError, SenderAttachError};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition};
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Data, Message, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, OrderedMap, SimpleValue, Symbol};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use redeliver_servicebus_testbroker::{BrokerHandle, BrokerOptions, QueueOptions, start};
use serde_amqp::Value;

const PROMPT: Duration = Duration::from_secs(10);

/// A broker on an ephemeral port of 127.0.0.1: clients that honour ports need no 5672.
async fn broker_on_ephemeral_port() -> BrokerHandle {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    start(BrokerOptions::default().with_address(address))
        .await
        .expect("broker starts")
}

async fn connect(broker: &BrokerHandle) -> (ConnectionHandle<()>, SessionHandle<()>) {
    // User and password in the URL make fe2o3-amqp authenticate with SASL PLAIN.
    let url = format!("amqp://user:secret@{}", broker.address());
    let mut connection = Connection::open("fe2o3-test", url.as_str())
        .await
        .expect("connection opens");
    let session = Session::begin(&mut connection)
        .await
        .expect("session begins");
    (connection, session)
}

fn annotation<'a>(message: &'a Message<Body<Value>>, key: &str) -> Option<&'a Value> {
    message
        .message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key)))
}

#[tokio::test]
async fn deliveries_carry_exactly_typed_service_bus_annotations() {
    let broker = broker_on_ephemeral_port().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let (mut connection, mut session) = connect(&broker).await;

    let mut sender = Sender::attach(&mut session, "s", "q").await.unwrap();
    let outcome = sender
        .send(
            Message::builder()
                .data(Binary::from(b"hi".to_vec()))
                .build(),
        )
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)));

    let mut receiver = Receiver::attach(&mut session, "r", "amqp://whatever/Q")
        .await
        .unwrap();
    let delivery = tokio::time::timeout(PROMPT, receiver.recv::<Body<Value>>())
        .await
        .expect("delivery in time")
        .unwrap();
    let message = delivery.message();
    let lock_token = message
        .delivery_annotations
        .as_ref()
        .and_then(|a| a.0.get(&OwnedKey::Symbol(Symbol::from("x-opt-lock-token"))));
    assert!(matches!(lock_token, Some(Value::Uuid(_))), "{lock_token:?}");
    assert!(matches!(
        annotation(message, "x-opt-locked-until"),
        Some(Value::Timestamp(_))
    ));
    assert!(matches!(
        annotation(message, "x-opt-sequence-number"),
        Some(Value::Long(_))
    ));
    assert!(matches!(
        annotation(message, "x-opt-enqueued-time"),
        Some(Value::Timestamp(_))
    ));
    assert_eq!(message.header.as_ref().map(|h| h.delivery_count), Some(0));
    assert!(
        matches!(&message.body, Body::Data(data) if data[0] == Data(Binary::from(b"hi".to_vec())))
    );

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

#[tokio::test]
async fn attaching_to_an_unknown_entity_fails_with_not_found() {
    let broker = broker_on_ephemeral_port().await;
    let (mut connection, mut session) = connect(&broker).await;

    match Sender::attach(&mut session, "s", "missing").await {
        Err(SenderAttachError::RemoteClosedWithError(error)) => {
            assert_eq!(
                error.condition,
                ErrorCondition::AmqpError(AmqpError::NotFound)
            );
        }
        other => panic!("expected not-found, got {other:?}"),
    }
    match Receiver::attach(&mut session, "r", "missing/$DeadLetterQueue").await {
        Err(ReceiverAttachError::RemoteClosedWithError(error)) => {
            assert_eq!(
                error.condition,
                ErrorCondition::AmqpError(AmqpError::NotFound)
            );
        }
        other => panic!("expected not-found, got {other:?}"),
    }
    // The session survives refused attaches.
    broker
        .create_queue("late", QueueOptions::default())
        .unwrap();
    let sender = Sender::attach(&mut session, "s2", "late").await.unwrap();
    sender.close().await.unwrap();
    session.end().await.unwrap();
    connection.close().await.unwrap();
}

fn request(operation: &str, id: u64, reply_to: &str, body: Value) -> Message<AmqpValue<Value>> {
    let mut properties = ApplicationProperties::default();
    properties
        .0
        .insert("operation".into(), SimpleValue::String(operation.into()));
    Message::builder()
        .properties(Properties {
            message_id: Some(id.into()),
            reply_to: Some(reply_to.into()),
            ..Properties::default()
        })
        .application_properties(properties)
        .value(body)
        .build()
}

/// The status of a reply: `statusCode` (management) or `status-code` (CBS).
fn status(message: &Message<Body<Value>>) -> Option<i32> {
    let properties = &message.application_properties.as_ref()?.0;
    match properties
        .get("statusCode")
        .or_else(|| properties.get("status-code"))?
    {
        SimpleValue::Int(code) => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn management_answers_each_request_once_in_order_on_the_reply_to_link() {
    let broker = broker_on_ephemeral_port().await;
    broker.create_queue("q", QueueOptions::default()).unwrap();
    let (mut connection, mut session) = connect(&broker).await;

    let mut requests = Sender::attach(&mut session, "mgmt-s", "q/$management")
        .await
        .unwrap();
    let mut replies = Receiver::builder()
        .name("mgmt-r")
        .source("q/$management")
        .target("client-node-1")
        .attach(&mut session)
        .await
        .unwrap();
    let mut cbs_requests = Sender::attach(&mut session, "cbs-s", "$cbs").await.unwrap();
    let mut cbs_replies = Receiver::builder()
        .name("cbs-r")
        .source("$cbs")
        .target("cbs-client")
        .attach(&mut session)
        .await
        .unwrap();

    let mut token = request("put-token", 7, "cbs-client", Value::String("any".into()));
    if let Some(ap) = token.application_properties.as_mut() {
        ap.0.insert(
            "type".into(),
            SimpleValue::String("servicebus.windows.net:sastoken".into()),
        );
        ap.0.insert("name".into(), SimpleValue::String("amqp://h/q".into()));
    }
    assert!(matches!(
        cbs_requests.send(token).await.unwrap(),
        Outcome::Accepted(_)
    ));
    let cbs_reply = tokio::time::timeout(PROMPT, cbs_replies.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    cbs_replies.accept(&cbs_reply).await.unwrap();
    assert_eq!(status(cbs_reply.message()), Some(202));

    // An unknown operation and a cancel of a message that is not scheduled, pipelined: two
    // replies, in request order.
    let unknown = request(
        "com.microsoft:no-such-op",
        1,
        "client-node-1",
        Value::Map(OrderedMap::new()),
    );
    let mut cancel_body = OrderedMap::new();
    cancel_body.insert(
        Value::String("sequence-numbers".into()),
        Value::Array(vec![Value::Long(42)].into()),
    );
    let cancel = request(
        "com.microsoft:cancel-scheduled-message",
        2,
        "client-node-1",
        Value::Map(cancel_body),
    );
    let first = requests.send_batchable(unknown).await.unwrap();
    let second = requests.send_batchable(cancel).await.unwrap();
    assert!(matches!(first.await.unwrap(), Outcome::Accepted(_)));
    assert!(matches!(second.await.unwrap(), Outcome::Accepted(_)));

    let mut statuses = Vec::new();
    for _ in 0..2 {
        let reply = tokio::time::timeout(PROMPT, replies.recv::<Body<Value>>())
            .await
            .unwrap()
            .unwrap();
        replies.accept(&reply).await.unwrap();
        let correlation = reply
            .message()
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.clone());
        statuses.push((correlation, status(reply.message())));
    }
    assert_eq!(
        statuses,
        [
            (Some(1u64.into()), Some(501)),
            (Some(2u64.into()), Some(404))
        ]
    );
    // Exactly one reply per request: nothing else arrives.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), replies.recv::<Body<Value>>())
            .await
            .is_err()
    );
    session.end().await.unwrap();
    connection.close().await.unwrap();
}

#[tokio::test]
async fn shutdown_closes_the_listener_and_frees_the_address() {
    let broker = broker_on_ephemeral_port().await;
    let address = broker.address();
    broker.shutdown().await;
    let again = start(BrokerOptions::default().with_address(address)).await;
    assert!(again.is_ok(), "address is free again after shutdown");
}

#[tokio::test]
async fn default_start_listens_on_port_5672_of_a_loopback_address() {
    let broker = start(BrokerOptions::default())
        .await
        .expect("a free loopback address");
    assert_eq!(broker.address().port(), 5672);
    assert!(broker.address().ip().is_loopback());
    assert_eq!(
        broker.connection_string(),
        format!(
            "Endpoint=sb://{}/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true",
            broker.address().ip()
        )
    );
}
