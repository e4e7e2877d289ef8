//! What a delivery's settler asks its consumer to do: settle now, keep a dead letter locked
//! until its retry is due, or give back a delivery dropped unsettled.

use azservicebus::receiver::DeadLetterOptions;
use fe2o3_amqp_types::primitives::OrderedMap;
use redeliver_core::Error;
use serde_amqp::Value;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;

/// What a delivery asks the consumer to do.
pub(super) enum Action {
    /// Settle now.
    Now(Final),
    /// Keep the lock until `at`, then abandon with these properties.
    AbandonAt(Instant, OrderedMap<String, Value>),
}

/// A settlement carried out on the receiver.
pub(super) enum Final {
    Complete,
    Abandon,
    DeadLetter(DeadLetterOptions),
}

/// A request from a delivery's settler to its consumer.
pub(super) enum Command {
    Settle {
        id: u64,
        action: Action,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// The delivery was dropped (or its settlement abandoned) without settling: give it back.
    Dropped { id: u64 },
    /// The delivery stream was dropped: the consumer holds this token of
    /// [`Shared::closing`](crate::shared::Shared) until it has given back what it holds and
    /// closed its receiver, so that closing the transport can wait for that.
    StreamDropped(TaskTrackerToken),
}
