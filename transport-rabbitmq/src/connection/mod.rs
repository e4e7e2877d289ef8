//! The connection to the broker: start-up retries and recovery (publishing on it, with
//! confirms, is in the `publish` module).
//!
//! One AMQP connection per transport. A supervisor task watches it; when it is lost, the
//! supervisor reconnects with back-off until the transport is closed, declares the topology
//! again (in [`TopologyMode::Declare`]) and only then hands the new connection out.
//!
//! A URL may list a cluster's nodes. Every connection (the shared one and the consumers') goes
//! to the node the transport is on, trying the others in turn when it does not answer; when the
//! shared connection is lost the transport moves to the next node in the list first, since the
//! one it was on is likely the one that went away. Publishers
//! waiting meanwhile wait at most the publish timeout; consumers open a new consumer on the new
//! connection.

mod publish;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use redeliver_core::{Clock, Error, Topology};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::errors;
use crate::naming::Names;
use crate::options::{RabbitMqOptions, TopologyMode, node_address};
use crate::topology;

/// How often the supervisor looks at the connection's state besides listening to its events.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// One open connection, with the channel used for publishing.
pub(crate) struct Connected {
    pub(crate) generation: u64,
    pub(crate) connection: Connection,
    publisher: tokio::sync::Mutex<Option<Channel>>,
    /// Whether the delay infrastructure was declared on this connection.
    pub(crate) infrastructure_ready: AtomicBool,
}

impl Connected {
    pub(crate) fn is_up(&self) -> bool {
        self.connection.status().connected()
    }
}

pub(crate) enum ConnectionState {
    Connecting,
    Up(Arc<Connected>),
    Closed,
}

/// Everything the transport, its consumers and the supervisor share.
pub(crate) struct Shared {
    pub(crate) options: RabbitMqOptions,
    pub(crate) names: Names,
    /// The clock every delay is computed on ([`Transport::clock`](redeliver_core::Transport::clock)).
    pub(crate) clock: Clock,
    state: watch::Sender<ConnectionState>,
    closed: CancellationToken,
    broken: tokio::sync::Notify,
    generation: AtomicU64,
    /// The node of the URL's list that connections go to first.
    node: AtomicUsize,
    /// Every topology declared so far, declared again after a reconnection.
    declared: Mutex<Vec<Topology>>,
}

/// Where a message is published.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Target<'a> {
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    /// Whether a message that matches no queue is an error ([`Error::Unroutable`]).
    pub(crate) mandatory: bool,
}

impl Shared {
    /// Connects, trying `connect_attempts` times, and starts the supervisor.
    pub(crate) async fn connect(options: RabbitMqOptions) -> Result<Arc<Shared>, Error> {
        options.validate()?;
        let shared = Arc::new(Shared {
            names: Names::new(&options),
            clock: Clock::system(),
            options,
            state: watch::Sender::new(ConnectionState::Connecting),
            closed: CancellationToken::new(),
            broken: tokio::sync::Notify::new(),
            generation: AtomicU64::new(0),
            node: AtomicUsize::new(0),
            declared: Mutex::new(Vec::new()),
        });
        let attempts = shared.options.connect_attempts;
        let bound = shared.options.connect_timeout;
        let deadline = Instant::now() + bound;
        let url = shared.options.redacted_url();
        let mut attempt = 1;
        let conn = loop {
            let result = match tokio::time::timeout_at(deadline, shared.open(None)).await {
                Ok(result) => result,
                Err(_) => Err(Error::timeout(
                    format!(
                        "connecting to {url} (RabbitMqOptions::with_connect_timeout, attempt \
                         {attempt} of {attempts})"
                    ),
                    bound,
                )),
            };
            match result {
                Ok(conn) => break conn,
                // The same credentials are refused the same way: no point in trying again.
                Err(e @ Error::AccessDenied { .. }) => {
                    error!(url = %url, error = %e, "the broker refused access; giving up");
                    return Err(e);
                }
                Err(e @ Error::Timeout { .. }) => {
                    error!(url = %url, error = %e, "could not connect to the broker in time; giving up");
                    return Err(e);
                }
                Err(e)
                    if attempt >= attempts
                        || Instant::now() + shared.options.connect_retry_delay >= deadline =>
                {
                    error!(
                        url = %url,
                        attempts = attempt,
                        error = %e,
                        "could not connect to the broker; giving up"
                    );
                    return Err(Error::connection_lost(format!(
                        "could not connect to {url} after {attempt} attempt(s) within \
                             {bound:?} ({e}); giving up"
                    ))
                    .with_source(e));
                }
                Err(e) => {
                    warn!(
                        url = %url,
                        attempt,
                        attempts,
                        error = %e,
                        "could not connect to the broker; trying again"
                    );
                    attempt += 1;
                    tokio::time::sleep(shared.options.connect_retry_delay).await;
                }
            }
        };
        shared.state.send_replace(ConnectionState::Up(conn));
        tokio::spawn(supervise(Arc::clone(&shared)));
        Ok(shared)
    }

    /// Opens a connection, within the connect timeout per node tried; `purpose` is added to its
    /// name (the shared connection has none). Tries the node the transport is on first, then
    /// the others in list order, and stays on the one that answered.
    pub(crate) async fn open(&self, purpose: Option<&str>) -> Result<Arc<Connected>, Error> {
        let nodes = self.options.parsed_nodes()?;
        let first = self.node.load(Ordering::Relaxed) % nodes.len();
        let mut failure = None;
        for index in (first..nodes.len()).chain(0..first) {
            match self.open_node(&nodes[index], purpose).await {
                Ok(conn) => {
                    if index != first {
                        info!(
                            node = %node_address(&nodes[index]),
                            "connected to another node of the cluster"
                        );
                    }
                    self.node.store(index, Ordering::Relaxed);
                    return Ok(conn);
                }
                // The same credentials are refused the same way by every node.
                Err(e @ Error::AccessDenied { .. }) => return Err(e),
                Err(e) => {
                    if nodes.len() > 1 {
                        debug!(node = %node_address(&nodes[index]), error = %e, "node unreachable");
                    }
                    failure = Some(e);
                }
            }
        }
        Err(failure.expect("a URL names at least one node"))
    }

    /// Moves the transport to the next node of the URL's list, for the next connections.
    fn move_to_next_node(&self) {
        self.node.fetch_add(1, Ordering::Relaxed);
    }

    async fn open_node(
        &self,
        uri: &lapin::uri::AMQPUri,
        purpose: Option<&str>,
    ) -> Result<Arc<Connected>, Error> {
        let mut name = self
            .options
            .connection_name
            .clone()
            .unwrap_or_else(|| "redeliver".to_owned());
        if let Some(purpose) = purpose {
            name = format!("{name} ({purpose})");
        }
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let url = self.options.redacted_url();
        let node = node_address(uri);
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.options.ca_certificates.clone(),
        };
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| errors::from_client(e, format!("connecting to {url}")))?;
        let bound = self.options.connect_timeout;
        let connect = Connection::connect_uri_with_config(uri.clone(), properties, tls, runtime);
        let doing = if self.options.parsed_nodes().map_or(1, |n| n.len()) > 1 {
            format!("connecting to {url} (node {node})")
        } else {
            format!("connecting to {url}")
        };
        let connection = tokio::time::timeout(bound, connect)
            .await
            .map_err(|_| {
                Error::timeout(
                    format!("{doing} (RabbitMqOptions::with_connect_timeout)"),
                    bound,
                )
            })?
            .map_err(|e| errors::from_client(e, doing))?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Arc::new(Connected {
            generation,
            connection,
            publisher: tokio::sync::Mutex::new(None),
            infrastructure_ready: AtomicBool::new(false),
        }))
    }

    /// The token cancelled when the transport is closed.
    pub(crate) fn closed_token(&self) -> &CancellationToken {
        &self.closed
    }

    /// Closes the connection; everything waiting for it fails with [`Error::Closed`].
    pub(crate) async fn close(&self) {
        self.closed.cancel();
        let previous = self.state.send_replace(ConnectionState::Closed);
        if let ConnectionState::Up(conn) = previous {
            close_connection(&conn, self.options.operation_timeout).await;
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Sleeps for `duration`; `false` if the transport was closed meanwhile.
    pub(crate) async fn pause(&self, duration: Duration) -> bool {
        tokio::select! {
            _ = self.closed.cancelled() => false,
            _ = tokio::time::sleep(duration) => true,
        }
    }

    /// Reports that an operation failed in a way that may mean the connection is gone.
    pub(crate) fn report_broken(&self) {
        self.broken.notify_one();
    }

    /// The current connection, waiting for a reconnection until `deadline` if there is none
    /// (or only the one numbered `stale`, known to be broken).
    pub(crate) async fn current(
        &self,
        deadline: Instant,
        stale: Option<u64>,
        doing: &str,
    ) -> Result<Arc<Connected>, Error> {
        let mut rx = self.state.subscribe();
        let ready = tokio::time::timeout_at(
            deadline,
            rx.wait_for(|s| match s {
                ConnectionState::Up(conn) => Some(conn.generation) != stale,
                ConnectionState::Closed => true,
                ConnectionState::Connecting => false,
            }),
        )
        .await;
        match ready {
            Err(_) => Err(Error::timeout(
                format!("waiting for the connection to the broker to recover, {doing}"),
                self.options.operation_timeout,
            )),
            Ok(Err(_)) => Err(Error::Closed),
            Ok(Ok(state)) => match &*state {
                ConnectionState::Up(conn) => Ok(Arc::clone(conn)),
                _ => Err(Error::Closed),
            },
        }
    }

    /// Waits for the current connection as long as it takes (consumers).
    pub(crate) async fn connected_eventually(
        &self,
        stale: Option<u64>,
    ) -> Result<Arc<Connected>, Error> {
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        loop {
            match self.current(far, stale, "consuming").await {
                Err(Error::Timeout { .. }) => continue,
                other => return other,
            }
        }
    }

    /// Declares (or checks) `topology` now, and remembers it for reconnections.
    pub(crate) async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        let deadline = Instant::now() + self.options.operation_timeout;
        let conn = self
            .current(deadline, None, "declaring the topology")
            .await?;
        let after = self.options.operation_timeout;
        bounded(
            deadline,
            after,
            || "declaring the topology".to_owned(),
            topology::apply(self.declaring_on(&conn), topology),
        )
        .await?;
        if self.options.topology == TopologyMode::Declare {
            let mut declared = self.declared.lock().unwrap_or_else(|e| e.into_inner());
            if !declared.contains(topology) {
                declared.push(topology.clone());
            }
        }
        Ok(())
    }

    fn declaring_on<'a>(&'a self, conn: &'a Connected) -> topology::On<'a> {
        topology::On {
            options: &self.options,
            names: &self.names,
            connection: &conn.connection,
            infrastructure_ready: &conn.infrastructure_ready,
        }
    }

    async fn redeclare(&self, conn: &Connected) -> Result<(), Error> {
        let declared = self
            .declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let after = self.options.operation_timeout;
        let deadline = Instant::now() + after;
        bounded(
            deadline,
            after,
            || "declaring the topology again after reconnecting".to_owned(),
            async {
                for topology in &declared {
                    topology::apply(self.declaring_on(conn), topology).await?;
                }
                Ok(())
            },
        )
        .await
    }
}

/// Runs `future` until `deadline`: a half-dead connection must never hang a caller.
pub(crate) async fn bounded<T>(
    deadline: Instant,
    after: Duration,
    doing: impl FnOnce() -> String,
    future: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout_at(deadline, future)
        .await
        .unwrap_or_else(|_| Err(Error::timeout(doing(), after)))
}

/// Watches the connection and replaces it when it is lost, until the transport is closed.
async fn supervise(shared: Arc<Shared>) {
    loop {
        let conn = match &*shared.state.borrow() {
            ConnectionState::Up(conn) => Arc::clone(conn),
            ConnectionState::Closed | ConnectionState::Connecting => return,
        };
        if !wait_until_broken(&shared, &conn).await {
            return;
        }
        let replaced = shared.state.send_if_modified(|state| {
            if matches!(state, ConnectionState::Up(l) if l.generation == conn.generation) {
                *state = ConnectionState::Connecting;
                true
            } else {
                false
            }
        });
        if !replaced {
            return;
        }
        warn!(
            url = %shared.options.redacted_url(),
            "lost the connection to the broker; reconnecting"
        );
        drop(conn);
        shared.move_to_next_node();
        let lost_at = Instant::now();
        let mut delay = shared.options.reconnect_delay;
        let mut attempt = 1u32;
        loop {
            let result = match shared.open(None).await {
                Ok(conn) => shared.redeclare(&conn).await.map(|()| conn),
                Err(e) => Err(e),
            };
            match result {
                Ok(conn) => {
                    info!(attempt, after = ?lost_at.elapsed(), "reconnected to the broker");
                    let published = shared.state.send_if_modified(|state| {
                        if matches!(state, ConnectionState::Connecting) {
                            *state = ConnectionState::Up(Arc::clone(&conn));
                            true
                        } else {
                            false
                        }
                    });
                    if !published {
                        close_connection(&conn, shared.options.operation_timeout).await;
                        return;
                    }
                    break;
                }
                Err(e) => {
                    warn!(attempt, error = %e, retry_in = ?delay, "could not reconnect to the broker");
                }
            }
            tokio::select! {
                _ = shared.closed.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(shared.options.reconnect_max_delay);
            attempt += 1;
        }
    }
}

/// Closes `conn`'s connection, waiting at most `timeout` for the broker's `close-ok`.
///
/// lapin's `Connection::close` completes only when the broker's `close-ok` arrives or lapin
/// fails the request. Nothing bounds that wait: with heartbeats stopped for the close, a broker
/// (or network) that has gone silent without closing the socket, or a request lapin never sends,
/// leaves it pending forever, and with it whoever closes the transport (a worker's owner, a
/// test's clean-up). After the timeout the connection is given up on and dropped.
pub(crate) async fn close_connection(conn: &Connected, timeout: Duration) {
    if !conn.is_up() {
        return;
    }
    match tokio::time::timeout(
        timeout,
        conn.connection.close(200, "closed by redeliver".into()),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "closing the connection to the broker failed"),
        Err(_) => warn!(
            after = ?timeout,
            "the broker did not confirm closing the connection in time; abandoning it"
        ),
    }
}

/// Returns `true` once `conn` is lost, `false` if the transport was closed meanwhile.
async fn wait_until_broken(shared: &Shared, conn: &Connected) -> bool {
    let mut events = conn.connection.events_listener();
    loop {
        tokio::select! {
            _ = shared.closed.cancelled() => return false,
            event = events.next() => match event {
                Some(Event::Error(e)) => {
                    debug!(error = %e, "connection error event");
                    if !conn.is_up() {
                        return true;
                    }
                }
                Some(_) => {}
                None => return true,
            },
            _ = shared.broken.notified() => if !conn.is_up() { return true },
            _ = tokio::time::sleep(WATCH_INTERVAL) => if !conn.is_up() { return true },
        }
    }
}
