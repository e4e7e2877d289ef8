//! The host configured from a TOML file: the transport and every consumer's policy change with
//! no change of code, and a bad value names its path. Memory transport, virtual time.

mod support;

use redeliver::host::HostConfig;
use redeliver::{Consumer, Context, Error, Host, Message, Outcome, TransportUrl};
use support::within;

#[derive(serde::Deserialize)]
struct Config {
    transport: TransportUrl,
    host: HostConfig,
}

fn config(toml: &str) -> Config {
    toml::from_str(toml).unwrap()
}

async fn always_fails(_: serde_json::Value, _: Context) -> Outcome {
    Outcome::retry("downstream unavailable")
}

fn consumers() -> redeliver::HostBuilder {
    // What code says; the configuration overrides it.
    Host::builder(std::sync::Arc::new(
        redeliver::memory::MemoryTransport::new(),
    ))
    .consumer(Consumer::endpoint("webhook").handler(always_fails))
    .consumer(Consumer::dead_letters("webhook").handler(always_fails))
}

#[tokio::test(start_paused = true)]
async fn policies_come_from_the_configuration_file() {
    let config = config(
        r#"
        transport = "memory://"

        [host.consumers.webhook]
        concurrency = 2
        retry = { max_attempts = 3, jitter = "none", backoff = { kind = "list", delays = ["5s", "1m"] } }
        "#,
    );
    let transport = redeliver::connect_to(&config.transport).await.unwrap();
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&calls);
    let (count, mut counted) = tokio::sync::watch::channel(0);
    let start = tokio::time::Instant::now();
    let host = Host::builder(transport.clone())
        .consumer(Consumer::endpoint("webhook").handler(
            move |_: serde_json::Value, ctx: Context| {
                let mut seen = seen.lock().unwrap();
                seen.push((ctx.attempt(), start.elapsed().as_secs()));
                count.send_replace(seen.len());
                async { Outcome::retry("downstream unavailable") }
            },
        ))
        .configure(&config.host)
        .unwrap()
        .start()
        .await
        .unwrap();
    transport
        .send("webhook", Message::json(&1).unwrap())
        .await
        .unwrap();
    within("three calls", counted.wait_for(|n| *n == 3))
        .await
        .unwrap();
    let stats = host.shutdown().await;

    assert_eq!(*calls.lock().unwrap(), [(1, 0), (2, 5), (3, 65)]);
    assert_eq!(stats[0].1.dead_lettered, 1);
}

fn field_of(error: Error) -> String {
    match error {
        Error::Config { field, .. } => field,
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn a_bad_value_names_its_path() {
    let bad = config(
        r#"
        transport = "memory://"
        [host.consumers.webhook.retry.backoff]
        kind = "exponential"
        initial = "10s"
        max = "1s"
        "#,
    );
    let e = consumers().configure(&bad.host).unwrap_err();
    assert_eq!(field_of(e), "consumers.webhook.retry.backoff.max");

    let zero = config(
        r#"
        transport = "memory://"
        [host.consumers."webhook.dead-letters"]
        concurrency = 0
        "#,
    );
    let e = consumers().configure(&zero.host).unwrap_err();
    assert_eq!(field_of(e), "consumers.webhook.dead-letters.concurrency");

    let unknown = config(
        r#"
        transport = "memory://"
        [host.consumers.webhooks]
        concurrency = 2
        "#,
    );
    let e = consumers()
        .configure(&unknown.host)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`consumers.webhooks`"), "{e}");
    assert!(e.contains("`webhook`, `webhook.dead-letters`"), "{e}");
}

#[test]
fn a_misspelt_key_is_refused_by_the_parser() {
    let e = toml::from_str::<Config>(
        r#"
        transport = "memory://"
        [host.consumers.webhook]
        concurency = 2
        "#,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("concurency"), "{e}");
}

#[test]
fn the_transport_is_a_line_of_configuration() {
    let rabbit = config(
        r#"
        transport = "amqp://app:s3cret@rabbit:5672/%2f"
        [host]
        "#,
    );
    assert_eq!(rabbit.transport.kind(), redeliver::TransportKind::RabbitMq);
    assert!(!rabbit.transport.to_string().contains("s3cret"));
}
