//! Block devices, block jobs and the NBD server, each exercised on a real QEMU.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{qemu_img_create, vm_with, within};
use qmpkit::commands::block::BlockDeviceInfo;
use qmpkit::{Client, Error};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(60);

/// A VM with a PCIe root port `rp1` to plug a disk into.
async fn pci_vm() -> common::Vm {
    vm_with(|b| b.args(["-device", "pcie-root-port,id=rp1,chassis=1,bus=pcie.0"])).await
}

/// Runs qemu-io with `args`; returns (success, stdout + stderr).
fn qemu_io(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("qemu-io")
        .args(args)
        .output()
        .expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success() && !text.contains("verification failed"),
        text,
    )
}

/// Creates a qcow2 image (optionally over `backing`) and writes `pattern`
/// over `len` bytes at `offset` with qemu-io.
fn image(dir: &Path, name: &str, backing: Option<&Path>, write: Option<(u8, u64, u64)>) -> PathBuf {
    let path = dir.join(name);
    qemu_img_create(&path, "qcow2", "64M", backing);
    if let Some((pattern, offset, len)) = write {
        let cmd = format!("write -P {pattern:#x} {offset} {len}");
        let (ok, out) = qemu_io(&["-f", "qcow2", "-c", &cmd, path.to_str().unwrap()]);
        assert!(ok, "qemu-io write: {out}");
    }
    path
}

fn qcow2(node: &str, path: &Path) -> Value {
    json!({"driver": "qcow2", "node-name": node,
           "file": {"driver": "file", "filename": path}})
}

/// Adds the block node `spec` and a virtio-blk-pci disk "disk0" using it, on
/// the VM's spare PCIe root port.
async fn attach_disk0(c: &Client, spec: &Value) {
    let node = spec["node-name"].as_str().expect("the spec names its node");
    c.add_block_device(
        spec,
        &json!({"driver": "virtio-blk-pci", "id": "disk0", "drive": node, "bus": "rp1"}),
        false,
    )
    .await
    .unwrap();
}

async fn node(c: &Client, name: &str) -> Option<BlockDeviceInfo> {
    c.query_block_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.node_name == name)
}

/// The qcow2 node that opened the image file `file`.
async fn node_of_file(c: &Client, file: &Path) -> Option<String> {
    let file = file.to_str().unwrap();
    c.query_block_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.drv == "qcow2" && n.file == file)
        .map(|n| n.node_name)
}

/// The medium of the guest device `id` (from query-block).
async fn medium(c: &Client, id: &str) -> BlockDeviceInfo {
    let prefix = format!("/machine/peripheral/{id}/");
    c.query_block()
        .await
        .unwrap()
        .into_iter()
        .find(|b| {
            b.qdev
                .as_deref()
                .is_some_and(|q| q == id || q.starts_with(&prefix))
        })
        .unwrap_or_else(|| panic!("no block device {id}"))
        .inserted
        .expect("a medium")
}

async fn raw(c: &Client, cmd: &str, args: Value) -> qmpkit::Result<Value> {
    c.execute_raw(cmd, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pci_disk_is_added_queried_and_refused_removal_while_attached() {
    let vm = pci_vm().await;
    let c = vm.client();
    let img = image(vm.dir(), "d0.qcow2", None, None);
    within(30, async {
        attach_disk0(c, &qcow2("d0", &img)).await;
        assert!(c
            .query_named_block_nodes()
            .await
            .unwrap()
            .contains(&"d0".to_string()));
        let m = medium(c, "disk0").await;
        assert_eq!((m.node_name.as_str(), m.drv.as_str()), ("d0", "qcow2"));
        assert_eq!(m.file, img.to_str().unwrap());

        // Attached to a device: removal is refused as "in use", and the node stays.
        let e = c.remove_block_device("d0").await.unwrap_err();
        assert!(e.is_in_use(), "{e:?}");
        assert!(node(c, "d0").await.is_some());

        // A device that cannot be added undoes the blockdev before it.
        let img1 = image(vm.dir(), "d1.qcow2", None, None);
        let e = c
            .add_block_device(
                &qcow2("d1", &img1),
                &json!({"driver": "virtio-blk-pci", "id": "disk1", "drive": "d1", "bus": "no-such-bus"}),
                false,
            )
            .await
            .unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        assert!(node(c, "d1").await.is_none(), "d1 was left behind");

        // A blockdev without a node name is refused before anything is sent.
        let e = c
            .add_block_device(
                &json!({"driver": "null-co"}),
                &json!({"driver": "virtio-blk-pci"}),
                false,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");

        // A node with no device: removed, and removing it again is fine.
        raw(
            c,
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "spare"}),
        )
        .await
        .unwrap();
        c.remove_block_device("spare").await.unwrap();
        assert!(node(c, "spare").await.is_none());
        c.remove_block_device("spare").await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usb_disk_is_attached_last_undone_on_failure_and_removed() {
    let vm = vm_with(|b| b.args(["-device", "qemu-xhci,id=xhci"])).await;
    let c = vm.client();
    let img = image(vm.dir(), "u1.qcow2", None, None);
    within(30, async {
        c.add_block_device(
            &qcow2("u1", &img),
            &json!({"driver": "scsi-hd", "id": "u1disk", "drive": "u1"}),
            true,
        )
        .await
        .unwrap();
        let attached = raw(
            c,
            "qom-get",
            json!({"path": "usb_u1disk", "property": "attached"}),
        )
        .await
        .unwrap();
        assert_eq!(attached, json!(true));
        assert_eq!(medium(c, "u1disk").await.node_name, "u1");

        // The SCSI device fails (unknown property): controller and node are undone.
        let img2 = image(vm.dir(), "u2.qcow2", None, None);
        let e = c
            .add_block_device(
                &qcow2("u2", &img2),
                &json!({"driver": "scsi-hd", "id": "u2disk", "drive": "u2", "no-such-property": 1}),
                true,
            )
            .await
            .unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        assert!(node(c, "u2").await.is_none(), "u2 was left behind");
        let e = raw(
            c,
            "qom-get",
            json!({"path": "usb_u2disk", "property": "attached"}),
        )
        .await
        .unwrap_err();
        assert!(e.is_qmp(), "usb_u2disk was left behind: {e:?}");

        // A USB disk needs an id to name its controller.
        let e = c
            .add_block_device(
                &qcow2("u3", &img2),
                &json!({"driver": "scsi-hd", "drive": "u3"}),
                true,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
        assert!(node(c, "u3").await.is_none());

        // In use until the USB controller (and the disk on it) is gone.
        assert!(c.remove_block_device("u1").await.unwrap_err().is_in_use());
        let mut ev = c.subscribe(qmpkit::EventFilter::names(["DEVICE_DELETED"]));
        raw(c, "device_del", json!({"id": "usb_u1disk"})).await.unwrap();
        loop {
            let e = ev.next().await.unwrap();
            if e.data()["device"] == "usb_u1disk" {
                break;
            }
        }
        c.remove_block_device("u1").await.unwrap();
        assert!(node(c, "u1").await.is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_resize_and_stats_show_in_queries() {
    let vm = pci_vm().await;
    let c = vm.client();
    let img = image(vm.dir(), "d0.qcow2", None, None);
    within(60, async {
        attach_disk0(c, &qcow2("d0", &img)).await;

        // Let the firmware run: it reads the disk's first sector looking for a boot loader.
        let qdev = c.query_block().await.unwrap()[0].qdev.clone().unwrap();
        assert!(qdev.starts_with("/machine/peripheral/disk0/"), "{qdev}");
        let before = c.block_stats().await.unwrap()[&qdev];
        assert_eq!(before.reads_completed + before.writes_completed, 0);
        raw(c, "cont", json!({})).await.unwrap();
        let after = common::eventually(50, || async {
            let s = c.block_stats().await.unwrap()[&qdev];
            (s.reads_completed > 0).then_some(s)
        })
        .await;
        assert!(after.bytes_read >= 512, "{after:?}");

        c.set_block_throttle("disk0", 1_000_000, 2_000_000, 100, 200)
            .await
            .unwrap();
        let m = medium(c, "disk0").await;
        assert_eq!(
            (m.bps_rd, m.bps_wr, m.iops_rd, m.iops_wr),
            (1_000_000, 2_000_000, 100, 200)
        );
        let e = c.set_block_throttle("nope", 1, 1, 1, 1).await.unwrap_err();
        assert!(e.is_not_found(), "{e:?}");

        c.update_block_size("d0", 128 * MIB).await.unwrap();
        let m = medium(c, "disk0").await;
        assert_eq!(m.image.unwrap().virtual_size, 128 * MIB);
        let e = c.update_block_size("nope", MIB).await.unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_backing_file_and_dirty_bitmaps() {
    let vm = vm_with(|b| b).await;
    let c = vm.client();
    let base = image(vm.dir(), "base.qcow2", None, Some((0xaa, 0, 65536)));
    let ovl = image(vm.dir(), "ovl.qcow2", None, None);
    within(30, async {
        raw(c, "blockdev-add", qcow2("base", &base)).await.unwrap();
        let mut spec = qcow2("ovl", &ovl);
        spec["backing"] = Value::Null;
        raw(c, "blockdev-add", spec).await.unwrap();

        c.block_dev_snapshot("base", "ovl").await.unwrap();
        let o = node(c, "ovl").await.unwrap();
        assert_eq!(o.backing_file_depth, 1);
        let img = o.image.unwrap();
        assert_eq!(img.chain_length(), 2);
        assert_eq!(img.backing_image.unwrap().filename, base.to_str().unwrap());
        let e = c.block_dev_snapshot("nope", "ovl").await.unwrap_err();
        assert!(e.is_not_found(), "{e:?}");

        // The name recorded in the overlay changes, in QEMU and on disk.
        c.change_backing_file("ovl", "ovl", "base.qcow2").await.unwrap();
        let img = node(c, "ovl").await.unwrap().image.unwrap();
        assert_eq!(img.backing_filename.as_deref(), Some("base.qcow2"));
        let info = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(&ovl)
            .output()
            .unwrap();
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["backing-filename"], "base.qcow2");
        let e = c.change_backing_file("ovl", "nope", "x.qcow2").await.unwrap_err();
        assert!(e.is_qmp(), "{e:?}");

        // Bitmaps: on every node or on none.
        c.add_dirty_bitmap(&["ovl", "base"], "bm0", Some(65536), false, false)
            .await
            .unwrap();
        for n in ["ovl", "base"] {
            let b = node(c, n).await.unwrap().dirty_bitmaps;
            assert_eq!(b.len(), 1, "{n}: {b:?}");
            assert_eq!(
                (b[0].name.as_str(), b[0].granularity, b[0].recording),
                ("bm0", 65536, true)
            );
        }
        let e = c
            .add_dirty_bitmap(&["ovl", "nope"], "bm1", None, false, false)
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
        assert!(node(c, "ovl")
            .await
            .unwrap()
            .dirty_bitmaps
            .iter()
            .all(|b| b.name != "bm1"));
        let e = c
            .add_dirty_bitmap(&[] as &[&str], "bm1", None, false, false)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");

        c.add_dirty_bitmap(&["ovl"], "keep", None, true, true)
            .await
            .unwrap();
        let b = node(c, "ovl").await.unwrap().dirty_bitmaps;
        let keep = b.iter().find(|b| b.name == "keep").unwrap();
        assert!(keep.persistent && !keep.recording, "{keep:?}");

        c.remove_dirty_bitmap("ovl", "bm0").await.unwrap();
        let b = node(c, "ovl").await.unwrap().dirty_bitmaps;
        assert!(b.iter().all(|b| b.name != "bm0"), "{b:?}");
        let e = c.remove_dirty_bitmap("ovl", "bm0").await.unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_of_a_lower_layer_shortens_the_chain() {
    let vm = vm_with(|b| b).await;
    let c = vm.client();
    let base = image(vm.dir(), "base.qcow2", None, Some((0xaa, 0, 65536)));
    let mid = image(vm.dir(), "mid.qcow2", Some(&base), Some((0xbb, 65536, 65536)));
    let top = image(vm.dir(), "top.qcow2", Some(&mid), Some((0xcc, 131072, 65536)));
    within(60, async {
        raw(c, "blockdev-add", qcow2("top", &top)).await.unwrap();
        assert_eq!(node(c, "top").await.unwrap().image.unwrap().chain_length(), 3);
        let mid_node = node_of_file(c, &mid).await.unwrap();
        let base_node = node_of_file(c, &base).await.unwrap();

        let e = c.block_commit("nope", None, None, LONG).await.unwrap_err();
        assert!(e.is_not_found(), "{e:?}");

        c.block_commit("top", Some(&mid_node), Some(&base_node), LONG)
            .await
            .unwrap();
        let img = node(c, "top").await.unwrap().image.unwrap();
        assert_eq!(img.chain_length(), 2);
        assert_eq!(img.backing_image.unwrap().filename, base.to_str().unwrap());
        assert!(node_of_file(c, &mid).await.is_none(), "mid is still open");
        assert!(c.query_jobs().await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_of_the_active_layer_completes_and_switches_the_device() {
    let vm = pci_vm().await;
    let c = vm.client();
    let base = image(vm.dir(), "base.qcow2", None, Some((0xaa, 0, 65536)));
    let top = image(vm.dir(), "top.qcow2", Some(&base), Some((0xcc, 65536, 65536)));
    within(60, async {
        attach_disk0(c, &qcow2("top", &top)).await;
        let base_node = node_of_file(c, &base).await.unwrap();
        let mut jobs = c.subscribe(qmpkit::EventFilter::names(["JOB_STATUS_CHANGE"]));

        c.block_commit("top", None, None, LONG).await.unwrap();
        let m = medium(c, "disk0").await;
        assert_eq!(m.node_name, base_node);
        assert_eq!(m.image.unwrap().chain_length(), 1);
        assert!(c.query_jobs().await.unwrap().is_empty());
        // It went through ready (then completed) and was dismissed by us.
        let mut seen = Vec::new();
        while let Some(e) = jobs.try_next() {
            seen.push(e.data()["status"].as_str().unwrap().to_owned());
        }
        for s in ["ready", "concluded", "null"] {
            assert!(seen.iter().any(|x| x == s), "no {s} in {seen:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_completes_and_the_target_takes_over() {
    let vm = pci_vm().await;
    let c = vm.client();
    let base = image(vm.dir(), "base.qcow2", None, Some((0xaa, 0, 65536)));
    let top = image(vm.dir(), "top.qcow2", Some(&base), Some((0xcc, 65536, MIB)));
    let tgt = image(vm.dir(), "tgt.qcow2", Some(&base), None);
    within(60, async {
        raw(c, "blockdev-add", qcow2("base", &base)).await.unwrap();
        let mut spec = qcow2("top", &top);
        spec["backing"] = json!("base");
        attach_disk0(c, &spec).await;
        let mut spec = qcow2("tgt", &tgt);
        spec["backing"] = json!("base");
        raw(c, "blockdev-add", spec).await.unwrap();

        let e = c.block_dev_mirror("top", "nope", LONG).await.unwrap_err();
        assert!(e.is_not_found(), "{e:?}");

        c.block_dev_mirror("top", "tgt", LONG).await.unwrap();
        assert_eq!(medium(c, "disk0").await.node_name, "tgt");
        assert!(c.remove_block_device("tgt").await.unwrap_err().is_in_use());
        assert!(c.query_jobs().await.unwrap().is_empty());
        // The data arrived: top's 1 MiB is in the target image.
        c.call::<_, Value>("blockdev-del", &json!({"node-name": "top"}))
            .await
            .unwrap();
        let (ok, out) = qemu_io(&[
            "-U",
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0xcc 65536 1M",
            tgt.to_str().unwrap(),
        ]);
        assert!(ok, "{out}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_mirror_reports_qemus_error_and_is_dismissed() {
    let vm = vm_with(|b| b).await;
    let c = vm.client();
    let src = image(vm.dir(), "src.qcow2", None, Some((0x11, 0, MIB)));
    let tgt = image(vm.dir(), "tgt.qcow2", None, None);
    within(60, async {
        raw(c, "blockdev-add", qcow2("src", &src)).await.unwrap();
        // Every data write to the target's file fails with EIO.
        raw(
            c,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "bad",
                   "file": {"driver": "blkdebug",
                            "inject-error": [{"event": "write_aio", "errno": 5}],
                            "image": {"driver": "file", "filename": tgt}}}),
        )
        .await
        .unwrap();

        let e = c.block_dev_mirror("src", "bad", LONG).await.unwrap_err();
        match &e {
            Error::JobFailed { job, message } => {
                assert_eq!(job, "src");
                assert!(message.contains("Input/output error"), "{message}");
            }
            other => panic!("expected JobFailed, got {other:?}"),
        }
        assert!(
            c.query_jobs().await.unwrap().is_empty(),
            "the failed job was not dismissed"
        );
        // Nothing holds the target any more.
        c.remove_block_device("bad").await.unwrap();
        assert!(node(c, "bad").await.is_none());
    })
    .await;
}

/// Nodes for a mirror that runs far longer than any test waits: 1 TiB of
/// zeros (reported as data) from a null device to another.
async fn endless_mirror_nodes(c: &Client) {
    for (n, read_zeroes) in [("nsrc", true), ("ntgt", false)] {
        raw(
            c,
            "blockdev-add",
            json!({"driver": "null-co", "node-name": n, "size": 1u64 << 40, "read-zeroes": read_zeroes}),
        )
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_deadline_and_dropped_wait_leave_no_job_behind() {
    let vm = vm_with(|b| b).await;
    let c = vm.client();
    within(60, async {
        endless_mirror_nodes(c).await;
        let e = c
            .block_dev_mirror("nsrc", "ntgt", Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        assert!(
            c.query_jobs().await.unwrap().is_empty(),
            "timed-out job left behind"
        );

        // The caller gives up on its own: the job is cleaned up in the background.
        let mut ev = c.subscribe(qmpkit::EventFilter::names(["JOB_STATUS_CHANGE"]));
        let gave_up = tokio::time::timeout(
            Duration::from_millis(300),
            c.block_dev_mirror("nsrc", "ntgt", LONG),
        )
        .await;
        assert!(gave_up.is_err());
        loop {
            let e = ev.next().await.unwrap();
            if e.data()["status"] == "null" {
                break;
            }
        }
        assert!(c.query_jobs().await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_complete_of_jobs_started_elsewhere() {
    let vm = pci_vm().await;
    let c = vm.client();
    let src = image(vm.dir(), "src.qcow2", None, Some((0x22, 0, MIB)));
    let tgt = image(vm.dir(), "tgt.qcow2", None, None);
    within(60, async {
        endless_mirror_nodes(c).await;
        // A running job (auto-dismissed by QEMU) is cancelled and gone.
        raw(
            c,
            "blockdev-mirror",
            json!({"job-id": "endless", "device": "nsrc", "target": "ntgt", "sync": "full"}),
        )
        .await
        .unwrap();
        c.block_job_cancel("endless", LONG).await.unwrap();
        assert!(c.query_jobs().await.unwrap().is_empty());
        c.remove_block_device("ntgt").await.unwrap();
        let e = c.block_job_cancel("endless", LONG).await.unwrap_err();
        assert!(e.is_qmp(), "{e:?}");

        // A ready mirror started by someone else is completed: the device switches.
        attach_disk0(c, &qcow2("src", &src)).await;
        raw(c, "blockdev-add", qcow2("tgt", &tgt)).await.unwrap();
        let mut watch = c.watch_job("m");
        let mut ready = c.subscribe(qmpkit::EventFilter::names(["BLOCK_JOB_READY"]));
        raw(
            c,
            "blockdev-mirror",
            json!({"job-id": "m", "device": "src", "target": "tgt", "sync": "full"}),
        )
        .await
        .unwrap();
        ready.wait_for("BLOCK_JOB_READY").await.unwrap();
        let e = c.block_job_complete("nope", LONG).await.unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
        c.block_job_complete("m", LONG).await.unwrap();
        assert_eq!(medium(c, "disk0").await.node_name, "tgt");
        assert!(c.query_jobs().await.unwrap().is_empty());
        // A watch made before the job saw it end too.
        watch.wait(false, Duration::from_secs(5)).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_unix_server_exports_a_node_that_qemu_io_reads_and_writes() {
    let vm = vm_with(|b| b).await;
    let c = vm.client();
    let img = image(vm.dir(), "disk.qcow2", None, Some((0x5a, 0, 65536)));
    let sock = vm.dir().join("nbd.sock");
    let url = format!("nbd+unix:///disk?socket={}", sock.display());
    within(60, async {
        raw(c, "blockdev-add", qcow2("disk", &img)).await.unwrap();
        c.add_dirty_bitmap(&["disk"], "bm0", None, false, false)
            .await
            .unwrap();

        c.nbd_unix_server_start(&sock).await.unwrap();
        let e = c.nbd_unix_server_start(&sock).await.unwrap_err();
        assert!(e.is_qmp(), "second server: {e:?}");
        let e = c
            .nbd_block_export_add("nope", false, &[] as &[&str])
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
        let e = c
            .nbd_block_export_add("disk", false, &["no-bitmap"])
            .await
            .unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        assert!(c.query_block_exports().await.unwrap().is_empty());

        c.nbd_block_export_add("disk", true, &["bm0"]).await.unwrap();
        let exports = c.query_nbd_block_exports().await.unwrap();
        assert_eq!(exports.len(), 1);
        assert_eq!(
            (exports[0].node_name.as_str(), exports[0].export_type.as_str()),
            ("disk", "nbd")
        );
        assert_eq!(c.query_block_exports().await.unwrap(), exports);

        // The pattern written before QEMU opened the image comes back over NBD.
        let (ok, out) = qemu_io(&["-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", &url]);
        assert!(ok, "{out}");
        // The export is writable, and the write is seen by the bitmap and the counters.
        let (ok, out) = qemu_io(&["-f", "raw", "-c", "write -P 0x33 1M 64k", &url]);
        assert!(ok, "{out}");
        let (ok, out) = qemu_io(&["-r", "-f", "raw", "-c", "read -P 0x33 1M 64k", &url]);
        assert!(ok, "{out}");
        let bm = &node(c, "disk").await.unwrap().dirty_bitmaps[0];
        assert_eq!((bm.name.as_str(), bm.count), ("bm0", 65536));
        // The bitmap is published as a metadata context.
        let list = std::process::Command::new("qemu-nbd")
            .arg("-L")
            .arg("-k")
            .arg(&sock)
            .output()
            .unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(list.contains("qemu:dirty-bitmap:bm0"), "{list}");

        c.nbd_server_stop().await.unwrap();
        assert!(c.query_nbd_block_exports().await.unwrap().is_empty());
        let (ok, _) = qemu_io(&["-r", "-f", "raw", "-c", "read 0 4k", &url]);
        assert!(!ok, "the server still answers after stop");
        assert!(c.nbd_server_stop().await.unwrap_err().is_qmp());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_server_start_returns_a_stream_that_speaks_nbd() {
    let vm = vm_with(|b| b).await;
    let c = vm.client();
    within(30, async {
        let mut stream = c.nbd_server_start().await.unwrap();
        // Newstyle handshake: "NBDMAGIC", "IHAVEOPT", then 16 bits of flags.
        let mut hello = [0u8; 18];
        stream.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(&hello[8..16], b"IHAVEOPT");
        assert_eq!(hello[17] & 1, 1, "NBD_FLAG_FIXED_NEWSTYLE");

        // Only one server at a time.
        let e = c.nbd_server_start().await.unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        c.nbd_server_stop().await.unwrap();
        // Stopping closes our connection.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
    })
    .await;
}
