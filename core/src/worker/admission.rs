//! Admission: how many deliveries a worker may handle at once right now, below its
//! concurrency, and whether a delivery in hand may be handled now.
//!
//! A worker without an [`Admission`] handles up to its concurrency at once. With one
//! ([`WorkerBuilder::admission`](super::WorkerBuilder::admission)), each lane takes a delivery
//! from the transport only while the admission [has room](Admission::has_room), and hands it to
//! the handler only once [`Admission::check`] gives it a place, which the lane gives back once
//! the delivery is settled. While there is no room the lanes take nothing: deliveries stay with
//! the transport, not in a handler slot or a worker queue. The host's
//! [`resilience`](crate::host::resilience) is the admission of a consumer with a circuit breaker,
//! throttle-aware pausing and ramp-up.
//!
//! # What the worker guarantees
//! - At most as many handler calls run at once as [`Admission::check`] gave places.
//! - A delivery taken just as the room went ([`Verdict::Wait`]) is held by the worker — not by
//!   a handler, and without counting an attempt — until there is room again; its lane gives up
//!   the intake meanwhile, so the other lanes go on. A delivery to be put off
//!   ([`Verdict::Park`]) goes back to the transport until then, without counting an attempt.
//!   Neither is dead-lettered or dropped: at shutdown, a held delivery is given back.

use futures::future::BoxFuture;

use chrono::{DateTime, Utc};

use crate::message::Message;

/// Decides how many deliveries a worker may handle at once; see the [module docs](self).
pub trait Admission: Send + Sync + 'static {
    /// Whether a delivery could be handed to the handler now (nothing is taken).
    fn has_room(&self) -> bool;

    /// Waits until [`has_room`](Admission::has_room) holds. Taking nothing, it is cancel-safe.
    fn room(&self) -> BoxFuture<'_, ()>;

    /// Whether `message`, just taken from the transport, may be handled now.
    /// [`Verdict::Handle`] takes a place, which the worker gives back with
    /// [`leave`](Admission::leave) once the delivery is settled.
    fn check(&self, message: &Message) -> Verdict;

    /// Gives back the place a [`Verdict::Handle`] took.
    fn leave(&self);
}

/// What to do with a delivery just taken; see [`Admission::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Handle it now, with a place.
    Handle,
    /// No room now: hold the delivery until there is, then check again.
    Wait,
    /// Not before this instant: put the delivery back until then, without counting an attempt.
    Park(DateTime<Utc>),
}
