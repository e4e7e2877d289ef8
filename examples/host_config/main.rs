//! An application whose transport and retry policies come from a configuration file: the same
//! code runs in memory or on RabbitMQ, with the policy the file gives.
//!
//! ```text
//! cargo run --example host_config                                   # examples/host_config/memory.toml
//! cargo run --features rabbitmq --example host_config -- examples/host_config/rabbitmq.toml
//! ```
//!
//! A payment handler fails twice (the payment service is "unavailable"), then succeeds; the
//! timeline shows the attempts as the file's policy spaces them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use redeliver::host::HostConfig;
use redeliver::{Consumer, Context, Failure, Host, Message, TransportUrl};

/// The application's configuration file.
#[derive(serde::Deserialize)]
struct Config {
    transport: TransportUrl,
    host: HostConfig,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Payment {
    id: u32,
}

struct App {
    started: Instant,
    /// Told when the payment went through.
    paid: Arc<Notify>,
}

async fn pay(payment: Payment, ctx: Context<App>) -> Result<(), Failure> {
    let app = ctx.state();
    println!(
        "payment {} attempt {} at +{:.2}s",
        payment.id,
        ctx.attempt(),
        app.started.elapsed().as_secs_f64()
    );
    if ctx.attempt() < 3 {
        return Err(Failure::retry("payment service unavailable"));
    }
    app.paid.notify_one();
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/host_config/memory.toml"
        )
        .to_owned()
    });
    let config: Config = toml::from_str(&std::fs::read_to_string(&path)?)?;
    println!("configuration: {path}\ntransport: {}\n", config.transport);

    let transport = redeliver::connect_to(&config.transport).await?;
    let paid = Arc::new(Notify::new());
    let app = App {
        started: Instant::now(),
        paid: Arc::clone(&paid),
    };
    // What code says; the file's `[host.consumers.payments]` decides concurrency, time-out and
    // retry policy.
    let host = Host::with_state(transport.clone(), app)
        .consumer(Consumer::endpoint("payments").handler(pay))
        .configure(&config.host)?
        .start()
        .await?;
    transport
        .send("payments", Message::json(&Payment { id: 1 })?)
        .await?;

    let waited = tokio::time::timeout(Duration::from_secs(120), paid.notified()).await;
    let stats = host.shutdown().await;
    println!("\n{:?}", stats[0].1);
    waited.map_err(|_| "the payment was not completed within 2 minutes")?;
    Ok(())
}
