//! The two brokers a run can be against, and what differs between them: how processes
//! connect, what stands for "a broker node restarts", and what the broker can be asked about
//! the messages it still holds.
//!
//! - **RabbitMQ**: the local 3-node cluster of `cluster.sh` (nodes 5801-5803); the restart
//!   stops node 1 and starts it again, its quorum queues keep their messages on the other two.
//! - **Service Bus**: the project's test broker (`servicebus-test-broker`), run as a process
//!   of its own on a loopback address's port 5672 (the port `azservicebus` always dials). The
//!   test broker keeps messages in memory only: its restart (`SIGTERM`, then the program again
//!   with the same entities) **loses every message it held**. The driver counts those apart
//!   from messages lost by redeliver (see `driver::RestartLoss`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use redeliver_conformance::proxy::Proxy;
use redeliver_core::Transport;
use redeliver_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use redeliver_servicebus::{ServiceBusOptions, ServiceBusTransport};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The environment variable a worker process reads its broker address from (a connection
/// string holds a key: it is kept off the command line and out of every log).
pub(crate) const URL_VARIABLE: &str = "RDLV_CHAOS_URL";

/// The port `azservicebus` dials whatever the connection string says.
const SERVICE_BUS_PORT: u16 = 5672;

/// Which transport a process uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    RabbitMq,
    ServiceBus,
}

impl Kind {
    pub(crate) fn to_arg(self) -> &'static str {
        match self {
            Kind::RabbitMq => "rabbitmq",
            Kind::ServiceBus => "servicebus",
        }
    }

    pub(crate) fn from_arg(arg: &str) -> Result<Kind, String> {
        match arg {
            "rabbitmq" => Ok(Kind::RabbitMq),
            "servicebus" => Ok(Kind::ServiceBus),
            _ => Err(format!("`{arg}`: rabbitmq or servicebus expected")),
        }
    }
}

/// A transport of either kind, kept concrete so that it can be closed.
pub(crate) enum Connected {
    RabbitMq(RabbitMqTransport),
    ServiceBus(ServiceBusTransport),
}

impl Connected {
    pub(crate) fn shared(&self) -> Arc<dyn Transport> {
        match self {
            Connected::RabbitMq(t) => Arc::new(t.clone()),
            Connected::ServiceBus(t) => Arc::new(t.clone()),
        }
    }

    pub(crate) async fn close(&self) {
        match self {
            Connected::RabbitMq(t) => t.close().await,
            Connected::ServiceBus(t) => t.close().await,
        }
    }
}

/// How a process of the run connects.
pub(crate) struct Connection<'a> {
    pub(crate) kind: Kind,
    pub(crate) url: &'a str,
    pub(crate) prefix: &'a str,
    pub(crate) levels: u8,
    pub(crate) name: &'a str,
    /// How long one publish may take (RabbitMQ), or one try of it (Service Bus).
    pub(crate) publish_timeout: Duration,
}

pub(crate) fn rabbitmq_options(c: &Connection<'_>) -> RabbitMqOptions {
    RabbitMqOptions::new(c.url)
        .with_prefix(c.prefix)
        .with_delay_levels(c.levels)
        .with_connection_name(c.name)
        .with_connect_attempts(10, Duration::from_secs(1))
        .with_connect_timeout(Duration::from_secs(20))
        .with_reconnect_delay(Duration::from_millis(200), Duration::from_secs(2))
        .with_operation_timeout(c.publish_timeout)
}

pub(crate) fn servicebus_options(c: &Connection<'_>) -> ServiceBusOptions {
    ServiceBusOptions::default()
        .with_unsecured(true)
        .with_connect_timeout(Duration::from_secs(10))
        .with_try_timeout(c.publish_timeout)
        .with_receive_wait(Duration::from_secs(3))
}

pub(crate) async fn connect(c: &Connection<'_>) -> Result<Connected, String> {
    match c.kind {
        Kind::RabbitMq => RabbitMqTransport::connect(rabbitmq_options(c))
            .await
            .map(Connected::RabbitMq),
        Kind::ServiceBus => {
            // The test broker names no entity prefix: each run has a broker of its own.
            ServiceBusTransport::connect(c.url.to_owned(), servicebus_options(c))
                .await
                .map(Connected::ServiceBus)
        }
    }
    .map_err(|e| e.to_string())
}

/// The Service Bus test broker, a process of its own.
pub(crate) struct TestBroker {
    program: PathBuf,
    /// The address it listens on (a loopback address, port 5672), the same after a restart.
    pub(crate) address: SocketAddr,
    /// The entities it is started with, every time.
    entities: Vec<String>,
    child: Child,
    log: PathBuf,
}

impl TestBroker {
    /// The program next to this one (`cargo build -p redeliver-servicebus-testbroker` puts it
    /// there).
    fn program() -> Result<PathBuf, String> {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let program = me.with_file_name("servicebus-test-broker");
        if program.is_file() {
            Ok(program)
        } else {
            Err(format!(
                "{} not found: build it with `cargo build -p redeliver-servicebus-testbroker \
                 --bin servicebus-test-broker`",
                program.display()
            ))
        }
    }

    /// Starts the test broker on the first free loopback address with queue `queue` (lock
    /// `lock`, at most `max_delivery` deliveries), logging to `dir`.
    pub(crate) async fn start(
        dir: &Path,
        queue: &str,
        lock: Duration,
        max_delivery: u32,
    ) -> Result<(TestBroker, String), String> {
        let entities = vec![
            "--queue".to_owned(),
            format!(
                "{queue},lock={},max-delivery={max_delivery}",
                lock.as_secs_f64()
            ),
        ];
        let program = Self::program()?;
        let log = dir.join("servicebus-test-broker.stderr");
        let (child, connection_string) = launch(&program, None, &entities, &log).await?;
        let host = host_of(&connection_string)?;
        let address = SocketAddr::new(
            host.parse()
                .map_err(|_| format!("test broker host `{host}` is not an IP address"))?,
            SERVICE_BUS_PORT,
        );
        Ok((
            TestBroker {
                program,
                address,
                entities,
                child,
                log,
            },
            connection_string,
        ))
    }

    /// Ends the broker process with `SIGTERM` (its messages are in memory: they are gone).
    pub(crate) async fn stop(&mut self) -> Result<(), String> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .map_err(|_| "the test broker did not stop within 30 s".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Starts the program again on the same address, with the same entities and nothing in
    /// them.
    pub(crate) async fn start_again(&mut self) -> Result<(), String> {
        let (child, _) =
            launch(&self.program, Some(self.address), &self.entities, &self.log).await?;
        self.child = child;
        Ok(())
    }
}

/// Runs the program and waits for the connection string it prints once it listens.
async fn launch(
    program: &Path,
    address: Option<SocketAddr>,
    entities: &[String],
    log: &Path,
) -> Result<(Child, String), String> {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let mut command = Command::new(program);
    if let Some(address) = address {
        command.args(["--address", &address.to_string()]);
    }
    let mut child = command
        .args(entities)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", program.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    // Binding the address again right after the last process ended can take a few tries
    // of the program itself; 30 s is far more than it needs.
    match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
        Ok(Ok(Some(line))) if line.starts_with("Endpoint=") => Ok((child, line)),
        other => Err(format!(
            "the test broker did not start ({}; its log: {})",
            match other {
                Ok(Ok(Some(_))) => "unexpected output".to_owned(),
                Ok(Ok(None)) => "it exited".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no connection string within 30 s".to_owned(),
            },
            log.display()
        )),
    }
}

/// The host of a connection string's `Endpoint=sb://HOST/`.
fn host_of(connection_string: &str) -> Result<String, String> {
    connection_string
        .split(';')
        .find_map(|part| part.strip_prefix("Endpoint=sb://"))
        .map(|rest| rest.trim_end_matches('/').to_owned())
        .ok_or_else(|| "the test broker printed no Endpoint=sb://HOST/".to_owned())
}

/// `connection_string` with its endpoint host replaced by `host`.
pub(crate) fn with_host(connection_string: &str, host: &str) -> String {
    connection_string
        .split(';')
        .map(|part| {
            if part.starts_with("Endpoint=sb://") {
                format!("Endpoint=sb://{host}/")
            } else {
                part.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The messages the Service Bus test broker still holds in `queue` (available, locked,
/// scheduled or deferred), by the number in their body, with their state. Peeked, so nothing
/// is locked or moved.
pub(crate) async fn service_bus_held(
    connection_string: &str,
    queue: &str,
) -> Result<BTreeMap<u64, String>, String> {
    use azservicebus::core::BasicRetryPolicy;
    use azservicebus::{
        ServiceBusClient, ServiceBusClientOptions, ServiceBusReceiverOptions,
        ServiceBusRetryOptions,
    };
    let options = ServiceBusClientOptions {
        retry_options: ServiceBusRetryOptions {
            max_retries: 0,
            ..ServiceBusRetryOptions::default()
        },
        ..ServiceBusClientOptions::default()
    };
    let mut client = ServiceBusClient::<BasicRetryPolicy>::unsecured()
        .new_from_connection_string(connection_string, options)
        .await
        .map_err(|e| format!("peeking: {e}"))?;
    let mut receiver = client
        .create_receiver_for_queue(queue, ServiceBusReceiverOptions::default())
        .await
        .map_err(|e| format!("peeking: {e}"))?;
    let mut held = BTreeMap::new();
    let mut from = None;
    let result = loop {
        let page = match receiver.peek_messages(250, from).await {
            Ok(page) => page,
            Err(e) => break Err(format!("peeking: {e}")),
        };
        let Some(last) = page.last() else {
            break Ok(());
        };
        from = Some(last.sequence_number() + 1);
        for message in &page {
            let job = message
                .body()
                .ok()
                .and_then(|body| serde_json::from_slice::<crate::Job>(body).ok());
            if let Some(job) = job {
                held.insert(job.n, format!("{:?}", message.state()));
            }
        }
    };
    let _ = receiver.dispose().await;
    let _ = client.dispose().await;
    result.map(|()| held)
}

/// A proxy to `upstream` on the first loopback address from 127.0.0.2 whose port 5672 is
/// free, for Service Bus clients, which dial 5672.
pub(crate) async fn service_bus_proxy(upstream: SocketAddr) -> Result<Proxy, String> {
    for last in 2..=254u8 {
        let listen = SocketAddr::from(([127, 0, 0, last], SERVICE_BUS_PORT));
        if listen == upstream {
            continue;
        }
        if let Ok(proxy) = Proxy::start_on(listen, upstream).await {
            return Ok(proxy);
        }
    }
    Err("no loopback address with port 5672 free for a proxy".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_host_is_read_and_replaced() {
        let s = "Endpoint=sb://127.0.0.3/;SharedAccessKeyName=K;SharedAccessKey=V;UseDevelopmentEmulator=true";
        assert_eq!(host_of(s).unwrap(), "127.0.0.3");
        assert_eq!(
            with_host(s, "127.0.0.9"),
            "Endpoint=sb://127.0.0.9/;SharedAccessKeyName=K;SharedAccessKey=V;UseDevelopmentEmulator=true"
        );
        assert!(host_of("nothing").is_err());
        assert_eq!(
            Kind::from_arg(Kind::ServiceBus.to_arg()),
            Ok(Kind::ServiceBus)
        );
        assert!(Kind::from_arg("kafka").is_err());
    }
}
