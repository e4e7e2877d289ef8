//! What the groups share: counting handler calls, bounding waits, delays and percentiles.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::TimeDelta;
use futures::StreamExt;
use redeliver::{Backoff, BackoffPolicy, Context, Jitter, Message, Outcome, Transport, Worker};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

/// The payload of the in-memory and Service Bus runs: about 1 KiB of JSON, decoded by every
/// handler (the RabbitMQ group's payload also carries its sending time).
#[derive(Serialize, Deserialize)]
pub(crate) struct Payload {
    id: u64,
    data: String,
}

impl Payload {
    /// Whether the payload decoded to what [`payload`] encodes (keeps the decoding honest).
    pub(crate) fn is_valid(&self) -> bool {
        self.id > 0
    }
}

/// The encoded [`Payload`].
pub(crate) fn payload() -> Bytes {
    let data = "x".repeat(1000);
    Bytes::from(serde_json::to_vec(&Payload { id: 1, data }).expect("serializes"))
}

/// The longest a single run may take: a stuck run fails the bench instead of hanging it.
pub(crate) const PATIENCE: Duration = Duration::from_secs(180);

/// Waits for `future`, at most [`PATIENCE`].
pub(crate) async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("a benchmark run took longer than {PATIENCE:?}"))
}

/// Counts handler calls and wakes the bench when `target` is reached.
#[derive(Clone)]
pub(crate) struct Countdown {
    seen: Arc<AtomicUsize>,
    target: usize,
    done: Arc<Notify>,
}

impl Countdown {
    pub(crate) fn new(target: usize) -> Self {
        Countdown {
            seen: Arc::default(),
            target,
            done: Arc::new(Notify::new()),
        }
    }

    pub(crate) fn tick(&self) {
        if self.seen.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            // `notify_one` keeps the wake-up if nobody waits yet.
            self.done.notify_one();
        }
    }

    /// Waits until `target` calls were counted, at most [`PATIENCE`].
    pub(crate) async fn wait(&self) {
        within(self.done.notified()).await;
    }
}

/// The median of `values`.
pub(crate) fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// How late scheduled messages reached their handler, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lateness {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    /// Deliveries the worker parked again (arrived early beyond what it could wait for).
    pub(crate) parked: u64,
}

impl Lateness {
    /// The percentiles of `late` (at least one value).
    pub(crate) fn of(mut late: Vec<f64>) -> Self {
        late.sort_by(f64::total_cmp);
        let at = |q: f64| late[((late.len() - 1) as f64 * q).round() as usize];
        Lateness {
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
            parked: 0,
        }
    }
}

/// The delay of the `i`-th scheduled message: spread between `shortest` and `longest`, with a
/// millisecond part, deterministic per `i` so that every run schedules the same mix.
pub(crate) fn spread(i: usize, shortest: Duration, longest: Duration) -> Duration {
    let low = u64::try_from(shortest.as_millis()).unwrap_or(u64::MAX);
    let span = u64::try_from(longest.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_sub(low)
        .max(1);
    Duration::from_millis(low + (i as u64).wrapping_mul(7_919) % span)
}

/// Messages/s through a worker with a no-op handler, of `concurrency`, draining `endpoint` of
/// `transport`, which already holds `messages` messages (decoded as `T`).
pub(crate) async fn no_op_drain<T>(
    transport: Arc<dyn Transport>,
    endpoint: &str,
    concurrency: usize,
    messages: usize,
) -> f64
where
    T: DeserializeOwned + Send + 'static,
{
    let countdown = Countdown::new(messages);
    let counter = countdown.clone();
    let started = Instant::now();
    let worker = Worker::builder(transport, endpoint)
        .concurrency(concurrency)
        .start(move |_: T, _: Context| {
            counter.tick();
            async { Outcome::success() }
        })
        .await
        .expect("the worker starts");
    countdown.wait().await;
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    worker.shutdown().await;
    rate
}

/// Messages/s through a worker on `endpoint` of `transport` (already holding `messages`
/// messages) whose handler fails every message's first attempt and succeeds on the second,
/// retried at once.
pub(crate) async fn fail_once_then_succeed<T>(
    transport: Arc<dyn Transport>,
    endpoint: &str,
    concurrency: usize,
    messages: usize,
) -> f64
where
    T: DeserializeOwned + Send + 'static,
{
    let countdown = Countdown::new(messages);
    let counter = countdown.clone();
    let immediate = BackoffPolicy::builder()
        .max_attempts(2)
        .backoff(Backoff::immediate())
        .jitter(Jitter::None)
        .build()
        .expect("a valid policy");
    let started = Instant::now();
    let worker = Worker::builder(transport, endpoint)
        .concurrency(concurrency)
        .retry_policy(immediate)
        .start(move |_: T, ctx: Context| {
            let outcome = if ctx.attempt() == 1 {
                Outcome::retry("first try fails")
            } else {
                counter.tick();
                Outcome::success()
            };
            async move { outcome }
        })
        .await
        .expect("the worker starts");
    countdown.wait().await;
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    worker.shutdown().await;
    rate
}

/// Head of line: a message due after `long` is sent to `endpoint`, then one due after `short`.
/// Returns how late the short one reaches its handler, in milliseconds: a transport that keeps
/// scheduled messages in one line would hand it over only after the long one.
pub(crate) async fn head_of_line(
    transport: Arc<dyn Transport>,
    endpoint: &str,
    long: Duration,
    short: Duration,
) -> f64 {
    const SHORT: u8 = 1;
    let clock = transport.clock();
    let handler_clock = clock.clone();
    let (tx, mut rx) = watch::channel(None);
    let worker = Worker::builder(Arc::clone(&transport), endpoint)
        .start(move |which: u8, ctx: Context| {
            if which == SHORT {
                let lateness = handler_clock.now() - ctx.not_before().expect("scheduled");
                tx.send_replace(Some(lateness.as_seconds_f64() * 1000.0));
            }
            async { Outcome::success() }
        })
        .await
        .expect("the worker starts");
    for (which, delay) in [(0u8, long), (SHORT, short)] {
        let at = clock.now() + TimeDelta::from_std(delay).expect("a short delay");
        let message = Message::json(&which).expect("json").with_not_before(at);
        transport.send(endpoint, message).await.expect("sent");
    }
    let lateness = *within(rx.wait_for(Option::is_some))
        .await
        .expect("the worker is alive");
    worker.shutdown().await;
    lateness.expect("set")
}

/// Sends `messages` messages to `endpoint`, the `i`-th due `delay(i)` after its sending (up to
/// `in_flight` sends at once), and returns how late a worker of `concurrency` handled them
/// after their not-before, by the transport's clock.
pub(crate) async fn scheduled_lateness(
    transport: Arc<dyn Transport>,
    endpoint: &str,
    concurrency: usize,
    in_flight: usize,
    messages: usize,
    delay: impl Fn(usize) -> Duration,
) -> Lateness {
    let clock = transport.clock();
    let late = Arc::new(Mutex::new(Vec::with_capacity(messages)));
    let countdown = Countdown::new(messages);
    let (counter, record, handler_clock) = (countdown.clone(), Arc::clone(&late), clock.clone());
    let worker = Worker::builder(Arc::clone(&transport), endpoint)
        .concurrency(concurrency)
        .start(move |_: u64, ctx: Context| {
            let lateness =
                handler_clock.now() - ctx.not_before().expect("every message is scheduled");
            record
                .lock()
                .expect("not poisoned")
                .push(lateness.as_seconds_f64() * 1000.0);
            counter.tick();
            async { Outcome::success() }
        })
        .await
        .expect("the worker starts");
    futures::stream::iter(0..messages)
        .map(|i| {
            // The delay counts from the sending, so a slow sender does not make it late.
            let at = clock.now() + TimeDelta::from_std(delay(i)).expect("a short delay");
            let message = Message::json(&(i as u64))
                .expect("json")
                .with_not_before(at);
            let transport = Arc::clone(&transport);
            async move { transport.send(endpoint, message).await }
        })
        .buffer_unordered(in_flight)
        .for_each(|sent| async move { sent.expect("scheduled") })
        .await;
    countdown.wait().await;
    let stats = worker.shutdown().await;
    Lateness {
        parked: stats.parked,
        ..Lateness::of(std::mem::take(&mut *late.lock().expect("not poisoned")))
    }
}
