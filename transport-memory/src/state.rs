//! The transport's state: every endpoint's queue and dead letters, scheduled messages ordered by
//! their not-before, and the lock and change notification around them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use redeliver_core::{Clock, Message, Source};
use rustc_hash::FxBuildHasher;
use tokio::sync::{Notify, watch};

/// What every clone of the transport, its consumers and their settlers share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) clock: Clock,
    state: Mutex<State>,
    /// Bumped on every change, so tests can wait for a condition.
    pub(crate) version: watch::Sender<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) endpoints: HashMap<String, Endpoint, FxBuildHasher>,
    pub(crate) topics: HashMap<String, BTreeSet<String>>,
    next_sequence: u64,
    pub(crate) next_delivery: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Endpoint {
    pub(crate) main: Queue,
    pub(crate) dead: Queue,
}

#[derive(Debug, Default)]
pub(crate) struct Queue {
    pub(crate) ready: VecDeque<Message>,
    /// Ordered by not-before, then by arrival.
    pub(crate) scheduled: BTreeMap<(DateTime<Utc>, u64), Message>,
    /// Shared with the delivery: handing a message out copies nothing.
    pub(crate) in_flight: HashMap<u64, Arc<Message>, FxBuildHasher>,
    pub(crate) arrived: Arc<Notify>,
}

impl Queue {
    pub(crate) fn is_idle(&self) -> bool {
        self.ready.is_empty() && self.scheduled.is_empty() && self.in_flight.is_empty()
    }

    /// Moves every scheduled message whose not-before has come into the ready queue.
    pub(crate) fn promote_due(&mut self, now: &mut Now<'_>) {
        if self.scheduled.is_empty() {
            return;
        }
        let now = now.get();
        while let Some(entry) = self.scheduled.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
        }
    }
}

/// The transport's clock, read at most once per change and only if the change needs it (taking
/// or completing an unscheduled message does not).
pub(crate) struct Now<'a> {
    clock: &'a Clock,
    read: Option<DateTime<Utc>>,
}

impl Now<'_> {
    fn get(&mut self) -> DateTime<Utc> {
        *self.read.get_or_insert_with(|| self.clock.now())
    }
}

impl State {
    pub(crate) fn queue(&mut self, source: &Source) -> &mut Queue {
        let name = source.endpoint_name();
        // Look up before inserting: `entry` would allocate the name on every take and settle.
        if !self.endpoints.contains_key(name) {
            self.endpoints.insert(name.to_owned(), Endpoint::default());
        }
        let endpoint = self
            .endpoints
            .get_mut(name)
            .expect("inserted above if it was missing");
        match source {
            Source::Endpoint(_) => &mut endpoint.main,
            Source::DeadLetters(_) => &mut endpoint.dead,
        }
    }

    pub(crate) fn enqueue(&mut self, source: &Source, message: Message, now: &mut Now<'_>) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let queue = self.queue(source);
        match message.not_before() {
            Some(at) if at > now.get() => {
                queue.scheduled.insert((at, sequence), message);
            }
            _ => queue.ready.push_back(message),
        }
        queue.arrived.notify_waiters();
    }
}

impl Inner {
    pub(crate) fn new(clock: Clock) -> Self {
        Inner {
            clock,
            state: Mutex::new(State::default()),
            version: watch::Sender::new(0),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the queues half-changed in a way that
        // matters more than losing the whole transport would, so keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `change` on the state and tells waiters.
    pub(crate) fn change<R>(&self, change: impl FnOnce(&mut State, &mut Now<'_>) -> R) -> R {
        let mut now = Now {
            clock: &self.clock,
            read: None,
        };
        let result = change(&mut self.lock(), &mut now);
        // Only tests wait for changes; without a waiter, skip the notification on this hot path.
        if self.version.receiver_count() > 0 {
            self.version.send_modify(|v| *v = v.wrapping_add(1));
        }
        result
    }
}
