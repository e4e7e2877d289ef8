//! The `opentelemetry` feature's cost: no-op handler throughput with recording on (tracer and
//! meter providers installed, spans exported in batches, metrics read periodically) next to
//! recording switched off at run time (`telemetry::set_enabled(false)`, the code path of the
//! feature off but for one relaxed atomic load per hook), alternating run by run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::global;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use redeliver::telemetry;

use crate::report::Report;
use crate::support::median_of;
use crate::{Scale, memory, rabbitmq};

const GROUP: &str = "telemetry";

/// Counts and drops what it is given: the cost of exporting without a collector's.
#[derive(Debug, Default, Clone)]
struct Discard(Arc<AtomicU64>);

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

pub(crate) async fn run(scale: &Scale, report: &mut Report) {
    let exported = Discard::default();
    let tracer_provider = SdkTracerProvider::builder()
        .with_batch_exporter(exported.clone())
        .build();
    global::set_tracer_provider(tracer_provider.clone());
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(InMemoryMetricExporter::default()).build())
        .build();
    global::set_meter_provider(meter_provider.clone());

    let (mut off, mut on) = (Vec::new(), Vec::new());
    for run in 0..scale.runs {
        for recording in [run % 2 == 1, run % 2 == 0] {
            telemetry::set_enabled(recording);
            let rate = memory::no_op_throughput(scale.messages, 16).await;
            if recording {
                on.push(rate)
            } else {
                off.push(rate)
            }
        }
    }
    report.compare(
        GROUP,
        "memory: no-op handler, concurrency 16, recording on (raw: switched off; target >= 0.90)",
        median_of(on),
        median_of(off),
        "msg/s",
    );
    if let Some((on, off)) = rabbitmq::telemetry_throughput(scale).await {
        report.compare(
            GROUP,
            "rabbitmq classic: consume, no-op handler, recording on (raw: switched off; target >= 0.90)",
            on,
            off,
            "msg/s",
        );
    }
    telemetry::set_enabled(false);
    let _ = tracer_provider.force_flush();
    assert!(
        exported.0.load(Ordering::Relaxed) > 0,
        "the recording runs exported spans"
    );
    let _ = tracer_provider.shutdown();
    let _ = meter_provider.shutdown();
}
