//! What a worker counts, and the switches its owner can flip while it runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::watch;

use super::WorkerStats;

#[derive(Default)]
pub(super) struct Counters {
    pub(super) received: AtomicU64,
    pub(super) handled: AtomicU64,
    pub(super) completed: AtomicU64,
    pub(super) retried: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) discarded: AtomicU64,
    pub(super) parked: AtomicU64,
    pub(super) abandoned: AtomicU64,
    pub(super) settle_failures: AtomicU64,
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(super) trait StatsSource: Send + Sync {
    fn snapshot(&self) -> WorkerStats;
}

impl Counters {
    pub(super) fn snapshot(&self) -> WorkerStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkerStats {
            received: get(&self.received),
            handled: get(&self.handled),
            completed: get(&self.completed),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            discarded: get(&self.discarded),
            parked: get(&self.parked),
            abandoned: get(&self.abandoned),
            settle_failures: get(&self.settle_failures),
        }
    }
}

/// Shared by a [`Worker`](super::Worker) and its lanes: whether it is paused, and whether its
/// consumer is open.
pub(super) struct Control {
    paused: watch::Sender<bool>,
    consuming: AtomicBool,
}

impl Control {
    pub(super) fn new() -> Self {
        Control {
            paused: watch::Sender::new(false),
            consuming: AtomicBool::new(true),
        }
    }

    pub(super) fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    pub(super) fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Returns once the worker is not paused.
    pub(super) async fn resumed(&self) {
        let mut paused = self.paused.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = paused.wait_for(|paused| !*paused).await;
    }

    pub(super) fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
    }

    pub(super) fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }
}
