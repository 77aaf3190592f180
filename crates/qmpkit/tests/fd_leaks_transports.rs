//! No file descriptor leaks on the other transports: refused fd passing,
//! failed TCP connects and handshakes, listeners, held streams. One test in
//! its own process, so that counting `/proc/self/fd` is not disturbed by
//! other tests.

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use common::{vm_with, within};
use qmpkit::{Address, ConnectOptions, Listener};
use serde_json::Value;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fd_leaks_on_tcp_listeners_and_held_streams() {
    let vm = vm_with(|b| b.qmp_tcp()).await;
    let c = vm.client();
    let file = tempfile::tempfile().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let before = open_fds();

    // fds refused over TCP are closed, and the connection answers on.
    for _ in 0..200 {
        let fd: OwnedFd = file.try_clone().unwrap().into();
        let err = c.send_file("leak", fd).await.unwrap_err();
        assert!(err.is_fd_passing_unsupported(), "{err:?}");
    }
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "prelaunch");

    // Refused TCP connects and handshakes with a server that is not QMP.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = closed.local_addr().unwrap();
    drop(closed);
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_address = silent.local_addr().unwrap();
    let options = ConnectOptions::new().handshake_timeout(Duration::from_millis(20));
    for _ in 0..50 {
        assert!(options.connect_to(refused).await.unwrap_err().is_unreachable());
        let attempt = options.connect_to(silent_address);
        let (accepted, result) = tokio::join!(silent.accept(), attempt);
        drop(accepted.unwrap());
        assert!(matches!(
            result.unwrap_err(),
            qmpkit::Error::HandshakeTimeout { .. }
        ));
    }
    drop(silent);

    // Listeners that time out, and held streams whose peer is gone.
    for i in 0..50 {
        let path = dir.path().join(format!("l{i}.sock"));
        let listener = Listener::bind(Address::unix(&path)).await.unwrap();
        let err = listener.accept(Duration::from_millis(1)).await.unwrap_err();
        assert!(matches!(err, qmpkit::Error::AcceptTimeout { .. }), "{err:?}");
        drop(listener);
        assert!(!path.exists());
        let tcp = Listener::bind(Address::tcp("127.0.0.1", 0)).await.unwrap();
        drop(tcp);
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(theirs);
        assert!(ConnectOptions::new().connect_stream(ours).await.is_err());
    }
    // The tasks of failed connects are gone once they were polled to the end.
    within(10, async {
        while open_fds() != before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(open_fds(), before);
}
