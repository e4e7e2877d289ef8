//! Checking that the queues, topics and subscriptions of a topology exist: Service Bus entities
//! cannot be created over AMQP.

use azservicebus::{ServiceBusReceiverOptions, ServiceBusSenderOptions};
use redeliver_core::{Error, Topology};
use tracing::debug;

use super::{Client, Shared};

impl Shared {
    /// Checks that every entity of `topology` exists, on a connection of its own (an attach
    /// refused with `amqp:not-found` is not left behind on the sending connection).
    pub(crate) async fn check(&self, topology: &Topology) -> Result<(), Error> {
        let mut client = self.new_client().await?;
        let result = self.check_with(&mut client, topology).await;
        self.dispose_client(client).await;
        result
    }

    async fn check_with(&self, client: &mut Client, topology: &Topology) -> Result<(), Error> {
        let queues = topology.endpoints().map(|q| (q.to_owned(), "queue"));
        let topics = topology.topics().map(|(t, _)| (t.to_owned(), "topic"));
        let entities: Vec<(String, &'static str)> = queues.chain(topics).collect();
        for (entity, what) in entities {
            let operation = format!("checking {what} `{entity}`");
            let attached = self
                .bounded(
                    &operation,
                    client.create_sender(entity.clone(), ServiceBusSenderOptions::default()),
                )
                .await?;
            match attached {
                Ok(sender) => self.dispose_sender(&entity, sender).await,
                Err(e) => return Err(self.client_error(e, &operation, Some((what, &entity)))),
            }
        }
        let subscriptions: Vec<(String, String)> = topology
            .topics()
            .flat_map(|(topic, endpoints)| {
                endpoints
                    .map(|endpoint| (topic.to_owned(), endpoint.to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (topic, endpoint) in subscriptions {
            let path = format!("{topic}/Subscriptions/{endpoint}");
            let operation = format!("checking subscription `{path}`");
            // A receiver that is never asked for a message takes none.
            let attached = self
                .bounded(
                    &operation,
                    client.create_receiver_for_subscription(
                        &topic,
                        &endpoint,
                        ServiceBusReceiverOptions::default(),
                    ),
                )
                .await?;
            match attached {
                Ok(receiver) => {
                    if let Err(e) = self.bounded(&operation, receiver.dispose()).await {
                        debug!(error = %e, "closing a checking receiver failed");
                    }
                }
                Err(e) => {
                    return Err(
                        match self.client_error(e, &operation, Some(("subscription", &path))) {
                            Error::NotFound { what, name, .. } => Error::not_found(what, name)
                                .with_hint(format!(
                                    "create subscription `{endpoint}` on topic `{topic}` with \
                                 ForwardTo = queue `{endpoint}`"
                                )),
                            other => other,
                        },
                    );
                }
            }
        }
        Ok(())
    }
}
