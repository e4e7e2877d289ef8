//! Quickstart: a webhook handler that fails transiently and then permanently, printing a
//! timeline of every handler call and the dead letters at the end. The same code runs on every
//! transport:
//!
//! ```text
//! cargo run --example quickstart                                          # in memory
//! cargo run --features rabbitmq --example quickstart -- amqp://guest:guest@127.0.0.1:5672/%2f
//! RUST_LOG=redeliver_core=info cargo run --example quickstart            # with the worker's log
//! ```

#[path = "../common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redeliver::{
    Backoff, BackoffPolicy, Consumer, Context, Host, Jitter, Message, Outcome, RawBody,
    outcome_for_status,
};
use serde::{Deserialize, Serialize};

/// The event our handler delivers to a customer's webhook.
#[derive(Debug, Serialize, Deserialize)]
struct OrderShipped {
    order_id: u32,
    carrier: String,
}

/// What the customer's web server answers, per order and attempt: (HTTP status, Retry-After).
fn webhook_response(order_id: u32, attempt: u32) -> (u16, Option<&'static str>) {
    match (order_id, attempt) {
        (1001, 1) => (503, None),      // unavailable for a moment, then fine
        (1002, 1) => (429, Some("2")), // rate-limited: "come back in 2 s", then the key is revoked
        (1002, _) => (401, None),
        (1003, _) => (500, None), // broken until we give up
        _ => (200, None),
    }
}

const ENDPOINT: &str = "webhooks";
const MAX_ATTEMPTS: u32 = 4;

/// What `main` waits for: every message completed or dead-lettered.
#[derive(Clone, Debug, Default)]
struct Done {
    completed: usize,
    dead_letters: Vec<String>,
}

/// What the handlers share.
struct App {
    start: DateTime<Utc>,
    done: common::Report<Done>,
}

async fn call_webhook(event: OrderShipped, ctx: Context<App>) -> Outcome {
    let (status, retry_after) = webhook_response(event.order_id, ctx.attempt());
    let outcome = outcome_for_status(status, retry_after);
    let start = ctx.state().start;
    println!(
        "{:>7}  {:<10} {:>7}  {:>10}  HTTP {status} -> {}",
        since(start, ctx.received_at()),
        ctx.message_id(),
        ctx.attempt(),
        ctx.not_before().map_or("-".into(), |t| since(start, t)),
        describe(&outcome, retry_after, ctx.attempt()),
    );
    if outcome == Outcome::Success {
        ctx.state().done.update(|d| d.completed += 1);
    }
    outcome
}

/// Dead letters are consumed like any endpoint; here they are only listed, whatever their body.
async fn list_dead_letter(_: RawBody, ctx: Context<App>) -> Outcome {
    let info = ctx.dead_letter();
    let line = format!(
        "{:<10} after attempt {}: {} ({})",
        ctx.message_id(),
        ctx.attempt(),
        info.map_or("-", |d| d.reason.as_str()),
        info.and_then(|d| d.description.as_deref()).unwrap_or("-"),
    );
    ctx.state().done.update(|d| d.dead_letters.push(line));
    Outcome::success()
}

#[tokio::main]
async fn main() -> Result<(), redeliver::Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .init();

    let transport = common::transport_from_args().await?;
    let start = transport.clock().now();

    // Four handler calls at most (the first included), waiting 0.5 s, 1 s, 2 s in between.
    let delay = Duration::from_millis(500);
    let policy = BackoffPolicy::builder()
        .max_attempts(MAX_ATTEMPTS)
        .backoff(Backoff::exponential(delay, delay * 8))
        .jitter(Jitter::None)
        .build()?;

    println!("endpoint `{ENDPOINT}`, max attempts {MAX_ATTEMPTS}, back-off 0.5 s doubling;");
    println!("a Retry-After from the server is honoured as a floor.\n");
    println!(
        "{:>7}  {:<10} {:>7}  {:>10}  outcome",
        "time", "message", "attempt", "not-before"
    );

    let done = common::Report::<Done>::new();
    let app = App {
        start,
        done: done.clone(),
    };
    let host = Host::with_state(Arc::clone(&transport), app)
        .consumer(
            Consumer::endpoint(ENDPOINT)
                .concurrency(4)
                .retry_policy(policy)
                .handler(call_webhook),
        )
        .consumer(Consumer::dead_letters(ENDPOINT).handler(list_dead_letter))
        .start()
        .await?;

    for order_id in [1000, 1001, 1002, 1003] {
        let event = OrderShipped {
            order_id,
            carrier: "DHL".into(),
        };
        let message = Message::json(&event)?.with_id(format!("order-{order_id}"));
        transport.send(ENDPOINT, message).await?;
    }
    // A producer with a bug: this body is not an `OrderShipped`. It never reaches the handler.
    let message = Message::new(r#"{"order":"1004"}"#).with_id("order-1004");
    transport.send(ENDPOINT, message).await?;

    let result = done
        .wait_until(Duration::from_secs(60), |d| {
            d.completed >= 2 && d.dead_letters.len() >= 3
        })
        .await;
    let stats = common::stats_of(host.shutdown().await, ENDPOINT);

    println!("\ndead letters of `{ENDPOINT}`:");
    for line in &result.dead_letters {
        println!("  {line}");
    }
    println!(
        "\n{} handler calls: {} completed, {} retries, {} dead-lettered, in {}",
        stats.handled,
        stats.completed,
        stats.retried,
        stats.dead_lettered,
        since(start, transport.clock().now()),
    );
    Ok(())
}

fn since(start: DateTime<Utc>, t: DateTime<Utc>) -> String {
    format!("+{:.2}s", (t - start).as_seconds_f64())
}

fn describe(outcome: &Outcome, retry_after: Option<&str>, attempt: u32) -> String {
    match outcome {
        Outcome::Success => "success".into(),
        Outcome::Retry { reason, .. } if attempt >= MAX_ATTEMPTS => {
            format!("retry ({reason}), but that was the last attempt: dead letter")
        }
        Outcome::Retry { reason, .. } => match retry_after {
            Some(after) => format!("retry ({reason}, Retry-After {after} s)"),
            None => format!("retry ({reason})"),
        },
        Outcome::DeadLetter { reason, .. } => format!("dead letter ({reason})"),
        other => other.kind().into(),
    }
}
