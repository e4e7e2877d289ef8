//! The real `redeliver` binary against RabbitMQ: dead letters made by a worker are listed,
//! grouped, replayed and handled; a replay killed half-way (SIGKILL) loses nothing.

#[path = "../../transport-rabbitmq/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use redeliver_core::{Topology, Transport};
use redeliver_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use tokio::sync::watch;

use support::{Handled, dead_letters, redeliver, run, worker};

async fn setup() -> Option<(RabbitMqTransport, Arc<dyn Transport>, String)> {
    if !common::broker_available().await {
        return None;
    }
    let endpoint = format!("cli-{:08x}", fastrand::u32(..));
    let rabbit = RabbitMqTransport::connect(RabbitMqOptions::new(common::amqp_url()))
        .await
        .expect("connected");
    rabbit
        .declare(&Topology::new().endpoint(&endpoint))
        .await
        .expect("declared");
    let transport: Arc<dyn Transport> = Arc::new(rabbit.clone());
    Some((rabbit, transport, endpoint))
}

async fn teardown(rabbit: RabbitMqTransport, endpoint: &str) {
    let queues = vec![
        rabbit.queue_name(endpoint),
        rabbit.dead_letter_queue_name(endpoint),
        rabbit.quarantine_queue_name(endpoint),
    ];
    rabbit.close().await;
    common::delete(queues, Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_grouped_replayed_and_handled() {
    let Some((rabbit, transport, endpoint)) = setup().await else {
        return;
    };
    support::listed_grouped_replayed_and_handled(&common::amqp_url(), &transport, &endpoint).await;
    teardown(rabbit, &endpoint).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_half_way_loses_nothing() {
    let Some((rabbit, transport, endpoint)) = setup().await else {
        return;
    };
    let url = common::amqp_url();
    let ids = dead_letters(&transport, &endpoint, 20).await;

    let handled = Handled::new();
    let calls = Arc::new(watch::Sender::new(0));
    let w = worker(&transport, &endpoint, &handled, &calls).await;
    let mut replay = redeliver(
        &url,
        &["dead-letters", "replay", &endpoint, "--yes", "--rate", "20"],
    )
    .spawn()
    .expect("redeliver runs");
    handled.wait_for(5).await;
    // SIGKILL: no chance to finish what it is doing.
    replay.start_kill().expect("killed");
    let status = replay.wait().await.expect("it ends");
    assert!(!status.success(), "killed, not finished: {status:?}");
    let left = transport.count_dead_letters(&endpoint).await.unwrap();
    assert!(left > 0 && left < 20, "killed half-way: {left} left");

    run(&url, &["dead-letters", "replay", &endpoint, "--yes"], 0).await;
    handled.wait_for(20).await;
    w.shutdown().await;
    assert_eq!(
        handled.ids(),
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        "every dead letter came back"
    );
    assert!(
        handled
            .calls
            .lock()
            .unwrap()
            .iter()
            .all(|(_, attempt)| *attempt == 1)
    );
    assert_eq!(transport.count_dead_letters(&endpoint).await.unwrap(), 0);
    teardown(rabbit, &endpoint).await;
}
