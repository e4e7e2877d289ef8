//! The sender links of each queue or topic: up to
//! [`senders_per_entity`](crate::ServiceBusOptions::senders_per_entity) per entity, opened as
//! concurrent sends need them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use azservicebus::ServiceBusSender;
use tokio::sync::{Mutex, MutexGuard};

/// The sender pools of every queue or topic sent to, each made on first use.
pub(super) struct Senders {
    pools: StdMutex<HashMap<String, Arc<SenderPool>>>,
    /// How many links a pool may hold.
    per_entity: usize,
}

impl Senders {
    pub(super) fn new(per_entity: usize) -> Self {
        Senders {
            pools: StdMutex::new(HashMap::new()),
            per_entity,
        }
    }

    /// The pool of `entity`, made now if it is the first send there.
    pub(super) fn pool(&self, entity: &str) -> Arc<SenderPool> {
        Arc::clone(
            self.pools
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(entity.to_owned())
                .or_insert_with(|| Arc::new(SenderPool::new(self.per_entity))),
        )
    }

    /// Every pool, each with its entity, taken out of the table.
    pub(super) fn drain(&self) -> Vec<(String, Arc<SenderPool>)> {
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect()
    }

    /// Every link of the pools no send holds any more, taken out of the table (when the
    /// transport is dropped).
    pub(super) fn drain_unused(&mut self) -> Vec<ServiceBusSender> {
        self.pools
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .filter_map(|(_, pool)| Arc::into_inner(pool))
            .flat_map(|pool| pool.slots.into_vec())
            .filter_map(Mutex::into_inner)
            .collect()
    }
}

/// Up to [`ServiceBusOptions::senders_per_entity`](crate::ServiceBusOptions::senders_per_entity)
/// sender links to one entity. A link carries one send at a time (the client's send takes
/// `&mut self` until the broker answers), so several links let several sends be in flight. A
/// slot holds no link until a send needs it.
pub(super) struct SenderPool {
    pub(super) slots: Box<[Mutex<Option<ServiceBusSender>>]>,
    /// Which slot a send waits for when every slot is busy.
    next: AtomicUsize,
}

impl SenderPool {
    fn new(size: usize) -> Self {
        SenderPool {
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// A slot for one send: a free one holding a link if there is one, else a free empty one
    /// (the send attaches a link to it), else the next one in turn once it is free.
    pub(super) async fn acquire(&self) -> MutexGuard<'_, Option<ServiceBusSender>> {
        let mut empty = None;
        for slot in &self.slots {
            if let Ok(guard) = slot.try_lock() {
                if guard.is_some() {
                    return guard;
                }
                if empty.is_none() {
                    empty = Some(guard);
                }
            }
        }
        if let Some(guard) = empty {
            return guard;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        self.slots[turn].lock().await
    }
}
