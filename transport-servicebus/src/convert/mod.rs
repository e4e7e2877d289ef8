//! Between redeliver's [`Message`](redeliver_core::Message) and Service Bus messages.
//!
//! Native properties carry message id, content type, correlation id, reply-to and subject; the
//! framework's state travels in application properties named by
//! [`wire`](redeliver_core::wire); a not-before in the future becomes the scheduled enqueue
//! time.

pub(crate) mod ids;
pub(crate) mod incoming;
mod limits;
pub(crate) mod outgoing;
pub(crate) mod time;
mod values;
