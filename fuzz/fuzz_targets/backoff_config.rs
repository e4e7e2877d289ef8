//! Retry policies from configuration (`[consumers.<name>.retry]`, here as JSON): a policy that
//! builds computes every delay without panicking, and within its cap.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use redeliver_core::host::RetryConfig;
use redeliver_core::{FailedAttempt, RetryPolicy};

fuzz_target!(|data: &[u8]| {
    let Ok(config) = serde_json::from_slice::<RetryConfig>(data) else {
        return;
    };
    let Ok(policy) = config.build() else {
        return;
    };
    assert!(policy.max_attempts() >= 1);
    let mut previous = None;
    for attempt in (1..=40).chain([1000, u32::MAX - 1, u32::MAX]) {
        let failed = FailedAttempt::new(attempt).with_previous_delay(previous);
        let delay = policy.delay(&failed);
        if let Some(cap) = config.max_delay {
            assert!(
                delay <= cap,
                "attempt {attempt}: {delay:?} over the cap {cap:?}"
            );
        }
        let retry_after = Duration::from_secs(u64::from(attempt % 90));
        let _ = policy.delay(&failed.clone().with_retry_after(Some(retry_after)));
        previous = Some(delay);
    }
});
