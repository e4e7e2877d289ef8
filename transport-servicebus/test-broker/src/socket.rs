//! Accepted connections, written at once and acknowledged at once.
//!
//! `fe2o3-amqp` never sets `TCP_NODELAY` on the sockets it opens, so an `azservicebus` client
//! holds a small frame back (Nagle's algorithm) while an earlier one is unacknowledged. A
//! consumer writes two such frames per message (a disposition, then link credit), and with the
//! receiving side's delayed acknowledgement the second waited about 40 ms on Linux: a receiver
//! on loopback got about 25 messages/s. The broker therefore acknowledges what it reads at once
//! (`TCP_QUICKACK`, which Linux clears again after a while, so it is set after every read) and
//! writes without delay (`TCP_NODELAY`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A client connection whose reads are acknowledged at once and whose writes are not delayed.
#[derive(Debug)]
pub(crate) struct PromptStream {
    stream: TcpStream,
}

impl PromptStream {
    pub(crate) fn new(stream: TcpStream) -> Self {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        acknowledge_promptly(&stream);
        PromptStream { stream }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn acknowledge_promptly(stream: &TcpStream) {
    // Best effort: without it the broker is only slower.
    let _ = stream.set_quickack(true);
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn acknowledge_promptly(_: &TcpStream) {}

impl AsyncRead for PromptStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            acknowledge_promptly(&self.stream);
        }
        polled
    }
}

impl AsyncWrite for PromptStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
