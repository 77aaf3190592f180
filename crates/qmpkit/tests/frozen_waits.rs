//! Waits on a QEMU that stops answering (SIGSTOP) end at their caller's
//! deadline, plus at most the documented clean-up margin, and leave nothing
//! broken behind once QEMU runs again (issue #11, item 9).
//!
//! Each test freezes a real QEMU with SIGSTOP. A [`Frozen`] guard sends
//! SIGCONT when it goes out of scope, also when the test panics, and the
//! launcher's handle kills and reaps QEMU after that.

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{eventually, qemu_img_create, vm, vm_with, within};
use qmpkit::commands::devices::DeviceSpec;
use qmpkit::commands::jobs::CLEANUP_BUDGET;
use qmpkit::launch::Qemu;
use qmpkit::{CallOptions, Client, Empty, Error};
use serde_json::{json, Value};

/// The budget the tests give a wait on a frozen QEMU.
const BUDGET: Duration = Duration::from_secs(2);

/// Scheduling slack on top of budget + clean-up margin: the machine is
/// shared, and several QEMUs run at once.
const SLACK: Duration = Duration::from_secs(3);

/// For the steps that must simply succeed once QEMU runs again.
const LONG: Duration = Duration::from_secs(60);

/// SIGSTOPs a QEMU for as long as it lives; SIGCONTs it when dropped.
struct Frozen<'a> {
    vm: &'a Qemu,
    thawed: bool,
}

impl<'a> Frozen<'a> {
    fn new(vm: &'a Qemu) -> Self {
        vm.freeze().expect("SIGSTOP QEMU");
        Frozen { vm, thawed: false }
    }

    fn thaw(mut self) {
        self.cont();
    }

    fn cont(&mut self) {
        if !self.thawed {
            self.thawed = true;
            // A failure here leaves it to the launcher's SIGKILL.
            let _ = self.vm.thaw();
        }
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.cont();
    }
}

/// Asserts that `result` is a timeout that came within `budget` + `margin` + [`SLACK`].
fn assert_bounded<T: std::fmt::Debug>(
    what: &str,
    result: &qmpkit::Result<T>,
    elapsed: Duration,
    budget: Duration,
    margin: Duration,
) {
    eprintln!("{what}: budget {budget:?}, returned after {elapsed:?}: {result:?}");
    match result {
        Err(e) if e.is_timeout() => {}
        other => panic!("{what}: expected a timeout, got {other:?}"),
    }
    let bound = budget + margin + SLACK;
    assert!(
        elapsed <= bound,
        "{what}: a {budget:?} wait took {elapsed:?} (bound {bound:?})"
    );
}

/// Passes `fd` to QEMU under `name` (`getfd`).
async fn getfd(c: &Client, name: &str, fd: OwnedFd) {
    c.call_with::<_, Empty>("getfd", &json!({ "fdname": name }), CallOptions::new().fds([fd]))
        .await
        .unwrap();
}

async fn run_state(c: &Client) -> String {
    let v: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    v["status"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_wait_on_a_frozen_source_ends_at_its_deadline() {
    let src = vm().await;
    let dst = vm_with(|b| b.args(["-incoming", "defer"])).await;
    let (s, d) = (src.client(), dst.client().clone());
    within(120, async {
        let (a, b) = UnixStream::pair().unwrap();
        getfd(s, "mig", a.into()).await;
        getfd(&d, "mig", b.into()).await;
        // Slow enough that the migration is still running when QEMU thaws.
        s.migrate_set_parameters(&json!({"max-bandwidth": 16 << 10}))
            .await
            .unwrap();
        let incoming = tokio::spawn(async move { d.migrate_incoming("mig", LONG).await });
        s.migrate("mig").await.unwrap();
        s.migrate_wait("active", LONG).await.unwrap();

        let frozen = Frozen::new(&src);
        let start = Instant::now();
        let result = s.migrate_wait("completed", BUDGET).await;
        let elapsed = start.elapsed();
        frozen.thaw();
        // Migration waits leave the migration alone: no clean-up margin.
        assert_bounded("migrate_wait", &result, elapsed, BUDGET, Duration::ZERO);

        // The connection is in step again: each command gets its own reply,
        // and the migration can still be ended cleanly.
        assert!(!s.is_closed());
        let st = s.query_migrate().await.unwrap();
        assert!(["active", "completed"].contains(&st.status.as_str()), "{st:?}");
        if st.status == "active" {
            s.execute_raw("migrate_cancel", Value::Null).await.unwrap();
            match s.migrate_wait("cancelled", LONG).await {
                Ok(()) => {}
                // It may have completed before the cancel took effect.
                Err(Error::MigrationFailed { status, .. }) => assert_eq!(status, "completed"),
                Err(e) => panic!("{e:?}"),
            }
        }
        let st = s.query_migrate().await.unwrap();
        assert!(["cancelled", "completed"].contains(&st.status.as_str()), "{st:?}");
        let state = run_state(s).await;
        assert!(["prelaunch", "postmigrate"].contains(&state.as_str()), "{state}");
        // The destination either received the guest or gave up on it (a
        // failed incoming migration makes QEMU exit).
        let _ = within(30, incoming).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_incoming_on_a_frozen_destination_ends_at_its_deadline() {
    let src = vm().await;
    let dst = vm_with(|b| b.args(["-incoming", "defer"])).await;
    let (s, d) = (src.client(), dst.client());
    within(120, async {
        let (a, b) = UnixStream::pair().unwrap();
        getfd(s, "mig", a.into()).await;
        getfd(d, "mig", b.into()).await;

        let frozen = Frozen::new(&dst);
        let start = Instant::now();
        let result = d.migrate_incoming("mig", BUDGET).await;
        let elapsed = start.elapsed();
        frozen.thaw();
        assert_bounded("migrate_incoming", &result, elapsed, BUDGET, Duration::ZERO);

        // Thawed, the destination answers correctly and can still receive
        // the guest: nothing was left half started.
        assert!(!d.is_closed());
        assert_eq!(run_state(d).await, "inmigrate");
        let st = d.query_migrate().await.unwrap();
        assert!(
            ["none", "setup", "active"].contains(&st.status.as_str()),
            "{st:?}"
        );
        let dc = d.clone();
        let incoming = tokio::spawn(async move { dc.migrate_incoming("mig", LONG).await });
        s.migrate("mig").await.unwrap();
        s.migrate_wait("completed", LONG).await.unwrap();
        within(30, incoming).await.unwrap().unwrap();
        assert_eq!(d.query_migrate().await.unwrap().status, "completed");
    })
    .await;
}

/// Runs qemu-io with `args`, asserting success.
fn qemu_io(args: &[&str]) {
    let out = std::process::Command::new("qemu-io")
        .args(args)
        .output()
        .expect("run qemu-io");
    assert!(
        out.status.success(),
        "qemu-io: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qcow2(node: &str, path: &Path) -> Value {
    json!({"driver": "qcow2", "node-name": node,
           "file": {"driver": "file", "filename": path}})
}

/// Jobs QEMU still lists, from both views (block jobs and all jobs).
async fn leftover_jobs(c: &Client) -> Vec<Value> {
    let mut jobs: Vec<Value> = c.call("query-block-jobs", &()).await.unwrap();
    let all: Vec<Value> = c.call("query-jobs", &()).await.unwrap();
    jobs.extend(all);
    jobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_on_a_frozen_qemu_ends_at_its_deadline_and_leaves_no_job() {
    let vm = vm_with(|b| b.args(["-device", "pcie-root-port,id=rp1,chassis=1,bus=pcie.0"])).await;
    let c = vm.client();
    let src = vm.dir().join("src.qcow2");
    qemu_img_create(&src, "qcow2", "256M", None);
    // 128 MiB of data: at the target's 8 MiB/s the mirror takes ~16 s.
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x5a 0 128M", src.to_str().unwrap()]);
    let tgt = vm.dir().join("tgt.qcow2");
    qemu_img_create(&tgt, "qcow2", "256M", None);
    within(120, async {
        c.add_block_device(
            &qcow2("src", &src),
            &json!({"driver": "virtio-blk-pci", "id": "disk0", "drive": "src", "bus": "rp1"}),
            false,
        )
        .await
        .unwrap();
        c.execute_raw(
            "object-add",
            json!({"qom-type": "throttle-group", "id": "slow", "limits": {"bps-write": 8 << 20}}),
        )
        .await
        .unwrap();
        c.execute_raw(
            "blockdev-add",
            json!({"driver": "throttle", "node-name": "tgt", "throttle-group": "slow",
                   "file": qcow2("tgtimg", &tgt)}),
        )
        .await
        .unwrap();

        let start = Instant::now();
        let mirror = {
            let c = c.clone();
            tokio::spawn(async move { c.block_dev_mirror("src", "tgt", BUDGET).await })
        };
        // Freeze QEMU once the job runs (it takes far longer than the budget).
        eventually(10, || async {
            let jobs = c.query_jobs().await.unwrap();
            jobs.iter()
                .any(|j| j.id == "src" && j.status == "running")
                .then_some(())
        })
        .await;
        let frozen = Frozen::new(&vm);
        let result = mirror.await.unwrap();
        let elapsed = start.elapsed();
        frozen.thaw();
        assert_bounded("block_dev_mirror", &result, elapsed, BUDGET, CLEANUP_BUDGET);

        // Thawed, the library's clean-up finishes: the job is cancelled and
        // dismissed, and the disk still reads from its source.
        eventually(30, || async { leftover_jobs(c).await.is_empty().then_some(()) }).await;
        let blocks = c.query_block().await.unwrap();
        let disk0 = blocks
            .iter()
            .find(|b| {
                b.qdev
                    .as_deref()
                    .is_some_and(|q| q.starts_with("/machine/peripheral/disk0/"))
            })
            .expect("disk0");
        assert_eq!(disk0.inserted.as_ref().unwrap().node_name, "src");
        assert_eq!(run_state(c).await, "prelaunch");
        // The job id is free again: a new mirror starts (and, given no
        // time to finish, is cleaned up like the first).
        let e = c
            .block_dev_mirror("src", "tgt", Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        eventually(30, || async { leftover_jobs(c).await.is_empty().then_some(()) }).await;
    })
    .await;
}

/// A mirror that never ends (1 TiB from a null device to another), started
/// by someone else; `block_job_cancel` on a frozen QEMU gives up in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_job_cancel_on_a_frozen_qemu_ends_at_its_deadline() {
    let vm = vm().await;
    let c = vm.client();
    within(120, async {
        for (n, read_zeroes) in [("nsrc", true), ("ntgt", false)] {
            c.execute_raw(
                "blockdev-add",
                json!({"driver": "null-co", "node-name": n, "size": 1u64 << 40, "read-zeroes": read_zeroes}),
            )
            .await
            .unwrap();
        }
        c.execute_raw(
            "blockdev-mirror",
            json!({"job-id": "endless", "device": "nsrc", "target": "ntgt", "sync": "full"}),
        )
        .await
        .unwrap();

        let frozen = Frozen::new(&vm);
        let start = Instant::now();
        let result = c.block_job_cancel("endless", BUDGET).await;
        let elapsed = start.elapsed();
        frozen.thaw();
        // Not a job this crate started: no clean-up, no margin.
        assert_bounded("block_job_cancel", &result, elapsed, BUDGET, Duration::ZERO);

        // Thawed: the cancel, if it reached QEMU, takes effect; otherwise
        // a second one does. Either way the job ends and QEMU answers.
        if !leftover_jobs(c).await.is_empty() {
            match c.block_job_cancel("endless", LONG).await {
                Ok(()) => {}
                Err(e) if e.is_qmp() => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        eventually(30, || async { leftover_jobs(c).await.is_empty().then_some(()) }).await;
        assert_eq!(run_state(c).await, "prelaunch");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_cancel_on_a_frozen_source_ends_at_its_deadline() {
    let src = vm().await;
    let c = src.client();
    within(120, async {
        // The destination: a socket nobody reads, so the migration stays active.
        let (a, _peer) = UnixStream::pair().unwrap();
        getfd(c, "mig", a.into()).await;
        c.migrate("mig").await.unwrap();
        c.migrate_wait("active", LONG).await.unwrap();

        let frozen = Frozen::new(&src);
        let start = Instant::now();
        let result = c.migrate_cancel(BUDGET).await;
        let elapsed = start.elapsed();
        frozen.thaw();
        assert_bounded("migrate_cancel", &result, elapsed, BUDGET, Duration::ZERO);

        // Thawed: the cancel (sent, or sent again) ends the migration.
        let after = c.migrate_cancel(LONG).await.unwrap();
        assert_eq!(after.status, "cancelled", "{after:?}");
        assert_eq!(run_state(c).await, "prelaunch");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_device_and_wait_on_a_frozen_qemu_ends_at_its_deadline() {
    let vm = vm_with(|b| b.args(["-device", "qemu-xhci,id=xhci"])).await;
    let c = vm.client();
    within(60, async {
        c.add_device(&DeviceSpec::new("usb-kbd").id("kbd0"))
            .await
            .unwrap();

        let frozen = Frozen::new(&vm);
        let start = Instant::now();
        let result = c.remove_device_and_wait("kbd0", BUDGET).await;
        let elapsed = start.elapsed();
        frozen.thaw();
        assert_bounded("remove_device_and_wait", &result, elapsed, BUDGET, Duration::ZERO);

        // Thawed: the unplug request, if it reached QEMU, completes; either
        // way a second removal leaves the device gone.
        match c.remove_device_and_wait("kbd0", LONG).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => panic!("{e:?}"),
        }
        let children: Vec<Value> = c
            .call("qom-list", &json!({"path": "/machine/peripheral"}))
            .await
            .unwrap();
        assert!(children.iter().all(|p| p["name"] != "kbd0"), "{children:?}");
        assert_eq!(run_state(c).await, "prelaunch");
    })
    .await;
}
