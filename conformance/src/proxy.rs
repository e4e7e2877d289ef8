//! A TCP proxy in front of a broker that can cut every connection through it (as a network
//! failure would), freeze them (a peer that stops answering but keeps the socket open) and
//! refuse new ones: the failures the resilience tests and the chaos suite inject, on any
//! transport.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy on `127.0.0.1` forwarding to one upstream address; it stops when dropped,
/// cutting every connection through it.
pub struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    frozen: watch::Sender<bool>,
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
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(0u64);
        let (frozen, _) = watch::channel(false);
        let accepting = Arc::new(AtomicBool::new(true));
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let cut = cut.clone();
            let frozen = frozen.clone();
            let accepting = Arc::clone(&accepting);
            let accepted = Arc::clone(&accepted);
            async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    if !accepting.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let mut cut_rx = cut.subscribe();
                    let mut frozen_rx = frozen.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut_rx.changed() => {}
                            _ = async { frozen_rx.wait_for(|frozen| *frozen).await.is_ok() } => {
                                // Stop copying but keep both sockets open until cut.
                                let _ = cut_rx.changed().await;
                            }
                        }
                    });
                }
            }
        });
        Ok(Proxy {
            addr,
            cut,
            frozen,
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
        self.frozen.send_replace(true);
    }

    /// Refuses (`false`) or accepts (`true`) new connections.
    pub fn set_accepting(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
