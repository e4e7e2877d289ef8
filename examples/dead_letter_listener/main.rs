//! Seed system 2 on redeliver: invalid and unknown messages dropped, failures dead-lettered after
//! the last attempt, and a dead-letter listener that marks the document as errored. See
//! `scenario.rs`.
//!
//! ```text
//! cargo run --example dead_letter_listener                                   # in memory
//! cargo run --features rabbitmq --example dead_letter_listener -- amqp://guest:guest@127.0.0.1:5672/%2f
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
        "documents 1 and 2 exist; 2 always fails; 99 does not exist; one message is not JSON\n"
    );
    scenario::run(transport, timeline, Duration::from_millis(500)).await?;
    Ok(())
}
