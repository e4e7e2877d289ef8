//! Request/response operations on `$cbs` and `<entity>/$management`.

use fe2o3_amqp_types::messaging::message::__private::{Deserializable, Serializable};
use fe2o3_amqp_types::messaging::{AmqpValue, ApplicationProperties, Body, Message, Properties};
use fe2o3_amqp_types::primitives::{Array, Binary, OrderedMap, SimpleValue, Timestamp, Uuid};
use serde_amqp::Value;
use tokio::time::Instant;

use crate::state::{LockError, Msg, Refusal, Settlement, State, now_ms};

const OPERATION: &str = "operation";
const PUT_TOKEN: &str = "put-token";
const RENEW_LOCK: &str = "com.microsoft:renew-lock";
const SCHEDULE_MESSAGE: &str = "com.microsoft:schedule-message";
const CANCEL_SCHEDULED_MESSAGE: &str = "com.microsoft:cancel-scheduled-message";
const UPDATE_DISPOSITION: &str = "com.microsoft:update-disposition";
const RECEIVE_BY_SEQUENCE_NUMBER: &str = "com.microsoft:receive-by-sequence-number";
const PEEK_MESSAGE: &str = "com.microsoft:peek-message";

/// A reply: status code, description and body.
pub(crate) struct Reply {
    status: i32,
    description: String,
    body: Value,
    /// Status properties named as the CBS spec does (`status-code`, `status-description`)
    /// instead of as Service Bus management does (`statusCode`, `statusDescription`).
    cbs: bool,
}

impl Reply {
    fn ok(status: i32, body: Value) -> Self {
        Self {
            status,
            description: "OK".to_owned(),
            body,
            cbs: false,
        }
    }

    fn error(status: i32, description: impl Into<String>) -> Self {
        Self {
            status,
            description: description.into(),
            body: Value::Null,
            cbs: false,
        }
    }

    /// The reply message correlated to `request`.
    pub(crate) fn into_message(self, request: &Msg) -> Msg {
        let (code_key, description_key) = if self.cbs {
            ("status-code", "status-description")
        } else {
            ("statusCode", "statusDescription")
        };
        let mut application_properties = ApplicationProperties::default();
        application_properties
            .0
            .insert(code_key.to_owned(), SimpleValue::Int(self.status));
        application_properties.0.insert(
            description_key.to_owned(),
            SimpleValue::String(self.description),
        );
        let correlation_id = request
            .properties
            .as_ref()
            .and_then(|p| p.message_id.clone());
        Message::builder()
            .properties(Properties {
                correlation_id,
                ..Properties::default()
            })
            .application_properties(application_properties)
            .body(Body::Value(AmqpValue(self.body)))
            .build()
    }
}

fn operation(request: &Msg) -> Option<&str> {
    match request.application_properties.as_ref()?.0.get(OPERATION)? {
        SimpleValue::String(s) => Some(s.as_str()),
        SimpleValue::Symbol(s) => Some(s.as_str()),
        _ => None,
    }
}

fn body_map(request: &Msg) -> Option<&OrderedMap<Value, Value>> {
    match &request.body {
        Body::Value(AmqpValue(Value::Map(map))) => Some(map),
        _ => None,
    }
}

fn field<'a>(request: &'a Msg, key: &str) -> Option<&'a Value> {
    body_map(request)?.get(&Value::String(key.to_owned()))
}

fn values(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(array) => array.0.iter().collect(),
        Value::List(list) => list.iter().collect(),
        other => vec![other],
    }
}

fn lock_tokens(request: &Msg) -> Option<Vec<[u8; 16]>> {
    values(field(request, "lock-tokens")?)
        .into_iter()
        .map(|v| match v {
            Value::Uuid(uuid) => Some(*uuid.as_inner()),
            _ => None,
        })
        .collect()
}

fn sequence_numbers(request: &Msg) -> Option<Vec<i64>> {
    values(field(request, "sequence-numbers")?)
        .into_iter()
        .map(|v| match v {
            Value::Long(n) => Some(*n),
            _ => None,
        })
        .collect()
}

fn long_field(request: &Msg, key: &str) -> Option<i64> {
    match field(request, key)? {
        Value::Long(n) => Some(*n),
        Value::Int(n) => Some(i64::from(*n)),
        Value::Uint(n) => Some(i64::from(*n)),
        _ => None,
    }
}

fn encode(message: &Msg) -> Value {
    Value::Binary(Binary::from(
        serde_amqp::to_vec(&Serializable(message)).unwrap_or_default(),
    ))
}

fn messages_body(entries: Vec<OrderedMap<Value, Value>>) -> Value {
    let mut body = OrderedMap::new();
    body.insert(
        Value::String("messages".to_owned()),
        Value::List(entries.into_iter().map(Value::Map).collect()),
    );
    Value::Map(body)
}

fn properties_to_modify(request: &Msg) -> Vec<(String, SimpleValue)> {
    match field(request, "properties-to-modify") {
        Some(Value::Map(map)) => map
            .iter()
            .filter_map(|(key, value)| match key {
                Value::String(key) | Value::Symbol(fe2o3_amqp_types::primitives::Symbol(key)) => {
                    SimpleValue::try_from(value.clone())
                        .ok()
                        .map(|value| (key.clone(), value))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn string_field(request: &Msg, key: &str) -> Option<String> {
    match field(request, key)? {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

fn decode_scheduled(request: &Msg) -> Option<Vec<Msg>> {
    let Value::List(list) = field(request, "messages")? else {
        return None;
    };
    list.iter()
        .map(|entry| {
            let Value::Map(map) = entry else {
                return None;
            };
            let Value::Binary(bytes) = map.get(&Value::String("message".to_owned()))? else {
                return None;
            };
            serde_amqp::from_slice::<Deserializable<Msg>>(bytes.as_ref())
                .ok()
                .map(|d| d.0)
        })
        .collect()
}

fn refusal_reply(refusal: Refusal) -> Reply {
    match refusal {
        Refusal::NotFound(entity) => Reply::error(404, format!("entity `{entity}` not found")),
        Refusal::TooLarge { size, max } => Reply::error(
            413,
            format!("message of {size} bytes exceeds the maximum of {max} bytes"),
        ),
        Refusal::HeadersTooLarge { size, max } => Reply::error(
            413,
            format!("the header sections of {size} bytes exceed the maximum of {max} bytes"),
        ),
        Refusal::Rejected(reason) => Reply::error(403, reason),
    }
}

fn lock_lost() -> Reply {
    Reply::error(
        410,
        "The lock supplied is invalid. Either the lock expired, or the message has already been \
         removed from the queue (MessageLockLost).",
    )
}

/// Answers a `$cbs` request: every `put-token` is accepted (status 202). The status is in
/// `status-code` / `status-description`, as the CBS draft names them (the Python SDK reads
/// only these; `fe2o3-amqp-cbs` reads either spelling).
pub(crate) fn handle_cbs(request: &Msg) -> Reply {
    let reply = match operation(request) {
        Some(PUT_TOKEN) => Reply {
            status: 202,
            description: "Accepted".to_owned(),
            body: Value::Null,
            cbs: true,
        },
        other => Reply::error(400, format!("unsupported $cbs operation {other:?}")),
    };
    Reply { cbs: true, ..reply }
}

/// Answers a management request on the management node of `entity`.
pub(crate) fn handle_management(state: &mut State, entity: &str, request: &Msg) -> Reply {
    let now = Instant::now();
    let now_ms = now_ms();
    match operation(request) {
        Some(RENEW_LOCK) => {
            let Some(tokens) = lock_tokens(request) else {
                return Reply::error(400, "lock-tokens missing or not an array of uuids");
            };
            let mut expirations = Vec::with_capacity(tokens.len());
            for token in tokens {
                match state.renew_lock(token, now, now_ms) {
                    Ok(until_ms) => {
                        expirations.push(Value::Timestamp(Timestamp::from_milliseconds(until_ms)));
                    }
                    Err(LockError::Lost) => return lock_lost(),
                    Err(LockError::NotAllowed(description)) => {
                        return Reply::error(400, description);
                    }
                }
            }
            let mut body = OrderedMap::new();
            body.insert(
                Value::String("expirations".to_owned()),
                Value::Array(Array(expirations)),
            );
            Reply::ok(200, Value::Map(body))
        }
        Some(SCHEDULE_MESSAGE) => {
            let Some(messages) = decode_scheduled(request) else {
                return Reply::error(400, "messages missing or not decodable");
            };
            match state.schedule(entity, messages, now, now_ms) {
                Ok(numbers) => {
                    let mut body = OrderedMap::new();
                    body.insert(
                        Value::String("sequence-numbers".to_owned()),
                        Value::Array(Array(numbers.into_iter().map(Value::Long).collect())),
                    );
                    Reply::ok(200, Value::Map(body))
                }
                Err(refusal) => refusal_reply(refusal),
            }
        }
        Some(CANCEL_SCHEDULED_MESSAGE) => {
            let Some(numbers) = sequence_numbers(request) else {
                return Reply::error(400, "sequence-numbers missing or not an array of longs");
            };
            // All or none, as Service Bus: a message that was enqueued already (or never
            // scheduled) cannot be cancelled.
            let missing = numbers.iter().find(|n| !state.is_scheduled(entity, **n));
            if let (true, Some(missing)) = (state.is_sendable(entity), missing) {
                return Reply::error(
                    404,
                    format!(
                        "no scheduled message with sequence number {missing} (MessageNotFound)"
                    ),
                );
            }
            match state.cancel_scheduled(entity, &numbers) {
                Ok(()) => Reply::ok(200, Value::Map(OrderedMap::new())),
                Err(refusal) => refusal_reply(refusal),
            }
        }
        Some(UPDATE_DISPOSITION) => {
            let Some(tokens) = lock_tokens(request) else {
                return Reply::error(400, "lock-tokens missing or not an array of uuids");
            };
            let settlement = match string_field(request, "disposition-status").as_deref() {
                Some("completed") => Settlement::Complete,
                Some("abandoned") => Settlement::Abandon(properties_to_modify(request)),
                Some("defered" | "deferred") => Settlement::Defer(properties_to_modify(request)),
                Some("suspended") => Settlement::DeadLetter {
                    reason: string_field(request, "deadletter-reason"),
                    description: string_field(request, "deadletter-description"),
                    properties: properties_to_modify(request),
                },
                other => {
                    return Reply::error(400, format!("unknown disposition-status {other:?}"));
                }
            };
            for token in tokens {
                match state.settle(token, settlement.clone(), now) {
                    Ok(()) => {}
                    Err(LockError::Lost) => return lock_lost(),
                    Err(LockError::NotAllowed(description)) => {
                        return Reply::error(400, description);
                    }
                }
            }
            Reply::ok(200, Value::Map(OrderedMap::new()))
        }
        Some(RECEIVE_BY_SEQUENCE_NUMBER) => {
            let Some(numbers) = sequence_numbers(request) else {
                return Reply::error(400, "sequence-numbers missing or not an array of longs");
            };
            match state.receive_deferred(entity, &numbers, now, now_ms) {
                Ok(received) => {
                    let entries = received
                        .into_iter()
                        .map(|(token, message)| {
                            let mut entry = OrderedMap::new();
                            entry.insert(
                                Value::String("lock-token".to_owned()),
                                Value::Uuid(Uuid::from(token)),
                            );
                            entry.insert(Value::String("message".to_owned()), encode(&message));
                            entry
                        })
                        .collect();
                    Reply::ok(200, messages_body(entries))
                }
                Err(missing) => Reply::error(
                    404,
                    format!(
                        "deferred message with sequence number {missing} not found (MessageNotFound)"
                    ),
                ),
            }
        }
        Some(PEEK_MESSAGE) => {
            let from = long_field(request, "from-sequence-number").unwrap_or(0);
            let count = long_field(request, "message-count").unwrap_or(1);
            let messages = state.peek(entity, from, usize::try_from(count).unwrap_or(0));
            if messages.is_empty() {
                return Reply::ok(204, Value::Null);
            }
            let entries = messages
                .iter()
                .map(|message| {
                    let mut entry = OrderedMap::new();
                    entry.insert(Value::String("message".to_owned()), encode(message));
                    entry
                })
                .collect();
            Reply::ok(200, messages_body(entries))
        }
        other => Reply::error(
            501,
            format!("management operation {other:?} is not supported by the test broker"),
        ),
    }
}
