//! Incoming: the framework message rebuilt from a received Service Bus message, with what is
//! wrong with it if anything (a framework property of the wrong type, a body that is not data).

use azservicebus::primitives::service_bus_received_message::ServiceBusReceivedMessage;
use chrono::DateTime;
use fe2o3_amqp_types::messaging::{Body, Message as AmqpMessage, MessageId as AmqpMessageId};
use fe2o3_amqp_types::primitives::SimpleValue;
use redeliver_core::message::DeadLetterInfo;
use redeliver_core::transport::FrameworkState;
use redeliver_core::{Headers, Message, wire};
use serde_amqp::Value;

use super::ids::MESSAGE_ID_PROPERTY;
use super::values::{WHOLE_NUMBER, simple_value_kind, simple_value_text, value_kind};

/// The application property in which Service Bus keeps a dead letter's reason.
pub(crate) const NATIVE_DEAD_LETTER_REASON: &str = "DeadLetterReason";
/// The application property in which Service Bus keeps a dead letter's description.
pub(crate) const NATIVE_DEAD_LETTER_DESCRIPTION: &str = "DeadLetterErrorDescription";

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
        // Without an id, or with an empty one, the sequence number names the message.
        .filter(|id| !id.is_empty())
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
                    SimpleValue::String(id) if !id.is_empty() => framework_id = Some(id.clone()),
                    SimpleValue::String(_) => {}
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
        SimpleValue::Timestamp(at) if key == wire::NOT_BEFORE => {
            DateTime::from_timestamp_millis(at.milliseconds())
                .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .ok_or("a timestamp out of range")
        }
        other => match simple_value_kind(other) {
            // Every whole number has a text form.
            WHOLE_NUMBER if numeric => simple_value_text(other).ok_or(WHOLE_NUMBER),
            kind => Err(kind),
        },
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;
    use fe2o3_amqp_types::messaging::{AmqpValue, ApplicationProperties, Batch, Data, Properties};

    use super::*;
    use crate::convert::ids::copy_id;

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
    fn an_empty_id_is_no_id() {
        let raw = received(
            data(b"x"),
            Some(Properties {
                message_id: Some(AmqpMessageId::String(String::new())),
                ..Properties::default()
            }),
            vec![(MESSAGE_ID_PROPERTY, text(""))],
        );
        let r = from_amqp(&raw, 78, false);
        assert_eq!(r.problem, None);
        assert_eq!(r.message.id().as_str(), "sequence-78");
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
    fn a_copy_is_read_back_with_the_framework_id() {
        let native = copy_id(42, "order-1");
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
}
