//! Live migration between two real QEMUs over a socket pair, and its failures.

mod common;

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{vm, vm_with, within};
use qmpkit::commands::migration::MigrationTuning;
use qmpkit::{CallOptions, Client, Empty, Error};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

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
async fn migrates_to_a_second_qemu_pausing_before_switchover() {
    let src = vm().await;
    let dst = vm_with(|b| b.args(["-incoming", "defer"])).await;
    let (s, d) = (src.client(), dst.client().clone());
    within(120, async {
        s.execute_raw("cont", Value::Null).await.unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        getfd(s, "mig", a.into()).await;
        getfd(&d, "mig", b.into()).await;

        s.migrate_set_capabilities([("pause-before-switchover", true)])
            .await
            .unwrap();
        let caps: Vec<Value> = s.call("query-migrate-capabilities", &()).await.unwrap();
        let on = |name: &str| caps.iter().any(|c| c["capability"] == name && c["state"] == true);
        assert!(on("pause-before-switchover"));
        s.migrate_set_parameters(&json!({"max-bandwidth": 1u64 << 30}))
            .await
            .unwrap();
        let params: Value = s.call("query-migrate-parameters", &()).await.unwrap();
        assert_eq!(params["max-bandwidth"], json!(1u64 << 30));
        assert_eq!(s.query_migrate().await.unwrap().status, "none");

        let incoming = tokio::spawn(async move { d.migrate_incoming("mig", LONG).await });
        s.migrate("mig").await.unwrap();
        s.migrate_wait("pre-switchover", LONG).await.unwrap();
        assert_eq!(s.query_migrate().await.unwrap().status, "pre-switchover");
        // The migrate call turned MIGRATION events on.
        let caps: Vec<Value> = s.call("query-migrate-capabilities", &()).await.unwrap();
        assert!(caps
            .iter()
            .any(|c| c["capability"] == "events" && c["state"] == true));

        s.migrate_continue("pre-switchover").await.unwrap();
        s.migrate_wait("completed", LONG).await.unwrap();
        incoming.await.unwrap().unwrap();

        let st = s.query_migrate().await.unwrap();
        assert_eq!(st.status, "completed");
        assert!(st.ram.transferred > 0 && st.ram.total >= 128 << 20, "{st:?}");
        assert!(st.total_time > 0, "{st:?}");
        // QEMU reports `completed` a moment before it sets the run state.
        let state = common::eventually(10, || async {
            let st = run_state(s).await;
            (st != "finish-migrate").then_some(st)
        })
        .await;
        assert_eq!(state, "postmigrate");
        // The destination was started with -S: it holds the guest, paused.
        let dst_client = dst.client();
        assert_eq!(dst_client.query_migrate().await.unwrap().status, "completed");
        assert_eq!(run_state(dst_client).await, "paused");
        // Waiting for a state already reached returns at once; for another one,
        // the final state is reported.
        s.migrate_wait("completed", LONG).await.unwrap();
        match s.migrate_wait("active", LONG).await.unwrap_err() {
            Error::MigrationFailed { status, .. } => assert_eq!(status, "completed"),
            other => panic!("expected MigrationFailed, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_under_low_bandwidth_ends_the_wait_promptly() {
    let vm = vm().await;
    let c = vm.client();
    within(60, async {
        c.execute_raw("cont", Value::Null).await.unwrap();
        let (a, mut peer) = UnixStream::pair().unwrap();
        // A sink that reads whatever arrives, until QEMU closes its end.
        let sink = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while matches!(peer.read(&mut buf), Ok(n) if n > 0) {}
        });
        getfd(c, "mig", a.into()).await;
        c.migrate_set_parameters(&json!({"max-bandwidth": 64 << 10}))
            .await
            .unwrap();
        c.migrate("mig").await.unwrap();
        c.migrate_wait("active", LONG).await.unwrap();

        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.migrate_wait("completed", LONG).await })
        };
        // Capabilities are fixed while a migration runs; parameters are not.
        let e = c.migrate_set_auto_converge(true).await.unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        let e = c.migrate_set_postcopy(true).await.unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        c.migrate_tune(&MigrationTuning::new().max_bandwidth(32 << 10))
            .await
            .unwrap();
        assert_eq!(
            c.query_migrate_parameters().await.unwrap().max_bandwidth,
            Some(32 << 10)
        );
        // Not switched to post-copy: the capability is off.
        let e = c.migrate_start_postcopy().await.unwrap_err();
        assert!(e.is_qmp(), "{e:?}");

        let after = c.migrate_cancel(LONG).await.unwrap();
        assert_eq!(after.status, "cancelled", "{after:?}");
        let e = within(10, waiter).await.unwrap().unwrap_err();
        assert!(e.is_migration_cancelled(), "{e:?}");
        match e {
            Error::MigrationFailed { status, .. } => assert_eq!(status, "cancelled"),
            other => panic!("expected MigrationFailed, got {other:?}"),
        }
        assert_eq!(c.query_migrate().await.unwrap().status, "cancelled");
        assert_eq!(run_state(c).await, "running");
        tokio::task::spawn_blocking(move || sink.join().unwrap())
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_migration_requests_fail_with_typed_errors() {
    let vm = vm().await;
    let c = vm.client();
    within(30, async {
        // Nothing is migrating: a wait ends at its deadline.
        let e = c
            .migrate_wait("completed", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e:?}");

        // Nothing to cancel.
        assert_eq!(c.migrate_cancel(LONG).await.unwrap().status, "none");
        // Out of QEMU's range: refused, nothing changed.
        let before = c.query_migrate_parameters().await.unwrap();
        let e = c
            .migrate_tune(
                &MigrationTuning::new()
                    .max_bandwidth(1 << 20)
                    .cpu_throttle(100, 10),
            )
            .await
            .unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        assert_eq!(c.query_migrate_parameters().await.unwrap(), before);
        let e = c
            .migrate_tune(&MigrationTuning::new().downtime_limit(Duration::from_secs(3000)))
            .await
            .unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        let e = c
            .migrate_tune(&MigrationTuning::new().throttle_trigger_threshold(0))
            .await
            .unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        assert_eq!(c.query_migrate_parameters().await.unwrap(), before);
        // Post-copy needs a migration to switch.
        let e = c.migrate_start_postcopy().await.unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        // Capabilities, typed, read back.
        c.migrate_set_auto_converge(true).await.unwrap();
        c.migrate_set_postcopy(true).await.unwrap();
        let caps: Vec<Value> = c.call("query-migrate-capabilities", &()).await.unwrap();
        let on = |name: &str| caps.iter().any(|x| x["capability"] == name && x["state"] == true);
        assert!(on("auto-converge") && on("postcopy-ram"), "{caps:?}");
        c.migrate_set_auto_converge(false).await.unwrap();
        c.migrate_set_postcopy(false).await.unwrap();

        let e = c.migrate("no-such-fd").await.unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        let e = c.migrate("").await.unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
        let st = c.query_migrate().await.unwrap();
        assert!(st.status == "none" || st.status == "failed", "{st:?}");

        let e = c
            .migrate_set_capabilities([("no-such-capability", true)])
            .await
            .unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        let e = c
            .migrate_set_parameters(&json!({"no-such-parameter": 1}))
            .await
            .unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        let e = c.migrate_set_parameters(&json!(5)).await.unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
        let e = c.migrate_continue("pre-switchover").await.unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        // Not started with -incoming defer.
        let e = c.migrate_incoming("no-such-fd", LONG).await.unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        assert_eq!(run_state(c).await, "prelaunch");

        // The other end is gone: the migration fails, with QEMU's reason.
        let (a, peer) = UnixStream::pair().unwrap();
        drop(peer);
        getfd(c, "dead", a.into()).await;
        c.migrate("dead").await.unwrap();
        match c.migrate_wait("completed", LONG).await.unwrap_err() {
            Error::MigrationFailed { status, message } => {
                assert_eq!(status, "failed");
                assert!(message.is_some_and(|m| !m.is_empty()));
            }
            other => panic!("expected MigrationFailed, got {other:?}"),
        }
        assert_eq!(run_state(c).await, "prelaunch");
    })
    .await;
}
