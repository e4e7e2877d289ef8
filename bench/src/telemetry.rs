//! The `opentelemetry` feature's cost: no-op handler throughput with recording on (tracer and
//! meter providers installed, spans exported in batches, metrics read periodically) next to
//! recording switched off at run time (`telemetry::set_enabled(false)`, the code path of the
//! feature off but for one relaxed atomic load per hook), and with one trace in ten sampled,
//! taking turns run by run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::global;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
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

/// How a run records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recording {
    /// Switched off at run time.
    Off,
    /// Every span sampled and exported.
    Always,
    /// One trace in ten sampled (`ParentBased(TraceIdRatioBased(0.1))`, a common production
    /// setting); the others get non-recording spans. Metrics are recorded for every message
    /// either way.
    Sampled,
}

impl Recording {
    const ALL: [Recording; 3] = [Recording::Off, Recording::Always, Recording::Sampled];
}

/// The providers a run records with, switched run by run. A worker takes its tracer when it
/// starts, so a switch applies from the next run.
struct Providers {
    always: SdkTracerProvider,
    sampled: SdkTracerProvider,
    meter: SdkMeterProvider,
}

impl Providers {
    fn install(exported: &Discard) -> Self {
        let providers = Providers {
            always: SdkTracerProvider::builder()
                .with_batch_exporter(exported.clone())
                .build(),
            sampled: SdkTracerProvider::builder()
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    0.1,
                ))))
                .with_batch_exporter(exported.clone())
                .build(),
            meter: SdkMeterProvider::builder()
                .with_reader(PeriodicReader::builder(InMemoryMetricExporter::default()).build())
                .build(),
        };
        global::set_meter_provider(providers.meter.clone());
        providers
    }

    fn apply(&self, recording: Recording) {
        telemetry::set_enabled(recording != Recording::Off);
        match recording {
            Recording::Off => {}
            Recording::Always => global::set_tracer_provider(self.always.clone()),
            Recording::Sampled => global::set_tracer_provider(self.sampled.clone()),
        }
    }

    fn shut_down(self) {
        telemetry::set_enabled(false);
        for tracer in [self.always, self.sampled] {
            let _ = tracer.force_flush();
            let _ = tracer.shutdown();
        }
        let _ = self.meter.shutdown();
    }
}

/// The three medians, in the order of [`Recording::ALL`], of `runs` rounds that each measure
/// every mode once, in a rotating order so that no mode always runs first.
pub(crate) async fn per_mode<F, Fut>(
    runs: usize,
    apply: impl Fn(Recording),
    mut measure: F,
) -> [f64; 3]
where
    F: FnMut() -> Fut,
    Fut: Future<Output = f64>,
{
    let mut rates: [Vec<f64>; 3] = Default::default();
    for run in 0..runs {
        for i in 0..3 {
            let mode = (run + i) % 3;
            apply(Recording::ALL[mode]);
            rates[mode].push(measure().await);
        }
    }
    rates.map(median_of)
}

pub(crate) async fn run(scale: &Scale, report: &mut Report) {
    let exported = Discard::default();
    let providers = Providers::install(&exported);
    let [off, always, sampled] = per_mode(
        scale.runs,
        |mode| providers.apply(mode),
        || memory::no_op_throughput(scale.messages, 16),
    )
    .await;
    compare(
        report,
        "memory: no-op handler, concurrency 16",
        always,
        sampled,
        off,
    );
    if let Some([off, always, sampled]) =
        rabbitmq::telemetry_throughput(scale, |mode| providers.apply(mode)).await
    {
        compare(
            report,
            "rabbitmq classic: consume, no-op handler",
            always,
            sampled,
            off,
        );
    }
    providers.shut_down();
    assert!(
        exported.0.load(Ordering::Relaxed) > 0,
        "the recording runs exported spans"
    );
}

fn compare(report: &mut Report, what: &str, always: f64, sampled: f64, off: f64) {
    report.compare(
        GROUP,
        format!("{what}, recording on, every span (raw: switched off; target >= 0.90)"),
        always,
        off,
        "msg/s",
    );
    report.compare(
        GROUP,
        format!("{what}, recording on, 1 trace in 10 sampled (raw: switched off)"),
        sampled,
        off,
        "msg/s",
    );
}
