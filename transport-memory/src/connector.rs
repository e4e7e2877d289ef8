//! `memory://`: the in-memory transport, reached from a URL like the brokers.

use std::sync::Arc;

use async_trait::async_trait;
use redeliver_core::connector::{Connector, has_scheme};
use redeliver_core::secret::SecretUrl;
use redeliver_core::{Error, Transport};

use crate::MemoryTransport;

/// Connects `memory://` to a new [`MemoryTransport`] (every call makes a new one: messages
/// live in this process only).
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryConnector;

#[async_trait]
impl Connector for MemoryConnector {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn accepts(&self, url: &str) -> bool {
        has_scheme(url, "memory")
    }

    async fn connect(&self, _url: &SecretUrl) -> Result<Arc<dyn Transport>, Error> {
        Ok(Arc::new(MemoryTransport::new()))
    }
}
