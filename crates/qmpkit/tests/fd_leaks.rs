//! No file descriptor leaks. One test in its own process, so that counting
//! `/proc/self/fd` is not disturbed by other tests.

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use common::within;
use qmpkit::{CallOptions, Client, ConnectOptions};
use qmpkit_fake::FakeServer;
use serde_json::{json, Value};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fd_leaks_across_sends_failed_handshakes_and_disconnects() {
    let vm = common::vm().await;
    let c = vm.client();
    let file = tempfile::tempfile().unwrap();
    let before = open_fds();

    // 1000 fds sent with getfd (each replaces the previous one in QEMU).
    for _ in 0..1000 {
        let fd: OwnedFd = file.try_clone().unwrap().into();
        c.call_with::<_, qmpkit::Empty>("getfd", &json!({"fdname": "leak"}), CallOptions::new().fds([fd]))
            .await
            .unwrap();
    }
    // fds whose command fails in QEMU, and fds of a call that timed out
    // before it was sent, are closed too.
    for _ in 0..50 {
        let fd: OwnedFd = file.try_clone().unwrap().into();
        let err = c
            .call_with::<_, Value>("no-such-command", &json!({}), CallOptions::new().fds([fd]))
            .await
            .unwrap_err();
        assert!(err.is_not_found());
    }
    assert_eq!(open_fds(), before, "fds leaked by sending");

    // Failed handshakes leave nothing behind.
    let silent = FakeServer::start(|conn| async move {
        let _s = conn.into_inner();
        std::future::pending::<()>().await
    })
    .await
    .unwrap();
    let before = open_fds();
    for _ in 0..20 {
        let err = ConnectOptions::new()
            .handshake_timeout(Duration::from_millis(20))
            .connect(silent.path())
            .await
            .unwrap_err();
        assert!(matches!(err, qmpkit::Error::HandshakeTimeout { .. }));
    }
    // Connections that were made and then closed leave nothing behind either.
    let srv = FakeServer::instant().await.unwrap();
    for _ in 0..20 {
        let c = Client::connect(srv.path()).await.unwrap();
        c.execute_raw("query-status", Value::Null).await.unwrap();
        c.disconnect();
        within(5, c.closed()).await;
    }
    drop(srv);
    drop(silent);
    // The server side closes asynchronously; the client side must be back to
    // where it started once the server's sockets are gone.
    common::eventually(10, || async { (open_fds() <= before).then_some(()) }).await;
}
