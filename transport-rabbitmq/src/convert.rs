//! Messages to AMQP properties and back.
//!
//! | [`Message`] | AMQP 0-9-1 |
//! |---|---|
//! | id | `message-id` property |
//! | content type | `content-type` property |
//! | correlation id | `correlation-id` property |
//! | reply-to | `reply-to` property: the endpoint's queue name (see below) |
//! | the [`APP_ID`] header | `app-id` property |
//! | subject | `type` property (and the routing key when publishing to a topic) |
//! | headers | `headers` table, as long strings |
//! | attempt, not-before, last failure, dead-letter reason | headers named in [`wire`] |
//!
//! A reply-to endpoint travels as the name of its queue (`{prefix}{endpoint}`), so that a plain
//! AMQP responder can publish its reply to the default exchange with `reply_to` as the routing
//! key; on the way in, a reply-to queue of this transport (one starting with the prefix) becomes
//! its endpoint again. Any other reply-to (a partner's queue, a broker-named `amq.gen-*` queue,
//! direct reply-to) passes through unchanged both ways: see
//! [`RabbitMqTransport::send`](crate::RabbitMqTransport) for how it is answered.
//!
//! Every message is published persistent (delivery mode 2). On the way in, broker history headers
//! (`x-death`, `x-first-death-*`, `x-last-death-*`, `x-delivery-count`, ...) are removed, so
//! handlers see exactly the headers the sender set.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use redeliver_core::request_reply::APP_ID;
use redeliver_core::transport::FrameworkState;
use redeliver_core::{DeadLetterInfo, Error, Headers, Message, MessageId, wire};

use crate::naming::Names;

/// Delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// Why the broker itself dead-lettered a message (quorum `x-delivery-limit`), when the framework
/// did not record a reason.
const BROKER_REASON_PREFIX: &str = "dead-lettered by the broker";

/// The AMQP properties carrying `message` as a plain AMQP client reads them: the reply-to
/// endpoint as its queue name, the [`APP_ID`] header as the `app-id` property.
pub(crate) fn outgoing(names: &Names, message: &Message) -> Result<BasicProperties, Error> {
    let app_id = message.headers().get(APP_ID);
    let reply_queue = message.reply_to().map(|r| destination_queue(names, r));
    if app_id.is_none() && reply_queue.as_deref() == message.reply_to() {
        return properties(message);
    }
    let mut headers = message.headers().clone();
    headers.remove(APP_ID);
    let mut plain = message.clone().with_headers(headers);
    if let Some(queue) = reply_queue {
        plain = plain.with_reply_to(queue);
    }
    let mut props = properties(&plain)?;
    if let Some(app_id) = app_id {
        props = props.with_app_id(short("app id", app_id)?);
    }
    Ok(props)
}

/// The queue an endpoint name (or a reply-to) stands for: the endpoint's queue, or, for a
/// broker-named queue (`amq.`, which no endpoint's queue can be without a prefix), that queue.
pub(crate) fn destination_queue(names: &Names, reply_to: &str) -> String {
    if is_broker_named(reply_to) {
        reply_to.to_owned()
    } else {
        names.endpoint_queue(reply_to)
    }
}

/// Whether `queue` is named by the broker (`amq.gen-*` server-named queues, direct reply-to):
/// clients cannot declare queues starting with `amq.`.
pub(crate) fn is_broker_named(queue: &str) -> bool {
    queue.starts_with("amq.")
}

/// A message rebuilt from a delivery (see [`message`]), with the `app-id` property as the
/// [`APP_ID`] header and a reply-to queue of this transport (starting with `prefix`) as its
/// endpoint.
pub(crate) fn incoming(
    prefix: &str,
    properties: &BasicProperties,
    body: Vec<u8>,
    from_dead_letters: bool,
) -> (Message, Option<String>) {
    let (mut message, problem) = message(properties, body, from_dead_letters);
    if let Some(app_id) = properties.app_id() {
        message = message.with_header(APP_ID, app_id.as_str());
    }
    let endpoint = message
        .reply_to()
        .and_then(|queue| queue.strip_prefix(prefix))
        .filter(|endpoint| !endpoint.is_empty())
        .map(str::to_owned);
    if let Some(endpoint) = endpoint {
        message = message.with_reply_to(endpoint);
    }
    (message, problem)
}

/// The AMQP properties carrying `message`.
pub(crate) fn properties(message: &Message) -> Result<BasicProperties, Error> {
    let mut headers = FieldTable::default();
    for (key, value) in wire::encode_headers(message).iter() {
        headers.insert(
            short("header name", key)?,
            AMQPValue::LongString(value.into()),
        );
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_message_id(short("message id", message.id().as_str())?);
    // Most first sends have no headers at all (see `wire::ATTEMPT`): send no table then.
    if !headers.inner().is_empty() {
        props = props.with_headers(headers);
    }
    if let Some(ct) = message.content_type() {
        props = props.with_content_type(short("content type", ct)?);
    }
    if let Some(id) = message.correlation_id() {
        props = props.with_correlation_id(short("correlation id", id)?);
    }
    if let Some(reply_to) = message.reply_to() {
        props = props.with_reply_to(short("reply-to", reply_to)?);
    }
    if let Some(subject) = message.subject() {
        props = props.with_type(short("subject", subject)?);
    }
    Ok(props)
}

/// A message rebuilt from a delivery's properties and body, with a description of anything
/// malformed in the framework's headers.
pub(crate) fn message(
    properties: &BasicProperties,
    body: Vec<u8>,
    from_dead_letters: bool,
) -> (Message, Option<String>) {
    let mut headers = Headers::new();
    let mut broker_reason = None;
    let mut mistyped = Vec::new();
    if let Some(table) = properties.headers() {
        for (key, value) in table {
            let key = key.as_str();
            if key == "x-first-death-reason" {
                broker_reason = text(value);
            }
            if is_broker_history(key) {
                continue;
            }
            match text(value) {
                Some(value) => {
                    headers.insert(key, value);
                }
                // The framework writes its headers as text: any other type is as unreadable
                // as a malformed text, and ignoring it would run the handler at attempt 1.
                None if key.starts_with(wire::PREFIX) => {
                    mistyped.push(wire::mistyped(key, type_name(value)));
                }
                None => {}
            }
        }
    }
    let id = properties
        .message_id()
        .as_ref()
        .filter(|id| !id.as_str().is_empty())
        .map(|id| MessageId::from(id.as_str()))
        // A message from another producer without an id (or with an empty one): give it one,
        // which its retries keep.
        .unwrap_or_else(MessageId::random);
    let mut message = Message::new(body).with_id(id).with_headers(headers);
    if let Some(ct) = properties.content_type() {
        message = message.with_content_type(ct.as_str());
    }
    if let Some(id) = properties.correlation_id() {
        message = message.with_correlation_id(id.as_str());
    }
    if let Some(reply_to) = properties.reply_to() {
        message = message.with_reply_to(reply_to.as_str());
    }
    if let Some(subject) = properties.kind() {
        message = message.with_subject(subject.as_str());
    }
    let mut decoded = wire::decode_headers(message);
    for problem in mistyped {
        decoded.add_problem(problem);
    }
    let mut message = decoded.message;
    if from_dead_letters && message.dead_letter().is_none() {
        // Put there by the broker (delivery limit), not by the framework: say so.
        if let Some(reason) = broker_reason {
            let description = if reason == "rejected" {
                "the transport rejected the delivery because neither its retry copy nor its \
                 dead-letter copy fit the broker's limits (RabbitMqOptions::with_max_message_size, \
                 frame_max); the broker moved the original here"
            } else {
                "the broker dead-lettered the message itself, for example because the queue's \
                 x-delivery-limit was reached"
            };
            message = message.with_dead_letter(Some(DeadLetterInfo {
                reason: format!("{BROKER_REASON_PREFIX} ({reason})"),
                description: Some(description.to_owned()),
            }));
        }
    }
    (message, decoded.problem)
}

fn is_broker_history(key: &str) -> bool {
    key == "x-death"
        || key.starts_with("x-first-death-")
        || key.starts_with("x-last-death-")
        || key == "x-delivery-count"
        || key == "x-received-from"
}

/// Header values as text; tables and arrays (never set by redeliver) are dropped.
fn text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::DecimalValue(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_)
        | AMQPValue::Void => return None,
    })
}

/// What a header value that [`text`] cannot show is, for problem reports.
fn type_name(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::FieldArray(_) => "an array",
        AMQPValue::FieldTable(_) => "a table",
        AMQPValue::DecimalValue(_) => "a decimal",
        AMQPValue::Void => "no value (void)",
        _ => "a value of another type",
    }
}

/// A short string (at most 255 bytes), or an error naming the field that is too long.
pub(crate) fn short(what: &str, value: &str) -> Result<ShortString, Error> {
    ShortString::try_new(value).map_err(|_| {
        Error::invalid_message(format!(
            "the {what} is {} bytes long; AMQP allows at most 255",
            value.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;

    use super::*;

    #[test]
    fn a_message_survives_the_round_trip() {
        let m = Message::json(&serde_json_value())
            .unwrap()
            .with_header("tenant", "acme")
            .with_correlation_id("c-1")
            .with_reply_to("replies")
            .with_subject("webhook")
            .with_not_before(Utc::now())
            .with_attempt(2)
            .with_last_failure(Some("HTTP 503".into()), Some(Duration::from_secs(4)));
        let props = properties(&m).unwrap();
        assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(
            props.kind().as_ref().map(ShortString::as_str),
            Some("webhook")
        );
        let (back, problem) = message(&props, m.body().to_vec(), false);
        assert_eq!(problem, None);
        // RFC 3339 keeps milliseconds: compare through the wire form.
        assert_eq!(back.id(), m.id());
        assert_eq!(back.attempt(), 2);
        assert_eq!(back.headers(), m.headers());
        assert_eq!(back.correlation_id(), Some("c-1"));
        assert_eq!(back.reply_to(), Some("replies"));
        assert_eq!(back.subject(), Some("webhook"));
        assert_eq!(back.content_type(), m.content_type());
        assert_eq!(back.last_failure(), Some("HTTP 503"));
        assert_eq!(back.last_delay(), Some(Duration::from_secs(4)));
        // Millisecond precision on the wire, never earlier than asked.
        let drift = back.not_before().unwrap() - m.not_before().unwrap();
        assert!(drift >= chrono::TimeDelta::zero(), "{drift}");
        assert!(drift < chrono::TimeDelta::milliseconds(1), "{drift}");
    }

    fn serde_json_value() -> std::collections::BTreeMap<&'static str, u32> {
        [("id", 7)].into_iter().collect()
    }

    #[test]
    fn a_message_without_an_id_or_with_an_empty_one_gets_a_fresh_one() {
        for props in [
            BasicProperties::default(),
            BasicProperties::default().with_message_id("".into()),
        ] {
            let (first, problem) = message(&props, b"{}".to_vec(), false);
            assert_eq!(problem, None);
            let (second, _) = message(&props, b"{}".to_vec(), false);
            assert!(!first.id().as_str().is_empty(), "{props:?}");
            assert_ne!(
                first.id(),
                second.id(),
                "each delivery is a message of its own"
            );
        }
    }

    #[test]
    fn broker_history_is_not_shown_to_handlers() {
        let mut table = FieldTable::default();
        table.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        table.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        table.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        table.insert("retries".into(), AMQPValue::LongInt(2));
        let props = BasicProperties::default().with_headers(table);
        let (m, problem) = message(&props, b"{}".to_vec(), false);
        assert_eq!(problem, None);
        let keys: Vec<&str> = m.headers().iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["retries", "tenant"]);
        assert_eq!(m.attempt(), 1);
        assert!(m.dead_letter().is_none());
        // On the dead letters, the broker's own reason is kept as the dead-letter reason.
        let (dead, _) = message(&props, b"{}".to_vec(), true);
        let info = dead.dead_letter().unwrap();
        assert!(info.reason.contains("delivery_limit"), "{info:?}");
    }

    #[test]
    fn malformed_framework_headers_are_reported() {
        let mut table = FieldTable::default();
        table.insert(wire::ATTEMPT.into(), AMQPValue::LongString("many".into()));
        let props = BasicProperties::default().with_headers(table);
        let (_, problem) = message(&props, Vec::new(), false);
        assert!(problem.unwrap().contains(wire::ATTEMPT));
    }

    #[test]
    fn reply_to_is_a_queue_name_and_the_app_id_a_property() {
        let names = Names::new(&crate::RabbitMqOptions::default().with_prefix("billing."));
        let request = Message::json(&serde_json_value())
            .unwrap()
            .with_reply_to("replies")
            .with_correlation_id("c-1")
            .with_header(APP_ID, "web-shop")
            .with_header("tenant", "acme");
        let props = outgoing(&names, &request).unwrap();
        let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
        assert_eq!(text(props.reply_to()).as_deref(), Some("billing.replies"));
        assert_eq!(text(props.app_id()).as_deref(), Some("web-shop"));
        assert_eq!(
            text(props.content_type()).as_deref(),
            Some("application/json")
        );
        assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
        let keys: Vec<&str> = props
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(ShortString::as_str)
            .collect();
        assert_eq!(keys, ["tenant"]);

        let (back, problem) = incoming("billing.", &props, request.body().to_vec(), false);
        assert_eq!(problem, None);
        assert_eq!(back.reply_to(), Some("replies"));
        assert_eq!(back.headers(), request.headers());

        // Reply-to queues that are not this transport's pass through unchanged, both ways.
        for foreign in ["legacy-replies", "amq.gen-Xa2", "amq.rabbitmq.reply-to.g1h"] {
            let props = BasicProperties::default().with_reply_to(foreign.into());
            let (m, _) = incoming("billing.", &props, Vec::new(), false);
            assert_eq!(m.reply_to(), Some(foreign));
        }
        assert_eq!(destination_queue(&names, "amq.gen-Xa2"), "amq.gen-Xa2");
        assert_eq!(destination_queue(&names, "quotes"), "billing.quotes");
        // Without a prefix every name is its own queue.
        let (m, _) = incoming(
            "",
            &BasicProperties::default().with_reply_to("replies".into()),
            Vec::new(),
            false,
        );
        assert_eq!(m.reply_to(), Some("replies"));
    }

    #[test]
    fn mistyped_framework_headers_are_reported() {
        let mut table = FieldTable::default();
        table.insert(
            wire::ATTEMPT.into(),
            AMQPValue::FieldArray(Default::default()),
        );
        table.insert(
            wire::NOT_BEFORE.into(),
            AMQPValue::FieldTable(Default::default()),
        );
        table.insert("tenant".into(), AMQPValue::FieldArray(Default::default()));
        let props = BasicProperties::default().with_headers(table);
        let (m, problem) = message(&props, Vec::new(), false);
        let problem = problem.expect("a problem");
        assert!(
            problem.contains(&wire::mistyped(wire::ATTEMPT, "an array")),
            "{problem}"
        );
        assert!(
            problem.contains(&wire::mistyped(wire::NOT_BEFORE, "a table")),
            "{problem}"
        );
        // An application header of another type is the application's business.
        assert!(!problem.contains("tenant"), "{problem}");
        assert_eq!(m.attempt(), 1);
    }

    #[test]
    fn overlong_properties_are_an_error_not_a_panic() {
        let m = Message::new("x").with_correlation_id("c".repeat(300));
        let e = properties(&m).unwrap_err();
        assert!(e.to_string().contains("correlation id"), "{e}");
    }
}
