//! The byte stream under a connection: a Unix socket, a TCP socket, or any
//! stream the caller hands over.
//!
//! One enum rather than a trait object, so that the Unix and TCP sockets
//! (nearly every connection) cost one `match` per read or write and keep
//! tokio's readiness tricks; only a caller's own stream goes through a box.
//! Nothing here knows QMP: any protocol client of the crate (the guest
//! agent's included) can connect, read and write through it.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::address::{split_host_port, Address};
use super::socket;
use crate::error::{Error, Result};

/// What a caller's own stream must be to carry a connection.
pub(crate) trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ByteStream for T {}

/// A connected byte stream.
pub(crate) enum Transport {
    /// A Unix socket: the only one that passes file descriptors.
    Unix(UnixStream),
    /// A TCP socket (with `TCP_NODELAY`: a command is one small write).
    Tcp(TcpStream),
    /// Any stream: no readiness to ask for, so reads and writes register
    /// the task's waker themselves; written bytes are flushed.
    Io {
        io: Box<dyn ByteStream>,
        /// Bytes were written since the last completed flush.
        unflushed: bool,
    },
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl Transport {
    /// Connects to `address`, with typed errors that name it. The caller
    /// bounds the time.
    pub(crate) async fn connect(address: &Address) -> Result<Transport> {
        match address {
            Address::Unix(path) => {
                socket::connect(path)
                    .await
                    .map(Transport::Unix)
                    .map_err(|e| Error::Connect {
                        path: path.clone(),
                        source: e.into(),
                    })
            }
            Address::Tcp(text) => connect_tcp(text).await.map(Transport::Tcp),
        }
    }

    /// Wraps a caller's stream.
    pub(crate) fn io(io: impl ByteStream) -> Transport {
        Transport::Io {
            io: Box::new(io),
            unflushed: false,
        }
    }

    /// The kind of stream, in words.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Transport::Unix(_) => "a Unix socket",
            Transport::Tcp(_) => "TCP",
            Transport::Io { .. } => "a byte stream",
        }
    }

    /// True when file descriptors can go with the bytes.
    pub(crate) fn passes_fds(&self) -> bool {
        matches!(self, Transport::Unix(_))
    }

    /// Whether a read that finds nothing has registered the task's waker
    /// (true for a caller's stream, which has no readiness of its own).
    pub(crate) fn read_registers_waker(&self) -> bool {
        matches!(self, Transport::Io { .. })
    }

    /// Registers the task for readability. A caller's stream has no
    /// readiness: it is always "ready", and [`Transport::read_now`] registers.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Unix(s) => s.poll_read_ready(cx),
            Transport::Tcp(s) => s.poll_read_ready(cx),
            Transport::Io { .. } => Poll::Ready(Ok(())),
        }
    }

    /// Registers the task for writability. A caller's stream registered
    /// already in the write that found it full.
    pub(crate) fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Unix(s) => s.poll_write_ready(cx),
            Transport::Tcp(s) => s.poll_write_ready(cx),
            Transport::Io { .. } => Poll::Pending,
        }
    }

    /// Reads what the stream holds now; `WouldBlock` when nothing.
    ///
    /// For the sockets, unlike `try_read`, tokio's `poll_read` takes a short
    /// read as proof that the socket is drained (it is, with epoll) and
    /// clears its readiness; so the next wait goes straight to `epoll_wait`
    /// instead of first making a `recvfrom` that can only fail with
    /// `EAGAIN`: one system call less per round trip. A no-op waker is
    /// enough there: the task registers its own with `poll_read_ready`
    /// before it sleeps. A caller's stream gets the task's own waker.
    pub(crate) fn read_now(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> io::Result<usize> {
        let mut noop = Context::from_waker(Waker::noop());
        let mut rb = ReadBuf::new(buf);
        let polled = match self {
            Transport::Unix(s) => Pin::new(s).poll_read(&mut noop, &mut rb),
            Transport::Tcp(s) => Pin::new(s).poll_read(&mut noop, &mut rb),
            Transport::Io { io, .. } => Pin::new(io).poll_read(cx, &mut rb),
        };
        match polled {
            Poll::Ready(Ok(())) => Ok(rb.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Reads what is there now straight from the socket, bypassing tokio's
    /// readiness (which may not know yet of what arrived, or may refuse for
    /// lack of budget); `WouldBlock` when nothing.
    pub(crate) fn read_direct(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let recv = |fd: std::os::fd::BorrowedFd<'_>, buf: &mut [u8]| {
            rustix::net::recv(fd, buf, rustix::net::RecvFlags::DONTWAIT)
                .map(|(n, _)| n)
                .map_err(io::Error::from)
        };
        use std::os::fd::AsFd;
        match self {
            Transport::Unix(s) => recv(s.as_fd(), buf),
            Transport::Tcp(s) => recv(s.as_fd(), buf),
            Transport::Io { io, .. } => {
                let mut noop = Context::from_waker(Waker::noop());
                let mut rb = ReadBuf::new(buf);
                match Pin::new(io).poll_read(&mut noop, &mut rb) {
                    Poll::Ready(Ok(())) => Ok(rb.filled().len()),
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }

    /// Writes what the stream takes now; `WouldBlock` when it is full.
    pub(crate) fn try_write(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Unix(s) => s.try_write(bytes),
            Transport::Tcp(s) => s.try_write(bytes),
            Transport::Io { io, unflushed } => match Pin::new(io).poll_write(cx, bytes) {
                Poll::Ready(Ok(0)) if !bytes.is_empty() => Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    *unflushed = true;
                    Ok(n)
                }
                Poll::Ready(Err(e)) => Err(e),
                Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
            },
        }
    }

    /// Writes `bytes` with `fds` attached, in one `sendmsg`; see
    /// [`socket::try_send_with_fds`]. Only a Unix socket can; the client
    /// refuses such calls on other streams before they reach the task.
    pub(crate) fn try_send_with_fds(&self, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<usize> {
        match self {
            Transport::Unix(s) => socket::try_send_with_fds(s, bytes, fds),
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "file descriptors can only be passed over a Unix socket",
            )),
        }
    }

    /// Flushes a caller's stream if bytes were written to it since the last
    /// flush (a TLS or buffered stream may hold them back until then). The
    /// sockets have nothing to flush.
    pub(crate) fn poll_flush_written(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Io { io, unflushed } if *unflushed => {
                let done = Pin::new(io).poll_flush(cx);
                if let Poll::Ready(Ok(())) = done {
                    *unflushed = false;
                }
                done
            }
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// Resolves and connects, trying each address of the name in turn.
async fn connect_tcp(text: &str) -> Result<TcpStream> {
    let resolve_error = |e: io::Error| Error::Resolve {
        address: text.to_owned(),
        source: e.into(),
    };
    // Checked again here: an `Address::Tcp` may have been built by hand.
    let (host, port) = split_host_port(text).map_err(|reason| Error::InvalidAddress {
        address: text.to_owned(),
        reason: reason.to_owned(),
    })?;
    let candidates: Vec<std::net::SocketAddr> = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![(ip, port).into()],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(resolve_error)?
            .collect(),
    };
    if candidates.is_empty() {
        return Err(resolve_error(io::Error::new(
            io::ErrorKind::NotFound,
            "the name has no address",
        )));
    }
    let mut last = None;
    for addr in candidates {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // A command is one small write awaiting its reply: Nagle's
                // algorithm would hold the next one back for the ACK.
                stream.set_nodelay(true).map_err(Error::from)?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(Error::ConnectTcp {
        address: text.to_owned(),
        source: last.expect("at least one address was tried").into(),
    })
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Io { io, .. } => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Io { io, .. } => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Io { io, .. } => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Io { io, .. } => Pin::new(io).poll_shutdown(cx),
        }
    }
}
