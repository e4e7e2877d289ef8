//! Receiving: picking a message for a transfer, locking or removing it once transferred,
//! deferred messages by sequence number, and peeking.

use fe2o3_amqp_types::messaging::{DeliveryAnnotations, Header, annotations::OwnedKey};
use fe2o3_amqp_types::primitives::{Symbol, Timestamp, Uuid};
use serde_amqp::Value;
use tokio::time::Instant;

use super::clock::{instant_of, ms_of};
use super::message::{
    ENQUEUED_TIME, LOCK_TOKEN, LOCKED_UNTIL, Msg, SEQUENCE_NUMBER, set_annotation,
};
use super::store::{MsgState, State, Stored};

/// How a receiver link settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReceiveMode {
    PeekLock,
    ReceiveAndDelete,
}

/// A message picked for a transfer.
#[derive(Debug)]
pub(crate) struct Picked {
    pub(crate) sequence_number: i64,
    pub(crate) lock_token: [u8; 16],
    pub(crate) message: Msg,
}

impl State {
    /// Picks the oldest available message of `store` for a transfer and marks it in flight.
    /// The caller must call [`State::transferred`] or [`State::not_transferred`] next.
    pub(crate) fn pick(
        &mut self,
        store_key: &str,
        mode: ReceiveMode,
        now_ms: i64,
    ) -> Option<Picked> {
        let store = self.stores.get_mut(store_key)?;
        let lock_duration = store.lock_duration;
        let (&sequence_number, stored) = store
            .messages
            .iter_mut()
            .find(|(_, m)| m.state == MsgState::Available)?;
        let token = *uuid::Uuid::new_v4().as_bytes();
        stored.state = MsgState::InFlight;
        let until_ms = now_ms.saturating_add(ms_of(lock_duration));
        stored.locked_until_ms = until_ms;

        let locked_until = (mode == ReceiveMode::PeekLock).then_some(until_ms);
        let message = delivery_copy(stored, sequence_number, Some(token), locked_until);
        Some(Picked {
            sequence_number,
            lock_token: token,
            message,
        })
    }

    /// Records that a picked message was written to the link: peek-lock locks it (and counts
    /// the delivery), receive-and-delete removes it.
    pub(crate) fn transferred(
        &mut self,
        store_key: &str,
        picked_sequence: i64,
        token: [u8; 16],
        mode: ReceiveMode,
        now: Instant,
        now_ms: i64,
    ) {
        let Some(store) = self.stores.get_mut(store_key) else {
            return;
        };
        match mode {
            ReceiveMode::ReceiveAndDelete => {
                store.messages.remove(&picked_sequence);
            }
            ReceiveMode::PeekLock => {
                if let Some(stored) = store.messages.get_mut(&picked_sequence) {
                    stored.delivery_count += 1;
                    // The lock ends when the delivery said it would.
                    let until = instant_of(stored.locked_until_ms, now, now_ms);
                    stored.state = MsgState::Locked { token, until };
                    self.locks
                        .insert(token, (store_key.to_owned(), picked_sequence));
                }
            }
        }
    }

    /// Returns a picked message that could not be transferred to the store, unchanged.
    pub(crate) fn not_transferred(&mut self, store_key: &str, picked_sequence: i64) {
        if let Some(stored) = self
            .stores
            .get_mut(store_key)
            .and_then(|s| s.messages.get_mut(&picked_sequence))
            && stored.state == MsgState::InFlight
        {
            stored.state = MsgState::Available;
        }
    }

    /// Picks the next message of `store_key` and records it as delivered in peek-lock mode at
    /// once, as a link would after writing it: for the state's tests and the fuzz targets.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn lock_next(
        &mut self,
        store_key: &str,
        now: Instant,
        now_ms: i64,
    ) -> Option<Picked> {
        let picked = self.pick(store_key, ReceiveMode::PeekLock, now_ms)?;
        self.transferred(
            store_key,
            picked.sequence_number,
            picked.lock_token,
            ReceiveMode::PeekLock,
            now,
            now_ms,
        );
        Some(picked)
    }

    /// Locks deferred messages by sequence number (management `receive-by-sequence-number`),
    /// counting a delivery each. Returns the lock tokens with the messages as delivered, or the
    /// first sequence number that is not a deferred message of the store.
    pub(crate) fn receive_deferred(
        &mut self,
        store_key: &str,
        numbers: &[i64],
        now: Instant,
        now_ms: i64,
    ) -> Result<Vec<([u8; 16], Msg)>, i64> {
        let store = self
            .stores
            .get(store_key)
            .ok_or(numbers.first().copied().unwrap_or(0))?;
        if let Some(missing) = numbers.iter().find(|n| {
            store
                .messages
                .get(n)
                .is_none_or(|m| m.state != MsgState::Deferred)
        }) {
            return Err(*missing);
        }
        let mut received = Vec::with_capacity(numbers.len());
        for &number in numbers {
            let token = *uuid::Uuid::new_v4().as_bytes();
            let Some(store) = self.stores.get_mut(store_key) else {
                break;
            };
            let lock_duration = store.lock_duration;
            let Some(stored) = store.messages.get_mut(&number) else {
                continue;
            };
            let until_ms = now_ms.saturating_add(ms_of(lock_duration));
            let message = delivery_copy(stored, number, Some(token), Some(until_ms));
            stored.delivery_count += 1;
            stored.locked_until_ms = until_ms;
            stored.state = MsgState::Locked {
                token,
                until: now + lock_duration,
            };
            self.locks.insert(token, (store_key.to_owned(), number));
            received.push((token, message));
        }
        Ok(received)
    }

    /// Up to `count` messages of a store from sequence number `from` on, in sequence-number
    /// order, without locking them (management `peek-message`). For a queue, its scheduled
    /// messages are included (as Service Bus does), under the sequence numbers that
    /// `schedule-message` returned.
    pub(crate) fn peek(&self, store_key: &str, from: i64, count: usize) -> Vec<Msg> {
        let Some(store) = self.stores.get(store_key) else {
            return Vec::new();
        };
        let stored = store
            .messages
            .range(from..)
            .take(count)
            .map(|(number, stored)| (*number, delivery_copy(stored, *number, None, None)));
        let scheduled = self
            .entities
            .get(store_key)
            .into_iter()
            .flat_map(|entity| entity.scheduled.range(from..).take(count))
            .map(|(number, scheduled)| {
                let mut message = scheduled.message.clone();
                set_annotation(&mut message, SEQUENCE_NUMBER, Value::Long(*number));
                (*number, message)
            });
        let mut messages: Vec<(i64, Msg)> = stored.chain(scheduled).collect();
        messages.sort_by_key(|(number, _)| *number);
        messages.truncate(count);
        messages.into_iter().map(|(_, message)| message).collect()
    }

    /// Whether `number` is a message of `entity` waiting for its scheduled enqueue time.
    pub(crate) fn is_scheduled(&self, entity: &str, number: i64) -> bool {
        self.entities
            .get(entity)
            .is_some_and(|e| e.scheduled.contains_key(&number))
    }
}

/// The message as transferred: header delivery count, lock token, sequence number, enqueued
/// time and (for locks) locked-until, with exactly the types `azservicebus` reads.
fn delivery_copy(
    stored: &Stored,
    sequence_number: i64,
    lock_token: Option<[u8; 16]>,
    locked_until_ms: Option<i64>,
) -> Msg {
    let mut message = stored.message.clone();
    message
        .header
        .get_or_insert_with(Header::default)
        .delivery_count = stored.delivery_count;
    message.delivery_annotations = lock_token.map(|token| {
        let mut annotations = DeliveryAnnotations::default();
        annotations.0.insert(
            OwnedKey::Symbol(Symbol::from(LOCK_TOKEN)),
            Value::Uuid(Uuid::from(token)),
        );
        annotations
    });
    if let Some(until_ms) = locked_until_ms {
        set_annotation(
            &mut message,
            LOCKED_UNTIL,
            Value::Timestamp(Timestamp::from_milliseconds(until_ms)),
        );
    }
    set_annotation(&mut message, SEQUENCE_NUMBER, Value::Long(sequence_number));
    set_annotation(
        &mut message,
        ENQUEUED_TIME,
        Value::Timestamp(Timestamp::from_milliseconds(stored.enqueued_ms)),
    );
    message
}
