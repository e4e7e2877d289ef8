//! The size limit Service Bus sets on a message's header sections, checked before sending.

use azservicebus::ServiceBusMessage;
use fe2o3_amqp_types::messaging::Message as AmqpMessage;
use redeliver_core::{Error, Message};

/// The most Service Bus accepts in a message's header sections (header, annotations,
/// properties and application properties), encoded, on every tier: 64 KiB.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Refuses `out`, the Service Bus message for `message`, if its header sections are over
/// [`MAX_HEADER_BYTES`].
pub(super) fn check_header_size(out: &ServiceBusMessage, message: &Message) -> Result<(), Error> {
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
    Ok(())
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

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use redeliver_core::Message;

    use crate::convert::outgoing::to_service_bus;

    #[test]
    fn header_sections_over_64_kib_are_an_invalid_message() {
        let fits = Message::new("x").with_header("big", "h".repeat(60 * 1024));
        to_service_bus(&fits, None, Utc::now()).unwrap();
        let over = Message::new("x").with_header("big", "h".repeat(64 * 1024));
        let e = to_service_bus(&over, None, Utc::now()).unwrap_err();
        assert!(e.is_message_refused(), "{e:?}");
        assert!(e.to_string().contains("65536"), "{e}");
    }
}
