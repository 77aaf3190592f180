//! vCPUs: the running ones, the slots for hotplug, vCPU threads for pinning,
//! and CPU model expansion.
//!
//! Hotplugging a vCPU (the VM must have been started with `-smp N,maxcpus=M`):
//!
//! ```no_run
//! # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
//! let slots = client.query_hotpluggable_cpus().await?;
//! if let Some(free) = slots.iter().find(|s| s.qom_path.is_none()) {
//!     client.add_device(&free.device("cpu1")).await?;
//! }
//! println!("{} vCPUs", client.query_cpus().await?.len());
//! # Ok(()) }
//! ```

use qmpkit_qapi::{commands as c, types as t};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::devices::DeviceSpec;
use crate::client::{CallOptions, Client};
use crate::error::Result;

/// Where a vCPU sits in the VM's topology. QEMU sets only the members the
/// machine uses, so each is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct CpuInstanceProperties {
    /// NUMA node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<i64>,
    /// Drawer (s390x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drawer_id: Option<i64>,
    /// Book (s390x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub book_id: Option<i64>,
    /// Socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_id: Option<i64>,
    /// Die within the socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub die_id: Option<i64>,
    /// Cluster within the die.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<i64>,
    /// Module within the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<i64>,
    /// Core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_id: Option<i64>,
    /// Thread within the core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<i64>,
}

/// A running vCPU (an entry of `query-cpus-fast`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct Cpu {
    /// QEMU's index of the vCPU.
    #[serde(default)]
    pub cpu_index: i64,
    /// The vCPU's QOM path.
    #[serde(default)]
    pub qom_path: String,
    /// The host thread (TID) that runs the vCPU.
    #[serde(default)]
    pub thread_id: i64,
    /// The target architecture, such as `x86_64`.
    #[serde(default)]
    pub target: String,
    /// Where it sits in the topology.
    #[serde(default)]
    pub props: CpuInstanceProperties,
}

/// A vCPU slot (an entry of `query-hotpluggable-cpus`): plugged when
/// `qom_path` is set, free otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct HotpluggableCpu {
    /// The device type to `device_add` into this slot.
    #[serde(rename = "type")]
    pub kind: String,
    /// How many vCPUs one device of this slot brings.
    #[serde(default)]
    pub vcpus_count: i64,
    /// The plugged vCPU's QOM path; `None` for a free slot.
    #[serde(default)]
    pub qom_path: Option<String>,
    /// The slot's place in the topology: the properties the device needs.
    #[serde(default)]
    pub props: CpuInstanceProperties,
}

impl HotpluggableCpu {
    /// The `device_add` arguments that plug a vCPU with this id into this slot.
    pub fn device(&self, id: &str) -> DeviceSpec {
        let mut spec = DeviceSpec::new(&self.kind).id(id);
        if let Ok(Value::Object(props)) = serde_json::to_value(&self.props) {
            for (k, v) in props {
                spec = spec.prop(k, v);
            }
        }
        spec
    }
}

/// A CPU model with its properties, as `query-cpu-model-expansion` expands it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct CpuModel {
    /// The model's name.
    pub name: String,
    /// Every property of the model with its value (CPU flags are booleans).
    #[serde(default)]
    pub props: Map<String, Value>,
}

#[derive(Deserialize)]
struct Expansion {
    model: CpuModel,
}

impl Client {
    /// The running vCPUs (`query-cpus-fast`).
    #[doc(alias = "QueryCPUs")]
    #[doc(alias = "query-cpus-fast")]
    pub async fn query_cpus(&self) -> Result<Vec<Cpu>> {
        self.run_as(&c::QueryCpusFast, CallOptions::new()).await
    }

    /// The vCPU slots, plugged and free (`query-hotpluggable-cpus`).
    #[doc(alias = "QueryHotpluggableCPUs")]
    #[doc(alias = "query-hotpluggable-cpus")]
    pub async fn query_hotpluggable_cpus(&self) -> Result<Vec<HotpluggableCpu>> {
        self.run_as(&c::QueryHotpluggableCpus, CallOptions::new()).await
    }

    /// The host thread ids of the vCPUs in vCPU index order, for pinning.
    #[doc(alias = "GetCPUs")]
    pub async fn vcpu_thread_ids(&self) -> Result<Vec<i64>> {
        let mut cpus = self.query_cpus().await?;
        cpus.sort_by_key(|c| c.cpu_index);
        Ok(cpus.into_iter().map(|c| c.thread_id).collect())
    }

    /// A CPU model fully expanded: every property it has, with the values
    /// this QEMU and accelerator give it (`query-cpu-model-expansion` with
    /// type `full`). An unknown model is QEMU's error.
    #[doc(alias = "QueryCPUModel")]
    #[doc(alias = "query-cpu-model-expansion")]
    pub async fn query_cpu_model(&self, model: &str) -> Result<CpuModel> {
        let expand = c::QueryCpuModelExpansion {
            r#type: t::CpuModelExpansionType::Full,
            model: t::CpuModelInfo {
                name: model.into(),
                props: None,
            },
        };
        let reply: Expansion = self.run_as(&expand, CallOptions::new()).await?;
        Ok(reply.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn slot_becomes_device_add_arguments() {
        let slot: HotpluggableCpu = serde_json::from_value(json!({
            "props": {"core-id": 1, "thread-id": 0, "socket-id": 0},
            "vcpus-count": 1, "type": "qemu64-x86_64-cpu", "future": true
        }))
        .unwrap();
        assert!(slot.qom_path.is_none());
        assert_eq!(
            serde_json::to_value(slot.device("cpu1")).unwrap(),
            json!({"driver": "qemu64-x86_64-cpu", "id": "cpu1",
                   "core-id": 1, "thread-id": 0, "socket-id": 0})
        );
    }
}
