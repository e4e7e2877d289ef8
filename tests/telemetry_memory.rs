//! The telemetry scenarios on the in-memory transport (`opentelemetry` feature), tokio's clock
//! paused.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redeliver::memory::MemoryTransport;
use redeliver::{Error, Topology, Transport};
use redeliver_conformance::{Factory, Timing};

struct Memory;

#[async_trait]
impl Factory for Memory {
    async fn create(&self, topology: &Topology) -> Result<Arc<dyn Transport>, Error> {
        let transport = MemoryTransport::new();
        transport.declare(topology).await?;
        Ok(Arc::new(transport))
    }

    fn timing(&self) -> Timing {
        Timing::new(Duration::from_secs(1), Duration::from_secs(3600))
    }
}

redeliver_conformance::telemetry_tests!(Memory, #[tokio::test(start_paused = true)]);
