//! What a worker counts.

use std::sync::atomic::{AtomicU64, Ordering};

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
