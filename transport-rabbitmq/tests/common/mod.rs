//! Shared by the broker tests: reaching the broker (or skipping loudly), unique names per test,
//! clean-up, and a TCP proxy that can cut connections.

#![allow(dead_code, unreachable_pub)]

pub mod raw;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use redeliver_core::{Topology, Transport};
use redeliver_rabbitmq::{DelayMode, RabbitMqOptions, RabbitMqTransport};

/// The broker the tests use: `AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| redeliver_rabbitmq::DEFAULT_URL.to_owned())
}

/// Whether the broker can be reached. When it cannot, says so on stderr and returns `false` so
/// the test skips — unless `REDELIVER_REQUIRE_BROKERS=1` (CI), where it panics instead.
pub async fn broker_available() -> bool {
    let url = amqp_url();
    let attempt = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await;
    let why = match attempt {
        Ok(Ok(connection)) => {
            close_or_give_up(&connection, "probe").await;
            return true;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 5 s".to_owned(),
    };
    let shown = RabbitMqOptions::new(url).redacted_url();
    if std::env::var("REDELIVER_REQUIRE_BROKERS").as_deref() == Ok("1") {
        panic!(
            "RabbitMQ is required (REDELIVER_REQUIRE_BROKERS=1) but unreachable at {shown}: {why}"
        );
    }
    // Written to the stderr handle rather than with `eprintln!`, which the test harness
    // captures: a skipped test must be seen even when it "passes".
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: RabbitMQ is unreachable at {shown} ({why}); this broker test did not run. \
         Set AMQP_URL, or REDELIVER_REQUIRE_BROKERS=1 to make this a failure."
    );
    false
}

/// Ends the test process with a clear message if a test runs longer than any of them should: a
/// hung broker test must fail CI, not stall it.
struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

impl Watchdog {
    const LIMIT: Duration = Duration::from_secs(120);

    fn start(name: String) -> Self {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(Self::LIMIT)
            {
                let _ = writeln!(
                    std::io::stderr(),
                    "broker test `{name}` still running after {:?}: aborting the test run",
                    Self::LIMIT
                );
                std::process::exit(2);
            }
        });
        Watchdog(Some(done))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            let _ = done.send(());
        }
    }
}

/// A transport with a unique prefix, whose queues and exchanges are deleted when it is dropped.
pub struct Fixture {
    pub transport: RabbitMqTransport,
    pub prefix: String,
    _watchdog: Watchdog,
    endpoints: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
    queues: Mutex<Vec<String>>,
}

/// Test options: a unique prefix, 6 delay levels (up to 63 s), quick reconnection.
pub fn test_options(url: String) -> RabbitMqOptions {
    let prefix = format!("rt-{:08x}.", fastrand::u32(..));
    RabbitMqOptions::new(url)
        .with_prefix(prefix)
        .with_delay_levels(6)
        .with_reconnect_delay(Duration::from_millis(200), Duration::from_secs(1))
        .with_operation_timeout(Duration::from_secs(10))
}

impl Fixture {
    /// `None` (after saying why) when the broker is unreachable.
    pub async fn new(configure: impl FnOnce(RabbitMqOptions) -> RabbitMqOptions) -> Option<Self> {
        if !broker_available().await {
            return None;
        }
        let options = configure(test_options(amqp_url()));
        Some(Self::with_options(options).await)
    }

    pub async fn with_options(options: RabbitMqOptions) -> Self {
        let prefix = options.prefix().to_owned();
        let transport = RabbitMqTransport::connect(options)
            .await
            .expect("connect to the test broker");
        let test = std::thread::current()
            .name()
            .unwrap_or("a broker test")
            .to_owned();
        Fixture {
            transport,
            _watchdog: Watchdog::start(test),
            prefix,
            endpoints: Mutex::default(),
            exchanges: Mutex::default(),
            queues: Mutex::default(),
        }
    }

    pub fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(self.transport.clone())
    }

    /// Declares `topology`, remembering its names for the clean-up.
    pub async fn declare(&self, topology: &Topology) {
        self.track(topology);
        self.transport
            .declare(topology)
            .await
            .expect("declare the test topology");
    }

    pub fn track(&self, topology: &Topology) {
        self.endpoints
            .lock()
            .unwrap()
            .extend(topology.endpoints().map(str::to_owned));
        self.exchanges.lock().unwrap().extend(
            topology
                .topics()
                .map(|(topic, _)| self.transport.topic_exchange_name(topic)),
        );
    }

    pub fn track_queue(&self, queue: impl Into<String>) {
        self.queues.lock().unwrap().push(queue.into());
    }

    fn names(&self) -> (Vec<String>, Vec<String>) {
        let redeliver_rabbitmq::Infrastructure {
            mut queues,
            mut exchanges,
            ..
        } = self.transport.infrastructure();
        let retry_suffix = match self.transport.options().delay_mode() {
            DelayMode::FixedTtlRetryQueue { suffix, .. } => Some(suffix.clone()),
            _ => None,
        };
        for endpoint in self.endpoints.lock().unwrap().iter() {
            queues.push(self.transport.quarantine_queue_name(endpoint));
            for q in [
                self.transport.queue_name(endpoint),
                self.transport.dead_letter_queue_name(endpoint),
            ] {
                if let Some(suffix) = &retry_suffix {
                    queues.push(format!("{q}{suffix}"));
                }
                queues.push(q);
            }
        }
        queues.extend(self.queues.lock().unwrap().iter().cloned());
        exchanges.extend(self.exchanges.lock().unwrap().iter().cloned());
        (queues, exchanges)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let (queues, exchanges) = self.names();
        // Deleting needs async calls; do it on a thread with its own runtime so that it also runs
        // when the test panicked.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the clean-up");
            runtime.block_on(delete(queues, exchanges));
        });
        let _ = done.join();
    }
}

/// How long one step of the tests' own broker calls (connecting, deleting) may take.
const STEP_LIMIT: Duration = Duration::from_secs(20);

/// Awaits one of the tests' own broker calls for at most [`STEP_LIMIT`].
///
/// # Panics
/// If it takes longer, naming the step: a hung clean-up must fail the test, not stall it.
pub async fn bounded<T>(step: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP_LIMIT, future)
        .await
        .unwrap_or_else(|_| panic!("{step} did not finish within {STEP_LIMIT:?}"))
}

/// Deletes queues and exchanges, ignoring the ones that do not exist.
///
/// # Panics
/// If a step does not finish within [`STEP_LIMIT`].
pub async fn delete(queues: Vec<String>, exchanges: Vec<String>) {
    let url = amqp_url();
    let connect = Connection::connect(&url, ConnectionProperties::default());
    let Ok(connection) = bounded("clean-up: connecting to the broker", connect).await else {
        return;
    };
    for queue in queues {
        // A failed delete closes the channel: one channel per deletion.
        let step = format!("clean-up: deleting queue `{queue}`");
        bounded(&step, async {
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        })
        .await;
    }
    for exchange in exchanges {
        let step = format!("clean-up: deleting exchange `{exchange}`");
        bounded(&step, async {
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        })
        .await;
    }
    close_or_give_up(&connection, "cleaned up").await;
}

/// How long closing one of the tests' own connections may take.
const CLOSE_LIMIT: Duration = Duration::from_secs(10);

/// Closes one of the tests' own connections, giving up on it (saying so on stderr) after
/// [`CLOSE_LIMIT`], as the transport does: lapin's `Connection::close` has been seen to miss the
/// broker's answer and wait forever, and the connection's work is done by then.
async fn close_or_give_up(connection: &Connection, reason: &str) {
    let close = connection.close(200, reason.into());
    if tokio::time::timeout(CLOSE_LIMIT, close).await.is_err() {
        let _ = writeln!(
            std::io::stderr(),
            "closing a test connection ({reason}) did not finish within {CLOSE_LIMIT:?}; gave up on it"
        );
    }
}

/// A raw AMQP connection for tests that need to do what the transport would not.
pub async fn raw_connection() -> Connection {
    let url = amqp_url();
    let connect = Connection::connect(&url, ConnectionProperties::default());
    bounded("opening a raw connection to the test broker", connect)
        .await
        .expect("raw connection to the test broker")
}

/// The shared TCP proxy ([`redeliver_conformance::proxy::Proxy`]) in front of the test broker.
pub struct Proxy {
    pub addr: SocketAddr,
    inner: redeliver_conformance::proxy::Proxy,
}

impl Proxy {
    pub async fn start() -> Proxy {
        Proxy::to(broker_addr()).await
    }

    /// A proxy in front of `upstream` (a node of a cluster, say).
    pub async fn to(upstream: SocketAddr) -> Proxy {
        let inner = redeliver_conformance::proxy::Proxy::start(upstream)
            .await
            .expect("bind the proxy");
        Proxy {
            addr: inner.addr(),
            inner,
        }
    }

    /// The broker URL, through the proxy.
    pub fn url(&self) -> String {
        let uri: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL parses");
        let vhost = uri.vhost.replace('/', "%2f");
        format!(
            "amqp://{}:{}@{}/{vhost}",
            uri.authority.userinfo.username, uri.authority.userinfo.password, self.addr
        )
    }
}

impl std::ops::Deref for Proxy {
    type Target = redeliver_conformance::proxy::Proxy;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

pub fn broker_addr() -> SocketAddr {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL parses");
    let host = if uri.authority.host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        uri.authority.host
    };
    format!("{host}:{}", uri.authority.port)
        .parse()
        .expect("the tests' broker address is an IP address and port")
}

/// Waits for `condition` to hold, checking every 50 ms, failing the test after `within`.
pub async fn eventually(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
