//! Reading AMQP property values: their text, where they have one, and what they are, for
//! messages about values of the wrong type.

use fe2o3_amqp_types::primitives::SimpleValue;
use serde_amqp::Value;

/// What [`simple_value_kind`] calls a whole number, of whichever width.
pub(super) const WHOLE_NUMBER: &str = "a number";

/// The text form of a property value, if it has one (binary data and described values have
/// none).
pub(super) fn simple_value_text(value: &SimpleValue) -> Option<String> {
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

/// What a property value is, for [`wire::mistyped`](redeliver_core::wire::mistyped).
pub(super) fn simple_value_kind(value: &SimpleValue) -> &'static str {
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
        | SimpleValue::Long(_) => WHOLE_NUMBER,
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

/// What an AMQP value body is, for the problem of a body that is not data.
pub(super) fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::List(_) => "a list",
        Value::Map(_) => "a map",
        _ => "a scalar",
    }
}
