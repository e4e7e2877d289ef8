//! Sending to a queue or topic: each try on a free link of the entity's pool, transient
//! failures tried again with doubling pauses, and a link (or the connection) that may be broken
//! made again for the next send.

use azservicebus::{ServiceBusSender, ServiceBusSenderOptions};
use redeliver_core::{Error, Message};
use tracing::{info, warn};

use super::Shared;
use crate::convert::outgoing;

impl Shared {
    /// Sends `message` to queue or topic `entity`, retrying transient failures; a copy (a
    /// retry or a park) has the native id `copy_id` (see [`copy_id`](crate::convert::ids::copy_id)).
    pub(crate) async fn send_entity(
        &self,
        entity: &str,
        what: &'static str,
        message: &Message,
        copy_id: Option<&str>,
    ) -> Result<(), Error> {
        let mut pause = self.options.send_backoff;
        let mut attempt = 1;
        loop {
            // Rebuilt per attempt: whether to schedule depends on the time of sending.
            let outgoing = outgoing::to_service_bus(message, copy_id, self.clock.now())?;
            match self.try_send(entity, what, outgoing).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && attempt < self.options.send_attempts => {
                    warn!(entity, attempt, error = %e, "sending failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_send(
        &self,
        entity: &str,
        what: &'static str,
        outgoing: azservicebus::ServiceBusMessage,
    ) -> Result<(), Error> {
        let pool = self.senders.pool(entity);
        let mut sender = pool.acquire().await;
        if sender.is_none() {
            *sender = Some(self.create_sender(entity, what).await?);
        }
        let operation = format!("sending to {what} `{entity}`");
        let result = match sender.as_mut() {
            Some(s) => self.bounded(&operation, s.send_message(outgoing)).await,
            None => return Err(Error::Closed),
        };
        let error = match result {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => self.client_error(e, &operation, Some((what, entity))),
            Err(timeout) => timeout,
        };
        if error.is_transient() {
            // The link may be broken: make a new one next time.
            if let Some(old) = sender.take() {
                self.dispose_sender(entity, old).await;
            }
            if let Error::Connection { .. } = error {
                // So may the connection: every link of a client shares its one session, and a
                // new link on a dead session would fail too.
                if let Some(old) = self.client.lock().await.take() {
                    info!(error = %error, "reconnecting to Service Bus");
                    self.dispose_client(old).await;
                }
            }
        }
        Err(error)
    }

    async fn create_sender(
        &self,
        entity: &str,
        what: &'static str,
    ) -> Result<ServiceBusSender, Error> {
        let mut client = self.client.lock().await;
        if client.is_none() {
            *client = Some(self.new_client().await?);
        }
        let operation = format!("attaching a sender to {what} `{entity}`");
        let result = match client.as_mut() {
            Some(c) => {
                self.bounded(
                    &operation,
                    c.create_sender(entity, ServiceBusSenderOptions::default()),
                )
                .await
            }
            None => return Err(Error::Closed),
        };
        let error = match result {
            Ok(Ok(sender)) => return Ok(sender),
            Ok(Err(e)) => self.client_error(e, &operation, Some((what, entity))),
            Err(timeout) => timeout,
        };
        if error.is_transient() {
            // The connection may be gone: connect again next time.
            if let Some(old) = client.take() {
                info!(error = %error, "reconnecting to Service Bus");
                self.dispose_client(old).await;
            }
        }
        Err(error)
    }
}
