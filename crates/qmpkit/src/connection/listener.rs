//! Accept mode: the client listens, and QEMU connects to it.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};

use super::address::Address;
use super::transport::Transport;
use super::ConnectOptions;
use crate::client::Client;
use crate::error::{Error, Result};

/// A socket that QEMU connects to, for a VM whose monitor is a client
/// (`-chardev socket,id=mon0,path=PATH,server=off,reconnect-ms=500 -mon
/// chardev=mon0,mode=control`, or `host=,port=` for TCP): the manager need
/// not wait for QEMU to create its socket, and QEMU (with `reconnect-ms`)
/// comes back by itself when the connection drops.
///
/// A Unix listener removes its socket file when dropped, unless the file
/// was replaced meanwhile. One listener can accept any number of
/// connections in turn (QEMU reconnecting, say).
///
/// ```no_run
/// # async fn f() -> qmpkit::Result<()> {
/// use std::time::Duration;
/// let listener = qmpkit::Listener::bind(qmpkit::Address::unix("/run/vm1/qmp.sock")).await?;
/// // ... start QEMU with -chardev socket,id=mon0,path=/run/vm1/qmp.sock,server=off,reconnect-ms=500
/// //                    -mon chardev=mon0,mode=control
/// let client = listener.accept(Duration::from_secs(30)).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    address: Address,
}

#[derive(Debug)]
enum Socket {
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// The device and inode of the socket file this listener made, to
        /// remove it on drop only if it is still ours.
        file: Option<(u64, u64)>,
    },
    Tcp(TcpListener),
}

impl Listener {
    /// Listens on a Unix socket path (which must not exist yet) or a TCP
    /// address (port 0 picks a free port; see [`Listener::address`]).
    /// Fails with [`Error::Listen`].
    pub async fn bind(address: impl Into<Address>) -> Result<Listener> {
        let address = address.into();
        let failed = |e: std::io::Error| Error::Listen {
            address: address.to_string(),
            source: Arc::new(e),
        };
        match &address {
            Address::Unix(path) => {
                let listener = UnixListener::bind(path).map_err(failed)?;
                let file = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
                Ok(Listener {
                    socket: Socket::Unix {
                        listener,
                        path: path.clone(),
                        file,
                    },
                    address,
                })
            }
            Address::Tcp(text) => {
                let listener = TcpListener::bind(text.as_str()).await.map_err(failed)?;
                let bound = listener.local_addr().map_err(failed)?;
                Ok(Listener {
                    socket: Socket::Tcp(listener),
                    address: Address::from(bound),
                })
            }
        }
    }

    /// Where the listener listens; for TCP, with the port actually bound.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Waits up to `timeout` for a QMP server to connect and negotiates
    /// with the default [`ConnectOptions`]; see [`ConnectOptions::accept`].
    pub async fn accept(&self, timeout: Duration) -> Result<Client> {
        ConnectOptions::new().accept(self, timeout).await
    }

    /// Waits for the next connection; no time limit.
    async fn next(&self) -> std::io::Result<Transport> {
        match &self.socket {
            Socket::Unix { listener, .. } => Ok(Transport::Unix(listener.accept().await?.0)),
            Socket::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                Ok(Transport::Tcp(stream))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Socket::Unix {
            path,
            file: Some(ours),
            ..
        } = &self.socket
        {
            // Only the file this listener made: a later listener may have
            // taken the path over since.
            let still_ours = std::fs::symlink_metadata(path)
                .map(|m| (m.dev(), m.ino()) == *ours)
                .unwrap_or(false);
            if still_ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl ConnectOptions {
    /// Waits up to `timeout` for a QMP server (QEMU connecting out) to
    /// connect to `listener`, then negotiates within the handshake budget.
    ///
    /// Nobody connecting in time fails with [`Error::AcceptTimeout`], which
    /// names the address; a peer that does not speak QMP fails with
    /// [`Error::Handshake`]. Either way the listener can accept again. The
    /// client's [`Client::address`] is the listener's.
    pub async fn accept(&self, listener: &Listener, timeout: Duration) -> Result<Client> {
        let accepted = tokio::time::timeout(timeout, listener.next())
            .await
            .map_err(|_| Error::AcceptTimeout {
                address: listener.address.to_string(),
                waited: timeout,
            })?
            .map_err(|e| Error::Listen {
                address: listener.address.to_string(),
                source: Arc::new(e),
            })?;
        let peer = format!("the server that connected to {}", listener.address);
        let (tx, shared) = self
            .open_over(&peer, None, std::future::ready(Ok(accepted)))
            .await?;
        Ok(Client::new(tx, shared, Some(listener.address.clone())))
    }
}
