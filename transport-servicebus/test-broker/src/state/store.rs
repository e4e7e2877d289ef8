//! The broker's data: entities (queues and topics), message stores (queues, subscriptions,
//! dead-letter sub-queues) and the messages in them, with their delivery state.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use super::message::{Msg, message_id_key};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MsgState {
    Available,
    /// Picked for a transfer that has not been written yet.
    InFlight,
    Locked {
        token: [u8; 16],
        until: Instant,
    },
    Deferred,
}

#[derive(Debug, Clone)]
pub(super) struct Stored {
    pub(super) message: Msg,
    pub(super) enqueued_ms: i64,
    /// Number of completed transfers of this message.
    pub(super) delivery_count: u32,
    pub(super) state: MsgState,
    pub(super) locked_until_ms: i64,
    /// Received through `receive-by-sequence-number`: returns to deferred, not available.
    pub(super) deferred: bool,
    /// When the message's time to live ends.
    pub(super) expires_at: Option<Instant>,
}

impl Stored {
    /// The state a message returns to when its lock ends without completion.
    pub(super) fn unlocked_state(&self) -> MsgState {
        if self.deferred {
            MsgState::Deferred
        } else {
            MsgState::Available
        }
    }
}

/// A receivable message store: a queue, a subscription or a dead-letter sub-queue.
#[derive(Debug)]
pub(super) struct Store {
    pub(super) lock_duration: Duration,
    pub(super) default_time_to_live: Option<Duration>,
    pub(super) dead_letter_on_expiration: bool,
    /// `None` for dead-letter sub-queues, which never dead-letter.
    pub(super) max_delivery_count: Option<u32>,
    pub(super) dead_letter: Option<String>,
    pub(super) messages: BTreeMap<i64, Stored>,
}

impl Store {
    pub(super) fn new(
        lock_duration: Duration,
        max_delivery_count: Option<u32>,
        dlq: Option<String>,
    ) -> Self {
        Self {
            lock_duration,
            default_time_to_live: None,
            dead_letter_on_expiration: false,
            max_delivery_count,
            dead_letter: dlq,
            messages: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Subscription {
    pub(super) subject_filter: Option<String>,
    pub(super) forward_to: Option<String>,
}

#[derive(Debug)]
pub(super) enum EntityKind {
    Queue,
    Topic {
        subscriptions: BTreeMap<String, Subscription>,
    },
}

#[derive(Debug)]
pub(super) struct Scheduled {
    pub(super) message: Msg,
    pub(super) at: Instant,
}

/// A sendable entity: a queue or a topic.
#[derive(Debug)]
pub(super) struct Entity {
    pub(super) kind: EntityKind,
    pub(super) max_message_size: Option<usize>,
    pub(super) max_header_size: Option<usize>,
    pub(super) reject_sends: Option<String>,
    pub(super) scheduled: BTreeMap<i64, Scheduled>,
    pub(super) duplicate_detection_window: Option<Duration>,
    /// Message ids sent recently, with the instant they were first seen.
    pub(super) seen_message_ids: HashMap<String, Instant>,
}

impl Entity {
    pub(super) fn new(
        kind: EntityKind,
        (max_message_size, max_header_size): (Option<usize>, Option<usize>),
        window: Option<Duration>,
    ) -> Self {
        Self {
            kind,
            max_message_size,
            max_header_size,
            reject_sends: None,
            scheduled: BTreeMap::new(),
            duplicate_detection_window: window,
            seen_message_ids: HashMap::new(),
        }
    }

    /// Records the message id and says whether it is a duplicate inside the window.
    pub(super) fn is_duplicate(&mut self, message: &Msg, now: Instant) -> bool {
        let Some(window) = self.duplicate_detection_window else {
            return false;
        };
        let Some(id) = message_id_key(message) else {
            return false;
        };
        self.seen_message_ids
            .retain(|_, first_seen| now.saturating_duration_since(*first_seen) < window);
        match self.seen_message_ids.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => true,
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(now);
                false
            }
        }
    }
}

/// The whole broker state.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(super) next_sequence_number: i64,
    pub(super) entities: HashMap<String, Entity>,
    pub(super) stores: HashMap<String, Store>,
    pub(super) locks: HashMap<[u8; 16], (String, i64)>,
}

impl State {
    /// Whether clients may send to `key` (a queue or a topic).
    pub(crate) fn is_sendable(&self, key: &str) -> bool {
        self.entities.contains_key(key)
    }

    /// Whether clients may receive from `key` (a queue, subscription or dead-letter queue).
    pub(crate) fn is_receivable(&self, key: &str) -> bool {
        self.stores.contains_key(key)
    }
}
