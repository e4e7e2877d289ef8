//! Publishing with publisher confirms: a publish succeeds only once the broker has taken
//! responsibility for the message, on whichever connection is up, within the operation timeout.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use redeliver_core::Error;
use tokio::time::Instant;
use tracing::debug;

use super::{Connected, Shared, Target};
use crate::{convert, errors, limits};

/// The first pause before publishing again after a negative confirm, and the longest.
const NACK_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
const NACK_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(1);

impl Connected {
    /// The publishing channel, in confirm mode; a new one if the last was closed (a channel
    /// error, such as publishing to a missing exchange, closes it).
    async fn publisher(&self) -> Result<Channel, lapin::Error> {
        let mut slot = self.publisher.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }
}

/// One message being published, and until when publishing it may take.
struct Publication<'a> {
    target: Target<'a>,
    properties: &'a BasicProperties,
    body: &'a [u8],
    /// What is being published, for errors and logs.
    doing: &'a str,
    deadline: Instant,
}

/// How a step of publishing on one connection ended, when it did not fail.
enum Step<T> {
    Done(T),
    /// The connection turned out to be down: publish again on the next one.
    ConnectionDown,
}

impl Shared {
    /// Publishes and waits for the broker's confirm: `Ok` only once the broker has taken
    /// responsibility for the message. A negative confirm is tried again, pausing 100 ms
    /// doubling to 1 s, until the publish timeout; then it is [`Error::Rejected`]. A mandatory
    /// message that matched no queue is [`Error::Unroutable`], a missing exchange is
    /// [`Error::NotFound`]. If the connection is down the call waits for it within the publish
    /// timeout; a message whose confirm was lost with its connection is published again on the
    /// next one (the broker may then hold it twice).
    pub(crate) async fn publish(
        &self,
        target: Target<'_>,
        properties: &BasicProperties,
        body: &[u8],
        doing: &str,
    ) -> Result<(), Error> {
        let publication = Publication {
            target,
            properties,
            body,
            doing,
            deadline: Instant::now() + self.options.operation_timeout,
        };
        let mut stale = None;
        let mut pause = NACK_PAUSE;
        loop {
            let conn = self.current(publication.deadline, stale, doing).await?;
            match self.publish_on(&conn, &publication).await? {
                // A negative confirm says the broker could not take the message now: a quorum
                // queue with reject-publish answers so while it elects a leader after losing a
                // node, for seconds. Publishing again (within the bound) rides that out; giving
                // the delivery back instead would bring it straight back, at the same attempt,
                // in a tight loop that burns the queue's delivery limit.
                Step::Done(Confirmation::Nack(None))
                    if Instant::now() + pause < publication.deadline =>
                {
                    debug!(doing, retry_in = ?pause, "negative confirm; publishing again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(NACK_PAUSE_MAX);
                }
                Step::Done(confirmation) => return confirmed(confirmation, &publication),
                Step::ConnectionDown => {
                    self.report_broken();
                    stale = Some(conn.generation);
                }
            }
        }
    }

    /// Publishes on `conn` and waits for the broker's answer.
    async fn publish_on(
        &self,
        conn: &Connected,
        publication: &Publication<'_>,
    ) -> Result<Step<Confirmation>, Error> {
        let Step::Done(channel) = self.open_channel(conn, publication).await? else {
            return Ok(Step::ConnectionDown);
        };
        self.check_fits(conn, publication)?;
        let Step::Done(confirm) = self.send(conn, &channel, publication).await? else {
            return Ok(Step::ConnectionDown);
        };
        self.confirmation(conn, confirm, publication).await
    }

    /// The publishing channel of `conn`, opened in time.
    async fn open_channel(
        &self,
        conn: &Connected,
        publication: &Publication<'_>,
    ) -> Result<Step<Channel>, Error> {
        let doing = publication.doing;
        match tokio::time::timeout_at(publication.deadline, conn.publisher()).await {
            Err(_) if conn.is_up() => Err(Error::timeout(
                format!("opening a channel for {doing}"),
                self.options.operation_timeout,
            )),
            Err(_) => Ok(Step::ConnectionDown),
            Ok(Ok(channel)) => Ok(Step::Done(channel)),
            Ok(Err(e)) if !conn.is_up() => {
                debug!(error = %e, "the connection is down; waiting for it before publishing");
                Ok(Step::ConnectionDown)
            }
            Ok(Err(e)) => Err(errors::from_client(
                e,
                format!("opening a channel for {doing}"),
            )),
        }
    }

    /// Refuses, before anything is sent, a message that fits neither the frames of `conn` nor
    /// the broker's largest message.
    fn check_fits(&self, conn: &Connected, publication: &Publication<'_>) -> Result<(), Error> {
        limits::check_fits(
            publication.properties,
            publication.body.len(),
            conn.connection.configuration().frame_max(),
            self.options.max_message_size,
        )
        .map_err(|e| match e {
            Error::InvalidMessage {
                message, source, ..
            } => {
                let error = Error::invalid_message(format!("{}: {message}", publication.doing));
                match source {
                    Some(source) => error.with_source(source),
                    None => error,
                }
            }
            other => other,
        })
    }

    /// Writes the message to `channel`; the broker's confirm comes later.
    async fn send(
        &self,
        conn: &Connected,
        channel: &Channel,
        publication: &Publication<'_>,
    ) -> Result<Step<PublisherConfirm>, Error> {
        let target = publication.target;
        let options = BasicPublishOptions {
            mandatory: target.mandatory,
            ..BasicPublishOptions::default()
        };
        // lapin resolves `basic_publish` only once its frames are written to the socket;
        // nothing else bounds that wait.
        let sent = tokio::time::timeout_at(
            publication.deadline,
            channel.basic_publish(
                target.exchange.into(),
                convert::short("routing key", target.routing_key)?,
                options,
                publication.body,
                publication.properties.clone(),
            ),
        )
        .await
        .map_err(|_| {
            Error::timeout(
                format!("sending {} to the broker", publication.doing),
                self.options.operation_timeout,
            )
        })?;
        match sent {
            Ok(confirm) => Ok(Step::Done(confirm)),
            // Refused before anything was sent: safe to try again on the next connection.
            Err(e) if !conn.is_up() => {
                debug!(error = %e, "the connection is down; waiting for it before publishing");
                Ok(Step::ConnectionDown)
            }
            Err(e) => Err(errors::from_client(e, publication.doing.to_owned())),
        }
    }

    /// Waits for the broker's confirm of a message sent on `conn`.
    async fn confirmation(
        &self,
        conn: &Connected,
        confirm: PublisherConfirm,
        publication: &Publication<'_>,
    ) -> Result<Step<Confirmation>, Error> {
        let doing = publication.doing;
        match tokio::time::timeout_at(publication.deadline, confirm).await {
            Err(_) => Err(Error::timeout(
                format!("waiting for the broker to confirm {doing}"),
                self.options.operation_timeout,
            )),
            Ok(Err(e)) if errors::is_not_found(&e) => {
                Err(
                    Error::not_found("exchange", publication.target.exchange.to_owned()).with_hint(
                        format!("{doing} failed; declare the topology first (Transport::declare)"),
                    ),
                )
            }
            // The connection went away before the confirm: the message may or may not have
            // reached the broker. It is published again on the next connection, within the
            // publish timeout, so the broker may hold it twice, which at-least-once allows.
            Ok(Err(e)) if !conn.is_up() => {
                debug!(error = %e, doing, "no confirm before the connection was lost; publishing again");
                Ok(Step::ConnectionDown)
            }
            Ok(Err(e)) => Err(errors::from_client(
                e,
                format!("{doing}: no confirm received, the message may not be stored"),
            )),
            Ok(Ok(confirmation)) => Ok(Step::Done(confirmation)),
        }
    }
}

/// What the broker's confirm says: taken, returned as unroutable, returned or refused.
fn confirmed(confirmation: Confirmation, publication: &Publication<'_>) -> Result<(), Error> {
    let Publication { target, doing, .. } = publication;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))
            if returned.reply_code == 312 =>
        {
            Err(Error::unroutable(format!(
                "{doing}: no queue is bound to routing key `{}` on {} ({})",
                target.routing_key,
                exchange_label(target.exchange),
                returned.reply_text
            )))
        }
        Confirmation::Ack(Some(returned)) => Err(Error::rejected(format!(
            "{doing}: the broker returned the message: {} {}",
            returned.reply_code, returned.reply_text
        ))),
        Confirmation::Nack(_) => Err(Error::rejected(format!(
            "{doing}: the broker did not accept the message (negative confirm; \
                 for example a full queue with x-overflow=reject-publish)"
        ))),
        Confirmation::NotRequested => Err(Error::other(format!(
            "{doing}: publisher confirms were not enabled on the channel"
        ))),
    }
}

fn exchange_label(exchange: &str) -> String {
    if exchange.is_empty() {
        "the default exchange".to_owned()
    } else {
        format!("exchange `{exchange}`")
    }
}
