//! How a consumer's stream receives against the test broker: credit after a drain over a link
//! with latency, and a stream that goes on after its receiver failed.
//!
//! Every test starts its own broker.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use redeliver_core::{ConsumeOptions, Message, Source, Topology, Transport};
use redeliver_servicebus::ServiceBusTransport;
use redeliver_servicebus_testbroker::{BrokerOptions, QueueOptions, start};
use support::{PROMPT, next_within};

/// A short batch ends with the client draining its credit; the broker's answer takes a while
/// to arrive (as from a real namespace), and credit granted before it is counted from a stale
/// delivery count, as nothing. The consumer must grant again until credit counts, instead of
/// sitting out its whole receive wait on credit the broker never saw.
#[tokio::test]
async fn a_message_sent_after_a_drained_batch_does_not_wait_out_the_receive_wait() {
    let latency = Duration::from_millis(30);
    let receive_wait = Duration::from_secs(20);
    let broker = start(BrokerOptions::default().with_latency(latency))
        .await
        .expect("the test broker starts");
    support::provision(
        &broker,
        &Topology::new().endpoint("q"),
        &QueueOptions::default(),
    );
    let transport = ServiceBusTransport::connect(
        broker.connection_string(),
        support::options()
            .with_try_timeout(Duration::from_secs(30))
            .with_receive_wait(receive_wait),
    )
    .await
    .expect("the transport connects");
    let mut stream = transport
        .consume(
            &Source::endpoint("q"),
            ConsumeOptions::default().with_prefetch(8),
        )
        .await
        .unwrap();

    // The first message is received alone; the batch that follows finds nothing and drains.
    transport.send("q", Message::new("first")).await.unwrap();
    next_within(&mut stream, PROMPT)
        .await
        .complete()
        .await
        .unwrap();
    // A quiet second: the consumer's credit after the drain is what this test is about.
    tokio::time::sleep(Duration::from_secs(1)).await;

    transport.send("q", Message::new("second")).await.unwrap();
    let sent = Instant::now();
    let second = next_within(&mut stream, receive_wait + PROMPT).await;
    let waited = sent.elapsed();
    assert_eq!(&second.message().body()[..], b"second");
    second.complete().await.unwrap();
    assert!(
        waited < receive_wait / 4,
        "received {waited:?} after it was sent: the consumer sat out its {receive_wait:?} \
         receive wait on credit granted before the answer to its drain"
    );
}

/// A consumer whose receiver fails (the broker went away) reports it on its stream and goes on
/// with a new receiver, on the same stream.
#[tokio::test]
async fn a_stream_goes_on_after_its_receiver_failed() {
    let topology = Topology::new().endpoint("q");
    let broker = support::broker().await;
    let address = broker.address();
    support::provision(&broker, &topology, &QueueOptions::default());
    let transport = ServiceBusTransport::connect(
        broker.connection_string(),
        support::options()
            .with_try_timeout(Duration::from_secs(3))
            .with_receive_wait(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let mut stream = transport
        .consume(&Source::endpoint("q"), ConsumeOptions::default())
        .await
        .unwrap();
    transport.send("q", Message::new("before")).await.unwrap();
    next_within(&mut stream, PROMPT)
        .await
        .complete()
        .await
        .unwrap();

    broker.shutdown().await;
    let broker = start(BrokerOptions::default().with_address(address))
        .await
        .expect("the address is free again");
    support::provision(&broker, &topology, &QueueOptions::default());
    transport
        .send("q", Message::new("after"))
        .await
        .expect("sending works again");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut errors = 0;
    let after = loop {
        match tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("a delivery from the new receiver in time")
        {
            Some(Ok(delivery)) => break delivery,
            Some(Err(_)) => errors += 1,
            None => panic!("the stream ended instead of opening a new receiver"),
        }
    };
    assert_eq!(&after.message().body()[..], b"after");
    after.complete().await.unwrap();
    assert!(errors >= 1, "the failed receiver is reported on the stream");
}
