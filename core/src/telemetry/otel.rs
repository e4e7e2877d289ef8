//! The `opentelemetry` feature: W3C trace context in the headers, spans and metrics.
//!
//! The hot path takes what it can from the worker: the tracer, the meter's instruments (bound to
//! the attributes every metric carries, so that the SDK resolves that attribute set once instead
//! of hashing and looking it up on every update) and the endpoint's name as a shared string are
//! made once when the worker starts. Per delivery it costs the header parse, one span with its
//! attribute list, and the metric updates.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use chrono::{DateTime, SecondsFormat, Utc};
use opentelemetry::context::{FutureExt as _, WithContext};
use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::metrics::{BoundCounter, BoundHistogram, BoundUpDownCounter, Counter, Meter};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Link, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, ContextGuard, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::propagation::TraceContextPropagator;

use super::{
    ATTEMPT, LATENESS_MS, NOT_BEFORE, OUTCOME, Operation, REASON, RETRY_DELAY_MS,
    RETRY_DELAY_SOURCE, RETRY_NOT_BEFORE, SCOPE, Settlement, Taken,
};
use crate::clock::until;
use crate::message::{Headers, Message};
use crate::transport::Source;

const SYSTEM: &str = "messaging.system";
const DESTINATION: &str = "messaging.destination.name";
const OPERATION_TYPE: &str = "messaging.operation.type";
const OPERATION_NAME: &str = "messaging.operation.name";
const MESSAGE_ID: &str = "messaging.message.id";
const CONVERSATION_ID: &str = "messaging.message.conversation_id";

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Switches recording on or off for the whole process, at run time (on by default). While it
/// is off, [`produce`] adds no headers and workers start no spans and update no metrics.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether recording is on; see [`set_enabled`]. Always `false` without the `opentelemetry`
/// feature.
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn scope() -> InstrumentationScope {
    static SCOPE_VALUE: OnceLock<InstrumentationScope> = OnceLock::new();
    SCOPE_VALUE
        .get_or_init(|| {
            InstrumentationScope::builder(SCOPE)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build()
        })
        .clone()
}

struct HeaderWriter<'a>(&'a mut Headers);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` is left out, as W3C trace context allows: every message is
        // spared a header and the consumer its parse. One an earlier send left goes with it.
        if key == super::TRACESTATE && value.is_empty() {
            self.0.remove(key);
            return;
        }
        self.0.insert(key, value);
    }
}

struct HeaderReader<'a>(&'a Headers);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}

/// The trace context `headers` carry, on top of the current context.
fn extract(headers: &Headers) -> Context {
    TraceContextPropagator::new().extract(&HeaderReader(headers))
}

/// Starts the producer span of a send or publish of `message` to `destination` on `system`,
/// and writes its W3C trace context into the message's headers. Every transport calls it in
/// [`Transport::send`](crate::Transport::send) and [`Transport::publish`](crate::Transport::publish);
/// a transport of your own should too. End the span with [`ProducerSpan::finish`] once the
/// broker took the message (dropping it ends it too).
///
/// Without the `opentelemetry` feature, or while [switched off](set_enabled), the message comes
/// back untouched.
pub fn produce(
    system: &'static str,
    operation: Operation,
    destination: &str,
    mut message: Message,
) -> (Message, ProducerSpan) {
    if !is_enabled() {
        return (message, ProducerSpan(None));
    }
    let tracer = global::tracer_with_scope(scope());
    let mut attributes = Vec::with_capacity(6);
    attributes.push(KeyValue::new(SYSTEM, system));
    attributes.push(KeyValue::new(DESTINATION, destination.to_owned()));
    attributes.push(KeyValue::new(OPERATION_TYPE, "send"));
    attributes.push(KeyValue::new(OPERATION_NAME, operation.name()));
    attributes.push(KeyValue::new(MESSAGE_ID, message.id().as_str().to_owned()));
    if let Some(correlation) = message.correlation_id() {
        attributes.push(KeyValue::new(CONVERSATION_ID, correlation.to_owned()));
    }
    let mut name = String::with_capacity(operation.name().len() + 1 + destination.len());
    name.push_str(operation.name());
    name.push(' ');
    name.push_str(destination);
    let mut builder = tracer
        .span_builder(name)
        .with_kind(SpanKind::Producer)
        .with_attributes(attributes);
    // Sent again with the context of an earlier send (a dead letter replayed): link to it.
    if message.headers().get(super::TRACEPARENT).is_some() {
        let earlier = extract(message.headers());
        let earlier = earlier.span().span_context().clone();
        if earlier.is_valid() {
            builder = builder.with_links(vec![Link::with_context(earlier)]);
        }
    }
    let current = Context::current();
    let span = tracer.build_with_context(builder, &current);
    let cx = current.with_span(span);
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderWriter(message.headers_mut()));
    (message, ProducerSpan(Some(cx)))
}

/// The producer span [`produce`] started; ends when finished or dropped.
#[derive(Debug)]
#[must_use = "the span ends when this is dropped; finish it once the broker took the message"]
pub struct ProducerSpan(Option<Context>);

impl ProducerSpan {
    /// Ends the span, with an error status if the send failed.
    pub fn finish(self, result: &Result<(), crate::Error>) {
        if let Some(cx) = &self.0 {
            let span = cx.span();
            if let Err(e) = result {
                span.set_status(Status::error(e.to_string()));
            }
            span.end();
        }
    }
}

/// The instruments of one worker, made when it starts. Those without a reason are bound to the
/// worker's `messaging.system` and `messaging.destination.name`.
struct Instruments {
    received: BoundCounter<u64>,
    completed: BoundCounter<u64>,
    retried: Counter<u64>,
    dead_lettered: Counter<u64>,
    discarded: Counter<u64>,
    in_flight: BoundUpDownCounter<i64>,
    handler_duration: BoundHistogram<f64>,
    attempts: BoundHistogram<u64>,
    retry_delay: BoundHistogram<f64>,
    lateness: BoundHistogram<f64>,
    settle_failures: BoundCounter<u64>,
    reconnects: BoundCounter<u64>,
}

impl Instruments {
    fn new(meter: &Meter, base: &[KeyValue]) -> Self {
        let messages = |name: &'static str, description: &'static str| -> Counter<u64> {
            meter
                .u64_counter(name)
                .with_unit("{message}")
                .with_description(description)
                .build()
        };
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                // From a millisecond to an hour: handler calls, retry delays, lateness.
                .with_boundaries(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
                ])
                .build()
                .bind(base)
        };
        Instruments {
            received: messages("redeliver.messages.received", "Deliveries received").bind(base),
            completed: messages(
                "redeliver.messages.completed",
                "Deliveries completed after a success",
            )
            .bind(base),
            retried: messages("redeliver.messages.retried", "Retries scheduled"),
            dead_lettered: messages(
                "redeliver.messages.dead_lettered",
                "Deliveries dead-lettered",
            ),
            discarded: messages("redeliver.messages.discarded", "Deliveries discarded"),
            in_flight: meter
                .i64_up_down_counter("redeliver.messages.in_flight")
                .with_unit("{message}")
                .with_description("Deliveries being handled")
                .build()
                .bind(base),
            handler_duration: seconds("redeliver.handler.duration", "Handler calls"),
            attempts: meter
                .u64_histogram("redeliver.attempts")
                .with_unit("{attempt}")
                .with_description("Attempts a message needed until it completed")
                .with_boundaries(vec![1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 15.0, 20.0, 50.0])
                .build()
                .bind(base),
            retry_delay: seconds("redeliver.retry.delay", "Delays scheduled for retries"),
            lateness: seconds(
                "redeliver.scheduling.lateness",
                "Handler start minus not-before, for scheduled deliveries",
            ),
            settle_failures: meter
                .u64_counter("redeliver.settle.failures")
                .with_unit("{settlement}")
                .with_description("Settlements the broker did not take")
                .build()
                .bind(base),
            reconnects: meter
                .u64_counter("redeliver.consumer.reconnects")
                .with_unit("{reconnect}")
                .with_description("Times a consumer lost its stream and consumed again")
                .build()
                .bind(base),
        }
    }
}

/// What a worker needs to record: made once, when it starts.
pub(crate) struct WorkerTelemetry {
    tracer: BoxedTracer,
    /// `process {endpoint}`.
    span_name: Cow<'static, str>,
    /// The endpoint, shared by every attribute that names it.
    destination: Value,
    system: &'static str,
    /// `messaging.system` and `messaging.destination.name`, on every metric.
    base: [KeyValue; 2],
    instruments: Instruments,
}

impl WorkerTelemetry {
    pub(crate) fn new(system: &'static str, source: &Source) -> Self {
        let endpoint: Arc<str> = Arc::from(source.endpoint_name());
        let destination = Value::from(endpoint);
        let base = [
            KeyValue::new(SYSTEM, system),
            KeyValue::new(DESTINATION, destination.clone()),
        ];
        let instruments = Instruments::new(&global::meter_with_scope(scope()), &base);
        WorkerTelemetry {
            tracer: global::tracer_with_scope(scope()),
            span_name: Cow::Owned(format!("process {}", source.endpoint_name())),
            base,
            destination,
            system,
            instruments,
        }
    }

    pub(crate) fn received(&self) {
        if is_enabled() {
            self.instruments.received.add(1);
        }
    }

    pub(crate) fn reconnected(&self) {
        if is_enabled() {
            self.instruments.reconnects.add(1);
        }
    }

    /// A delivery's consumer span, child of the context its headers carry.
    pub(crate) fn start(&self, message: &Message) -> DeliverySpan<'_> {
        if !is_enabled() {
            return DeliverySpan::off(self);
        }
        self.instruments.in_flight.add(1);
        let parent = extract(message.headers());
        let mut attributes = Vec::with_capacity(8);
        attributes.push(KeyValue::new(SYSTEM, self.system));
        attributes.push(KeyValue::new(DESTINATION, self.destination.clone()));
        attributes.push(KeyValue::new(OPERATION_TYPE, "process"));
        attributes.push(KeyValue::new(OPERATION_NAME, "process"));
        attributes.push(KeyValue::new(MESSAGE_ID, message.id().as_str().to_owned()));
        attributes.push(KeyValue::new(ATTEMPT, i64::from(message.attempt())));
        if let Some(correlation) = message.correlation_id() {
            attributes.push(KeyValue::new(CONVERSATION_ID, correlation.to_owned()));
        }
        if let Some(not_before) = message.not_before() {
            attributes.push(KeyValue::new(NOT_BEFORE, rfc3339(not_before)));
        }
        let builder = self
            .tracer
            .span_builder(self.span_name.clone())
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes);
        let span = self.tracer.build_with_context(builder, &parent);
        DeliverySpan {
            worker: self,
            recording: true,
            cx: Some(parent.with_span(span)),
            handler_started: None,
        }
    }

    /// For settlements outside a delivery's span (shutdown, admission): metrics only.
    pub(crate) fn detached(&self) -> DeliverySpan<'_> {
        DeliverySpan {
            worker: self,
            recording: is_enabled(),
            cx: None,
            handler_started: None,
        }
    }
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Makes a consumer span the current context of a future.
pub(crate) struct Scope(Option<Context>);

impl Scope {
    /// `future` with the consumer span as the current context while it is polled.
    pub(crate) fn wrap<F: Future>(self, future: F) -> WithContext<F> {
        match self.0 {
            Some(cx) => future.with_context(cx),
            None => future.with_current_context(),
        }
    }
}

/// One delivery's consumer span and the figures recorded while it is handled.
pub(crate) struct DeliverySpan<'a> {
    worker: &'a WorkerTelemetry,
    /// Whether metrics are recorded (recording was on when the delivery came).
    recording: bool,
    /// The consumer span, in the context of the producer's.
    cx: Option<Context>,
    handler_started: Option<Instant>,
}

impl<'a> DeliverySpan<'a> {
    fn off(worker: &'a WorkerTelemetry) -> Self {
        DeliverySpan {
            worker,
            recording: false,
            cx: None,
            handler_started: None,
        }
    }

    /// What makes the consumer span current while a future is polled.
    pub(crate) fn scope(&self) -> Scope {
        Scope(self.cx.clone())
    }

    /// Makes the consumer span current until the guard is dropped (to create `tracing` spans
    /// as its children).
    pub(crate) fn enter(&self) -> Option<ContextGuard> {
        self.cx.as_ref().map(|cx| cx.clone().attach())
    }

    /// The handler is about to be called at `now` for a delivery due at `not_before`.
    pub(crate) fn handler_starting(
        &mut self,
        not_before: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) {
        if !self.recording {
            return;
        }
        if let Some(not_before) = not_before {
            let late = until(not_before, now);
            self.worker.instruments.lateness.record(late.as_secs_f64());
            if let Some(cx) = &self.cx {
                cx.span()
                    .set_attribute(KeyValue::new(LATENESS_MS, millis(late)));
            }
        }
        self.handler_started = Some(Instant::now());
    }

    /// The handler returned.
    pub(crate) fn handler_finished(&mut self) {
        if let Some(started) = self.handler_started.take() {
            self.worker
                .instruments
                .handler_duration
                .record(started.elapsed().as_secs_f64());
        }
    }

    /// The worker settled the delivery as `settlement` says, and the transport took it so.
    pub(crate) fn settled(&self, settlement: &Settlement<'_>, taken: Taken<'_>) {
        if !self.recording {
            return;
        }
        let instruments = &self.worker.instruments;
        let base = &self.worker.base;
        let with_reason = |reason: &str| {
            [
                base[0].clone(),
                base[1].clone(),
                KeyValue::new(REASON, reason.to_owned()),
            ]
        };
        if let Some(cx) = &self.cx {
            let span = cx.span();
            let outcome = match taken {
                Taken::DeadLettered(_) => "dead-lettered",
                _ => settlement.outcome,
            };
            span.set_attribute(KeyValue::new(OUTCOME, outcome));
            let reason = match taken {
                Taken::DeadLettered(reason) => Some(reason),
                _ => settlement.reason,
            };
            if let Some(reason) = reason {
                span.set_attribute(KeyValue::new(REASON, reason.to_owned()));
            }
            if let Some(retry) = &settlement.retry {
                span.set_attribute(KeyValue::new(RETRY_DELAY_MS, millis(retry.delay)));
                span.set_attribute(KeyValue::new(RETRY_DELAY_SOURCE, retry.source.name()));
                span.set_attribute(KeyValue::new(RETRY_NOT_BEFORE, rfc3339(retry.not_before)));
            }
            if matches!(taken, Taken::Failed) {
                span.set_status(Status::error(
                    "the settlement failed; the message comes again",
                ));
            }
        }
        match taken {
            Taken::Failed => instruments.settle_failures.add(1),
            Taken::DeadLettered(reason) => instruments.dead_lettered.add(1, &with_reason(reason)),
            Taken::AsAsked => match settlement.outcome {
                "completed" => {
                    instruments.completed.add(1);
                    instruments.attempts.record(u64::from(settlement.attempt));
                }
                "retried" => {
                    instruments
                        .retried
                        .add(1, &with_reason(settlement.reason.unwrap_or_default()));
                    if let Some(retry) = &settlement.retry {
                        instruments.retry_delay.record(retry.delay.as_secs_f64());
                    }
                }
                "dead-lettered" => instruments
                    .dead_lettered
                    .add(1, &with_reason(settlement.reason.unwrap_or_default())),
                "discarded" => instruments
                    .discarded
                    .add(1, &with_reason(settlement.reason.unwrap_or_default())),
                _ => {}
            },
        }
    }
}

impl Drop for DeliverySpan<'_> {
    fn drop(&mut self) {
        if let Some(cx) = self.cx.take() {
            cx.span().end();
            self.worker.instruments.in_flight.add(-1);
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;
    use crate::telemetry::{TRACEPARENT, TRACESTATE};

    fn inject(trace_state: TraceState, headers: &mut Headers) {
        let span = SpanContext::new(
            TraceId::from(7),
            SpanId::from(9),
            TraceFlags::SAMPLED,
            true,
            trace_state,
        );
        let cx = Context::new().with_remote_span_context(span);
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderWriter(headers));
    }

    #[test]
    fn an_empty_tracestate_is_left_out_and_an_earlier_one_removed() {
        let mut headers = Headers::default();
        headers.insert(TRACESTATE, "earlier=1");
        inject(TraceState::default(), &mut headers);
        assert_eq!(
            headers.get(TRACEPARENT),
            Some("00-00000000000000000000000000000007-0000000000000009-01")
        );
        assert_eq!(headers.get(TRACESTATE), None);
    }

    #[test]
    fn a_tracestate_with_entries_is_written() {
        let mut headers = Headers::default();
        let state = TraceState::from_key_value([("vendor", "x")]).unwrap();
        inject(state, &mut headers);
        assert_eq!(headers.get(TRACESTATE), Some("vendor=x"));
    }
}
