//! The telemetry scenarios on RabbitMQ (`opentelemetry` feature), and a `traceparent` from a
//! producer that is not redeliver.

mod common;

#[path = "common/factory.rs"]
mod factory;

use std::sync::Arc;
use std::time::Duration;

use factory::RabbitMq;
use redeliver_core::{Topology, Transport};
use redeliver_rabbitmq::RabbitMqTransport;

redeliver_conformance::telemetry_tests!(RabbitMq::default(), #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);

/// A raw `lapin` publish with a W3C `traceparent` header: the handler runs in a consumer span
/// of that trace, child of the foreign span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_traceparent_is_picked_up() {
    use lapin::BasicProperties;
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
    use opentelemetry::trace::SpanKind;
    use redeliver_conformance::scenarios::telemetry::{Recorder, attribute};
    use redeliver_core::{Context, Outcome, Worker};

    if !common::broker_available().await {
        return;
    }
    let recorder = Recorder::install();
    let endpoint = format!("telemetry-foreign-{}", fastrand::u64(..));
    let transport = RabbitMqTransport::connect(common::test_options(common::amqp_url()))
        .await
        .expect("connects");
    transport
        .declare(&Topology::new().endpoint(&endpoint))
        .await
        .expect("declares");
    let (handled, mut handled_rx) = tokio::sync::mpsc::unbounded_channel();
    let worker = Worker::builder(Arc::new(transport.clone()), endpoint.as_str())
        .start(move |_: serde_json::Value, ctx: Context| {
            let _ = handled.send(ctx.attempt());
            async { Outcome::success() }
        })
        .await
        .expect("the worker starts");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let connection =
        lapin::Connection::connect(&common::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("a raw connection");
    let channel = connection.create_channel().await.expect("a channel");
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("traceparent"),
        AMQPValue::LongString(LongString::from(format!("00-{trace_id}-{parent_id}-01"))),
    );
    headers.insert(
        ShortString::from("tracestate"),
        AMQPValue::LongString(LongString::from("vendor=value")),
    );
    channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(transport.queue_name(&endpoint)),
            BasicPublishOptions::default(),
            br#"{"id": 1}"#,
            BasicProperties::default()
                .with_content_type(ShortString::from("application/json"))
                .with_headers(headers),
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    let attempt = tokio::time::timeout(Duration::from_secs(20), handled_rx.recv())
        .await
        .expect("handled in time")
        .expect("the handler reported");
    assert_eq!(attempt, 1);
    worker.shutdown().await;

    let consumers = recorder.spans(&endpoint, SpanKind::Consumer);
    assert_eq!(consumers.len(), 1, "{consumers:#?}");
    let span = &consumers[0];
    assert_eq!(span.span_context.trace_id().to_string(), trace_id);
    assert_eq!(span.parent_span_id.to_string(), parent_id);
    assert!(span.parent_span_is_remote);
    assert_eq!(
        span.span_context.trace_state().header(),
        "vendor=value",
        "the tracestate is carried on"
    );
    assert_eq!(
        attribute(&span.attributes, "messaging.system").map(|v| v.as_str().into_owned()),
        Some("rabbitmq".to_owned())
    );
    let _ = connection.close(200, ShortString::from("done")).await;
    transport.close().await;
    common::delete(
        vec![
            transport.queue_name(&endpoint),
            transport.dead_letter_queue_name(&endpoint),
            transport.quarantine_queue_name(&endpoint),
        ],
        vec![],
    )
    .await;
}
