//! Screenshots, memory dumps, and what this QEMU supports: SPICE, 9p,
//! virtio-sound, AMD SEV.
//!
//! ```no_run
//! # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
//! use qmpkit::commands::misc::DumpFormat;
//! client.screendump("/tmp/vm1.png").await?;
//! client.dump_guest_memory("/tmp/vm1.core", DumpFormat::Elf).await?;
//! if client.query_9p_device().await.is_ok() {
//!     println!("virtio-9p is available");
//! }
//! # Ok(()) }
//! ```

use std::path::Path;

use qmpkit_qapi::{commands as c, types as t};
use serde::Deserialize;
use serde_json::Value;

use crate::client::{CallOptions, Client};
use crate::error::{Error, Result};

/// The file format of [`Client::dump_guest_memory`]: the generated
/// `DumpGuestMemoryFormat` (`Elf`, `KdumpZlib`, `WinDmp`, ...).
pub use qmpkit_qapi::types::DumpGuestMemoryFormat as DumpFormat;

/// What `query-spice` reports about the SPICE server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct SpiceInfo {
    /// True when a SPICE server runs (`-spice` was given).
    pub enabled: bool,
    /// True when the last migration moved the SPICE clients too.
    #[serde(default)]
    pub migrated: bool,
    /// The address it listens on.
    #[serde(default)]
    pub host: Option<String>,
    /// Its plain port.
    #[serde(default)]
    pub port: Option<i64>,
    /// Its TLS port.
    #[serde(default)]
    pub tls_port: Option<i64>,
    /// Its authentication method.
    #[serde(default)]
    pub auth: Option<String>,
    /// The SPICE library's version.
    #[serde(default)]
    pub compiled_version: Option<String>,
    /// `client` or `server` mouse mode.
    #[serde(default)]
    pub mouse_mode: Option<String>,
    /// The connected channels (QEMU's objects as they are).
    #[serde(default)]
    pub channels: Vec<Value>,
}

/// The AMD SEV features of the host (`query-sev-capabilities`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct AmdSevCapabilities {
    /// The platform Diffie-Hellman key (base64).
    #[serde(default)]
    pub pdh: String,
    /// The PDH certificate chain (base64).
    #[serde(default)]
    pub cert_chain: String,
    /// The unique id of CPU0 (base64).
    #[serde(default)]
    pub cpu0_id: String,
    /// The C-bit's position in a page table entry.
    #[serde(rename = "cbitpos", default)]
    pub cbit_pos: i64,
    /// How many physical address bits SEV takes away.
    #[serde(default)]
    pub reduced_phys_bits: i64,
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| Error::InvalidRequest(format!("path {} is not valid UTF-8", path.display())))
}

impl Client {
    /// Saves a PNG screenshot of the VM's display to a file on QEMU's host
    /// (`screendump`). A VM without a display device is QEMU's error.
    #[doc(alias = "Screendump")]
    pub async fn screendump(&self, path: impl AsRef<Path>) -> Result<()> {
        let filename = path_str(path.as_ref())?;
        let dump = c::Screendump {
            filename: filename.into(),
            device: None,
            head: None,
            format: Some(t::ImageFormat::Png),
        };
        self.run(&dump).await.map(drop)
    }

    /// Writes the guest's memory to a file on QEMU's host
    /// (`dump-guest-memory`, without paging, not detached: the call returns
    /// once the dump is complete).
    #[doc(alias = "DumpGuestMemory")]
    #[doc(alias = "dump-guest-memory")]
    pub async fn dump_guest_memory(&self, path: impl AsRef<Path>, format: DumpFormat) -> Result<()> {
        let protocol = format!("file:{}", path_str(path.as_ref())?);
        let dump = c::DumpGuestMemory {
            paging: false,
            protocol,
            detach: Some(false),
            begin: None,
            length: None,
            format: Some(format),
        };
        self.run(&dump).await.map(drop)
    }

    /// The SPICE server's state (`query-spice`). A QEMU built without SPICE
    /// has no such command ([`Error::is_not_found`]). A QEMU with SPICE as
    /// a loadable module answers even when the module is not installed, so
    /// `enabled: true` is what shows that SPICE actually runs.
    #[doc(alias = "QuerySpice")]
    #[doc(alias = "query-spice")]
    pub async fn query_spice(&self) -> Result<SpiceInfo> {
        self.run_as(&c::QuerySpice, CallOptions::new()).await
    }

    /// Ok when this QEMU has the device type `typename`
    /// (`device-list-properties`); otherwise QEMU's `DeviceNotFound` error
    /// ([`Error::is_not_found`]).
    #[doc(alias = "device-list-properties")]
    pub async fn query_device_type(&self, typename: &str) -> Result<()> {
        let query = c::DeviceListProperties {
            typename: typename.into(),
        };
        self.run_as::<_, serde::de::IgnoredAny>(&query, crate::CallOptions::new())
            .await
            .map(drop)
    }

    /// Ok when this QEMU has `virtio-9p-pci` (host directories shared over 9p).
    #[doc(alias = "Query9pDevice")]
    pub async fn query_9p_device(&self) -> Result<()> {
        self.query_device_type("virtio-9p-pci").await
    }

    /// Ok when this QEMU has `virtio-sound-pci`.
    #[doc(alias = "QueryVirtioSoundDevice")]
    pub async fn query_virtio_sound_device(&self) -> Result<()> {
        self.query_device_type("virtio-sound-pci").await
    }

    /// The host's AMD SEV capabilities (`query-sev-capabilities`). Hosts
    /// without SEV get QEMU's error.
    #[doc(alias = "SEVCapabilities")]
    #[doc(alias = "query-sev-capabilities")]
    pub async fn sev_capabilities(&self) -> Result<AmdSevCapabilities> {
        self.run_as(&c::QuerySevCapabilities, CallOptions::new()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dump_formats_use_qemu_names() {
        assert_eq!(
            serde_json::to_value(DumpFormat::KdumpRawZlib).unwrap(),
            json!("kdump-raw-zlib")
        );
        assert_eq!(
            serde_json::to_value(DumpFormat::WinDmp).unwrap(),
            json!("win-dmp")
        );
    }

    #[test]
    fn sev_capabilities_decode() {
        let c: AmdSevCapabilities = serde_json::from_value(json!({
            "pdh": "cGRo", "cert-chain": "Y2VydA==", "cpu0-id": "aWQ=",
            "cbitpos": 51, "reduced-phys-bits": 1
        }))
        .unwrap();
        assert_eq!((c.cbit_pos, c.reduced_phys_bits), (51, 1));
    }
}
