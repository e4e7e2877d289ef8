//! The test broker's `$cbs` and `$management` nodes, sent any request: every request gets a
//! reply with a status code, and none panics the broker.
#![no_main]

use arbitrary::Arbitrary;
use fe2o3_amqp_types::messaging::{
    AmqpValue as Value_, ApplicationProperties, Body, Data, Message, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue};
use libfuzzer_sys::fuzz_target;
use redeliver_fuzz::{AmqpValue, Key};
use redeliver_servicebus_testbroker::fuzzing::answer;

/// Operations and body keys the broker knows, for the fuzzer to pick from.
const OPERATIONS: &[&str] = &[
    "put-token",
    "com.microsoft:renew-lock",
    "com.microsoft:schedule-message",
    "com.microsoft:cancel-scheduled-message",
    "com.microsoft:update-disposition",
    "com.microsoft:receive-by-sequence-number",
    "com.microsoft:peek-message",
];
const KEYS: &[&str] = &[
    "lock-tokens",
    "messages",
    "message",
    "message-id",
    "sequence-numbers",
    "from-sequence-number",
    "message-count",
    "disposition-status",
    "deadletter-reason",
    "deadletter-description",
    "properties-to-modify",
    "receiver-settle-mode",
    "expirations",
];

#[derive(Debug, Arbitrary)]
struct Request {
    /// `None`: `$cbs`; otherwise the entity, by index into `q`, `q/$deadletterqueue`, other.
    to: Option<u8>,
    operation: Key,
    properties: Vec<(Key, i64)>,
    body: AmqpValue,
}

#[derive(Debug, Arbitrary)]
struct Input {
    stored: Vec<Vec<u8>>,
    locked: u8,
    requests: Vec<Request>,
}

fuzz_target!(|input: Input| {
    let stored = input
        .stored
        .into_iter()
        .take(8)
        .map(|body| Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: None,
            application_properties: None,
            body: Body::Data(vec![Data(Binary::from(body))].into()),
            footer: None,
        })
        .collect();
    let count = input.requests.len();
    let replies = answer(stored, usize::from(input.locked % 8), move |tokens| {
        input
            .requests
            .into_iter()
            .take(16)
            .map(|request| {
                let entity = request.to.map(|i| match i % 3 {
                    0 => "q".to_owned(),
                    1 => "q/$deadletterqueue".to_owned(),
                    _ => "missing".to_owned(),
                });
                let mut properties = ApplicationProperties::default();
                properties.0.insert(
                    "operation".to_owned(),
                    SimpleValue::String(request.operation.build(OPERATIONS)),
                );
                for (key, value) in request.properties {
                    properties
                        .0
                        .insert(key.build(KEYS), SimpleValue::Long(value));
                }
                let message = Message {
                    header: None,
                    delivery_annotations: None,
                    message_annotations: None,
                    properties: Some(Properties {
                        message_id: Some("request".to_owned().into()),
                        reply_to: Some("reply".to_owned()),
                        ..Properties::default()
                    }),
                    application_properties: Some(properties),
                    body: Body::Value(Value_(request.body.build(KEYS, tokens))),
                    footer: None,
                };
                (entity, message)
            })
            .collect()
    });
    assert_eq!(replies.len(), count.min(16), "every request is answered");
    for reply in replies {
        let properties = reply.application_properties.expect("a status");
        assert!(
            properties.0.contains_key("statusCode") || properties.0.contains_key("status-code"),
            "a reply says its status"
        );
    }
});
