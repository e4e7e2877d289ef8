//! Sending: size limits and refusals, duplicate detection, scheduling, and routing a message
//! into a queue or through a topic's subscriptions.

use std::time::Duration;

use tokio::time::Instant;

use super::clock::instant_of;
use super::message::{
    Msg, assign_message_id, encoded_header_size, encoded_size, scheduled_enqueue_ms, subject,
};
use super::store::{EntityKind, MsgState, Scheduled, State, Stored};

/// Forwarding chains longer than this are cut (Service Bus allows 4 hops).
const MAX_FORWARD_HOPS: usize = 4;

/// Why a send was refused.
#[derive(Debug, Clone)]
pub(crate) enum Refusal {
    NotFound(String),
    TooLarge {
        size: usize,
        max: usize,
    },
    /// The header sections are larger than the entity accepts.
    HeadersTooLarge {
        size: usize,
        max: usize,
    },
    Rejected(String),
}

impl State {
    fn take_sequence_number(&mut self) -> i64 {
        self.next_sequence_number += 1;
        self.next_sequence_number
    }

    /// Enqueues messages sent to `entity`, all or none. Messages with a scheduled enqueue time
    /// in the future are held until then. Returns the sequence numbers.
    pub(crate) fn send(
        &mut self,
        entity: &str,
        messages: Vec<Msg>,
        now: Instant,
        now_ms: i64,
    ) -> Result<Vec<i64>, Refusal> {
        let target = self
            .entities
            .get(entity)
            .ok_or_else(|| Refusal::NotFound(entity.to_owned()))?;
        if let Some(reason) = &target.reject_sends {
            return Err(Refusal::Rejected(reason.clone()));
        }
        for message in &messages {
            if let Some(max) = target.max_message_size {
                let size = encoded_size(message);
                if size > max {
                    return Err(Refusal::TooLarge { size, max });
                }
            }
            if let Some(max) = target.max_header_size {
                let size = encoded_header_size(message);
                if size > max {
                    return Err(Refusal::HeadersTooLarge { size, max });
                }
            }
        }
        let mut numbers = Vec::with_capacity(messages.len());
        for mut message in messages {
            // Delivery annotations belong to one transfer, not to the message.
            message.delivery_annotations = None;
            assign_message_id(&mut message);
            let sequence_number = self.take_sequence_number();
            numbers.push(sequence_number);
            if self
                .entities
                .get_mut(entity)
                .is_some_and(|target| target.is_duplicate(&message, now))
            {
                continue;
            }
            match scheduled_enqueue_ms(&message) {
                Some(at_ms) if at_ms > now_ms => {
                    let at = instant_of(at_ms, now, now_ms);
                    if let Some(target) = self.entities.get_mut(entity) {
                        target
                            .scheduled
                            .insert(sequence_number, Scheduled { message, at });
                    }
                }
                _ => self.route(entity, message, Some(sequence_number), (now, now_ms), 0),
            }
        }
        Ok(numbers)
    }

    /// Schedules messages (management `schedule-message`): each is held until its
    /// `x-opt-scheduled-enqueue-time`; messages without one are enqueued now.
    pub(crate) fn schedule(
        &mut self,
        entity: &str,
        messages: Vec<Msg>,
        now: Instant,
        now_ms: i64,
    ) -> Result<Vec<i64>, Refusal> {
        self.send(entity, messages, now, now_ms)
    }

    /// Cancels scheduled messages by sequence number; unknown numbers are ignored.
    pub(crate) fn cancel_scheduled(
        &mut self,
        entity: &str,
        numbers: &[i64],
    ) -> Result<(), Refusal> {
        let target = self
            .entities
            .get_mut(entity)
            .ok_or_else(|| Refusal::NotFound(entity.to_owned()))?;
        for number in numbers {
            target.scheduled.remove(number);
        }
        Ok(())
    }

    /// Puts a message into `entity` now: a queue stores it, a topic copies it to every
    /// subscription whose filter matches (following forwarding).
    pub(super) fn route(
        &mut self,
        entity: &str,
        message: Msg,
        sequence_number: Option<i64>,
        (now, now_ms): (Instant, i64),
        hops: usize,
    ) {
        let subscriptions = match self.entities.get(entity).map(|e| &e.kind) {
            Some(EntityKind::Queue) => {
                let sequence_number =
                    sequence_number.unwrap_or_else(|| self.take_sequence_number());
                self.store_message(entity, message, sequence_number, (now, now_ms));
                return;
            }
            Some(EntityKind::Topic { subscriptions }) => subscriptions.clone(),
            None => return,
        };
        for (name, subscription) in subscriptions {
            if let Some(filter) = &subscription.subject_filter
                && subject(&message) != Some(filter.as_str())
            {
                continue;
            }
            match &subscription.forward_to {
                Some(queue) if hops < MAX_FORWARD_HOPS => {
                    self.route(queue, message.clone(), None, (now, now_ms), hops + 1);
                }
                Some(_) => {}
                None => {
                    let sequence_number = self.take_sequence_number();
                    let key = format!("{entity}/subscriptions/{name}");
                    self.store_message(&key, message.clone(), sequence_number, (now, now_ms));
                }
            }
        }
    }

    fn store_message(
        &mut self,
        key: &str,
        message: Msg,
        sequence_number: i64,
        (now, now_ms): (Instant, i64),
    ) {
        if let Some(store) = self.stores.get_mut(key) {
            // The shorter of the message's and the entity's time to live applies.
            let message_ttl = message
                .header
                .as_ref()
                .and_then(|h| h.ttl)
                .map(|ms| Duration::from_millis(u64::from(ms)));
            let ttl = match (message_ttl, store.default_time_to_live) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            store.messages.insert(
                sequence_number,
                Stored {
                    message,
                    enqueued_ms: now_ms,
                    delivery_count: 0,
                    state: MsgState::Available,
                    locked_until_ms: 0,
                    deferred: false,
                    expires_at: ttl.map(|ttl| now + ttl),
                },
            );
        }
    }
}
