//! A Service Bus message as any sender may make it, decoded from AMQP 1.0 bytes as the client
//! decodes them, then converted. Converting never panics; a malformed framework property is
//! reported as a problem, never guessed.
#![no_main]

use fe2o3_amqp_types::messaging::message::__private::Deserializable;
use fe2o3_amqp_types::messaging::{Body, Message};
use libfuzzer_sys::fuzz_target;
use redeliver_servicebus::fuzzing::from_amqp;
use serde_amqp::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, wire)) = data.split_first() else {
        return;
    };
    let Ok(Deserializable(raw)) =
        serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(wire)
    else {
        return;
    };
    let (message, _problem) = from_amqp(&raw, i64::from(flags), flags & 1 == 1);
    assert!(message.attempt() >= 1);
});
