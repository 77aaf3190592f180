//! Devices, NICs, QOM objects and secrets, and the PCI tree.
//!
//! ```no_run
//! # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
//! use std::time::Duration;
//! use qmpkit::commands::devices::{DeviceSpec, NetdevSpec};
//! client.add_nic(
//!     &NetdevSpec::new("user", "net0"),
//!     &DeviceSpec::new("virtio-net-pci").id("nic0").bus("rp1").prop("netdev", "net0"),
//!     true,
//! ).await?;
//! client.set_nic_link("nic0", false).await?;
//! client.remove_nic_and_wait("net0", Some("nic0"), Duration::from_secs(10)).await?;
//! # Ok(()) }
//! ```
//!
//! # Asking for removal, or waiting for it
//!
//! [`Client::remove_device`] and [`Client::remove_nic`] are the Go
//! package's `RemoveDevice` and `RemoveNIC`: they send the request, return
//! once QEMU accepts it, and count a device or netdev that does not exist as
//! removed. Incus calls them on clean-up paths and checks for itself
//! afterwards. [`Client::remove_device_and_wait`] and
//! [`Client::remove_nic_and_wait`] also wait, within a deadline, until the
//! device is gone, reading QEMU 10's events as they really come (a CPU's
//! unplug reported only by its `lapic`, a guest's refusal in an
//! `ACPI_DEVICE_OST`, a request a booting guest never saw, sent again).
//!
//! # Unplugging without a guest
//!
//! `device_del` only asks for removal; the device is gone when QEMU sends
//! `DEVICE_DELETED`, which [`Client::remove_device_and_wait`] waits for. For many
//! buses that needs the guest's help, so with no guest OS the event never
//! comes. Measured on QEMU 10.0 (q35, no guest OS, CPUs stopped or running):
//!
//! | device | unplug completes by itself? |
//! | --- | --- |
//! | PCI device on a `pcie-root-port`, default q35 (ACPI PCI hotplug) | no: waits for the guest's ACPI handshake |
//! | the same with `-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off` (native PCIe hotplug), slot powered off | yes, at once |
//! | `pc-dimm` (ACPI memory hotplug) | no |
//! | USB device on `qemu-xhci`; `virtserialport` on `virtio-serial-pci` | yes, at once |
//! | any device on `pcie.0` | cannot be hotplugged at all ("does not support hotplugging") |
//!
//! A PCIe root port whose slot was empty at reset has its power off, and
//! QEMU removes a device from a powered-off slot without asking the guest.
//!
//! The removals that wait ([`Client::remove_device_and_wait`],
//! [`Client::remove_nic_and_wait`]) keep their caller's timeout as one deadline,
//! whatever QEMU does (see [the rule](super#waits-keep-their-callers-deadline)):
//! each command they send gets what is left of it, and they return at the
//! deadline, with no clean-up margin.

use std::time::Duration;

use qmpkit_qapi::{commands as c, types as t};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::client::{CallOptions, Client, Command, Empty};
use crate::commands::vm::{qom_get, RunState, StatusInfo};
use crate::commands::Deadline;
use crate::error::{Error, Result};
use crate::event::{EventFilter, EventItem, Woken};

/// Sets `key` to `value` in a property map.
fn set(props: &mut Map<String, Value>, key: impl Into<String>, value: impl Into<Value>) {
    props.insert(key.into(), value.into());
}

/// The arguments of `device_add`: a driver, an optional id, and the
/// driver's properties.
///
/// ```
/// use qmpkit::commands::devices::DeviceSpec;
/// let nic = DeviceSpec::new("virtio-net-pci").id("nic0").bus("rp1").prop("netdev", "net0");
/// assert_eq!(
///     serde_json::to_value(&nic).unwrap(),
///     serde_json::json!({"driver": "virtio-net-pci", "id": "nic0", "bus": "rp1", "netdev": "net0"})
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceSpec {
    /// The device type, such as `virtio-net-pci`.
    pub driver: String,
    /// The device's id (needed to remove it later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The driver's properties (`bus`, `addr`, `netdev`, `drive`, ...).
    #[serde(flatten)]
    pub props: Map<String, Value>,
}

impl DeviceSpec {
    /// A device of this type with no properties yet.
    pub fn new(driver: impl Into<String>) -> Self {
        DeviceSpec {
            driver: driver.into(),
            id: None,
            props: Map::new(),
        }
    }

    /// Sets the device's id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the bus to plug the device into.
    pub fn bus(self, bus: impl Into<String>) -> Self {
        self.prop("bus", bus.into())
    }

    /// Sets a property of the driver.
    pub fn prop(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        set(&mut self.props, key, value);
        self
    }
}

impl From<c::DeviceAdd> for DeviceSpec {
    /// The loose form of a generated `device_add`: the same members.
    fn from(add: c::DeviceAdd) -> Self {
        let mut spec = DeviceSpec {
            driver: add.driver,
            id: add.id,
            props: add.extra,
        };
        if let Some(bus) = add.bus {
            set(&mut spec.props, "bus", bus);
        }
        spec
    }
}

impl From<&DeviceSpec> for c::DeviceAdd {
    /// The generated `device_add` with the same members: a string `bus`
    /// becomes its own member, every other property stays as it is.
    fn from(spec: &DeviceSpec) -> Self {
        let mut extra = spec.props.clone();
        let bus = match extra.remove("bus") {
            Some(Value::String(bus)) => Some(bus),
            Some(other) => {
                // Not a string: QEMU's to judge, sent as it was given.
                extra.insert("bus".into(), other);
                None
            }
            None => None,
        };
        c::DeviceAdd {
            driver: spec.driver.clone(),
            bus,
            id: spec.id.clone(),
            extra,
        }
    }
}

/// A generated union with an id, split as the loose specs keep it: the
/// value of its discriminator `tag`, and its other members but `id`.
fn split_generated(value: &impl Serialize, tag: &str) -> (String, Map<String, Value>) {
    // The generated types serialise to JSON objects with string keys, and a
    // union always has its discriminator: neither can fail.
    let mut members = match serde_json::to_value(value) {
        Ok(Value::Object(members)) => members,
        Ok(_) | Err(_) => unreachable!("a generated QAPI union serialises to a JSON object"),
    };
    members.remove("id");
    let kind = match members.remove(tag) {
        Some(Value::String(kind)) => kind,
        _ => unreachable!("a generated QAPI union has its discriminator {tag}"),
    };
    (kind, members)
}

/// The arguments of `netdev_add`: a backend type, an id, and the backend's
/// options.
///
/// ```
/// use qmpkit::commands::devices::NetdevSpec;
/// let tap = NetdevSpec::new("tap", "net0").prop("ifname", "tap0").prop("script", "no");
/// assert_eq!(serde_json::to_value(&tap).unwrap()["type"], "tap");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetdevSpec {
    /// The backend type: `user`, `tap`, `bridge`, `stream`, `dgram`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The netdev's id (a NIC refers to it with its `netdev` property).
    pub id: String,
    /// The backend's options.
    #[serde(flatten)]
    pub props: Map<String, Value>,
}

impl NetdevSpec {
    /// A netdev of this type and id with no options yet.
    pub fn new(kind: impl Into<String>, id: impl Into<String>) -> Self {
        NetdevSpec {
            kind: kind.into(),
            id: id.into(),
            props: Map::new(),
        }
    }

    /// Sets an option of the backend.
    pub fn prop(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        set(&mut self.props, key, value);
        self
    }
}

impl From<t::Netdev> for NetdevSpec {
    /// The loose form of a generated netdev: the same members.
    ///
    /// ```
    /// use qmpkit::commands::devices::NetdevSpec;
    /// use qmpkit::qapi::types as t;
    /// let user = t::Netdev { id: "net0".into(), branch: t::NetdevBranch::User(Default::default()) };
    /// assert_eq!(NetdevSpec::from(user), NetdevSpec::new("user", "net0"));
    /// ```
    fn from(netdev: t::Netdev) -> Self {
        let (kind, props) = split_generated(&netdev, "type");
        NetdevSpec {
            kind,
            id: netdev.id,
            props,
        }
    }
}

/// The arguments of `object-add`: a QOM type, an id, and the object's
/// properties.
///
/// ```
/// use qmpkit::commands::devices::ObjectSpec;
/// let ram = ObjectSpec::new("memory-backend-ram", "mem1").prop("size", 128u64 << 20);
/// assert_eq!(serde_json::to_value(&ram).unwrap()["qom-type"], "memory-backend-ram");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectSpec {
    /// The object's type, such as `memory-backend-ram` or `iothread`.
    #[serde(rename = "qom-type")]
    pub qom_type: String,
    /// The object's id.
    pub id: String,
    /// The object's properties.
    #[serde(flatten)]
    pub props: Map<String, Value>,
}

impl ObjectSpec {
    /// An object of this type and id with no properties yet.
    pub fn new(qom_type: impl Into<String>, id: impl Into<String>) -> Self {
        ObjectSpec {
            qom_type: qom_type.into(),
            id: id.into(),
            props: Map::new(),
        }
    }

    /// Sets a property of the object.
    pub fn prop(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        set(&mut self.props, key, value);
        self
    }
}

impl From<t::ObjectOptions> for ObjectSpec {
    /// The loose form of a generated QOM object: the same members.
    ///
    /// ```
    /// use qmpkit::commands::devices::ObjectSpec;
    /// use qmpkit::qapi::types as t;
    /// let io = t::ObjectOptions { id: "io0".into(), branch: t::ObjectOptionsBranch::Iothread(Default::default()) };
    /// assert_eq!(ObjectSpec::from(io), ObjectSpec::new("iothread", "io0"));
    /// ```
    fn from(object: t::ObjectOptions) -> Self {
        let (qom_type, props) = split_generated(&object, "qom-type");
        ObjectSpec {
            qom_type,
            id: object.id,
            props,
        }
    }
}

/// One PCI bus and the devices on it (an entry of `query-pci`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct PciBus {
    /// The bus number.
    #[serde(default)]
    pub bus: i64,
    /// The devices on the bus.
    #[serde(default)]
    pub devices: Vec<PciDevice>,
}

/// A PCI device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct PciDevice {
    /// The device's id (empty for devices the machine created itself).
    #[serde(rename = "qdev_id", default)]
    pub id: String,
    /// The bus number.
    #[serde(default)]
    pub bus: i64,
    /// The slot number.
    #[serde(default)]
    pub slot: i64,
    /// The function number.
    #[serde(default)]
    pub function: i64,
    /// The device's class.
    #[serde(rename = "class_info", default)]
    pub class: PciClassInfo,
    /// The bus behind the device, when it is a bridge or a root port.
    #[serde(rename = "pci_bridge", default)]
    pub bridge: Option<PciBridge>,
}

/// A PCI device's class.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct PciClassInfo {
    /// The class code.
    #[serde(default)]
    pub class: i64,
    /// Its description, when QEMU has one.
    #[serde(rename = "desc", default)]
    pub description: String,
}

/// The bus behind a PCI bridge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct PciBridge {
    /// The devices behind the bridge. QEMU lists them only once the firmware
    /// has numbered the bridge's secondary bus (after the guest started).
    #[serde(default)]
    pub devices: Vec<PciDevice>,
}

impl PciDevice {
    /// This device and every device behind it, depth first.
    pub fn walk(&self) -> Vec<&PciDevice> {
        let mut out = vec![self];
        for d in self.bridge.iter().flat_map(|b| &b.devices) {
            out.extend(d.walk());
        }
        out
    }
}

/// The test Incus's `qmp` package uses for a device or netdev that is already gone: the
/// error's text mentions "not found". Go tests `class: desc`, and no QMP
/// class name has those words, so the description is what counts
/// (`Device 'x' not found` from both `device_del` and `netdev_del`).
fn gone_by_go_rule(e: &Error) -> bool {
    e.as_qmp().is_some_and(|q| q.desc.contains("not found"))
}

/// The QOM path of the device `id` (an id, or already a QOM path).
fn qom_path_of(id: &str) -> String {
    if id.starts_with('/') {
        id.to_owned()
    } else {
        format!("/machine/peripheral/{id}")
    }
}

/// How often [`Client::remove_device_and_wait`] asks again while the guest
/// has not shown that it got the request (see there).
pub const UNPLUG_RESEND_INTERVAL: Duration = Duration::from_millis(1500);

/// How long [`Client::remove_device_and_wait`] lets a VM that has just
/// started for the first time run before it asks, so that the VM's clock
/// (by which QEMU dates the request) has passed 0 ms.
const FIRST_RUN_SETTLE: Duration = Duration::from_millis(20);

/// `ACPI_DEVICE_OST` sources that answer an eject request: the eject
/// request notification itself (3) and the `_EJ0` processing (0x103).
const OST_SOURCES_OF_AN_EJECT: [u64; 2] = [0x03, 0x103];
/// `_OST` statuses that do not end an eject: success (QEMU's
/// `DEVICE_DELETED` is what says it is done) and "ejection in progress".
const OST_STATUS_SUCCESS: u64 = 0x00;
const OST_STATUS_EJECT_IN_PROGRESS: u64 = 0x84;

/// What one event says about the removal of one device.
#[derive(Debug, PartialEq, Eq)]
enum UnplugNews {
    /// `DEVICE_DELETED` for the device itself: it is gone.
    Deleted,
    /// `DEVICE_DELETED` for a child of the device (QEMU 10 reports a CPU's
    /// unplug only as its `lapic`'s): ask QOM whether the device is gone.
    ChildDeleted,
    /// The guest answered the eject request with a failure status.
    Refused(u64),
    /// The guest has the request (it is ejecting, or says it has).
    Acknowledged,
    /// Nothing about this device.
    Unrelated,
}

/// Reads one event for news of the removal of device `id` (QOM path `path`).
fn unplug_news(name: &str, data: &Value, id: &str, path: &str) -> UnplugNews {
    match name {
        "DEVICE_DELETED" => {
            let device = data.get("device").and_then(Value::as_str);
            let event_path = data.get("path").and_then(Value::as_str).unwrap_or("");
            if device == Some(id) || event_path == path {
                UnplugNews::Deleted
            } else if event_path
                .strip_prefix(path)
                .is_some_and(|rest| rest.starts_with('/'))
            {
                UnplugNews::ChildDeleted
            } else {
                UnplugNews::Unrelated
            }
        }
        "ACPI_DEVICE_OST" => {
            let info = data.get("info").unwrap_or(&Value::Null);
            let device = info.get("device").and_then(Value::as_str);
            // QEMU names the device by id, or by QOM path when it has none.
            if device != Some(id) && device != Some(path) {
                return UnplugNews::Unrelated;
            }
            let source = info.get("source").and_then(Value::as_u64);
            let status = info.get("status").and_then(Value::as_u64);
            match (source, status) {
                (Some(src), Some(st)) if OST_SOURCES_OF_AN_EJECT.contains(&src) => match st {
                    OST_STATUS_SUCCESS | OST_STATUS_EJECT_IN_PROGRESS => UnplugNews::Acknowledged,
                    failure => UnplugNews::Refused(failure),
                },
                _ => UnplugNews::Unrelated,
            }
        }
        _ => UnplugNews::Unrelated,
    }
}

/// QEMU's refusal of a `device_del` because an earlier request for the same
/// device is still pending (less than 5 s old by the VM's clock, for PCI).
fn already_unplugging(e: &Error) -> bool {
    e.as_qmp()
        .is_some_and(|q| q.desc.contains("already in the process of unplug"))
}

impl Client {
    /// Adds a device (`device_add`).
    #[doc(alias = "AddDevice")]
    #[doc(alias = "device_add")]
    pub async fn add_device(&self, device: &DeviceSpec) -> Result<()> {
        self.run(&c::DeviceAdd::from(device)).await.map(drop)
    }

    /// Asks QEMU to remove a device (`device_del`) and returns once QEMU
    /// has accepted the request, not when the device is gone (the Go
    /// `RemoveDevice`; see [`Client::remove_device_and_wait`] for that).
    ///
    /// `id` is the device's id or QOM path. As in Go, an empty `id` sends
    /// nothing, and a device that does not exist (an error whose description
    /// says "not found") is success: the call is meant for clean-up paths.
    /// Other errors are QEMU's, such as an unplug already under way or a bus
    /// that cannot hot-unplug.
    ///
    /// Like Go, it asks at once, also of a VM in `prelaunch` (never run),
    /// where QEMU 10 may then never take a second request for the device
    /// if the booting guest misses the first: [`Client::remove_device_and_wait`]
    /// waits for the VM to run first.
    #[doc(alias = "RemoveDevice")]
    #[doc(alias = "device_del")]
    pub async fn remove_device(&self, id: &str) -> Result<()> {
        if id.is_empty() {
            return Ok(());
        }
        match self.run(&device_del(id)).await {
            Ok(_) => Ok(()),
            Err(e) if gone_by_go_rule(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes a device and waits, up to `timeout`, until QEMU reports it
    /// gone: sends `device_del`, then follows `DEVICE_DELETED` and the
    /// guest's `ACPI_DEVICE_OST` answers, as QEMU 10 reports them.
    ///
    /// `id` is the device's id or QOM path (`P`: `/machine/peripheral/<id>`
    /// for an id). The device is gone when
    ///
    /// - `DEVICE_DELETED` names it (by id or by `P`), or
    /// - `DEVICE_DELETED` names a child under `P/` and QOM no longer has
    ///   `P`: QEMU 10 reports a CPU's unplug only with its `P/lapic`, or
    /// - a request sent again (below) finds no such device.
    ///
    /// The guest can refuse: an `ACPI_DEVICE_OST` for the device that
    /// answers the eject request with a failure status ends the call at once
    /// with [`Error::UnplugRefused`], whose status says why (not supported,
    /// in use, busy, ...). Nothing is pending in QEMU then.
    ///
    /// QEMU also accepts requests that nothing comes of: an ACPI eject
    /// notice reaching a guest that is not far enough in its boot to handle
    /// it is lost. This call therefore sends the request again every
    /// [`UNPLUG_RESEND_INTERVAL`] until the guest shows that it has it (an
    /// `_OST` saying the ejection is in progress) or the device is gone.
    /// QEMU turns a repeated request down with "already in the process of
    /// unplug" while the previous one is recent by the VM's clock (5 s for
    /// native PCIe hotplug, 1 ms for ACPI hotplug); that counts as still
    /// pending, also for the first request (an unplug someone else asked
    /// for is waited for too).
    ///
    /// A VM in `prelaunch` (started with `-S`, never continued) gets no
    /// request until it has run: QEMU 10 would date such a request 0, read
    /// that as "never expires", and refuse every later request once the
    /// booting guest lost it, leaving the device unremovable. So on such a
    /// VM this call waits for `cont` (within `timeout`) before it asks.
    /// [`Client::remove_device`] asks at once, as the Go package does.
    ///
    /// Errors: a device that does not exist at the first request is QEMU's
    /// `DeviceNotFound` ([`Error::is_not_found`]), so that a typo is never
    /// mistaken for success; a caller tidying up can treat that as done.
    /// Any other refusal of `device_del` by QEMU (a bus that cannot
    /// hot-unplug, a CPU unplug before the guest's ACPI is up) is returned
    /// as QEMU's error. When the guest neither lets the device go nor
    /// refuses within `timeout`, the result is [`Error::Timeout`] and the
    /// unplug request may remain pending in QEMU. `timeout` is one deadline
    /// for everything, QEMU answering or not.
    ///
    /// ```no_run
    /// # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
    /// use std::time::Duration;
    /// match client.remove_device_and_wait("cpu1", Duration::from_secs(30)).await {
    ///     Ok(()) => println!("cpu1 is gone"),
    ///     Err(e) if e.is_unplug_refused() => println!("the guest keeps it: {e}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn remove_device_and_wait(&self, id: &str, timeout: Duration) -> Result<()> {
        self.remove_device_within(id, &Deadline::after(timeout, "device_del"))
            .await
    }

    /// Returns once the VM's CPUs have run (at once unless it is in
    /// `prelaunch`, started with `-S` and never continued).
    ///
    /// QEMU 10 dates an ACPI unplug request by the VM's clock, in
    /// milliseconds, and accepts it again once that clock has moved on. A
    /// request made before the VM first ran is dated 0, which QEMU reads as
    /// "no date": if the guest, not yet listening, loses that request, QEMU
    /// turns down every later one with "already in the process of unplug"
    /// and the device can never be removed. So the request waits for the
    /// VM to run, and a moment more for its clock to pass 0.
    async fn wait_until_the_vm_has_run(&self, deadline: &Deadline) -> Result<()> {
        let mut resumed = self.subscribe(EventFilter::names(["RESUME"]));
        let status: StatusInfo = deadline.run_as(self, &c::QueryStatus).await?;
        if status.status != RunState::Prelaunch {
            return Ok(());
        }
        loop {
            match resumed.next_or_timer(None, Some(deadline.at())).await {
                Woken::Item(Some(EventItem::Event(_))) => break,
                // Whatever was missed, QEMU knows whether the VM runs now.
                Woken::Item(Some(EventItem::Missed(_))) => {
                    let status: StatusInfo = deadline.run_as(self, &c::QueryStatus).await?;
                    if status.status != RunState::Prelaunch {
                        break;
                    }
                }
                Woken::Item(None) => return Err(self.closed().await),
                Woken::Tick | Woken::Deadline => return Err(deadline.expired()),
            }
        }
        tokio::time::sleep(FIRST_RUN_SETTLE.min(deadline.remaining()?)).await;
        Ok(())
    }

    async fn remove_device_within(&self, id: &str, deadline: &Deadline) -> Result<()> {
        self.wait_until_the_vm_has_run(deadline).await?;
        let path = qom_path_of(id);
        // Subscribe first: the events may arrive before the reply.
        let mut events = self.subscribe(EventFilter::names(["DEVICE_DELETED", "ACPI_DEVICE_OST"]));
        let work = async {
            match deadline.run(self, &device_del(id)).await {
                Ok(_) => {}
                Err(e) if already_unplugging(&e) => {}
                Err(e) => return Err(e),
            }
            // Until the guest shows it has the request, it is sent again.
            let mut acknowledged = false;
            // A child's DEVICE_DELETED came while QOM still had the device:
            // look again at each tick.
            let mut child_gone = false;
            let mut next_tick = tokio::time::Instant::now() + UNPLUG_RESEND_INTERVAL;
            loop {
                let tick = (!acknowledged || child_gone).then_some(next_tick);
                let item = match events.next_or_timer(tick, None).await {
                    Woken::Item(item) => item,
                    // (No deadline was given: the whole wait has its own.)
                    Woken::Tick | Woken::Deadline => {
                        next_tick = tokio::time::Instant::now() + UNPLUG_RESEND_INTERVAL;
                        if child_gone && !self.device_exists(&path, deadline).await? {
                            return Ok(());
                        }
                        if !acknowledged {
                            match deadline.run(self, &device_del(id)).await {
                                Ok(_) => {}
                                Err(e) if already_unplugging(&e) => {}
                                // Gone between two looks.
                                Err(e) if e.is_not_found() => return Ok(()),
                                Err(e) => return Err(e),
                            }
                        }
                        continue;
                    }
                };
                match item {
                    Some(EventItem::Event(ev)) => match unplug_news(ev.name(), ev.data(), id, &path) {
                        UnplugNews::Deleted => return Ok(()),
                        UnplugNews::ChildDeleted => {
                            if !self.device_exists(&path, deadline).await? {
                                return Ok(());
                            }
                            child_gone = true;
                        }
                        UnplugNews::Refused(status) => {
                            return Err(Error::UnplugRefused {
                                device: id.to_owned(),
                                status,
                            })
                        }
                        UnplugNews::Acknowledged => acknowledged = true,
                        UnplugNews::Unrelated => {}
                    },
                    // The news may be among those missed: ask QEMU directly.
                    Some(EventItem::Missed(_)) => {
                        if !self.device_exists(&path, deadline).await? {
                            return Ok(());
                        }
                    }
                    None => return Err(self.closed().await),
                }
            }
        };
        deadline.bound(work).await
    }

    /// True while QOM has the device at `path`.
    async fn device_exists(&self, path: &str, deadline: &Deadline) -> Result<bool> {
        match deadline.run(self, &qom_get(path, "type")).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Adds a NIC: its netdev (`netdev_add`), then its device
    /// (`device_add`), then, unless `connected`, sets its link down
    /// (`set_link`). When a step fails, the steps already done are undone in
    /// reverse order and the failing step's error is returned, so a failed
    /// call leaves no netdev behind.
    ///
    /// A NIC added with `connected: false` needs an id (`set_link` names it);
    /// without one the call fails with [`Error::InvalidRequest`] before
    /// anything is sent.
    #[doc(alias = "AddNIC")]
    pub async fn add_nic(&self, netdev: &NetdevSpec, device: &DeviceSpec, connected: bool) -> Result<()> {
        let device_id = match (&device.id, connected) {
            (Some(id), _) => Some(id.as_str()),
            (None, true) => None,
            (None, false) => {
                return Err(Error::InvalidRequest(
                    "a NIC added disconnected needs a device id".into(),
                ))
            }
        };
        self.call::<_, Empty>(c::NetdevAdd::NAME, netdev).await?;
        let undo_netdev = || async {
            let _ = self.run(&netdev_del(&netdev.id)).await;
        };
        if let Err(e) = self.add_device(device).await {
            undo_netdev().await;
            return Err(e);
        }
        if let (false, Some(id)) = (connected, device_id) {
            if let Err(e) = self.set_nic_link(id, false).await {
                // Ask for the device's removal without waiting for it: the
                // netdev can go at once, the NIC is then unconnected.
                let _ = self.run(&device_del(id)).await;
                undo_netdev().await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Removes a NIC's netdev (`netdev_del`), as the Go `RemoveNIC` does:
    /// the NIC's device is left alone (remove it with
    /// [`Client::remove_device`]), and the call returns once QEMU has
    /// accepted the request.
    ///
    /// As in Go, an empty `netdev_id` sends nothing, and a netdev that does
    /// not exist (an error whose description says "not found") is success:
    /// not every NIC has one.
    #[doc(alias = "RemoveNIC")]
    #[doc(alias = "netdev_del")]
    pub async fn remove_nic(&self, netdev_id: &str) -> Result<()> {
        if netdev_id.is_empty() {
            return Ok(());
        }
        match self.run(&netdev_del(netdev_id)).await {
            Ok(_) => Ok(()),
            Err(e) if gone_by_go_rule(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes a NIC: its device, when `device_id` is given and the device
    /// is still there ([`Client::remove_device_and_wait`]), then its netdev
    /// (`netdev_del`), both within `timeout`, QEMU answering or not.
    ///
    /// A device that is already gone (the guest unplugged it, or an earlier
    /// call got half way) is fine; a netdev that does not exist is QEMU's
    /// not-found error ([`Error::is_not_found`]).
    pub async fn remove_nic_and_wait(
        &self,
        netdev_id: &str,
        device_id: Option<&str>,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Deadline::after(timeout, "device_del");
        if let Some(id) = device_id {
            match self.remove_device_within(id, &deadline).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        deadline
            .renamed("netdev_del")
            .run(self, &netdev_del(netdev_id))
            .await
            .map(drop)
    }

    /// Connects or disconnects a NIC's link, as if its cable were plugged
    /// in or pulled (`set_link`). `id` is the NIC's device id (or a netdev
    /// id).
    #[doc(alias = "SetNICLink")]
    #[doc(alias = "set_link")]
    pub async fn set_nic_link(&self, id: &str, connected: bool) -> Result<()> {
        let set_link = c::SetLink {
            name: id.into(),
            up: connected,
        };
        self.run(&set_link).await.map(drop)
    }

    /// Adds a QOM object such as a memory backend or an iothread
    /// (`object-add`). The traffic log shows it, as Go's does, but with the
    /// `data` of a `secret` object blanked out.
    #[doc(alias = "AddObject")]
    #[doc(alias = "object-add")]
    pub async fn add_object(&self, object: &ObjectSpec) -> Result<()> {
        self.call::<_, Empty>(c::ObjectAdd::NAME, object).await.map(drop)
    }

    /// Removes a QOM object (`object-del`). One still used by a device is
    /// an error for which [`Error::is_in_use`] is true; one that does not exist is a not-found error.
    #[doc(alias = "object-del")]
    pub async fn remove_object(&self, id: &str) -> Result<()> {
        self.run(&c::ObjectDel { id: id.into() }).await.map(drop)
    }

    /// Adds a `secret` object holding `secret` (for disk encryption keys,
    /// passwords of network block devices, ...). The traffic log shows the
    /// request with the secret blanked out.
    ///
    /// A secret with this id that already exists is not an error, and it
    /// keeps its current value: secrets are immutable in QEMU.
    #[doc(alias = "AddSecret")]
    pub async fn add_secret(&self, id: &str, secret: &str) -> Result<()> {
        // Built by hand for the order of its members: the traffic log shows
        // them as Go's does (qom-type, id, data, format).
        let object = ObjectSpec::new("secret", id)
            .prop("data", secret)
            .prop("format", "raw");
        match self.add_object(&object).await {
            Err(Error::Qmp(e)) if e.desc.contains("duplicate property") => Ok(()),
            other => other,
        }
    }

    /// The PCI buses and their devices (`query-pci`).
    #[doc(alias = "QueryPCI")]
    #[doc(alias = "query-pci")]
    pub async fn query_pci(&self) -> Result<Vec<PciBus>> {
        self.run_as(&c::QueryPci, CallOptions::new()).await
    }

    /// True when a device with this id sits behind a PCI bridge or root
    /// port (that is, where hotplugged PCI devices go).
    ///
    /// QEMU lists a bridge's devices only once the guest's firmware has
    /// numbered its bus, so this is false for every device until the VM has
    /// started.
    #[doc(alias = "CheckPCIDevice")]
    pub async fn check_pci_device(&self, id: &str) -> Result<bool> {
        let buses = self.query_pci().await?;
        Ok(buses
            .iter()
            .flat_map(|b| &b.devices)
            .filter_map(|d| d.bridge.as_ref())
            .flat_map(|b| &b.devices)
            .flat_map(PciDevice::walk)
            .any(|d| d.id == id))
    }
}

/// `device_del` of the device `id`.
fn device_del(id: &str) -> c::DeviceDel {
    c::DeviceDel { id: id.into() }
}

/// `netdev_del` of the netdev `id`.
fn netdev_del(id: &str) -> c::NetdevDel {
    c::NetdevDel { id: id.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unplug_news_follows_qemu_10s_events() {
        let p = "/machine/peripheral/cpu1";
        let news = |name: &str, data: Value| unplug_news(name, &data, "cpu1", p);
        assert_eq!(
            news("DEVICE_DELETED", json!({"device": "cpu1", "path": p})),
            UnplugNews::Deleted
        );
        assert_eq!(news("DEVICE_DELETED", json!({"path": p})), UnplugNews::Deleted);
        assert_eq!(
            news(
                "DEVICE_DELETED",
                json!({"path": "/machine/peripheral/cpu1/lapic"})
            ),
            UnplugNews::ChildDeleted
        );
        // A sibling whose name starts the same is not a child.
        assert_eq!(
            news("DEVICE_DELETED", json!({"path": "/machine/peripheral/cpu10"})),
            UnplugNews::Unrelated
        );
        let ost = |device: Value, source: u64, status: u64| {
            news(
                "ACPI_DEVICE_OST",
                json!({"info": {"device": device, "slot": "1", "slot-type": "CPU",
                                "source": source, "status": status}}),
            )
        };
        assert_eq!(ost(json!("cpu1"), 3, 0x84), UnplugNews::Acknowledged);
        assert_eq!(ost(json!("cpu1"), 3, 0x80), UnplugNews::Refused(0x80));
        assert_eq!(ost(json!("cpu1"), 0x103, 0x81), UnplugNews::Refused(0x81));
        assert_eq!(ost(json!(p), 3, 0x01), UnplugNews::Refused(0x01));
        // Another device's, and an insertion's (source 1), say nothing.
        assert_eq!(ost(json!("cpu2"), 3, 0x80), UnplugNews::Unrelated);
        assert_eq!(ost(json!("cpu1"), 1, 0x80), UnplugNews::Unrelated);
        assert_eq!(news("RESUME", Value::Null), UnplugNews::Unrelated);
    }

    #[test]
    fn pci_tree_decodes_and_walks() {
        let buses: Vec<PciBus> = serde_json::from_value(json!([{"bus": 0, "devices": [
            {"bus": 0, "slot": 1, "function": 0, "qdev_id": "rp1",
             "class_info": {"class": 1540, "desc": "PCI bridge"},
             "pci_bridge": {"bus": {"number": 1}, "devices": [
                {"bus": 1, "slot": 0, "function": 0, "qdev_id": "nic0",
                 "class_info": {"class": 512}, "regions": []}]}},
            {"bus": 0, "slot": 31, "function": 0, "qdev_id": "",
             "class_info": {"class": 1537, "desc": "ISA bridge"}}]}]))
        .unwrap();
        let all: Vec<&str> = buses[0]
            .devices
            .iter()
            .flat_map(PciDevice::walk)
            .map(|d| d.id.as_str())
            .collect();
        assert_eq!(all, ["rp1", "nic0", ""]);
        assert_eq!(buses[0].devices[0].class.description, "PCI bridge");
    }
}
