//! What a consumer shares with the settlers of its deliveries: the transport's state, the source,
//! and the places within the prefetch that deliveries hold until they are settled.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use redeliver_core::Source;
use tokio::sync::Notify;

use crate::state::Inner;

/// What a consumer shares with its deliveries' settlers: one reference count per delivery
/// rather than one per piece.
pub(super) struct ConsumerShared {
    pub(super) inner: Arc<Inner>,
    /// Shared with every delivery, so a delivery copies no name.
    pub(super) source: Arc<Source>,
    /// The prefetch: at most `limit` deliveries `out` (handed out, not settled). Cheaper than a
    /// semaphore on the path of every delivery: taking and giving back a place are single
    /// atomic operations, and only a consumer at its limit waits for `settled`.
    limit: usize,
    out: AtomicUsize,
    settled: Notify,
}

impl ConsumerShared {
    /// A consumer of `source` allowed `limit` deliveries out at once.
    pub(super) fn new(inner: Arc<Inner>, source: Source, limit: usize) -> Self {
        ConsumerShared {
            inner,
            source: Arc::new(source),
            limit,
            out: AtomicUsize::new(0),
            settled: Notify::new(),
        }
    }

    fn try_take_place(&self) -> bool {
        self.out
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |out| {
                (out < self.limit).then_some(out + 1)
            })
            .is_ok()
    }

    /// Waits for a place within the prefetch; give it back with [`Self::give_back_place`].
    pub(super) async fn take_place(&self) {
        if self.try_take_place() {
            return;
        }
        loop {
            // Register before looking again, so that a place given back in between is not
            // missed.
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.try_take_place() {
                return;
            }
            settled.await;
        }
    }

    pub(super) fn give_back_place(&self) {
        if self.out.fetch_sub(1, Ordering::AcqRel) == self.limit {
            // The consumer may be waiting for this place (one consumer per prefetch).
            self.settled.notify_one();
        }
    }
}

/// Gives a prefetch place back if a take is abandoned half-way.
pub(super) struct PlaceGuard<'a>(pub(super) &'a ConsumerShared);

impl Drop for PlaceGuard<'_> {
    fn drop(&mut self) {
        self.0.give_back_place();
    }
}
