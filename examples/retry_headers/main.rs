//! Seed system 4 on redeliver: retries are new messages with a retry count, invalid requests go
//! to their own endpoint and are never retried, exhausted messages are dead-lettered with their
//! headers. See `scenario.rs`.
//!
//! ```text
//! cargo run --example retry_headers                                   # in memory
//! cargo run --features rabbitmq --example retry_headers -- amqp://guest:guest@127.0.0.1:5672/%2f
//! ```

#[path = "../common/mod.rs"]
mod common;
mod scenario;

use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), redeliver::Error> {
    let transport = common::transport_from_args().await?;
    let timeline = common::Timeline::new(transport.clock());
    println!(
        "max {} handler calls per request (retry counts 0..={}), delays 0.5 s, 1 s, 2 s\n",
        scenario::MAX_ATTEMPTS,
        scenario::MAX_ATTEMPTS - 1
    );
    let outcomes = scenario::run(transport, timeline, Duration::from_millis(500)).await?;
    println!(
        "\n{} handler calls; processed {:?}; invalid {:?}; dead-lettered {:?}",
        outcomes.calls.len(),
        outcomes.processed,
        outcomes.invalid,
        outcomes
            .dead_letters
            .iter()
            .map(|d| &d.0)
            .collect::<Vec<_>>()
    );
    Ok(())
}
