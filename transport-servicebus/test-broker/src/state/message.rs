//! What the broker reads and writes in a message: the Service Bus annotations and properties,
//! identifiers, sizes and the body.

use fe2o3_amqp_types::messaging::message::__private::Serializable;
use fe2o3_amqp_types::messaging::{Body, Message, MessageAnnotations, annotations::OwnedKey};
use fe2o3_amqp_types::primitives::{SimpleValue, Symbol};
use serde_amqp::Value;

/// A message as the broker stores and forwards it.
pub(crate) type Msg = Message<Body<Value>>;

pub(super) const LOCK_TOKEN: &str = "x-opt-lock-token";
pub(super) const LOCKED_UNTIL: &str = "x-opt-locked-until";
pub(super) const SEQUENCE_NUMBER: &str = "x-opt-sequence-number";
pub(super) const ENQUEUED_TIME: &str = "x-opt-enqueued-time";
pub(super) const SCHEDULED_ENQUEUE_TIME: &str = "x-opt-scheduled-enqueue-time";
pub(crate) const DEAD_LETTER_REASON: &str = "DeadLetterReason";
pub(crate) const DEAD_LETTER_DESCRIPTION: &str = "DeadLetterErrorDescription";

/// Gives a message without `message-id` one, as Service Bus does (a GUID without dashes):
/// some clients (the JavaScript SDK) cannot settle a message without it.
pub(super) fn assign_message_id(message: &mut Msg) {
    let properties = message
        .properties
        .get_or_insert_with(fe2o3_amqp_types::messaging::Properties::default);
    if properties.message_id.is_none() {
        properties.message_id = Some(fe2o3_amqp_types::messaging::MessageId::String(
            uuid::Uuid::new_v4().simple().to_string(),
        ));
    }
}

pub(super) fn message_id_key(message: &Msg) -> Option<String> {
    let id = message.properties.as_ref()?.message_id.as_ref()?;
    Some(match id {
        fe2o3_amqp_types::messaging::MessageId::String(s) => s.clone(),
        other => format!("{other:?}"),
    })
}

fn annotation<'a>(message: &'a Msg, key: &str) -> Option<&'a Value> {
    message
        .message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key)))
}

/// The scheduled enqueue time of a message, in milliseconds since the epoch.
pub(super) fn scheduled_enqueue_ms(message: &Msg) -> Option<i64> {
    match annotation(message, SCHEDULED_ENQUEUE_TIME)? {
        Value::Timestamp(ts) => Some(ts.milliseconds()),
        Value::Long(ms) => Some(*ms),
        _ => None,
    }
}

pub(super) fn subject(message: &Msg) -> Option<&str> {
    message.properties.as_ref()?.subject.as_deref()
}

pub(super) fn encoded_size(message: &Msg) -> usize {
    serde_amqp::to_vec(&Serializable(message)).map_or(usize::MAX, |bytes| bytes.len())
}

/// The encoded size of the sections Service Bus counts as headers: header, message
/// annotations, properties and application properties.
pub(super) fn encoded_header_size(message: &Msg) -> usize {
    fn size<T: serde_amqp::serde::Serialize>(section: Option<&T>) -> usize {
        section.map_or(0, |s| serde_amqp::serialized_size(s).unwrap_or(usize::MAX))
    }
    size(message.header.as_ref())
        .saturating_add(size(message.message_annotations.as_ref()))
        .saturating_add(size(message.properties.as_ref()))
        .saturating_add(size(message.application_properties.as_ref()))
}

pub(super) fn set_annotation(message: &mut Msg, key: &str, value: Value) {
    message
        .message_annotations
        .get_or_insert_with(MessageAnnotations::default)
        .0
        .insert(OwnedKey::Symbol(Symbol::from(key)), value);
}

pub(super) fn string_property(message: &Msg, key: &str) -> Option<String> {
    match message.application_properties.as_ref()?.0.get(key)? {
        SimpleValue::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// The concatenated data sections of a message body (empty for other body kinds).
pub(super) fn body_bytes(message: &Msg) -> Vec<u8> {
    match &message.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        _ => Vec::new(),
    }
}
