#![doc = include_str!("../README.md")]

pub mod connect;

pub use connect::{TransportKind, TransportUrl, connect, connect_from_env, connect_to};
pub use redeliver_core::*;

/// The in-memory transport: exact scheduling, a controllable clock, inspection for tests.
#[cfg(feature = "memory")]
pub mod memory {
    pub use redeliver_memory::*;
}

/// The RabbitMQ transport: exact not-before without plugins, confirms, dead letters, recovery.
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq {
    pub use redeliver_rabbitmq::*;
}

/// The Azure Service Bus transport: native scheduling, peek-lock with lock renewal, native dead
/// letters.
#[cfg(feature = "servicebus")]
pub mod servicebus {
    pub use redeliver_servicebus::*;
}
