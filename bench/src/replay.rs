//! Replaying dead letters on RabbitMQ: [`DeadLetters::replay`] of every dead letter of an
//! endpoint next to a raw `lapin` move loop (`basic.get`, publish to the endpoint's queue,
//! wait for the confirm, ack), one message at a time on both sides, in the same run.

use std::sync::Arc;
use std::time::Instant;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use redeliver::dead_letters::{DeadLetters, ReplayOptions, Selection};
use redeliver::rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use redeliver::{Topology, Transport};

use crate::rabbitmq::{amqp_url, connect_or_skip};
use crate::report::Report;
use crate::{Scale, support::median_of};

const GROUP: &str = "replay";

pub(crate) async fn run(scale: &Scale, report: &mut Report) {
    let url = amqp_url();
    let Some(raw) = connect_or_skip(&url).await else {
        return;
    };
    let n = if scale.smoke { 200 } else { 10_000 };
    let prefix = format!("bench-replay-{}.", std::process::id());
    let transport = RabbitMqTransport::connect(RabbitMqOptions::new(&url).with_prefix(prefix))
        .await
        .expect("the bench connects");
    let endpoint = "replayed";
    transport
        .declare(&Topology::new().endpoint(endpoint))
        .await
        .expect("the bench declares its endpoint");
    let queue = transport.queue_name(endpoint);
    let dead = transport.dead_letter_queue_name(endpoint);
    let channel = confirm_channel(&raw).await;
    let shared: Arc<dyn Transport> = Arc::new(transport.clone());

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..scale.runs {
        fill(&channel, &dead, n).await;
        let started = Instant::now();
        let replayed = DeadLetters::new(Arc::clone(&shared), endpoint)
            .replay(&Selection::all(), &ReplayOptions::default(), &mut |_| {})
            .await
            .expect("the replay");
        assert_eq!(replayed.done, n as u64, "every dead letter replayed");
        ours.push(n as f64 / started.elapsed().as_secs_f64());
        purge(&channel, &queue).await;

        fill(&channel, &dead, n).await;
        theirs.push(raw_move(&channel, &dead, &queue, n).await);
        purge(&channel, &queue).await;
    }
    report.compare(
        GROUP,
        format!("quorum: replay {n} dead letters (get, confirmed publish, ack, one at a time)"),
        median_of(ours),
        median_of(theirs),
        "msg/s",
    );
    // The endpoint's queues, then the delay infrastructure its prefix declared.
    let infrastructure = transport.infrastructure();
    let queues = [queue, dead, transport.quarantine_queue_name(endpoint)];
    for q in queues.into_iter().chain(infrastructure.queues) {
        if let Err(e) = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            eprintln!("replay bench: could not delete queue `{q}`: {e}");
        }
    }
    for exchange in infrastructure.exchanges {
        if let Err(e) = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
        {
            eprintln!("replay bench: could not delete exchange `{exchange}`: {e}");
        }
    }
    transport.close().await;
    let _ = raw.close(200, "bench done".into()).await;
}

async fn confirm_channel(raw: &Connection) -> Channel {
    let channel = raw.create_channel().await.expect("a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    channel
}

/// `n` dead letters in `queue`, as the worker stores them (reason header, 1 KiB body).
async fn fill(channel: &Channel, queue: &str, n: usize) {
    let body = vec![b'x'; 1024];
    let mut headers = FieldTable::default();
    headers.insert(
        "redeliver-dead-letter-reason".into(),
        AMQPValue::LongString("timeout".into()),
    );
    for i in 0..n {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("dead-{i}").into())
            .with_headers(headers.clone());
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .expect("published")
            .await
            .expect("confirmed");
    }
}

async fn purge(channel: &Channel, queue: &str) {
    channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .expect("purged");
}

/// The raw move loop: get, publish with confirm, ack.
async fn raw_move(channel: &Channel, from: &str, to: &str, n: usize) -> f64 {
    let started = Instant::now();
    for _ in 0..n {
        let got = channel
            .basic_get(from.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("a get")
            .expect("a dead letter");
        let delivery = got.delivery;
        channel
            .basic_publish(
                "".into(),
                to.into(),
                BasicPublishOptions::default(),
                &delivery.data,
                delivery.properties.clone(),
            )
            .await
            .expect("published")
            .await
            .expect("confirmed");
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("acked");
    }
    n as f64 / started.elapsed().as_secs_f64()
}
