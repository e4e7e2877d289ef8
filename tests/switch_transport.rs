//! Switching transport is a change of URL only: one handler, unchanged, on the in-memory
//! transport, on RabbitMQ and on Service Bus (the test broker), each chosen by `connect(url)`.

#![cfg(all(feature = "memory", feature = "rabbitmq", feature = "servicebus"))]

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use redeliver::{
    Backoff, BackoffPolicy, Context, Jitter, Message, Outcome, Topology, Worker, connect,
};
use redeliver_conformance::Calls;
use redeliver_servicebus_testbroker::{BrokerOptions, QueueOptions};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Invoice {
    number: u32,
}

/// The application's handler: it knows nothing of transports. Fails once, then succeeds.
async fn send_invoice(_: Invoice, ctx: Context) -> Outcome {
    if ctx.attempt() == 1 {
        Outcome::retry("mail server busy")
    } else {
        Outcome::success()
    }
}

/// Runs the handler on the transport `url` names; returns the attempts it saw.
async fn run(url: &str, endpoint: &str) -> Vec<u32> {
    let transport = connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    transport
        .declare(&Topology::new().endpoint(endpoint))
        .await
        .expect("the endpoint exists");
    let calls = Calls::new(transport.clock());
    let recorder = calls.clone();
    let policy = BackoffPolicy::builder()
        .max_attempts(3)
        .backoff(Backoff::fixed(Duration::from_secs(1)))
        .jitter(Jitter::None)
        .build()
        .expect("a valid policy");
    let worker = Worker::builder(Arc::clone(&transport), endpoint)
        .retry_policy(policy)
        .start(move |invoice: Invoice, ctx: Context| {
            recorder.record(&ctx);
            send_invoice(invoice, ctx)
        })
        .await
        .expect("the worker starts");
    transport
        .send(
            endpoint,
            Message::json(&Invoice { number: 7 }).expect("json"),
        )
        .await
        .expect("sent");
    calls.wait_for(2, Duration::from_secs(30)).await;
    let stats = worker.shutdown().await;
    assert_eq!(
        (stats.retried, stats.completed),
        (1, 1),
        "on {endpoint}: {stats:?}"
    );
    calls.attempts()
}

/// The RabbitMQ URL, or `None` after saying loudly why this part is skipped (a failure when
/// `REDELIVER_REQUIRE_BROKERS=1`).
async fn rabbitmq_url() -> Option<String> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let probe = tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
    )
    .await;
    if let Ok(Ok(connection)) = probe {
        let _ = connection.close(200, "probe".into()).await;
        return Some(url);
    }
    assert!(
        std::env::var("REDELIVER_REQUIRE_BROKERS").as_deref() != Ok("1"),
        "RabbitMQ is required (REDELIVER_REQUIRE_BROKERS=1) but unreachable at AMQP_URL"
    );
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: RabbitMQ unreachable; the RabbitMQ part of switch_transport did not run"
    );
    None
}

/// Deletes the queues `connect` declared on RabbitMQ for `endpoint`.
async fn remove_rabbitmq_endpoint(url: &str, endpoint: &str) {
    let Ok(connection) =
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    for queue in [endpoint.to_owned(), format!("{endpoint}.dead-letters")] {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
    }
    let _ = connection.close(200, "cleaned up".into()).await;
}

// Current-thread: the Service Bus client must not run on a multi-threaded runtime (see the
// redeliver-servicebus documentation).
#[tokio::test(flavor = "current_thread")]
async fn the_same_handler_runs_unchanged_on_every_transport_chosen_by_url() {
    let endpoint = format!("switch-{:08x}", unique_suffix());

    assert_eq!(run("memory://", &endpoint).await, [1, 2], "in memory");

    if let Some(url) = rabbitmq_url().await {
        let attempts = run(&url, &endpoint).await;
        remove_rabbitmq_endpoint(&url, &endpoint).await;
        assert_eq!(attempts, [1, 2], "on RabbitMQ");
    }

    let broker = redeliver_servicebus_testbroker::start(BrokerOptions::default())
        .await
        .expect("the Service Bus test broker starts");
    broker
        .create_queue(&endpoint, QueueOptions::default())
        .expect("a queue");
    assert_eq!(
        run(&broker.connection_string(), &endpoint).await,
        [1, 2],
        "on Service Bus"
    );
    broker.shutdown().await;
}

fn unique_suffix() -> u32 {
    // A unique enough name without another dependency: the clock's nanoseconds.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}
