//! HTTP statuses and `Retry-After` values as servers send them: classifying and reading them
//! never panics, and a retryable status carries exactly the `Retry-After` that parses. (The
//! worker's cap on what it then schedules is a unit test of `worker::decide`.)
#![no_main]

use arbitrary::Arbitrary;
use chrono::DateTime;
use libfuzzer_sys::fuzz_target;
use redeliver_core::{Outcome, RetryAfter, outcome_for_status};

#[derive(Debug, Arbitrary)]
struct Input {
    status: u16,
    retry_after: Option<String>,
    now_secs: i64,
}

fuzz_target!(|input: Input| {
    let outcome = outcome_for_status(input.status, input.retry_after.as_deref());
    let parsed = input.retry_after.as_deref().and_then(RetryAfter::parse);
    let Outcome::Retry { retry_after, .. } = outcome else {
        return;
    };
    assert_eq!(retry_after, parsed);
    let Some(now) = DateTime::from_timestamp(input.now_secs % (400 * 365 * 86_400), 0) else {
        return;
    };
    let Some(retry_after) = retry_after else {
        return;
    };
    // A date gives a delay from any now, zero for the past.
    let _ = retry_after.delay_from(now);
});
