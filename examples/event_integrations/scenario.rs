//! Seed system 1: event integrations with retries (a password manager's server).
//!
//! - Events are published to a topic; the `integrations` endpoint and the `event-store` endpoint
//!   each get a copy.
//! - The integrations handler turns each event into one integration message per configured
//!   target and sends it to the endpoint of the integration kind (`webhook`). The message id is
//!   the event's id plus the target, so it stays the same across retries.
//! - The webhook handler posts to the target and turns the HTTP answer into an outcome with
//!   [`outcome_for_status`]: 429 and 5xx are retried (a `Retry-After` is honoured), 401/403 and
//!   other 4xx are dead-lettered with their category.
//! - A local HTTP server stands in for the customers' web servers and answers per target:
//!   `ok` 200; `rate-limited` 429 with `Retry-After: 1` once, then 200; `broken` 500 always;
//!   `revoked` 401.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use chrono::{DateTime, Utc};
use redeliver::{
    Backoff, BackoffPolicy, Clock, Consumer, Context, Failure, Host, Jitter, Message, Outcome,
    Transport, outcome_for_status,
};
use serde::{Deserialize, Serialize};

use crate::common::{Report, Timeline};

pub(crate) const EVENTS: &str = "events";
pub(crate) const INTEGRATIONS: &str = "integrations";
pub(crate) const EVENT_STORE: &str = "event-store";
pub(crate) const WEBHOOK: &str = "webhook";
/// "Max retries" of the seed system: total handler calls.
pub(crate) const MAX_ATTEMPTS: u32 = 3;
/// The targets an organization configured, by name.
pub(crate) const TARGETS: [&str; 4] = ["ok", "rate-limited", "broken", "revoked"];

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Event {
    pub(crate) id: String,
    pub(crate) organization_id: String,
    pub(crate) kind: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct IntegrationMessage {
    pub(crate) event_id: String,
    pub(crate) organization_id: String,
    pub(crate) target: String,
    pub(crate) url: String,
    pub(crate) payload: String,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Outcomes {
    /// Target → (attempt, seconds since the start, HTTP status) of each webhook call.
    pub(crate) webhook_calls: BTreeMap<String, Vec<(u32, f64, u16)>>,
    /// Event ids stored by the event store.
    pub(crate) stored: Vec<String>,
    /// (message id, attempt, reason) of each dead letter of the webhook endpoint.
    pub(crate) dead_letters: Vec<(String, u32, String)>,
    /// Targets that got a 2xx.
    pub(crate) delivered: Vec<String>,
}

/// How many times each path of the stand-in web server was called.
type Hits = Arc<Mutex<BTreeMap<String, u32>>>;

async fn customer_server(
    Path(target): Path<String>,
    State(hits): State<Hits>,
) -> (StatusCode, HeaderMap, &'static str) {
    let hit = {
        let mut hits = hits.lock().unwrap();
        let n = hits.entry(target.clone()).or_default();
        *n += 1;
        *n
    };
    let mut headers = HeaderMap::new();
    let status = match (target.as_str(), hit) {
        ("ok", _) => StatusCode::OK,
        ("rate-limited", 1) => {
            headers.insert("retry-after", "1".parse().expect("a header value"));
            StatusCode::TOO_MANY_REQUESTS
        }
        ("rate-limited", _) => StatusCode::NO_CONTENT,
        ("broken", _) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::UNAUTHORIZED,
    };
    (status, headers, "")
}

async fn start_customer_server() -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/hooks/{target}", post(customer_server))
        .with_state(Hits::default());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(address)
}

/// What every handler of the scenario shares.
struct App {
    server: SocketAddr,
    http: reqwest::Client,
    report: Report<Outcomes>,
    timeline: Timeline,
    clock: Clock,
    start: DateTime<Utc>,
}

/// Events -> one integration message per configured target, sent to the kind's endpoint.
async fn fan_out(event: Event, ctx: Context<App>) -> Result<(), Failure> {
    for target in TARGETS {
        let message = IntegrationMessage {
            event_id: event.id.clone(),
            organization_id: event.organization_id.clone(),
            target: target.to_owned(),
            url: format!("http://{}/hooks/{target}", ctx.state().server),
            payload: format!(
                r#"{{"type":"{}","organization":"{}"}}"#,
                event.kind, event.organization_id
            ),
        };
        let message = Message::json(&message)?
            .with_id(format!("{}:{target}", event.id))
            .with_subject(WEBHOOK);
        ctx.send(WEBHOOK, message).await?;
    }
    Ok(())
}

async fn store_event(event: Event, ctx: Context<App>) -> Outcome {
    ctx.state().report.update(|r| r.stored.push(event.id));
    Outcome::success()
}

/// Posts to the target and turns the HTTP answer into an outcome.
async fn post_webhook(message: IntegrationMessage, ctx: Context<App>) -> Outcome {
    let app = ctx.state();
    let response = app
        .http
        .post(&message.url)
        .body(message.payload.clone())
        .send()
        .await;
    let (status, retry_after) = match response {
        Ok(r) => {
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (r.status().as_u16(), retry_after)
        }
        // No answer at all: as transient as a 503.
        Err(_) => (503, None),
    };
    let outcome = outcome_for_status(status, retry_after.as_deref());
    let since = (app.clock.now() - app.start).as_seconds_f64();
    app.timeline.log(format!(
        "webhook {:<12} attempt {}: HTTP {status}{} -> {}",
        message.target,
        ctx.attempt(),
        retry_after
            .map(|s| format!(" (Retry-After {s} s)"))
            .unwrap_or_default(),
        outcome.kind()
    ));
    app.report.update(|r| {
        r.webhook_calls
            .entry(message.target.clone())
            .or_default()
            .push((ctx.attempt(), since, status));
        if outcome == Outcome::Success {
            r.delivered.push(message.target.clone());
        }
    });
    outcome
}

async fn record_dead_letter(message: IntegrationMessage, ctx: Context<App>) -> Outcome {
    let reason = ctx
        .dead_letter()
        .map(|d| d.reason.clone())
        .unwrap_or_default();
    ctx.state().timeline.log(format!(
        "dead letter {} after attempt {}: category `{reason}`",
        message.target,
        ctx.attempt()
    ));
    ctx.state().report.update(|r| {
        r.dead_letters
            .push((ctx.message_id().to_string(), ctx.attempt(), reason))
    });
    Outcome::success()
}

pub(crate) async fn run(
    transport: Arc<dyn Transport>,
    timeline: Timeline,
    delay: Duration,
) -> Result<Outcomes, redeliver::Error> {
    let server = start_customer_server()
        .await
        .map_err(|e| redeliver::Error::connection("could not start the stand-in web server", e))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| redeliver::Error::connection("could not build the HTTP client", e))?;
    let report = Report::<Outcomes>::new();
    let clock = transport.clock();
    let app = App {
        server,
        http,
        report: report.clone(),
        timeline,
        start: clock.now(),
        clock,
    };
    let policy = BackoffPolicy::builder()
        .max_attempts(MAX_ATTEMPTS)
        .backoff(Backoff::exponential(delay, delay * 8))
        .jitter(Jitter::None)
        .build()?;
    let host = Host::with_state(Arc::clone(&transport), app)
        .consumer(Consumer::subscription(EVENTS, INTEGRATIONS).handler(fan_out))
        .consumer(Consumer::subscription(EVENTS, EVENT_STORE).handler(store_event))
        .consumer(
            Consumer::endpoint(WEBHOOK)
                .concurrency(4)
                .retry_policy(policy)
                .handler(post_webhook),
        )
        .consumer(Consumer::dead_letters(WEBHOOK).handler(record_dead_letter))
        .start()
        .await?;

    let event = Event {
        id: "evt-0001".into(),
        organization_id: "acme".into(),
        kind: "cipher.updated".into(),
    };
    transport
        .publish(EVENTS, Message::json(&event)?.with_id(event.id.clone()))
        .await?;

    let outcomes = report
        .wait_until(delay * 60 + Duration::from_secs(10), |r| {
            r.delivered.len() >= 2 && r.dead_letters.len() >= 2 && !r.stored.is_empty()
        })
        .await;
    host.shutdown().await;
    Ok(outcomes)
}
