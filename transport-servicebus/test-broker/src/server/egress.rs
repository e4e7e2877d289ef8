//! Links on which clients receive from a store: messages transferred as credit allows, and the
//! client's outcome of each peek-lock delivery applied and confirmed.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::delivery::{DeliveryFut, Sendable};
use fe2o3_amqp::link::{SendError, Sender};
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol};
use serde_amqp::Value;
use tokio::time::Instant;

use crate::shared::Shared;
use crate::socket::{Applied, Tap};
use crate::state::{
    DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON, LockError, ReceiveMode, Settlement, now_ms,
};

/// How long a delivery link holds a picked message while it waits for link credit.
const CREDIT_WAIT: Duration = Duration::from_millis(200);

enum EgressEvent {
    Changed,
    Detached,
}

/// Delivers messages of a store to a client receiver.
///
/// The acceptor's sender does not expose link credit, so a picked message is held for at
/// most [`CREDIT_WAIT`] while the transfer waits for credit; then it is put back unchanged
/// (no delivery counted) and the link waits for a change or the same time before trying again,
/// which gives other receivers of the store their turn.
pub(super) async fn egress_link(
    mut sender: Sender,
    shared: Arc<Shared>,
    store: String,
    mode: ReceiveMode,
    tap: Arc<Tap>,
) {
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let picked = shared.state().pick(&store, mode, now_ms());
        let Some(picked) = picked else {
            let event = tokio::select! {
                () = &mut notified => EgressEvent::Changed,
                _ = sender.on_detach() => EgressEvent::Detached,
            };
            match event {
                EgressEvent::Changed => continue,
                EgressEvent::Detached => return,
            }
        };
        let sequence_number = picked.sequence_number;
        let token = picked.lock_token;
        // Puts the message back if this task ends (or is aborted) before the transfer.
        let mut in_flight = InFlight {
            shared: &shared,
            store: &store,
            sequence_number,
            armed: true,
        };
        let sendable = Sendable::builder().message(picked.message).build();
        match tokio::time::timeout(CREDIT_WAIT, sender.send_batchable(sendable)).await {
            Ok(Ok(outcome)) => {
                in_flight.armed = false;
                shared.update(|state| {
                    state.transferred(
                        &store,
                        sequence_number,
                        token,
                        mode,
                        Instant::now(),
                        now_ms(),
                    );
                });
                if mode == ReceiveMode::PeekLock {
                    tokio::spawn(settle_on_outcome(
                        shared.clone(),
                        tap.clone(),
                        token,
                        outcome,
                    ));
                }
            }
            Ok(Err(_)) => return,
            Err(_) => {
                drop(in_flight);
                let notified = shared.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let event = tokio::select! {
                    () = &mut notified => EgressEvent::Changed,
                    () = tokio::time::sleep(CREDIT_WAIT) => EgressEvent::Changed,
                    _ = sender.on_detach() => EgressEvent::Detached,
                };
                if let EgressEvent::Detached = event {
                    return;
                }
            }
        }
    }
}

/// A picked message that has not been transferred yet.
struct InFlight<'a> {
    shared: &'a Shared,
    store: &'a str,
    sequence_number: i64,
    armed: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared
                .update(|state| state.not_transferred(self.store, self.sequence_number));
        }
    }
}

/// Applies the client's disposition of a peek-lock delivery and confirms it to the client.
async fn settle_on_outcome(
    shared: Arc<Shared>,
    tap: Arc<Tap>,
    token: [u8; 16],
    outcome: DeliveryFut<Result<Outcome, SendError>>,
) {
    let settlement = match outcome.await {
        Ok(Outcome::Accepted(_)) => Settlement::Complete,
        Ok(Outcome::Released(_)) => Settlement::Release,
        Ok(Outcome::Modified(modified)) => {
            let properties = modified
                .message_annotations
                .map(|fields| properties_to_modify(fields, &[]))
                .unwrap_or_default();
            if modified.undeliverable_here == Some(true) {
                Settlement::Defer(properties)
            } else {
                Settlement::Abandon(properties)
            }
        }
        Ok(Outcome::Rejected(rejected)) => {
            let error = rejected.error;
            let info = |key: &str| -> Option<String> {
                let info = error.as_ref()?.info.as_ref()?;
                match info.get(&Symbol::from(key))? {
                    Value::String(s) => Some(s.clone()),
                    _ => None,
                }
            };
            let (reason, description) = (info(DEAD_LETTER_REASON), info(DEAD_LETTER_DESCRIPTION));
            let is_dead_letter = error.as_ref().is_some_and(|e| {
                matches!(&e.condition, fe2o3_amqp::types::definitions::ErrorCondition::Custom(c)
                    if c.as_str() == "com.microsoft:dead-letter")
            });
            if is_dead_letter {
                // Every other entry of the error's info is a property to modify.
                let skip = [DEAD_LETTER_REASON, DEAD_LETTER_DESCRIPTION];
                let properties = error
                    .and_then(|e| e.info)
                    .map(|info| properties_to_modify(*info, &skip))
                    .unwrap_or_default();
                Settlement::DeadLetter {
                    reason,
                    description,
                    properties,
                }
            } else {
                Settlement::DeadLetter {
                    reason: error.as_ref().map(|e| format!("{:?}", e.condition)),
                    description: error.as_ref().and_then(|e| e.description.clone()),
                    properties: Vec::new(),
                }
            }
        }
        // The link or session ended before a disposition: the lock runs out by itself.
        Err(_) => {
            tap.settled(token, Applied::Forget);
            return;
        }
    };
    let applied = match shared.update(|state| state.settle(token, settlement, Instant::now())) {
        Ok(()) => Applied::Yes,
        Err(LockError::Lost) => Applied::LockLost,
        Err(LockError::NotAllowed(description)) => Applied::NotAllowed(description),
    };
    tap.settled(token, applied);
}

/// The application properties a client asked to modify while settling (message annotations of
/// `modified`, info entries of a dead-letter `rejected`), leaving out `skip` and values that are
/// not simple.
fn properties_to_modify(
    fields: impl IntoIterator<Item = (Symbol, Value)>,
    skip: &[&str],
) -> Vec<(String, SimpleValue)> {
    fields
        .into_iter()
        .filter(|(key, _)| !skip.contains(&key.as_str()))
        .filter_map(|(key, value)| {
            SimpleValue::try_from(value)
                .ok()
                .map(|value| (key.0, value))
        })
        .collect()
}
