//! Seed system 2: a document-scanning platform's consumers.
//!
//! - A message that is not valid JSON is dropped, logged (`InvalidPayload::Discard`); a message
//!   about a document that does not exist is dropped too (`Outcome::discard`).
//! - A processing error is retried; after the last attempt the message is dead-lettered. (On
//!   RabbitMQ the endpoint queue can also carry a broker-side `x-delivery-limit`, for messages
//!   whose handler crashes the process before it can settle.)
//! - A dead-letter listener "closes the loop": it marks each dead-lettered document as errored.
//!   Invalid dead letters are dropped; others are retried without limit (here the database is
//!   down for the listener's first try).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use redeliver::{
    Backoff, BackoffPolicy, Consumer, Context, Failure, Host, InvalidPayload, Jitter, Message,
    Outcome, Transport,
};
use serde::{Deserialize, Serialize};

use crate::common::{Report, Timeline, stats_of};

pub(crate) const DOCUMENTS: &str = "documents";
pub(crate) const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Scan {
    pub(crate) document_id: u32,
}

/// The documents' states, as the platform's database would hold them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Outcomes {
    /// Document id → state (`scanned`, `errored`).
    pub(crate) documents: BTreeMap<u32, String>,
    /// Handler calls per document.
    pub(crate) calls: BTreeMap<u32, u32>,
    /// Calls of the dead-letter listener.
    pub(crate) listener_calls: u32,
    /// Messages dropped by the document handler (unknown documents).
    pub(crate) discarded: u32,
}

/// What both handlers share.
struct App {
    report: Report<Outcomes>,
    timeline: Timeline,
}

/// Scans a document; unknown documents are dropped, document 2 always fails.
async fn scan(scan: Scan, ctx: Context<App>) -> Outcome {
    let App { report, timeline } = ctx.state();
    let id = scan.document_id;
    let mut outcome = Outcome::success();
    report.update(|r| {
        *r.calls.entry(id).or_default() += 1;
        outcome = match r.documents.get_mut(&id) {
            None => {
                r.discarded += 1;
                Outcome::discard(format!("document {id} does not exist"))
            }
            Some(_) if id == 2 => Outcome::retry("OCR engine crashed on page 3"),
            Some(state) => {
                *state = "scanned".into();
                Outcome::success()
            }
        };
    });
    let (attempt, kind) = (ctx.attempt(), outcome.kind());
    timeline.log(format!("document {id} attempt {attempt}: {kind}"));
    outcome
}

/// The dead-letter listener: marks the document as errored. The database is down for its
/// first try.
async fn mark_errored(scan: Scan, ctx: Context<App>) -> Result<(), Failure> {
    let App { report, timeline } = ctx.state();
    let id = scan.document_id;
    let mut first_try = false;
    report.update(|r| {
        r.listener_calls += 1;
        first_try = r.listener_calls == 1;
        if !first_try {
            r.documents.insert(id, "errored".into());
        }
    });
    let reason = ctx.dead_letter().map_or("", |d| d.reason.as_str());
    if first_try {
        let line =
            format!("listener: document {id} dead-lettered ({reason}); database down, retry");
        timeline.log(line);
        return Err(Failure::retry("database unavailable"));
    }
    timeline.log(format!("listener: document {id} marked errored ({reason})"));
    Ok(())
}

pub(crate) async fn run(
    transport: Arc<dyn Transport>,
    timeline: Timeline,
    delay: Duration,
) -> Result<(Outcomes, u64), redeliver::Error> {
    let report = Report::<Outcomes>::new();
    report.update(|r| {
        r.documents.insert(1, "uploaded".into());
        r.documents.insert(2, "uploaded".into());
    });
    let fixed = || {
        BackoffPolicy::builder()
            .backoff(Backoff::fixed(delay))
            .jitter(Jitter::None)
    };
    let app = App {
        report: report.clone(),
        timeline: timeline.clone(),
    };
    let host = Host::with_state(Arc::clone(&transport), app)
        .consumer(
            Consumer::endpoint(DOCUMENTS)
                .retry_policy(fixed().max_attempts(MAX_ATTEMPTS).build()?)
                .on_invalid_payload(InvalidPayload::Discard)
                .handler(scan),
        )
        .consumer(
            Consumer::dead_letters(DOCUMENTS)
                .retry_policy(fixed().unlimited_attempts().build()?)
                .on_invalid_payload(InvalidPayload::Discard)
                .handler(mark_errored),
        )
        .start()
        .await?;

    for message in [
        Message::json(&Scan { document_id: 1 })?,
        Message::json(&Scan { document_id: 2 })?,
        Message::json(&Scan { document_id: 99 })?,
        Message::new("%PDF-1.7 not a scan request"),
    ] {
        transport.send(DOCUMENTS, message).await?;
    }

    let outcomes = report
        .wait_until(delay * 60, |r| {
            r.documents.get(&2).is_some_and(|s| s == "errored") && r.calls.contains_key(&99)
        })
        .await;
    let discarded = stats_of(host.shutdown().await, DOCUMENTS).discarded;
    timeline.log(format!(
        "documents: {:?}; dropped: {discarded} (unknown and invalid)",
        outcomes.documents
    ));
    Ok((outcomes, discarded))
}
