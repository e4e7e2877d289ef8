//! What the fuzz targets share: structured inputs that reach past the first byte checks.

use arbitrary::Arbitrary;
use fe2o3_amqp_types::primitives::{Array, Binary, OrderedMap, Timestamp, Uuid};
use serde_amqp::Value;

/// Asserts that `back`, what the framework wrote of `sent` and read again, carries the same
/// framework state, with a not-before never earlier.
pub fn assert_same_state(sent: &redeliver_core::Message, back: &redeliver_core::Message) {
    assert_eq!(back.attempt(), sent.attempt());
    assert_eq!(back.last_failure(), sent.last_failure());
    assert_eq!(back.last_delay(), sent.last_delay());
    assert_eq!(back.dead_letter(), sent.dead_letter());
    match (sent.not_before(), back.not_before()) {
        (None, None) => {}
        (Some(sent), Some(read)) => assert!(read >= sent, "a not-before moved earlier"),
        (sent, read) => panic!("not-before {sent:?} came back as {read:?}"),
    }
}

/// A header name: one of the framework's, or any other text.
#[derive(Debug, Arbitrary)]
pub enum HeaderName {
    /// One of [`FRAMEWORK_HEADERS`], by index.
    Framework(u8),
    /// Anything.
    Other(String),
}

/// The header names the framework owns, and a few near misses.
pub const FRAMEWORK_HEADERS: &[&str] = &[
    redeliver_core::wire::ATTEMPT,
    redeliver_core::wire::NOT_BEFORE,
    redeliver_core::wire::LAST_FAILURE,
    redeliver_core::wire::LAST_DELAY_MS,
    redeliver_core::wire::DEAD_LETTER_REASON,
    redeliver_core::wire::DEAD_LETTER_DESCRIPTION,
    "redeliver-",
    "redeliver-unknown",
    "Redeliver-Attempt",
];

impl HeaderName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        match self {
            HeaderName::Framework(i) => {
                FRAMEWORK_HEADERS[usize::from(*i) % FRAMEWORK_HEADERS.len()]
            }
            HeaderName::Other(name) => name,
        }
    }
}

/// A header value: text shaped like what the framework writes, or any text.
#[derive(Debug, Arbitrary)]
pub enum HeaderValue {
    /// A number, as text.
    Number(i64),
    /// An RFC 3339 instant from seconds and nanoseconds since the epoch.
    Instant(i64, u32),
    /// Anything.
    Text(String),
}

impl HeaderValue {
    /// The value as text.
    pub fn into_text(self) -> String {
        match self {
            HeaderValue::Number(n) => n.to_string(),
            HeaderValue::Instant(secs, nanos) => chrono::DateTime::from_timestamp(secs, nanos)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default(),
            HeaderValue::Text(text) => text,
        }
    }
}

/// An AMQP 1.0 value of any shape, keys of maps drawn from `keys` (or any text).
#[derive(Debug, Arbitrary)]
pub enum AmqpValue {
    Null,
    Bool(bool),
    Int(i32),
    Long(i64),
    UInt(u32),
    ULong(u64),
    Double(f64),
    String(String),
    Binary(Vec<u8>),
    Uuid([u8; 16]),
    /// One of the lock tokens the input is given, by index.
    LockToken(u8),
    Timestamp(i64),
    Symbol(String),
    List(Vec<AmqpValue>),
    Array(Vec<AmqpValue>),
    Map(Vec<(Key, AmqpValue)>),
}

/// A map key: a name the code under test looks for, by index, or any text.
#[derive(Debug, Arbitrary)]
pub enum Key {
    Known(u8),
    Other(String),
}

impl AmqpValue {
    /// The value, with map keys from `keys` and lock tokens from `tokens`.
    pub fn build(self, keys: &[&str], tokens: &[[u8; 16]]) -> Value {
        match self {
            AmqpValue::Null => Value::Null,
            AmqpValue::Bool(b) => Value::Bool(b),
            AmqpValue::Int(n) => Value::Int(n),
            AmqpValue::Long(n) => Value::Long(n),
            AmqpValue::UInt(n) => Value::Uint(n),
            AmqpValue::ULong(n) => Value::Ulong(n),
            AmqpValue::Double(n) => Value::Double(n.into()),
            AmqpValue::String(s) => Value::String(s),
            AmqpValue::Binary(b) => Value::Binary(Binary::from(b)),
            AmqpValue::Uuid(u) => Value::Uuid(Uuid::from(u)),
            AmqpValue::LockToken(i) => match tokens {
                [] => Value::Uuid(Uuid::from([0; 16])),
                tokens => Value::Uuid(Uuid::from(tokens[usize::from(i) % tokens.len()])),
            },
            AmqpValue::Timestamp(ms) => Value::Timestamp(Timestamp::from_milliseconds(ms)),
            AmqpValue::Symbol(s) => Value::Symbol(s.into()),
            AmqpValue::List(items) => {
                Value::List(items.into_iter().map(|v| v.build(keys, tokens)).collect())
            }
            AmqpValue::Array(items) => Value::Array(Array(
                items.into_iter().map(|v| v.build(keys, tokens)).collect(),
            )),
            AmqpValue::Map(entries) => {
                let mut map = OrderedMap::new();
                for (key, value) in entries {
                    map.insert(Value::String(key.build(keys)), value.build(keys, tokens));
                }
                Value::Map(map)
            }
        }
    }
}

impl Key {
    /// The key as text.
    pub fn build(self, keys: &[&str]) -> String {
        match self {
            Key::Known(i) if !keys.is_empty() => keys[usize::from(i) % keys.len()].to_owned(),
            Key::Known(_) => String::new(),
            Key::Other(key) => key,
        }
    }
}
