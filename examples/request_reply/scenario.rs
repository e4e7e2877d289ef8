//! Seed system 3: request/reply with status envelopes.
//!
//! - A client sends requests with a reply-to and a fresh correlation id, waits with a time-out
//!   and tries again (a new correlation id each time).
//! - The responder answers with `statusCode`, `statusMessage` and optional `messages`.
//! - A stray reply (unknown correlation id) is put back a few times, then dead-lettered; a reply
//!   without a correlation id or with invalid JSON is dead-lettered at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use redeliver::request_reply::{
    RequestOptions, Requester, StatusEnvelope, StatusMessage, reply_to,
};
use redeliver::{Context, Message, Outcome, Source, Topology, Transport, Worker};
use serde::{Deserialize, Serialize};

use crate::common::{Report, Timeline};

pub(crate) const TAX_SERVICE: &str = "tax-service";
pub(crate) const REPLIES: &str = "web-shop-replies";

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TaxRequest {
    pub(crate) country: String,
    pub(crate) net_cents: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Tax {
    #[serde(default)]
    pub(crate) vat_cents: u64,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Outcomes {
    /// (country, status code, VAT) of each answer the client got.
    pub(crate) answers: Vec<(String, u16, u64)>,
    /// (country, error) of each request that got no answer.
    pub(crate) failures: Vec<(String, String)>,
    /// Whether the slow request timed out once before its answer.
    pub(crate) retried_after_time_out: bool,
    /// Reasons of the replies dead-lettered on the client's reply endpoint.
    pub(crate) dead_replies: Vec<String>,
}

pub(crate) async fn run(
    transport: Arc<dyn Transport>,
    timeline: Timeline,
    delay: Duration,
) -> Result<Outcomes, redeliver::Error> {
    transport
        .declare(&Topology::new().endpoint(TAX_SERVICE).endpoint(REPLIES))
        .await?;
    let report = Report::<Outcomes>::new();

    // The responder: answers 200 with the VAT, 422 for unknown countries; it is busy (does not
    // answer) the first time it sees a request for "SE".
    let (log, replier, sweden_seen) = (
        timeline.clone(),
        Arc::clone(&transport),
        Arc::new(AtomicU32::new(0)),
    );
    let responder = Worker::builder(Arc::clone(&transport), TAX_SERVICE)
        .concurrency(4)
        .start(move |request: TaxRequest, ctx: Context| {
            let envelope = match request.country.as_str() {
                "SE" if sweden_seen.fetch_add(1, Ordering::SeqCst) == 0 => None,
                "DE" | "SE" => Some(StatusEnvelope::new(
                    200,
                    "OK",
                    Tax {
                        vat_cents: request.net_cents * 19 / 100,
                    },
                )),
                other => Some(
                    StatusEnvelope::new(422, "Unprocessable", Tax::default()).with_message(
                        StatusMessage::new("country", "error")
                            .with_status("UNSUPPORTED")
                            .with_text(format!("no VAT rules for `{other}`")),
                    ),
                ),
            };
            let correlation = ctx
                .correlation_id()
                .unwrap_or("-")
                .chars()
                .take(8)
                .collect::<String>();
            match &envelope {
                None => log.log(format!(
                    "tax-service: {} (correlation {correlation}…): busy, no answer",
                    request.country
                )),
                Some(e) => log.log(format!(
                    "tax-service: {} (correlation {correlation}…): {}",
                    request.country, e.status_code
                )),
            }
            let reply = envelope.map(|e| reply_to(&ctx, &e));
            let replier = Arc::clone(&replier);
            async move {
                match reply {
                    None => Outcome::success(),
                    Some(Ok((endpoint, message))) => replier.send(&endpoint, message).await.into(),
                    Some(Err(e)) => {
                        Outcome::dead_letter_with("unanswerable request", e.to_string())
                    }
                }
            }
        })
        .await?;

    let options = RequestOptions::default()
        .with_timeout(delay * 4)
        .with_attempts(3)
        .with_app_id("web-shop")
        .with_unknown_replies(2, delay);
    let requester = Arc::new(Requester::start(Arc::clone(&transport), REPLIES, options).await?);

    let (log, seen) = (timeline.clone(), report.clone());
    let dead_replies = Worker::builder(Arc::clone(&transport), Source::dead_letters(REPLIES))
        .on_invalid_payload(redeliver::InvalidPayload::Discard)
        .start(move |_: serde_json::Value, ctx: Context| {
            let reason = ctx
                .dead_letter()
                .map(|d| d.reason.clone())
                .unwrap_or_default();
            log.log(format!("client: reply dead-lettered: {reason}"));
            seen.update(|r| r.dead_replies.push(reason));
            async { Outcome::success() }
        })
        .await?;

    // A stray reply nobody asked for, and one without a correlation id.
    let stray = StatusEnvelope::new(200, "OK", Tax { vat_cents: 1 });
    transport
        .send(
            REPLIES,
            Message::json(&stray)?.with_correlation_id("from-yesterday"),
        )
        .await?;
    transport.send(REPLIES, Message::json(&stray)?).await?;

    let mut asks = Vec::new();
    for country in ["DE", "SE", "XX"] {
        let (requester, seen, log) = (Arc::clone(&requester), report.clone(), timeline.clone());
        asks.push(tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let request = TaxRequest {
                country: country.into(),
                net_cents: 10_000,
            };
            let answer = requester.request::<_, Tax>(TAX_SERVICE, &request).await;
            match answer {
                Ok(envelope) => {
                    log.log(format!(
                        "client: {country} -> {} {} {:?}",
                        envelope.status_code, envelope.status_message, envelope.body
                    ));
                    let slow = started.elapsed() >= delay * 4;
                    seen.update(|r| {
                        r.answers.push((
                            country.to_owned(),
                            envelope.status_code,
                            envelope.body.vat_cents,
                        ));
                        r.retried_after_time_out |= slow;
                    });
                }
                Err(e) => {
                    log.log(format!("client: {country} failed: {e}"));
                    seen.update(|r| r.failures.push((country.to_owned(), e.to_string())));
                }
            }
        }));
    }
    for ask in asks {
        ask.await.expect("the request task does not panic");
    }

    let outcomes = report
        .wait_until(delay * 60, |r| {
            // Every request ended, and both stray replies were dead-lettered.
            r.answers.len() + r.failures.len() == 3 && r.dead_replies.len() >= 2
        })
        .await;
    dead_replies.shutdown().await;
    if let Ok(requester) = Arc::try_unwrap(requester) {
        requester.shutdown().await;
    }
    responder.shutdown().await;
    Ok(outcomes)
}
