//! QEMU's built-in NBD server: start it, export block nodes, list exports.
//!
//! ```no_run
//! # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
//! client.nbd_unix_server_start("/run/vm1/nbd.sock").await?;
//! client.nbd_block_export_add("disk0", false, &[] as &[&str]).await?;
//! // Now: qemu-img info 'nbd+unix:///disk0?socket=/run/vm1/nbd.sock'
//! # Ok(()) }
//! ```

use std::os::linux::net::SocketAddrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use qmpkit_qapi::{commands as c, types as t};
use serde::Deserialize;

use crate::client::{CallOptions, Client};
use crate::error::{Error, Result};

/// An export of QEMU's block export server (`query-block-exports`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BlockExport {
    /// The export's id.
    pub id: String,
    /// The exported node.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// The export type (`nbd`, `fuse`, `vhost-user-blk`, ...).
    #[serde(rename = "type")]
    pub export_type: String,
    /// True while the export is being removed.
    #[serde(rename = "shutting-down")]
    pub shutting_down: bool,
}

/// Makes abstract socket names unique within this process.
static NEXT_SERVER: AtomicU64 = AtomicU64::new(0);

impl Client {
    /// Starts the NBD server on a fresh abstract Unix socket that only this
    /// process knows, accepting a single client, and returns a connection
    /// to it (the server's handshake is the first thing to read from it).
    ///
    /// Stop it with [`Client::nbd_server_stop`].
    #[doc(alias = "NBDServerStart")]
    pub async fn nbd_server_start(&self) -> Result<tokio::net::UnixStream> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let name = format!(
            "qmpkit/nbd/{}/{}/{}",
            std::process::id(),
            NEXT_SERVER.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        self.run(&unix_server(name.clone(), Some(true))).await?;
        let connect = || -> std::io::Result<tokio::net::UnixStream> {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            let stream = std::os::unix::net::UnixStream::connect_addr(&addr)?;
            stream.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(stream)
        };
        match connect() {
            Ok(stream) => Ok(stream),
            Err(e) => {
                // Leave no server behind that nobody can reach.
                let _ = self.nbd_server_stop().await;
                Err(Error::from(e))
            }
        }
    }

    /// Starts the NBD server listening on the Unix socket `path`
    /// (`nbd-server-start`), accepting one client at a time.
    #[doc(alias = "NBDUnixServerStart")]
    pub async fn nbd_unix_server_start(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path
            .as_ref()
            .to_str()
            .ok_or_else(|| Error::InvalidRequest(format!("socket path {:?} is not UTF-8", path.as_ref())))?;
        self.run(&unix_server(path.to_owned(), None)).await?;
        Ok(())
    }

    /// Stops the NBD server and removes its exports (`nbd-server-stop`).
    #[doc(alias = "NBDServerStop")]
    pub async fn nbd_server_stop(&self) -> Result<()> {
        self.run(&c::NbdServerStop).await?;
        Ok(())
    }

    /// Exports the node `node_name` on the NBD server under the export name
    /// (and export id) `node_name` (`block-export-add` of type `nbd`),
    /// read-only unless `writable`, with the named dirty bitmaps of the
    /// node published as `qemu:dirty-bitmap:NAME` metadata contexts.
    #[doc(alias = "NBDBlockExportAdd")]
    pub async fn nbd_block_export_add<S: AsRef<str>>(
        &self,
        node_name: &str,
        writable: bool,
        bitmaps: &[S],
    ) -> Result<()> {
        let bitmaps = (!bitmaps.is_empty()).then(|| {
            bitmaps
                .iter()
                .map(|b| t::BlockDirtyBitmapOrStr::Local(b.as_ref().to_owned()))
                .collect()
        });
        let export = t::BlockExportOptions {
            id: node_name.into(),
            fixed_iothread: None,
            iothread: None,
            node_name: node_name.into(),
            writable: Some(writable),
            writethrough: None,
            allow_inactive: None,
            branch: t::BlockExportOptionsBranch::Nbd(t::BlockExportOptionsNbd {
                bitmaps,
                ..Default::default()
            }),
        };
        self.run(&c::BlockExportAdd(export)).await?;
        Ok(())
    }

    /// Every block export, of any type (`query-block-exports`).
    #[doc(alias = "QueryBlockExports")]
    pub async fn query_block_exports(&self) -> Result<Vec<BlockExport>> {
        self.run_as(&c::QueryBlockExports, CallOptions::new()).await
    }

    /// The NBD exports only.
    #[doc(alias = "QueryNBDBlockExports")]
    pub async fn query_nbd_block_exports(&self) -> Result<Vec<BlockExport>> {
        let mut exports = self.query_block_exports().await?;
        exports.retain(|e| e.export_type == "nbd");
        Ok(exports)
    }
}

/// `nbd-server-start` on a Unix socket, one client at a time.
fn unix_server(path: String, r#abstract: Option<bool>) -> c::NbdServerStart {
    c::NbdServerStart(t::NbdServerOptionsLegacy {
        handshake_max_seconds: None,
        tls_creds: None,
        tls_authz: None,
        max_connections: Some(1),
        addr: t::SocketAddressLegacy::Unix(t::UnixSocketAddressWrapper {
            data: t::UnixSocketAddress {
                path,
                r#abstract,
                tight: None,
            },
        }),
    })
}
