//! Seed system 3 on redeliver: request/reply with status envelopes, time-outs with retries, and
//! stray replies. See `scenario.rs`.
//!
//! ```text
//! cargo run --example request_reply                                   # in memory
//! cargo run --features rabbitmq --example request_reply -- amqp://guest:guest@127.0.0.1:5672/%2f
//! ```

#[path = "../common/mod.rs"]
mod common;
mod scenario;

use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), redeliver::Error> {
    let transport = common::transport_from_args().await?;
    let timeline = common::Timeline::new(transport.clock());
    println!("a web shop asks the tax service for VAT; time-out 2 s, 3 tries\n");
    let outcomes = scenario::run(transport, timeline, Duration::from_millis(500)).await?;
    if !outcomes.failures.is_empty() {
        eprintln!("\nrequests without an answer: {:?}", outcomes.failures);
        std::process::exit(1);
    }
    Ok(())
}
