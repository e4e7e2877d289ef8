//! The Service Bus transport as the conformance suite makes it: a test broker per scenario.
//! Shared by the test binaries that run suites (`#[path]`), next to `support`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redeliver_conformance::{Factory, Timing};
use redeliver_core::{Error, Topology, Transport};
use redeliver_servicebus_testbroker::{BrokerHandle, QueueOptions};

/// Starts a broker per scenario and keeps it running as long as the scenario.
#[derive(Default)]
pub(crate) struct ServiceBus {
    brokers: Mutex<Vec<BrokerHandle>>,
}

#[async_trait]
impl Factory for ServiceBus {
    async fn create(&self, topology: &Topology) -> Result<Arc<dyn Transport>, Error> {
        let (broker, transport) = crate::support::setup(topology, QueueOptions::default()).await;
        self.brokers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(broker);
        Ok(Arc::new(transport))
    }

    fn timing(&self) -> Timing {
        Timing::new(Duration::from_secs(1), Duration::from_secs(20))
    }
}

// A current-thread runtime: on a multi-threaded one, `fe2o3-amqp` 0.14.1 can lose the outcome of
// a transfer answered faster than it files the transfer as unsettled (see the crate docs), and a
// broker on loopback answers that fast.
