//! Connecting: the connection string is checked before the client sees it, connecting is
//! bounded, and the shared access key never shows in an error, a `Debug` form or a log line.
//!
//! Every log line of this test binary, at TRACE and from every crate (the `log` records of
//! `azservicebus` too), is captured into one buffer, so tests here must not use the key of
//! [`KEY`] except where its absence from the logs is checked.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redeliver_core::{ConsumeOptions, Error, Message, Source, Topology, Transport};
use redeliver_servicebus::{ServiceBusOptions, ServiceBusTransport};
use redeliver_servicebus_testbroker::QueueOptions;

/// A key nobody would write by accident, so that finding it anywhere is a leak.
const KEY: &str = "Zq8LeakCanary0xKEY4711+/AbC=";

fn connection_string(host: &str) -> String {
    format!(
        "Endpoint=sb://{host}/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={KEY}"
    )
}

/// Everything logged by this process, at every level.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&logs);
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&writer)))
            .try_init()
            .expect("the only subscriber of this test binary");
        logs
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn captured() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// The error's `Display` and `Debug` forms and those of every source.
fn every_form(error: &Error) -> String {
    let mut text = format!("{error} | {error:?}");
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        text.push_str(&format!(" | {e} | {e:?}"));
        source = e.source();
    }
    text
}

#[tokio::test]
async fn a_host_that_never_answers_fails_within_the_default_connect_bound_naming_it() {
    logs();
    let (address, listener) = support::silent_listener().await;
    let options = ServiceBusOptions::default().with_unsecured(true);
    assert_eq!(options.connect_timeout, Duration::from_secs(10));
    let started = Instant::now();
    let e = ServiceBusTransport::connect(connection_string(&address.ip().to_string()), options)
        .await
        .unwrap_err();
    let took = started.elapsed();
    listener.abort();
    assert!(
        matches!(&e, Error::Timeout { after, .. } if *after == Duration::from_secs(10)),
        "{e:?}"
    );
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(13),
        "gave up after {took:?}"
    );
    let shown = e.to_string();
    assert!(
        shown.contains(&address.to_string()),
        "names the host: {shown}"
    );
    assert!(!every_form(&e).contains(KEY), "{e:?}");
}

#[tokio::test]
async fn connection_string_mistakes_are_configuration_errors_that_say_what_is_wrong() {
    logs();
    let broker = support::broker().await;
    let ip = broker.address().ip().to_string();
    let options = support::options;
    let config = |e: Error| match e {
        Error::Config { field, reason, .. } => {
            assert_eq!(field, "connection_string");
            assert!(!reason.contains(KEY), "{reason}");
            reason
        }
        other => panic!("expected a configuration error, got {other:?}"),
    };

    let missing_key = format!("Endpoint=sb://{ip}/;SharedAccessKeyName=RootManageSharedAccessKey");
    let e = ServiceBusTransport::connect(missing_key, options())
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "{e:?}");
    let reason = config(e);
    assert!(reason.contains("`SharedAccessKey`"), "{reason}");

    // The broker listens on port 5672 of that address: the client would silently reach it,
    // ignoring the port the string names.
    let other_port = format!(
        "Endpoint=sb://{ip}:5999/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={KEY}"
    );
    let reason = config(
        ServiceBusTransport::connect(other_port, options())
            .await
            .unwrap_err(),
    );
    assert!(
        reason.contains("port 5999") && reason.contains("5672"),
        "{reason}"
    );

    let reason = config(
        ServiceBusTransport::connect(format!("amqp://guest:{KEY}@{ip}:5672"), options())
            .await
            .unwrap_err(),
    );
    assert!(reason.contains("connection string"), "{reason}");
    assert!(
        reason.contains("Endpoint=sb://"),
        "shows the form: {reason}"
    );

    // The emulator's form needs no key and is plain AMQP whatever the options say.
    let emulator = ServiceBusTransport::connect(
        format!("Endpoint=sb://{ip};UseDevelopmentEmulator=true;"),
        ServiceBusOptions::default(),
    )
    .await
    .expect("an emulator connection string without a key connects");
    broker
        .create_queue("q", QueueOptions::default())
        .expect("queue created");
    emulator.send("q", Message::new("x")).await.unwrap();
    assert_eq!(broker.active_message_count("q").unwrap(), 1);
    emulator.close().await;

    // The broker's own string still works.
    ServiceBusTransport::connect(broker.connection_string(), options())
        .await
        .expect("a complete connection string connects");
}

#[tokio::test]
async fn the_shared_access_key_shows_nowhere() {
    logs();
    // Refused: a loopback address where nothing listens on port 5672.
    let refusing = support::free_loopback_listener().await;
    let refusing_ip = refusing.local_addr().unwrap().ip().to_string();
    drop(refusing);
    let e = ServiceBusTransport::connect(connection_string(&refusing_ip), support::options())
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    assert!(!every_form(&e).contains(KEY), "{e:?}");

    // Never answering, with a short bound.
    let (silent, listener) = support::silent_listener().await;
    let e = ServiceBusTransport::connect(
        connection_string(&silent.ip().to_string()),
        support::options().with_connect_timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap_err();
    listener.abort();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(!every_form(&e).contains(KEY), "{e:?}");

    // A mistake next to the key.
    for mistaken in [
        format!("Endpoint=sb://{refusing_ip}:5999/;SharedAccessKeyName=n;SharedAccessKey={KEY}"),
        format!("SharedAccessKey={KEY}"),
        format!("Endpoint=sb://{refusing_ip}/;SharedAccessKey={KEY}"),
        format!("Endpoint=sb://{refusing_ip}/;SharedAccessKey={KEY};Endpoint"),
    ] {
        let e = ServiceBusTransport::connect(mistaken, support::options())
            .await
            .unwrap_err();
        assert!(!every_form(&e).contains(KEY), "{e:?}");
    }

    // A working transport on the test broker, used for everything once.
    let broker = support::broker().await;
    broker
        .create_queue("q", QueueOptions::default())
        .expect("queue created");
    let transport = ServiceBusTransport::connect(
        connection_string(&broker.address().ip().to_string()),
        support::options(),
    )
    .await
    .expect("the test broker takes any key");
    transport
        .declare(&Topology::new().endpoint("q"))
        .await
        .unwrap();
    let mut stream = transport
        .consume(&Source::endpoint("q"), ConsumeOptions::default())
        .await
        .unwrap();
    transport.send("q", Message::new("x")).await.unwrap();
    let delivery = tokio::time::timeout(support::PROMPT, futures::StreamExt::next(&mut stream))
        .await
        .expect("a delivery in time")
        .expect("the stream is open")
        .expect("no consumer error");
    delivery
        .retry(chrono::Utc::now(), "failed", Duration::ZERO)
        .await
        .unwrap();
    let again = tokio::time::timeout(support::PROMPT, futures::StreamExt::next(&mut stream))
        .await
        .expect("the retry in time")
        .expect("the stream is open")
        .expect("no consumer error");
    again.complete().await.unwrap();
    let e = transport
        .send("missing", Message::new("x"))
        .await
        .unwrap_err();
    assert!(!every_form(&e).contains(KEY), "{e:?}");

    let shown = format!("{transport:?} {:?}", transport.options());
    assert!(!shown.contains(KEY), "{shown}");
    assert!(
        shown.contains("SharedAccessKey=***"),
        "the connection string is shown redacted: {shown}"
    );
    drop(stream);
    transport.close().await;

    let logs = captured();
    assert!(
        logs.contains("connecting to Service Bus") && logs.contains("SharedAccessKey=***"),
        "the connection is logged, redacted (and the capture works)"
    );
    assert!(!logs.contains(KEY), "the key is in the logs");
}
