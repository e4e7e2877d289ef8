//! Between redeliver's [`Message`] and Service Bus messages.
//!
//! Native properties carry message id, content type, correlation id, reply-to and subject; the
//! framework's state travels in application properties named by [`wire`]; a not-before in the
//! future becomes the scheduled enqueue time.

use azservicebus::ServiceBusMessage;
use azservicebus::primitives::service_bus_received_message::ServiceBusReceivedMessage;
use chrono::{DateTime, Utc};
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Body, Message as AmqpMessage, MessageId as AmqpMessageId,
};
use fe2o3_amqp_types::primitives::{OrderedMap, SimpleValue};
use redeliver_core::message::DeadLetterInfo;
use redeliver_core::transport::FrameworkState;
use redeliver_core::{Error, Headers, Message, wire};
use serde_amqp::Value;
use time::OffsetDateTime;

/// The application property that carries the framework's message id on a copy (a retry or a
/// park), whose native `MessageId` is its own so that duplicate detection keeps it.
pub const MESSAGE_ID_PROPERTY: &str = "redeliver-message-id";
/// The most Service Bus accepts in a message's header sections (header, annotations,
/// properties and application properties), encoded, on every tier: 64 KiB.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The longest `MessageId` `azservicebus` sends, in bytes.
const MAX_NATIVE_ID: usize = 128;

/// The application property in which Service Bus keeps a dead letter's reason.
pub(crate) const NATIVE_DEAD_LETTER_REASON: &str = "DeadLetterReason";
/// The application property in which Service Bus keeps a dead letter's description.
pub(crate) const NATIVE_DEAD_LETTER_DESCRIPTION: &str = "DeadLetterErrorDescription";

/// The native `MessageId` of the copy that settles the delivery with sequence number
/// `sequence_number` of a message with id `id`: the same for every copy made from that one
/// delivery (so a copy sent again after a crash or a time-out is dropped by duplicate
/// detection), different from every other copy and from the message's own id (so it is not).
pub(crate) fn copy_id(sequence_number: i64, id: &str) -> String {
    let mut native = if sequence_number > 0 {
        format!("redeliver:{sequence_number}:{id}")
    } else {
        // Service Bus numbers every message from 1; without a number, be unique anyway.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
        format!("redeliver:{nanos}-{n}:{id}")
    };
    if native.len() > MAX_NATIVE_ID {
        let mut end = MAX_NATIVE_ID;
        while !native.is_char_boundary(end) {
            end -= 1;
        }
        native.truncate(end);
    }
    native
}

/// The Service Bus message for `message`, scheduled at its not-before if that is after `now`.
/// A copy (`copy_id` given) has that native id and carries the framework's id in
/// [`MESSAGE_ID_PROPERTY`]; a first send has the framework's id as its native id, so that
/// duplicate detection drops an application's repeated send.
pub(crate) fn to_service_bus(
    message: &Message,
    copy_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<ServiceBusMessage, Error> {
    let mut out = ServiceBusMessage::new(message.body().to_vec());
    out.set_message_id(copy_id.unwrap_or(message.id().as_str()))
        .map_err(|e| {
            Error::invalid_message(format!(
                "message id `{}` cannot be used on Service Bus",
                message.id()
            ))
            .with_source(e)
        })?;
    out.set_content_type(message.content_type().map(str::to_owned));
    out.set_correlation_id(message.correlation_id().map(str::to_owned));
    out.set_reply_to(message.reply_to().map(str::to_owned));
    out.set_subject(message.subject().map(str::to_owned));
    let mut properties: OrderedMap<String, SimpleValue> = wire::encode_headers(message)
        .iter()
        .map(|(k, v)| (k.to_owned(), SimpleValue::String(v.to_owned())))
        .collect();
    if copy_id.is_some() {
        properties.insert(
            MESSAGE_ID_PROPERTY.to_owned(),
            SimpleValue::String(message.id().to_string()),
        );
    }
    *out.application_properties_mut() = Some(ApplicationProperties(properties));
    if let Some(at) = message.not_before().filter(|at| *at > now) {
        out.set_scheduled_enqueue_time(to_offset_date_time(at)?);
    }
    // Service Bus answers header sections over its limit with `amqp:internal-error`, which
    // reads as worth retrying: refuse such a message here, for what it is.
    let size = header_size(out.raw_amqp_message());
    if size > MAX_HEADER_BYTES {
        return Err(Error::invalid_message(format!(
            "message {}: its properties take {size} bytes encoded; Service Bus accepts at most \
             {MAX_HEADER_BYTES} (64 KiB) on every tier",
            message.id()
        )));
    }
    Ok(out)
}

/// The encoded size of a message's header sections, as Service Bus counts them.
fn header_size<B>(message: &AmqpMessage<B>) -> usize {
    fn size<T: serde_amqp::serde::Serialize>(section: Option<&T>) -> usize {
        section.map_or(0, |s| serde_amqp::serialized_size(s).unwrap_or(usize::MAX))
    }
    size(message.header.as_ref())
        .saturating_add(size(message.message_annotations.as_ref()))
        .saturating_add(size(message.properties.as_ref()))
        .saturating_add(size(message.application_properties.as_ref()))
}

/// The framework's headers of `message` as "properties to modify" of a settlement, so that the
/// broker's copy carries the state the framework gave it.
pub(crate) fn framework_properties(message: &Message) -> OrderedMap<String, Value> {
    wire::encode_headers(message)
        .iter()
        .filter(|(k, _)| k.starts_with(wire::PREFIX))
        .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
        .collect()
}

/// A UTC instant as the client's time type, rounded *up* to the millisecond: AMQP timestamps
/// carry milliseconds, and a scheduled time must never move earlier.
pub(crate) fn to_offset_date_time(at: DateTime<Utc>) -> Result<OffsetDateTime, Error> {
    let nanos = at.timestamp_nanos_opt().ok_or_else(|| {
        Error::invalid_message(format!("the not-before {at} is out of the supported range"))
    })?;
    let millis =
        i128::from(nanos).div_euclid(1_000_000) + i128::from(nanos.rem_euclid(1_000_000) != 0);
    OffsetDateTime::from_unix_timestamp_nanos(millis * 1_000_000).map_err(|e| {
        Error::invalid_message(format!("the not-before {at} is out of the supported range"))
            .with_source(e)
    })
}

/// A client time as a UTC instant.
pub(crate) fn to_utc(at: OffsetDateTime) -> DateTime<Utc> {
    let nanos = at.unix_timestamp_nanos();
    let secs = nanos.div_euclid(1_000_000_000);
    let sub = nanos.rem_euclid(1_000_000_000);
    i64::try_from(secs)
        .ok()
        .and_then(|secs| DateTime::from_timestamp(secs, u32::try_from(sub).unwrap_or(0)))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// What was received, as a framework message, with what is wrong with it if anything.
pub(crate) struct Received {
    pub(crate) message: Message,
    pub(crate) problem: Option<String>,
}

/// Rebuilds the framework message from a received Service Bus message.
///
/// On a dead letter (`dead_letter` true) whose framework headers do not say why it was
/// dead-lettered (the broker dead-lettered it itself, or the broker does not apply properties
/// to modify on dead-lettering), the native `DeadLetterReason` / `DeadLetterErrorDescription`
/// are used. Those native properties are never shown to handlers as headers.
pub(crate) fn from_service_bus(
    received: &ServiceBusReceivedMessage,
    dead_letter: bool,
) -> Received {
    from_amqp(
        received.raw_amqp_message(),
        received.sequence_number(),
        dead_letter,
    )
}

/// [`from_service_bus`] on the AMQP message itself. A message without a message id gets
/// `sequence-<sequence number>`, which stays the same across its redeliveries.
pub(crate) fn from_amqp(
    raw: &AmqpMessage<Body<Value>>,
    sequence_number: i64,
    dead_letter: bool,
) -> Received {
    let mut problems = Vec::new();
    let body: Vec<u8> = match &raw.body {
        Body::Data(sections) => sections.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(value) => match &value.0 {
            Value::String(s) => s.as_bytes().to_vec(),
            Value::Binary(b) => b.to_vec(),
            other => {
                problems.push(format!(
                    "the body is an AMQP value ({}) rather than data",
                    value_kind(other)
                ));
                Vec::new()
            }
        },
        Body::Sequence(_) => {
            problems.push("the body is an AMQP sequence rather than data".to_owned());
            Vec::new()
        }
        Body::Empty => Vec::new(),
    };
    let properties = raw.properties.as_ref();
    let native_id = properties
        .and_then(|p| p.message_id.as_ref())
        .map(id_text)
        .unwrap_or_else(|| format!("sequence-{sequence_number}"));

    let mut headers = Headers::new();
    let mut framework_id = None;
    let mut native_reason = None;
    let mut native_description = None;
    // Framework properties of the wrong type, reported after decoding.
    let mut mistyped = Vec::new();
    if let Some(properties) = raw.application_properties.as_ref() {
        for (key, value) in properties.0.iter() {
            match key.as_str() {
                NATIVE_DEAD_LETTER_REASON => native_reason = simple_value_text(value),
                NATIVE_DEAD_LETTER_DESCRIPTION => native_description = simple_value_text(value),
                MESSAGE_ID_PROPERTY => match value {
                    SimpleValue::String(id) => framework_id = Some(id.clone()),
                    other => mistyped.push(wire::mistyped(key, simple_value_kind(other))),
                },
                framework if framework.starts_with(wire::PREFIX) => {
                    match framework_text(framework, value) {
                        Ok(text) => {
                            headers.insert(key.clone(), text);
                        }
                        Err(found) => mistyped.push(wire::mistyped(key, found)),
                    }
                }
                // Foreign non-text properties (binary, described values) have no header form.
                _ => {
                    if let Some(text) = simple_value_text(value) {
                        headers.insert(key.clone(), text);
                    }
                }
            }
        }
    }

    let id = framework_id.unwrap_or(native_id);
    let mut message = Message::new(body).with_id(id).with_headers(headers);
    if let Some(properties) = properties {
        if let Some(ct) = &properties.content_type {
            message = message.with_content_type(ct.0.as_str());
        }
        if let Some(correlation) = &properties.correlation_id {
            message = message.with_correlation_id(id_text(correlation));
        }
        if let Some(reply_to) = &properties.reply_to {
            message = message.with_reply_to(reply_to.as_str());
        }
        if let Some(subject) = &properties.subject {
            message = message.with_subject(subject.as_str());
        }
    }
    let mut decoded = wire::decode_headers(message);
    for problem in mistyped.into_iter().chain(problems) {
        decoded.add_problem(problem);
    }
    let mut message = decoded.message;
    if dead_letter && message.dead_letter().is_none() {
        let info = DeadLetterInfo {
            reason: native_reason.unwrap_or_else(|| "unknown".to_owned()),
            description: native_description,
        };
        message = message.with_dead_letter(Some(info));
    }
    Received {
        message,
        problem: decoded.problem,
    }
}

/// The text of framework property `key`, or what it holds instead. Text is what the framework
/// writes; a whole number is accepted where the framework writes one (the attempt, the last
/// delay) and a timestamp for the not-before, since other producers write those natively.
/// Anything else is a problem: the message is dead-lettered as malformed, not guessed at.
fn framework_text(key: &str, value: &SimpleValue) -> Result<String, &'static str> {
    let numeric = key == wire::ATTEMPT || key == wire::LAST_DELAY_MS;
    match value {
        SimpleValue::String(s) => Ok(s.clone()),
        SimpleValue::Symbol(s) => Ok(s.0.clone()),
        SimpleValue::Ubyte(_)
        | SimpleValue::Ushort(_)
        | SimpleValue::Uint(_)
        | SimpleValue::Ulong(_)
        | SimpleValue::Byte(_)
        | SimpleValue::Short(_)
        | SimpleValue::Int(_)
        | SimpleValue::Long(_)
            if numeric =>
        {
            simple_value_text(value).ok_or("a number")
        }
        SimpleValue::Timestamp(at) if key == wire::NOT_BEFORE => {
            DateTime::from_timestamp_millis(at.milliseconds())
                .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .ok_or("a timestamp out of range")
        }
        other => Err(simple_value_kind(other)),
    }
}

/// A message or correlation id as text, in the form `azservicebus` shows it.
fn id_text(id: &AmqpMessageId) -> String {
    match id {
        AmqpMessageId::String(s) => s.clone(),
        AmqpMessageId::Ulong(n) => n.to_string(),
        AmqpMessageId::Uuid(u) => format!("{u:x}"),
        AmqpMessageId::Binary(b) => b.iter().map(|byte| format!("{byte:02X}")).collect(),
    }
}

fn simple_value_text(value: &SimpleValue) -> Option<String> {
    Some(match value {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Char(c) => c.to_string(),
        SimpleValue::Uuid(u) => format!("{u:?}"),
        _ => return None,
    })
}

/// What a property value is, for [`wire::mistyped`].
fn simple_value_kind(value: &SimpleValue) -> &'static str {
    match value {
        SimpleValue::Null => "null",
        SimpleValue::Bool(_) => "a boolean",
        SimpleValue::Ubyte(_)
        | SimpleValue::Ushort(_)
        | SimpleValue::Uint(_)
        | SimpleValue::Ulong(_)
        | SimpleValue::Byte(_)
        | SimpleValue::Short(_)
        | SimpleValue::Int(_)
        | SimpleValue::Long(_) => "a number",
        SimpleValue::Float(_) | SimpleValue::Double(_) => "a floating-point number",
        SimpleValue::Decimal32(_) | SimpleValue::Decimal64(_) | SimpleValue::Decimal128(_) => {
            "a decimal"
        }
        SimpleValue::Char(_) => "a character",
        SimpleValue::Timestamp(_) => "a timestamp",
        SimpleValue::Uuid(_) => "a UUID",
        SimpleValue::Binary(_) => "binary data",
        SimpleValue::String(_) | SimpleValue::Symbol(_) => "text",
        // AMQP allows no list, map or array in application properties except described.
        SimpleValue::Described(described) => match &described.value {
            Value::List(_) => "a list",
            Value::Map(_) => "a map",
            Value::Array(_) => "an array",
            _ => "a described value",
        },
    }
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::List(_) => "a list",
        Value::Map(_) => "a map",
        _ => "a scalar",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fe2o3_amqp_types::messaging::{AmqpValue, Batch, Data, Properties};

    use super::*;

    #[test]
    fn native_properties_and_framework_headers_are_set() {
        let at = Utc::now() + chrono::TimeDelta::seconds(30);
        let m = Message::new("body")
            .with_id("order-1")
            .with_content_type("application/json")
            .with_correlation_id("c")
            .with_reply_to("replies")
            .with_subject("webhook")
            .with_header("tenant", "a")
            .with_not_before(at)
            .with_attempt(2)
            .with_last_failure(Some("timeout".into()), Some(Duration::from_secs(2)));
        let sb = to_service_bus(&m, None, Utc::now()).unwrap();
        assert_eq!(sb.message_id().as_deref(), Some("order-1"));
        assert_eq!(sb.content_type(), Some("application/json"));
        assert_eq!(sb.correlation_id().as_deref(), Some("c"));
        assert_eq!(sb.reply_to(), Some("replies"));
        assert_eq!(sb.subject(), Some("webhook"));
        assert_eq!(sb.body(), b"body");
        let props = &sb.application_properties().unwrap().0;
        let text = |k: &str| match props.get(k) {
            Some(SimpleValue::String(s)) => Some(s.as_str()),
            _ => None,
        };
        assert_eq!(text(wire::ATTEMPT), Some("2"));
        assert_eq!(text(wire::LAST_FAILURE), Some("timeout"));
        assert_eq!(text("tenant"), Some("a"));
        assert!(to_utc(sb.scheduled_enqueue_time()) >= at);
    }

    #[test]
    fn a_past_not_before_is_not_scheduled() {
        let now = Utc::now();
        let m = Message::new("x").with_not_before(now - chrono::TimeDelta::seconds(1));
        let sb = to_service_bus(&m, None, now).unwrap();
        assert!(
            sb.raw_amqp_message()
                .message_annotations
                .as_ref()
                .is_none_or(|a| a.is_empty()),
            "no scheduled enqueue time annotation"
        );
    }

    #[test]
    fn scheduled_times_round_up_to_the_millisecond() {
        let at = DateTime::parse_from_rfc3339("2026-11-21T10:00:01.250400Z")
            .unwrap()
            .with_timezone(&Utc);
        let rounded = to_utc(to_offset_date_time(at).unwrap());
        assert_eq!(
            rounded,
            DateTime::parse_from_rfc3339("2026-11-21T10:00:01.251Z").unwrap()
        );
        let exact = DateTime::parse_from_rfc3339("2026-11-21T10:00:01.250Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(to_utc(to_offset_date_time(exact).unwrap()), exact);
    }

    #[test]
    fn header_sections_over_64_kib_are_an_invalid_message() {
        let fits = Message::new("x").with_header("big", "h".repeat(60 * 1024));
        to_service_bus(&fits, None, Utc::now()).unwrap();
        let over = Message::new("x").with_header("big", "h".repeat(64 * 1024));
        let e = to_service_bus(&over, None, Utc::now()).unwrap_err();
        assert!(e.is_message_refused(), "{e:?}");
        assert!(e.to_string().contains("65536"), "{e}");
    }

    #[test]
    fn an_over_long_message_id_is_an_invalid_message() {
        let m = Message::new("x").with_id("x".repeat(200));
        let e = to_service_bus(&m, None, Utc::now()).unwrap_err();
        assert!(matches!(e, Error::InvalidMessage { .. }), "{e}");
    }

    fn received(
        body: Body<Value>,
        properties: Option<Properties>,
        application: Vec<(&str, SimpleValue)>,
    ) -> AmqpMessage<Body<Value>> {
        AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties,
            application_properties: Some(ApplicationProperties(
                application
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
            )),
            body,
            footer: None,
        }
    }

    fn data(bytes: &[u8]) -> Body<Value> {
        Body::Data(Batch::new(vec![Data(bytes.to_vec().into())]))
    }

    fn text(value: &str) -> SimpleValue {
        SimpleValue::String(value.to_owned())
    }

    #[test]
    fn a_dead_letter_without_framework_reason_reads_the_native_one() {
        let raw = received(
            data(b"{}"),
            Some(Properties {
                message_id: Some(AmqpMessageId::String("m".into())),
                ..Properties::default()
            }),
            vec![
                (wire::ATTEMPT, text("2")),
                (NATIVE_DEAD_LETTER_REASON, text("MaxDeliveryCountExceeded")),
                (NATIVE_DEAD_LETTER_DESCRIPTION, text("delivered 10 times")),
            ],
        );
        let r = from_amqp(&raw, 5, true);
        assert_eq!(r.problem, None);
        let info = r.message.dead_letter().expect("dead-letter info");
        assert_eq!(info.reason, "MaxDeliveryCountExceeded");
        assert_eq!(info.description.as_deref(), Some("delivered 10 times"));
        assert_eq!(r.message.attempt(), 2);
        assert!(
            r.message.headers().is_empty(),
            "native dead-letter properties are not headers"
        );

        // The framework's own reason wins when both are there.
        let raw = received(
            data(b"{}"),
            None,
            vec![
                (wire::DEAD_LETTER_REASON, text("rate-limited")),
                (NATIVE_DEAD_LETTER_REASON, text("rate-limited (native)")),
            ],
        );
        let r = from_amqp(&raw, 5, true);
        assert_eq!(
            r.message.dead_letter().map(|d| d.reason.as_str()),
            Some("rate-limited")
        );
    }

    #[test]
    fn on_an_endpoint_native_dead_letter_properties_are_dropped_not_shown() {
        let raw = received(
            data(b"{}"),
            None,
            vec![(NATIVE_DEAD_LETTER_REASON, text("resubmitted by a tool"))],
        );
        let r = from_amqp(&raw, 9, false);
        assert_eq!(r.message.dead_letter(), None);
        assert!(r.message.headers().is_empty());
    }

    #[test]
    fn ids_of_other_producers_and_missing_ids_are_stable_text() {
        let raw = received(
            data(b"x"),
            Some(Properties {
                message_id: Some(AmqpMessageId::Ulong(42)),
                correlation_id: Some(AmqpMessageId::Binary(vec![0xab, 0x01].into())),
                ..Properties::default()
            }),
            vec![],
        );
        let r = from_amqp(&raw, 1, false);
        assert_eq!(r.message.id().as_str(), "42");
        assert_eq!(r.message.correlation_id(), Some("AB01"));
        let r = from_amqp(&received(data(b"x"), None, vec![]), 77, false);
        assert_eq!(r.message.id().as_str(), "sequence-77");
    }

    #[test]
    fn bodies_other_than_data_are_read_or_reported() {
        let r = from_amqp(
            &received(
                Body::Value(AmqpValue(Value::String("hi".into()))),
                None,
                vec![],
            ),
            1,
            false,
        );
        assert_eq!((r.message.body().as_ref(), r.problem), (&b"hi"[..], None));
        let r = from_amqp(
            &received(Body::Value(AmqpValue(Value::List(vec![]))), None, vec![]),
            1,
            false,
        );
        assert!(r.problem.unwrap().contains("a list"));
    }

    #[test]
    fn a_framework_property_that_is_not_text_is_a_problem() {
        let raw = received(
            data(b"{}"),
            None,
            vec![
                (wire::ATTEMPT, SimpleValue::Int(2)),
                (wire::NOT_BEFORE, SimpleValue::Binary(vec![1].into())),
            ],
        );
        let r = from_amqp(&raw, 1, false);
        let problem = r.problem.expect("a problem");
        assert_eq!(
            problem,
            wire::mistyped(wire::NOT_BEFORE, "binary data"),
            "{problem}"
        );
        assert_eq!(r.message.attempt(), 2, "a number is read as its text");

        let described = |value: Value| {
            SimpleValue::Described(Box::new(serde_amqp::described::Described {
                descriptor: serde_amqp::descriptor::Descriptor::Code(0x77),
                value,
            }))
        };
        let raw = received(
            data(b"{}"),
            None,
            vec![
                (wire::ATTEMPT, described(Value::List(vec![Value::Uint(2)]))),
                (wire::NOT_BEFORE, described(Value::Map(Default::default()))),
                (wire::LAST_FAILURE, SimpleValue::Double(2.0.into())),
                ("tenant", described(Value::List(vec![]))),
            ],
        );
        let r = from_amqp(&raw, 1, false);
        let problem = r.problem.expect("a problem");
        for expected in [
            wire::mistyped(wire::ATTEMPT, "a list"),
            wire::mistyped(wire::NOT_BEFORE, "a map"),
            wire::mistyped(wire::LAST_FAILURE, "a floating-point number"),
        ] {
            assert!(problem.contains(&expected), "{problem}");
        }
        assert!(
            !problem.contains("tenant"),
            "application properties are not checked"
        );
        assert_eq!(r.message.attempt(), 1);
        assert!(r.message.headers().is_empty());
    }

    #[test]
    fn numbers_and_timestamps_of_other_producers_are_read_where_they_fit() {
        let at = DateTime::parse_from_rfc3339("2026-11-21T10:00:01.250Z")
            .unwrap()
            .with_timezone(&Utc);
        let raw = received(
            data(b"{}"),
            None,
            vec![
                (wire::ATTEMPT, SimpleValue::Long(3)),
                (wire::LAST_DELAY_MS, SimpleValue::Uint(1500)),
                (
                    wire::NOT_BEFORE,
                    SimpleValue::Timestamp(at.timestamp_millis().into()),
                ),
                ("tenant", SimpleValue::Int(7)),
            ],
        );
        let r = from_amqp(&raw, 1, false);
        assert_eq!(r.problem, None);
        assert_eq!(r.message.attempt(), 3);
        assert_eq!(r.message.last_delay(), Some(Duration::from_millis(1500)));
        assert_eq!(r.message.not_before(), Some(at));
        assert_eq!(r.message.headers().get("tenant"), Some("7"));

        // A number where the framework writes text, or a boolean attempt, is not guessed at.
        let raw = received(
            data(b"{}"),
            None,
            vec![
                (wire::DEAD_LETTER_REASON, SimpleValue::Int(7)),
                (wire::ATTEMPT, SimpleValue::Bool(true)),
            ],
        );
        let problem = from_amqp(&raw, 1, false).problem.expect("a problem");
        assert!(
            problem.contains(&wire::mistyped(wire::DEAD_LETTER_REASON, "a number"))
                && problem.contains(&wire::mistyped(wire::ATTEMPT, "a boolean")),
            "{problem}"
        );
    }

    #[test]
    fn a_copy_has_its_own_native_id_and_carries_the_framework_id() {
        let m = Message::new("x").with_id("order-1");
        let first = to_service_bus(&m, None, Utc::now()).unwrap();
        assert_eq!(first.message_id().as_deref(), Some("order-1"));
        assert!(
            first
                .application_properties()
                .is_none_or(|p| p.0.get(MESSAGE_ID_PROPERTY).is_none()),
            "a first send carries no extra property"
        );

        let native = copy_id(42, "order-1");
        assert_eq!(native, copy_id(42, "order-1"), "the same for one delivery");
        assert_ne!(native, copy_id(43, "order-1"));
        assert_ne!(
            copy_id(0, "order-1"),
            copy_id(0, "order-1"),
            "unique without a number"
        );
        assert_eq!(copy_id(7, &"x".repeat(200)).len(), 128);
        let cut = copy_id(7, &"é".repeat(100));
        assert!(cut.len() <= 128 && cut.len() >= 126, "{}", cut.len());
        let copy = to_service_bus(&m, Some(&native), Utc::now()).unwrap();
        assert_eq!(copy.message_id().as_deref(), Some(native.as_str()));

        // Read back: the framework's id, and the property is no header.
        let raw = received(
            data(b"x"),
            Some(Properties {
                message_id: Some(AmqpMessageId::String(native.clone())),
                ..Properties::default()
            }),
            vec![(MESSAGE_ID_PROPERTY, text("order-1"))],
        );
        let r = from_amqp(&raw, 1, false);
        assert_eq!((r.message.id().as_str(), r.problem), ("order-1", None));
        assert!(r.message.headers().is_empty());

        let raw = received(
            data(b"x"),
            Some(Properties {
                message_id: Some(AmqpMessageId::String(native.clone())),
                ..Properties::default()
            }),
            vec![(MESSAGE_ID_PROPERTY, SimpleValue::Binary(vec![1].into()))],
        );
        let r = from_amqp(&raw, 1, false);
        assert_eq!(
            r.problem,
            Some(wire::mistyped(MESSAGE_ID_PROPERTY, "binary data"))
        );
        assert_eq!(r.message.id().as_str(), native, "the native id, unguessed");
    }

    #[test]
    fn framework_properties_leave_application_headers_out() {
        let m = Message::new("x")
            .with_header("tenant", "a")
            .with_dead_letter(Some(DeadLetterInfo {
                reason: "corrupt".into(),
                description: None,
            }));
        let props = framework_properties(&m);
        assert!(props.get("tenant").is_none());
        assert_eq!(
            props.get(wire::DEAD_LETTER_REASON),
            Some(&Value::String("corrupt".into()))
        );
        assert_eq!(props.get(wire::ATTEMPT), None, "attempt 1 goes without");
    }
}
