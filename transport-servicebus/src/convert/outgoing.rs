//! Outgoing: the Service Bus message a send, a retry or a park sends, and the framework's state
//! as the properties a settlement modifies.

use azservicebus::ServiceBusMessage;
use chrono::{DateTime, Utc};
use fe2o3_amqp_types::messaging::ApplicationProperties;
use fe2o3_amqp_types::primitives::{OrderedMap, SimpleValue};
use redeliver_core::{Error, Message, wire};
use serde_amqp::Value;

use super::ids::MESSAGE_ID_PROPERTY;
use super::limits::check_header_size;
use super::time::to_offset_date_time;

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
    check_header_size(&out, message)?;
    Ok(out)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use redeliver_core::message::DeadLetterInfo;
    use redeliver_core::transport::FrameworkState;

    use super::*;
    use crate::convert::ids::copy_id;
    use crate::convert::time::to_utc;

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
    fn an_over_long_message_id_is_an_invalid_message() {
        let m = Message::new("x").with_id("x".repeat(200));
        let e = to_service_bus(&m, None, Utc::now()).unwrap_err();
        assert!(matches!(e, Error::InvalidMessage { .. }), "{e}");
    }

    #[test]
    fn a_copy_has_its_own_native_id_and_a_first_send_the_framework_id() {
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
        let copy = to_service_bus(&m, Some(&native), Utc::now()).unwrap();
        assert_eq!(copy.message_id().as_deref(), Some(native.as_str()));
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
