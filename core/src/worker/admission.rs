//! Admission: how many deliveries a worker may handle at once right now, below its
//! concurrency, and whether a delivery in hand may be handled now.
//!
//! A worker without an [`Admission`] handles up to its concurrency at once. With one
//! ([`WorkerBuilder::admission`](super::WorkerBuilder::admission)), each lane takes a *place*
//! from it before it takes a delivery from the transport, and gives the place back once the
//! delivery is settled. While no place is free the lane takes nothing: deliveries stay with the
//! transport, not in a handler slot or a worker queue. The host's
//! [`resilience`](crate::host::resilience) is the admission of a consumer with a circuit breaker,
//! throttle-aware pausing and ramp-up.
//!
//! # What the worker guarantees
//! - A lane holds a place from before it takes a delivery until that delivery is settled, so
//!   at most as many handler calls run as the admission allows at the time they are taken.
//! - After a delivery is taken, the worker asks [`Admission::check`] once more. A delivery the
//!   admission no longer has room for ([`Verdict::Wait`]) is held by the worker — not by a
//!   handler, and without counting an attempt — until a place is free again; a delivery to be
//!   put off ([`Verdict::Park`]) goes back to the transport until then, without counting an
//!   attempt. Neither is dead-lettered or dropped: at shutdown, a held delivery is given back.

use futures::future::BoxFuture;

use chrono::{DateTime, Utc};

use crate::message::Message;

/// Decides how many deliveries a worker may handle at once; see the [module docs](self).
///
/// Implementations must make [`enter`](Admission::enter) cancel-safe: a place is taken only when
/// the future completes.
pub trait Admission: Send + Sync + 'static {
    /// Takes a place if one is free now.
    fn try_enter(&self) -> bool;

    /// Waits until a place is free and takes it.
    fn enter(&self) -> BoxFuture<'_, ()>;

    /// Gives back a place taken by [`try_enter`](Admission::try_enter) or
    /// [`enter`](Admission::enter).
    fn leave(&self);

    /// Whether `message`, taken with a place, may be handled now.
    fn check(&self, message: &Message) -> Verdict;
}

/// What to do with a delivery taken with a place; see [`Admission::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Handle it now.
    Handle,
    /// Room was withdrawn since the place was taken: give the place back and hold the delivery
    /// until one is free again.
    Wait,
    /// Not before this instant: put the delivery back until then, without counting an attempt.
    Park(DateTime<Utc>),
}
