//! What every task of one broker shares: its state and the signal that the state changed.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::state::State;

/// State shared by every task of one broker.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Notified (all waiters) whenever messages become available or deadlines change.
    pub(crate) changed: Notify,
}

impl Shared {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state usable for a test broker.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state and wakes every waiter afterwards.
    pub(crate) fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let result = f(&mut self.state());
        self.changed.notify_waiters();
        result
    }
}
