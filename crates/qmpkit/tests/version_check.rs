//! Version awareness on a real QEMU 10: typed calls are checked against the
//! server's own `query-qmp-schema` before they are sent.
//!
//! No older QEMU is at hand here, but QEMU can hide part of its schema:
//! with `-compat deprecated-output=hide` its introspection leaves out every
//! deprecated command and member, while it still accepts them as input. To
//! the client that is a QEMU without them, and the QEMU behind it proves
//! the point: it would have run each call the check refuses.

mod common;

use std::time::Duration;

use common::{vm_with, within};
use qmpkit::qapi::commands as c;
use qmpkit::qapi::types::{StatsFilter, StatsFilterBranch};
use qmpkit::{Client, ConnectOptions, Error, ErrorClass};
use qmpkit_fake::FakeServer;

/// A QEMU whose schema hides what it deprecates, and a client of it that
/// logs its traffic.
async fn hiding_qemu() -> (common::Vm, Client, std::path::PathBuf) {
    let vm = vm_with(|b| {
        b.args(["-compat", "deprecated-output=hide"])
            .extra_qmp_socket("checked")
            .extra_qmp_socket("unchecked")
    })
    .await;
    let log = vm.dir().join("checked.log");
    let client = within(
        10,
        ConnectOptions::new()
            .traffic_log(&log)
            .connect(vm.socket("checked")),
    )
    .await
    .unwrap();
    (vm, client, log)
}

#[tokio::test]
#[allow(deprecated)] // the point: deprecated items, hidden from the schema
async fn a_command_or_argument_the_schema_lacks_fails_before_sending() {
    let (vm, client, log) = hiding_qemu().await;

    // A command the schema lacks: refused with its name and version.
    let e = within(30, client.execute(&c::QueryMigrationthreads))
        .await
        .unwrap_err();
    match &e {
        Error::Unsupported { what, since, server } => {
            assert_eq!(what, "command `query-migrationthreads`");
            assert_eq!(*since, Some("7.2"));
            assert_eq!(server, &client.greeting().version.to_string());
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("since 7.2"), "{e}");

    // An argument the schema lacks, set: refused. Left unset: sent, and
    // QEMU answers (here that there is no such device).
    let by_device = c::Eject {
        device: Some("cd0".into()),
        id: None,
        force: None,
    };
    let e = within(30, client.execute(&by_device)).await.unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported { what, .. } if what == "argument `device` of command `eject`"),
        "{e:?}"
    );
    let by_id = c::Eject {
        device: None,
        id: Some("cd0".into()),
        force: None,
    };
    let e = within(30, client.execute(&by_id)).await.unwrap_err();
    assert_eq!(e.class(), Some(&ErrorClass::DeviceNotFound), "{e:?}");

    // What the schema has runs as usual, typed.
    let status = within(30, client.execute(&c::QueryStatus)).await.unwrap();
    assert!(!status.running);

    // The refused calls never reached QEMU; the others did.
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(!written.contains("query-migrationthreads"), "{written}");
    assert_eq!(written.matches("\"execute\":\"eject\"").count(), 1, "{written}");
    assert!(written.contains("query-status"), "{written}");
    // The schema the check fetched is the library's business, not the log's.
    assert!(!written.contains("query-qmp-schema"), "{written}");

    // QEMU itself would have run them: the check is about its schema,
    // and can be turned off.
    let unchecked = within(
        10,
        ConnectOptions::new()
            .check_typed_calls(false)
            .connect(vm.socket("unchecked")),
    )
    .await
    .unwrap();
    within(30, unchecked.execute(&c::QueryMigrationthreads))
        .await
        .expect("QEMU runs what its schema hides");
}

#[tokio::test]
#[allow(deprecated)]
async fn a_full_schema_lets_every_call_through() {
    let vm = vm_with(|b| b).await;
    let client = vm.client();
    // Deprecated, but in this QEMU's schema: sent and answered.
    within(30, client.execute(&c::QueryMigrationthreads))
        .await
        .unwrap();
    // A command with a union argument: the check looks at its common
    // members only, and QEMU gets the rest.
    let stats = c::QueryStats(StatsFilter {
        providers: None,
        branch: StatsFilterBranch::Vm,
    });
    within(30, client.check(&stats)).await.unwrap();
    within(30, client.execute(&stats)).await.unwrap();
}

/// A server that will not describe itself (here one that answers every
/// command but `query-qmp-schema`, as a proxy might) gets typed calls
/// unchecked, and answers them.
#[tokio::test]
async fn a_server_without_a_schema_is_not_checked() {
    let server = FakeServer::start(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            if req.name.as_deref() == Some("query-qmp-schema") {
                conn.reply_error(
                    &req,
                    "CommandNotFound",
                    "The command query-qmp-schema has not been found",
                )
                .await
                .unwrap();
            } else {
                conn.reply(
                    &req,
                    serde_json::json!({"status": "running", "running": true, "singlestep": false}),
                )
                .await
                .unwrap();
            }
        }
    })
    .await
    .unwrap();
    let client = within(10, Client::connect(server.path())).await.unwrap();
    for _ in 0..3 {
        let status = within(10, client.execute(&c::QueryStatus)).await.unwrap();
        assert!(status.running);
    }
    // And a server that is gone fails the call as usual.
    client.disconnect();
    let e = within(10, client.execute(&c::QueryStatus)).await.unwrap_err();
    assert!(e.is_disconnected(), "{e:?}");
}

/// A server that answers every command with the same canned reply (the
/// floor's benchmark server does) gives no schema either.
#[tokio::test]
#[allow(deprecated)] // a command this fake server would never have
async fn a_canned_answer_to_query_qmp_schema_is_no_schema() {
    let server = FakeServer::start(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            conn.reply(&req, serde_json::json!({"status": "paused", "running": false}))
                .await
                .unwrap();
        }
    })
    .await
    .unwrap();
    let client = within(10, Client::connect(server.path())).await.unwrap();
    let status = within(10, client.execute(&c::QueryStatus)).await.unwrap();
    assert!(!status.running);
    within(10, client.check(&c::QueryMigrationthreads)).await.unwrap();
}

#[tokio::test]
async fn a_typed_call_to_a_frozen_server_ends_at_its_budget() {
    // A server that takes the handshake, then never answers: the first
    // typed call's schema fetch ends at the connection's budget and the
    // call fails with a timeout, never hangs.
    let server = FakeServer::start(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(_)) = conn.recv().await {}
    })
    .await
    .unwrap();
    let client = within(
        10,
        ConnectOptions::new()
            .command_timeout(Duration::from_millis(300))
            .connect(server.path()),
    )
    .await
    .unwrap();
    let e = within(10, client.execute(&c::QueryStatus)).await.unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
}
