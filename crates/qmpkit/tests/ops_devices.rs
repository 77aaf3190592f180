//! Device, NIC, PCI, object, secret and chardev operations, each run against
//! a real QEMU and checked by asking QEMU back.
//!
//! PCI hot-unplug normally waits for the guest OS. These VMs switch q35 from
//! ACPI PCI hotplug to native PCIe hotplug, under which QEMU unplugs a
//! device from a powered-off root port slot (no guest, so never powered on)
//! at once; see the module docs of `qmpkit::commands::devices`.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::{eventually, vm, vm_with, within};
use qmpkit::commands::chardev::{ChardevBackend, ChardevChange};
use qmpkit::commands::devices::{DeviceSpec, NetdevSpec, ObjectSpec, PciDevice};
use qmpkit::{Client, ConsoleError, Error};
use serde_json::{json, Value};
use tokio::net::UnixDatagram;

const UNPLUG: Duration = Duration::from_secs(10);

/// A VM with native PCIe hotplug and two empty root ports, `rp1` and `rp2`.
async fn pcie_vm() -> common::Vm {
    vm_with(|b| {
        b.args([
            "-global",
            "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
            "-device",
            "pcie-root-port,id=rp1,chassis=1",
            "-device",
            "pcie-root-port,id=rp2,chassis=2",
        ])
    })
    .await
}

/// Every PCI device id QEMU lists, behind bridges too.
async fn pci_ids(c: &Client) -> Vec<String> {
    let buses = c.query_pci().await.unwrap();
    buses
        .iter()
        .flat_map(|b| &b.devices)
        .flat_map(PciDevice::walk)
        .map(|d| d.id.clone())
        .filter(|id| !id.is_empty())
        .collect()
}

/// The ids of the user-created QOM children of `path`.
async fn qom_children(c: &Client, path: &str) -> Vec<String> {
    let props: Vec<Value> = c.call("qom-list", &json!({ "path": path })).await.unwrap();
    props
        .iter()
        .filter(|p| p["type"].as_str().is_some_and(|t| t.starts_with("child<")))
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A virtio NIC without option ROM (so the firmware never sends from it).
fn nic(id: &str, bus: &str, netdev: &str, mac: &str) -> DeviceSpec {
    DeviceSpec::new("virtio-net-pci")
        .id(id)
        .bus(bus)
        .prop("netdev", netdev)
        .prop("mac", mac)
        .prop("romfile", "")
}

// ---------------------------------------------------------------- devices.rs

/// The link state is not visible in any query, so it is observed on the
/// wire: `announce-self` makes every NIC send a RARP frame, and a NIC whose
/// link is down sends nothing. Both NICs' netdevs send their frames to one
/// datagram socket of the test, which tells them apart by sender address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_nic_disconnected_and_set_nic_link_switch_the_wire() {
    let vm = pcie_vm().await;
    let c = vm.client();
    let dir = vm.dir();
    let sink = UnixDatagram::bind(dir.join("sink")).unwrap();
    let netdev = |id: &str| {
        NetdevSpec::new("dgram", id)
            .prop("local", json!({"type": "unix", "path": dir.join(id)}))
            .prop("remote", json!({"type": "unix", "path": dir.join("sink")}))
    };
    let announce = || async {
        c.call::<_, Value>(
            "announce-self",
            &json!({"initial": 0, "max": 1, "rounds": 1, "step": 1}),
        )
        .await
        .unwrap();
    };
    // The next RARP frame's sender: "neta" or "netb".
    let next_rarp = || async {
        loop {
            let mut buf = [0u8; 2048];
            let (n, from) = sink.recv_from(&mut buf).await.unwrap();
            if n >= 14 && buf[12..14] == [0x80, 0x35] {
                let path = from.as_pathname().unwrap().to_owned();
                return path.file_name().unwrap().to_string_lossy().into_owned();
            }
        }
    };
    within(30, async {
        c.add_nic(
            &netdev("neta"),
            &nic("nica", "rp1", "neta", "52:54:00:00:00:0a"),
            false,
        )
        .await
        .unwrap();
        c.add_nic(
            &netdev("netb"),
            &nic("nicb", "rp2", "netb", "52:54:00:00:00:0b"),
            true,
        )
        .await
        .unwrap();
        c.start().await.unwrap();

        // nica was added with its link down: only nicb announces.
        announce().await;
        assert_eq!(next_rarp().await, "netb");
        // Frames of one announcement are sent together, so any frame of
        // nica's from the first round would come before these.
        c.set_nic_link("nica", true).await.unwrap();
        announce().await;
        let mut round = vec![next_rarp().await, next_rarp().await];
        round.sort();
        assert_eq!(round, ["neta", "netb"]);

        c.set_nic_link("nica", false).await.unwrap();
        announce().await;
        assert_eq!(next_rarp().await, "netb");

        let err = c.set_nic_link("nope", false).await.unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nic_hotplug_shows_in_pci_and_remove_nic_and_wait_cleans_up() {
    let vm = pcie_vm().await;
    let c = vm.client();
    within(30, async {
        c.add_nic(
            &NetdevSpec::new("user", "net0"),
            &nic("nic0", "rp1", "net0", "52:54:00:00:00:01"),
            true,
        )
        .await
        .unwrap();
        assert!(qom_children(c, "/machine/peripheral")
            .await
            .contains(&"nic0".to_owned()));
        // Behind a root port: listed once the firmware has numbered its bus.
        c.start().await.unwrap();
        eventually(20, || async {
            c.check_pci_device("nic0").await.unwrap().then_some(())
        })
        .await;
        // The firmware may still be renumbering buses, during which QEMU
        // briefly lists the bridge's devices under no bus: poll again.
        eventually(20, || async {
            pci_ids(c).await.contains(&"nic0".to_owned()).then_some(())
        })
        .await;
        // rp1 itself sits on the root bus, not behind a bridge.
        assert!(!c.check_pci_device("rp1").await.unwrap());
        assert!(!c.check_pci_device("nope").await.unwrap());

        c.remove_nic_and_wait("net0", Some("nic0"), UNPLUG).await.unwrap();
        assert!(!pci_ids(c).await.contains(&"nic0".to_owned()));
        assert!(!qom_children(c, "/machine/peripheral")
            .await
            .contains(&"nic0".to_owned()));
        // The netdev is gone too: its id is free again.
        c.call::<_, Value>("netdev_add", &json!({"type": "user", "id": "net0"}))
            .await
            .unwrap();
        // A NIC whose device is already gone still loses its netdev...
        c.remove_nic_and_wait("net0", Some("nic0"), UNPLUG).await.unwrap();
        // ...and a netdev that does not exist is a not-found error.
        let err = c.remove_nic_and_wait("net0", None, UNPLUG).await.unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_nic_failure_undoes_the_netdev() {
    let vm = pcie_vm().await;
    let c = vm.client();
    within(30, async {
        let err = c
            .add_nic(
                &NetdevSpec::new("user", "net0"),
                &DeviceSpec::new("no-such-nic").id("nic0").prop("netdev", "net0"),
                true,
            )
            .await
            .unwrap_err();
        assert!(err.is_qmp(), "{err:?}");

        // Disconnected without an id: refused before anything is sent.
        let err = c
            .add_nic(
                &NetdevSpec::new("user", "net1"),
                &DeviceSpec::new("virtio-net-pci")
                    .bus("rp2")
                    .prop("netdev", "net1"),
                false,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");

        // Both netdev ids are free: a good NIC can take them.
        for (net, id, bus, mac) in [
            ("net0", "nic0", "rp1", "52:54:00:00:00:01"),
            ("net1", "nic1", "rp2", "52:54:00:00:00:02"),
        ] {
            c.add_nic(&NetdevSpec::new("user", net), &nic(id, bus, net, mac), true)
                .await
                .unwrap();
        }
        let peripherals = qom_children(c, "/machine/peripheral").await;
        assert!(peripherals.contains(&"nic0".to_owned()) && peripherals.contains(&"nic1".to_owned()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_device_and_wait_waits_for_device_deleted() {
    let vm = vm_with(|b| b.args(["-device", "qemu-xhci,id=xhci"])).await;
    let c = vm.client();
    within(30, async {
        c.add_device(&DeviceSpec::new("usb-kbd").id("kbd0"))
            .await
            .unwrap();
        assert!(qom_children(c, "/machine/peripheral")
            .await
            .contains(&"kbd0".to_owned()));
        c.remove_device_and_wait("kbd0", UNPLUG).await.unwrap();
        // Gone as soon as the call returns: it waited for DEVICE_DELETED.
        assert!(!qom_children(c, "/machine/peripheral")
            .await
            .contains(&"kbd0".to_owned()));

        let err = c.remove_device_and_wait("kbd0", UNPLUG).await.unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        let err = c
            .add_device(&DeviceSpec::new("no-such-device").id("x"))
            .await
            .unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
    })
    .await;
}

/// Under q35's default ACPI PCI hotplug an unplug waits for the guest OS;
/// with none, `remove_device_and_wait` gives up at the caller's deadline and
/// the device stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_device_and_wait_times_out_when_the_guest_must_cooperate() {
    let vm = vm_with(|b| b.args(["-device", "pcie-root-port,id=rp1,chassis=1"])).await;
    let c = vm.client();
    within(30, async {
        c.add_device(
            &DeviceSpec::new("virtio-net-pci")
                .id("nic0")
                .bus("rp1")
                .prop("romfile", ""),
        )
        .await
        .unwrap();
        let err = c
            .remove_device_and_wait("nic0", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert!(!c.is_closed());
        assert!(qom_children(c, "/machine/peripheral")
            .await
            .contains(&"nic0".to_owned()));
    })
    .await;
}

/// The Go `RemoveDevice`: the request is sent and the call returns once QEMU
/// accepts it, whether or not the device is gone yet; a device that does not
/// exist is success; any other refusal is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_device_returns_once_qemu_accepts_and_a_missing_device_is_success() {
    let vm = vm_with(|b| {
        b.args([
            "-device",
            "pcie-root-port,id=rp1,chassis=1",
            "-device",
            "qemu-xhci,id=xhci",
            "-device",
            "virtio-rng-pci,id=rng0",
        ])
    })
    .await;
    let c = vm.client();
    within(30, async {
        // ACPI PCI hotplug and no guest: the unplug never completes, yet
        // the call returns, and the device is still there.
        c.add_device(
            &DeviceSpec::new("virtio-net-pci")
                .id("nic0")
                .bus("rp1")
                .prop("romfile", ""),
        )
        .await
        .unwrap();
        c.remove_device("nic0").await.unwrap();
        assert!(qom_children(c, "/machine/peripheral")
            .await
            .contains(&"nic0".to_owned()));
        // Asking again while that unplug is pending is QEMU's error, as in Go.
        let err = c.remove_device("nic0").await.unwrap_err();
        assert!(err.is_qmp() && !err.is_not_found(), "{err:?}");

        // An unplug that completes by itself: gone soon after, not waited for.
        c.add_device(&DeviceSpec::new("usb-kbd").id("kbd0"))
            .await
            .unwrap();
        c.remove_device("kbd0").await.unwrap();
        eventually(10, || async {
            (!qom_children(c, "/machine/peripheral")
                .await
                .contains(&"kbd0".to_owned()))
            .then_some(())
        })
        .await;
        // Gone, or never there: success.
        c.remove_device("kbd0").await.unwrap();
        c.remove_device("no-such-device").await.unwrap();
        c.remove_device("").await.unwrap();

        // A device on the root bus cannot be unplugged: QEMU's refusal stays an error.
        let err = c.remove_device("rng0").await.unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
    })
    .await;
}

/// The Go `RemoveNIC`: `netdev_del` only; a netdev that does not exist is
/// success, any other refusal an error, and the NIC's device stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_nic_deletes_the_netdev_and_a_missing_netdev_is_success() {
    let vm = vm_with(|b| {
        b.args([
            "-device",
            "pcie-root-port,id=rp1,chassis=1",
            // A legacy `-net` client: found by netdev_del, but refused.
            "-net",
            "user,id=legacy0",
        ])
    })
    .await;
    let c = vm.client();
    within(30, async {
        c.add_nic(
            &NetdevSpec::new("user", "net0"),
            &nic("nic0", "rp1", "net0", "52:54:00:00:00:01"),
            true,
        )
        .await
        .unwrap();
        c.remove_nic("net0").await.unwrap();
        // The netdev's id is free again; the device is untouched.
        c.call::<_, Value>("netdev_add", &json!({"type": "user", "id": "net0"}))
            .await
            .unwrap();
        assert!(qom_children(c, "/machine/peripheral")
            .await
            .contains(&"nic0".to_owned()));
        c.remove_nic("net0").await.unwrap();
        // Gone, or never there: success.
        c.remove_nic("net0").await.unwrap();
        c.remove_nic("").await.unwrap();
        // A NIC's own id is no netdev's: not found, so success, and the NIC stays.
        c.remove_nic("nic0").await.unwrap();
        assert!(qom_children(c, "/machine/peripheral")
            .await
            .contains(&"nic0".to_owned()));
        // Any other refusal is an error ("... is not a netdev").
        let err = c.remove_nic("legacy0").await.unwrap_err();
        assert!(err.is_qmp() && !err.is_not_found(), "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_and_secrets_are_added_and_removed() {
    let vm = vm().await;
    let c = vm.client();
    within(20, async {
        c.add_secret("sec0", "hunter2").await.unwrap();
        // Adding it again is fine (and keeps it).
        c.add_secret("sec0", "hunter2").await.unwrap();
        let ty: String = c
            .call("qom-get", &json!({"path": "/objects/sec0", "property": "type"}))
            .await
            .unwrap();
        assert_eq!(ty, "secret");

        c.add_object(&ObjectSpec::new("iothread", "io0").prop("poll-max-ns", 0))
            .await
            .unwrap();
        let threads: Vec<Value> = c.call("query-iothreads", &()).await.unwrap();
        assert!(threads.iter().any(|t| t["id"] == "io0"));

        c.remove_object("io0").await.unwrap();
        assert!(!qom_children(c, "/objects").await.contains(&"io0".to_owned()));
        let err = c.remove_object("io0").await.unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        let err = c
            .add_object(&ObjectSpec::new("no-such-type", "x"))
            .await
            .unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
        // An id taken by another object is an error for anything but a secret.
        let err = c
            .add_object(&ObjectSpec::new("iothread", "sec0"))
            .await
            .unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_pci_lists_root_ports_as_bridges() {
    let vm = pcie_vm().await;
    let c = vm.client();
    within(20, async {
        let buses = c.query_pci().await.unwrap();
        assert_eq!(buses[0].bus, 0);
        let rp1 = buses[0].devices.iter().find(|d| d.id == "rp1").expect("rp1");
        assert!(rp1.bridge.is_some());
        assert_eq!(rp1.class.description, "PCI bridge");
        let host = buses[0]
            .devices
            .iter()
            .find(|d| d.slot == 0)
            .expect("host bridge");
        assert!(host.bridge.is_none());
    })
    .await;
}

// ---------------------------------------------------------------- chardev.rs

async fn ringbuf_vm() -> common::Vm {
    vm_with(|b| {
        b.args([
            "-chardev",
            "ringbuf,id=rb0,size=131072",
            "-chardev",
            "memory,id=mem0",
            "-chardev",
            "null,id=nul0",
            "-chardev",
            "ringbuf,id=busy0",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-device",
            "virtserialport,chardev=busy0,name=org.example.agent,id=port0",
        ])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ringbuf_read_returns_exactly_what_was_written() {
    let vm = ringbuf_vm().await;
    let c = vm.client();
    within(20, async {
        c.ringbuf_write("rb0", "STARTED\nSTOP").await.unwrap();
        c.ringbuf_write("rb0", "PED\n").await.unwrap();
        assert_eq!(c.ringbuf_read("rb0").await.unwrap(), "STARTED\nSTOPPED\n");
        // Drained.
        assert_eq!(c.ringbuf_read("rb0").await.unwrap(), "");
        // `memory` is QEMU's other name for a ring buffer.
        c.ringbuf_write("mem0", "x").await.unwrap();
        assert_eq!(c.ringbuf_read("mem0").await.unwrap(), "x");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ringbuf_read_drains_100k_of_control_bytes() {
    let vm = ringbuf_vm().await;
    let c = vm.client();
    // Each \u0001 travels as 6 bytes of JSON: 600 KB in one reply per 100 KB.
    let data = "\u{1}".repeat(100_000);
    within(30, async {
        c.ringbuf_write("rb0", &data).await.unwrap();
        let read = c.ringbuf_read("rb0").await.unwrap();
        assert_eq!(read.len(), data.len());
        assert!(read == data);
        assert_eq!(c.ringbuf_read("rb0").await.unwrap(), "");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ringbuf_read_tells_missing_consoles_from_other_backends() {
    let vm = ringbuf_vm().await;
    let c = vm.client();
    within(20, async {
        match c.ringbuf_read("nope").await.unwrap_err() {
            Error::Console(ConsoleError::NotFound(name)) => assert_eq!(name, "nope"),
            e => panic!("{e:?}"),
        }
        match c.ringbuf_read("nul0").await.unwrap_err() {
            Error::Console(ConsoleError::NotARingbuf(name)) => assert_eq!(name, "nul0"),
            e => panic!("{e:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn char_devices_are_added_and_removed() {
    let vm = ringbuf_vm().await;
    let c = vm.client();
    within(20, async {
        let added = c
            .add_char_device("rb9", &ChardevBackend::ringbuf(Some(1024)))
            .await
            .unwrap();
        assert_eq!(added.pty, None);
        let rb9 = c
            .query_chardev()
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.label == "rb9")
            .expect("rb9");
        assert!(rb9.is_ringbuf());
        c.ringbuf_write("rb9", "hi").await.unwrap();
        assert_eq!(c.ringbuf_read("rb9").await.unwrap(), "hi");

        let err = c
            .add_char_device("rb9", &ChardevBackend::null())
            .await
            .unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
        // QEMU wants ring buffer sizes that are powers of two.
        let err = c
            .add_char_device("rbx", &ChardevBackend::ringbuf(Some(1000)))
            .await
            .unwrap_err();
        assert!(err.is_qmp(), "{err:?}");

        c.remove_char_device("rb9").await.unwrap();
        assert!(!c.query_chardev().await.unwrap().iter().any(|d| d.label == "rb9"));
        let err = c.remove_char_device("rb9").await.unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        // busy0 is the backend of a serial port.
        let err = c.remove_char_device("busy0").await.unwrap_err();
        assert!(err.is_in_use(), "{err:?}");
        assert!(c
            .query_chardev()
            .await
            .unwrap()
            .iter()
            .any(|d| d.label == "busy0"));

        let socket = vm.dir().join("console.sock");
        c.add_char_device(
            "sock0",
            &ChardevBackend::socket_unix(socket.to_str().unwrap(), true),
        )
        .await
        .unwrap();
        assert!(Path::new(&socket).exists());
        UnixStream::connect(&socket).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chardev_change_moves_a_chardev_to_a_socket_and_back() {
    let vm = ringbuf_vm().await;
    let c = vm.client();
    within(20, async {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        c.chardev_change(
            "rb0",
            ChardevChange::Socket {
                file: theirs.into(),
                fdname: "sock0".into(),
            },
        )
        .await
        .unwrap();
        let rb0 = c
            .query_chardev()
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.label == "rb0")
            .unwrap();
        assert!(rb0.filename.starts_with("unix:"), "{rb0:?}");
        // The backend took the fd: its name is free again.
        assert!(c.close_file("sock0").await.unwrap_err().is_not_found());

        c.chardev_change("rb0", ChardevChange::Ringbuf { size: None })
            .await
            .unwrap();
        let rb0 = c
            .query_chardev()
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.label == "rb0")
            .unwrap();
        assert!(rb0.is_ringbuf(), "{rb0:?}");
        // QEMU closed the socket it held, and the client kept no copy.
        let n = tokio::task::spawn_blocking(move || ours.read(&mut [0u8; 8]).unwrap());
        assert_eq!(n.await.unwrap(), 0);

        // A serial port cannot swap backends: refused, and the fd name is
        // not left behind.
        let (_ours, theirs) = UnixStream::pair().unwrap();
        let err = c
            .chardev_change(
                "busy0",
                ChardevChange::Socket {
                    file: theirs.into(),
                    fdname: "sock1".into(),
                },
            )
            .await
            .unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
        assert!(c.close_file("sock1").await.unwrap_err().is_not_found());
        let err = c
            .chardev_change("nope", ChardevChange::Ringbuf { size: None })
            .await
            .unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
    })
    .await;
}

/// The generated types convert into the loose specs the operations take,
/// and what they describe is what QEMU then has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_netdev_device_object_and_chardev_specs_take_effect() {
    use qmpkit::qapi::{commands as qc, types as t};
    let vm = pcie_vm().await;
    let c = vm.client();
    let log = vm.dir().join("serial.log");
    std::fs::write(&log, "kept\n").unwrap();
    within(30, async {
        let netdev = NetdevSpec::from(t::Netdev {
            id: "gnet".into(),
            branch: t::NetdevBranch::User(Default::default()),
        });
        assert_eq!(netdev, NetdevSpec::new("user", "gnet"));
        let device = DeviceSpec::from(qc::DeviceAdd {
            driver: "virtio-net-pci".into(),
            bus: Some("rp1".into()),
            id: Some("gnic".into()),
            extra: serde_json::Map::from_iter([
                ("netdev".to_owned(), json!("gnet")),
                ("mac".to_owned(), json!("52:54:00:00:00:42")),
            ]),
        });
        c.add_nic(&netdev, &device, true).await.unwrap();
        let qom = |property: &str| {
            let property = property.to_owned();
            async move {
                c.call::<_, Value>(
                    "qom-get",
                    &json!({"path": "/machine/peripheral/gnic", "property": property}),
                )
                .await
                .unwrap()
            }
        };
        assert_eq!(qom("netdev").await, "gnet");
        assert_eq!(qom("mac").await, "52:54:00:00:00:42");
        let bus: Value = c
            .call(
                "qom-get",
                &json!({"path": "/machine/peripheral/gnic", "property": "parent_bus"}),
            )
            .await
            .unwrap();
        assert!(bus.as_str().unwrap().contains("rp1"), "{bus}");

        let iothread = ObjectSpec::from(t::ObjectOptions {
            id: "gio".into(),
            branch: t::ObjectOptionsBranch::Iothread(t::IothreadProperties {
                poll_max_ns: Some(0),
                ..Default::default()
            }),
        });
        c.add_object(&iothread).await.unwrap();
        let threads: Vec<Value> = c.call("query-iothreads", &()).await.unwrap();
        let gio = threads.iter().find(|t| t["id"] == "gio").expect("gio listed");
        assert_eq!(gio["poll-max-ns"], 0);

        // A file backend that appends: what the file held stays.
        let file = t::ChardevBackend::File(t::ChardevFileWrapper {
            data: t::ChardevFile {
                out: log.to_str().unwrap().into(),
                append: Some(true),
                logfile: None,
                logappend: None,
                r#in: None,
            },
        });
        c.add_char_device("gfile", &file.into()).await.unwrap();
        let chardevs = c.query_chardev().await.unwrap();
        let gfile = chardevs
            .iter()
            .find(|d| d.label == "gfile")
            .expect("gfile listed");
        assert_eq!(gfile.filename, "file");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "kept\n");

        // And a change to a generated backend.
        let ringbuf = t::ChardevBackend::Ringbuf(t::ChardevRingbufWrapper {
            data: t::ChardevRingbuf {
                size: Some(4096),
                ..Default::default()
            },
        });
        c.chardev_change("gfile", ringbuf.into()).await.unwrap();
        c.ringbuf_write("gfile", "now a ring buffer").await.unwrap();
        assert_eq!(c.ringbuf_read("gfile").await.unwrap(), "now a ring buffer");
    })
    .await;
}
