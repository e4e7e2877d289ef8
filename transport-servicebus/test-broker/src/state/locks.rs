//! Locked messages: what a client's settlement does to them (complete, abandon, defer,
//! dead-letter, release), renewing a lock, and dead-lettering into the sub-queue.

use fe2o3_amqp_types::messaging::ApplicationProperties;
use fe2o3_amqp_types::primitives::SimpleValue;
use tokio::time::Instant;

use super::clock::ms_of;
use super::message::{DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON};
use super::store::{MsgState, State, Stored};

/// What a client did with a locked message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settlement {
    Complete,
    /// Abandon, updating application properties of the message.
    Abandon(Vec<(String, SimpleValue)>),
    /// Defer, updating application properties of the message.
    Defer(Vec<(String, SimpleValue)>),
    /// Dead-letter with reason and description, updating application properties of the
    /// message (Service Bus applies "properties to modify" on dead-letter as on abandon).
    DeadLetter {
        reason: Option<String>,
        description: Option<String>,
        properties: Vec<(String, SimpleValue)>,
    },
    /// AMQP `released`: the message was not processed; it does not count as a delivery.
    Release,
}

/// The dead-letter reason of a message whose delivery count reached the entity's maximum.
pub(super) const MAX_DELIVERY_COUNT_EXCEEDED: &str = "MaxDeliveryCountExceeded";

/// Why a lock-token operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockError {
    /// The lock expired, was settled, or never existed.
    Lost,
    /// The settlement is not allowed for this message (the lock is kept).
    NotAllowed(&'static str),
}

/// Why dead-lettering a message of a dead-letter sub-queue fails.
pub(crate) const DEAD_LETTER_OF_DEAD_LETTER: &str =
    "A message in a dead-letter queue cannot be dead-lettered.";

impl State {
    fn locked(&mut self, token: [u8; 16], now: Instant) -> Result<(String, i64), LockError> {
        let (store_key, sequence_number) =
            self.locks.get(&token).cloned().ok_or(LockError::Lost)?;
        let stored = self
            .stores
            .get(&store_key)
            .and_then(|s| s.messages.get(&sequence_number))
            .ok_or(LockError::Lost)?;
        match stored.state {
            MsgState::Locked { token: t, until } if t == token && until > now => {
                Ok((store_key, sequence_number))
            }
            _ => Err(LockError::Lost),
        }
    }

    /// Applies a client's settlement to the message locked by `token`.
    pub(crate) fn settle(
        &mut self,
        token: [u8; 16],
        settlement: Settlement,
        now: Instant,
    ) -> Result<(), LockError> {
        let (store_key, sequence_number) = self.locked(token, now)?;
        let Some(store) = self.stores.get_mut(&store_key) else {
            return Err(LockError::Lost);
        };
        if store.dead_letter.is_none() && matches!(settlement, Settlement::DeadLetter { .. }) {
            return Err(LockError::NotAllowed(DEAD_LETTER_OF_DEAD_LETTER));
        }
        self.locks.remove(&token);
        let max_delivery_count = store.max_delivery_count;
        let Some(stored) = store.messages.get_mut(&sequence_number) else {
            return Err(LockError::Lost);
        };
        match settlement {
            Settlement::Complete => {
                store.messages.remove(&sequence_number);
            }
            Settlement::Release => {
                stored.delivery_count = stored.delivery_count.saturating_sub(1);
                stored.state = stored.unlocked_state();
            }
            Settlement::Defer(properties) => {
                apply_properties(stored, properties);
                stored.deferred = true;
                stored.state = MsgState::Deferred;
            }
            Settlement::Abandon(properties) => {
                apply_properties(stored, properties);
                let exhausted = max_delivery_count.is_some_and(|max| stored.delivery_count >= max);
                if exhausted {
                    let description = format!(
                        "Message could not be consumed after {} delivery attempts.",
                        stored.delivery_count
                    );
                    self.dead_letter(
                        &store_key,
                        sequence_number,
                        Some(MAX_DELIVERY_COUNT_EXCEEDED.to_owned()),
                        Some(description),
                    );
                } else {
                    stored.state = stored.unlocked_state();
                }
            }
            Settlement::DeadLetter {
                reason,
                description,
                properties,
            } => {
                apply_properties(stored, properties);
                self.dead_letter(&store_key, sequence_number, reason, description)
            }
        }
        Ok(())
    }

    /// Extends the lock of `token` by the store's lock duration; returns the new
    /// locked-until time in milliseconds since the epoch.
    pub(crate) fn renew_lock(
        &mut self,
        token: [u8; 16],
        now: Instant,
        now_ms: i64,
    ) -> Result<i64, LockError> {
        let (store_key, sequence_number) = self.locked(token, now)?;
        let store = self.stores.get_mut(&store_key).ok_or(LockError::Lost)?;
        let lock_duration = store.lock_duration;
        let stored = store
            .messages
            .get_mut(&sequence_number)
            .ok_or(LockError::Lost)?;
        let until_ms = now_ms.saturating_add(ms_of(lock_duration));
        stored.locked_until_ms = until_ms;
        stored.state = MsgState::Locked {
            token,
            until: now + lock_duration,
        };
        Ok(until_ms)
    }

    /// Moves a message into its store's dead-letter sub-queue with reason and description as
    /// application properties. In a dead-letter queue itself the message stays (available).
    pub(super) fn dead_letter(
        &mut self,
        store_key: &str,
        sequence_number: i64,
        reason: Option<String>,
        description: Option<String>,
    ) {
        let Some(store) = self.stores.get_mut(store_key) else {
            return;
        };
        let Some(dlq) = store.dead_letter.clone() else {
            if let Some(stored) = store.messages.get_mut(&sequence_number) {
                stored.state = MsgState::Available;
            }
            return;
        };
        let Some(mut stored) = store.messages.remove(&sequence_number) else {
            return;
        };
        let properties = stored
            .message
            .application_properties
            .get_or_insert_with(ApplicationProperties::default);
        if let Some(reason) = reason {
            properties
                .0
                .insert(DEAD_LETTER_REASON.to_owned(), SimpleValue::String(reason));
        }
        if let Some(description) = description {
            properties.0.insert(
                DEAD_LETTER_DESCRIPTION.to_owned(),
                SimpleValue::String(description),
            );
        }
        stored.state = MsgState::Available;
        stored.deferred = false;
        stored.expires_at = None;
        if let Some(dead_letters) = self.stores.get_mut(&dlq) {
            dead_letters.messages.insert(sequence_number, stored);
        }
    }
}

/// Sets application properties of a stored message (Service Bus "properties to modify").
fn apply_properties(stored: &mut Stored, properties: Vec<(String, SimpleValue)>) {
    if properties.is_empty() {
        return;
    }
    let application_properties = stored
        .message
        .application_properties
        .get_or_insert_with(ApplicationProperties::default);
    for (key, value) in properties {
        application_properties.0.insert(key, value);
    }
}
