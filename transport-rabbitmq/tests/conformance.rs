//! The conformance suite on RabbitMQ: the same scenarios, the same assertions as in memory.
//! Each scenario gets its own transport with a unique prefix, removed afterwards.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redeliver_conformance::{Factory, Timing};
use redeliver_core::{Error, Topology, Transport};
use redeliver_rabbitmq::RabbitMqTransport;

#[derive(Default)]
struct RabbitMq {
    transport: Mutex<Option<RabbitMqTransport>>,
}

#[async_trait]
impl Factory for RabbitMq {
    async fn available(&self) -> bool {
        common::broker_available().await
    }

    async fn create(&self, topology: &Topology) -> Result<Arc<dyn Transport>, Error> {
        let transport =
            RabbitMqTransport::connect(common::test_options(common::amqp_url())).await?;
        transport.declare(topology).await?;
        *self.transport.lock().unwrap() = Some(transport.clone());
        Ok(Arc::new(transport))
    }

    async fn remove(&self, topology: &Topology) -> Result<(), Error> {
        let Some(transport) = self.transport.lock().unwrap().take() else {
            return Ok(());
        };
        let redeliver_rabbitmq::Infrastructure {
            mut queues,
            mut exchanges,
            ..
        } = transport.infrastructure();
        for endpoint in topology.endpoints() {
            queues.push(transport.queue_name(endpoint));
            queues.push(transport.dead_letter_queue_name(endpoint));
            queues.push(transport.quarantine_queue_name(endpoint));
        }
        exchanges.extend(
            topology
                .topics()
                .map(|(topic, _)| transport.topic_exchange_name(topic)),
        );
        transport.close().await;
        common::delete(queues, exchanges).await;
        Ok(())
    }

    fn timing(&self) -> Timing {
        // Delays are whole seconds on RabbitMQ.
        Timing::new(Duration::from_secs(1), Duration::from_secs(20))
    }
}

redeliver_conformance::conformance_tests!(RabbitMq::default(), #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
redeliver_conformance::dead_letter_ops_tests!(RabbitMq::default(), #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
