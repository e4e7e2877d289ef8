//! The broker's state: entities, messages, locks and schedules, behind one mutex.
//!
//! Everything here is synchronous and takes the current time as an argument, so the rules
//! (delivery counting, lock expiry, dead-lettering) are decided in one place.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp_types::messaging::message::__private::Serializable;
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Body, DeliveryAnnotations, Header, Message, MessageAnnotations,
    annotations::OwnedKey,
};
use fe2o3_amqp_types::primitives::{SimpleValue, Symbol, Timestamp, Uuid};
use serde_amqp::Value;
use tokio::time::Instant;

use crate::address::{dead_letter_key, entity_key, subscription_key, valid_name};
use crate::dead_letter::DeadLetter;
use crate::error::Error;
use crate::options::{QueueOptions, SubscriptionOptions, TopicOptions};

/// A message as the broker stores and forwards it.
pub(crate) type Msg = Message<Body<Value>>;

pub(crate) const LOCK_TOKEN: &str = "x-opt-lock-token";
pub(crate) const LOCKED_UNTIL: &str = "x-opt-locked-until";
pub(crate) const SEQUENCE_NUMBER: &str = "x-opt-sequence-number";
pub(crate) const ENQUEUED_TIME: &str = "x-opt-enqueued-time";
pub(crate) const SCHEDULED_ENQUEUE_TIME: &str = "x-opt-scheduled-enqueue-time";
pub(crate) const DEAD_LETTER_REASON: &str = "DeadLetterReason";
pub(crate) const DEAD_LETTER_DESCRIPTION: &str = "DeadLetterErrorDescription";
pub(crate) const MAX_DELIVERY_COUNT_EXCEEDED: &str = "MaxDeliveryCountExceeded";
pub(crate) const TTL_EXPIRED: &str = "TTLExpiredException";

/// Forwarding chains longer than this are cut (Service Bus allows 4 hops).
const MAX_FORWARD_HOPS: usize = 4;

/// How a receiver link settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReceiveMode {
    PeekLock,
    ReceiveAndDelete,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MsgState {
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
struct Stored {
    message: Msg,
    enqueued_ms: i64,
    /// Number of completed transfers of this message.
    delivery_count: u32,
    state: MsgState,
    locked_until_ms: i64,
    /// Received through `receive-by-sequence-number`: returns to deferred, not available.
    deferred: bool,
    /// When the message's time to live ends.
    expires_at: Option<Instant>,
}

impl Stored {
    /// The state a message returns to when its lock ends without completion.
    fn unlocked_state(&self) -> MsgState {
        if self.deferred {
            MsgState::Deferred
        } else {
            MsgState::Available
        }
    }
}

/// A receivable message store: a queue, a subscription or a dead-letter sub-queue.
#[derive(Debug)]
struct Store {
    lock_duration: Duration,
    default_time_to_live: Option<Duration>,
    dead_letter_on_expiration: bool,
    /// `None` for dead-letter sub-queues, which never dead-letter.
    max_delivery_count: Option<u32>,
    dead_letter: Option<String>,
    messages: BTreeMap<i64, Stored>,
}

impl Store {
    fn new(lock_duration: Duration, max_delivery_count: Option<u32>, dlq: Option<String>) -> Self {
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
struct Subscription {
    subject_filter: Option<String>,
    forward_to: Option<String>,
}

#[derive(Debug)]
enum EntityKind {
    Queue,
    Topic {
        subscriptions: BTreeMap<String, Subscription>,
    },
}

#[derive(Debug)]
struct Scheduled {
    message: Msg,
    at: Instant,
}

/// A sendable entity: a queue or a topic.
#[derive(Debug)]
struct Entity {
    kind: EntityKind,
    max_message_size: Option<usize>,
    max_header_size: Option<usize>,
    reject_sends: Option<String>,
    scheduled: BTreeMap<i64, Scheduled>,
    duplicate_detection_window: Option<Duration>,
    /// Message ids sent recently, with the instant they were first seen.
    seen_message_ids: HashMap<String, Instant>,
}

impl Entity {
    fn new(
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
    fn is_duplicate(&mut self, message: &Msg, now: Instant) -> bool {
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

/// Gives a message without `message-id` one, as Service Bus does (a GUID without dashes):
/// some clients (the JavaScript SDK) cannot settle a message without it.
fn assign_message_id(message: &mut Msg) {
    let properties = message
        .properties
        .get_or_insert_with(fe2o3_amqp_types::messaging::Properties::default);
    if properties.message_id.is_none() {
        properties.message_id = Some(fe2o3_amqp_types::messaging::MessageId::String(
            uuid::Uuid::new_v4().simple().to_string(),
        ));
    }
}

fn message_id_key(message: &Msg) -> Option<String> {
    let id = message.properties.as_ref()?.message_id.as_ref()?;
    Some(match id {
        fe2o3_amqp_types::messaging::MessageId::String(s) => s.clone(),
        other => format!("{other:?}"),
    })
}

/// A message picked for a transfer.
#[derive(Debug)]
pub(crate) struct Picked {
    pub(crate) sequence_number: i64,
    pub(crate) lock_token: [u8; 16],
    pub(crate) message: Msg,
}

/// The whole broker state.
#[derive(Debug, Default)]
pub(crate) struct State {
    next_sequence_number: i64,
    entities: HashMap<String, Entity>,
    stores: HashMap<String, Store>,
    locks: HashMap<[u8; 16], (String, i64)>,
}

/// Milliseconds since the Unix epoch of the wall clock.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn ms_of(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The instant at which wall-clock time `at_ms` is reached.
pub(crate) fn instant_of(at_ms: i64, now: Instant, now_ms: i64) -> Instant {
    let delta = at_ms.saturating_sub(now_ms);
    if delta <= 0 {
        now
    } else {
        now + Duration::from_millis(u64::try_from(delta).unwrap_or(u64::MAX))
    }
}

fn annotation<'a>(message: &'a Msg, key: &str) -> Option<&'a Value> {
    message
        .message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key)))
}

/// The scheduled enqueue time of a message, in milliseconds since the epoch.
pub(crate) fn scheduled_enqueue_ms(message: &Msg) -> Option<i64> {
    match annotation(message, SCHEDULED_ENQUEUE_TIME)? {
        Value::Timestamp(ts) => Some(ts.milliseconds()),
        Value::Long(ms) => Some(*ms),
        _ => None,
    }
}

fn subject(message: &Msg) -> Option<&str> {
    message.properties.as_ref()?.subject.as_deref()
}

fn encoded_size(message: &Msg) -> usize {
    serde_amqp::to_vec(&Serializable(message)).map_or(usize::MAX, |bytes| bytes.len())
}

/// The encoded size of the sections Service Bus counts as headers: header, message
/// annotations, properties and application properties.
fn encoded_header_size(message: &Msg) -> usize {
    fn size<T: serde_amqp::serde::Serialize>(section: Option<&T>) -> usize {
        section.map_or(0, |s| serde_amqp::serialized_size(s).unwrap_or(usize::MAX))
    }
    size(message.header.as_ref())
        .saturating_add(size(message.message_annotations.as_ref()))
        .saturating_add(size(message.properties.as_ref()))
        .saturating_add(size(message.application_properties.as_ref()))
}

fn set_annotation(message: &mut Msg, key: &str, value: Value) {
    message
        .message_annotations
        .get_or_insert_with(MessageAnnotations::default)
        .0
        .insert(OwnedKey::Symbol(Symbol::from(key)), value);
}

fn string_property(message: &Msg, key: &str) -> Option<String> {
    match message.application_properties.as_ref()?.0.get(key)? {
        SimpleValue::String(s) => Some(s.clone()),
        _ => None,
    }
}

impl State {
    fn take_sequence_number(&mut self) -> i64 {
        self.next_sequence_number += 1;
        self.next_sequence_number
    }

    // ----- provisioning -------------------------------------------------------------------

    fn check_new_name(&self, name: &str, what: &str) -> Result<String, Error> {
        if !valid_name(name) {
            return Err(Error::InvalidConfiguration(format!(
                "{what} name `{name}` must be non-empty and contain no `/`, `$` or whitespace"
            )));
        }
        let key = entity_key(name);
        if self.entities.contains_key(&key) {
            return Err(Error::EntityExists(name.to_owned()));
        }
        Ok(key)
    }

    fn check_max_delivery_count(count: u32) -> Result<(), Error> {
        if count == 0 {
            return Err(Error::InvalidConfiguration(
                "max_delivery_count must be at least 1".to_owned(),
            ));
        }
        Ok(())
    }

    fn check_lock_duration(duration: Duration) -> Result<(), Error> {
        if duration.is_zero() {
            return Err(Error::InvalidConfiguration(
                "lock_duration must be greater than zero".to_owned(),
            ));
        }
        Ok(())
    }

    pub(crate) fn create_queue(&mut self, name: &str, options: &QueueOptions) -> Result<(), Error> {
        let key = self.check_new_name(name, "queue")?;
        Self::check_max_delivery_count(options.max_delivery_count)?;
        Self::check_lock_duration(options.lock_duration)?;
        let dlq = dead_letter_key(&key);
        let mut store = Store::new(
            options.lock_duration,
            Some(options.max_delivery_count),
            Some(dlq.clone()),
        );
        store.default_time_to_live = options.default_message_time_to_live;
        store.dead_letter_on_expiration = options.dead_lettering_on_message_expiration;
        self.stores.insert(key.clone(), store);
        self.stores
            .insert(dlq, Store::new(options.lock_duration, None, None));
        self.entities.insert(
            key,
            Entity::new(
                EntityKind::Queue,
                (options.max_message_size, options.max_header_size),
                options.duplicate_detection_window,
            ),
        );
        Ok(())
    }

    pub(crate) fn create_topic(&mut self, name: &str, options: &TopicOptions) -> Result<(), Error> {
        let key = self.check_new_name(name, "topic")?;
        self.entities.insert(
            key,
            Entity::new(
                EntityKind::Topic {
                    subscriptions: BTreeMap::new(),
                },
                (options.max_message_size, options.max_header_size),
                options.duplicate_detection_window,
            ),
        );
        Ok(())
    }

    pub(crate) fn create_subscription(
        &mut self,
        topic: &str,
        name: &str,
        options: &SubscriptionOptions,
    ) -> Result<(), Error> {
        if !valid_name(name) {
            return Err(Error::InvalidConfiguration(format!(
                "subscription name `{name}` must be non-empty and contain no `/`, `$` or whitespace"
            )));
        }
        Self::check_max_delivery_count(options.max_delivery_count)?;
        Self::check_lock_duration(options.lock_duration)?;
        let forward_to = match &options.forward_to {
            Some(queue) => {
                let queue_key = entity_key(queue);
                match self.entities.get(&queue_key).map(|e| &e.kind) {
                    Some(EntityKind::Queue) => Some(queue_key),
                    _ => {
                        return Err(Error::InvalidConfiguration(format!(
                            "forward_to: queue `{queue}` does not exist"
                        )));
                    }
                }
            }
            None => None,
        };
        let topic_key = entity_key(topic);
        let sub_name = entity_key(name);
        let store_key = subscription_key(topic, name);
        let Some(Entity {
            kind: EntityKind::Topic { subscriptions },
            ..
        }) = self.entities.get_mut(&topic_key)
        else {
            return Err(Error::EntityNotFound(topic.to_owned()));
        };
        if subscriptions.contains_key(&sub_name) {
            return Err(Error::EntityExists(format!("{topic}/Subscriptions/{name}")));
        }
        subscriptions.insert(
            sub_name,
            Subscription {
                subject_filter: options.subject_filter.clone(),
                forward_to,
            },
        );
        let dlq = dead_letter_key(&store_key);
        let mut store = Store::new(
            options.lock_duration,
            Some(options.max_delivery_count),
            Some(dlq.clone()),
        );
        store.default_time_to_live = options.default_message_time_to_live;
        store.dead_letter_on_expiration = options.dead_lettering_on_message_expiration;
        self.stores.insert(store_key, store);
        self.stores
            .insert(dlq, Store::new(options.lock_duration, None, None));
        Ok(())
    }

    pub(crate) fn set_reject_sends(
        &mut self,
        entity: &str,
        reason: Option<String>,
    ) -> Result<(), Error> {
        let entity_state = self
            .entities
            .get_mut(&entity_key(entity))
            .ok_or_else(|| Error::EntityNotFound(entity.to_owned()))?;
        entity_state.reject_sends = reason;
        Ok(())
    }

    // ----- lookups --------------------------------------------------------------------------

    /// Whether clients may send to `key` (a queue or a topic).
    pub(crate) fn is_sendable(&self, key: &str) -> bool {
        self.entities.contains_key(key)
    }

    /// Whether clients may receive from `key` (a queue, subscription or dead-letter queue).
    pub(crate) fn is_receivable(&self, key: &str) -> bool {
        self.stores.contains_key(key)
    }

    // ----- sending --------------------------------------------------------------------------

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
    fn route(
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

    // ----- receiving ------------------------------------------------------------------------

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

    /// Up to `count` messages of a store from sequence number `from` on, without locking them
    /// (management `peek-message`).
    /// Messages of a store from sequence number `from` on, in sequence-number order, without
    /// locking them. For a queue, its scheduled messages are included (as Service Bus does),
    /// under the sequence numbers that `schedule-message` returned.
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
    fn dead_letter(
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

    // ----- time -----------------------------------------------------------------------------

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

    // ----- inspection -----------------------------------------------------------------------

    fn store(&self, path: &str) -> Result<&Store, Error> {
        self.stores
            .get(&entity_key(path))
            .ok_or_else(|| Error::EntityNotFound(path.to_owned()))
    }

    pub(crate) fn active_count(&self, path: &str) -> Result<usize, Error> {
        Ok(self
            .store(path)?
            .messages
            .values()
            .filter(|m| m.state != MsgState::Deferred)
            .count())
    }

    pub(crate) fn deferred_count(&self, path: &str) -> Result<usize, Error> {
        Ok(self
            .store(path)?
            .messages
            .values()
            .filter(|m| m.state == MsgState::Deferred)
            .count())
    }

    pub(crate) fn scheduled_count(&self, entity: &str) -> Result<usize, Error> {
        self.entities
            .get(&entity_key(entity))
            .map(|e| e.scheduled.len())
            .ok_or_else(|| Error::EntityNotFound(entity.to_owned()))
    }

    pub(crate) fn dead_letters(&self, path: &str) -> Result<Vec<DeadLetter>, Error> {
        let key = dead_letter_key(&entity_key(path));
        let store = self
            .stores
            .get(&key)
            .ok_or_else(|| Error::EntityNotFound(path.to_owned()))?;
        Ok(store
            .messages
            .iter()
            .map(|(sequence_number, stored)| DeadLetter {
                sequence_number: *sequence_number,
                message_id: message_id_key(&stored.message),
                subject: subject(&stored.message).map(str::to_owned),
                body: body_bytes(&stored.message),
                reason: string_property(&stored.message, DEAD_LETTER_REASON),
                description: string_property(&stored.message, DEAD_LETTER_DESCRIPTION),
                delivery_count: stored.delivery_count,
            })
            .collect())
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

/// The concatenated data sections of a message body (empty for other body kinds).
fn body_bytes(message: &Msg) -> Vec<u8> {
    match &message.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp_types::messaging::Data;
    use fe2o3_amqp_types::primitives::Binary;

    use super::*;
    use crate::options::{STANDARD_MAX_HEADER_SIZE, STANDARD_MAX_MESSAGE_SIZE};

    const LOCK: Duration = Duration::from_secs(5);

    fn state_with_queue(max_delivery_count: u32) -> State {
        let mut state = State::default();
        state
            .create_queue(
                "q",
                &QueueOptions::default()
                    .with_lock_duration(LOCK)
                    .with_max_delivery_count(max_delivery_count),
            )
            .unwrap();
        state
    }

    fn data(body: &[u8]) -> Msg {
        Message::builder()
            .body(Body::Data(vec![Data(Binary::from(body.to_vec()))].into()))
            .build()
    }

    /// Picks and transfers the next message of `q`; returns its token and header delivery count.
    fn deliver(state: &mut State, now: Instant) -> ([u8; 16], u32) {
        let picked = state
            .pick("q", ReceiveMode::PeekLock, 0)
            .expect("a message");
        let header_count = picked.message.header.as_ref().unwrap().delivery_count;
        state.transferred(
            "q",
            picked.sequence_number,
            picked.lock_token,
            ReceiveMode::PeekLock,
            now,
            0,
        );
        (picked.lock_token, header_count)
    }

    #[test]
    fn a_pick_that_is_not_transferred_is_not_counted_as_a_delivery() {
        let mut state = state_with_queue(10);
        let now = Instant::now();
        state.send("q", vec![data(b"x")], now, 0).unwrap();
        let picked = state.pick("q", ReceiveMode::PeekLock, 0).unwrap();
        assert!(
            state.pick("q", ReceiveMode::PeekLock, 0).is_none(),
            "in flight"
        );
        state.not_transferred("q", picked.sequence_number);
        let (_, header_count) = deliver(&mut state, now);
        assert_eq!(header_count, 0, "first real delivery has header count 0");
    }

    #[test]
    fn lock_expiry_counts_and_dead_letters_at_the_maximum() {
        let mut state = state_with_queue(2);
        let start = Instant::now();
        state.send("q", vec![data(b"x")], start, 0).unwrap();
        let (_, first) = deliver(&mut state, start);
        assert_eq!(first, 0);
        assert_eq!(state.next_deadline(), Some(start + LOCK));
        assert!(!state.process_due(start + LOCK - Duration::from_millis(1), 0));
        assert!(state.process_due(start + LOCK, 0));
        let (_, second) = deliver(&mut state, start + LOCK);
        assert_eq!(second, 1);
        assert!(state.process_due(start + LOCK * 2, 0));
        assert_eq!(state.active_count("q").unwrap(), 0);
        let letters = state.dead_letters("q").unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(
            letters[0].reason.as_deref(),
            Some(MAX_DELIVERY_COUNT_EXCEEDED)
        );
        assert_eq!(letters[0].delivery_count, 2);
    }

    #[test]
    fn settling_with_an_expired_or_unknown_lock_fails_and_changes_nothing() {
        let mut state = state_with_queue(10);
        let start = Instant::now();
        state.send("q", vec![data(b"x")], start, 0).unwrap();
        let (token, _) = deliver(&mut state, start);
        assert_eq!(
            state.settle(token, Settlement::Complete, start + LOCK),
            Err(LockError::Lost)
        );
        assert_eq!(
            state.settle([0; 16], Settlement::Complete, start),
            Err(LockError::Lost)
        );
        assert_eq!(state.active_count("q").unwrap(), 1);
    }

    #[test]
    fn renewing_a_lock_moves_its_expiry() {
        let mut state = state_with_queue(10);
        let start = Instant::now();
        state.send("q", vec![data(b"x")], start, 0).unwrap();
        let (token, _) = deliver(&mut state, start);
        let later = start + Duration::from_secs(3);
        let until_ms = state.renew_lock(token, later, 3_000).unwrap();
        assert_eq!(until_ms, 3_000 + 5_000);
        assert!(
            !state.process_due(start + LOCK, 0),
            "old expiry no longer applies"
        );
        assert!(
            state
                .settle(token, Settlement::Complete, start + LOCK)
                .is_ok()
        );
        assert_eq!(state.active_count("q").unwrap(), 0);
    }

    #[test]
    fn refused_sends_enqueue_nothing() {
        let mut state = State::default();
        state
            .create_queue("q", &QueueOptions::default().with_max_message_size(64))
            .unwrap();
        let now = Instant::now();
        let result = state.send("q", vec![data(b"small"), data(&[0; 256])], now, 0);
        assert!(matches!(result, Err(Refusal::TooLarge { max: 64, .. })));
        assert_eq!(state.active_count("q").unwrap(), 0);
        assert!(matches!(
            state.send("nope", vec![data(b"x")], now, 0),
            Err(Refusal::NotFound(_))
        ));
    }

    #[test]
    fn the_standard_tier_limits_apply_by_default() {
        let mut state = State::default();
        state.create_queue("q", &QueueOptions::default()).unwrap();
        let now = Instant::now();
        let fits = data(&vec![0; STANDARD_MAX_MESSAGE_SIZE - 1024]);
        state.send("q", vec![fits], now, 0).unwrap();
        let too_large = data(&vec![0; STANDARD_MAX_MESSAGE_SIZE]);
        assert!(matches!(
            state.send("q", vec![too_large], now, 0),
            Err(Refusal::TooLarge {
                max: STANDARD_MAX_MESSAGE_SIZE,
                ..
            })
        ));

        // Header sections over 64 KiB are refused even when the whole message fits.
        let with_property = |bytes: usize| {
            let mut message = data(b"x");
            message.application_properties = Some(ApplicationProperties(
                [("reason".to_owned(), SimpleValue::String("r".repeat(bytes)))]
                    .into_iter()
                    .collect(),
            ));
            message
        };
        state
            .send("q", vec![with_property(60 * 1024)], now, 0)
            .unwrap();
        assert!(matches!(
            state.send("q", vec![with_property(STANDARD_MAX_HEADER_SIZE)], now, 0),
            Err(Refusal::HeadersTooLarge {
                max: STANDARD_MAX_HEADER_SIZE,
                ..
            })
        ));
        assert_eq!(state.active_count("q").unwrap(), 2);
    }

    fn with_id(id: &str) -> Msg {
        let mut message = data(b"x");
        message.properties = Some(fe2o3_amqp_types::messaging::Properties {
            message_id: Some(id.to_owned().into()),
            ..Default::default()
        });
        message
    }

    #[test]
    fn duplicate_detection_drops_repeated_ids_inside_the_window_only() {
        let mut state = State::default();
        state
            .create_queue(
                "q",
                &QueueOptions::default().with_duplicate_detection(Duration::from_secs(10)),
            )
            .unwrap();
        let start = Instant::now();
        state
            .send("q", vec![with_id("a"), with_id("a")], start, 0)
            .unwrap();
        state.send("q", vec![with_id("b")], start, 0).unwrap();
        assert_eq!(state.active_count("q").unwrap(), 2);
        let later = start + Duration::from_secs(10);
        state.send("q", vec![with_id("a")], later, 0).unwrap();
        assert_eq!(state.active_count("q").unwrap(), 3, "window has passed");
    }

    #[test]
    fn scheduled_topic_messages_fan_out_when_due() {
        let mut state = State::default();
        state
            .create_queue("inbox", &QueueOptions::default())
            .unwrap();
        state.create_topic("t", &TopicOptions::default()).unwrap();
        state
            .create_subscription("t", "a", &SubscriptionOptions::default())
            .unwrap();
        state
            .create_subscription(
                "t",
                "fwd",
                &SubscriptionOptions::default().with_forward_to("inbox"),
            )
            .unwrap();
        let start = Instant::now();
        let mut message = data(b"x");
        set_annotation(
            &mut message,
            SCHEDULED_ENQUEUE_TIME,
            Value::Timestamp(Timestamp::from_milliseconds(1_000)),
        );
        let numbers = state.send("t", vec![message], start, 0).unwrap();
        assert_eq!(state.scheduled_count("t").unwrap(), 1);
        assert_eq!(state.active_count("t/Subscriptions/a").unwrap(), 0);
        assert_eq!(state.next_deadline(), Some(start + Duration::from_secs(1)));
        assert!(state.process_due(start + Duration::from_secs(1), 1_000));
        assert_eq!(state.active_count("t/subscriptions/A").unwrap(), 1);
        assert_eq!(state.active_count("inbox").unwrap(), 1);
        assert!(
            !state.is_scheduled("t", numbers[0]),
            "already enqueued: no longer cancellable"
        );
    }

    #[test]
    fn invalid_configuration_names_the_field() {
        let mut state = State::default();
        let error = state
            .create_queue("q", &QueueOptions::default().with_max_delivery_count(0))
            .unwrap_err();
        assert!(error.to_string().contains("max_delivery_count"), "{error}");
        let error = state
            .create_queue("a/b", &QueueOptions::default())
            .unwrap_err();
        assert!(matches!(error, Error::InvalidConfiguration(_)));
        state.create_queue("q", &QueueOptions::default()).unwrap();
        assert!(matches!(
            state.create_queue("Q", &QueueOptions::default()),
            Err(Error::EntityExists(_))
        ));
    }
}
