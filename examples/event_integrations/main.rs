//! Seed system 1 on redeliver: events fan out to integrations; a webhook integration posts to a
//! local web server that answers 200, 429 with Retry-After, 500 or 401. See `scenario.rs`.
//!
//! ```text
//! cargo run --example event_integrations                                   # in memory
//! cargo run --features rabbitmq --example event_integrations -- amqp://guest:guest@127.0.0.1:5672/%2f
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
        "one event, four webhook targets: ok, rate-limited (429, Retry-After 1 s), broken (500), revoked (401)"
    );
    println!(
        "max {} handler calls, back-off 0.5 s doubling\n",
        scenario::MAX_ATTEMPTS
    );
    let outcomes = scenario::run(transport, timeline, Duration::from_millis(500)).await?;
    println!(
        "\ndelivered: {:?}; dead letters: {:?}",
        outcomes.delivered,
        outcomes
            .dead_letters
            .iter()
            .map(|d| (&d.0, &d.2))
            .collect::<Vec<_>>()
    );
    Ok(())
}
