//! A publish whose confirm was lost with its connection: the broker stored the message, the
//! connection went away before its confirm reached the client, and the transport cannot know
//! whether the broker has it. It publishes it again on the next connection, within the
//! publish timeout, so `send` returns `Ok` and the broker holds the message twice (which
//! at-least-once allows), rather than failing at once with "no confirm received" while the
//! message may well be stored.
//!
//! A proxy between the transport and the broker lets the publish through and holds back
//! everything the broker sends to the transport, so the confirm never arrives; the test sees
//! the message in the queue on a direct connection, then cuts the proxied one.

mod common;

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use redeliver_conformance::proxy::Direction;
use redeliver_core::{Message, Topology};
use tokio::time::Instant;

use common::{Fixture, Proxy, raw_connection, test_options};

const ENDPOINT: &str = "lost-confirm";
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The messages ready in `queue`, asked on a connection that does not go through the proxy.
async fn ready(connection: &lapin::Connection, queue: &str) -> u32 {
    let channel = connection.create_channel().await.expect("a channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            Default::default(),
        )
        .await
        .expect("the endpoint queue exists");
    let _ = channel.close(200, "counted".into()).await;
    declared.message_count()
}

/// Waits until `queue` holds `count` ready messages, failing the test after `within`.
async fn wait_for_count(connection: &lapin::Connection, queue: &str, count: u32, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = ready(connection, queue).await;
        if now == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the queue held {now} messages after {within:?}, {count} expected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_confirm_was_lost_with_its_connection_is_published_again() {
    if !common::broker_available().await {
        return;
    }
    let proxy = Proxy::start().await;
    let fx =
        Fixture::with_options(test_options(proxy.url()).with_operation_timeout(PUBLISH_TIMEOUT))
            .await;
    fx.declare(&Topology::new().endpoint(ENDPOINT)).await;
    let queue = fx.transport.queue_name(ENDPOINT);
    let direct = raw_connection().await;
    let transport = fx.transport();

    // A first publish opens the publishing channel, which needs the broker's answers.
    transport
        .send(ENDPOINT, Message::new("opens the channel"))
        .await
        .expect("the first publish is confirmed");
    wait_for_count(&direct, &queue, 1, Duration::from_secs(10)).await;

    proxy.hold(Direction::ToClient);
    let started = Instant::now();
    let send = tokio::spawn({
        let transport = transport.clone();
        async move { transport.send(ENDPOINT, Message::new("confirm lost")).await }
    });
    // The broker stored it; its confirm is held in the proxy.
    wait_for_count(&direct, &queue, 2, Duration::from_secs(5)).await;
    if send.is_finished() {
        panic!("the publish returned without its confirm: {:?}", send.await);
    }
    // The connection goes away with the confirm; new connections are forwarded both ways.
    proxy.cut();
    proxy.release(Direction::ToClient);

    let result = tokio::time::timeout(PUBLISH_TIMEOUT + Duration::from_secs(5), send)
        .await
        .expect("the publish returns")
        .expect("the publishing task does not panic");
    let took = started.elapsed();
    assert!(
        result.is_ok(),
        "a publish whose confirm was lost must be published again, got {result:?} after {took:?}"
    );
    assert!(
        took < PUBLISH_TIMEOUT,
        "published again within the publish timeout, took {took:?}"
    );
    // Twice: the copy the broker stored before the cut, and the one published again on the
    // next connection (the transport cannot know the first arrived). Nothing consumes the
    // queue, so both stay.
    wait_for_count(&direct, &queue, 3, Duration::from_secs(5)).await;
    assert!(
        proxy.accepted() >= 2,
        "the second publish went out on a new connection"
    );
    let _ = direct.close(200, "done".into()).await;
}
