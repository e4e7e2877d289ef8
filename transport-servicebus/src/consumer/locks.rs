//! The lock of a delivery the consumer holds: when it runs out and when to renew it, and what the
//! consumer does with it on the receiver (renew it, settle the delivery, give a held dead letter
//! back).

use azservicebus::ServiceBusReceiver;
use azservicebus::primitives::service_bus_received_message::ServiceBusReceivedMessage;
use fe2o3_amqp_types::primitives::OrderedMap;
use redeliver_core::clock::until;
use redeliver_core::{Clock, Error, Source};
use serde_amqp::Value;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::commands::Final;
use crate::convert::time::to_utc;
use crate::shared::Shared;

/// A delivery this consumer holds the lock of.
pub(super) struct Locked {
    pub(super) message: ServiceBusReceivedMessage,
    /// When the lock runs out, on the local clock.
    expires: Instant,
    /// When to renew next; `None` once renewing failed (the broker will deliver it again).
    pub(super) renew_at: Option<Instant>,
    /// A dead letter kept locked until its retry is due, then abandoned with these
    /// properties; it no longer counts as handed out.
    pub(super) abandon_at: Option<(Instant, OrderedMap<String, Value>)>,
}

impl Locked {
    pub(super) fn new(message: ServiceBusReceivedMessage, clock: &Clock) -> Option<Self> {
        let remaining = message
            .locked_until()
            .map(|at| until(clock.now(), to_utc(at)))
            .unwrap_or_default();
        if remaining.is_zero() {
            return None;
        }
        let now = Instant::now();
        Some(Locked {
            message,
            expires: now + remaining,
            renew_at: Some(now + remaining / 2),
            abandon_at: None,
        })
    }

    pub(super) fn next_timer(&self) -> Option<Instant> {
        let abandon = self.abandon_at.as_ref().map(|(at, _)| *at);
        match (self.renew_at, abandon) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(super) fn lock_lost(&self) -> bool {
        Instant::now() >= self.expires
    }

    /// Renews the lock, halfway to its end next time; if that fails the lock is left to run out.
    pub(super) async fn renew(
        &mut self,
        receiver: &mut ServiceBusReceiver,
        shared: &Shared,
        source: &Source,
    ) {
        let renewed = shared
            .bounded(
                "renewing a lock",
                receiver.renew_message_lock(&mut self.message),
            )
            .await;
        let remaining = self
            .message
            .locked_until()
            .map(|at| until(shared.clock.now(), to_utc(at)))
            .unwrap_or_default();
        match renewed {
            Ok(Ok(())) if !remaining.is_zero() => {
                let now = Instant::now();
                self.expires = now + remaining;
                self.renew_at = Some(now + remaining / 2);
                debug!(source = %source, ?remaining, "lock renewed");
            }
            outcome => {
                let error = match outcome {
                    Ok(Ok(())) => "the renewed lock had already run out".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                warn!(
                    source = %source,
                    message_id = ?self.message.message_id(),
                    error,
                    "could not renew a lock; the broker will deliver the message again when it runs out"
                );
                self.renew_at = None;
            }
        }
    }

    /// Settles the delivery on the receiver; settled after its lock ran out, it is an error.
    pub(super) async fn settle(
        self,
        settlement: Final,
        receiver: &mut ServiceBusReceiver,
        shared: &Shared,
        source: &Source,
    ) -> Result<(), Error> {
        let lost = self.lock_lost();
        let message = &self.message;
        let (what, result) = match settlement {
            Final::Complete => (
                "completing",
                shared
                    .bounded("completing a delivery", receiver.complete_message(message))
                    .await,
            ),
            Final::Abandon => (
                "abandoning",
                shared
                    .bounded(
                        "abandoning a delivery",
                        receiver.abandon_message(message, None),
                    )
                    .await,
            ),
            Final::DeadLetter(options) => (
                "dead-lettering",
                shared
                    .bounded(
                        "dead-lettering a delivery",
                        receiver.dead_letter_message(message, options),
                    )
                    .await,
            ),
        };
        match result {
            Ok(Ok(())) if lost => Err(lock_lost(source)),
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                Err(shared.client_error(e, &format!("{what} a delivery from `{source}`"), None))
            }
            Err(timeout) => Err(timeout),
        }
    }

    /// Abandons a dead letter whose retry is due, with its new framework state.
    pub(super) async fn abandon_held(
        self,
        receiver: &mut ServiceBusReceiver,
        shared: &Shared,
        source: &Source,
    ) {
        let properties = self.abandon_at.map(|(_, p)| p);
        let result = shared
            .bounded(
                "abandoning a dead letter",
                receiver.abandon_message(&self.message, properties),
            )
            .await;
        if !matches!(result, Ok(Ok(()))) {
            warn!(source = %source, "could not abandon a dead letter whose retry is due; its lock will run out");
        }
    }
}

pub(super) fn lock_lost(source: &Source) -> Error {
    Error::other(format!(
        "the lock of a delivery from `{source}` ran out before it was settled; the broker \
             delivers the message again"
    ))
}
