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

use serde::Deserialize;
use serde_json::json;

use crate::client::{Client, Empty};
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
        let args = json!({
            "addr": {"type": "unix", "data": {"path": name, "abstract": true}},
            "max-connections": 1,
        });
        self.call::<_, Empty>("nbd-server-start", &args).await?;
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
        let args = json!({
            "addr": {"type": "unix", "data": {"path": path}},
            "max-connections": 1,
        });
        self.call::<_, Empty>("nbd-server-start", &args).await?;
        Ok(())
    }

    /// Stops the NBD server and removes its exports (`nbd-server-stop`).
    #[doc(alias = "NBDServerStop")]
    pub async fn nbd_server_stop(&self) -> Result<()> {
        self.call::<_, Empty>("nbd-server-stop", &()).await?;
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
        let mut args = json!({
            "type": "nbd", "id": node_name, "node-name": node_name, "writable": writable,
        });
        if !bitmaps.is_empty() {
            let names: Vec<&str> = bitmaps.iter().map(AsRef::as_ref).collect();
            args["bitmaps"] = json!(names);
        }
        self.call::<_, Empty>("block-export-add", &args).await?;
        Ok(())
    }

    /// Every block export, of any type (`query-block-exports`).
    #[doc(alias = "QueryBlockExports")]
    pub async fn query_block_exports(&self) -> Result<Vec<BlockExport>> {
        self.call("query-block-exports", &()).await
    }

    /// The NBD exports only.
    #[doc(alias = "QueryNBDBlockExports")]
    pub async fn query_nbd_block_exports(&self) -> Result<Vec<BlockExport>> {
        let mut exports = self.query_block_exports().await?;
        exports.retain(|e| e.export_type == "nbd");
        Ok(exports)
    }
}
