//! Retries and a dead letter on Service Bus, against the in-process test broker (no Azure
//! needed): `cargo run -p redeliver-servicebus --example servicebus_retries`.
//!
//! A webhook handler fails twice with a transient error and then succeeds; another message
//! fails permanently and is dead-lettered, where a dead-letter handler picks it up. Each retry
//! is a copy the broker holds until its not-before (its scheduled enqueue time).

use std::sync::Arc;
use std::time::Duration;

use redeliver_core::{
    Backoff, BackoffPolicy, Context, Jitter, Message, Outcome, Source, Topology, Transport, Worker,
};
use redeliver_servicebus::{ServiceBusOptions, ServiceBusTransport};
use redeliver_servicebus_testbroker::{BrokerOptions, QueueOptions};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Webhook {
    url: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // In production the queue is provisioned with the Azure tooling; here, on the test broker.
    let broker = redeliver_servicebus_testbroker::start(BrokerOptions::default()).await?;
    broker.create_queue("webhook", QueueOptions::default())?;

    let transport = ServiceBusTransport::connect(
        broker.connection_string(),
        ServiceBusOptions::default().with_unsecured(true),
    )
    .await?;
    transport
        .declare(&Topology::new().endpoint("webhook"))
        .await?;
    let transport: Arc<dyn Transport> = Arc::new(transport);

    let policy = BackoffPolicy::builder()
        .max_attempts(5)
        .backoff(Backoff::fixed(Duration::from_secs(1)))
        .jitter(Jitter::None)
        .build()?;
    let worker = Worker::builder(Arc::clone(&transport), "webhook")
        .retry_policy(policy)
        .start(|hook: Webhook, ctx: Context| async move {
            println!("attempt {} for {}", ctx.attempt(), hook.url);
            match (hook.url.as_str(), ctx.attempt()) {
                ("https://gone.example", _) => {
                    Outcome::dead_letter_with("configuration", "HTTP 410")
                }
                (_, 1 | 2) => Outcome::retry("HTTP 503"),
                _ => Outcome::success(),
            }
        })
        .await?;
    let dead_letters = Worker::builder(Arc::clone(&transport), Source::dead_letters("webhook"))
        .start(|hook: Webhook, ctx: Context| async move {
            let reason = ctx.dead_letter().map(|d| d.reason.clone());
            println!("dead letter for {}: {reason:?}", hook.url);
            Outcome::success()
        })
        .await?;

    for url in ["https://ok.example", "https://gone.example"] {
        let message = Message::json(&Webhook { url: url.into() })?;
        transport.send("webhook", message).await?;
    }
    let idle = broker
        .wait_until(Duration::from_secs(30), |b| {
            b.active_message_count("webhook").unwrap_or(1) == 0
                && b.scheduled_message_count("webhook").unwrap_or(1) == 0
                && b.dead_letter_message_count("webhook").unwrap_or(1) == 0
        })
        .await;

    println!("worker: {:?}", worker.shutdown().await);
    println!("dead-letter handler: {:?}", dead_letters.shutdown().await);
    println!("everything handled: {idle}");
    Ok(())
}
