//! Findings from the field, against a real RabbitMQ (`AMQP_URL`, default the local broker): a
//! delivery no client can read, secrets in errors and logs, errors that name their cause, and
//! failure metadata that outgrows the broker's limits.
//!
//! Every log line of this test binary, lapin's included, is captured at TRACE level, so that
//! tests can check what was logged (and that no password ever was).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use redeliver_core::{Context, Error, Message, Outcome, Source, Topology, Transport, Worker};
use redeliver_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use serde::{Deserialize, Serialize};

use common::raw::RawClient;
use common::{Fixture, amqp_url, broker_available, eventually, raw_connection};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Job {
    n: u32,
}

/// Everything logged by this test binary.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            // Plain text, whatever features other crates of the workspace turn on.
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init()
            .expect("the only subscriber of this test binary");
        Mutex::default()
    })
}

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured log lines that contain `needle`.
fn logged(needle: &str) -> Vec<String> {
    String::from_utf8_lossy(&logs().lock().unwrap())
        .lines()
        .filter(|line| line.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The number of messages in `queue`, by a passive declaration.
async fn depth(queue: &str) -> u32 {
    let connection = raw_connection().await;
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let count = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .unwrap_or_else(|e| panic!("queue `{queue}`: {e}"))
        .message_count();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        connection.close(200, "counted".into()),
    )
    .await;
    count
}

/// Waits until `queue` holds a message, failing the test after `within`.
async fn until_not_empty(queue: &str, within: Duration) {
    let started = Instant::now();
    while depth(queue).await == 0 {
        assert!(
            started.elapsed() < within,
            "nothing reached `{queue}` within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A foreign producer stores a message whose content type is not UTF-8, which lapin cannot
/// parse (it ends the whole connection). The endpoint must go on with the messages behind it,
/// and so must the reader of its dead letters; the message ends in the quarantine queue with
/// the broker's reason, and the log says what happened once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_delivery_is_quarantined_and_the_endpoints_go_on() {
    logs();
    let Some(fx) = Fixture::new(|o| o.with_delivery_limit(2)).await else {
        return;
    };
    let transport = fx.transport();
    fx.declare(&Topology::new().endpoint("unreadable")).await;
    let queue = fx.transport.queue_name("unreadable");
    let quarantine = fx.transport.quarantine_queue_name("unreadable");

    let mut raw = RawClient::connect().await;
    raw.publish_with_content_type(&queue, b"application/\xff\xfejson", br#"{"n":0}"#)
        .await;
    raw.close().await;
    // Behind it: one the handler completes, one it dead-letters (to be read behind the poison
    // on the dead letters too).
    for n in [1, 2] {
        transport
            .send("unreadable", Message::json(&Job { n }).unwrap())
            .await
            .unwrap();
    }

    let handled: Arc<Mutex<Vec<u32>>> = Arc::default();
    let dead_handled: Arc<Mutex<Vec<(u32, String)>>> = Arc::default();
    let worker = Worker::builder(Arc::clone(&transport), "unreadable")
        .concurrency(4)
        .start({
            let handled = Arc::clone(&handled);
            move |job: Job, _ctx: Context| {
                let handled = Arc::clone(&handled);
                async move {
                    handled.lock().unwrap().push(job.n);
                    if job.n == 2 {
                        Outcome::dead_letter("rejected by the test")
                    } else {
                        Outcome::success()
                    }
                }
            }
        })
        .await
        .unwrap();
    let dead_worker = Worker::builder(Arc::clone(&transport), Source::dead_letters("unreadable"))
        .concurrency(4)
        .start({
            let dead_handled = Arc::clone(&dead_handled);
            move |job: Job, ctx: Context| {
                let dead_handled = Arc::clone(&dead_handled);
                async move {
                    let reason = ctx
                        .dead_letter()
                        .map(|d| d.reason.clone())
                        .unwrap_or_default();
                    dead_handled.lock().unwrap().push((job.n, reason));
                    Outcome::success()
                }
            }
        })
        .await
        .unwrap();

    eventually(
        Duration::from_secs(30),
        "both good messages handled",
        || {
            let handled = handled.lock().unwrap();
            handled.contains(&1) && handled.contains(&2)
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the dead letter handled behind the poison",
        || !dead_handled.lock().unwrap().is_empty(),
    )
    .await;
    until_not_empty(&quarantine, Duration::from_secs(30)).await;
    assert_eq!(
        dead_handled.lock().unwrap().as_slice(),
        [(2, "rejected by the test".to_owned())]
    );
    assert_eq!(depth(&queue).await, 0, "nothing left on the endpoint");
    assert_eq!(
        depth(&fx.transport.dead_letter_queue_name("unreadable")).await,
        0,
        "nothing left on the dead letters"
    );

    // The quarantined message is the one sent, with the broker's reason and history.
    let mut raw = RawClient::connect().await;
    let kept = raw.get(&quarantine).await.expect("the quarantined message");
    raw.close().await;
    assert_eq!(kept.body, br#"{"n":0}"#);
    let header = String::from_utf8_lossy(&kept.header);
    assert!(header.contains("x-death"), "{header}");
    assert!(header.contains("delivery_limit"), "{header}");
    assert!(header.contains(&queue), "{header}");

    // 30 reconnect delays (6 s with the test options) after the last unreadable delivery, the
    // endpoint takes its full prefetch again, and goes on.
    let resumed = || {
        logged("taking the full prefetch again")
            .into_iter()
            .any(|line| line.contains(&format!("queue={queue} ")))
    };
    eventually(Duration::from_secs(15), "the full prefetch again", resumed).await;
    transport
        .send("unreadable", Message::json(&Job { n: 3 }).unwrap())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "a message after the careful period",
        || handled.lock().unwrap().contains(&3),
    )
    .await;
    worker.shutdown().await;
    dead_worker.shutdown().await;

    // Said once per queue, naming the queue, what lapin said and where it goes.
    for (read, goes_to) in [
        (
            queue.clone(),
            fx.transport.dead_letter_queue_name("unreadable"),
        ),
        (
            fx.transport.dead_letter_queue_name("unreadable"),
            quarantine.clone(),
        ),
    ] {
        let warned: Vec<String> = logged("could not be read")
            .into_iter()
            .filter(|line| line.contains(&format!("queue={read} ")))
            .collect();
        assert_eq!(warned.len(), 1, "{warned:#?}");
        assert!(warned[0].contains("WARN"), "{}", warned[0]);
        assert!(warned[0].contains("failed to parse"), "{}", warned[0]);
        assert!(warned[0].contains(&format!("`{goes_to}`")), "{}", warned[0]);
    }
}

/// Wrong credentials and an unknown virtual host fail at once, as a refusal that names itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_fails_at_once_and_says_so() {
    logs();
    if !broker_available().await {
        return;
    }
    let uri: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
    let host = format!("{}:{}", uri.authority.host, uri.authority.port);
    let user = &uri.authority.userinfo.username;
    let cases = [
        (
            format!("amqp://{user}:wrong-pw-7c1d@{host}/%2f"),
            "ACCESS_REFUSED",
        ),
        (
            format!(
                "amqp://{user}:{}@{host}/no-such-vhost-7c1d",
                uri.authority.userinfo.password
            ),
            "vhost",
        ),
    ];
    for (url, named) in cases {
        let started = Instant::now();
        let e = RabbitMqTransport::connect(RabbitMqOptions::new(url))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::AccessDenied { .. }), "{e:?}");
        assert!(!e.is_transient(), "{e}");
        let text = e.to_string();
        assert!(text.contains(named), "{text}");
        assert!(text.contains("refused access"), "{text}");
        assert!(!text.contains("wrong-pw-7c1d"), "{text}");
        // Default options try 5 times, 2 s apart: a refusal is not tried again.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}

/// A host that accepts TCP and never answers: the start-up fails after the connect timeout,
/// naming the URL and the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_broker_fails_within_the_connect_timeout() {
    logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let started = Instant::now();
    let e = RabbitMqTransport::connect(
        RabbitMqOptions::new(format!("amqp://app:silent-pw-51a9@{addr}/%2f"))
            .with_connect_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    let elapsed = started.elapsed();
    held.abort();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(e.is_transient());
    let text = e.to_string();
    assert!(
        text.contains(&format!("amqp://app:***@{addr}/%2f")),
        "{text}"
    );
    assert!(text.contains("1s"), "{text}");
    assert!(!text.contains("silent-pw-51a9"), "{text}");
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn a_bad_url_parameter_is_named() {
    let e = RabbitMqTransport::connect(RabbitMqOptions::new(
        "amqp://guest:param-pw-0d2e@127.0.0.1:5672/%2f?heartbeat=abc",
    ))
    .await
    .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    assert!(
        text.contains("`heartbeat`") && text.contains("`abc`"),
        "{text}"
    );
    assert!(!text.contains("param-pw-0d2e"), "{text}");
}

/// No Debug, Display, error or log line (lapin's own at TRACE included) shows the URL's
/// password: a wrong password, an unreachable host, a silent host, options and transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_appears_nowhere() {
    logs();
    const SECRET: &str = "hush-3f9a61";
    let uri: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
    let host = format!("{}:{}", uri.authority.host, uri.authority.port);
    let user = uri.authority.userinfo.username.clone();
    let mut shown = Vec::new();

    let options = RabbitMqOptions::new(format!("amqp://{user}:{SECRET}@{host}/%2f"))
        .with_connect_attempts(2, Duration::from_millis(10));
    shown.push(format!("{options:?}"));
    shown.push(format!("{}", options.url()));
    shown.push(format!("{:?}", options.url()));
    if broker_available().await {
        let e = RabbitMqTransport::connect(options.clone())
            .await
            .unwrap_err();
        shown.push(format!("{e} / {e:?}"));
        // A transport that did connect: its password is the broker's, checked below as the
        // URL's `user:password@` form.
        let good = RabbitMqTransport::connect(RabbitMqOptions::new(amqp_url()))
            .await
            .unwrap();
        let debug = format!("{good:?} {:?}", good.options());
        let password = &uri.authority.userinfo.password;
        assert!(!debug.contains(&format!(":{password}@")), "{debug}");
        assert!(debug.contains(":***@"), "{debug}");
        good.close().await;
    }
    let unreachable = RabbitMqOptions::new(format!("amqp://{user}:{SECRET}@127.0.0.1:1/%2f"))
        .with_connect_attempts(2, Duration::from_millis(10));
    let e = RabbitMqTransport::connect(unreachable).await.unwrap_err();
    shown.push(format!("{e} / {e:?}"));
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        shown.push(format!("{s} / {s:?}"));
        source = s.source();
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let silent = RabbitMqOptions::new(format!("amqp://{user}:{SECRET}@{addr}/%2f"))
        .with_connect_timeout(Duration::from_millis(300));
    let e = RabbitMqTransport::connect(silent).await.unwrap_err();
    held.abort();
    shown.push(format!("{e} / {e:?}"));

    for text in &shown {
        assert!(!text.contains(SECRET), "{text}");
    }
    let leaked = logged(SECRET);
    assert!(leaked.is_empty(), "{leaked:#?}");
    // The capture did see these attempts (lapin's trace lines included), so the check above
    // looked at something.
    assert!(!logged("TRACE").is_empty(), "nothing was logged at TRACE");
    assert!(
        !logged("127.0.0.1:1").is_empty(),
        "the unreachable attempt was not logged"
    );
}

/// Queues declared by a version without the default delivery limit are still accepted (an
/// upgrade must not stop at `declare`), with a warning that names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_from_before_the_delivery_limit_are_accepted_with_a_warning() {
    logs();
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    let topology = Topology::new().endpoint("legacy");
    fx.track(&topology);
    let queue = fx.transport.queue_name("legacy");
    let dead = fx.transport.dead_letter_queue_name("legacy");
    let channel = raw_connection().await.create_channel().await.unwrap();
    let text = |s: &str| lapin::types::AMQPValue::LongString(s.into());
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    let dead_args = args.clone();
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(&dead));
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for (name, args) in [(&queue, args), (&dead, dead_args)] {
        channel
            .queue_declare(name.as_str().into(), durable, args)
            .await
            .unwrap();
    }
    fx.transport.declare(&topology).await.expect("accepted");
    for name in [&queue, &dead] {
        let warned = logged(&format!("queue=\"{name}\""));
        assert!(
            warned
                .iter()
                .any(|l| l.contains("WARN") && l.contains("delivery limit")),
            "{warned:#?}"
        );
    }
    // Another difference is still refused.
    let classic = RabbitMqTransport::connect(
        fx.transport
            .options()
            .clone()
            .with_queue_type(redeliver_rabbitmq::QueueType::Classic),
    )
    .await
    .unwrap();
    let e = classic.declare(&topology).await.unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    classic.close().await;
}

fn policy(max_attempts: u32) -> redeliver_core::BackoffPolicy {
    redeliver_core::BackoffPolicy::builder()
        .max_attempts(max_attempts)
        .backoff(redeliver_core::Backoff::fixed(Duration::from_secs(1)))
        .build()
        .expect("a valid policy")
}

/// A handler failing with a 1 MiB reason: the retry copies fit the broker's limits, the
/// attempts advance, and the message ends dead-lettered after the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_failure_reason_retries_and_ends_dead_lettered() {
    logs();
    let Some(fx) = Fixture::new(|o| o).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("verbose")).await;
    let transport = fx.transport();
    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let worker = Worker::builder(Arc::clone(&transport), "verbose")
        .retry_policy(policy(3))
        .start({
            let attempts = Arc::clone(&attempts);
            move |_job: Job, ctx: Context| {
                let attempts = Arc::clone(&attempts);
                async move {
                    attempts.lock().unwrap().push(ctx.attempt());
                    Outcome::retry("e".repeat(1 << 20))
                }
            }
        })
        .await
        .unwrap();
    transport
        .send("verbose", Message::json(&Job { n: 1 }).unwrap())
        .await
        .unwrap();
    let mut dead = transport
        .consume(
            &Source::dead_letters("verbose"),
            redeliver_core::ConsumeOptions::default(),
        )
        .await
        .unwrap();
    let delivery =
        tokio::time::timeout(Duration::from_secs(20), futures::StreamExt::next(&mut dead))
            .await
            .expect("dead-lettered within 20 s")
            .unwrap()
            .unwrap();
    let info = delivery.message().dead_letter().cloned().expect("a reason");
    delivery.complete().await.unwrap();
    let stats = worker.stats();
    worker.shutdown().await;
    assert_eq!(attempts.lock().unwrap().as_slice(), [1, 2, 3]);
    assert_eq!(stats.settle_failures, 0, "{stats:?}");
    assert_eq!(stats.retried, 2, "{stats:?}");
    assert!(
        info.reason.len() <= redeliver_core::wire::MAX_REASON_BYTES,
        "{}",
        info.reason.len()
    );
    assert!(info.reason.starts_with("eee"), "{}", &info.reason[..20]);
}

/// A message whose body is so near the broker's maximum that neither its retry copy nor its
/// dead-letter copy fits: the transport refuses them before publishing, and the broker's own
/// dead-lettering keeps the message, which ends on the dead letters after one handler call
/// instead of coming back at attempt 1 for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_copies_cannot_fit_is_dead_lettered_not_looped() {
    logs();
    const MAX: usize = 64 * 1024;
    let Some(fx) = Fixture::new(|o| o.with_max_message_size(MAX)).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("bulky")).await;
    let transport = fx.transport();
    // Too large to send with this transport's limit once headers are added...
    let body = vec![b' '; MAX - 100];
    let mut padded = br#"{"n":7}"#.to_vec();
    padded.extend_from_slice(&body[padded.len()..]);
    let e = transport
        .send(
            "bulky",
            Message::new(padded.clone()).with_header("pad", "x".repeat(200)),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidMessage { .. }), "{e:?}");
    assert!(e.to_string().contains("with_max_message_size"), "{e}");
    // ...but another producer can store it without any.
    let channel = raw_connection().await.create_channel().await.unwrap();
    channel
        .basic_publish(
            "".into(),
            fx.transport.queue_name("bulky").as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            &padded,
            lapin::BasicProperties::default()
                .with_message_id("bulky-1".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let calls: Arc<Mutex<Vec<u32>>> = Arc::default();
    let worker = Worker::builder(Arc::clone(&transport), "bulky")
        .retry_policy(policy(5))
        .start({
            let calls = Arc::clone(&calls);
            move |_job: Job, ctx: Context| {
                let calls = Arc::clone(&calls);
                async move {
                    calls.lock().unwrap().push(ctx.attempt());
                    Outcome::retry("HTTP 503 from the backend")
                }
            }
        })
        .await
        .unwrap();
    let mut dead = transport
        .consume(
            &Source::dead_letters("bulky"),
            redeliver_core::ConsumeOptions::default(),
        )
        .await
        .unwrap();
    let delivery =
        tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut dead))
            .await
            .expect("dead-lettered within 10 s")
            .unwrap()
            .unwrap();
    let message = delivery.message().clone();
    delivery.complete().await.unwrap();
    let stats = worker.stats();
    worker.shutdown().await;
    assert_eq!(message.id().as_str(), "bulky-1");
    assert_eq!(message.body().as_ref(), padded.as_slice(), "kept whole");
    let info = message.dead_letter().expect("a reason");
    assert!(info.reason.contains("rejected"), "{info:?}");
    assert_eq!(
        calls.lock().unwrap().as_slice(),
        [1],
        "handled once, not looping"
    );
    assert_eq!(stats.settle_failures, 0, "{stats:?}");
    assert_eq!(
        (stats.retried, stats.dead_lettered),
        (0, 1),
        "counted as what happened: {stats:?}"
    );
    let warned = logged("bulky-1");
    assert!(
        warned
            .iter()
            .any(|l| l.contains("the broker refused the copy of a retry")),
        "{warned:#?}"
    );
    assert!(
        warned
            .iter()
            .any(|l| l.contains("dead-letter copy was refused too")),
        "{warned:#?}"
    );
}

/// A message whose headers nearly fill the broker's frame (`frame_max`, 128 KiB by default):
/// the framework's retry headers would overflow it, which made the broker close the
/// connection and deliver the original again at attempt 1 for ever. Now the copies are
/// refused before publishing and the broker dead-letters the original. Its `x-death` headers
/// then push it over the frame size on the dead letters, where no client can read it: the
/// dead letters' delivery limit moves it on to the quarantine, kept whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_headers_outgrow_the_frame_is_dead_lettered_not_looped() {
    logs();
    let Some(fx) = Fixture::new(|o| o.with_delivery_limit(2)).await else {
        return;
    };
    fx.declare(&Topology::new().endpoint("wide")).await;
    let transport = fx.transport();
    let connection = raw_connection().await;
    let frame_max = connection.configuration().frame_max() as usize;
    // Frame (8), class to flags (14), message id (1 + 6), delivery mode (1), headers table
    // (4, then 1 + 3 + 1 + 4 + the value): 60 bytes to spare.
    let pad = frame_max - 8 - 14 - 7 - 1 - 4 - 9 - 60;
    let mut headers = FieldTable::default();
    headers.insert(
        "pad".into(),
        lapin::types::AMQPValue::LongString("p".repeat(pad).into()),
    );
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_publish(
            "".into(),
            fx.transport.queue_name("wide").as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            br#"{"n":8}"#,
            lapin::BasicProperties::default()
                .with_message_id("wide-1".into())
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let calls: Arc<Mutex<Vec<u32>>> = Arc::default();
    let worker = Worker::builder(Arc::clone(&transport), "wide")
        .retry_policy(policy(5))
        .start({
            let calls = Arc::clone(&calls);
            move |_job: Job, ctx: Context| {
                let calls = Arc::clone(&calls);
                async move {
                    calls.lock().unwrap().push(ctx.attempt());
                    Outcome::retry("HTTP 503 from the backend")
                }
            }
        })
        .await
        .unwrap();
    let dead_worker = Worker::builder(Arc::clone(&transport), Source::dead_letters("wide"))
        .start(|_job: Job, _ctx: Context| async { Outcome::success() })
        .await
        .unwrap();
    let quarantine = fx.transport.quarantine_queue_name("wide");
    until_not_empty(&quarantine, Duration::from_secs(20)).await;
    let stats = worker.stats();
    worker.shutdown().await;
    dead_worker.shutdown().await;
    assert_eq!(
        calls.lock().unwrap().as_slice(),
        [1],
        "handled once, not looping"
    );
    assert_eq!(stats.settle_failures, 0, "{stats:?}");
    let mut raw = RawClient::connect().await;
    let kept = raw.get(&quarantine).await.expect("the quarantined message");
    raw.close().await;
    assert_eq!(kept.body, br#"{"n":8}"#);
    let header = String::from_utf8_lossy(&kept.header);
    assert!(header.contains(&"p".repeat(pad)), "the headers kept whole");
    assert!(
        header.contains("wide-1") && header.contains("rejected"),
        "{}",
        &header[..200]
    );
    let warned = logged("wide-1");
    assert!(
        warned.iter().any(|l| l.contains("frame_max")),
        "{warned:#?}"
    );
    let dead = fx.transport.dead_letter_queue_name("wide");
    let unreadable: Vec<String> = logged("could not be read")
        .into_iter()
        .filter(|line| line.contains(&format!("queue={dead} ")))
        .collect();
    assert_eq!(unreadable.len(), 1, "{unreadable:#?}");
}

/// On a classic queue (no delivery limit) an unreadable message comes back for ever: the
/// consumer backs off between reconnections instead of reconnecting at once each time, and
/// the warning says the message must be removed by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_delivery_limit_an_unreadable_delivery_backs_off() {
    logs();
    let Some(fx) =
        Fixture::new(|o| o.with_queue_type(redeliver_rabbitmq::QueueType::Classic)).await
    else {
        return;
    };
    let transport = fx.transport();
    fx.declare(&Topology::new().endpoint("stuck")).await;
    let queue = fx.transport.queue_name("stuck");
    let mut raw = RawClient::connect().await;
    raw.publish_with_content_type(&queue, b"text/\xc3\x28", b"{}")
        .await;
    raw.close().await;
    let worker = Worker::builder(Arc::clone(&transport), "stuck")
        .start(|_job: Job, _ctx: Context| async { Outcome::success() })
        .await
        .unwrap();
    let again = || {
        logged("an unreadable delivery again")
            .into_iter()
            .filter(|line| line.contains(&format!("queue={queue} ")))
            .collect::<Vec<_>>()
    };
    // Test options: reconnect delay 200 ms, doubling up to 1 s.
    eventually(
        Duration::from_secs(15),
        "four returns of the message",
        || again().len() >= 4,
    )
    .await;
    worker.shutdown().await;
    let at: Vec<chrono::DateTime<chrono::Utc>> = again()
        .iter()
        .map(|line| line.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    let gaps: Vec<i64> = at
        .windows(2)
        .map(|w| (w[1] - w[0]).num_milliseconds())
        .collect();
    // 400, 800, 1000 ms of pause plus the time to reconnect: never the 200 ms of a fixed delay.
    assert!(
        gaps[0] >= 390 && gaps[1] >= 790 && gaps[2] >= 990,
        "{gaps:?}"
    );
    let warned: Vec<String> = logged("could not be read")
        .into_iter()
        .filter(|line| line.contains(&format!("queue={queue} ")))
        .collect();
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(warned[0].contains("remove it by hand"), "{}", warned[0]);
}

/// A retry copy that can be routed nowhere (here: the fixed-TTL retry queue was deleted) is
/// refused the same way every time: the message is dead-lettered with reason `copy refused`
/// and a description that says why, after one handler call, instead of coming back for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_retry_copy_dead_letters_the_message_with_the_reason() {
    logs();
    let Some(fx) =
        Fixture::new(|o| o.with_fixed_ttl_retry_queue("-retry", Duration::from_secs(1))).await
    else {
        return;
    };
    fx.declare(&Topology::new().endpoint("routeless")).await;
    let transport = fx.transport();
    let retry_queue = format!("{}-retry", fx.transport.queue_name("routeless"));
    let connection = raw_connection().await;
    connection
        .create_channel()
        .await
        .unwrap()
        .queue_delete(
            retry_queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        connection.close(200, "deleted".into()),
    )
    .await;
    let calls: Arc<Mutex<Vec<u32>>> = Arc::default();
    let worker = Worker::builder(Arc::clone(&transport), "routeless")
        .retry_policy(policy(5))
        .start({
            let calls = Arc::clone(&calls);
            move |_job: Job, ctx: Context| {
                let calls = Arc::clone(&calls);
                async move {
                    calls.lock().unwrap().push(ctx.attempt());
                    Outcome::retry("HTTP 503 from the backend")
                }
            }
        })
        .await
        .unwrap();
    transport
        .send("routeless", Message::json(&Job { n: 4 }).unwrap())
        .await
        .unwrap();
    let mut dead = transport
        .consume(
            &Source::dead_letters("routeless"),
            redeliver_core::ConsumeOptions::default(),
        )
        .await
        .unwrap();
    let delivery =
        tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut dead))
            .await
            .expect("dead-lettered within 10 s")
            .unwrap()
            .unwrap();
    let message = delivery.message().clone();
    delivery.complete().await.unwrap();
    let stats = worker.stats();
    worker.shutdown().await;
    assert_eq!(
        calls.lock().unwrap().as_slice(),
        [1],
        "handled once, not looping"
    );
    assert_eq!(stats.settle_failures, 0, "{stats:?}");
    assert_eq!(
        (stats.retried, stats.dead_lettered),
        (0, 1),
        "counted as what happened: {stats:?}"
    );
    let info = message.dead_letter().expect("a reason");
    assert_eq!(info.reason, redeliver_core::reasons::COPY_REFUSED);
    let description = info.description.as_deref().unwrap();
    assert!(description.contains("could not be routed"), "{description}");
    assert!(description.contains(&retry_queue), "{description}");
    assert_eq!(message.attempt(), 1, "the attempt that failed");
    assert_eq!(message.last_failure(), Some("HTTP 503 from the backend"));
    assert!(
        message.not_before().is_none(),
        "no retry time on the dead letter"
    );
}
