//! Shared helpers for the integration tests: the conformance suite's call recorder (which checks
//! the not-before guarantee on every handler call), and bounded waiting.

#![allow(dead_code, unreachable_pub, unused_imports)]

use std::future::Future;
use std::time::Duration;

pub use redeliver_conformance::Calls;

/// Awaits `future` for at most a (virtual, when time is paused) day, so a test whose condition
/// never comes fails instead of hanging.
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(24 * 3600), future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Seconds as a `Duration`.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
