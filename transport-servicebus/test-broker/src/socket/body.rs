//! The few fields of frame bodies the corrections read or rewrite: the lock token of a
//! transfer, its message header, the error info of a disposition, the channel a `begin`
//! answers.

use fe2o3_amqp::types::messaging::{DeliveryState, Header};
use fe2o3_amqp::types::performatives::Begin;
use fe2o3_amqp::types::primitives::{OrderedMap, Symbol};
use serde_amqp::Value;

use super::frame::composite_length;

/// The descriptor of a message's header section.
const HEADER: [u8; 3] = [0x00, 0x53, 0x70];

/// The client channel whose `begin` a `begin` of the broker answers.
pub(super) fn answered_channel(body: &[u8]) -> Option<u16> {
    serde_amqp::from_slice::<Begin>(body).ok()?.remote_channel
}

pub(super) fn is_terminal(state: &DeliveryState) -> bool {
    matches!(
        state,
        DeliveryState::Accepted(_)
            | DeliveryState::Rejected(_)
            | DeliveryState::Released(_)
            | DeliveryState::Modified(_)
    )
}

/// The `x-opt-lock-token` the broker put in the delivery annotations of a message, from the
/// start of its encoding (the first frame of a transfer is enough).
pub(super) fn lock_token_in(payload: &[u8]) -> Option<[u8; 16]> {
    const DELIVERY_ANNOTATIONS: [u8; 3] = [0x00, 0x53, 0x71];
    const KEY: &[u8] = b"\xa3\x10x-opt-lock-token\x98";
    let mut rest = payload;
    if let Some(after) = rest.strip_prefix(&HEADER) {
        rest = after.get(composite_length(after)?..)?;
    }
    let map = rest.strip_prefix(&DELIVERY_ANNOTATIONS)?;
    let map = &map[..composite_length(map)?.min(map.len())];
    let at = map.windows(KEY.len()).position(|window| window == KEY)? + KEY.len();
    map.get(at..at + 16)?.try_into().ok()
}

/// A UUID's bytes in the order .NET's `Guid.ToByteArray` writes them (the first three fields
/// little-endian), which is how Service Bus puts a lock token into a delivery tag.
pub(super) fn dotnet_guid_bytes(uuid: [u8; 16]) -> [u8; 16] {
    let mut bytes = uuid;
    bytes[0..4].reverse();
    bytes[4..6].reverse();
    bytes[6..8].reverse();
    bytes
}

/// The message encoding with its header section written out in full, if it has a shorter
/// one. `fe2o3-amqp` leaves out trailing fields that have their default value, so a first
/// delivery carried no `delivery-count`; Service Bus writes 0, and the Python SDK reports a
/// missing count as `None`.
pub(super) fn with_explicit_header(payload: &[u8]) -> Option<Vec<u8>> {
    let fields = payload.strip_prefix(&HEADER)?;
    let end = HEADER.len() + composite_length(fields)?;
    let header: Header = serde_amqp::from_slice(payload.get(..end)?).ok()?;
    let boolean = |value: bool| if value { 0x41 } else { 0x42 };
    let mut list = vec![5, boolean(header.durable), 0x50, header.priority.0];
    match header.ttl {
        Some(ttl) => {
            list.push(0x70);
            list.extend_from_slice(&ttl.to_be_bytes());
        }
        None => list.push(0x40),
    }
    list.push(boolean(header.first_acquirer));
    list.push(0x70);
    list.extend_from_slice(&header.delivery_count.to_be_bytes());
    let mut encoded = HEADER.to_vec();
    encoded.push(0xc0);
    encoded.push(u8::try_from(list.len()).ok()?);
    encoded.extend_from_slice(&list);
    encoded.extend_from_slice(&payload[end..]);
    Some(encoded)
}

/// A disposition whose `rejected` error has string keys in its `info`, with those keys
/// turned into symbols. AMQP's `fields` are keyed by symbols, and `fe2o3-amqp` cannot decode
/// the frame otherwise (its session then stops answering), but the JavaScript SDK dead-letters
/// with string keys, which Service Bus accepts.
pub(super) fn with_symbol_info_keys(body: &[u8]) -> Option<Vec<u8>> {
    let mut value: Value = serde_amqp::from_slice(body).ok()?;
    let Value::Described(disposition) = &mut value else {
        return None;
    };
    let Value::List(fields) = &mut disposition.value else {
        return None;
    };
    let Value::Described(state) = fields.get_mut(4)? else {
        return None;
    };
    let Value::List(state_fields) = &mut state.value else {
        return None;
    };
    let Value::Described(error) = state_fields.get_mut(0)? else {
        return None;
    };
    let Value::List(error_fields) = &mut error.value else {
        return None;
    };
    let Value::Map(info) = error_fields.get_mut(2)? else {
        return None;
    };
    if !info.keys().any(|key| matches!(key, Value::String(_))) {
        return None;
    }
    let mut fixed = OrderedMap::new();
    for (key, entry) in info.iter() {
        let key = match key {
            Value::String(name) => Value::Symbol(Symbol::from(name.as_str())),
            other => other.clone(),
        };
        fixed.insert(key, entry.clone());
    }
    *info = fixed;
    serde_amqp::to_vec(&value).ok()
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::messaging::Rejected;
    use fe2o3_amqp::types::performatives::Disposition;

    use super::*;

    #[test]
    fn a_short_header_is_written_in_full() {
        let rest = [0x00, 0x53, 0x75, 0xa0, 1, b'x'];
        let mut payload = HEADER.to_vec();
        payload.push(0x45); // an empty list: every field at its default
        payload.extend_from_slice(&rest);
        let explicit = with_explicit_header(&payload).expect("rewritten");
        let header: Header =
            serde_amqp::from_slice(&explicit[..explicit.len() - rest.len()]).expect("a header");
        assert_eq!(header.delivery_count, 0);
        assert_eq!(header.priority.0, 4);
        assert_eq!(
            &explicit[..HEADER.len() + 3],
            &[0x00, 0x53, 0x70, 0xc0, 11, 5],
            "five fields on the wire"
        );
        assert_eq!(&explicit[explicit.len() - rest.len()..], &rest);
    }

    #[test]
    fn string_keys_of_a_dead_letter_error_become_symbols() {
        // The frame body the JavaScript SDK 7.9.5 writes to dead-letter delivery 1.
        let hex = "005315d00000007b00000005415201520142005325d0000000690000000100531dd00000005d\
                   00000003a319636f6d2e6d6963726f736f66743a646561642d6c657474657240d10000003800\
                   000004a110446561644c6574746572526561736f6ea10172a11a446561644c65747465724572\
                   726f724465736372697074696f6ea10164";
        let hex: String = hex.split_whitespace().collect::<Vec<_>>().concat();
        let body: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert!(serde_amqp::from_slice::<Disposition>(&body).is_err());
        let fixed = with_symbol_info_keys(&body).expect("rewritten");
        let disposition: Disposition = serde_amqp::from_slice(&fixed).expect("decodes");
        let Some(DeliveryState::Rejected(Rejected { error: Some(error) })) = disposition.state
        else {
            panic!("a rejected state");
        };
        let info = error.info.expect("info");
        assert_eq!(
            info.get(&Symbol::from("DeadLetterReason")),
            Some(&Value::String("r".into()))
        );
        assert_eq!(disposition.first, 1);
    }

    #[test]
    fn dotnet_order_reverses_the_first_three_fields() {
        let uuid: [u8; 16] = std::array::from_fn(|i| u8::try_from(i).unwrap());
        assert_eq!(
            dotnet_guid_bytes(uuid),
            [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15]
        );
    }

    #[test]
    fn the_lock_token_is_found_after_the_header() {
        let token: [u8; 16] = [7; 16];
        let mut map = vec![0xc1, 0, 1];
        map.extend_from_slice(b"\xa3\x10x-opt-lock-token\x98");
        map.extend_from_slice(&token);
        map[1] = u8::try_from(map.len() - 2).unwrap();
        let mut payload = vec![0x00, 0x53, 0x70, 0xc0, 2, 1, 0x41];
        payload.extend_from_slice(&[0x00, 0x53, 0x71]);
        payload.extend_from_slice(&map);
        payload.extend_from_slice(&[0x00, 0x53, 0x75, 0xa0, 1, b'x']);
        assert_eq!(lock_token_in(&payload), Some(token));
        assert_eq!(lock_token_in(&payload[7..]), Some(token), "without header");
        assert_eq!(
            lock_token_in(&payload[..7]),
            None,
            "no delivery annotations"
        );
    }
}
