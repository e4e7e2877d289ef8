//! Observing what handlers and transports did, and waiting for it without sleeping.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use redeliver_core::{Clock, ConsumeOptions, Context, Message, Source, Transport};
use tokio::sync::watch;

/// One handler call, as the handler saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// The message id.
    pub message_id: String,
    /// The endpoint the handler consumed.
    pub endpoint: String,
    /// The attempt number.
    pub attempt: u32,
    /// When the handler was called, on the transport's clock.
    pub at: DateTime<Utc>,
    /// The message's not-before.
    pub not_before: Option<DateTime<Utc>>,
    /// The application's headers, as the handler saw them (none the broker or the framework
    /// added).
    pub headers: Vec<(String, String)>,
    /// Why the previous attempt failed.
    pub last_failure: Option<String>,
}

/// Records handler calls, checking on every call that it did not come before the message's
/// not-before, and lets a test wait for a number of calls.
#[derive(Clone)]
pub struct Calls {
    clock: Clock,
    calls: Arc<Mutex<Vec<Call>>>,
    changed: Arc<watch::Sender<usize>>,
}

impl Calls {
    /// A recorder reading time from `clock` (use the transport's).
    pub fn new(clock: Clock) -> Self {
        Calls {
            clock,
            calls: Arc::default(),
            changed: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Records a call.
    ///
    /// # Panics
    /// If the call came before the message's not-before: the guarantee every transport and the
    /// worker must keep. (The worker turns the panic into a retry; [`Calls::all`] also checks.)
    pub fn record(&self, ctx: &Context) -> Call {
        let call = Call {
            message_id: ctx.message_id().to_string(),
            endpoint: ctx.endpoint().to_owned(),
            attempt: ctx.attempt(),
            at: self.clock.now(),
            not_before: ctx.not_before(),
            headers: ctx
                .headers()
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            last_failure: ctx.last_failure().map(str::to_owned),
        };
        let count = {
            let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
            calls.push(call.clone());
            calls.len()
        };
        self.changed.send_replace(count);
        assert_not_early(&call);
        call
    }

    /// Every call so far, in order. Panics if any came before its not-before.
    pub fn all(&self) -> Vec<Call> {
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        calls.iter().for_each(assert_not_early);
        calls
    }

    /// How many calls so far.
    pub fn count(&self) -> usize {
        *self.changed.borrow()
    }

    /// The attempt numbers of the calls, in order.
    pub fn attempts(&self) -> Vec<u32> {
        self.all().iter().map(|c| c.attempt).collect()
    }

    /// The attempts of the calls made on `endpoint`, in order.
    pub fn attempts_on(&self, endpoint: &str) -> Vec<u32> {
        self.all()
            .iter()
            .filter(|c| c.endpoint == endpoint)
            .map(|c| c.attempt)
            .collect()
    }

    /// The time between consecutive calls.
    pub fn gaps(&self) -> Vec<Duration> {
        self.all()
            .windows(2)
            .map(|w| (w[1].at - w[0].at).to_std().unwrap_or_default())
            .collect()
    }

    /// Waits until at least `n` calls were made.
    ///
    /// # Panics
    /// After `patience` without them.
    pub async fn wait_for(&self, n: usize, patience: Duration) {
        let mut changes = self.changed.subscribe();
        let reached = changes.wait_for(|count| *count >= n);
        expect_within(patience, &format!("{n} handler calls"), reached)
            .await
            .expect("the recorder outlives its waiters");
    }
}

fn assert_not_early(call: &Call) {
    if let Some(not_before) = call.not_before {
        assert!(
            call.at >= not_before,
            "handler called at {} before the not-before {} (message {}, attempt {})",
            call.at,
            not_before,
            call.message_id,
            call.attempt
        );
    }
}

/// Awaits `future` for at most `patience`.
///
/// # Panics
/// If it takes longer, naming `what` was awaited.
pub(crate) async fn expect_within<F: Future>(
    patience: Duration,
    what: &str,
    future: F,
) -> F::Output {
    tokio::time::timeout(patience, future)
        .await
        .unwrap_or_else(|_| panic!("did not see {what} within {patience:?}"))
}

/// Takes the dead letters of an endpoint straight from the transport, without decoding them,
/// and records them (completing each, which removes it).
pub struct DeadLetterProbe {
    seen: watch::Receiver<Vec<Message>>,
    task: tokio::task::JoinHandle<()>,
}

impl DeadLetterProbe {
    /// Starts consuming the dead letters of `endpoint`.
    pub async fn start(transport: &Arc<dyn Transport>, endpoint: &str) -> Self {
        let mut stream = transport
            .consume(
                &Source::dead_letters(endpoint),
                ConsumeOptions::default().with_prefetch(16),
            )
            .await
            .expect("the transport can consume dead letters");
        let (tx, seen) = watch::channel(Vec::new());
        let task = tokio::spawn(async move {
            while let Some(next) = stream.next().await {
                let Ok(delivery) = next else { continue };
                let message = delivery.message().clone();
                delivery
                    .complete()
                    .await
                    .expect("a dead letter can be completed");
                tx.send_modify(|seen| seen.push(message));
            }
        });
        DeadLetterProbe { seen, task }
    }

    /// Waits until at least `n` dead letters arrived, and returns all seen so far.
    ///
    /// # Panics
    /// After `patience` without them.
    pub async fn wait_for(&mut self, n: usize, patience: Duration) -> Vec<Message> {
        let reached = self.seen.wait_for(|seen| seen.len() >= n);
        let seen = expect_within(patience, &format!("{n} dead letters"), reached).await;
        seen.expect("the probe runs until stopped").clone()
    }

    /// The dead letters seen so far.
    pub fn seen(&self) -> Vec<Message> {
        self.seen.borrow().clone()
    }
}

impl Drop for DeadLetterProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}
