//! A test broker per test, with the entities a topology needs, and a transport on it.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use redeliver_core::{Error, Topology, Transport};
use redeliver_servicebus::{ServiceBusOptions, ServiceBusTransport};
use redeliver_servicebus_testbroker::{
    BrokerHandle, BrokerOptions, QueueOptions, SubscriptionOptions, TopicOptions, start,
};

/// Upper bound for anything that should happen promptly.
pub const PROMPT: Duration = Duration::from_secs(20);

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
