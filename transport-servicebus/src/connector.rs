//! Service Bus connection strings (`Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...`):
//! the Service Bus transport, reached from configuration.

use std::sync::Arc;

use async_trait::async_trait;
use redeliver_core::connector::{Connector, connection_string_value as value};
use redeliver_core::secret::SecretUrl;
use redeliver_core::{Error, Transport};

use crate::{ServiceBusOptions, ServiceBusTransport};

/// Connects a Service Bus connection string with the default options. As with Microsoft's
/// emulator, `UseDevelopmentEmulator=true` connects with plain AMQP, without TLS (the test
/// broker's strings carry it).
#[derive(Clone, Copy, Debug, Default)]
pub struct ServiceBusConnector;

#[async_trait]
impl Connector for ServiceBusConnector {
    fn name(&self) -> &'static str {
        "Service Bus"
    }

    fn accepts(&self, url: &str) -> bool {
        value(url, "Endpoint").is_some()
    }

    async fn connect(&self, url: &SecretUrl) -> Result<Arc<dyn Transport>, Error> {
        Ok(Arc::new(
            ServiceBusTransport::connect(url.clone(), ServiceBusOptions::default()).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_are_recognised_by_their_endpoint() {
        let c = ServiceBusConnector;
        assert!(c.accepts("Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=b"));
        assert!(c.accepts("SharedAccessKeyName=a;SharedAccessKey=b;endpoint=sb://ns/"));
        assert!(!c.accepts("SharedAccessKeyName=a;SharedAccessKey=b"));
        assert!(!c.accepts("amqp://guest:guest@localhost/%2f"));
    }
}
