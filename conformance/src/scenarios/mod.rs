//! The scenarios. Each takes a [`Factory`](crate::Factory), makes a transport with uniquely named endpoints,
//! runs workers on it, asserts, and cleans up. A failed assertion panics with what differed.

mod dead_letter_ops;
mod dead_letters;
mod delivery;
mod outcomes;
mod request_reply;
mod setup;
mod shutdown;
#[cfg(feature = "opentelemetry")]
pub mod telemetry;
mod topics;

pub use dead_letter_ops::*;
pub use dead_letters::*;
pub use delivery::*;
pub use outcomes::*;
pub use request_reply::*;
pub use shutdown::*;
pub use topics::*;
// The resilience scenarios live with their downstream model, which tests use too.
pub use crate::resilience::{
    a_throttled_key_is_put_off, outage_then_recovery, retry_after_pauses_the_consumer,
};
