//! OpenTelemetry across the broker (`opentelemetry` feature): the trace context a sender's span
//! puts into a message reaches the handler's span, survives a retry, and the metrics count what
//! the worker did.
//!
//! The scenarios record into the process-wide providers [`Recorder::install`] sets up once, and
//! tell their spans and metrics apart by their endpoint, so they run in parallel. Run them in a
//! test binary of their own: the providers would put trace headers into the messages of other
//! scenarios too.

use std::sync::OnceLock;

use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue, Value, global};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use redeliver_core::{Outcome, Topology};

use super::setup::{Setup, assert_stats, fixed, order, stop, unique, worker};
use crate::Factory;
use crate::probe::expect_within;

/// The process-wide OpenTelemetry providers the telemetry scenarios record into, with
/// OpenTelemetry's in-memory exporters.
#[derive(Debug)]
pub struct Recorder {
    spans: InMemorySpanExporter,
    metrics: InMemoryMetricExporter,
    meter_provider: SdkMeterProvider,
}

impl Recorder {
    /// Installs the global tracer and meter providers, the first time; the recorder.
    pub fn install() -> &'static Recorder {
        static RECORDER: OnceLock<Recorder> = OnceLock::new();
        RECORDER.get_or_init(|| {
            let spans = InMemorySpanExporter::default();
            // Exported as each span ends, so a finished worker's spans are all there.
            let tracer_provider = SdkTracerProvider::builder()
                .with_simple_exporter(spans.clone())
                .build();
            global::set_tracer_provider(tracer_provider);
            let metrics = InMemoryMetricExporter::default();
            let meter_provider = SdkMeterProvider::builder()
                .with_reader(PeriodicReader::builder(metrics.clone()).build())
                .build();
            global::set_meter_provider(meter_provider.clone());
            Recorder {
                spans,
                metrics,
                meter_provider,
            }
        })
    }

    /// The finished spans about `destination` (`messaging.destination.name`) of `kind`, in the
    /// order they ended.
    pub fn spans(&self, destination: &str, kind: SpanKind) -> Vec<SpanData> {
        self.spans
            .get_finished_spans()
            .expect("the in-memory exporter answers")
            .into_iter()
            .filter(|s| s.span_kind == kind)
            .filter(|s| {
                attribute(&s.attributes, "messaging.destination.name")
                    == Some(&Value::from(destination.to_owned()))
            })
            .collect()
    }

    /// All finished spans.
    pub fn all_spans(&self) -> Vec<SpanData> {
        self.spans
            .get_finished_spans()
            .expect("the in-memory exporter answers")
    }

    /// The metrics as of now.
    pub fn metrics(&self) -> Metrics {
        self.meter_provider
            .force_flush()
            .expect("the meter provider flushes");
        let mut all = self
            .metrics
            .get_finished_metrics()
            .expect("the in-memory exporter answers");
        // Cumulative: the last export holds every count.
        Metrics(all.pop().expect("one export after a flush"))
    }
}

/// One collection of metrics, read by instrument name and attributes.
#[derive(Debug)]
pub struct Metrics(ResourceMetrics);

impl Metrics {
    /// The value of the counter `name` for `endpoint` (and `reason`, if given); 0 if never
    /// counted.
    pub fn counter(&self, name: &str, endpoint: &str, reason: Option<&str>) -> u64 {
        let mut total = 0;
        for metric in self.named(name) {
            if let AggregatedMetrics::U64(MetricData::Sum(sum)) = metric {
                for point in sum.data_points() {
                    if matches(point.attributes(), endpoint, reason) {
                        total += point.value();
                    }
                }
            }
        }
        total
    }

    /// The value of the up-down counter `name` for `endpoint`.
    pub fn up_down(&self, name: &str, endpoint: &str) -> i64 {
        let mut total = 0;
        for metric in self.named(name) {
            if let AggregatedMetrics::I64(MetricData::Sum(sum)) = metric {
                for point in sum.data_points() {
                    if matches(point.attributes(), endpoint, None) {
                        total += point.value();
                    }
                }
            }
        }
        total
    }

    /// How many values the histogram `name` recorded for `endpoint`, and their sum.
    pub fn histogram(&self, name: &str, endpoint: &str) -> (u64, f64) {
        let (mut count, mut total) = (0, 0.0);
        for metric in self.named(name) {
            match metric {
                AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                    for point in h.data_points() {
                        if matches(point.attributes(), endpoint, None) {
                            count += point.count();
                            total += point.sum();
                        }
                    }
                }
                AggregatedMetrics::U64(MetricData::Histogram(h)) => {
                    for point in h.data_points() {
                        if matches(point.attributes(), endpoint, None) {
                            count += point.count();
                            total += point.sum() as f64;
                        }
                    }
                }
                _ => {}
            }
        }
        (count, total)
    }

    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a AggregatedMetrics> {
        self.0
            .scope_metrics()
            .flat_map(|s| s.metrics())
            .filter(move |m| m.name() == name)
            .map(|m| m.data())
    }
}

fn matches<'a>(
    attributes: impl Iterator<Item = &'a KeyValue>,
    endpoint: &str,
    reason: Option<&str>,
) -> bool {
    let attributes: Vec<&KeyValue> = attributes.collect();
    let has = |key: &str, value: &str| {
        attributes
            .iter()
            .any(|kv| kv.key.as_str() == key && kv.value.as_str() == value)
    };
    has("messaging.destination.name", endpoint) && reason.is_none_or(|r| has("redeliver.reason", r))
}

/// The value of the attribute `key`.
pub fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

/// A message sent inside a span is handled in a span of the same trace, child of the send's
/// producer span, with OpenTelemetry's messaging attributes; its retry is a second consumer
/// span of the same trace with attempt 2; the metrics count one receipt per attempt, one
/// retry with its reason and delay, one completion after 2 attempts, and nothing in flight.
pub async fn trace_context_crosses_the_broker(factory: &dyn Factory) {
    let recorder = Recorder::install();
    let endpoint = unique("telemetry");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let system = setup.transport.capabilities().messaging_system;
    let w = worker(
        &setup,
        endpoint.as_str(),
        fixed(setup.timing, 3),
        |_, ctx| {
            if ctx.attempt() == 1 {
                Outcome::retry("flaky")
            } else {
                Outcome::success()
            }
        },
    )
    .await;

    let tracer = global::tracer("conformance");
    let checkout = Context::current_with_span(tracer.start("checkout"));
    let message = order(1);
    let id = message.id().to_string();
    expect_within(
        setup.timing.patience,
        "the transport accept a message (Transport::send)",
        setup
            .transport
            .send(&endpoint, message)
            .with_context(checkout.clone()),
    )
    .await
    .expect("the transport accepts the message");
    checkout.span().end();
    let trace_id = checkout.span().span_context().trace_id();
    setup.calls.wait_for(2, setup.timing.patience).await;
    assert_stats(stop(w, setup.timing).await, 1, 1, 0, 0);

    let producers = recorder.spans(&endpoint, SpanKind::Producer);
    assert_eq!(producers.len(), 1, "one producer span: {producers:#?}");
    let producer = &producers[0];
    assert_eq!(producer.name, format!("send {endpoint}"));
    assert_eq!(producer.span_context.trace_id(), trace_id);
    assert_eq!(
        producer.parent_span_id,
        checkout.span().span_context().span_id(),
        "the producer span is a child of the sender's span"
    );
    let consumers = recorder.spans(&endpoint, SpanKind::Consumer);
    assert_eq!(
        consumers.len(),
        2,
        "one consumer span per attempt: {consumers:#?}"
    );
    let expected = [(1, "retried"), (2, "completed")];
    for (span, (attempt, outcome)) in consumers.iter().zip(expected) {
        let at = |key| attribute(&span.attributes, key).cloned();
        assert_eq!(span.name, format!("process {endpoint}"));
        assert_eq!(
            span.span_context.trace_id(),
            trace_id,
            "attempt {attempt}: same trace"
        );
        assert_eq!(
            span.parent_span_id,
            producer.span_context.span_id(),
            "attempt {attempt}: a child of the producer span"
        );
        assert_eq!(at("redeliver.attempt"), Some(Value::I64(attempt)));
        assert_eq!(at("redeliver.outcome"), Some(Value::from(outcome)));
        assert_eq!(at("messaging.system"), Some(Value::from(system)));
        assert_eq!(at("messaging.operation.type"), Some(Value::from("process")));
        assert_eq!(at("messaging.message.id"), Some(Value::from(id.clone())));
    }
    let first = |key| attribute(&consumers[0].attributes, key).cloned();
    assert_eq!(first("redeliver.reason"), Some(Value::from("flaky")));
    assert_eq!(
        first("redeliver.retry.delay_source"),
        Some(Value::from("backoff"))
    );
    let unit_ms = i64::try_from(setup.timing.unit.as_millis()).expect("a short unit");
    assert_eq!(first("redeliver.retry.delay_ms"), Some(Value::I64(unit_ms)));
    let second = |key| attribute(&consumers[1].attributes, key).cloned();
    assert!(
        second("redeliver.not_before").is_some() && second("redeliver.lateness_ms").is_some(),
        "the retry was scheduled: its not-before and lateness are recorded"
    );

    let metrics = recorder.metrics();
    let count = |name| metrics.counter(name, &endpoint, None);
    assert_eq!(count("redeliver.messages.received"), 2);
    assert_eq!(count("redeliver.messages.completed"), 1);
    assert_eq!(
        metrics.counter("redeliver.messages.retried", &endpoint, Some("flaky")),
        1
    );
    assert_eq!(count("redeliver.messages.dead_lettered"), 0);
    assert_eq!(count("redeliver.messages.discarded"), 0);
    assert_eq!(count("redeliver.settle.failures"), 0);
    assert_eq!(
        metrics.histogram("redeliver.attempts", &endpoint),
        (1, 2.0),
        "one completion, after 2 attempts"
    );
    assert_eq!(
        metrics.histogram("redeliver.retry.delay", &endpoint),
        (1, setup.timing.unit.as_secs_f64())
    );
    assert_eq!(
        metrics.histogram("redeliver.handler.duration", &endpoint).0,
        2
    );
    assert_eq!(
        metrics
            .histogram("redeliver.scheduling.lateness", &endpoint)
            .0,
        1
    );
    assert_eq!(
        metrics.up_down("redeliver.messages.in_flight", &endpoint),
        0
    );
    setup.finish().await;
}
