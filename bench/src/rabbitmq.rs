//! The RabbitMQ transport next to raw `lapin` on the same broker, in the same run: publish with
//! confirms, consume with acks, end-to-end latency, the retry path and delay precision.
//!
//! Raw `lapin` is written the fast way: confirms pipelined (up to [`IN_FLIGHT`] unconfirmed
//! publishes), acks batched with `multiple` every [`ACK_EVERY`] deliveries, the same prefetch and
//! the same queue arguments as redeliver's queues.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use redeliver::rabbitmq::{QueueType, RabbitMqOptions, RabbitMqTransport};
use redeliver::{Context, Message, Outcome, Topology, Transport, Worker};
use serde::{Deserialize, Serialize};

use crate::arrivals::Arrivals;
use crate::report::Report;
use crate::support::{self, Countdown, Lateness, fail_once_then_succeed, median_of};
use crate::telemetry::{self, Recording};
use crate::{Scale, median};

const GROUP: &str = "rabbitmq";
/// Publishes waiting for their confirm at once, on both sides.
const IN_FLIGHT: usize = 1_000;
/// Prefetch of every consumer, and the worker's concurrency.
const PREFETCH: u16 = 250;
/// The raw consumer acknowledges with `multiple` every this many deliveries.
const ACK_EVERY: usize = 50;
/// Delay levels of the cascade: up to 31 s, enough for the head-of-line case.
const DELAY_LEVELS: u8 = 5;

/// The payload of every message: about 1 KiB of JSON.
#[derive(Serialize, Deserialize)]
struct Payload {
    id: u64,
    /// When it was sent, in microseconds since the bench's epoch (latency runs only).
    sent_us: u64,
    data: String,
}

fn payload(id: u64, sent_us: u64) -> Vec<u8> {
    let data = "x".repeat(1000);
    serde_json::to_vec(&Payload { id, sent_us, data }).expect("a payload serializes")
}

/// How big the RabbitMQ runs are, derived from the bench's [`Scale`].
struct Sizes {
    runs: usize,
    /// Messages per throughput run.
    messages: usize,
    /// Offered rate and duration of the latency runs.
    rate: u32,
    latency_for: Duration,
    /// Scheduled messages and the longest of their delays (the shortest is 1 s).
    scheduled: usize,
    longest_delay: Duration,
}

impl Sizes {
    fn new(scale: &Scale) -> Self {
        let smoke = scale.smoke;
        Sizes {
            runs: scale.runs,
            messages: (scale.messages / 10).max(100),
            rate: if smoke { 200 } else { 1_000 },
            latency_for: if smoke {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(2)
            },
            scheduled: (scale.scheduled / 2).max(20),
            // The broker schedules in whole seconds: at least 2 s, so delays vary.
            longest_delay: scale.longest_delay.max(Duration::from_secs(2)),
        }
    }
}

pub(crate) fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| redeliver::rabbitmq::DEFAULT_URL.to_owned())
}

/// The broker connection, or `None` after saying loudly that the group is skipped. With
/// `REDELIVER_REQUIRE_BROKERS=1` an unreachable broker is a failure.
pub(crate) async fn connect_or_skip(url: &str) -> Option<Connection> {
    let attempt = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await;
    let why = match attempt {
        Ok(Ok(connection)) => return Some(connection),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 5 s".to_owned(),
    };
    let shown = RabbitMqOptions::new(url).redacted_url();
    if std::env::var("REDELIVER_REQUIRE_BROKERS").as_deref() == Ok("1") {
        panic!(
            "RabbitMQ is required (REDELIVER_REQUIRE_BROKERS=1) but unreachable at {shown}: {why}"
        );
    }
    eprintln!(
        "\n!!! SKIPPED: RabbitMQ unreachable at {shown} ({why}); the rabbitmq group did not run. \
         Set AMQP_URL, or REDELIVER_REQUIRE_BROKERS=1 to make this a failure. !!!\n"
    );
    None
}

/// Everything one bench run creates on the broker, deleted at the end.
struct Bench {
    prefix: String,
    raw: Connection,
    classic: RabbitMqTransport,
    quorum: RabbitMqTransport,
    raw_queues: Mutex<Vec<String>>,
    endpoints: Mutex<Vec<(RabbitMqTransport, String)>>,
    epoch: Instant,
}

impl Bench {
    async fn new(url: &str, raw: Connection) -> Self {
        let prefix = format!("bench-{}.", std::process::id());
        let transport = |queue_type| {
            let options = RabbitMqOptions::new(url)
                .with_prefix(prefix.clone())
                .with_delay_levels(DELAY_LEVELS)
                .with_queue_type(queue_type)
                .with_connection_name(format!("redeliver-bench {queue_type:?}"));
            async move {
                RabbitMqTransport::connect(options)
                    .await
                    .expect("the broker that answered a moment ago accepts a connection")
            }
        };
        Bench {
            classic: transport(QueueType::Classic).await,
            quorum: transport(QueueType::Quorum).await,
            prefix,
            raw,
            raw_queues: Mutex::default(),
            endpoints: Mutex::default(),
            epoch: Instant::now(),
        }
    }

    fn transport(&self, queue_type: QueueType) -> &RabbitMqTransport {
        match queue_type {
            QueueType::Classic => &self.classic,
            _ => &self.quorum,
        }
    }

    /// Declares redeliver's endpoint `name` (with its dead-letter queue and the cascade).
    async fn endpoint(&self, queue_type: QueueType, name: &str) -> RabbitMqTransport {
        let transport = self.transport(queue_type).clone();
        transport
            .declare(&Topology::new().endpoint(name))
            .await
            .expect("the bench topology can be declared");
        self.endpoints
            .lock()
            .expect("not poisoned")
            .push((transport.clone(), name.to_owned()));
        transport
    }

    /// Declares a queue for raw lapin with the arguments redeliver gives an endpoint queue.
    async fn raw_queue(&self, queue_type: QueueType, name: &str) -> String {
        let queue = format!("{}raw-{name}", self.prefix);
        let mut args = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(s.into());
        let kind = if queue_type == QueueType::Classic {
            "classic"
        } else {
            "quorum"
        };
        args.insert("x-queue-type".into(), text(kind));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            text(&format!("{queue}.dead-letters")),
        );
        if queue_type != QueueType::Classic {
            args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
            args.insert("x-overflow".into(), text("reject-publish"));
        }
        let channel = self.channel().await;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.as_str().into(), durable, args)
            .await
            .expect("the raw queue can be declared");
        let _ = channel.close(200, "declared".into()).await;
        self.raw_queues
            .lock()
            .expect("not poisoned")
            .push(queue.clone());
        queue
    }

    async fn channel(&self) -> Channel {
        self.raw
            .create_channel()
            .await
            .expect("the raw connection opens channels")
    }

    async fn confirm_channel(&self) -> Channel {
        let channel = self.channel().await;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        channel
    }

    fn micros(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Deletes every queue and exchange this run created, and closes the connections.
    async fn clean_up(self) {
        let channel = self.channel().await;
        let mut queues = std::mem::take(&mut *self.raw_queues.lock().expect("not poisoned"));
        let endpoints = std::mem::take(&mut *self.endpoints.lock().expect("not poisoned"));
        for (transport, endpoint) in &endpoints {
            queues.push(transport.queue_name(endpoint));
            queues.push(transport.dead_letter_queue_name(endpoint));
            queues.push(transport.quarantine_queue_name(endpoint));
        }
        let infrastructure = self.quorum.infrastructure();
        queues.extend(infrastructure.queues);
        let exchanges = infrastructure.exchanges;
        for queue in queues {
            if let Err(e) = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                eprintln!("rabbitmq bench: could not delete queue `{queue}`: {e}");
            }
        }
        for exchange in exchanges {
            if let Err(e) = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
            {
                eprintln!("rabbitmq bench: could not delete exchange `{exchange}`: {e}");
            }
        }
        drop(endpoints);
        self.classic.close().await;
        self.quorum.close().await;
        let _ = self.raw.close(200, "bench done".into()).await;
    }
}

fn label(queue_type: QueueType) -> &'static str {
    if queue_type == QueueType::Classic {
        "classic"
    } else {
        "quorum"
    }
}

pub(crate) async fn run(scale: &Scale, report: &mut Report) {
    let url = amqp_url();
    let Some(raw) = connect_or_skip(&url).await else {
        return;
    };
    let sizes = Sizes::new(scale);
    let bench = Bench::new(&url, raw).await;
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        throughput(&bench, &sizes, queue_type, report).await;
    }
    latency(&bench, &sizes, report).await;
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let retry = retry_path(&bench, &sizes, queue_type).await;
        report.add(
            GROUP,
            format!(
                "{}: fail once, then succeed (immediate retry), concurrency {PREFETCH}",
                label(queue_type)
            ),
            retry,
            "msg/s",
        );
    }
    delay_precision(&bench, &sizes, report).await;
    bench.clean_up().await;
}

/// Consume throughput on a classic queue for each way of [`Recording`], taking turns run by
/// run: the medians in the order of [`telemetry::per_mode`], or `None` without a broker.
pub(crate) async fn telemetry_throughput(
    scale: &Scale,
    apply: impl Fn(Recording),
) -> Option<[f64; 3]> {
    let url = amqp_url();
    let raw = connect_or_skip(&url).await?;
    let sizes = Sizes::new(scale);
    let bench = Bench::new(&url, raw).await;
    let endpoint = "telemetry-throughput";
    let transport = bench.endpoint(QueueType::Classic, endpoint).await;
    let rates = telemetry::per_mode(sizes.runs, apply, || async {
        redeliver_publish(&transport, endpoint, sizes.messages).await;
        redeliver_consume(&transport, endpoint, sizes.messages).await
    })
    .await;
    bench.clean_up().await;
    Some(rates)
}

/// Publish then consume the same messages, redeliver and raw lapin alternating run by run.
async fn throughput(bench: &Bench, sizes: &Sizes, queue_type: QueueType, report: &mut Report) {
    let kind = label(queue_type);
    let endpoint = format!("{kind}-throughput");
    let transport = bench.endpoint(queue_type, &endpoint).await;
    let raw_queue = bench.raw_queue(queue_type, &endpoint).await;
    let n = sizes.messages;
    let (mut ours_pub, mut raw_pub, mut ours_con, mut raw_con) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..sizes.runs {
        // Alternate which side goes first, so neither always runs on a warmer broker.
        for ours in [run % 2 == 0, run % 2 == 1] {
            if ours {
                ours_pub.push(redeliver_publish(&transport, &endpoint, n).await);
                ours_con.push(redeliver_consume(&transport, &endpoint, n).await);
            } else {
                raw_pub.push(raw_publish(bench, &raw_queue, n).await);
                raw_con.push(raw_consume(bench, &raw_queue, n).await);
            }
        }
    }
    report.compare(
        GROUP,
        format!("{kind}: publish, confirms, 1 KiB persistent, {IN_FLIGHT} in flight"),
        median_of(ours_pub),
        median_of(raw_pub),
        "msg/s",
    );
    report.compare(
        GROUP,
        format!("{kind}: consume, acks, no-op handler, prefetch {PREFETCH}"),
        median_of(ours_con),
        median_of(raw_con),
        "msg/s",
    );
}

async fn redeliver_publish(transport: &RabbitMqTransport, endpoint: &str, n: usize) -> f64 {
    let body = Bytes::from(payload(1, 0));
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|_| {
            let message = Message::new(body.clone()).with_content_type("application/json");
            transport.send(endpoint, message)
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|sent| async move { sent.expect("the broker confirms every send") })
        .await;
    n as f64 / started.elapsed().as_secs_f64()
}

fn raw_properties(id: usize) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(id.to_string().into())
}

async fn raw_publish(bench: &Bench, queue: &str, n: usize) -> f64 {
    let channel = bench.confirm_channel().await;
    let body = payload(1, 0);
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (channel, body) = (&channel, &body);
            async move {
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        body,
                        raw_properties(i),
                    )
                    .await
                    .expect("lapin publishes");
                let confirmation = confirm.await.expect("the broker confirms");
                assert!(confirmation.is_ack(), "the broker accepts every message");
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|()| async {})
        .await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = channel.close(200, "published".into()).await;
    rate
}

async fn redeliver_consume(transport: &RabbitMqTransport, endpoint: &str, n: usize) -> f64 {
    let transport = Arc::new(transport.clone());
    support::no_op_drain::<Payload>(transport, endpoint, usize::from(PREFETCH), n).await
}

/// Consumes `n` messages with prefetch [`PREFETCH`], decoding each and acknowledging with
/// `multiple` every [`ACK_EVERY`], calling `each` with every payload.
async fn raw_consume_with(
    bench: &Bench,
    queue: &str,
    n: usize,
    mut each: impl FnMut(Payload),
) -> Channel {
    let channel = bench.channel().await;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("prefetch");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("the raw consumer starts");
    let mut seen = 0;
    while seen < n {
        let delivery = consumer
            .next()
            .await
            .expect("the consumer stays open")
            .expect("a delivery");
        each(serde_json::from_slice(&delivery.data).expect("a valid payload"));
        seen += 1;
        if seen % ACK_EVERY == 0 || seen == n {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .expect("the ack is sent");
        }
    }
    channel
}

async fn raw_consume(bench: &Bench, queue: &str, n: usize) -> f64 {
    let started = Instant::now();
    let channel = raw_consume_with(bench, queue, n, |payload| {
        std::hint::black_box(payload.id);
    })
    .await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = channel.close(200, "consumed".into()).await;
    rate
}

/// Sends at a fixed rate while a consumer records send-to-handler times, in milliseconds.
async fn latency(bench: &Bench, sizes: &Sizes, report: &mut Report) {
    let queue_type = QueueType::Quorum;
    let endpoint = "quorum-latency";
    let transport = bench.endpoint(queue_type, endpoint).await;
    let raw_queue = bench.raw_queue(queue_type, endpoint).await;
    let n = (f64::from(sizes.rate) * sizes.latency_for.as_secs_f64()) as usize;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for run in 0..sizes.runs {
        for mine in [run % 2 == 0, run % 2 == 1] {
            if mine {
                ours.push(Lateness::of(
                    redeliver_latency(bench, &transport, endpoint, n, sizes.rate).await,
                ));
            } else {
                raw.push(Lateness::of(
                    raw_latency(bench, &raw_queue, n, sizes.rate).await,
                ));
            }
        }
    }
    let pick = |v: &[Lateness], f: fn(&Lateness) -> f64| median_of(v.iter().map(f).collect());
    let name = format!(
        "quorum: send → handler at {} msg/s, {n} messages, p50",
        sizes.rate
    );
    report.compare(
        GROUP,
        name,
        pick(&ours, |p| p.p50),
        pick(&raw, |p| p.p50),
        "ms",
    );
    report.compare(
        GROUP,
        "quorum: send → handler, p99",
        pick(&ours, |p| p.p99),
        pick(&raw, |p| p.p99),
        "ms",
    );
}

/// When message `i` of a run at `rate` msg/s is due, after `start`.
fn due(start: tokio::time::Instant, i: usize, rate: u32) -> tokio::time::Instant {
    start + Duration::from_secs_f64(i as f64 / f64::from(rate))
}

async fn redeliver_latency(
    bench: &Bench,
    transport: &RabbitMqTransport,
    endpoint: &str,
    n: usize,
    rate: u32,
) -> Vec<f64> {
    let seen = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let countdown = Countdown::new(n);
    let (counter, record, epoch) = (countdown.clone(), Arc::clone(&seen), bench.epoch);
    let worker = Worker::builder(Arc::new(transport.clone()), endpoint)
        .concurrency(usize::from(PREFETCH))
        .start(move |payload: Payload, _: Context| {
            let now = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
            let ms = now.saturating_sub(payload.sent_us) as f64 / 1000.0;
            record.lock().expect("not poisoned").push(ms);
            counter.tick();
            async { Outcome::success() }
        })
        .await
        .expect("the worker starts");
    let start = tokio::time::Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..n {
        tokio::time::sleep_until(due(start, i, rate)).await;
        let message =
            Message::new(payload(i as u64, bench.micros())).with_content_type("application/json");
        let transport = transport.clone();
        let endpoint = endpoint.to_owned();
        sends.spawn(async move { transport.send(&endpoint, message).await });
    }
    while let Some(sent) = sends.join_next().await {
        sent.expect("the send task does not panic")
            .expect("the broker confirms every send");
    }
    countdown.wait().await;
    worker.shutdown().await;
    std::mem::take(&mut *seen.lock().expect("not poisoned"))
}

async fn raw_latency(bench: &Bench, queue: &str, n: usize, rate: u32) -> Vec<f64> {
    let epoch = bench.epoch;
    let consuming = async {
        let mut seen = Vec::with_capacity(n);
        let channel = raw_consume_with(bench, queue, n, |payload| {
            let now = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
            seen.push(now.saturating_sub(payload.sent_us) as f64 / 1000.0);
        })
        .await;
        let _ = channel.close(200, "consumed".into()).await;
        seen
    };
    let publishing = async {
        let channel = bench.confirm_channel().await;
        let start = tokio::time::Instant::now();
        let mut confirms = futures::stream::FuturesUnordered::new();
        for i in 0..n {
            tokio::time::sleep_until(due(start, i, rate)).await;
            let body = payload(i as u64, bench.micros());
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body,
                    raw_properties(i),
                )
                .await
                .expect("lapin publishes");
            confirms.push(confirm);
            // Collect the confirms that came in meanwhile, without waiting for the others.
            while let Some(Some(confirmed)) = futures::FutureExt::now_or_never(confirms.next()) {
                assert!(confirmed.expect("a confirm").is_ack(), "accepted");
            }
        }
        while let Some(confirmed) = confirms.next().await {
            assert!(confirmed.expect("a confirm").is_ack(), "accepted");
        }
        let _ = channel.close(200, "published".into()).await;
    };
    let (seen, ()) = tokio::join!(consuming, publishing);
    seen
}

async fn retry_path(bench: &Bench, sizes: &Sizes, queue_type: QueueType) -> f64 {
    let endpoint = format!("{}-retry", label(queue_type));
    let transport = bench.endpoint(queue_type, &endpoint).await;
    let n = sizes.messages / 2;
    median(sizes.runs, || async {
        redeliver_publish(&transport, &endpoint, n).await;
        let transport = Arc::new(transport.clone());
        fail_once_then_succeed::<Payload>(transport, &endpoint, usize::from(PREFETCH), n).await
    })
    .await
}

/// Lateness (handler time − not-before, ms) of scheduled messages, and the head-of-line case.
async fn delay_precision(bench: &Bench, sizes: &Sizes, report: &mut Report) {
    let endpoint = "quorum-delays";
    let transport = bench.endpoint(QueueType::Quorum, endpoint).await;
    let n = sizes.scheduled;
    let longest = sizes.longest_delay;
    // Notes when each delivery reached the worker: what waiting aside costs in prefetch.
    let arrivals = Arc::new(Arrivals::new(Arc::new(transport.clone())));
    let Lateness {
        p50,
        p99,
        max,
        parked,
    } = support::scheduled_lateness(
        Arc::clone(&arrivals) as Arc<dyn redeliver::Transport>,
        endpoint,
        usize::from(PREFETCH),
        IN_FLIGHT,
        n,
        |i| support::spread(i, Duration::from_secs(1), longest),
    )
    .await;
    report.add(
        GROUP,
        format!(
            "lateness of {n} scheduled messages (1–{:.0} s), p50",
            longest.as_secs_f64()
        ),
        p50,
        "ms",
    );
    report.add(GROUP, "lateness, p99 (target < 50)", p99, "ms");
    report.add(GROUP, "lateness, max", max, "ms");
    let early = arrivals.early();
    report.add(
        GROUP,
        format!(
            "waiting aside (unacked, early), peak at once; prefetch {}",
            2 * PREFETCH
        ),
        early.peak as f64,
        "deliveries",
    );
    report.add(
        GROUP,
        "arrived early (then waited aside)",
        early.count as f64,
        "deliveries",
    );
    report.add(GROUP, "earliest arrival", early.most_ms, "ms early");
    report.add(
        GROUP,
        "parked again (waiting room full)",
        parked as f64,
        "deliveries",
    );

    let long = sizes.longest_delay * 3;
    let hol = support::head_of_line(
        Arc::new(transport.clone()),
        endpoint,
        long,
        Duration::from_secs(1),
    )
    .await;
    report.add(
        GROUP,
        format!(
            "head of line: 1 s delay sent after a {:.0} s one, lateness",
            long.as_secs_f64()
        ),
        hol,
        "ms",
    );
}
