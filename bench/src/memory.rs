//! The in-memory transport and the worker, next to a raw `tokio::sync::mpsc` hand-off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::TimeDelta;
use redeliver::memory::MemoryTransport;
use redeliver::{Consumer, Context, Host, Message, Outcome, Transport, Worker};
use tokio::sync::watch;

use crate::report::Report;
use crate::support;
use crate::support::{Countdown, Lateness, Payload, fail_once_then_succeed, payload, spread};
use crate::{Scale, median, peak_since_reset, reset_peak};

const GROUP: &str = "memory";

pub(crate) async fn run(scale: &Scale, report: &mut Report) {
    let body = payload();
    let raw = median(scale.runs, || mpsc_hand_off(scale.messages, body.clone())).await;
    let mut bare = 0.0;
    for concurrency in [1, 16] {
        let ours = median(scale.runs, || {
            worker_throughput(scale.messages, concurrency, body.clone())
        })
        .await;
        report.compare(
            GROUP,
            format!("no-op handler, 1 KiB JSON, concurrency {concurrency} (raw: mpsc + decode)"),
            ours,
            raw,
            "msg/s",
        );
        bare = ours;
    }
    let hosted = median(scale.runs, || {
        host_throughput(scale.messages, 16, body.clone())
    })
    .await;
    report.compare(
        GROUP,
        "the same through the host, concurrency 16 (raw: the bare worker above)",
        hosted,
        bare,
        "msg/s",
    );
    let retry = median(scale.runs, || retry_path(scale.messages, body.clone())).await;
    report.add(
        GROUP,
        "fail once, then succeed (immediate retry), concurrency 16",
        retry,
        "msg/s",
    );

    let lateness = delay_precision(scale.scheduled, scale.longest_delay).await;
    report.add(
        GROUP,
        format!("lateness of {} scheduled messages, p50", scale.scheduled),
        lateness.p50,
        "ms",
    );
    report.add(GROUP, "lateness, p99", lateness.p99, "ms");
    report.add(GROUP, "lateness, max", lateness.max, "ms");
    let hol = head_of_line(scale.longest_delay * 3, scale.longest_delay / 10).await;
    report.add(
        GROUP,
        "head of line: short delay after a long one, lateness",
        hol,
        "ms",
    );

    let held = held_footprint(scale.held, body.clone()).await;
    report.add(
        GROUP,
        format!("{} scheduled 1 KiB messages held, peak", scale.held),
        held as f64 / (1024.0 * 1024.0),
        "MiB",
    );
    report.add(
        GROUP,
        "  per message",
        held as f64 / scale.held as f64,
        "bytes",
    );
    let in_flight = in_flight_footprint(scale.in_flight, body).await;
    report.add(
        GROUP,
        format!("worker with {} messages in flight, peak", scale.in_flight),
        in_flight as f64 / (1024.0 * 1024.0),
        "MiB",
    );
}

async fn fill(transport: &MemoryTransport, messages: usize, body: &Bytes) {
    for _ in 0..messages {
        // Each message gets its own copy of the payload, as messages from a producer would.
        let message =
            Message::new(Bytes::copy_from_slice(body)).with_content_type("application/json");
        transport
            .send("bench", message)
            .await
            .expect("memory sends do not fail");
    }
}

/// [`worker_throughput`] with the bench's payload (for the telemetry group).
pub(crate) async fn no_op_throughput(messages: usize, concurrency: usize) -> f64 {
    worker_throughput(messages, concurrency, payload()).await
}

async fn worker_throughput(messages: usize, concurrency: usize, body: Bytes) -> f64 {
    let memory = MemoryTransport::new();
    fill(&memory, messages, &body).await;
    support::no_op_drain::<Payload>(Arc::new(memory), "bench", concurrency, messages).await
}

/// The same drain as [`worker_throughput`], with the worker started by a [`Host`].
async fn host_throughput(messages: usize, concurrency: usize, body: Bytes) -> f64 {
    let memory = MemoryTransport::new();
    fill(&memory, messages, &body).await;
    let countdown = Countdown::new(messages);
    let counter = countdown.clone();
    let started = Instant::now();
    let host = Host::builder(Arc::new(memory))
        .consumer(
            Consumer::endpoint("bench")
                .concurrency(concurrency)
                .handler(move |_: Payload, _: Context| {
                    counter.tick();
                    async { Outcome::success() }
                }),
        )
        .start()
        .await
        .expect("the host starts");
    countdown.wait().await;
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    host.shutdown().await;
    rate
}

/// The same payloads handed over a `tokio::sync::mpsc` channel and decoded, one consumer.
async fn mpsc_hand_off(messages: usize, body: Bytes) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..messages {
        tx.send(Bytes::copy_from_slice(&body))
            .expect("the receiver is alive");
    }
    drop(tx);
    let started = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(bytes) = rx.recv().await {
            let payload: Payload = serde_json::from_slice(&bytes).expect("valid JSON");
            n += usize::from(payload.is_valid());
        }
        n
    });
    let handled = consumer.await.expect("the consumer does not panic");
    assert_eq!(handled, messages);
    messages as f64 / started.elapsed().as_secs_f64()
}

async fn retry_path(messages: usize, body: Bytes) -> f64 {
    let memory = MemoryTransport::new();
    fill(&memory, messages, &body).await;
    fail_once_then_succeed::<Payload>(Arc::new(memory), "bench", 16, messages).await
}

/// Messages scheduled at random instants up to `longest` ahead; how late each reaches its
/// handler, in milliseconds.
async fn delay_precision(messages: usize, longest: Duration) -> Lateness {
    let transport = Arc::new(MemoryTransport::new());
    support::scheduled_lateness(transport, "bench", 16, 1, messages, |i| {
        spread(i, longest / 10, longest)
    })
    .await
}

/// A message due after `long` is sent first, one due after `short` second: how late the
/// short one is.
async fn head_of_line(long: Duration, short: Duration) -> f64 {
    support::head_of_line(Arc::new(MemoryTransport::new()), "bench", long, short).await
}

async fn held_footprint(messages: usize, body: Bytes) -> usize {
    let baseline = reset_peak();
    let memory = MemoryTransport::new();
    let at = memory.clock().now() + TimeDelta::hours(1);
    for _ in 0..messages {
        let message = Message::new(Bytes::copy_from_slice(&body)).with_not_before(at);
        memory.send("bench", message).await.expect("sent");
    }
    let peak = peak_since_reset(baseline);
    drop(memory);
    peak
}

async fn in_flight_footprint(in_flight: usize, body: Bytes) -> usize {
    let baseline = reset_peak();
    let memory = MemoryTransport::new();
    fill(&memory, in_flight, &body).await;
    let all_in = Countdown::new(in_flight);
    // A flag rather than a notification: a handler that looks after the release still sees it.
    let (release, released) = watch::channel(false);
    let counter = all_in.clone();
    let worker = Worker::builder(Arc::new(memory), "bench")
        .concurrency(in_flight)
        .start(move |_: Payload, _: Context| {
            counter.tick();
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|go| *go).await;
                Outcome::success()
            }
        })
        .await
        .expect("the worker starts");
    all_in.wait().await;
    let peak = peak_since_reset(baseline);
    release.send_replace(true);
    worker.shutdown().await;
    peak
}
