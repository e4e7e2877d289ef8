//! Every delivery is handled inside a `delivery` span carrying message id, endpoint, attempt
//! and outcome.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redeliver::memory::MemoryTransport;
use redeliver::{Backoff, BackoffPolicy, Context, Jitter, Message, Outcome, Transport, Worker};
use support::{Calls, secs, within};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context as LayerContext, Layer, SubscriberExt};

type Fields = HashMap<String, String>;

/// Collects the fields of every `delivery` span.
#[derive(Clone, Default)]
struct DeliverySpans(Arc<Mutex<HashMap<u64, Fields>>>);

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> Layer<S> for DeliverySpans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: LayerContext<'_, S>) {
        if attrs.metadata().name() == "delivery" {
            let mut fields = Fields::new();
            attrs.record(&mut Collect(&mut fields));
            self.0.lock().unwrap().insert(id.into_u64(), fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: LayerContext<'_, S>) {
        if let Some(fields) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Collect(fields));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn every_delivery_has_a_span_with_id_endpoint_attempt_and_outcome() {
    let spans = DeliverySpans::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));

    let memory = MemoryTransport::new();
    let transport: Arc<dyn Transport> = Arc::new(memory.clone());
    let calls = Calls::new(memory.clock());
    let policy = BackoffPolicy::builder()
        .max_attempts(2)
        .backoff(Backoff::fixed(secs(1)))
        .jitter(Jitter::None)
        .build()
        .unwrap();
    Worker::builder(transport.clone(), "orders")
        .retry_policy(policy)
        .start(move |_: u32, ctx: Context| {
            calls.record(&ctx);
            async move {
                if ctx.attempt() == 1 {
                    Outcome::retry("flaky")
                } else {
                    Outcome::success()
                }
            }
        })
        .await
        .unwrap();
    let message = Message::json(&1).unwrap();
    let id = message.id().to_string();
    transport.send("orders", message).await.unwrap();
    within("idle", memory.wait_until_idle()).await;

    let mut seen: Vec<(String, String, String, String)> = spans
        .0
        .lock()
        .unwrap()
        .values()
        .map(|f| {
            let get = |k: &str| f.get(k).cloned().unwrap_or_default();
            (
                get("message_id"),
                get("endpoint"),
                get("attempt"),
                get("outcome"),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (id.clone(), "orders".into(), "1".into(), "retried".into()),
            (id, "orders".into(), "2".into(), "completed".into()),
        ]
    );
}
