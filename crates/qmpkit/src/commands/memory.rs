//! Guest memory: its size and layout, the balloon, memory backends and
//! hotplugged memory devices.
//!
//! Hotplugging a DIMM (the VM must have been started with
//! `-m SIZE,slots=N,maxmem=MAX`):
//!
//! ```no_run
//! # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
//! use qmpkit::commands::devices::{DeviceSpec, ObjectSpec};
//! client.add_object(&ObjectSpec::new("memory-backend-ram", "mem1").prop("size", 1u64 << 30)).await?;
//! client.add_device(&DeviceSpec::new("pc-dimm").id("dimm1").prop("memdev", "mem1")).await?;
//! for dimm in client.dimm_devices().await? {
//!     println!("{} at {:#x}", dimm.id, dimm.addr);
//! }
//! # Ok(()) }
//! ```

use serde::Deserialize;
use serde_json::Value;

use qmpkit_qapi::commands as c;

use crate::client::{CallOptions, Client};
use crate::error::Result;

/// A memory backend (an entry of `query-memdev`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct MemDev {
    /// The backend's id (`pc.ram` for the machine's own RAM).
    #[serde(default)]
    pub id: String,
    /// Its size in bytes.
    #[serde(default)]
    pub size: u64,
    /// True when KSM may merge its pages.
    #[serde(default)]
    pub merge: bool,
    /// True when it is included in core dumps.
    #[serde(default)]
    pub dump: bool,
    /// True when it was allocated up front.
    #[serde(default)]
    pub prealloc: bool,
    /// True when it is shared (`share=on`).
    #[serde(default)]
    pub share: bool,
    /// True when swap space (or huge pages) was reserved for it.
    #[serde(default)]
    pub reserve: bool,
    /// The host NUMA nodes it is bound to.
    #[serde(default)]
    pub host_nodes: Vec<u16>,
    /// Its NUMA policy (`default`, `preferred`, `bind`, `interleave`).
    #[serde(default)]
    pub policy: String,
}

/// A hotpluggable memory device (an entry of `query-memory-devices`): its
/// kind (`dimm`, `nvdimm`, `virtio-mem`, `virtio-pmem`, `sgx-epc`,
/// `hv-balloon`) and that kind's data.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct MemoryDevice {
    /// The kind of device.
    #[serde(rename = "type")]
    pub kind: String,
    /// The kind's own data.
    #[serde(default)]
    pub data: Value,
}

impl MemoryDevice {
    /// The device as a DIMM, when it is a `pc-dimm` (kind `dimm`).
    pub fn dimm(&self) -> Option<PcDimmDevice> {
        if self.kind != "dimm" {
            return None;
        }
        PcDimmDevice::deserialize(&self.data).ok()
    }
}

/// A `pc-dimm` memory device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct PcDimmDevice {
    /// The device's id (empty when it has none).
    #[serde(default)]
    pub id: String,
    /// Its guest physical address.
    #[serde(default)]
    pub addr: u64,
    /// Its size in bytes.
    #[serde(default)]
    pub size: u64,
    /// Its slot number.
    #[serde(default)]
    pub slot: i64,
    /// Its NUMA node.
    #[serde(default)]
    pub node: i64,
    /// The QOM path of its memory backend, such as `/objects/mem1`.
    #[serde(default)]
    pub memdev: String,
    /// True when it can be unplugged.
    #[serde(default)]
    pub hotpluggable: bool,
    /// True when it was plugged after start-up.
    #[serde(default)]
    pub hotplugged: bool,
}

/// The machine's memory layout: the `-m SIZE,slots=N,maxmem=MAX` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// The base (boot) memory in bytes.
    pub current: u64,
    /// The most memory the VM may have with hotplugged memory, in bytes
    /// (equal to `current` when no `maxmem` was set).
    pub max: u64,
    /// The number of slots for memory devices (0 when none were set).
    pub slots: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct MemorySizeConfiguration {
    size: u64,
    #[serde(default)]
    max_size: Option<u64>,
    #[serde(default)]
    slots: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct MemorySizeSummary {
    base_memory: u64,
}

#[derive(Deserialize)]
struct BalloonInfo {
    actual: i64,
}

impl Client {
    /// The VM's base memory in bytes, without hotplugged memory
    /// (`query-memory-size-summary` `base-memory`).
    #[doc(alias = "GetMemorySizeBytes")]
    #[doc(alias = "query-memory-size-summary")]
    pub async fn memory_size_bytes(&self) -> Result<u64> {
        let summary: MemorySizeSummary = self
            .run_as(&c::QueryMemorySizeSummary, CallOptions::new())
            .await?;
        Ok(summary.base_memory)
    }

    /// The memory the guest has now that the balloon has taken its share,
    /// in bytes (`query-balloon` `actual`). Without a balloon device this
    /// is QEMU's `DeviceNotActive` error.
    #[doc(alias = "GetMemoryBalloonSizeBytes")]
    #[doc(alias = "query-balloon")]
    pub async fn memory_balloon_size_bytes(&self) -> Result<i64> {
        let info: BalloonInfo = self.run_as(&c::QueryBalloon, CallOptions::new()).await?;
        Ok(info.actual)
    }

    /// Asks the balloon to leave the guest `bytes` of memory (`balloon`).
    /// The guest's balloon driver does the work, so the size reported by
    /// [`Client::memory_balloon_size_bytes`] changes only once it has.
    /// Zero, and a VM without a balloon device, are QEMU's errors.
    #[doc(alias = "SetMemoryBalloonSizeBytes")]
    #[doc(alias = "balloon")]
    pub async fn set_memory_balloon_size_bytes(&self, bytes: i64) -> Result<()> {
        self.run(&c::Balloon { value: bytes }).await.map(drop)
    }

    /// The memory backends (`query-memdev`).
    #[doc(alias = "GetMemdev")]
    #[doc(alias = "query-memdev")]
    pub async fn memdev(&self) -> Result<Vec<MemDev>> {
        self.run_as(&c::QueryMemdev, CallOptions::new()).await
    }

    /// The hotpluggable memory devices of every kind (`query-memory-devices`).
    #[doc(alias = "GetMemoryDevices")]
    #[doc(alias = "query-memory-devices")]
    pub async fn memory_devices(&self) -> Result<Vec<MemoryDevice>> {
        self.run_as(&c::QueryMemoryDevices, CallOptions::new()).await
    }

    /// The `pc-dimm` memory devices.
    #[doc(alias = "GetDimmDevices")]
    pub async fn dimm_devices(&self) -> Result<Vec<PcDimmDevice>> {
        let devices = self.memory_devices().await?;
        Ok(devices.iter().filter_map(MemoryDevice::dimm).collect())
    }

    /// The machine's memory layout (base size, maximum, slots), read from
    /// the QOM property `memory` of `/machine`.
    #[doc(alias = "MemoryConfiguration")]
    pub async fn memory_configuration(&self) -> Result<MemoryConfig> {
        let m: MemorySizeConfiguration = self
            .run_as(&super::vm::qom_get("/machine", "memory"), CallOptions::new())
            .await?;
        Ok(MemoryConfig {
            current: m.size,
            max: m.max_size.unwrap_or(m.size),
            slots: m.slots.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_dimms_decode_as_dimms() {
        let devs: Vec<MemoryDevice> = serde_json::from_value(json!([
            {"type": "dimm", "data": {"memdev": "/objects/mem1", "hotplugged": true, "addr": 4294967296u64,
              "hotpluggable": true, "size": 134217728, "slot": 0, "node": 0, "id": "dimm1"}},
            {"type": "virtio-mem", "data": {"id": "vm0", "memdev": "/objects/m2"}}
        ]))
        .unwrap();
        let d = devs[0].dimm().unwrap();
        assert_eq!((d.id.as_str(), d.addr, d.slot), ("dimm1", 1 << 32, 0));
        assert!(devs[1].dimm().is_none());
    }
}
