//! What every clone of the transport and its consumers share: the options, the clock, the
//! checked connection string, the sending connection and its sender links, and how each client
//! call is bounded in time and its errors classified.

mod check;
mod send;
mod senders;

use std::future::Future;
use std::time::Duration;

use azservicebus::core::BasicRetryPolicy;
use azservicebus::{
    ServiceBusClient, ServiceBusClientOptions, ServiceBusRetryOptions, ServiceBusSender,
};
use redeliver_core::secret::SecretUrl;
use redeliver_core::{Clock, Error};
use tokio::sync::Mutex;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use self::senders::Senders;
use crate::connection_string;
use crate::errors;
use crate::options::ServiceBusOptions;

pub(crate) type Client = ServiceBusClient<BasicRetryPolicy>;

/// Extra time given to a client call beyond its own try time-out before it is given up.
const GRACE: Duration = Duration::from_secs(2);

pub(crate) struct Shared {
    /// As given; shown only redacted.
    pub(crate) connection_string: SecretUrl,
    /// What the client is given, checked.
    checked: connection_string::Checked,
    pub(crate) options: ServiceBusOptions,
    /// The clock every delay is computed on ([`Transport::clock`](redeliver_core::Transport::clock)).
    pub(crate) clock: Clock,
    /// The connection senders are made on; `None` until needed or after it failed.
    client: Mutex<Option<Client>>,
    /// The senders of each queue or topic, made on first use.
    senders: Senders,
    /// A token per consumer whose delivery stream was dropped and that is still giving back
    /// what it holds (see [`close`](Self::close)).
    pub(crate) closing: TaskTracker,
}

impl Shared {
    /// Checks `options`, then `connection_string`, without connecting.
    pub(crate) fn new(
        connection_string: SecretUrl,
        options: ServiceBusOptions,
    ) -> Result<Self, Error> {
        options.validate()?;
        let checked = connection_string::check(&connection_string, options.unsecured)?;
        Ok(Shared {
            connection_string,
            checked,
            senders: Senders::new(options.senders_per_entity),
            options,
            clock: Clock::system(),
            client: Mutex::new(None),
            closing: TaskTracker::new(),
        })
    }

    /// Makes the connection senders are made on now.
    pub(crate) async fn connect(&self) -> Result<(), Error> {
        let client = self.new_client().await?;
        *self.client.lock().await = Some(client);
        Ok(())
    }

    /// Waits (up to the try time-out) for the consumers whose delivery streams were dropped to
    /// give back what they hold and close, then closes every sender and the sending connection
    /// with `dispose()`.
    pub(crate) async fn close(&self) {
        self.closing.close();
        if tokio::time::timeout(self.options.try_timeout, self.closing.wait())
            .await
            .is_err()
        {
            info!(
                consumers = self.closing.len(),
                "closing: consumers still giving back messages after the try time-out; the \
                 locks of what they hold run out on their own"
            );
        }
        for (entity, pool) in self.senders.drain() {
            for slot in &pool.slots {
                if let Some(sender) = slot.lock().await.take() {
                    self.dispose_sender(&entity, sender).await;
                }
            }
        }
        if let Some(client) = self.client.lock().await.take() {
            self.dispose_client(client).await;
        }
    }

    /// A new connection with the client's own retries off (see "the lost-send hazard").
    pub(crate) async fn new_client(&self) -> Result<Client, Error> {
        let retry_options = ServiceBusRetryOptions {
            max_retries: 0,
            try_timeout: self.options.try_timeout,
            ..ServiceBusRetryOptions::default()
        };
        let client_options = ServiceBusClientOptions {
            retry_options,
            ..ServiceBusClientOptions::default()
        };
        let connection_string = self.checked.for_client.expose();
        let unsecured = self.options.unsecured || self.checked.emulator;
        let operation = format!(
            "connecting to Service Bus at `{}:{}`",
            self.checked.host,
            self.checked.port(self.options.unsecured)
        );
        debug!(connection_string = %self.connection_string, unsecured, "{operation}");
        let connecting = async {
            if unsecured {
                Client::unsecured()
                    .new_from_connection_string(connection_string, client_options)
                    .await
            } else {
                Client::new_from_connection_string(connection_string, client_options).await
            }
        };
        let after = self.options.connect_timeout.min(self.options.try_timeout);
        match tokio::time::timeout(after, connecting).await {
            Err(_) => Err(Error::timeout(operation, after)),
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => match e.kind() {
                // The connection string was checked: what the client still refuses is in it.
                azure_core::error::ErrorKind::Credential
                | azure_core::error::ErrorKind::DataConversion => Err(Error::config(
                    "connection_string",
                    format!("the Service Bus client refused it: {e}"),
                )),
                _ => Err(self.client_error(e, &operation, None)),
            },
        }
    }

    /// Runs a client call, giving up a little after the client's own try time-out.
    pub(crate) async fn bounded<F: Future>(
        &self,
        operation: &str,
        future: F,
    ) -> Result<F::Output, Error> {
        let after = self.options.try_timeout + GRACE;
        // On the heap: with rustls, some client futures (settling a message) are large enough
        // that keeping them inline overflows a 2 MiB thread stack in debug builds.
        tokio::time::timeout(after, Box::pin(future))
            .await
            .map_err(|_| Error::timeout(operation.to_owned(), after))
    }

    pub(crate) fn client_error(
        &self,
        error: azure_core::Error,
        operation: &str,
        entity: Option<(&'static str, &str)>,
    ) -> Error {
        errors::from_client(error, operation, entity, self.options.try_timeout)
    }

    pub(crate) async fn dispose_client(&self, client: Client) {
        match self.bounded("closing a connection", client.dispose()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "closing a connection failed"),
            Err(e) => debug!(error = %e, "closing a connection failed"),
        }
    }

    pub(crate) async fn dispose_sender(&self, entity: &str, sender: ServiceBusSender) {
        match self.bounded("closing a sender", sender.dispose()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(entity, error = %e, "closing a sender failed"),
            Err(e) => debug!(entity, error = %e, "closing a sender failed"),
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Links and the connection must be closed with `dispose()`, which is async: do it in the
        // background if a runtime is still there.
        let senders = self.senders.drain_unused();
        let client = self.client.get_mut().take();
        if senders.is_empty() && client.is_none() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let wait = self.options.try_timeout + GRACE;
            runtime.spawn(async move {
                for sender in senders {
                    let _ = tokio::time::timeout(wait, sender.dispose()).await;
                }
                if let Some(client) = client {
                    let _ = tokio::time::timeout(wait, client.dispose()).await;
                }
            });
        }
    }
}
