//! What the typed operations put on the wire, read back from the traffic
//! log of a real QEMU: each sends the members it sent when its arguments
//! were built by hand with `json!` (same names, same values, no optional
//! member it does not set), now that they are built from the generated
//! commands of `qmpkit::qapi`. QEMU may refuse a request here (a device
//! that does not exist): what counts is what was sent.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{vm_with, within, Vm};
use qmpkit::commands::chardev::{ChardevBackend, ChardevChange};
use qmpkit::commands::devices::DeviceSpec;
use qmpkit::commands::vm::{Actions, RebootAction, ShutdownAction, TransactionAction};
use qmpkit::Error;
use serde_json::{json, Value};

const SHORT: Duration = Duration::from_secs(5);

/// A QEMU with these extra arguments, and its client's traffic log.
async fn logged_vm(extra: &[&str]) -> (Vm, PathBuf) {
    let vm = vm_with(|b| b.args(extra.iter().copied())).await;
    let log = vm.traffic_log().to_owned();
    (vm, log)
}

/// The arguments of every request for `command` in the log, in order
/// (`Value::Null` for a request without arguments).
fn sent(log: &Path, command: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines()
        .filter_map(|line| line.split_once("] QUERY: ").map(|(_, body)| body))
        .map(|body| serde_json::from_str::<Value>(body).unwrap())
        .filter(|request| request["execute"] == command)
        .map(|request| request.get("arguments").cloned().unwrap_or(Value::Null))
        .collect()
}

/// The arguments of the one request for `command` in the log.
fn sent_once(log: &Path, command: &str) -> Value {
    let all = sent(log, command);
    assert_eq!(all.len(), 1, "{command} sent {} times: {all:?}", all.len());
    all.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_nic_operations_send_the_same_members() {
    let (vm, log) = logged_vm(&[]).await;
    let c = vm.client();
    within(30, async {
        c.remove_device("gone0").await.unwrap();
        assert_eq!(sent_once(&log, "device_del"), json!({"id": "gone0"}));

        c.remove_nic("gone-net").await.unwrap();
        assert_eq!(sent_once(&log, "netdev_del"), json!({"id": "gone-net"}));

        c.set_nic_link("no-nic", false).await.unwrap_err();
        assert_eq!(
            sent_once(&log, "set_link"),
            json!({"name": "no-nic", "up": false})
        );

        c.remove_object("no-object").await.unwrap_err();
        assert_eq!(sent_once(&log, "object-del"), json!({"id": "no-object"}));

        let nic = DeviceSpec::new("virtio-net-pci")
            .id("nic0")
            .bus("no-such-bus")
            .prop("netdev", "net0")
            .prop("mac", "52:54:00:12:34:56");
        c.add_device(&nic).await.unwrap_err();
        // A bus that is not a string stays a property, for QEMU to judge.
        let odd = DeviceSpec::new("virtio-net-pci").prop("bus", 7);
        c.add_device(&odd).await.unwrap_err();
        assert_eq!(
            sent(&log, "device_add"),
            [
                json!({"driver": "virtio-net-pci", "id": "nic0", "bus": "no-such-bus",
                       "netdev": "net0", "mac": "52:54:00:12:34:56"}),
                json!({"driver": "virtio-net-pci", "bus": 7}),
            ]
        );

        // No-argument queries send no arguments at all.
        c.query_pci().await.unwrap();
        assert_eq!(sent_once(&log, "query-pci"), Value::Null);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_operations_send_the_same_members() {
    let (vm, log) = logged_vm(&["-device", "qemu-xhci,id=xhci"]).await;
    let c = vm.client();
    within(30, async {
        c.set_block_throttle("no-disk", 1, 2, 3, 4).await.unwrap_err();
        assert_eq!(
            sent_once(&log, "block_set_io_throttle"),
            json!({"id": "no-disk", "bps": 0, "bps_rd": 1, "bps_wr": 2,
                   "iops": 0, "iops_rd": 3, "iops_wr": 4})
        );

        c.add_dirty_bitmap(&["n0", "n1"], "bm", Some(65536), true, false)
            .await
            .unwrap_err();
        c.add_dirty_bitmap(&["n0"], "bm", None, false, true)
            .await
            .unwrap_err();
        let add = |node: &str, extra: Value| {
            let mut data = json!({"node": node, "name": "bm"});
            data.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            json!({"type": "block-dirty-bitmap-add", "data": data})
        };
        let both = json!({"persistent": true, "disabled": false, "granularity": 65536});
        assert_eq!(
            sent(&log, "transaction"),
            [
                json!({"actions": [add("n0", both.clone()), add("n1", both)]}),
                json!({"actions": [add("n0", json!({"persistent": false, "disabled": true}))]}),
            ]
        );

        // Numbers beyond QEMU's integers are refused before anything is sent.
        let e = c
            .set_block_throttle("no-disk", u64::MAX, 0, 0, 0)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
        assert_eq!(sent(&log, "block_set_io_throttle").len(), 1);
        let e = c
            .add_dirty_bitmap(&["n0"], "bm", Some(1 << 32), false, false)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
        assert_eq!(sent(&log, "transaction").len(), 2);

        // A USB disk: the controller added detached, attached last.
        c.add_block_device(
            &json!({"driver": "null-co", "node-name": "u0"}),
            &json!({"driver": "scsi-hd", "id": "u0disk", "drive": "u0"}),
            true,
        )
        .await
        .unwrap();
        assert_eq!(
            sent(&log, "device_add")[0],
            json!({"driver": "usb-bot", "id": "usb_u0disk", "attached": false})
        );
        assert_eq!(
            sent_once(&log, "qom-set"),
            json!({"path": "usb_u0disk", "property": "attached", "value": true})
        );
        // The caller's own JSON goes as given.
        assert_eq!(
            sent_once(&log, "blockdev-add"),
            json!({"driver": "null-co", "node-name": "u0"})
        );
        assert_eq!(
            sent(&log, "device_add")[1],
            json!({"driver": "scsi-hd", "id": "u0disk", "drive": "u0", "bus": "usb_u0disk.0"})
        );

        c.block_stats().await.unwrap();
        assert_eq!(sent_once(&log, "query-blockstats"), Value::Null);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_operations_send_the_same_members() {
    let (vm, log) = logged_vm(&[]).await;
    let c = vm.client();
    within(30, async {
        c.block_commit("no-node", Some("top"), Some("base"), SHORT)
            .await
            .unwrap_err();
        c.block_commit("no-node", None, None, SHORT).await.unwrap_err();
        assert_eq!(
            sent(&log, "block-commit"),
            [
                json!({"device": "no-node", "job-id": "no-node", "auto-dismiss": false,
                       "top-node": "top", "base-node": "base"}),
                json!({"device": "no-node", "job-id": "no-node", "auto-dismiss": false}),
            ]
        );

        c.block_dev_mirror("no-node", "no-target", SHORT)
            .await
            .unwrap_err();
        assert_eq!(
            sent_once(&log, "blockdev-mirror"),
            json!({"device": "no-node", "target": "no-target", "job-id": "no-node",
                   "sync": "top", "auto-dismiss": false, "copy-mode": "write-blocking"})
        );

        c.block_job_cancel("no-job", SHORT).await.unwrap_err();
        assert_eq!(sent_once(&log, "block-job-cancel"), json!({"device": "no-job"}));

        c.block_job_complete("no-job", SHORT).await.unwrap_err();
        assert_eq!(sent_once(&log, "job-complete"), json!({"id": "no-job"}));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chardev_operations_send_the_same_members() {
    let (vm, log) = logged_vm(&[]).await;
    let c = vm.client();
    let dir = vm.dir().to_owned();
    let file = dir.join("serial.log");
    let file = file.to_str().unwrap();
    let sock = dir.join("console.sock");
    let sock = sock.to_str().unwrap();
    within(30, async {
        c.add_char_device("rb", &ChardevBackend::ringbuf(Some(4096)))
            .await
            .unwrap();
        c.add_char_device("rb-default", &ChardevBackend::ringbuf(None))
            .await
            .unwrap();
        c.add_char_device("nul", &ChardevBackend::null()).await.unwrap();
        c.add_char_device("out", &ChardevBackend::file(file))
            .await
            .unwrap();
        c.add_char_device("listen", &ChardevBackend::socket_unix(sock, true))
            .await
            .unwrap();
        c.add_char_device("connect", &ChardevBackend::socket_unix(sock, false))
            .await
            .unwrap();
        let unix = |server: bool| {
            let mut data = json!({"addr": {"type": "unix", "data": {"path": sock}}, "server": server});
            if server {
                data["wait"] = json!(false);
            }
            json!({"type": "socket", "data": data})
        };
        assert_eq!(
            sent(&log, "chardev-add"),
            [
                json!({"id": "rb", "backend": {"type": "ringbuf", "data": {"size": 4096}}}),
                json!({"id": "rb-default", "backend": {"type": "ringbuf", "data": {}}}),
                json!({"id": "nul", "backend": {"type": "null", "data": {}}}),
                json!({"id": "out", "backend": {"type": "file", "data": {"out": file}}}),
                json!({"id": "listen", "backend": unix(true)}),
                json!({"id": "connect", "backend": unix(false)}),
            ]
        );

        c.chardev_change("no-chardev", ChardevChange::Ringbuf { size: Some(8192) })
            .await
            .unwrap_err();
        c.chardev_change(
            "no-chardev",
            ChardevChange::Backend(ChardevBackend::socket_fd("no-fd")),
        )
        .await
        .unwrap_err();
        assert_eq!(
            sent(&log, "chardev-change"),
            [
                json!({"id": "no-chardev", "backend": {"type": "ringbuf", "data": {"size": 8192}}}),
                json!({"id": "no-chardev", "backend": {"type": "socket", "data":
                    {"addr": {"type": "fd", "data": {"str": "no-fd"}}, "server": false}}}),
            ]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_operations_send_the_same_members() {
    let (vm, log) = logged_vm(&[]).await;
    let c = vm.client();
    within(30, async {
        // Known to QEMU 10: the generated command; unknown: by name, as given.
        c.migrate_set_capabilities([("events", true), ("pause-before-switchover", false)])
            .await
            .unwrap();
        c.migrate_set_capabilities([("events", true), ("block", true)])
            .await
            .unwrap_err();
        assert_eq!(
            sent(&log, "migrate-set-capabilities"),
            [
                json!({"capabilities": [{"capability": "events", "state": true},
                                        {"capability": "pause-before-switchover", "state": false}]}),
                json!({"capabilities": [{"capability": "events", "state": true},
                                        {"capability": "block", "state": true}]}),
            ]
        );

        c.migrate_continue("pre-switchover").await.unwrap_err();
        c.migrate_continue("no-such-state").await.unwrap_err();
        assert_eq!(
            sent(&log, "migrate-continue"),
            [
                json!({"state": "pre-switchover"}),
                json!({"state": "no-such-state"})
            ]
        );

        let channel = json!({"channels": [{"channel-type": "main",
            "addr": {"transport": "socket", "type": "fd", "str": "no-fd"}}]});
        c.migrate("no-fd").await.unwrap_err();
        assert_eq!(sent_once(&log, "migrate"), channel);
        // Not started with -incoming defer: refused, but sent.
        c.migrate_incoming("no-fd", SHORT).await.unwrap_err();
        assert_eq!(sent_once(&log, "migrate-incoming"), channel);

        c.migrate_cancel(SHORT).await.unwrap();
        assert_eq!(sent_once(&log, "migrate_cancel"), Value::Null);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_and_cpu_operations_send_the_same_members() {
    let (vm, log) = logged_vm(&[]).await;
    let c = vm.client();
    within(30, async {
        c.query_cpu_model("qemu64").await.unwrap();
        assert_eq!(
            sent_once(&log, "query-cpu-model-expansion"),
            json!({"type": "full", "model": {"name": "qemu64"}})
        );

        c.set_action(&Actions {
            reboot: Some(RebootAction::Shutdown),
            shutdown: Some(ShutdownAction::Pause),
            ..Actions::default()
        })
        .await
        .unwrap();
        assert_eq!(
            sent_once(&log, "set-action"),
            json!({"reboot": "shutdown", "shutdown": "pause"})
        );

        c.run_transaction(&[TransactionAction::new("abort", json!({})).unwrap()])
            .await
            .unwrap_err();
        assert_eq!(
            sent_once(&log, "transaction"),
            json!({"actions": [{"type": "abort", "data": {}}]})
        );

        c.status().await.unwrap();
        assert_eq!(sent_once(&log, "query-status"), Value::Null);
    })
    .await;
}
