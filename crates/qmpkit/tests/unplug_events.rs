//! How `remove_device_and_wait` reads QEMU 10's unplug events, against a
//! fake server playing QEMU's part exactly as the guest tests (tests/guest.rs)
//! saw a real one do it: a CPU's unplug reported only by its `lapic`, a
//! guest's refusal in an `ACPI_DEVICE_OST`, and a request lost by a booting
//! guest, sent again and answered "already in the process of unplug".
//!
//! These run the exact event sequences on demand; the guest tier checks that
//! a real guest produces them.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::within;
use qmpkit::commands::devices::UNPLUG_RESEND_INTERVAL;
use qmpkit::{Client, Error};
use qmpkit_fake::{FakeConn, FakeServer, Request};
use serde_json::json;

/// Long enough that only the behaviour under test can end a call, never its
/// timeout.
const LONG: Duration = Duration::from_secs(120);

/// What the fake QEMU does with the `n`th `device_del` (from 1) and with a
/// `qom-get`.
#[derive(Clone, Copy)]
enum Play {
    /// The CPU's unplug of QEMU 10: `{}`, then `DEVICE_DELETED` for
    /// `.../cpu1/lapic` only; QOM no longer has the CPU.
    LapicOnly,
    /// `{}`, then an `_OST` refusing the eject with this status (after an
    /// event with garbage in it, which must change nothing).
    Refuse(u64),
    /// The first request is accepted and lost; the second is turned down as
    /// already pending; the third goes through with `DEVICE_DELETED`.
    LostThenPending,
    /// The first request is accepted and lost; by the second the device has
    /// gone anyway (`DeviceNotFound`).
    LostThenGone,
    /// `{}` and an `_OST` "ejection in progress"; `DEVICE_DELETED` only
    /// after twice the re-send interval.
    SlowEject,
    /// `{}`, then the connection closes.
    Dies,
    /// The VM is in `prelaunch` at the first `query-status`; a `RESUME`
    /// follows 300 ms later (someone ran `cont`), and the device goes at the
    /// first request.
    Prelaunch,
    /// The VM stays in `prelaunch`: nobody runs `cont`.
    NeverLaunched,
}

/// The commands the fake QEMU received, by name.
type Log = Arc<Mutex<Vec<String>>>;

async fn fake(play: Play) -> (FakeServer, Client, Log) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let srv = FakeServer::start(move |conn| serve(conn, play, seen.clone()))
        .await
        .expect("start fake server");
    let client = within(10, Client::connect(srv.path())).await.unwrap();
    (srv, client, log)
}

async fn serve(mut conn: FakeConn, play: Play, log: Log) {
    if conn.handshake().await.is_err() {
        return;
    }
    let mut dels = 0;
    let mut launched = !matches!(play, Play::Prelaunch | Play::NeverLaunched);
    while let Ok(Some(req)) = conn.recv().await {
        let name = req.name.clone().unwrap_or_default();
        log.lock().unwrap().push(name.clone());
        let ok = match name.as_str() {
            "device_del" => {
                dels += 1;
                device_del(&mut conn, &req, play, dels).await
            }
            "qom-get" => {
                let path = req.arguments().unwrap()["path"].as_str().unwrap().to_owned();
                conn.reply_error(&req, "DeviceNotFound", &format!("Device '{path}' not found"))
                    .await
                    .is_ok()
            }
            "query-status" => {
                let status = if launched { "running" } else { "prelaunch" };
                let replied = conn
                    .reply(&req, json!({"status": status, "running": launched}))
                    .await
                    .is_ok();
                if replied && !launched && matches!(play, Play::Prelaunch) {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    launched = true;
                    log.lock().unwrap().push("RESUME".into());
                    replied && conn.event("RESUME", json!(null)).await.is_ok()
                } else {
                    replied
                }
            }
            _ => conn.reply(&req, json!({})).await.is_ok(),
        };
        if !ok {
            return;
        }
    }
}

async fn device_del(conn: &mut FakeConn, req: &Request, play: Play, n: usize) -> bool {
    let id = req.arguments().unwrap()["id"].as_str().unwrap().to_owned();
    let path = format!("/machine/peripheral/{id}");
    let ost = |status: u64| {
        json!({"info": {"device": id, "slot": "1", "slot-type": "CPU",
                        "source": 3, "status": status}})
    };
    let sent = match (play, n) {
        (Play::LapicOnly, _) => {
            conn.reply(req, json!({})).await.is_ok()
                && conn
                    .event("DEVICE_DELETED", json!({"path": format!("{path}/lapic")}))
                    .await
                    .is_ok()
        }
        (Play::Refuse(status), _) => {
            conn.reply(req, json!({})).await.is_ok()
                && conn
                    .event("ACPI_DEVICE_OST", json!({"info": {"device": id, "source": "x"}}))
                    .await
                    .is_ok()
                && conn.event("ACPI_DEVICE_OST", ost(status)).await.is_ok()
        }
        (Play::LostThenPending | Play::LostThenGone, 1) => conn.reply(req, json!({})).await.is_ok(),
        (Play::LostThenPending, 2) => conn
            .reply_error(
                req,
                "GenericError",
                &format!("Device {id} is already in the process of unplug"),
            )
            .await
            .is_ok(),
        (Play::LostThenPending, _) => {
            conn.reply(req, json!({})).await.is_ok()
                && conn
                    .event("DEVICE_DELETED", json!({"device": id, "path": path}))
                    .await
                    .is_ok()
        }
        (Play::LostThenGone, _) => conn
            .reply_error(req, "DeviceNotFound", &format!("Device '{id}' not found"))
            .await
            .is_ok(),
        (Play::SlowEject, _) => {
            if conn.reply(req, json!({})).await.is_err()
                || conn.event("ACPI_DEVICE_OST", ost(0x84)).await.is_err()
            {
                return false;
            }
            // The guest takes its time: long enough for a re-send to show.
            tokio::time::sleep(UNPLUG_RESEND_INTERVAL * 2).await;
            conn.event("DEVICE_DELETED", json!({"device": id, "path": path}))
                .await
                .is_ok()
        }
        (Play::Prelaunch | Play::NeverLaunched, _) => {
            conn.reply(req, json!({})).await.is_ok()
                && conn
                    .event("DEVICE_DELETED", json!({"device": id, "path": path}))
                    .await
                    .is_ok()
        }
        (Play::Dies, _) => {
            let _ = conn.reply(req, json!({})).await;
            return false;
        }
    };
    sent
}

fn count(log: &Log, name: &str) -> usize {
    log.lock().unwrap().iter().filter(|n| *n == name).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_reported_gone_by_its_lapic_alone_is_removed_once_qom_agrees() {
    let (_srv, c, log) = fake(Play::LapicOnly).await;
    within(10, c.remove_device_and_wait("cpu1", LONG)).await.unwrap();
    // It asked QOM about the CPU itself before believing the lapic.
    assert_eq!(count(&log, "device_del"), 1);
    assert_eq!(count(&log, "qom-get"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_ost_ends_the_wait_with_its_status() {
    for status in [0x80, 0x81, 0x82, 0x83, 0x01] {
        let (_srv, c, log) = fake(Play::Refuse(status)).await;
        // Only the _OST can end this call before the test's own limit.
        let err = within(10, c.remove_device_and_wait("cpu2", LONG))
            .await
            .unwrap_err();
        match &err {
            Error::UnplugRefused { device, status: s } => {
                assert_eq!((device.as_str(), *s), ("cpu2", status));
            }
            other => panic!("expected UnplugRefused, got {other:?}"),
        }
        assert!(err.is_unplug_refused());
        assert_eq!(count(&log, "device_del"), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_request_is_sent_again_and_already_pending_means_keep_waiting() {
    let (_srv, c, log) = fake(Play::LostThenPending).await;
    within(30, c.remove_device_and_wait("nic0", LONG)).await.unwrap();
    assert_eq!(count(&log, "device_del"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_request_that_finds_no_device_is_success() {
    let (_srv, c, log) = fake(Play::LostThenGone).await;
    within(30, c.remove_device_and_wait("nic0", LONG)).await.unwrap();
    assert_eq!(count(&log, "device_del"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eject_in_progress_is_not_asked_for_again() {
    let (_srv, c, log) = fake(Play::SlowEject).await;
    within(30, c.remove_device_and_wait("cpu1", LONG)).await.unwrap();
    assert_eq!(count(&log, "device_del"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_that_dies_mid_unplug_is_a_disconnect() {
    let (_srv, c, _log) = fake(Play::Dies).await;
    let err = within(10, c.remove_device_and_wait("cpu1", LONG))
        .await
        .unwrap_err();
    assert!(err.is_disconnected(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_leaves_the_request_pending_and_says_so() {
    // Every request lost, forever: the caller's deadline ends it.
    let (_srv, c, log) = fake(Play::LostThenPending).await;
    let err = within(10, c.remove_device_and_wait("nic0", Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { command, .. } if command == "device_del"),
        "{err:?}"
    );
    assert_eq!(count(&log, "device_del"), 1);
}

/// QEMU 10 dates an unplug request by the VM's clock, and one made before the
/// VM ever ran can never be repeated (tests/guest.rs shows it on a real
/// guest): the call asks only once the VM has run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_in_prelaunch_is_asked_only_once_it_has_run() {
    let (_srv, c, log) = fake(Play::Prelaunch).await;
    within(10, c.remove_device_and_wait("nic0", LONG)).await.unwrap();
    let log = log.lock().unwrap().clone();
    assert_eq!(log, ["query-status", "RESUME", "device_del"], "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_never_runs_times_out_with_nothing_asked() {
    let (_srv, c, log) = fake(Play::NeverLaunched).await;
    let e = within(10, c.remove_device_and_wait("nic0", Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    assert_eq!(count(&log, "device_del"), 0);
}
