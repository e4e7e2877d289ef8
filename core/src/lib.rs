//! The core of [redeliver](https://docs.rs/redeliver): the message model, the [`Transport`] and
//! [`Handler`] contracts, [`RetryPolicy`] and the [`Worker`] that runs handlers.
//!
//! This crate has no broker dependency. Transports live in their own crates
//! (`redeliver-memory`, `redeliver-rabbitmq`, `redeliver-servicebus`) and applications usually
//! depend on the `redeliver` facade instead of this crate.
//!
//! # The promise
//! - **At-least-once.** A message accepted by a transport is handled until the handler succeeds,
//!   discards it, or it is dead-lettered — never silently dropped, not when a handler panics, not
//!   when the payload is invalid, not at shutdown. Duplicates are possible (a handler that
//!   finished whose settlement was lost runs again), so handlers must be idempotent; the
//!   [`MessageId`] stays the same across retries for that purpose.
//! - **Not-before is never violated.** A handler is never called before the message's
//!   not-before (`NotBeforeUtc`).
//! - **The same attempt numbers everywhere.** [`Message::attempt`] is 1 on the first handler
//!   call and grows by one per retry, counted by the framework, identical on every transport.
//!   [`RetryPolicy::max_attempts`] counts handler calls including the first.
//!
//! # Modules
//! - [`message`] — [`Message`], [`MessageId`], [`Headers`].
//! - [`transport`] — the [`Transport`] trait, [`Delivery`] and settlement.
//! - [`handler`] — the [`Handler`] trait, [`Context`].
//! - [`outcome`] — [`Outcome`], what a handler decided, and [`RetryAfter`].
//! - [`failure`] — [`Failure`], [`Classify`]: `Result`s as handler return values, `?` in handlers.
//! - [`payload`] — [`Payload`], [`RawBody`]: how a body becomes the handler's argument.
//! - [`http`] — HTTP status + `Retry-After` → [`Outcome`].
//! - [`retry`] — [`RetryPolicy`], [`BackoffPolicy`], [`Backoff`], [`Jitter`].
//! - [`worker`] — [`Worker`].
//! - [`host`] — [`Host`]: many typed consumers on one transport, started and stopped together.
//! - [`clock`] — [`Clock`], the source of "now" (controllable in tests).
//! - [`dead_letters`] — [`DeadLetters`]: list, group, replay and purge an endpoint's dead letters.
//! - [`connector`] — [`Connector`](connector::Connector): how a transport is reached from a URL.
//! - [`request_reply`] — [`request_reply::Requester`], request/reply with time-outs and status envelopes.
//! - [`secret`] — [`SecretUrl`]: URLs and connection strings whose secrets never show.
//! - [`wire`] — the header names broker transports carry the framework's state in.
//! - [`telemetry`] — OpenTelemetry traces across the broker and the worker's metrics
//!   (`opentelemetry` feature); see its module docs for the attribute and metric names.
//!
//! # Feature flags
#![doc = document_features::document_features!()]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod clock;
pub mod connector;
pub mod dead_letters;
pub mod error;
pub mod failure;
pub mod handler;
pub mod host;
pub mod http;
pub mod message;
pub mod outcome;
pub mod payload;
pub mod reasons;
pub mod request_reply;
pub mod retry;
pub mod secret;
pub mod telemetry;
pub mod transport;
pub mod wire;
pub mod worker;

pub use clock::Clock;
pub use dead_letters::DeadLetters;
pub use error::{BoxError, Error, ErrorKind};
pub use failure::{Classify, Failure, IntoOutcome, ResultExt};
pub use handler::{Context, Handler};
pub use host::{Consumer, ConsumerHealth, ConsumerSettings, Host, HostBuilder};
pub use http::{FailureCategory, outcome_for_status};
pub use message::{DeadLetterInfo, Headers, Message, MessageId};
pub use outcome::{Outcome, RetryAfter};
pub use payload::{Payload, RawBody};
pub use retry::{Backoff, BackoffPolicy, BackoffPolicyBuilder, FailedAttempt, Jitter, RetryPolicy};
pub use secret::SecretUrl;
pub use transport::{
    Capabilities, ConsumeOptions, Delivery, DeliveryStream, PassedOver, Settle, Settled, Source,
    Stored, Topology, Transport,
};
pub use worker::{InvalidPayload, Worker, WorkerBuilder, WorkerStats};

#[cfg(feature = "mock")]
pub use transport::MockTransport;
