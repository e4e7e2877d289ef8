//! A RabbitMQ delivery as any publisher may make it: the content header's properties parsed from
//! the wire, as the client parses them, then converted. Converting never panics, a malformed
//! framework header is reported as a problem, and a message the framework sends again converts
//! back to the same state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redeliver_fuzz::assert_same_state;
use redeliver_rabbitmq::fuzzing::{incoming, properties};

const PREFIX: &str = "rdlv.";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, wire)) = data.split_first() else {
        return;
    };
    let Ok((body, parsed)) = lapin::protocol::basic::parse_properties(wire) else {
        return;
    };
    let from_dead_letters = flags & 1 == 1;
    let (message, _problem) = incoming(PREFIX, &parsed, body.to_vec(), from_dead_letters);
    assert!(message.attempt() >= 1);

    // What the framework would send of it (a retry copy, say) reads back the same.
    let Ok(sent) = properties(&message) else {
        return;
    };
    let (back, problem) = incoming(PREFIX, &sent, message.body().to_vec(), from_dead_letters);
    assert_eq!(problem, None, "what the framework writes reads back");
    assert_eq!(back.id(), message.id());
    assert_same_state(&message, &back);
});
