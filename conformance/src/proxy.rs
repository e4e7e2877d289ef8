//! A TCP proxy in front of a broker that can cut every connection through it (as a network
//! failure would), freeze them (a peer that stops answering but keeps the socket open), hold
//! back one direction (the broker receives a request but its answer never arrives) and refuse
//! new ones: the failures the resilience tests and the chaos suite inject, on any transport.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One direction of the traffic through a [`Proxy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the upstream address (requests, publishes).
    ToUpstream,
    /// From the upstream address back to the client (answers, confirms, deliveries).
    ToClient,
}

/// Which directions are held back.
#[derive(Clone, Copy, Default)]
struct Held {
    to_upstream: bool,
    to_client: bool,
}

impl Held {
    fn get(self, direction: Direction) -> bool {
        match direction {
            Direction::ToUpstream => self.to_upstream,
            Direction::ToClient => self.to_client,
        }
    }

    fn set(&mut self, direction: Direction, held: bool) {
        match direction {
            Direction::ToUpstream => self.to_upstream = held,
            Direction::ToClient => self.to_client = held,
        }
    }
}

/// A TCP proxy forwarding to one upstream address, on `127.0.0.1` or an address of the
/// caller's choosing; it stops when dropped, cutting every connection through it.
pub struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    held: watch::Sender<Held>,
    accepting: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `upstream` on a free local port.
    ///
    /// # Errors
    /// If no local port can be bound.
    pub async fn start(upstream: SocketAddr) -> io::Result<Proxy> {
        Proxy::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
    }

    /// Starts a proxy to `upstream` listening on `listen` (port 0: a free port), for clients
    /// that dial a fixed port, such as `azservicebus`, which always dials 5672: listen on
    /// another loopback address's port 5672.
    ///
    /// # Errors
    /// If `listen` cannot be bound.
    pub async fn start_on(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(0u64);
        let (held, _) = watch::channel(Held::default());
        let accepting = Arc::new(AtomicBool::new(true));
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let cut = cut.clone();
            let held = held.clone();
            let accepting = Arc::clone(&accepting);
            let accepted = Arc::clone(&accepted);
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    if !accepting.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let mut cut_rx = cut.subscribe();
                    let held = (held.subscribe(), held.subscribe());
                    let cuts = (cut.subscribe(), cut.subscribe());
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        let up = forward(
                            (client_read, server_write),
                            (held.0, cuts.0),
                            Direction::ToUpstream,
                        );
                        let down = forward(
                            (server_read, client_write),
                            (held.1, cuts.1),
                            Direction::ToClient,
                        );
                        // Dropping both halves of both sockets closes them.
                        tokio::select! {
                            _ = async { tokio::join!(up, down) } => {}
                            _ = cut_rx.changed() => {}
                        }
                    });
                }
            }
        });
        Ok(Proxy {
            addr,
            cut,
            held,
            accepting,
            accepted,
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections the proxy has accepted (and forwarded) so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Cuts every connection through the proxy; new ones are forwarded again (unless
    /// refused with [`set_accepting`](Proxy::set_accepting)).
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Stops forwarding anything on every connection through the proxy, keeping them open:
    /// the client sees no error, only silence, until they are [cut](Proxy::cut).
    pub fn freeze(&self) {
        self.held.send_modify(|held| {
            held.set(Direction::ToUpstream, true);
            held.set(Direction::ToClient, true);
        });
    }

    /// Stops forwarding `direction` on every connection through the proxy, present and
    /// future, while the other direction flows: bytes that arrive for it are kept, not sent,
    /// until [`release`](Proxy::release) (then they are sent, in order) or a
    /// [cut](Proxy::cut) (then they are dropped with the connection). Holding
    /// [`Direction::ToClient`] lets a request reach the broker while its answer never
    /// arrives.
    pub fn hold(&self, direction: Direction) {
        self.held.send_modify(|held| held.set(direction, true));
    }

    /// Forwards `direction` again (see [`hold`](Proxy::hold)); a [frozen](Proxy::freeze)
    /// proxy released in both directions forwards again too.
    pub fn release(&self, direction: Direction) {
        self.held.send_modify(|held| held.set(direction, false));
    }

    /// Refuses (`false`) or accepts (`true`) new connections.
    pub fn set_accepting(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either ends or the proxy cuts, waiting before each write while
/// `direction` is held. At the end of `from` the write side of `to` is shut down, as TCP
/// half-close does.
async fn forward(
    (mut from, mut to): (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
    (mut held, mut cut): (watch::Receiver<Held>, watch::Receiver<u64>),
    direction: Direction,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        // Held: keep what was read (and the end of the stream) until released or cut. A cut
        // wins over a release that comes with or after it: held bytes are never sent once the
        // proxy was told to cut.
        tokio::select! {
            biased;
            _ = cut.changed() => return,
            released = held.wait_for(|held| !held.get(direction)) => {
                if released.is_err() {
                    return;
                }
            }
        }
        if read == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
