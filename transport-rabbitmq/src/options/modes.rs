//! The ways of working the options choose between: topology declared or only checked, the queue
//! type, the delivery limit, and how messages are held until their not-before.

use std::time::Duration;

/// The most delay levels the cascade may have (2^28 - 1 s, about 8.5 years).
pub const MAX_DELAY_LEVELS: u8 = 28;

/// The `x-delivery-limit` of quorum endpoint and dead-letter queues unless configured
/// otherwise (the default RabbitMQ 4 gives quorum queues); see
/// [`with_delivery_limit`](crate::RabbitMqOptions::with_delivery_limit).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// Whether endpoint queues have a delivery limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeliveryLimit {
    /// [`DEFAULT_DELIVERY_LIMIT`] on quorum queues, none on classic queues.
    Default,
    /// This limit (quorum queues only).
    Limit(u32),
    /// None.
    Off,
}

/// Whether the transport creates its topology or only checks that it exists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopologyMode {
    /// Declare every queue, exchange and binding (idempotent: declaring twice is harmless), at
    /// [`declare`](redeliver_core::Transport::declare) and again after every reconnection.
    #[default]
    Declare,
    /// Only check, with passive declarations, that queues and exchanges exist (for brokers
    /// provisioned elsewhere). A missing one is an [`Error::NotFound`](redeliver_core::Error::NotFound) naming it. Bindings cannot
    /// be checked over AMQP 0-9-1 and are assumed to be in place.
    CheckOnly,
}

/// The queue type of endpoint queues and their dead-letter queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueType {
    /// Replicated quorum queues (the default), which also support
    /// [`with_delivery_limit`](crate::RabbitMqOptions::with_delivery_limit).
    #[default]
    Quorum,
    /// Classic queues.
    Classic,
}

impl QueueType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// How messages are held until their not-before.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DelayMode {
    /// The binary delay cascade (the default): `levels` levels of fixed-TTL quorum queues, level
    /// `L` waiting 2^L seconds. Delays are rounded **down** to whole seconds (the worker waits
    /// out the last fraction of a second) and may be at most 2^levels - 1 seconds. See the
    /// [crate documentation](crate#delays-the-binary-cascade).
    Cascade {
        /// How many levels, 1 to [`MAX_DELAY_LEVELS`].
        levels: u8,
    },
    /// The compatibility mode for an existing fixed-TTL retry queue: a message to be delayed on
    /// queue `Q` goes to the queue `Q` + `suffix`, which holds every message for `ttl` and then
    /// dead-letters it back to `Q`. A message that comes back before its not-before is parked again
    /// by the worker without calling the handler, so delays are honoured in steps of `ttl`.
    FixedTtlRetryQueue {
        /// Appended to a queue's name to name its retry queue (for example `-retry`).
        suffix: String,
        /// The retry queue's `x-message-ttl`.
        ttl: Duration,
    },
}

impl Default for DelayMode {
    fn default() -> Self {
        DelayMode::Cascade {
            levels: MAX_DELAY_LEVELS,
        }
    }
}
