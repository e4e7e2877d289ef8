//! `amqp://` and `amqps://` URLs: the RabbitMQ transport, reached from configuration.

use std::sync::Arc;

use async_trait::async_trait;
use redeliver_core::connector::{Connector, has_scheme};
use redeliver_core::secret::SecretUrl;
use redeliver_core::{Error, Transport};

use crate::RabbitMqTransport;

/// Connects `amqp://user:password@host:port/vhost` and `amqps://...` URLs (query parameters as
/// [`RabbitMqOptions::new`](crate::RabbitMqOptions::new) reads them) with the default options.
#[derive(Clone, Copy, Debug, Default)]
pub struct RabbitMqConnector;

#[async_trait]
impl Connector for RabbitMqConnector {
    fn name(&self) -> &'static str {
        "RabbitMQ"
    }

    fn accepts(&self, url: &str) -> bool {
        has_scheme(url, "amqp") || has_scheme(url, "amqps")
    }

    async fn connect(&self, url: &SecretUrl) -> Result<Arc<dyn Transport>, Error> {
        Ok(Arc::new(
            RabbitMqTransport::connect_url(url.expose().trim()).await?,
        ))
    }
}
