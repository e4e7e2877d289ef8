//! The in-memory transport as the conformance suite makes it. Shared by the test binaries that
//! run suites (`#[path]`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redeliver::memory::MemoryTransport;
use redeliver::{Error, Topology, Transport};
use redeliver_conformance::{Factory, Timing};

pub(crate) struct Memory;

#[async_trait]
impl Factory for Memory {
    async fn create(&self, topology: &Topology) -> Result<Arc<dyn Transport>, Error> {
        let transport = MemoryTransport::new();
        transport.declare(topology).await?;
        Ok(Arc::new(transport))
    }

    fn timing(&self) -> Timing {
        // Virtual time: an hour of patience costs nothing.
        Timing::new(Duration::from_secs(1), Duration::from_secs(3600))
    }
}
