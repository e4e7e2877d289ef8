//! The RabbitMQ transport as the conformance suite makes it: a transport per scenario with a
//! unique prefix, its queues and exchanges removed afterwards. Shared by the test binaries that
//! run suites (`#[path]`), next to `common`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redeliver_conformance::{Factory, Timing};
use redeliver_core::{Error, Topology, Transport};
use redeliver_rabbitmq::RabbitMqTransport;

#[derive(Default)]
pub(crate) struct RabbitMq {
    transport: Mutex<Option<RabbitMqTransport>>,
}

#[async_trait]
impl Factory for RabbitMq {
    async fn available(&self) -> bool {
        crate::common::broker_available().await
    }

    async fn create(&self, topology: &Topology) -> Result<Arc<dyn Transport>, Error> {
        let transport =
            RabbitMqTransport::connect(crate::common::test_options(crate::common::amqp_url()))
                .await?;
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
        crate::common::delete(queues, exchanges).await;
        Ok(())
    }

    fn timing(&self) -> Timing {
        // Delays are whole seconds on RabbitMQ.
        Timing::new(Duration::from_secs(1), Duration::from_secs(20))
    }
}
