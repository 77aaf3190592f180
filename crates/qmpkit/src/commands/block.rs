//! Block devices: adding and removing disks, inspecting nodes and devices,
//! resizing, throttling, snapshots, backing files and dirty bitmaps.
//!
//! Nodes are named with `node-name` (the `-blockdev` way); the methods here
//! take node names unless they say otherwise.
//!
//! ```no_run
//! # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
//! use serde_json::json;
//!
//! client
//!     .add_block_device(
//!         &json!({"driver": "qcow2", "node-name": "disk0",
//!                 "file": {"driver": "file", "filename": "/var/lib/vm/disk0.qcow2"}}),
//!         &json!({"driver": "virtio-blk-pci", "id": "disk0", "drive": "disk0", "bus": "rp1"}),
//!         false,
//!     )
//!     .await?;
//! for info in client.query_block().await? {
//!     println!("{:?} -> {:?}", info.qdev, info.inserted.map(|i| i.node_name));
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use qmpkit_qapi::{commands as c, types as t};

use crate::client::{CallOptions, Client, Command, Empty};
use crate::error::{Error, Result};

/// One guest-visible block device, as `query-block` reports it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct BlockInfo {
    /// The legacy drive name (empty for devices backed by `-blockdev` nodes).
    #[serde(default)]
    pub device: String,
    /// The guest device's qdev id, or its QOM path when it has no id.
    #[serde(default)]
    pub qdev: Option<String>,
    /// True for removable media (CD-ROM, floppy).
    #[serde(default)]
    pub removable: bool,
    /// True when the guest locked the tray.
    #[serde(default)]
    pub locked: bool,
    /// The medium, when one is inserted.
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

/// A block node: the medium of a device, or any named node of the graph.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BlockDeviceInfo {
    /// The node's name (QEMU makes one up, `#blockNNN`, for unnamed nodes).
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// The node's driver (`qcow2`, `raw`, `file`, ...).
    pub drv: String,
    /// The file name QEMU shows for the node.
    pub file: String,
    /// True when the node is read-only.
    pub ro: bool,
    /// The backing file's name, if the node has one.
    pub backing_file: Option<String>,
    /// How many backing images lie below this node.
    pub backing_file_depth: u64,
    /// Read throughput limit in bytes per second (0 = none).
    pub bps_rd: u64,
    /// Write throughput limit in bytes per second (0 = none).
    pub bps_wr: u64,
    /// Read operations per second limit (0 = none).
    pub iops_rd: u64,
    /// Write operations per second limit (0 = none).
    pub iops_wr: u64,
    /// The node's dirty bitmaps.
    #[serde(rename = "dirty-bitmaps")]
    pub dirty_bitmaps: Vec<BlockDirtyInfo>,
    /// What the image format says about the image and its backing chain.
    pub image: Option<ImageInfo>,
}

/// An image and, recursively, its backing image.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ImageInfo {
    /// The image's file name.
    pub filename: String,
    /// The image's format.
    pub format: String,
    /// The size the guest sees, in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// The backing file name as recorded in the image.
    #[serde(rename = "backing-filename")]
    pub backing_filename: Option<String>,
    /// The backing file name, resolved.
    #[serde(rename = "full-backing-filename")]
    pub full_backing_filename: Option<String>,
    /// The backing image, when there is one.
    #[serde(rename = "backing-image")]
    pub backing_image: Option<Box<ImageInfo>>,
}

impl ImageInfo {
    /// How many images the chain from here down has (1 for an image without backing).
    pub fn chain_length(&self) -> usize {
        1 + self.backing_image.as_ref().map_or(0, |b| b.chain_length())
    }
}

/// A dirty bitmap of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BlockDirtyInfo {
    /// The bitmap's name.
    pub name: String,
    /// How many bytes are marked dirty.
    pub count: u64,
    /// Bytes covered by one bit.
    pub granularity: u64,
    /// True while it records writes.
    pub recording: bool,
    /// True while an operation (a job, an export) holds it.
    pub busy: bool,
    /// True when it is stored in the image and survives QEMU.
    pub persistent: bool,
    /// True when a stored bitmap was not saved cleanly and cannot be trusted.
    pub inconsistent: bool,
}

/// I/O counters of one device or node (from `query-blockstats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BlockStats {
    /// Bytes written.
    #[serde(rename = "wr_bytes")]
    pub bytes_written: u64,
    /// Write operations completed.
    #[serde(rename = "wr_operations")]
    pub writes_completed: u64,
    /// Bytes read.
    #[serde(rename = "rd_bytes")]
    pub bytes_read: u64,
    /// Read operations completed.
    #[serde(rename = "rd_operations")]
    pub reads_completed: u64,
}

#[derive(Deserialize)]
struct BlockStatsEntry {
    #[serde(default)]
    device: String,
    #[serde(default)]
    qdev: Option<String>,
    #[serde(rename = "node-name", default)]
    node_name: Option<String>,
    #[serde(default)]
    stats: BlockStats,
}

#[derive(Deserialize)]
struct NodeName {
    #[serde(rename = "node-name")]
    node_name: String,
}

/// Serialises a caller's free-form spec into a JSON object.
pub(crate) fn to_object(spec: &impl Serialize, what: &str) -> Result<Map<String, Value>> {
    match serde_json::to_value(spec) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(Error::InvalidRequest(format!(
            "{what} must be a JSON object, not {other}"
        ))),
        Err(e) => Err(Error::InvalidRequest(format!("{what}: {e}"))),
    }
}

fn string_member<'a>(obj: &'a Map<String, Value>, key: &str, what: &str) -> Result<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(Error::InvalidRequest(format!("{what} needs a string \"{key}\""))),
    }
}

impl Client {
    /// Adds a disk: `blockdev-add` of `blockdev` (which must have a
    /// `node-name`), then `device_add` of `device` (which refers to that
    /// node, usually through `drive`).
    ///
    /// With `usb`, the disk becomes a USB mass-storage device: a detached
    /// `usb-bot` controller with id `usb_<device id>` is added first (on any
    /// free USB port), `device` (for example a `scsi-hd`, which needs an
    /// `id`) goes on its bus, and the controller is attached last, so the
    /// guest sees the disk appear complete.
    ///
    /// If any step fails, the steps already done are undone in reverse
    /// order, so nothing is left behind, and the first error is returned.
    #[doc(alias = "AddBlockDevice")]
    pub async fn add_block_device(
        &self,
        blockdev: &impl Serialize,
        device: &impl Serialize,
        usb: bool,
    ) -> Result<()> {
        let blockdev = to_object(blockdev, "blockdev")?;
        let mut device = to_object(device, "device")?;
        let node = string_member(&blockdev, "node-name", "blockdev")?.to_owned();

        let usb_id = if usb {
            let id = string_member(&device, "id", "a USB disk's device")?;
            let usb_id = format!("usb_{id}");
            // Detached, so that the guest sees the disk only once it is complete.
            let controller = c::DeviceAdd {
                driver: "usb-bot".into(),
                bus: None,
                id: Some(usb_id.clone()),
                extra: Map::from_iter([("attached".to_owned(), Value::Bool(false))]),
            };
            self.run(&controller).await?;
            device.insert("bus".into(), Value::String(format!("{usb_id}.0")));
            Some(usb_id)
        } else {
            None
        };

        // Undoes what was done so far, in reverse order; best effort.
        let undo = |device_added: bool, blockdev_added: bool| {
            let device_id = device.get("id").and_then(Value::as_str).map(str::to_owned);
            let usb_id = usb_id.clone();
            let node = node.clone();
            async move {
                if device_added {
                    if let Some(id) = device_id {
                        let _ = self.run(&c::DeviceDel { id }).await;
                    }
                }
                if blockdev_added {
                    let _ = self.run(&c::BlockdevDel { node_name: node }).await;
                }
                if let Some(usb_id) = usb_id {
                    let _ = self.run(&c::DeviceDel { id: usb_id }).await;
                }
            }
        };

        // The caller's own JSON, as given: any driver and option of any QEMU.
        if let Err(e) = self.call::<_, Empty>(c::BlockdevAdd::NAME, &blockdev).await {
            undo(false, false).await;
            return Err(e);
        }
        if let Err(e) = self.call::<_, Empty>(c::DeviceAdd::NAME, &device).await {
            undo(false, true).await;
            return Err(e);
        }
        if let Some(usb_id) = &usb_id {
            let attach = c::QomSet {
                path: usb_id.clone(),
                property: "attached".into(),
                value: Value::Bool(true),
            };
            if let Err(e) = self.run(&attach).await {
                undo(true, true).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Removes a block node (`blockdev-del`). A node that does not exist
    /// counts as removed; a node still attached to a device, a job or an
    /// export fails with an error for which [`Error::is_in_use`] is true (remove the device first).
    #[doc(alias = "RemoveBlockDevice")]
    pub async fn remove_block_device(&self, node_name: &str) -> Result<()> {
        match self
            .run(&c::BlockdevDel {
                node_name: node_name.into(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every guest-visible block device (`query-block`).
    #[doc(alias = "QueryBlock")]
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>> {
        self.run_as(&c::QueryBlock, CallOptions::new()).await
    }

    /// The names of every named node of the block graph, including the
    /// nodes below others (`query-named-block-nodes` with `flat`).
    #[doc(alias = "QueryNamedBlockNodes")]
    pub async fn query_named_block_nodes(&self) -> Result<Vec<String>> {
        let query = c::QueryNamedBlockNodes { flat: Some(true) };
        let nodes: Vec<NodeName> = self.run_as(&query, CallOptions::new()).await?;
        Ok(nodes.into_iter().map(|n| n.node_name).collect())
    }

    /// Every named node of the block graph with its details, each with its
    /// whole backing chain in [`BlockDeviceInfo::image`] (`query-named-block-nodes`).
    pub async fn query_block_nodes(&self) -> Result<Vec<BlockDeviceInfo>> {
        let query = c::QueryNamedBlockNodes { flat: None };
        self.run_as(&query, CallOptions::new()).await
    }

    /// Rewrites the backing file name recorded in `image_node` (a node in
    /// the chain under `device`, the chain's top node or device name)
    /// without touching the data (`change-backing-file`).
    #[doc(alias = "ChangeBackingFile")]
    pub async fn change_backing_file(
        &self,
        device: &str,
        image_node: &str,
        backing_file: &str,
    ) -> Result<()> {
        let change = c::ChangeBackingFile {
            device: device.into(),
            image_node_name: image_node.into(),
            backing_file: backing_file.into(),
        };
        self.run(&change).await?;
        Ok(())
    }

    /// Puts the already added node `overlay` on top of `node`, which becomes
    /// its backing image (`blockdev-snapshot`). The overlay must not have a
    /// backing image of its own yet.
    #[doc(alias = "BlockDevSnapshot")]
    pub async fn block_dev_snapshot(&self, node: &str, overlay: &str) -> Result<()> {
        let snapshot = c::BlockdevSnapshot(t::BlockdevSnapshot {
            node: node.into(),
            overlay: overlay.into(),
        });
        self.run(&snapshot).await?;
        Ok(())
    }

    /// Resizes the node `node_name` to `size` bytes (`block_resize`).
    #[doc(alias = "UpdateBlockSize")]
    pub async fn update_block_size(&self, node_name: &str, size: u64) -> Result<()> {
        let size = i64::try_from(size).map_err(|_| {
            Error::InvalidRequest(format!("block_resize: size {size} is beyond QEMU's range"))
        })?;
        let resize = c::BlockResize {
            device: None,
            node_name: Some(node_name.into()),
            size,
        };
        self.run(&resize).await?;
        Ok(())
    }

    /// Limits a disk's I/O (`block_set_io_throttle`); 0 means unlimited.
    ///
    /// `id` is the guest device's qdev id (or QOM path). Devices such as
    /// `virtio-blk-pci` keep their disk in an inner device; the id is
    /// looked up in `query-block` and resolved to that device's path.
    #[doc(alias = "SetBlockThrottle")]
    pub async fn set_block_throttle(
        &self,
        id: &str,
        bytes_read: u64,
        bytes_write: u64,
        iops_read: u64,
        iops_write: u64,
    ) -> Result<()> {
        let blocks = self.query_block().await?;
        let prefix = format!("/machine/peripheral/{id}/");
        let target = blocks
            .iter()
            .filter_map(|b| b.qdev.as_deref())
            .find(|q| *q == id || q.starts_with(&prefix))
            .unwrap_or(id);
        let limit = |value: u64, what: &str| {
            i64::try_from(value).map_err(|_| {
                Error::InvalidRequest(format!(
                    "block_set_io_throttle: {what} {value} is beyond QEMU's range"
                ))
            })
        };
        // The id and the six plain limits, nothing else: QEMU takes the
        // members left out as no bursts and no group.
        #[allow(deprecated)] // `device`, the legacy way to name the disk, is left out
        let throttle = t::BlockIOThrottle {
            device: None,
            id: Some(target.into()),
            bps: 0,
            bps_rd: limit(bytes_read, "bytes_read")?,
            bps_wr: limit(bytes_write, "bytes_write")?,
            iops: 0,
            iops_rd: limit(iops_read, "iops_read")?,
            iops_wr: limit(iops_write, "iops_write")?,
            bps_max: None,
            bps_rd_max: None,
            bps_wr_max: None,
            iops_max: None,
            iops_rd_max: None,
            iops_wr_max: None,
            bps_max_length: None,
            bps_rd_max_length: None,
            bps_wr_max_length: None,
            iops_max_length: None,
            iops_rd_max_length: None,
            iops_wr_max_length: None,
            iops_size: None,
            group: None,
        };
        self.run(&c::BlockSetIoThrottle(throttle)).await?;
        Ok(())
    }

    /// I/O counters of every block device and node (`query-blockstats`),
    /// keyed by the guest device (its qdev id or path as QEMU reports it),
    /// else the drive name, else the node name.
    #[doc(alias = "GetBlockStats")]
    pub async fn block_stats(&self) -> Result<HashMap<String, BlockStats>> {
        let query = c::QueryBlockstats { query_nodes: None };
        let entries: Vec<BlockStatsEntry> = self.run_as(&query, CallOptions::new()).await?;
        let mut out = HashMap::new();
        for e in entries {
            let key = e
                .qdev
                .filter(|q| !q.is_empty())
                .or_else(|| (!e.device.is_empty()).then_some(e.device))
                .or(e.node_name);
            if let Some(key) = key {
                out.insert(key, e.stats);
            }
        }
        Ok(out)
    }

    /// Creates a dirty bitmap `name` on each of `nodes`, all or none (one
    /// `transaction` of `block-dirty-bitmap-add`). `granularity` is in
    /// bytes (a power of two; `None` lets QEMU choose); `persistent` stores
    /// it in the image (qcow2); `disabled` creates it without recording.
    #[doc(alias = "AddDirtyBitmap")]
    pub async fn add_dirty_bitmap<S: AsRef<str>>(
        &self,
        nodes: &[S],
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> Result<()> {
        if nodes.is_empty() {
            return Err(Error::InvalidRequest(
                "add_dirty_bitmap needs at least one node".into(),
            ));
        }
        let granularity = granularity
            .map(|g| {
                u32::try_from(g).map_err(|_| {
                    Error::InvalidRequest(format!(
                        "add_dirty_bitmap: granularity {g} is beyond QEMU's range"
                    ))
                })
            })
            .transpose()?;
        let actions = nodes
            .iter()
            .map(|node| {
                t::TransactionAction::BlockDirtyBitmapAdd(t::BlockDirtyBitmapAddWrapper {
                    data: t::BlockDirtyBitmapAdd {
                        node: node.as_ref().into(),
                        name: name.into(),
                        granularity,
                        persistent: Some(persistent),
                        disabled: Some(disabled),
                    },
                })
            })
            .collect();
        let transaction = c::Transaction {
            actions,
            properties: None,
        };
        self.run(&transaction).await?;
        Ok(())
    }

    /// Deletes the dirty bitmap `name` of `node` (`block-dirty-bitmap-remove`).
    #[doc(alias = "RemoveDirtyBitmap")]
    pub async fn remove_dirty_bitmap(&self, node: &str, name: &str) -> Result<()> {
        let remove = c::BlockDirtyBitmapRemove(t::BlockDirtyBitmap {
            node: node.into(),
            name: name.into(),
        });
        self.run(&remove).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_query_block_tolerantly() {
        let v = json!([{
            "device": "", "qdev": "/machine/peripheral/d/virtio-backend", "removable": false,
            "locked": false, "type": "unknown", "io-status": "ok",
            "inserted": {"node-name": "top", "drv": "qcow2", "ro": false, "file": "/t.qcow2",
                "backing_file_depth": 1, "backing_file": "/b.qcow2", "new-field": [1, 2],
                "image": {"filename": "/t.qcow2", "format": "qcow2", "virtual-size": 1024,
                    "backing-image": {"filename": "/b.qcow2", "format": "qcow2", "virtual-size": 1024}}}
        }, {"device": "cd", "removable": true, "locked": false}]);
        let b: Vec<BlockInfo> = serde_json::from_value(v).unwrap();
        let ins = b[0].inserted.as_ref().unwrap();
        assert_eq!(ins.node_name, "top");
        assert_eq!(ins.image.as_ref().unwrap().chain_length(), 2);
        assert!(b[1].inserted.is_none());
    }
}
