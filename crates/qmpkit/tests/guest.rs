//! The real-guest tier: each test boots a small Linux guest under TCG, with
//! a [`Monitor`] watching it, makes something happen, and checks the effect
//! both in the guest (through its serial console) and in QEMU (its queries
//! and the events the monitor's handler saw).
//!
//! The guest is a Debian kernel and a busybox initramfs built by
//! `scripts/build-guest-image` (run here when its cache is cold; CI runs it
//! first). Its `/init` writes `STARTED` to Incus's agent port, onlines
//! hot-added CPUs and memory, powers off on the ACPI power button (writing
//! `STOPPED` first) and answers commands on `ttyS0`, each with a line that
//! starts with `@` and the command's name (see the script).
//!
//! One guest per test, booted once. Every wait has a deadline that only
//! stops a hung test; nothing is timed.

mod common;

use std::time::Duration;

use common::guest::{guest_image, Console, APPEND, BOOT_SECS, GUEST_SECS, READY};
use common::{eventually, vm_with, within};
use qmpkit::commands::devices::{DeviceSpec, NetdevSpec, ObjectSpec};
use qmpkit::commands::migration::MigrationTuning;
use qmpkit::commands::vm::{Actions, PanicAction, RunState};
use qmpkit::launch::{QemuBuilder, INCUS_AGENT_CHARDEV};
use qmpkit::monitor::constants::{
    EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED, EVENT_VM_RESET, EVENT_VM_SHUTDOWN,
    SHUTDOWN_REASON_GUEST_SHUTDOWN,
};
use qmpkit::monitor::{Monitor, MonitorOptions, MonitorRegistry};
use qmpkit::{CallOptions, Empty, ErrorClass};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The waiting removals' timeout.
const UNPLUG: Duration = Duration::from_secs(60);
/// A DIMM (and the memory added by one), in bytes and in kB.
const DIMM_BYTES: u64 = 128 << 20;
const DIMM_KB: u64 = DIMM_BYTES >> 10;

// Console helpers of this file's own (the console itself is in common::guest).
impl Console {
    /// How many CPUs the guest has online (`cpus` answers a list such as `0-1,3`).
    async fn online_cpus(&mut self) -> usize {
        let answer = self.ask("cpus").await;
        cpu_count(&answer).unwrap_or_else(|| panic!("cpus answered {answer:?}"))
    }

    /// Waits until the guest has `n` CPUs online.
    async fn wait_online_cpus(&mut self, n: usize) {
        self.ask_until("cpus", |a| cpu_count(a) == Some(n)).await;
    }

    /// The guest's MemTotal, in kB.
    async fn mem_total_kb(&mut self) -> u64 {
        let answer = self.ask("meminfo").await;
        answer
            .parse()
            .unwrap_or_else(|_| panic!("meminfo answered {answer:?}"))
    }
}

/// The number of CPUs in a kernel CPU list such as `0-1,3`.
fn cpu_count(list: &str) -> Option<usize> {
    list.split(',').try_fold(0, |n, range| {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let (first, last): (usize, usize) = (first.parse().ok()?, last.parse().ok()?);
        Some(n + last.checked_sub(first)? + 1)
    })
}

// ------------------------------------------------------------ events

/// An event as the monitor's handler saw it.
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    data: Value,
    /// For a `RESET`: what [`Monitor::handle_reset`] said in the handler.
    deliberate: Option<bool>,
}

/// The events the handler saw, in order, with a read position.
struct Events {
    rx: mpsc::UnboundedReceiver<Seen>,
    all: Vec<Seen>,
    next: usize,
}

impl Events {
    /// The next event (from the read position) that satisfies `want`.
    async fn next_where(&mut self, what: &str, want: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(GUEST_SECS);
        loop {
            while self.next < self.all.len() {
                let ev = &self.all[self.next];
                self.next += 1;
                if want(ev) {
                    return ev.clone();
                }
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.all.push(ev),
                Ok(None) => panic!("the monitor ended before {what}; it saw {:#?}", self.all),
                Err(_) => panic!("no {what} within {GUEST_SECS} s; the handler saw {:#?}", self.all),
            }
        }
    }

    /// The next event named `name`.
    async fn next(&mut self, name: &str) -> Seen {
        self.next_where(name, |ev| ev.name == name).await
    }

    /// Takes in what the handler has seen so far (call after
    /// [`Monitor::wait`] for everything).
    fn collect(&mut self) -> &[Seen] {
        while let Ok(ev) = self.rx.try_recv() {
            self.all.push(ev);
        }
        &self.all
    }

    /// The names of the events seen from position `from` on that are among `names`.
    fn names_among(&self, from: usize, names: &[&str]) -> Vec<String> {
        self.all[from..]
            .iter()
            .filter(|e| names.contains(&e.name.as_str()))
            .map(|e| e.name.clone())
            .collect()
    }
}

// ------------------------------------------------------------ the VM

/// A guest VM with its console and a monitor, CPUs not yet started.
struct Guest {
    /// Its drop kills and reaps QEMU, also when a test fails.
    vm: common::Vm,
    mon: Monitor,
    console: Console,
    events: Events,
}

impl Drop for Guest {
    /// A failing test also shows what QEMU said (an abort, say, that closed
    /// the console under the test).
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("QEMU's stderr:\n{}", self.vm.stderr());
        }
    }
}

/// A NIC `nic0` (with its netdev) cold-plugged behind `rp1`, for [`launch`].
const NIC0_ON_RP1: [&str; 4] = [
    "-netdev",
    "user,id=net0",
    "-device",
    "virtio-net-pci,id=nic0,netdev=net0,bus=rp1,romfile=",
];

/// The guest's machine: q35 under TCG, 256 MiB with two DIMM slots, one CPU
/// of up to three, Incus's agent port, a pvpanic device, a balloon and two
/// PCIe root ports for hotplug (`rp1`, `rp2`). `extra` adds to it.
async fn launch(extra: &[&str]) -> Guest {
    let image = guest_image();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let vm = vm_with(|b: QemuBuilder| {
        b.accel("tcg")
            .memory("256M,slots=2,maxmem=1G")
            .kernel(&image.kernel, &image.initrd, APPEND)
            .console_socket()
            .incus_agent_port()
            .args([
                "-smp",
                "1,maxcpus=3",
                "-device",
                "pvpanic",
                "-device",
                "virtio-balloon-pci,id=balloon0",
                "-device",
                "pcie-root-port,id=rp1,chassis=1",
                "-device",
                "pcie-root-port,id=rp2,chassis=2",
            ])
            .args(extra)
            // The launcher's client holds the main socket; the monitor gets its own.
            .extra_qmp_socket("mon")
    })
    .await;
    // Before the CPUs start, so that no output is lost.
    let console = Console::connect(&vm.console_socket()).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let options = MonitorOptions::new()
        .serial_chardev(INCUS_AGENT_CHARDEV)
        // Ring-buffer reads come from events and from check_agent: what the
        // agent's transitions look like then does not depend on when a
        // periodic read happens to come.
        .agent_poll_interval(Duration::from_secs(3600))
        .event_handler(move |mon, ev| {
            // As Incus does: every RESET asks whether it was our own.
            let deliberate = (ev.name() == EVENT_VM_RESET).then(|| mon.handle_reset());
            let _ = tx.send(Seen {
                name: ev.name().to_owned(),
                data: ev.data().clone(),
                deliberate,
            });
        });
    let mon = within(10, MonitorRegistry::new().connect(vm.socket("mon"), options))
        .await
        .expect("monitor");
    mon.set_initialized(true);
    Guest {
        vm,
        mon,
        console,
        events: Events {
            rx,
            all: Vec::new(),
            next: 0,
        },
    }
}

impl Guest {
    /// Starts the CPUs.
    async fn start(&self) {
        within(10, self.mon.start()).await.expect("cont");
    }

    /// Waits until the guest takes commands.
    async fn ready(&mut self) {
        self.console.line_with(READY, BOOT_SECS).await;
    }

    /// Reads the agent's port now, expects the agent up, and waits for the
    /// handler's AGENT-STARTED.
    async fn agent_up(&mut self) {
        assert!(
            within(10, self.mon.check_agent()).await.unwrap(),
            "the guest wrote no STARTED"
        );
        self.events.next(EVENT_AGENT_STARTED).await;
    }

    /// A point in the event stream: stops and restarts the CPUs, and returns
    /// once the handler has seen the `RESUME`, so every event QEMU sent
    /// before this call has been handled.
    async fn sync_events(&mut self) {
        within(10, self.mon.pause()).await.unwrap();
        within(10, self.mon.start()).await.unwrap();
        self.events.next("RESUME").await;
    }

    /// Waits for QEMU to exit by itself and for the monitor to finish.
    async fn exited(&mut self) -> &[Seen] {
        let status = self.vm.wait_exit(Duration::from_secs(GUEST_SECS)).await;
        if !status.is_some_and(|s| s.success()) {
            self.console.take_what_is_there();
            panic!(
                "QEMU: {status:?}, stderr: {}\nevents: {:#?}\nconsole:\n{}",
                self.vm.stderr(),
                self.events.collect(),
                self.console.tail()
            );
        }
        within(GUEST_SECS, self.mon.wait()).await;
        self.events.collect()
    }

    /// True while QOM has the device with this id.
    async fn qom_has(&self, id: &str) -> bool {
        let r: qmpkit::Result<Value> = self
            .mon
            .call(
                "qom-get",
                &json!({"path": format!("/machine/peripheral/{id}"), "property": "type"}),
            )
            .await;
        match r {
            Ok(_) => true,
            Err(e) if e.is_not_found() => false,
            Err(e) => panic!("qom-get {id}: {e}"),
        }
    }

    /// Asks QEMU to unplug a device and returns at once (`device_del`).
    async fn request_unplug(&self, id: &str) -> qmpkit::Result<Value> {
        self.mon.call("device_del", &json!({ "id": id })).await
    }
}

/// Booted and ready.
async fn boot() -> Guest {
    let mut g = launch(&[]).await;
    g.start().await;
    g.ready().await;
    g
}

/// The library's waiting removal: `device_del`, then `DEVICE_DELETED`.
async fn unplug_and_wait(mon: &Monitor, id: &str) {
    within(UNPLUG.as_secs() + 10, mon.remove_device_and_wait(id, UNPLUG))
        .await
        .unwrap_or_else(|e| panic!("removing {id}: {e}"));
}

fn ost(ev: &Seen) -> &Value {
    &ev.data["info"]
}

/// What an `ACPI_DEVICE_OST` says the guest did with an eject request.
const OST_SOURCE_EJECT_REQUEST: u64 = 3;
const OST_STATUS_EJECT_IN_PROGRESS: u64 = 0x84;
const OST_STATUS_REMOVE_NOT_SUPPORTED: u64 = 0x80;

// ------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_seen_starting_and_stopping_around_a_guest_poweroff() {
    let mut g = boot().await;
    g.agent_up().await;
    assert!(g.mon.agent_started());

    g.console.send("poweroff").await;
    g.console
        .line_with("guest: powering off (console)", GUEST_SECS)
        .await;
    let seen = g.exited().await;
    let names: Vec<&str> = seen
        .iter()
        .map(|e| e.name.as_str())
        .filter(|n| n.starts_with("AGENT-") || *n == EVENT_VM_SHUTDOWN)
        .collect();
    // The guest wrote STOPPED, then powered off, and QEMU exited at once:
    // the monitor still tells the handler the agent stopped, before the
    // one shutdown notice.
    assert_eq!(
        names,
        [EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED, EVENT_VM_SHUTDOWN],
        "{seen:#?}"
    );
    let shutdown = seen.iter().find(|e| e.name == EVENT_VM_SHUTDOWN).unwrap();
    assert_eq!(
        shutdown.data,
        json!({"guest": true, "reason": SHUTDOWN_REASON_GUEST_SHUTDOWN})
    );
    assert!(!g.mon.agent_started());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_powerdown_makes_the_guest_shut_itself_down_once() {
    let mut g = boot().await;
    g.agent_up().await;

    within(10, g.mon.powerdown()).await.unwrap();
    g.events.next("POWERDOWN").await;
    // The guest's acpid saw the button.
    g.console
        .line_with("guest: powering off (power-button)", GUEST_SECS)
        .await;
    let seen = g.exited().await;
    let shutdowns: Vec<&Seen> = seen.iter().filter(|e| e.name == EVENT_VM_SHUTDOWN).collect();
    assert_eq!(shutdowns.len(), 1, "{seen:#?}");
    assert_eq!(
        shutdowns[0].data,
        json!({"guest": true, "reason": SHUTDOWN_REASON_GUEST_SHUTDOWN})
    );
    let agent_stopped = seen.iter().position(|e| e.name == EVENT_AGENT_STOPPED);
    let shutdown = seen.iter().position(|e| e.name == EVENT_VM_SHUTDOWN);
    assert!(agent_stopped.is_some() && agent_stopped < shutdown, "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcie_nic_and_disk_hot_unplug_round_after_round() {
    let mut g = boot().await;
    for round in 1..=3 {
        // A NIC behind rp1 and a disk behind rp2 (q35 hotplugs them through ACPI).
        let nic = DeviceSpec::new("virtio-net-pci")
            .id("nic0")
            .bus("rp1")
            .prop("netdev", "net0")
            .prop("romfile", "");
        within(10, g.mon.add_nic(&NetdevSpec::new("user", "net0"), &nic, true))
            .await
            .unwrap();
        let disk = DeviceSpec::new("virtio-blk-pci")
            .id("disk0")
            .bus("rp2")
            .prop("drive", "disk0-node");
        let node = json!({"driver": "null-co", "node-name": "disk0-node", "size": 64 << 20});
        within(10, g.mon.add_block_device(&node, &disk, false))
            .await
            .unwrap();
        // The guest found both.
        g.console.ask_until("net", |a| a.contains("eth0")).await;
        g.console.ask_until("block", |a| a.contains("vda")).await;
        assert!(g.mon.check_pci_device("nic0").await.unwrap(), "round {round}");
        assert!(g.mon.check_pci_device("disk0").await.unwrap(), "round {round}");

        // The guest lets both go.
        within(
            UNPLUG.as_secs() + 10,
            g.mon.remove_nic_and_wait("net0", Some("nic0"), UNPLUG),
        )
        .await
        .unwrap();
        unplug_and_wait(&g.mon, "disk0").await;
        within(10, g.mon.remove_block_device("disk0-node")).await.unwrap();

        g.events
            .next_where("DEVICE_DELETED of nic0", |e| {
                e.name == "DEVICE_DELETED" && e.data["device"] == "nic0"
            })
            .await;
        g.events
            .next_where("DEVICE_DELETED of disk0", |e| {
                e.name == "DEVICE_DELETED" && e.data["device"] == "disk0"
            })
            .await;
        assert!(!g.mon.check_pci_device("nic0").await.unwrap(), "round {round}");
        assert!(!g.mon.check_pci_device("disk0").await.unwrap(), "round {round}");
        let block = g.mon.query_block().await.unwrap();
        assert!(
            !block
                .iter()
                .any(|b| b.qdev.as_deref().is_some_and(|q| q.contains("disk0"))),
            "round {round}: {block:?}"
        );
        assert_eq!(g.console.ask("net").await, "lo", "round {round}");
        assert_eq!(g.console.ask("block").await, "", "round {round}");
    }
}

/// What a waiting CPU removal has to go by: on QEMU 10 a CPU's unplug ends
/// with `DEVICE_DELETED` for `.../cpu1/lapic` only, never for the CPU; and a
/// guest that refuses an unplug says so in an `ACPI_DEVICE_OST`, and
/// nothing else happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_hotplug_is_onlined_and_unplug_is_reported_by_the_lapic_or_refused() {
    let mut g = boot().await;
    assert_eq!(g.console.online_cpus().await, 1);
    let slots = g.mon.query_hotpluggable_cpus().await.unwrap();
    let free: Vec<_> = slots.iter().filter(|s| s.qom_path.is_none()).collect();
    assert_eq!(free.len(), 2, "{slots:?}");

    // Hotplug: the guest onlines the new CPU.
    within(10, g.mon.add_device(&free[0].device("cpu1")))
        .await
        .unwrap();
    g.console.wait_online_cpus(2).await;
    assert_eq!(g.mon.query_cpus().await.unwrap().len(), 2);

    // Unplug, asked for without waiting.
    let from = g.events.next;
    within(10, g.request_unplug("cpu1")).await.unwrap();
    let ev = g
        .events
        .next_where("the eject's outcome", |e| {
            e.name == "ACPI_DEVICE_OST"
                && ost(e)["source"] == OST_SOURCE_EJECT_REQUEST
                && ost(e)["status"] != OST_STATUS_EJECT_IN_PROGRESS
        })
        .await;
    assert_eq!(ost(&ev)["status"], 0, "the guest ejected it: {ev:?}");
    let deleted: Vec<&Value> = g.events.all[from..]
        .iter()
        .filter(|e| e.name == "DEVICE_DELETED")
        .map(|e| &e.data)
        .collect();
    // The CPU is gone, yet the only DEVICE_DELETED is its lapic's, and the
    // last _OST names no device any more.
    assert_eq!(deleted, [&json!({"path": "/machine/peripheral/cpu1/lapic"})]);
    assert!(ost(&ev).get("device").is_none(), "{ev:?}");
    assert!(!g.qom_has("cpu1").await);
    assert_eq!(g.mon.query_cpus().await.unwrap().len(), 1);
    g.console.wait_online_cpus(1).await;

    // A refused unplug. (A new slot: TCG never reuses a vCPU thread's
    // context, and -smp maxcpus bounds how many it makes.)
    within(10, g.mon.add_device(&free[1].device("cpu2")))
        .await
        .unwrap();
    g.console.wait_online_cpus(2).await;
    assert_eq!(g.console.ask("refuse-unplug processor").await, "processor");
    let from = g.events.next;
    within(10, g.request_unplug("cpu2")).await.unwrap();
    let ev = g
        .events
        .next_where("cpu2's eject _OST", |e| {
            e.name == "ACPI_DEVICE_OST"
                && ost(e)["device"] == "cpu2"
                && ost(e)["source"] == OST_SOURCE_EJECT_REQUEST
        })
        .await;
    assert_eq!(ost(&ev)["status"], OST_STATUS_REMOVE_NOT_SUPPORTED, "{ev:?}");
    g.sync_events().await;
    assert!(
        g.events.all[from..].iter().all(|e| e.name != "DEVICE_DELETED"),
        "{:#?}",
        &g.events.all[from..]
    );
    assert!(g.qom_has("cpu2").await);
    assert_eq!(g.mon.query_cpus().await.unwrap().len(), 2);
    assert_eq!(g.console.online_cpus().await, 2);
}

/// What a waiting removal has to go by when the guest is not up yet: QEMU
/// accepts a PCI unplug and drops it without a word, and refuses a CPU
/// unplug outright. (What asking again does once the guest runs is the
/// library's business: `remove_device_and_wait_in_prelaunch_removes_the_nic_once_the_guest_runs`;
/// a request made before the VM ever ran is another matter:
/// `an_unplug_asked_before_the_vm_first_ran_blocks_every_later_one`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplug_asked_for_while_the_guest_boots_is_dropped() {
    let cpu1 = [
        "-device",
        "qemu64-x86_64-cpu,id=cpu1,socket-id=0,core-id=1,thread-id=0",
    ];
    let mut g = launch(&[&NIC0_ON_RP1[..], &cpu1[..]].concat()).await;
    g.start().await;
    // The firmware is running: nothing in the guest listens for ejects yet
    // (under TCG its kernel takes seconds to get as far as ACPI; the same
    // happens to a request made before `cont`). QEMU takes the NIC's
    // request, and refuses the CPU's: until the guest's ACPI switches CPU
    // hotplug to its modern interface, QEMU says "acpi: device unplug
    // request for not supported device type".
    within(10, g.request_unplug("nic0"))
        .await
        .expect("QEMU accepts the NIC's unplug");
    let e = within(10, g.request_unplug("cpu1")).await.unwrap_err();
    assert_eq!(e.class(), Some(&ErrorClass::GenericError), "{e:?}");
    g.ready().await;

    // The guest booted with both, and QEMU kept both.
    assert!(g.console.ask("net").await.contains("eth0"));
    assert_eq!(g.console.online_cpus().await, 2);
    g.sync_events().await;
    assert!(
        g.events.all.iter().all(|e| e.name != "DEVICE_DELETED"),
        "{:#?}",
        g.events.all
    );
    assert!(g.qom_has("nic0").await && g.qom_has("cpu1").await);
}

/// The library's waiting removal on what the test above documents: a CPU
/// reported gone only by its lapic is removed (the call returns `Ok`: with
/// a timeout of minutes, nothing else can end it so), and a guest that
/// refuses a CPU's or a DIMM's eject ends the call with the refusal (the
/// only path to [`qmpkit::Error::UnplugRefused`] is the guest's `_OST`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_device_and_wait_removes_a_cpu_and_reports_a_refusal_at_once() {
    let mut g = boot().await;
    let slots = g.mon.query_hotpluggable_cpus().await.unwrap();
    let free: Vec<_> = slots.iter().filter(|s| s.qom_path.is_none()).collect();
    within(10, g.mon.add_device(&free[0].device("cpu1")))
        .await
        .unwrap();
    g.console.wait_online_cpus(2).await;

    unplug_and_wait(&g.mon, "cpu1").await;
    assert!(!g.qom_has("cpu1").await);
    assert_eq!(g.mon.query_cpus().await.unwrap().len(), 1);
    g.console.wait_online_cpus(1).await;

    // Refused: a fresh slot (TCG never reuses a vCPU's context, and more
    // vCPUs over the VM's life than maxcpus abort QEMU).
    within(10, g.mon.add_device(&free[1].device("cpu2")))
        .await
        .unwrap();
    g.console.wait_online_cpus(2).await;
    assert_eq!(g.console.ask("refuse-unplug processor").await, "processor");
    let err = within(
        UNPLUG.as_secs() + 10,
        g.mon.remove_device_and_wait("cpu2", UNPLUG),
    )
    .await
    .unwrap_err();
    match &err {
        qmpkit::Error::UnplugRefused { device, status } => {
            assert_eq!(
                (device.as_str(), *status),
                ("cpu2", OST_STATUS_REMOVE_NOT_SUPPORTED)
            );
        }
        other => panic!("expected UnplugRefused, got {other:?}"),
    }
    assert!(g.qom_has("cpu2").await);
    assert_eq!(g.mon.query_cpus().await.unwrap().len(), 2);
    assert_eq!(g.console.online_cpus().await, 2);

    // A DIMM the guest will not give back.
    let before = g.console.mem_total_kb().await;
    let backend = ObjectSpec::new("memory-backend-ram", "mem1").prop("size", DIMM_BYTES);
    within(10, g.mon.add_object(&backend)).await.unwrap();
    let dimm = DeviceSpec::new("pc-dimm").id("dimm1").prop("memdev", "mem1");
    within(10, g.mon.add_device(&dimm)).await.unwrap();
    g.console
        .ask_until("meminfo", |a| a.parse::<u64>().ok() == Some(before + DIMM_KB))
        .await;
    assert_eq!(g.console.ask("refuse-unplug memory").await, "memory");
    let err = within(
        UNPLUG.as_secs() + 10,
        g.mon.remove_device_and_wait("dimm1", UNPLUG),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, qmpkit::Error::UnplugRefused { device, .. } if device == "dimm1"),
        "{err:?}"
    );
    assert!(g.qom_has("dimm1").await);
    assert_eq!(g.console.mem_total_kb().await, before + DIMM_KB);
}

/// QEMU's side of what the next test guards against. QEMU 10 dates an ACPI
/// unplug request by the VM's clock (in ms) and accepts it again once that
/// clock has moved on; a request made before the VM ever ran is dated 0,
/// which QEMU reads as "no date". When the booting guest loses that
/// request (it clears pending ACPI events as it starts), every later
/// request is refused as "already in the process of unplug", however long
/// the guest has been up, and the NIC stays. (On some boots the guest does
/// handle it and the NIC goes: that is accepted too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplug_asked_before_the_vm_first_ran_blocks_every_later_one() {
    let mut g = launch(&NIC0_ON_RP1).await;
    within(10, g.request_unplug("nic0"))
        .await
        .expect("QEMU accepts the NIC's unplug");
    g.start().await;
    g.ready().await;
    if !g.qom_has("nic0").await {
        // The guest took the first request after all.
        assert_eq!(g.console.ask("net").await, "lo");
        eprintln!("this boot, the guest handled the request made before it ran");
        return;
    }
    eprintln!("this boot, the guest lost the request made before it ran");
    assert!(g.console.ask("net").await.contains("eth0"));
    for _ in 0..2 {
        let again = within(10, g.request_unplug("nic0")).await.unwrap_err();
        assert!(
            again.to_string().contains("already in the process of unplug"),
            "{again}"
        );
        // Longer than QEMU's longest re-request window (5 s, native PCIe).
        g.console.ask("sh sleep 6").await;
    }
    assert!(g.qom_has("nic0").await);
}

/// The library's waiting removal asked for while the VM is in `prelaunch`:
/// it sends nothing until the VM has run (the test above shows why), then
/// asks, and again while the booting guest cannot listen, until the guest
/// lets the NIC go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_device_and_wait_in_prelaunch_removes_the_nic_once_the_guest_runs() {
    let mut g = launch(&NIC0_ON_RP1).await;
    let client = g.vm.client().clone();
    let call = tokio::spawn(async move {
        client
            .remove_device_and_wait("nic0", Duration::from_secs(BOOT_SECS))
            .await
    });
    // The call has looked at the VM's state, found it in prelaunch, and
    // waits: nothing has been asked of QEMU.
    let log = g.vm.traffic_log().to_owned();
    eventually(10, || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|t| t.contains("query-status"))
        }
    })
    .await;
    assert!(g.qom_has("nic0").await);
    g.start().await;
    within(BOOT_SECS + 10, call)
        .await
        .unwrap()
        .expect("the NIC is removed once the guest runs");
    g.ready().await;
    assert!(!g.qom_has("nic0").await);
    assert_eq!(g.console.ask("net").await, "lo");
    // Asked only after the VM ran: the RESUME comes before the request.
    let log = std::fs::read_to_string(&log).unwrap();
    let resumed = log.find("\"RESUME\"").expect("RESUME in the traffic log");
    let asked = log.find("\"device_del\"").expect("device_del in the traffic log");
    assert!(resumed < asked, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotplugged_memory_reaches_memtotal_and_a_refused_unplug_keeps_it() {
    let mut g = boot().await;
    let before = g.console.mem_total_kb().await;

    let backend = ObjectSpec::new("memory-backend-ram", "mem1").prop("size", DIMM_BYTES);
    within(10, g.mon.add_object(&backend)).await.unwrap();
    let dimm = DeviceSpec::new("pc-dimm").id("dimm1").prop("memdev", "mem1");
    within(10, g.mon.add_device(&dimm)).await.unwrap();
    // The guest onlined the new memory.
    g.console
        .ask_until("meminfo", |a| a.parse::<u64>().ok() == Some(before + DIMM_KB))
        .await;
    let dimms = g.mon.dimm_devices().await.unwrap();
    assert_eq!(dimms.len(), 1, "{dimms:?}");
    assert_eq!((dimms[0].id.as_str(), dimms[0].size), ("dimm1", DIMM_BYTES));
    assert!(dimms[0].hotplugged);

    // The guest refuses to give it back: an _OST says so, and it stays.
    assert_eq!(g.console.ask("refuse-unplug memory").await, "memory");
    within(10, g.request_unplug("dimm1")).await.unwrap();
    let ev = g
        .events
        .next_where("dimm1's eject _OST", |e| {
            e.name == "ACPI_DEVICE_OST"
                && ost(e)["device"] == "dimm1"
                && ost(e)["source"] == OST_SOURCE_EJECT_REQUEST
        })
        .await;
    assert_eq!(ost(&ev)["status"], OST_STATUS_REMOVE_NOT_SUPPORTED, "{ev:?}");
    assert!(g.qom_has("dimm1").await);
    assert_eq!(g.mon.dimm_devices().await.unwrap().len(), 1);
    assert_eq!(g.console.mem_total_kb().await, before + DIMM_KB);

    // The console's `dirty` keeps rewriting guest memory (for migration
    // tests): QEMU measures a dirty rate above zero (once the loop has got
    // going: measured again until then).
    let pid = g.console.ask("dirty").await;
    assert!(pid.parse::<u32>().is_ok(), "dirty answered {pid:?}");
    let mon = &g.mon;
    eventually(
        GUEST_SECS,
        || async move { (dirty_rate(mon).await > 0).then_some(()) },
    )
    .await;
}

/// Measures the guest's dirty rate over 2 s (`calc-dirty-rate`, sampling
/// pages), in MB/s.
async fn dirty_rate(mon: &Monitor) -> i64 {
    let _: Value = mon
        .call("calc-dirty-rate", &json!({"calc-time": 2}))
        .await
        .unwrap();
    eventually(GUEST_SECS, || async move {
        let r: Value = mon.call("query-dirty-rate", &()).await.unwrap();
        (r["status"] == "measured").then(|| r["dirty-rate"].as_i64().unwrap_or(0))
    })
    .await
}

// ------------------------------------------------------------ migration

/// How long a migration of the guest may take, start to end.
const MIGRATION: Duration = Duration::from_secs(300);
/// A bandwidth the dirtying guest outruns (its `dirty` loop rewrites 32 MiB
/// again and again), in bytes per second.
const TIGHT_BANDWIDTH: u64 = 8 << 20;

/// Passes one end of a socket pair to QEMU as `mig` (`getfd`).
async fn give_migration_fd(mon: &Monitor, fd: std::os::fd::OwnedFd) {
    within(
        10,
        mon.call_with::<_, Empty>("getfd", &json!({"fdname": "mig"}), CallOptions::new().fds([fd])),
    )
    .await
    .unwrap();
}

/// Starts the guest's `dirty` loop and returns its pid.
async fn start_dirtying(g: &mut Guest) -> u32 {
    let pid = g.console.ask("dirty").await;
    pid.parse().unwrap_or_else(|_| panic!("dirty answered {pid:?}"))
}

/// Waits until the source has synced the dirty bitmap `rounds` times with
/// a dirty rate above zero, and returns the state then.
async fn dirty_rounds(mon: &Monitor, rounds: u64) -> qmpkit::commands::migration::MigrationStatus {
    eventually(MIGRATION.as_secs(), || async move {
        let st = mon.query_migrate().await.unwrap();
        assert!(
            ["setup", "active"].contains(&st.status.as_str()),
            "the migration ended early: {st:?}"
        );
        (st.ram.dirty_sync_count >= rounds && st.ram.dirty_pages_rate > 0).then_some(st)
    })
    .await
}

/// A guest that keeps dirtying memory: at a tight bandwidth and downtime
/// limit its migration makes progress yet does not converge, however hard
/// auto-converge throttles it; given the bandwidth, it completes. The guest
/// then runs on the target, dirty loop and all, and the target's monitor,
/// told of the agent the source saw, reports it and hears its next STOPPED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dirtying_guest_migrates_once_tuned_and_keeps_its_agent_state() {
    let mut src = boot().await;
    src.agent_up().await;
    let mut dst = launch(&["-incoming", "defer"]).await;
    let dirty = start_dirtying(&mut src).await;
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    give_migration_fd(&src.mon, a.into()).await;
    give_migration_fd(&dst.mon, b.into()).await;

    within(10, src.mon.migrate_set_auto_converge(true)).await.unwrap();
    let tight = MigrationTuning::new()
        .max_bandwidth(TIGHT_BANDWIDTH)
        .downtime_limit(Duration::from_millis(1))
        .cpu_throttle(20, 10)
        // Throttle as soon as the guest dirties anything much: how fast it
        // dirties under TCG on a busy machine is not known in advance.
        .throttle_trigger_threshold(1);
    within(10, src.mon.migrate_tune(&tight)).await.unwrap();
    let params = src.mon.query_migrate_parameters().await.unwrap();
    assert_eq!(
        (
            params.max_bandwidth,
            params.downtime_limit,
            params.cpu_throttle_initial,
            params.cpu_throttle_increment,
            params.throttle_trigger_threshold
        ),
        (Some(TIGHT_BANDWIDTH), Some(1), Some(20), Some(10), Some(1))
    );

    let target = dst.mon.clone();
    let incoming = tokio::spawn(async move { target.migrate_incoming("mig", MIGRATION).await });
    within(10, src.mon.migrate("mig")).await.unwrap();

    // Progress without convergence: round after round of dirty pages,
    // more sent each time, auto-converge throttling, still not done.
    let early = dirty_rounds(&src.mon, 2).await;
    let later = dirty_rounds(&src.mon, early.ram.dirty_sync_count + 2).await;
    assert!(
        later.ram.transferred > early.ram.transferred,
        "{early:?}\n{later:?}"
    );
    assert!(later.cpu_throttle_percentage > 0, "auto-converge: {later:?}");
    assert_eq!(later.status, "active");

    // Given the bandwidth (and a downtime TCG can meet), it completes.
    let generous = MigrationTuning::new()
        .max_bandwidth(1 << 30)
        .downtime_limit(Duration::from_secs(2));
    within(10, src.mon.migrate_tune(&generous)).await.unwrap();
    within(
        MIGRATION.as_secs() + 10,
        src.mon.migrate_wait("completed", MIGRATION),
    )
    .await
    .unwrap();
    within(MIGRATION.as_secs() + 10, incoming)
        .await
        .unwrap()
        .expect("the target received the guest");
    let done = src.mon.query_migrate().await.unwrap();
    assert!(done.ram.transferred > later.ram.transferred, "{done:?}");

    // The target (started with -S) holds the guest; it runs once resumed.
    dst.start().await;
    dst.events.next("RESUME").await;
    assert_eq!(dst.mon.status().await.unwrap(), RunState::Running);
    assert_eq!(dst.console.ask("echo moved").await, "moved");
    assert_eq!(dst.console.ask(&format!("sh kill -0 {dirty}")).await, "0");

    // The agent: the target never read the STARTED written on the source.
    assert!(src.mon.agent_started());
    assert!(!dst.mon.agent_started());
    dst.mon.set_agent_started(src.mon.agent_started()).unwrap();
    assert!(dst.mon.agent_started());
    assert_eq!(dst.console.ask("sh . /etc/guest.sh; agent STOPPED").await, "0");
    assert!(!within(10, dst.mon.check_agent()).await.unwrap());
    dst.events.next(EVENT_AGENT_STOPPED).await;
    assert!(
        dst.events.all.iter().all(|e| e.name != EVENT_AGENT_STARTED),
        "{:#?}",
        dst.events.all
    );
}

/// Cancelled mid-flight, a migration ends at once: the source keeps the
/// guest running, a wait for completion says it was cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_cancel_mid_flight_leaves_the_guest_running_on_the_source() {
    let mut g = boot().await;
    let dirty = start_dirtying(&mut g).await;
    // The destination: a sink that reads whatever comes, until QEMU closes.
    let (a, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let sink = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(std::io::Read::read(&mut peer, &mut buf), Ok(n) if n > 0) {}
    });
    give_migration_fd(&g.mon, a.into()).await;
    within(
        10,
        g.mon
            .migrate_tune(&MigrationTuning::new().max_bandwidth(TIGHT_BANDWIDTH)),
    )
    .await
    .unwrap();
    within(10, g.mon.migrate("mig")).await.unwrap();
    let mon = &g.mon;
    eventually(GUEST_SECS, || async move {
        let st = mon.query_migrate().await.unwrap();
        (st.status == "active" && st.ram.transferred > 0).then_some(())
    })
    .await;
    let waiter = {
        let mon = g.mon.clone();
        tokio::spawn(async move { mon.migrate_wait("completed", MIGRATION).await })
    };

    let after = within(GUEST_SECS, g.mon.migrate_cancel(Duration::from_secs(GUEST_SECS)))
        .await
        .unwrap();
    assert_eq!(after.status, "cancelled", "{after:?}");
    let e = within(GUEST_SECS, waiter).await.unwrap().unwrap_err();
    assert!(e.is_migration_cancelled(), "{e:?}");
    assert_eq!(g.mon.query_migrate().await.unwrap().status, "cancelled");
    assert_eq!(g.mon.status().await.unwrap(), RunState::Running);
    assert_eq!(g.console.ask("echo still-here").await, "still-here");
    assert_eq!(g.console.ask(&format!("sh kill -0 {dirty}")).await, "0");
    // Nothing left to cancel: the last migration's state, unchanged.
    let again = within(GUEST_SECS, g.mon.migrate_cancel(Duration::from_secs(GUEST_SECS)))
        .await
        .unwrap();
    assert_eq!(again.status, "cancelled");
    tokio::task::spawn_blocking(move || sink.join().unwrap())
        .await
        .unwrap();
}

/// Post-copy (QEMU 10 on Linux offers it, with userfaultfd on the target):
/// switched to it, the dirtying guest's migration completes at the tight
/// pre-copy settings that never converge, and the guest runs on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dirtying_guest_completes_through_postcopy() {
    let mut src = boot().await;
    let mut dst = launch(&["-incoming", "defer"]).await;
    let dirty = start_dirtying(&mut src).await;
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    give_migration_fd(&src.mon, a.into()).await;
    give_migration_fd(&dst.mon, b.into()).await;
    within(10, src.mon.migrate_set_postcopy(true)).await.unwrap();
    within(10, dst.mon.migrate_set_postcopy(true)).await.unwrap();
    let tight = MigrationTuning::new()
        .max_bandwidth(TIGHT_BANDWIDTH)
        .downtime_limit(Duration::from_millis(1));
    within(10, src.mon.migrate_tune(&tight)).await.unwrap();

    let target = dst.mon.clone();
    let incoming = tokio::spawn(async move { target.migrate_incoming("mig", MIGRATION).await });
    within(10, src.mon.migrate("mig")).await.unwrap();
    dirty_rounds(&src.mon, 2).await;
    within(10, src.mon.migrate_start_postcopy()).await.unwrap();
    within(
        MIGRATION.as_secs() + 10,
        src.mon.migrate_wait("completed", MIGRATION),
    )
    .await
    .unwrap();
    within(MIGRATION.as_secs() + 10, incoming)
        .await
        .unwrap()
        .expect("the target received the guest");
    let done = src.mon.query_migrate().await.unwrap();
    assert!(done.ram.postcopy_bytes > 0, "{done:?}");

    // Started with -S, the target ran the guest for post-copy only as far
    // as QEMU's own needs go: it holds it paused until told.
    assert_eq!(dst.mon.status().await.unwrap(), RunState::Paused);
    dst.start().await;
    assert_eq!(dst.mon.status().await.unwrap(), RunState::Running);
    assert_eq!(dst.console.ask("echo moved").await, "moved");
    assert_eq!(dst.console.ask(&format!("sh kill -0 {dirty}")).await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balloon_inflates_and_deflates_in_the_guests_memtotal() {
    let mut g = boot().await;
    let full = 256i64 << 20;
    let taken = 64i64 << 20;
    assert_eq!(g.mon.memory_balloon_size_bytes().await.unwrap(), full);
    let before = g.console.mem_total_kb().await;

    within(10, g.mon.set_memory_balloon_size_bytes(full - taken))
        .await
        .unwrap();
    let inflated = before - (taken as u64 >> 10);
    g.console
        .ask_until("meminfo", |a| a.parse::<u64>().ok() == Some(inflated))
        .await;
    let mon = g.mon.clone();
    let balloon_is = |bytes: i64| {
        let mon = mon.clone();
        async move { (mon.memory_balloon_size_bytes().await.unwrap() == bytes).then_some(()) }
    };
    eventually(GUEST_SECS, || balloon_is(full - taken)).await;

    within(10, g.mon.set_memory_balloon_size_bytes(full))
        .await
        .unwrap();
    g.console
        .ask_until("meminfo", |a| a.parse::<u64>().ok() == Some(before))
        .await;
    eventually(GUEST_SECS, || balloon_is(full)).await;
    g.events.next("BALLOON_CHANGE").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_panic_is_reported_then_shuts_the_vm_down_once() {
    let mut g = boot().await;
    let actions = Actions {
        panic: Some(PanicAction::Shutdown),
        ..Actions::default()
    };
    within(10, g.mon.set_action(&actions)).await.unwrap();
    g.agent_up().await;

    g.console.send("panic").await;
    g.console.line_with("Kernel panic", GUEST_SECS).await;
    let seen = g.exited().await;
    let names: Vec<&str> = seen
        .iter()
        .map(|e| e.name.as_str())
        .filter(|n| ["GUEST_PANICKED", EVENT_VM_SHUTDOWN, EVENT_AGENT_STOPPED].contains(n))
        .collect();
    assert_eq!(
        names,
        ["GUEST_PANICKED", EVENT_AGENT_STOPPED, EVENT_VM_SHUTDOWN],
        "{seen:#?}"
    );
    let shutdown = seen.iter().find(|e| e.name == EVENT_VM_SHUTDOWN).unwrap();
    assert_eq!(shutdown.data, json!({"guest": true, "reason": "guest-panic"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_reboot_is_the_guests_and_monitor_reset_is_ours_firmware_reset_included() {
    let mut g = boot().await;
    g.agent_up().await;

    // The guest reboots itself: every RESET is unexpected.
    let from = g.events.next;
    g.console.send("reboot").await;
    g.ready().await;
    g.agent_up().await;
    g.sync_events().await;
    let resets: Vec<&Seen> = g.events.all[from..]
        .iter()
        .filter(|e| e.name == EVENT_VM_RESET)
        .collect();
    assert!(!resets.is_empty());
    assert!(
        resets
            .iter()
            .all(|e| e.deliberate == Some(false) && e.data["reason"] == "guest-reset"),
        "{resets:#?}"
    );
    assert_eq!(
        g.events
            .names_among(from, &[EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED]),
        [EVENT_AGENT_STOPPED, EVENT_AGENT_STARTED]
    );

    // Monitor::reset: QEMU's RESET and the one the firmware makes right
    // after it are both recognised as ours.
    let from = g.events.next;
    within(10, g.mon.reset()).await.unwrap();
    g.ready().await;
    g.agent_up().await;
    g.sync_events().await;
    let resets: Vec<&Seen> = g.events.all[from..]
        .iter()
        .filter(|e| e.name == EVENT_VM_RESET)
        .collect();
    assert_eq!(resets[0].data["reason"], "host-qmp-system-reset", "{resets:#?}");
    assert!(resets.len() >= 2, "the firmware's own reset: {resets:#?}");
    assert!(resets.iter().all(|e| e.deliberate == Some(true)), "{resets:#?}");
    assert_eq!(
        g.events
            .names_among(from, &[EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED]),
        [EVENT_AGENT_STOPPED, EVENT_AGENT_STARTED]
    );
    // And the guest is the same guest, running again.
    assert_eq!(g.console.ask("echo back").await, "back");
    assert!(!g.mon.handle_reset(), "no announcement left over");
}

#[test]
fn cpu_lists_are_counted() {
    assert_eq!(cpu_count("0"), Some(1));
    assert_eq!(cpu_count("0-1"), Some(2));
    assert_eq!(cpu_count("0,2"), Some(2));
    assert_eq!(cpu_count("0-2,4-5,7"), Some(6));
    assert_eq!(cpu_count(""), None);
    assert_eq!(cpu_count("2-1"), None);
}
