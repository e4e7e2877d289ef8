#![doc = include_str!("../README.md")]
//!
//! # Feature flags
#![doc = document_features::document_features!()]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod connect;

pub use connect::{TransportKind, TransportUrl, connect, connect_from_env, connect_to};

// The application's API: transports and topology, the host, the worker and handlers, retry
// policies, messages and errors. What transports implement lives in [`transport`].
pub use redeliver_core::{
    Backoff, BackoffPolicy, BackoffPolicyBuilder, BoxError, Capabilities, Classify, Clock,
    Consumer, ConsumerHealth, ConsumerSettings, Context, DeadLetterInfo, Error, ErrorKind,
    FailedAttempt, Failure, FailureCategory, Handler, Headers, Host, HostBuilder, IntoOutcome,
    InvalidPayload, Jitter, Message, MessageId, Outcome, Payload, RawBody, ResultExt, RetryAfter,
    RetryPolicy, SecretUrl, Source, Topology, Transport, Worker, WorkerBuilder, WorkerStats,
    outcome_for_status,
};
pub use redeliver_core::{dead_letters, host, reasons, request_reply, telemetry};

#[cfg(feature = "mock")]
pub use redeliver_core::MockTransport;

/// The transport author's API: what a [`Transport`] hands out and how its deliveries are
/// settled, how it is reached from a URL, the framework's wire headers and the redaction of
/// secrets. Applications do not need
/// it; transports and the conformance suite (`redeliver-conformance`) do.
pub mod transport {
    pub use redeliver_core::transport::{
        ConsumeOptions, Delivery, DeliveryStream, FrameworkState, Settle, Settled, Stored,
    };
    pub use redeliver_core::{connector, secret, wire};
}

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
