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
    Backoff, BackoffPolicy, Context, InvalidPayload, Jitter, Message, Outcome, Source, Topology,
    Transport, Worker,
};
use serde::{Deserialize, Serialize};

use crate::common::{Report, Timeline};

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

pub(crate) async fn run(
    transport: Arc<dyn Transport>,
    timeline: Timeline,
    delay: Duration,
) -> Result<(Outcomes, u64), redeliver::Error> {
    transport
        .declare(&Topology::new().endpoint(DOCUMENTS))
        .await?;
    let report = Report::<Outcomes>::new();
    report.update(|r| {
        r.documents.insert(1, "uploaded".into());
        r.documents.insert(2, "uploaded".into());
    });
    let fixed = |max_attempts: Option<u32>| {
        let builder = BackoffPolicy::builder()
            .backoff(Backoff::fixed(delay))
            .jitter(Jitter::None);
        match max_attempts {
            Some(n) => builder.max_attempts(n),
            None => builder.unlimited_attempts(),
        }
        .build()
    };

    let (log, seen) = (timeline.clone(), report.clone());
    let scanner = Worker::builder(Arc::clone(&transport), DOCUMENTS)
        .retry_policy(fixed(Some(MAX_ATTEMPTS))?)
        .on_invalid_payload(InvalidPayload::Discard)
        .start(move |scan: Scan, ctx: Context| {
            let id = scan.document_id;
            let mut known = false;
            seen.update(|r| {
                *r.calls.entry(id).or_default() += 1;
                known = r.documents.contains_key(&id);
                if !known {
                    r.discarded += 1;
                }
            });
            let outcome = match (known, id) {
                (false, _) => Outcome::discard(format!("document {id} does not exist")),
                (true, 2) => Outcome::retry("OCR engine crashed on page 3"),
                (true, _) => {
                    seen.update(|r| {
                        r.documents.insert(id, "scanned".into());
                    });
                    Outcome::success()
                }
            };
            log.log(format!(
                "document {id} attempt {}: {}",
                ctx.attempt(),
                outcome.kind()
            ));
            async move { outcome }
        })
        .await?;

    let (log, seen) = (timeline.clone(), report.clone());
    let listener = Worker::builder(Arc::clone(&transport), Source::dead_letters(DOCUMENTS))
        .retry_policy(fixed(None)?)
        .on_invalid_payload(InvalidPayload::Discard)
        .start(move |scan: Scan, ctx: Context| {
            let mut first_try = false;
            seen.update(|r| {
                r.listener_calls += 1;
                first_try = r.listener_calls == 1;
            });
            let reason = ctx
                .dead_letter()
                .map(|d| d.reason.clone())
                .unwrap_or_default();
            let outcome = if first_try {
                log.log(format!(
                    "listener: document {} dead-lettered ({reason}); database down, retry",
                    scan.document_id
                ));
                Outcome::retry("database unavailable")
            } else {
                log.log(format!(
                    "listener: document {} marked errored ({reason})",
                    scan.document_id
                ));
                seen.update(|r| {
                    r.documents.insert(scan.document_id, "errored".into());
                });
                Outcome::success()
            };
            async move { outcome }
        })
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
    listener.shutdown().await;
    let scanner_stats = scanner.shutdown().await;
    timeline.log(format!(
        "documents: {:?}; dropped: {} (unknown and invalid)",
        outcomes.documents, scanner_stats.discarded
    ));
    Ok((outcomes, scanner_stats.discarded))
}
