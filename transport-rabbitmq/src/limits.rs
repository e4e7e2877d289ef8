//! The broker's size limits, checked before publishing: a message the broker cannot take is
//! refused here, as [`Error::InvalidMessage`], instead of closing the connection (a content
//! header larger than `frame_max`) or the channel (a message above `max_message_size`).

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use redeliver_core::Error;

/// Checks that a message with `properties` and a body of `body` bytes can be stored by the
/// broker: its content header must fit one frame of the negotiated `frame_max` (the broker
/// closes the connection otherwise), and body and properties together at most
/// `max_message_size` bytes. An [`Error::InvalidMessage`] saying which limit it exceeds
/// otherwise: sending it again fails the same way.
pub(crate) fn check_fits(
    properties: &BasicProperties,
    body: usize,
    frame_max: u32,
    max_message_size: usize,
) -> Result<(), Error> {
    // The frame's own 8 bytes, class, weight, body size and property flags.
    let header = 8 + 2 + 2 + 8 + 2 + properties_size(properties);
    let frame_max = frame_max as usize;
    if frame_max > 0 && header > frame_max {
        return Err(Error::invalid_message(format!(
            "its properties and headers take {header} bytes, more than the {frame_max}-byte \
             frame the broker negotiated (frame_max): AMQP 0-9-1 sends them in one frame"
        )));
    }
    if body + header > max_message_size {
        return Err(Error::invalid_message(format!(
            "it is {} bytes with its properties and headers ({body} of body), more than the \
             {max_message_size} bytes the broker accepts (RabbitMqOptions::with_max_message_size)",
            body + header
        )));
    }
    Ok(())
}

/// The encoded size of `properties`, without the property flags.
fn properties_size(properties: &BasicProperties) -> usize {
    let short = |s: &Option<ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    short(properties.content_type())
        + short(properties.content_encoding())
        + properties.headers().as_ref().map_or(0, table_size)
        + properties.delivery_mode().map_or(0, |_| 1)
        + properties.priority().map_or(0, |_| 1)
        + short(properties.correlation_id())
        + short(properties.reply_to())
        + short(properties.expiration())
        + short(properties.message_id())
        + properties.timestamp().map_or(0, |_| 8)
        + short(properties.kind())
        + short(properties.user_id())
        + short(properties.app_id())
        + short(properties.cluster_id())
}

fn table_size(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(key, value)| 1 + key.as_str().len() + value_size(value))
        .sum::<usize>()
}

/// The encoded size of a field value, its type byte included.
fn value_size(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_size).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_size(t),
        AMQPValue::Void => 0,
    }
}

#[cfg(test)]
mod tests {
    use redeliver_core::Message;

    use super::*;
    use crate::convert::properties;

    #[test]
    fn the_size_check_counts_what_goes_on_the_wire() {
        let m = Message::new(vec![0u8; 1000]).with_header("k", "v".repeat(500));
        let props = properties(&m).unwrap();
        // Measured exactly: class, weight, size, flags, then the properties.
        let exact = 8 + 14 + properties_size(&props);
        check_fits(&props, 1000, 131_072, 1000 + exact).unwrap();
        let e = check_fits(&props, 1000, 131_072, 1000 + exact - 1).unwrap_err();
        assert!(e.is_message_refused(), "{e}");
        assert!(e.to_string().contains("with_max_message_size"), "{e}");
        let e = check_fits(&props, 1000, 512, usize::MAX).unwrap_err();
        assert!(e.to_string().contains("frame_max"), "{e}");
        // Headers: 4 for the table, then key length, key, type, length, value.
        let headers = props.headers().as_ref().unwrap();
        assert_eq!(table_size(headers), 4 + 1 + 1 + 1 + 4 + 500);
    }
}
