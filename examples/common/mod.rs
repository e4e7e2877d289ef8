//! What the examples share: the transport from the command line, a timeline printer, and a
//! report that handlers fill in and `main` waits on.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redeliver::{Clock, Error, Transport};
use tokio::sync::watch;

/// The transport named by the first command-line argument or `REDELIVER_URL`, `memory://` by
/// default.
pub(crate) async fn transport_from_args() -> Result<Arc<dyn Transport>, Error> {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("REDELIVER_URL").ok())
        .unwrap_or_else(|| "memory://".to_owned());
    let parsed = redeliver::TransportUrl::parse(&url)?;
    println!("transport: {parsed}\n");
    redeliver::connect_to(&parsed).await
}

/// Prints timeline lines with the time since the start.
#[derive(Clone)]
pub(crate) struct Timeline {
    clock: Clock,
    start: DateTime<Utc>,
    quiet: bool,
}

impl Timeline {
    pub(crate) fn new(clock: Clock) -> Self {
        Timeline {
            start: clock.now(),
            clock,
            quiet: false,
        }
    }

    /// A timeline that prints nothing (for the tests that run the examples' scenarios).
    pub(crate) fn quiet(clock: Clock) -> Self {
        Timeline {
            quiet: true,
            ..Timeline::new(clock)
        }
    }

    pub(crate) fn log(&self, line: impl std::fmt::Display) {
        if !self.quiet {
            let since = (self.clock.now() - self.start).as_seconds_f64();
            println!("+{since:>6.2}s  {line}");
        }
    }
}

/// A report the handlers fill in; `main` waits until it is complete.
pub(crate) struct Report<R> {
    sender: Arc<watch::Sender<R>>,
}

impl<R> Clone for Report<R> {
    fn clone(&self) -> Self {
        Report {
            sender: Arc::clone(&self.sender),
        }
    }
}

impl<R: Clone + Default + std::fmt::Debug> Report<R> {
    pub(crate) fn new() -> Self {
        Report {
            sender: Arc::new(watch::Sender::new(R::default())),
        }
    }

    pub(crate) fn update(&self, change: impl FnOnce(&mut R)) {
        self.sender.send_modify(change);
    }

    /// Waits until `done` holds, at most `patience`, and returns the report. Panics with what
    /// was reported so far if it does not. Delivery is at-least-once, so a handler can report
    /// the same message twice: `done` counts with "at least", never "exactly".
    pub(crate) async fn wait_until(&self, patience: Duration, done: impl FnMut(&R) -> bool) -> R {
        let mut changes = self.sender.subscribe();
        match tokio::time::timeout(patience, changes.wait_for(done)).await {
            Ok(Ok(report)) => report.clone(),
            _ => panic!(
                "the example did not finish within {patience:?}; reported so far: {:#?}",
                *self.sender.borrow()
            ),
        }
    }
}

/// The final statistics of the consumer of `source`, from what
/// [`Host::shutdown`](redeliver::Host::shutdown) returned. Panics if the host had none.
pub(crate) fn stats_of(
    stats: Vec<(redeliver::Source, redeliver::WorkerStats)>,
    source: impl Into<redeliver::Source>,
) -> redeliver::WorkerStats {
    let source = source.into();
    stats
        .into_iter()
        .find_map(|(s, stats)| (s == source).then_some(stats))
        .unwrap_or_else(|| panic!("the host has no consumer of {source}"))
}
