//! The settler of a Service Bus delivery: it carries out core's settlement steps by asking the
//! delivery's consumer (which owns the receiver) or by sending a copy, and gives the delivery
//! back if dropped unsettled.

use std::sync::Arc;

use async_trait::async_trait;
use azservicebus::receiver::DeadLetterOptions;
use redeliver_core::clock::until;
use redeliver_core::{Clock, Error, Message, Settle, Source, Stored};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::commands::{Action, Command, Final};
use crate::convert::outgoing::framework_properties;
use crate::shared::Shared;

/// Settles one delivery through its consumer. Dropped unsettled (or with its settlement
/// abandoned half-way), it asks the consumer to abandon the delivery.
pub(super) struct Settler {
    id: u64,
    commands: Option<mpsc::UnboundedSender<Command>>,
    shared: Arc<Shared>,
    source: Source,
    /// The native id of the copy a retry or park of this delivery sends.
    copy_id: String,
}

impl Settler {
    /// The settler of the delivery the consumer holds as `id`.
    pub(super) fn new(
        id: u64,
        commands: mpsc::UnboundedSender<Command>,
        shared: Arc<Shared>,
        source: Source,
        copy_id: String,
    ) -> Self {
        Settler {
            id,
            commands: Some(commands),
            shared,
            source,
            copy_id,
        }
    }

    /// Asks the consumer to carry out `action`; the delivery is settled by it, whatever the
    /// answer (a second command is refused).
    async fn command(&mut self, action: Action) -> Result<(), Error> {
        let commands = self.commands.take().ok_or(Error::Closed)?;
        let (reply, answer) = oneshot::channel();
        commands
            .send(Command::Settle {
                id: self.id,
                action,
                reply,
            })
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }
}

impl Drop for Settler {
    fn drop(&mut self) {
        if let Some(commands) = self.commands.take() {
            let _ = commands.send(Command::Dropped { id: self.id });
        }
    }
}

#[async_trait]
impl Settle for Settler {
    async fn remove(&mut self) -> Result<(), Error> {
        self.command(Action::Now(Final::Complete)).await
    }

    async fn give_back(&mut self) -> Result<(), Error> {
        self.command(Action::Now(Final::Abandon)).await
    }

    async fn store_copy(&mut self, next: &Message) -> Result<Stored, Error> {
        if self.source.is_dead_letters() {
            // A dead-letter sub-queue cannot be sent to: keep this dead letter locked until
            // its not-before, then abandon it with its new state.
            let at = due_instant(next, &self.shared.clock);
            self.command(Action::AbandonAt(at, framework_properties(next)))
                .await?;
            return Ok(Stored::Moved);
        }
        let queue = self.source.endpoint_name();
        self.shared
            .send_entity(queue, "queue", next, Some(&self.copy_id))
            .await?;
        Ok(Stored::Copy)
    }

    async fn store_dead_letter(&mut self, dead: &Message) -> Result<Stored, Error> {
        if self.source.is_dead_letters() {
            return Err(Error::invalid_message(format!(
                "message {} is already a dead letter and cannot be dead-lettered again",
                dead.id(),
            )));
        }
        let info = dead.dead_letter();
        let options = DeadLetterOptions {
            dead_letter_reason: info.map(|i| i.reason.clone()),
            dead_letter_error_description: info.and_then(|i| i.description.clone()),
            properties_to_modify: Some(framework_properties(dead)),
        };
        self.command(Action::Now(Final::DeadLetter(options)))
            .await?;
        Ok(Stored::Moved)
    }
}

/// The local instant of `message`'s not-before (now if it has none).
fn due_instant(message: &Message, clock: &Clock) -> Instant {
    let wait = message
        .not_before()
        .map(|at| until(clock.now(), at))
        .unwrap_or_default();
    Instant::now() + wait
}
