//! OpenTelemetry with redeliver: `/metrics` in Prometheus' text format and `/health` from the
//! host, served with axum, while an order handler fails once and succeeds on its retry.
//!
//! ```text
//! cargo run --features opentelemetry --example observability            # prints both, exits
//! cargo run --features opentelemetry --example observability -- --serve # keeps serving
//! ```
//!
//! The message is sent inside a span; the handler prints the trace id it runs in, the same on
//! both attempts: the trace context travels in the message's headers.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{TraceContextExt, Tracer as _};
use opentelemetry::{Context as OtelContext, global};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus::{Encoder, Registry, TextEncoder};
use redeliver::memory::MemoryTransport;
use redeliver::{Backoff, BackoffPolicy, Consumer, Context, Host, Message, Outcome, Transport};
use tokio::sync::{Mutex, mpsc};

#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    id: u32,
}

struct Served {
    registry: Registry,
    host: Mutex<Option<Host>>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Providers first: workers take their instruments when they start.
    let registry = Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()?;
    let meter_provider = SdkMeterProvider::builder().with_reader(exporter).build();
    global::set_meter_provider(meter_provider.clone());
    // A real application adds an exporter (OTLP, say) with `.with_batch_exporter(..)`.
    let tracer_provider = SdkTracerProvider::builder().build();
    global::set_tracer_provider(tracer_provider.clone());

    let transport = Arc::new(MemoryTransport::new());
    let (done, mut done_rx) = mpsc::unbounded_channel();
    let host = Host::builder(transport.clone())
        .consumer(
            Consumer::endpoint("orders")
                .retry_policy(
                    BackoffPolicy::builder()
                        .max_attempts(3)
                        .backoff(Backoff::fixed(Duration::from_millis(200)))
                        .build()?,
                )
                .handler(move |order: Order, ctx: Context| {
                    let trace = OtelContext::current().span().span_context().trace_id();
                    println!(
                        "order {} attempt {} in trace {trace}",
                        order.id,
                        ctx.attempt()
                    );
                    let outcome = if ctx.attempt() == 1 {
                        Outcome::retry("inventory unavailable")
                    } else {
                        let _ = done.send(order.id);
                        Outcome::success()
                    };
                    async move { outcome }
                }),
        )
        .start()
        .await?;

    let served = Arc::new(Served {
        registry,
        host: Mutex::new(Some(host)),
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(Arc::clone(&served));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    println!("serving http://{address}/metrics and http://{address}/health\n");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let tracer = global::tracer("checkout");
    let checkout = OtelContext::current_with_span(tracer.start("checkout"));
    println!(
        "sending order 1 in trace {}",
        checkout.span().span_context().trace_id()
    );
    transport
        .send("orders", Message::json(&Order { id: 1 })?)
        .with_context(checkout.clone())
        .await?;
    checkout.span().end();
    tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
        .await?
        .ok_or("the handler stopped")?;

    let base = format!("http://{address}");
    let health = reqwest::get(format!("{base}/health")).await?;
    println!(
        "\nGET /health: {}\n{}",
        health.status(),
        health.text().await?
    );
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await?
        .text()
        .await?;
    println!("\nGET /metrics (redeliver's):");
    for line in metrics.lines().filter(|l| l.starts_with("redeliver_")) {
        println!("{line}");
    }

    if std::env::args().any(|a| a == "--serve") {
        println!("\nserving until Ctrl-C");
        tokio::signal::ctrl_c().await?;
    }
    if let Some(host) = served.host.lock().await.take() {
        host.shutdown().await;
    }
    tracer_provider.shutdown()?;
    meter_provider.shutdown()?;
    Ok(())
}

/// Prometheus' text format of every metric.
async fn metrics(State(served): State<Arc<Served>>) -> (StatusCode, String) {
    let mut text = Vec::new();
    match TextEncoder::new().encode(&served.registry.gather(), &mut text) {
        Ok(()) => (StatusCode::OK, String::from_utf8_lossy(&text).into_owned()),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// 200 when every consumer is connected and consuming, 503 otherwise; one line per consumer.
async fn health(State(served): State<Arc<Served>>) -> (StatusCode, String) {
    let host = served.host.lock().await;
    let Some(host) = host.as_ref() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopped\n".to_owned());
    };
    let mut body = String::new();
    for consumer in host.health() {
        body.push_str(&format!(
            "{}: consuming {}, paused {}, ready {}, completed {}, retried {}\n",
            consumer.source,
            consumer.consuming,
            consumer.paused,
            consumer.is_ready(),
            consumer.stats.completed,
            consumer.stats.retried,
        ));
    }
    let status = if host.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}
