//! [`Signal`], the stop flags of a worker.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// A one-way flag that tasks can check cheaply (an atomic load, no lock) and wait for.
#[derive(Default)]
pub(super) struct Signal {
    set: AtomicBool,
    notify: Notify,
}

impl Signal {
    pub(super) fn fire(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub(super) fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    pub(super) async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Register before checking, so that a `fire` in between is not missed.
        notified.as_mut().enable();
        if self.is_set() {
            return;
        }
        notified.await;
    }
}
