//! Accepted connections: written at once, acknowledged at once, and with the few frames that
//! `fe2o3-amqp`'s acceptor cannot produce the Service Bus way corrected on the wire.
//!
//! # Prompt writes and acknowledgements
//!
//! `fe2o3-amqp` never sets `TCP_NODELAY` on the sockets it opens, so an `azservicebus` client
//! holds a small frame back (Nagle's algorithm) while an earlier one is unacknowledged. A
//! consumer writes two such frames per message (a disposition, then link credit), and with the
//! receiving side's delayed acknowledgement the second waited about 40 ms on Linux: a receiver
//! on loopback got about 25 messages/s. The broker therefore acknowledges what it reads at once
//! (`TCP_QUICKACK`, which Linux clears again after a while, so it is set after every read) and
//! writes without delay (`TCP_NODELAY`).
//!
//! # Frames corrected on the wire
//!
//! The acceptor API of `fe2o3-amqp` (0.14, and still 0.17, the newest read) has limits that
//! Microsoft's SDKs notice, with no public way around them inside the library:
//!
//! - its sender always uses a 4-byte counter as delivery tag. Service Bus uses the message's
//!   16-byte lock token (in .NET `Guid` byte order), and the Python and .NET SDKs take the lock
//!   token from the tag. The broker therefore rewrites the tag of every transfer that carries
//!   an `x-opt-lock-token` delivery annotation (the broker's own) to that token. Dispositions
//!   name deliveries by id, not by tag, so the library never sees the difference. To leave room
//!   for the longer first frame, the client's `max-frame-size` is announced to the library
//!   [`FRAME_GROWTH`](tap::FRAME_GROWTH) bytes smaller.
//! - it leaves out trailing fields of the message header that have their default value, so a
//!   first delivery had no `delivery-count`; the Python SDK reports that as `None`, where
//!   Service Bus says 0. The header of those transfers is written out in full.
//! - when a receiver in rcv-settle-mode second reports an outcome (an unsettled disposition),
//!   the session is meant to answer with a settled disposition, but its code drops the last
//!   (for a single delivery: the only) range of delivery ids, so nothing is sent. A client that
//!   waits for the answer (the Python SDK, 60 s, then it retries through the management link
//!   and gets "lock lost") never gets it. The broker therefore writes the settled disposition
//!   itself: for a peek-lock delivery once the outcome was applied ([`Tap::settled`]), with the
//!   client's outcome (a dead-letter as `rejected` without error, as Service Bus does), or
//!   `rejected` with `com.microsoft:message-lock-lost` if the lock was gone; for any other
//!   unsettled delivery at once.
//! - a frame for a session that the application has not accepted yet closes the whole
//!   connection with `amqp:not-found`; clients pipeline `begin` and `attach`. The frames of
//!   such a session are held back until the broker has answered its `begin`, and only those:
//!   see [`Inbound`] for the order the library then sees.
//!
//! Frames are parsed only as far as needed (the 8-byte frame header and the performative's
//! descriptor); others pass through untouched, and a stream that does not parse as AMQP frames
//! is passed through unchanged from that point on, for the library to refuse.

mod body;
mod frame;
mod hold;
mod tap;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;

use self::body::answered_channel;
use self::frame::{BEGIN, CLOSE, DISPOSITION, OPEN, Scanner, TRANSFER};
use self::hold::Inbound;
use self::tap::Out;
pub(crate) use self::tap::{Applied, Tap};

/// How many bytes of a client's frames the broker buffers while it holds them back.
const MAX_HELD: usize = 16 * 1024 * 1024;

/// A client connection as the broker's `fe2o3-amqp` connection sees it: with the corrections
/// of the module docs, and a session's frames held back until the broker has answered its
/// `begin` (see [`Inbound`]).
#[derive(Debug)]
pub(crate) struct ClientStream {
    read: OwnedReadHalf,
    /// Read bytes, already inspected, on their way to the library.
    inbound: Inbound,
    /// The reader, woken when the broker's answer to a `begin` releases held frames.
    held_reader: Option<std::task::Waker>,
    read_scanner: Scanner,
    write_scanner: Scanner,
    tap: Arc<Tap>,
}

impl ClientStream {
    /// Wraps an accepted connection whose frames to the client arrive `latency` after they are
    /// written; the returned [`Tap`] confirms settlements on it.
    pub(crate) fn new(stream: TcpStream, latency: Duration) -> (Self, Arc<Tap>) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        acknowledge_promptly(&stream);
        let (read, mut write) = stream.into_split();
        let (writer, mut outgoing) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(out) = outgoing.recv().await {
                match out {
                    Out::Bytes(queued, bytes) => {
                        // In order: every frame is delayed by the same amount.
                        if !latency.is_zero() {
                            tokio::time::sleep_until(tokio::time::Instant::from_std(
                                queued + latency,
                            ))
                            .await;
                        }
                        if write.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    Out::Shutdown => break,
                }
            }
            let _ = write.shutdown().await;
        });
        let tap = Arc::new(Tap::new(writer));
        let stream = ClientStream {
            read,
            inbound: Inbound::default(),
            held_reader: None,
            read_scanner: Scanner::default(),
            write_scanner: Scanner::default(),
            tap: tap.clone(),
        };
        (stream, tap)
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        self.tap.shut_down();
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn acknowledge_promptly(stream: &TcpStream) {
    // Best effort: without it the broker is only slower.
    let _ = stream.set_quickack(true);
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn acknowledge_promptly(_: &TcpStream) {}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let readable = &mut this.inbound.readable;
            if !readable.is_empty() {
                let n = readable.len().min(buf.remaining());
                buf.put_slice(&readable[..n]);
                readable.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.inbound.holding() {
                this.held_reader = Some(cx.waker().clone());
                if this.inbound.held_bytes > MAX_HELD {
                    return Poll::Pending;
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.read).poll_read(cx, &mut chunk_buf) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            let read = chunk_buf.filled();
            if read.is_empty() {
                // End of stream: the library sees the end; a partial frame is of no use.
                return Poll::Ready(Ok(()));
            }
            acknowledge_promptly(this.read.as_ref());
            let tap = &this.tap;
            this.read_scanner.feed(
                read,
                &mut this.inbound,
                |code| matches!(code, OPEN | BEGIN | DISPOSITION),
                |channel, code, body| tap.on_client_frame(channel, code, body),
            );
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.tap.is_closed() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let mut out = Vec::new();
        let (tap, inbound) = (&this.tap, &mut this.inbound);
        let mut released = false;
        this.write_scanner.feed(
            buf,
            &mut out,
            |code| matches!(code, BEGIN | TRANSFER | CLOSE),
            |channel, code, body| {
                match code {
                    BEGIN => {
                        if let Some(client_channel) = answered_channel(body) {
                            inbound.answered(client_channel);
                            released = true;
                        }
                    }
                    CLOSE => {
                        inbound.release_all();
                        released = true;
                    }
                    _ => {}
                }
                tap.on_broker_frame(channel, code, body)
            },
        );
        if released && let Some(reader) = this.held_reader.take() {
            reader.wake();
        }
        if !out.is_empty() && !this.tap.write(out) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tap.shut_down();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::frame::{begin_body, frame};
    use super::*;

    async fn read_some(stream: &mut ClientStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("read in time")
            .unwrap();
        buf.truncate(n);
        buf
    }

    #[tokio::test]
    async fn frames_after_a_begin_wait_for_the_brokers_answer() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let (mut stream, _tap) = ClientStream::new(accepted, Duration::ZERO);

        let client_begin = frame(3, &begin_body(None));
        let attach_like = frame(3, &[0x00, 0x53, 0x12, 0x45]);
        let mut sent = b"AMQP\x00\x01\x00\x00".to_vec();
        sent.extend_from_slice(&client_begin);
        sent.extend_from_slice(&attach_like);
        client.write_all(&sent).await.unwrap();

        let mut first = Vec::new();
        while first.len() < 8 + client_begin.len() {
            first.extend(read_some(&mut stream).await);
        }
        assert_eq!(
            first,
            sent[..8 + client_begin.len()],
            "up to the begin only"
        );

        // The broker answers the begin of client channel 3 on its channel 0.
        stream
            .write_all(&frame(0, &begin_body(Some(3))))
            .await
            .unwrap();
        assert_eq!(read_some(&mut stream).await, attach_like, "released");
    }

    #[tokio::test]
    async fn a_frame_of_an_established_session_does_not_wait_for_another_sessions_begin() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let (mut stream, _tap) = ClientStream::new(accepted, Duration::ZERO);

        let mut opening = b"AMQP\x00\x01\x00\x00".to_vec();
        opening.extend_from_slice(&frame(0, &begin_body(None)));
        client.write_all(&opening).await.unwrap();
        let mut read = Vec::new();
        while read.len() < opening.len() {
            read.extend(read_some(&mut stream).await);
        }
        stream
            .write_all(&frame(0, &begin_body(Some(0))))
            .await
            .unwrap();

        // Session 1 begins; before the broker answers, session 0 grants credit.
        let begin_1 = frame(1, &begin_body(None));
        let attach_1 = frame(1, &[0x00, 0x53, 0x12, 0x45]);
        let flow_0 = frame(0, &[0x00, 0x53, 0x13, 0x45]);
        client
            .write_all(&[begin_1.clone(), attach_1.clone(), flow_0.clone()].concat())
            .await
            .unwrap();
        let mut read = Vec::new();
        while read.len() < begin_1.len() + flow_0.len() {
            read.extend(read_some(&mut stream).await);
        }
        assert_eq!(
            read,
            [begin_1, flow_0].concat(),
            "the flow overtakes the attach"
        );

        stream
            .write_all(&frame(1, &begin_body(Some(1))))
            .await
            .unwrap();
        assert_eq!(read_some(&mut stream).await, attach_1, "released");
    }
}
