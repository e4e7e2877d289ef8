//! The framework's headers, as any peer may send them: decoding never panics, a problem is
//! reported instead of a guess, and what the framework writes back decodes to the same state,
//! with a not-before never earlier.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use redeliver_core::{Headers, Message, wire};
use redeliver_fuzz::{HeaderName, HeaderValue};

#[derive(Debug, Arbitrary)]
struct Input {
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let mut headers = Headers::new();
    for (name, value) in input.headers {
        headers.insert(name.as_str(), value.into_text());
    }
    let decoded = wire::decode_headers(Message::new(input.body).with_headers(headers));
    let message = &decoded.message;
    assert!(message.attempt() >= 1);
    assert!(
        message.headers().iter().all(|(k, _)| !k.starts_with(wire::PREFIX)),
        "framework headers are never shown to handlers"
    );

    let again = wire::decode_headers(
        Message::new(Vec::new()).with_headers(wire::encode_headers(message)),
    );
    assert_eq!(again.problem, None, "what the framework writes reads back");
    let back = &again.message;
    assert_eq!(back.attempt(), message.attempt());
    assert_eq!(back.last_failure(), message.last_failure());
    assert_eq!(back.last_delay(), message.last_delay());
    assert_eq!(back.dead_letter(), message.dead_letter());
    assert_eq!(back.headers(), message.headers());
    match (message.not_before(), back.not_before()) {
        (None, None) => {}
        (Some(sent), Some(read)) => assert!(read >= sent, "a not-before moved earlier"),
        (sent, read) => panic!("not-before {sent:?} came back as {read:?}"),
    }
});
