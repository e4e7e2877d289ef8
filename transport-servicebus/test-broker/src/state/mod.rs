//! The broker's state: entities, messages, locks and schedules, behind one mutex.
//!
//! Everything here is synchronous and takes the current time as an argument, so the rules
//! (delivery counting, lock expiry, dead-lettering) are decided in one place. [`State`] and
//! the data it holds are in `store`; each other file adds one part of the rules to it.

mod clock;
mod due;
mod inspection;
mod locks;
mod message;
mod provisioning;
mod receiving;
mod sending;
mod store;
#[cfg(test)]
mod tests;

pub(crate) use clock::now_ms;
pub(crate) use locks::{LockError, Settlement};
pub(crate) use message::{DEAD_LETTER_DESCRIPTION, DEAD_LETTER_REASON, Msg};
pub(crate) use receiving::ReceiveMode;
pub(crate) use sending::Refusal;
pub(crate) use store::State;
