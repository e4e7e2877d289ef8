//! A test broker per test, with the entities a topology needs, and a transport on it.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use redeliver_core::{Delivery, DeliveryStream, Error, Topology, Transport};
use redeliver_servicebus::{ServiceBusOptions, ServiceBusTransport};
use redeliver_servicebus_testbroker::{
    BrokerHandle, BrokerOptions, QueueOptions, SubscriptionOptions, TopicOptions, start,
};

/// Upper bound for anything that should happen promptly.
pub const PROMPT: Duration = Duration::from_secs(20);

/// The next delivery of `stream`, within `within`.
pub async fn next_within(stream: &mut DeliveryStream, within: Duration) -> Delivery {
    tokio::time::timeout(within, futures::StreamExt::next(stream))
        .await
        .expect("a delivery in time")
        .expect("the stream is open")
        .expect("no consumer error")
}

pub async fn broker() -> BrokerHandle {
    start(BrokerOptions::default())
        .await
        .expect("the test broker starts")
}

/// Options for the test broker: plain AMQP, short time-outs.
pub fn options() -> ServiceBusOptions {
    ServiceBusOptions::default()
        .with_unsecured(true)
        .with_try_timeout(Duration::from_secs(10))
        .with_receive_wait(Duration::from_secs(5))
}

/// Provisions `topology` the way the crate docs ask: a queue per endpoint, a topic per topic,
/// and a subscription per subscribed endpoint, named like it and forwarding into its queue.
pub fn provision(broker: &BrokerHandle, topology: &Topology, queue: &QueueOptions) {
    for endpoint in topology.endpoints() {
        broker
            .create_queue(endpoint, queue.clone())
            .expect("queue created");
    }
    for (topic, endpoints) in topology.topics() {
        broker
            .create_topic(topic, TopicOptions::default())
            .expect("topic created");
        for endpoint in endpoints {
            broker
                .create_subscription(
                    topic,
                    endpoint,
                    SubscriptionOptions::default().with_forward_to(endpoint),
                )
                .expect("subscription created");
        }
    }
}

pub async fn transport(broker: &BrokerHandle) -> Result<ServiceBusTransport, Error> {
    ServiceBusTransport::connect(broker.connection_string(), options()).await
}

/// A broker with `topology` provisioned (queues with `queue` options), and a transport on
/// which it was declared.
pub async fn setup(
    topology: &Topology,
    queue: QueueOptions,
) -> (BrokerHandle, ServiceBusTransport) {
    let broker = broker().await;
    provision(&broker, topology, &queue);
    let transport = transport(&broker).await.expect("the transport connects");
    transport
        .declare(topology)
        .await
        .expect("the provisioned topology exists");
    (broker, transport)
}

/// A listener on a free loopback address's port 5672 (the port the client dials) that accepts
/// connections and never answers, and its address. It stops when the returned task is aborted
/// or the runtime ends.
pub async fn silent_listener() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = free_loopback_listener().await;
    let address = listener.local_addr().expect("a bound address");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            // Held open, never read from or written to.
            held.push(socket);
        }
    });
    (address, task)
}

/// A listener on the first loopback address from 127.0.0.2 whose port 5672 is free.
pub async fn free_loopback_listener() -> tokio::net::TcpListener {
    for last in 2..=254u8 {
        let address = std::net::SocketAddr::from(([127, 0, 0, last], 5672));
        if let Ok(listener) = tokio::net::TcpListener::bind(address).await {
            return listener;
        }
    }
    panic!("no loopback address with port 5672 free (see the test broker's crate docs)");
}

/// A raw `azservicebus` client on `broker`, with its own retries off, for sending what the
/// transport would not.
pub async fn raw_client(
    broker: &BrokerHandle,
) -> azservicebus::ServiceBusClient<azservicebus::core::BasicRetryPolicy> {
    azservicebus::ServiceBusClient::<azservicebus::core::BasicRetryPolicy>::unsecured()
        .new_from_connection_string(
            broker.connection_string(),
            azservicebus::ServiceBusClientOptions {
                retry_options: azservicebus::ServiceBusRetryOptions {
                    max_retries: 0,
                    ..azservicebus::ServiceBusRetryOptions::default()
                },
                ..azservicebus::ServiceBusClientOptions::default()
            },
        )
        .await
        .expect("a raw client connects")
}

/// Sends `messages` to queue `queue` of `broker` with a raw client.
pub async fn send_raw(
    broker: &BrokerHandle,
    queue: &str,
    messages: Vec<azservicebus::ServiceBusMessage>,
) {
    let mut client = raw_client(broker).await;
    let mut sender = client
        .create_sender(queue, azservicebus::ServiceBusSenderOptions::default())
        .await
        .expect("a raw sender attaches");
    for message in messages {
        sender
            .send_message(message)
            .await
            .expect("the raw send is accepted");
    }
    sender.dispose().await.expect("the raw sender closes");
    client.dispose().await.expect("the raw client closes");
}
