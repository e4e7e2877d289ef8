//! Observability: trace context carried across the broker, a span per delivery, metrics.
//!
//! Everything here records only with the `opentelemetry` feature. Without it, [`produce`] hands
//! the message back untouched, the worker records nothing, and no OpenTelemetry crate is
//! compiled in.
//!
//! # Trace context across the broker
//! [`Transport::send`](crate::Transport::send) and [`Transport::publish`](crate::Transport::publish)
//! of every transport call [`produce`]: it starts a *producer* span (`send {destination}` or
//! `publish {destination}`, kind `PRODUCER`) as a child of the caller's current OpenTelemetry
//! context and writes that span's W3C trace context into the message headers
//! [`TRACEPARENT`] and [`TRACESTATE`] (the latter only when the trace state has entries; an
//! empty one is left out, as W3C trace context allows). The worker reads them back and runs the
//! handler in a *consumer* span (`process {endpoint}`, kind `CONSUMER`) whose parent is the
//! producer's span, so the handler is part of the sender's trace. A producer that is not redeliver (a raw AMQP
//! client, another language) only has to set a `traceparent` header.
//!
//! The headers travel with the message: a retry, a parked message and a dead letter keep the
//! context of the original send, so every attempt is a child of the same producer span, told
//! apart by [`ATTEMPT`]. A message that already carries a trace context when it is sent again
//! (a dead letter replayed) gets a new producer span with a link to the original context.
//!
//! The wire format is W3C trace context whatever propagator the application installed
//! globally, so every redeliver application reads what every other one writes.
//!
//! # Spans
//! Attributes follow OpenTelemetry's [messaging semantic
//! conventions](https://opentelemetry.io/docs/specs/semconv/messaging/messaging-spans/):
//!
//! | attribute | on | value |
//! |---|---|---|
//! | `messaging.system` | both | the transport's [`Capabilities::messaging_system`](crate::Capabilities::messaging_system): `rabbitmq`, `servicebus`, `memory` |
//! | `messaging.destination.name` | both | the endpoint or topic |
//! | `messaging.operation.type` | both | `send` on the producer, `process` on the consumer |
//! | `messaging.operation.name` | both | `send`, `publish` or `process` |
//! | `messaging.message.id` | both | the [`MessageId`](crate::MessageId) |
//! | `messaging.message.conversation_id` | both | the correlation id, if any |
//!
//! OpenTelemetry has no convention for retries. redeliver's own attributes, on the consumer
//! span:
//!
//! | attribute | value |
//! |---|---|
//! | [`ATTEMPT`] `redeliver.attempt` | the handler call this is, 1 for the first ([`Message::attempt`](crate::Message::attempt)) |
//! | [`OUTCOME`] `redeliver.outcome` | `completed`, `retried`, `dead-lettered`, `discarded`, `parked`, `waiting` or `abandoned` |
//! | [`REASON`] `redeliver.reason` | the reason given for a retry, dead letter or discard |
//! | [`RETRY_DELAY_MS`] `redeliver.retry.delay_ms` | the delay chosen for the next attempt, in milliseconds |
//! | [`RETRY_DELAY_SOURCE`] `redeliver.retry.delay_source` | `backoff` (the retry policy) or `retry-after` (the handler's [`RetryAfter`](crate::RetryAfter), when it was the longer) |
//! | [`RETRY_NOT_BEFORE`] `redeliver.retry.not_before` | when the next attempt may run, RFC 3339 |
//! | [`NOT_BEFORE`] `redeliver.not_before` | the delivery's own not-before, if it had one, RFC 3339 |
//! | [`LATENESS_MS`] `redeliver.lateness_ms` | handler start minus that not-before, in milliseconds |
//!
//! A settlement the broker did not take sets the span's status to error.
//!
//! # Metrics
//! Recorded with OpenTelemetry metrics directly rather than through the `metrics` facade: the
//! traces need OpenTelemetry anyway, so one dependency and one place to configure (a
//! `MeterProvider`) serve both, and the instruments carry the same attribute names as the spans.
//! Every instrument has the attributes `messaging.system` and `messaging.destination.name` (the
//! endpoint); those marked *reason* add `redeliver.reason`, which should therefore be a short,
//! fixed text (put the details into the description).
//!
//! | instrument | kind | unit | what |
//! |---|---|---|---|
//! | `redeliver.messages.received` | counter | `{message}` | deliveries received |
//! | `redeliver.messages.completed` | counter | `{message}` | completed after a success |
//! | `redeliver.messages.retried` | counter, *reason* | `{message}` | retries scheduled |
//! | `redeliver.messages.dead_lettered` | counter, *reason* | `{message}` | dead-lettered (by the worker or the transport) |
//! | `redeliver.messages.discarded` | counter, *reason* | `{message}` | discarded |
//! | `redeliver.messages.in_flight` | up-down counter | `{message}` | deliveries being handled now |
//! | `redeliver.handler.duration` | histogram | `s` | handler calls |
//! | `redeliver.attempts` | histogram | `{attempt}` | attempts a message needed until it completed |
//! | `redeliver.retry.delay` | histogram | `s` | delays scheduled for retries |
//! | `redeliver.scheduling.lateness` | histogram | `s` | handler start minus not-before, for scheduled deliveries |
//! | `redeliver.settle.failures` | counter | `{settlement}` | settlements the broker did not take (the message comes again) |
//! | `redeliver.consumer.reconnects` | counter | `{reconnect}` | times a consumer lost its stream and consumed again |
//!
//! In Prometheus' text format the dots become underscores and counters end in `_total`
//! (`redeliver_messages_completed_total`).
//!
//! # Wiring it up
//! Install the providers before workers start (a worker takes its instruments when it starts),
//! then send and consume as usual:
//!
//! - **Plain OpenTelemetry**: `opentelemetry::global::set_tracer_provider(..)` and
//!   `opentelemetry::global::set_meter_provider(..)` with the SDK's providers and your exporters.
//!   Send inside a span (`tracer.in_span(..)`, or a future `.with_context(cx)`) and the message
//!   joins that trace.
//! - **`tracing` with `tracing-opentelemetry`**: install the providers as above and add
//!   `tracing_opentelemetry::layer()` to the subscriber. Its context activation (on by default)
//!   makes a `tracing` span's OpenTelemetry context current while it is entered, so a message
//!   sent inside a `tracing` span joins its trace, and the worker's `delivery` span (and every
//!   `tracing` span of the handler) is a child of the consumer span.
//!
//! `examples/observability` serves the metrics as Prometheus text and the host's health with
//! axum. [`set_enabled`] switches recording off and on at run time.
//!
//! # Cost
//! Recording adds about 6,700 instructions per delivery to the worker (a few microseconds),
//! three quarters of them inside OpenTelemetry: parsing `traceparent`, building and ending the
//! consumer span, plus the exporting thread's work for each sampled span. The metrics are bound
//! to the endpoint when the worker starts and cost tens of instructions each. That is little
//! next to a broker's round trip, but it more than halves the in-memory transport's throughput
//! with a no-op handler; `redeliver-bench --only telemetry` measures it, with every span
//! sampled and with one trace in ten (`Sampler::ParentBased` over `TraceIdRatioBased`).

use std::time::Duration;

use chrono::{DateTime, Utc};

#[cfg(not(feature = "opentelemetry"))]
mod off;
#[cfg(feature = "opentelemetry")]
mod otel;

#[cfg(not(feature = "opentelemetry"))]
use off as imp;
#[cfg(feature = "opentelemetry")]
use otel as imp;

pub(crate) use imp::{DeliverySpan, WorkerTelemetry};
pub use imp::{ProducerSpan, is_enabled, produce, set_enabled};

/// The header the W3C `traceparent` travels in.
pub const TRACEPARENT: &str = "traceparent";
/// The header the W3C `tracestate` travels in.
pub const TRACESTATE: &str = "tracestate";

/// The name the instrumentation scope (tracer and meter) is registered under.
pub const SCOPE: &str = "redeliver";

/// Span attribute: the attempt, 1 for the first handler call.
pub const ATTEMPT: &str = "redeliver.attempt";
/// Span attribute: how the delivery was settled.
pub const OUTCOME: &str = "redeliver.outcome";
/// Span and metric attribute: the reason of a retry, dead letter or discard.
pub const REASON: &str = "redeliver.reason";
/// Span attribute: the delay chosen for the next attempt, in milliseconds.
pub const RETRY_DELAY_MS: &str = "redeliver.retry.delay_ms";
/// Span attribute: where that delay came from, `backoff` or `retry-after`.
pub const RETRY_DELAY_SOURCE: &str = "redeliver.retry.delay_source";
/// Span attribute: the not-before of the next attempt, RFC 3339.
pub const RETRY_NOT_BEFORE: &str = "redeliver.retry.not_before";
/// Span attribute: the delivery's not-before, RFC 3339.
pub const NOT_BEFORE: &str = "redeliver.not_before";
/// Span attribute: how late the handler started after the not-before, in milliseconds.
pub const LATENESS_MS: &str = "redeliver.lateness_ms";

/// Which producer operation [`produce`] is part of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation {
    /// [`Transport::send`](crate::Transport::send) to an endpoint.
    Send,
    /// [`Transport::publish`](crate::Transport::publish) to a topic.
    Publish,
}

impl Operation {
    /// The name in `messaging.operation.name`.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Send => "send",
            Operation::Publish => "publish",
        }
    }
}

/// Where the delay of a retry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DelaySource {
    /// The retry policy's back-off.
    Backoff,
    /// The handler's `Retry-After`, longer than the back-off.
    RetryAfter,
}

impl DelaySource {
    #[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
    pub(crate) fn name(self) -> &'static str {
        match self {
            DelaySource::Backoff => "backoff",
            DelaySource::RetryAfter => "retry-after",
        }
    }
}

/// What the worker decided for a delivery, as telemetry sees it.
#[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
pub(crate) struct Settlement<'a> {
    pub(crate) outcome: &'static str,
    pub(crate) reason: Option<&'a str>,
    pub(crate) retry: Option<Retry>,
    /// The attempt that was made.
    pub(crate) attempt: u32,
}

/// A retry's schedule.
#[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
pub(crate) struct Retry {
    pub(crate) delay: Duration,
    pub(crate) source: DelaySource,
    pub(crate) not_before: DateTime<Utc>,
}

/// How the transport took a settlement.
#[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
pub(crate) enum Taken<'a> {
    /// As asked.
    AsAsked,
    /// Dead-lettered instead, with this reason.
    DeadLettered(&'a str),
    /// Not at all: the message comes again.
    Failed,
}
