//! The waiting room: deliveries that came early by less than the transport's scheduling
//! precision wait here for their not-before, holding no handler slot.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::transport::Delivery;

/// The places of the waiting room, and the way back to the lanes.
pub(super) struct WaitingRoom {
    /// How many may wait at once (0 where the transport is never early).
    pub(super) capacity: usize,
    /// How many are waiting or ready and not yet taken by a lane.
    pub(super) count: AtomicUsize,
    pub(super) ready: mpsc::UnboundedSender<Delivery>,
    pub(super) tasks: TaskTracker,
}

impl WaitingRoom {
    pub(super) fn new(capacity: usize, ready: mpsc::UnboundedSender<Delivery>) -> Self {
        WaitingRoom {
            capacity,
            count: AtomicUsize::new(0),
            ready,
            tasks: TaskTracker::new(),
        }
    }

    /// Takes a place, if one is free.
    pub(super) fn enter(&self) -> bool {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    pub(super) fn leave(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}
