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
    Backoff, BackoffPolicy, Consumer, Context, Failure, Host, Jitter, Message, Transport,
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

/// What the handlers share.
struct App {
    report: Report<Outcomes>,
    timeline: Timeline,
}

/// Invalid requests to their own endpoint; the others fail `failures` times, then work.
async fn process(request: Request, ctx: Context<App>) -> Result<(), Failure> {
    let App { report, timeline } = ctx.state();
    let id = request.id;
    let retry_count = ctx.attempt() - 1;
    report.update(|r| r.calls.push((id.clone(), retry_count)));
    if request.amount <= 0 {
        let amount = request.amount;
        timeline.log(format!(
            "{id}: invalid (amount {amount}): to `{INVALID_REQUESTS}`, never retried"
        ));
        // The request as it came, its id and headers kept.
        return Ok(ctx.send(INVALID_REQUESTS, ctx.message().clone()).await?);
    }
    if retry_count < request.failures {
        timeline.log(format!("{id}: retry count {retry_count}: processing error"));
        return Err(Failure::retry("downstream timeout"));
    }
    timeline.log(format!("{id}: retry count {retry_count}: processed"));
    report.update(|r| r.processed.push(id));
    Ok(())
}

async fn record_invalid(request: Request, ctx: Context<App>) -> Result<(), Failure> {
    ctx.state().report.update(|r| r.invalid.push(request.id));
    Ok(())
}

async fn record_dead_letter(request: Request, ctx: Context<App>) -> Result<(), Failure> {
    let App { report, timeline } = ctx.state();
    let id = request.id;
    let reason = ctx
        .dead_letter()
        .map_or(String::new(), |d| d.reason.clone());
    let source = ctx.headers().get("source").map(str::to_owned);
    let retry_count = ctx.attempt() - 1;
    timeline.log(format!(
        "{id}: dead letter after retry count {retry_count}, reason `{reason}`, header source={source:?}"
    ));
    report.update(|r| r.dead_letters.push((id, retry_count, reason, source)));
    Ok(())
}

pub(crate) async fn run(
    transport: Arc<dyn Transport>,
    timeline: Timeline,
    delay: Duration,
) -> Result<Outcomes, redeliver::Error> {
    let report = Report::<Outcomes>::new();
    let policy = BackoffPolicy::builder()
        .max_attempts(MAX_ATTEMPTS)
        .backoff(Backoff::exponential(delay, delay * 8))
        .jitter(Jitter::None)
        .build()?;
    let app = App {
        report: report.clone(),
        timeline,
    };
    let host = Host::with_state(Arc::clone(&transport), app)
        .consumer(
            Consumer::endpoint(PROCESSOR)
                .retry_policy(policy)
                .handler(process),
        )
        .consumer(Consumer::endpoint(INVALID_REQUESTS).handler(record_invalid))
        .consumer(Consumer::dead_letters(PROCESSOR).handler(record_dead_letter))
        .start()
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
    host.shutdown().await;
    Ok(outcomes)
}
