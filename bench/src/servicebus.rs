//! The Service Bus transport against the project's test broker, started in this process, next
//! to the raw `azservicebus` client on the same broker.
//!
//! The broker runs on a thread of its own (a current-thread runtime), the clients on another
//! current-thread runtime: `fe2o3-amqp` 0.14.1 can lose a transfer's outcome on a
//! multi-threaded runtime against a peer on loopback (see the transport's crate docs). So the
//! broker and the clients each get about one core. Every run has a broker of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use azservicebus::core::BasicRetryPolicy;
use azservicebus::{
    ServiceBusClient, ServiceBusClientOptions, ServiceBusMessage, ServiceBusReceiverOptions,
    ServiceBusSenderOptions,
};
use bytes::Bytes;
use redeliver::servicebus::{ServiceBusOptions, ServiceBusTransport};
use redeliver::{Message, Transport};
use redeliver_servicebus_testbroker::{BrokerHandle, BrokerOptions, QueueOptions};
use tokio::task::JoinSet;

use crate::report::Report;
use crate::support;
use crate::support::{Lateness, Payload, fail_once_then_succeed, payload, spread, within};
use crate::{Scale, median};

const GROUP: &str = "servicebus";
/// Sends kept in flight through the transport.
const IN_FLIGHT: usize = 64;
/// Messages per batch of the raw sender.
const BATCH: usize = 100;
/// The worker's concurrency, and the raw receiver's prefetch.
const CONCURRENCY: usize = 16;

type Client = ServiceBusClient<BasicRetryPolicy>;

/// How big the runs of this group are, from the bench's scale.
struct Sizes {
    runs: usize,
    /// Messages per throughput run.
    messages: usize,
    /// Messages per retry-path run (each is sent twice).
    retried: usize,
    /// Scheduled messages in the delay precision run.
    scheduled: usize,
    longest_delay: Duration,
}

impl Sizes {
    fn new(scale: &Scale) -> Self {
        let messages = (scale.messages / 20).max(200);
        Sizes {
            runs: scale.runs,
            messages,
            retried: messages / 2,
            scheduled: scale.scheduled / 2,
            longest_delay: scale.longest_delay,
        }
    }
}

/// Runs the group on a current-thread runtime of its own, with the broker on its own thread.
pub(crate) fn run(scale: &Scale, report: &mut Report) {
    let sizes = Sizes::new(scale);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime");
    runtime.block_on(measure(&sizes, report));
}

async fn measure(sizes: &Sizes, report: &mut Report) {
    let body = payload();
    let n = sizes.messages;

    let ours = median(sizes.runs, || send_ours(n, &body)).await;
    let raw = median(sizes.runs, || send_raw(n, &body, BATCH)).await;
    report.compare(
        GROUP,
        format!("send 1 KiB JSON, {IN_FLIGHT} in flight (raw: batches of {BATCH})"),
        ours,
        raw,
        "msg/s",
    );
    let raw_one = median(sizes.runs, || send_raw(n, &body, 1)).await;
    report.compare(
        GROUP,
        format!("send 1 KiB JSON, {IN_FLIGHT} in flight (raw: one send at a time)"),
        ours,
        raw_one,
        "msg/s",
    );

    let ours = median(sizes.runs, || consume_ours(n, &body)).await;
    let raw = median(sizes.runs, || consume_raw(n, &body)).await;
    report.compare(
        GROUP,
        format!("consume, no-op handler, concurrency {CONCURRENCY} (raw: prefetch {CONCURRENCY})"),
        ours,
        raw,
        "msg/s",
    );

    let retry = median(sizes.runs, || retry_path(sizes.retried, &body)).await;
    report.add(
        GROUP,
        format!("fail once, then succeed (immediate retry), concurrency {CONCURRENCY}"),
        retry,
        "msg/s",
    );

    let lateness = delay_precision(sizes.scheduled, sizes.longest_delay).await;
    report.add(
        GROUP,
        format!(
            "lateness of {} scheduled messages ({}-{} ms), p50",
            sizes.scheduled,
            sizes.longest_delay.as_millis() / 10,
            sizes.longest_delay.as_millis()
        ),
        lateness.p50,
        "ms",
    );
    report.add(GROUP, "lateness, p99", lateness.p99, "ms");
    report.add(GROUP, "lateness, max", lateness.max, "ms");
    let (long, short) = (sizes.longest_delay * 3, sizes.longest_delay / 10);
    let hol = median(sizes.runs, || head_of_line(long, short)).await;
    report.add(
        GROUP,
        format!(
            "head of line: {} ms delay after a {} ms one, lateness",
            short.as_millis(),
            long.as_millis()
        ),
        hol,
        "ms",
    );
}

/// The test broker, running on a thread of its own until [`Broker::stop`]. Every run starts
/// its own: the broker scans all the messages it holds whenever its state changes, so what an
/// earlier run left behind would slow the next one down.
struct Broker {
    handle: BrokerHandle,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Broker {
    fn start() -> Self {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("servicebus-test-broker".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread tokio runtime for the broker");
                runtime.block_on(async move {
                    let started = redeliver_servicebus_testbroker::start(BrokerOptions::default())
                        .await
                        .unwrap_or_else(|e| panic!("the Service Bus test broker starts: {e}"));
                    handle_tx
                        .send(started)
                        .expect("the bench waits for the broker");
                    // The broker's tasks run on this runtime until the bench is done.
                    let _ = stopped.await;
                });
            })
            .expect("a thread for the broker");
        let handle = handle_rx
            .recv()
            .expect("the broker thread hands over the broker");
        Broker {
            handle,
            stop,
            thread,
        }
    }

    fn connection_string(&self) -> String {
        self.handle.connection_string()
    }

    /// Creates queue `name` and returns it.
    fn queue(&self, name: &str) -> String {
        self.handle
            .create_queue(name, QueueOptions::default())
            .expect("the queue is created");
        name.to_owned()
    }

    fn stop(self) {
        drop(self.handle);
        let _ = self.stop.send(());
        self.thread
            .join()
            .expect("the broker thread does not panic");
    }
}

async fn transport(broker: &Broker) -> Arc<ServiceBusTransport> {
    let options = ServiceBusOptions::default()
        .with_unsecured(true)
        .with_try_timeout(Duration::from_secs(10))
        .with_receive_wait(Duration::from_secs(5));
    let transport = ServiceBusTransport::connect(broker.connection_string(), options)
        .await
        .expect("the transport connects to the test broker");
    Arc::new(transport)
}

async fn raw_client(broker: &Broker) -> Client {
    Client::unsecured()
        .new_from_connection_string(
            broker.connection_string(),
            ServiceBusClientOptions::default(),
        )
        .await
        .expect("the raw client connects to the test broker")
}

fn message(body: &Bytes) -> Message {
    Message::new(body.clone()).with_content_type("application/json")
}

fn raw_message(body: &Bytes) -> ServiceBusMessage {
    let mut message = ServiceBusMessage::new(body.to_vec());
    message.set_content_type("application/json".to_owned());
    message
}

/// `messages` sends through the transport, [`IN_FLIGHT`] at a time.
async fn send_ours(messages: usize, body: &Bytes) -> f64 {
    let broker = Broker::start();
    let queue = broker.queue("send-ours");
    let transport = transport(&broker).await;
    // The first send attaches the sender; it is not timed.
    transport
        .send(&queue, message(body))
        .await
        .expect("the first send");
    let started = Instant::now();
    let mut senders = JoinSet::new();
    for task in 0..IN_FLIGHT {
        let share = messages / IN_FLIGHT + usize::from(task < messages % IN_FLIGHT);
        let (transport, queue, body) = (Arc::clone(&transport), queue.clone(), body.clone());
        senders.spawn(async move {
            for _ in 0..share {
                transport
                    .send(&queue, message(&body))
                    .await
                    .expect("the broker takes the message");
            }
        });
    }
    within(async {
        while let Some(joined) = senders.join_next().await {
            joined.expect("a sending task does not panic");
        }
    })
    .await;
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    assert_eq!(
        broker
            .handle
            .active_message_count(&queue)
            .expect("the queue exists"),
        messages + 1
    );
    transport.close().await;
    broker.stop();
    rate
}

/// `messages` sent through a raw sender, `batch` messages per send call.
async fn send_raw(messages: usize, body: &Bytes, batch: usize) -> f64 {
    let broker = Broker::start();
    let queue = broker.queue("send-raw");
    let mut client = raw_client(&broker).await;
    let mut sender = client
        .create_sender(&queue, ServiceBusSenderOptions::default())
        .await
        .expect("a raw sender");
    sender
        .send_message(raw_message(body))
        .await
        .expect("the first send");
    let started = Instant::now();
    within(async {
        let mut left = messages;
        while left > 0 {
            let count = left.min(batch);
            let batch: Vec<ServiceBusMessage> = (0..count).map(|_| raw_message(body)).collect();
            sender
                .send_messages(batch)
                .await
                .expect("the broker takes the batch");
            left -= count;
        }
    })
    .await;
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    assert_eq!(
        broker
            .handle
            .active_message_count(&queue)
            .expect("the queue exists"),
        messages + 1
    );
    sender.dispose().await.expect("the sender closes");
    client.dispose().await.expect("the client closes");
    broker.stop();
    rate
}

/// A new queue holding `messages` messages, sent in batches by a raw sender (not timed).
async fn filled_queue(broker: &Broker, what: &str, messages: usize, body: &Bytes) -> String {
    let queue = broker.queue(what);
    let mut client = raw_client(broker).await;
    let mut sender = client
        .create_sender(&queue, ServiceBusSenderOptions::default())
        .await
        .expect("a raw sender");
    let mut left = messages;
    while left > 0 {
        let count = left.min(BATCH);
        let batch: Vec<ServiceBusMessage> = (0..count).map(|_| raw_message(body)).collect();
        sender
            .send_messages(batch)
            .await
            .expect("the broker takes the batch");
        left -= count;
    }
    sender.dispose().await.expect("the sender closes");
    client.dispose().await.expect("the client closes");
    queue
}

/// A worker with a no-op handler drains a queue of `messages`.
async fn consume_ours(messages: usize, body: &Bytes) -> f64 {
    let broker = Broker::start();
    let queue = filled_queue(&broker, "consume-ours", messages, body).await;
    let transport = transport(&broker).await;
    let rate =
        support::no_op_drain::<Payload>(transport.clone(), &queue, CONCURRENCY, messages).await;
    transport.close().await;
    broker.stop();
    rate
}

/// A raw receiver with a prefetch of [`CONCURRENCY`] drains a queue of `messages`, decoding
/// and completing each.
async fn consume_raw(messages: usize, body: &Bytes) -> f64 {
    let broker = Broker::start();
    let queue = filled_queue(&broker, "consume-raw", messages, body).await;
    let mut client = raw_client(&broker).await;
    let options = ServiceBusReceiverOptions {
        prefetch_count: CONCURRENCY as u32,
        ..ServiceBusReceiverOptions::default()
    };
    let started = Instant::now();
    let mut receiver = client
        .create_receiver_for_queue(&queue, options)
        .await
        .expect("a raw receiver");
    within(async {
        let mut left = messages;
        while left > 0 {
            let ask = left.min(CONCURRENCY) as u32;
            let received = receiver
                .receive_messages_with_max_wait_time(ask, Some(Duration::from_secs(5)))
                .await
                .expect("receiving works");
            for message in &received {
                let body = message.body().expect("a data body");
                let payload: Payload = serde_json::from_slice(body).expect("valid JSON");
                assert!(payload.is_valid());
                receiver
                    .complete_message(message)
                    .await
                    .expect("completing works");
            }
            left -= received.len();
        }
    })
    .await;
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    receiver.dispose().await.expect("the receiver closes");
    client.dispose().await.expect("the client closes");
    broker.stop();
    rate
}

/// Every message fails once, is retried at once (a copy sent back to the queue), then
/// succeeds.
async fn retry_path(messages: usize, body: &Bytes) -> f64 {
    let broker = Broker::start();
    let queue = filled_queue(&broker, "retry", messages, body).await;
    let transport = transport(&broker).await;
    let rate =
        fail_once_then_succeed::<Payload>(transport.clone(), &queue, CONCURRENCY, messages).await;
    transport.close().await;
    broker.stop();
    rate
}

/// Messages scheduled between a tenth of `longest` and `longest` ahead of their sending; how
/// late each reaches its handler, in milliseconds of the wall clock.
async fn delay_precision(messages: usize, longest: Duration) -> Lateness {
    let broker = Broker::start();
    let queue = broker.queue("delays");
    let transport = transport(&broker).await;
    let lateness = support::scheduled_lateness(
        transport.clone(),
        &queue,
        CONCURRENCY,
        IN_FLIGHT,
        messages,
        |i| spread(i, longest / 10, longest),
    )
    .await;
    transport.close().await;
    broker.stop();
    lateness
}

/// A message due after `long` is sent first, one due after `short` second: how late the
/// short one is, in milliseconds.
async fn head_of_line(long: Duration, short: Duration) -> f64 {
    let broker = Broker::start();
    let queue = broker.queue("head-of-line");
    let transport = transport(&broker).await;
    let lateness = support::head_of_line(transport.clone(), &queue, long, short).await;
    transport.close().await;
    broker.stop();
    lateness
}
