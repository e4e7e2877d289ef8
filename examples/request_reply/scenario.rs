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

use redeliver::request_reply::{RequestOptions, Requester, StatusEnvelope, StatusMessage};
use redeliver::{Consumer, Context, Failure, Host, Message, RawBody, ResultExt, Transport};
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

/// What the tax service and the client's dead-reply listener share.
struct App {
    report: Report<Outcomes>,
    timeline: Timeline,
    /// Requests for "SE" the tax service has seen.
    sweden_seen: AtomicU32,
}

/// The tax service: answers 200 with the VAT, 422 for unknown countries; it is busy (does not
/// answer) the first time it sees a request for "SE". The reply goes to the request's reply-to
/// with its correlation id (`ctx.send` copies it).
async fn answer(request: TaxRequest, ctx: Context<App>) -> Result<(), Failure> {
    let (app, country) = (ctx.state(), request.country.as_str());
    let envelope = match country {
        "SE" if app.sweden_seen.fetch_add(1, Ordering::SeqCst) == 0 => None,
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
    let correlation: String = ctx
        .correlation_id()
        .unwrap_or("-")
        .chars()
        .take(8)
        .collect();
    let said = format!("tax-service: {country} (correlation {correlation}…)");
    let Some(envelope) = envelope else {
        app.timeline.log(format!("{said}: busy, no answer"));
        return Ok(());
    };
    let status = envelope.status_code;
    app.timeline.log(format!("{said}: {status}"));
    let reply_to = ctx
        .reply_to()
        .ok_or("the request has no reply-to endpoint to answer to")
        .or_dead_letter("unanswerable request")?;
    ctx.send(reply_to, Message::json(&envelope)?).await?;
    Ok(())
}

/// Replies the client could not use, whatever their body.
async fn record_dead_reply(_: RawBody, ctx: Context<App>) -> Result<(), Failure> {
    let App {
        report, timeline, ..
    } = ctx.state();
    let reason = ctx.dead_letter().map_or("", |d| d.reason.as_str());
    timeline.log(format!("client: reply dead-lettered: {reason}"));
    report.update(|r| r.dead_replies.push(reason.to_owned()));
    Ok(())
}

pub(crate) async fn run(
    transport: Arc<dyn Transport>,
    timeline: Timeline,
    delay: Duration,
) -> Result<Outcomes, redeliver::Error> {
    let report = Report::<Outcomes>::new();
    let app = App {
        report: report.clone(),
        timeline: timeline.clone(),
        sweden_seen: AtomicU32::new(0),
    };
    // Declares both endpoints; the requester consumes the replies itself.
    let host = Host::with_state(Arc::clone(&transport), app)
        .consumer(
            Consumer::endpoint(TAX_SERVICE)
                .concurrency(4)
                .handler(answer),
        )
        .consumer(Consumer::dead_letters(REPLIES).handler(record_dead_reply))
        .start()
        .await?;
    let options = RequestOptions::default()
        .with_timeout(delay * 4)
        .with_attempts(3)
        .with_app_id("web-shop")
        .with_unknown_replies(2, delay);
    let requester = Requester::start(Arc::clone(&transport), REPLIES, options).await?;

    // A stray reply nobody asked for, and one without a correlation id.
    let stray = StatusEnvelope::new(200, "OK", Tax { vat_cents: 1 });
    let unknown = Message::json(&stray)?.with_correlation_id("from-yesterday");
    transport.send(REPLIES, unknown).await?;
    transport.send(REPLIES, Message::json(&stray)?).await?;

    let (client, log, seen) = (&requester, &timeline, &report);
    let ask = |country: &'static str| async move {
        let started = tokio::time::Instant::now();
        let request = TaxRequest {
            country: country.into(),
            net_cents: 10_000,
        };
        match client.request::<_, Tax>(TAX_SERVICE, &request).await {
            Ok(envelope) => {
                log.log(format!(
                    "client: {country} -> {} {} {:?}",
                    envelope.status_code, envelope.status_message, envelope.body
                ));
                let slow = started.elapsed() >= delay * 4;
                let answer = (
                    country.to_owned(),
                    envelope.status_code,
                    envelope.body.vat_cents,
                );
                seen.update(|r| {
                    r.answers.push(answer);
                    r.retried_after_time_out |= slow;
                });
            }
            Err(e) => {
                log.log(format!("client: {country} failed: {e}"));
                seen.update(|r| r.failures.push((country.to_owned(), e.to_string())));
            }
        }
    };
    futures::future::join_all(["DE", "SE", "XX"].map(ask)).await;

    let outcomes = report
        .wait_until(delay * 60, |r| {
            // Every request ended, and both stray replies were dead-lettered.
            r.answers.len() + r.failures.len() == 3 && r.dead_replies.len() >= 2
        })
        .await;
    requester.shutdown().await;
    host.shutdown().await;
    Ok(outcomes)
}
