//! The framework's headers, as any peer may send them: decoding never panics, a problem is
//! reported instead of a guess, and what the framework writes back decodes to the same state,
//! with a not-before never earlier.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use redeliver_core::{Headers, Message, wire};
use redeliver_fuzz::{HeaderName, HeaderValue, assert_same_state};

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
        message
            .headers()
            .iter()
            .all(|(k, _)| !k.starts_with(wire::PREFIX)),
        "framework headers are never shown to handlers"
    );

    let again =
        wire::decode_headers(Message::new(Vec::new()).with_headers(wire::encode_headers(message)));
    assert_eq!(again.problem, None, "what the framework writes reads back");
    assert_same_state(message, &again.message);
    assert_eq!(again.message.headers(), message.headers());
});
