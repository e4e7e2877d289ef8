//! What falls due with time: lock expiry (counted towards the maximum delivery count), the end
//! of a message's time to live, and scheduled messages reaching their enqueue time.

use tokio::time::Instant;

use super::locks::MAX_DELIVERY_COUNT_EXCEEDED;
use super::store::{MsgState, State};

/// The dead-letter reason of a message whose time to live ended.
const TTL_EXPIRED: &str = "TTLExpiredException";

impl State {
    /// Expires locks and releases scheduled messages that are due. Returns whether anything
    /// changed.
    pub(crate) fn process_due(&mut self, now: Instant, now_ms: i64) -> bool {
        let mut changed = false;
        let mut expired = Vec::new();
        for (key, store) in &self.stores {
            for (sequence_number, stored) in &store.messages {
                if let MsgState::Locked { token, until } = stored.state
                    && until <= now
                {
                    expired.push((key.clone(), *sequence_number, token));
                }
            }
        }
        for (key, sequence_number, token) in expired {
            changed = true;
            self.locks.remove(&token);
            let Some(store) = self.stores.get_mut(&key) else {
                continue;
            };
            let max = store.max_delivery_count;
            let Some(stored) = store.messages.get_mut(&sequence_number) else {
                continue;
            };
            if max.is_some_and(|max| stored.delivery_count >= max) {
                let description = format!(
                    "Message could not be consumed after {} delivery attempts.",
                    stored.delivery_count
                );
                self.dead_letter(
                    &key,
                    sequence_number,
                    Some(MAX_DELIVERY_COUNT_EXCEEDED.to_owned()),
                    Some(description),
                );
            } else {
                stored.state = stored.unlocked_state();
            }
        }

        let mut ended = Vec::new();
        for (key, store) in &self.stores {
            for (sequence_number, stored) in &store.messages {
                let waiting = matches!(stored.state, MsgState::Available | MsgState::Deferred);
                if waiting && stored.expires_at.is_some_and(|at| at <= now) {
                    ended.push((
                        key.clone(),
                        *sequence_number,
                        store.dead_letter_on_expiration,
                    ));
                }
            }
        }
        for (key, sequence_number, dead_letter) in ended {
            changed = true;
            if dead_letter {
                self.dead_letter(
                    &key,
                    sequence_number,
                    Some(TTL_EXPIRED.to_owned()),
                    Some("The message expired and was dead lettered.".to_owned()),
                );
            } else if let Some(store) = self.stores.get_mut(&key) {
                store.messages.remove(&sequence_number);
            }
        }

        let mut due = Vec::new();
        for (key, entity) in &mut self.entities {
            let numbers: Vec<i64> = entity
                .scheduled
                .iter()
                .filter(|(_, s)| s.at <= now)
                .map(|(n, _)| *n)
                .collect();
            for number in numbers {
                if let Some(scheduled) = entity.scheduled.remove(&number) {
                    due.push((key.clone(), number, scheduled.message));
                }
            }
        }
        // Service Bus gives a scheduled message a new sequence number when it is enqueued.
        for (key, _scheduled_number, message) in due {
            changed = true;
            self.route(&key, message, None, (now, now_ms), 0);
        }
        changed
    }

    /// The earliest instant at which [`State::process_due`] has work.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let locks = self.stores.values().flat_map(|s| {
            s.messages.values().filter_map(|m| match m.state {
                MsgState::Locked { until, .. } => Some(until),
                MsgState::Available | MsgState::Deferred => m.expires_at,
                MsgState::InFlight => None,
            })
        });
        let schedules = self
            .entities
            .values()
            .flat_map(|e| e.scheduled.values().map(|s| s.at));
        locks.chain(schedules).min()
    }
}
