//! Seed system 4: a retry design for an integration platform.
//!
//! - Messages are immutable: a retry is a **new** message carrying the retry count (redeliver's
//!   attempt: the retry count is `attempt - 1`, so retries carry 1, 2, ..., max) and an
//!   exponential delay; the original is acknowledged.
//! - Invalid requests go to their own endpoint (`invalid-requests`) and are never retried; only
//!   processing errors are.
//! - At max retries the message is dead-lettered with its headers kept and the cause as reason.

use std::sync::Arc;
use std::time::Duration;

use redeliver::{
    Backoff, BackoffPolicy, Context, Jitter, Message, Outcome, Source, Topology, Transport, Worker,
};
use serde::{Deserialize, Serialize};

use crate::common::{Report, Timeline};

pub(crate) const PROCESSOR: &str = "processor";
pub(crate) const INVALID_REQUESTS: &str = "invalid-requests";
/// Total handler calls: the first try and three retries.
pub(crate) const MAX_ATTEMPTS: u32 = 4;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    pub(crate) id: String,
    pub(crate) amount: i64,
    /// How many times the downstream system fails for this request before it works.
    pub(crate) failures: u32,
}

/// What happened, for the test to check.
#[derive(Clone, Debug, Default)]
pub(crate) struct Outcomes {
    /// (request id, retry count) of every handler call.
    pub(crate) calls: Vec<(String, u32)>,
    /// Request ids processed successfully.
    pub(crate) processed: Vec<String>,
    /// Request ids that reached `invalid-requests`.
    pub(crate) invalid: Vec<String>,
    /// (request id, retry count, reason, header `source`) of each dead letter.
    pub(crate) dead_letters: Vec<(String, u32, String, Option<String>)>,
}

pub(crate) async fn run(
    transport: Arc<dyn Transport>,
    timeline: Timeline,
    delay: Duration,
) -> Result<Outcomes, redeliver::Error> {
    transport
        .declare(
            &Topology::new()
                .endpoint(PROCESSOR)
                .endpoint(INVALID_REQUESTS),
        )
        .await?;
    let report = Report::<Outcomes>::new();
    let policy = BackoffPolicy::builder()
        .max_attempts(MAX_ATTEMPTS)
        .backoff(Backoff::exponential(delay, delay * 8))
        .jitter(Jitter::None)
        .build()?;

    let (log, seen, sender) = (timeline.clone(), report.clone(), Arc::clone(&transport));
    let processor = Worker::builder(Arc::clone(&transport), PROCESSOR)
        .retry_policy(policy)
        .start(move |request: Request, ctx: Context| {
            let retry_count = ctx.attempt() - 1;
            seen.update(|r| r.calls.push((request.id.clone(), retry_count)));
            let (log, seen, sender) = (log.clone(), seen.clone(), Arc::clone(&sender));
            async move {
                if request.amount <= 0 {
                    log.log(format!(
                        "{}: invalid (amount {}): to `{INVALID_REQUESTS}`, never retried",
                        request.id, request.amount
                    ));
                    return sender
                        .send(INVALID_REQUESTS, ctx.message().clone())
                        .await
                        .into();
                }
                if retry_count < request.failures {
                    log.log(format!(
                        "{}: retry count {retry_count}: processing error",
                        request.id
                    ));
                    Outcome::retry("downstream timeout")
                } else {
                    log.log(format!(
                        "{}: retry count {retry_count}: processed",
                        request.id
                    ));
                    seen.update(|r| r.processed.push(request.id));
                    Outcome::success()
                }
            }
        })
        .await?;
    let seen = report.clone();
    let invalid = Worker::builder(Arc::clone(&transport), INVALID_REQUESTS)
        .start(move |request: Request, _: Context| {
            seen.update(|r| r.invalid.push(request.id));
            async { Outcome::success() }
        })
        .await?;
    let (log, seen) = (timeline.clone(), report.clone());
    let dead_letters = Worker::builder(Arc::clone(&transport), Source::dead_letters(PROCESSOR))
        .start(move |request: Request, ctx: Context| {
            let reason = ctx.dead_letter().map(|d| d.reason.clone()).unwrap_or_default();
            let source = ctx.headers().get("source").map(str::to_owned);
            let retry_count = ctx.attempt() - 1;
            log.log(format!(
                "{}: dead letter after retry count {retry_count}, reason `{reason}`, header source={source:?}",
                request.id
            ));
            seen.update(|r| r.dead_letters.push((request.id, retry_count, reason, source)));
            async { Outcome::success() }
        })
        .await?;

    // order-1 works at once, order-2 after two retries, order-3 is invalid, order-4 never works.
    let requests = [
        ("order-1", 100, 0),
        ("order-2", 250, 2),
        ("order-3", -5, 0),
        ("order-4", 80, 99),
    ];
    for (id, amount, failures) in requests {
        let request = Request {
            id: id.into(),
            amount,
            failures,
        };
        let message = Message::json(&request)?
            .with_id(id)
            .with_header("source", "erp");
        transport.send(PROCESSOR, message).await?;
    }

    let outcomes = report
        .wait_until(delay * 60, |r| {
            r.processed.len() >= 2 && !r.invalid.is_empty() && !r.dead_letters.is_empty()
        })
        .await;
    for worker in [processor, invalid, dead_letters] {
        worker.shutdown().await;
    }
    Ok(outcomes)
}
