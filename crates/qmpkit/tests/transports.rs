//! Every way to reach QEMU besides connecting to its Unix socket path:
//! TCP, a Unix socket the caller connected, any tokio byte stream, and
//! accept mode (QEMU connecting out to a listener). Each runs the core
//! scenarios on a real QEMU: handshake, 64 concurrent commands, events, a
//! timeout then a correct reply, kill -9. Then the bad inputs.

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use common::{vm_with, within};
use qmpkit::launch::Qemu;
use qmpkit::{Address, CallOptions, Client, ConnectOptions, Error, KnownEvent, Listener};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// The core scenarios on `c`, a connection to `vm` over some transport.
/// Ends with QEMU killed.
async fn core_scenarios(vm: &mut Qemu, c: Client) {
    // Handshake: QEMU's greeting, capabilities negotiated.
    assert!(c.greeting().version.major >= 10, "{:?}", c.greeting());
    assert!(c.oob_enabled());
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "prelaunch");

    // 64 concurrent commands from 8 tasks, with differently shaped replies:
    // a reply handed to the wrong caller would fail to decode or compare.
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let c = c.clone();
            tokio::spawn(async move {
                // Each task has its 8 commands in flight at once.
                let mut calls = tokio::task::JoinSet::new();
                for i in 0..8 {
                    let c = c.clone();
                    calls.spawn(async move {
                        match (t + i) % 3 {
                            0 => {
                                let v: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
                                assert_eq!(v["status"], "prelaunch");
                            }
                            1 => {
                                let v: Value = c.execute_raw("query-kvm", Value::Null).await.unwrap();
                                assert!(v["present"].is_boolean(), "{v}");
                            }
                            _ => {
                                // HMP's `print` answers with its argument (in hex).
                                let n = 1000 + t * 8 + i;
                                let v: Value = c
                                    .execute_raw(
                                        "human-monitor-command",
                                        json!({"command-line": format!("print {n}")}),
                                    )
                                    .await
                                    .unwrap();
                                assert_eq!(
                                    v.as_str().map(str::trim),
                                    Some(format!("{n:#x}").as_str()),
                                    "{v}"
                                );
                            }
                        }
                    });
                }
                while let Some(done) = calls.join_next().await {
                    done.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        within(60, t).await.unwrap();
    }

    // Events: cont then stop come back as RESUME then STOP.
    let mut events = c.events();
    c.execute_raw("cont", Value::Null).await.unwrap();
    c.execute_raw("stop", Value::Null).await.unwrap();
    let first = within(10, events.next()).await.expect("event");
    let second = within(10, events.next()).await.expect("event");
    assert_eq!(first.known(), KnownEvent::Resume);
    assert_eq!(second.known(), KnownEvent::Stop);
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "paused");

    // A command times out while QEMU is frozen; the next one gets its own reply.
    vm.freeze().unwrap();
    let short = CallOptions::new().timeout(Duration::from_millis(300));
    let err = within(10, c.call_with::<_, Value>("query-status", &(), short))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { command, .. } if command == "query-status"),
        "{err:?}"
    );
    assert!(!c.is_closed());
    vm.thaw().unwrap();
    let name: Value = within(30, c.execute_raw("query-name", Value::Null))
        .await
        .unwrap();
    assert!(name.is_object() && name.get("status").is_none(), "{name}");
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "paused");

    // kill -9 with commands in flight: each ends with a closed connection.
    vm.freeze().unwrap();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.execute_raw("query-status", Value::Null).await })
        })
        .collect();
    tokio::task::yield_now().await;
    vm.kill();
    for call in calls {
        let err = within(10, call).await.unwrap().unwrap_err();
        assert!(err.is_disconnected(), "{err:?}");
    }
    within(10, c.closed()).await;
    assert!(c.is_closed());
    let err = c.execute_raw("query-status", Value::Null).await.unwrap_err();
    assert!(err.is_disconnected(), "{err:?}");
}

fn temp_file(dir: &std::path::Path, name: &str) -> OwnedFd {
    std::fs::File::create(dir.join(name)).unwrap().into()
}

/// fd passing is refused with the typed error before anything is written,
/// and the connection keeps answering: QEMU never got the fd.
async fn fd_passing_is_refused(vm: &Qemu, c: &Client, transport: &str) {
    assert!(!c.passes_fds());
    let err = c
        .send_file("refused", temp_file(vm.dir(), "f"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::FdPassingUnsupported { command, transport: t } if command == "getfd" && *t == transport),
        "{err:?}"
    );
    assert!(err.is_fd_passing_unsupported());
    let err = c
        .send_file_with_fdset("refused", temp_file(vm.dir(), "g"), true)
        .await
        .unwrap_err();
    assert!(err.is_fd_passing_unsupported(), "{err:?}");
    assert!(err.to_string().contains("only a Unix socket"), "{err}");
    // QEMU has neither: closing the named fd fails, and no fd set exists.
    let err = c.close_file("refused").await.unwrap_err();
    assert!(err.is_qmp(), "{err:?}");
    assert!(c.query_fdsets().await.unwrap().is_empty());
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "prelaunch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_runs_the_core_scenarios_and_refuses_fd_passing() {
    let mut vm = vm_with(|b| b.qmp_tcp()).await;
    let address = vm.qmp_address().clone();
    assert!(
        matches!(&address, Address::Tcp(a) if a.starts_with("127.0.0.1:")),
        "{address:?}"
    );
    let c = vm.client().clone();
    assert_eq!(c.address(), Some(&address));
    assert_eq!(c.path(), std::path::Path::new(""));
    fd_passing_is_refused(&vm, &c, "TCP").await;
    core_scenarios(&mut vm, c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_address_text_connects_once_the_previous_client_left() {
    let vm = vm_with(|b| b.qmp_tcp()).await;
    let Address::Tcp(text) = vm.qmp_address().clone() else {
        unreachable!()
    };
    // QEMU serves one client per monitor: the launcher's leaves first.
    vm.client().disconnect();
    within(10, vm.client().closed()).await;
    for form in [text.clone(), format!("tcp:{text}")] {
        let address: Address = form.parse().unwrap();
        let c = within(10, Client::connect_to(address)).await.unwrap();
        let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
        assert_eq!(st["status"], "prelaunch");
        c.disconnect();
        within(10, c.closed()).await;
    }
    // The blocking facade too.
    let address: Address = text.parse().unwrap();
    let st = within(
        20,
        tokio::task::spawn_blocking(move || {
            let c = qmpkit::blocking::Client::connect_to(address)?;
            c.execute_raw("query-status", Value::Null)
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(st["status"], "prelaunch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_std_unix_stream_runs_the_core_scenarios_and_passes_fds() {
    let mut vm = vm_with(|b| b.extra_qmp_socket("held")).await;
    let stream = std::os::unix::net::UnixStream::connect(vm.socket("held")).unwrap();
    let c = within(10, ConnectOptions::new().connect_stream(stream))
        .await
        .unwrap();
    assert!(c.passes_fds());
    assert_eq!(c.path(), vm.socket("held"));
    // fd passing works: QEMU holds the named fd and the fd set.
    c.send_file("held-fd", temp_file(vm.dir(), "f")).await.unwrap();
    c.close_file("held-fd").await.unwrap();
    let info = c
        .send_file_with_fdset("held-set", temp_file(vm.dir(), "g"), true)
        .await
        .unwrap();
    let sets = c.query_fdsets().await.unwrap();
    assert!(sets.iter().any(|s| s.fdset_id == info.fdset_id), "{sets:?}");
    c.remove_fd_from_fdset("held-set").await.unwrap();
    core_scenarios(&mut vm, c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_tokio_unix_stream_passes_fds() {
    let vm = vm_with(|b| b.extra_qmp_socket("held")).await;
    let stream = tokio::net::UnixStream::connect(vm.socket("held")).await.unwrap();
    let c = within(10, ConnectOptions::new().connect_stream(stream))
        .await
        .unwrap();
    c.send_file("tokio-fd", temp_file(vm.dir(), "f")).await.unwrap();
    c.close_file("tokio-fd").await.unwrap();
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "prelaunch");
}

/// Bridges a Unix connection to QEMU through an in-memory duplex pipe, so
/// that the client sees only a generic tokio stream.
async fn duplex_to(path: &std::path::Path) -> tokio::io::DuplexStream {
    let mut unix = tokio::net::UnixStream::connect(path).await.unwrap();
    let (ours, mut theirs) = tokio::io::duplex(4096);
    tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut unix, &mut theirs).await;
    });
    ours
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_io_over_a_duplex_stream_runs_the_core_scenarios_and_refuses_fds() {
    let mut vm = vm_with(|b| b.extra_qmp_socket("io")).await;
    let io = duplex_to(&vm.socket("io")).await;
    let c = within(10, ConnectOptions::new().connect_io(io)).await.unwrap();
    assert_eq!(c.address(), None);
    fd_passing_is_refused(&vm, &c, "a byte stream").await;
    core_scenarios(&mut vm, c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_io_over_a_split_tcp_stream_runs_the_core_scenarios() {
    let mut vm = vm_with(|b| b.qmp_tcp()).await;
    let Address::Tcp(text) = vm.qmp_address().clone() else {
        unreachable!()
    };
    vm.client().disconnect();
    within(10, vm.client().closed()).await;
    let tcp = tokio::net::TcpStream::connect(text.as_str()).await.unwrap();
    let (read, write) = tcp.into_split();
    let c = within(10, ConnectOptions::new().connect_io(tokio::io::join(read, write)))
        .await
        .unwrap();
    fd_passing_is_refused(&vm, &c, "a byte stream").await;
    core_scenarios(&mut vm, c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_mode_takes_qemu_connecting_out_to_a_unix_listener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("accept.sock");
    let listener = Listener::bind(Address::unix(&path)).await.unwrap();
    assert_eq!(listener.address(), &Address::unix(&path));
    let mut vm = vm_with(|b| b.qmp_connect_out(&path)).await;
    let c = within(20, listener.accept(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(c.address(), Some(&Address::unix(&path)));
    assert!(c.passes_fds());
    c.send_file("accepted-fd", temp_file(vm.dir(), "f"))
        .await
        .unwrap();
    c.close_file("accepted-fd").await.unwrap();
    drop(listener);
    assert!(!path.exists(), "the listener removes its socket file");
    core_scenarios(&mut vm, c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_mode_over_tcp_and_qemu_reconnects_after_a_disconnect() {
    let listener = Listener::bind(Address::tcp("127.0.0.1", 0)).await.unwrap();
    let Address::Tcp(bound) = listener.address().clone() else {
        unreachable!()
    };
    assert!(!bound.ends_with(":0"), "{bound}");
    let vm = vm_with(|b| b.qmp_connect_out(listener.address())).await;
    let c = within(20, listener.accept(Duration::from_secs(15)))
        .await
        .unwrap();
    assert!(!c.passes_fds());
    c.execute_raw("cont", Value::Null).await.unwrap();
    // The launcher's own monitor sees what the accepted one did.
    let st: Value = vm
        .client()
        .execute_raw("query-status", Value::Null)
        .await
        .unwrap();
    assert_eq!(st["status"], "running");
    // QEMU comes back by itself (reconnect-ms) after the client leaves.
    c.disconnect();
    let again = within(20, listener.accept(Duration::from_secs(15)))
        .await
        .unwrap();
    let st: Value = again.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_mode_takes_a_qemu_started_before_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    // QEMU starts with nobody listening; its reconnect-ms retries.
    let vm = vm_with(|b| b.qmp_connect_out(&path)).await;
    assert!(!path.exists());
    let listener = Listener::bind(Address::unix(&path)).await.unwrap();
    let c = within(20, listener.accept(Duration::from_secs(15)))
        .await
        .unwrap();
    let mut events = c.events();
    vm.client().execute_raw("cont", Value::Null).await.unwrap();
    let e = within(10, events.next()).await.expect("event");
    assert_eq!(e.known(), KnownEvent::Resume);
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_deadline_with_nobody_connecting_is_a_typed_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nobody.sock");
    let listener = Listener::bind(Address::unix(&path)).await.unwrap();
    assert!(path.exists());
    let err = within(10, listener.accept(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::AcceptTimeout { address, waited }
            if *address == format!("unix:{}", path.display()) && *waited == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(err.to_string().contains("nobody.sock"), "{err}");
    // A second listener on the same path is refused, and the first one's
    // file is removed when it goes.
    let err = Listener::bind(Address::unix(&path)).await.unwrap_err();
    assert!(matches!(err, Error::Listen { .. }), "{err:?}");
    drop(listener);
    assert!(!path.exists(), "the listener removes its socket file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_tcp_address_is_a_typed_refusal() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap();
    drop(closed);
    let err = within(10, Client::connect_to(address)).await.unwrap_err();
    assert!(
        matches!(&err, Error::ConnectTcp { address: a, source }
            if *a == address.to_string() && source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{err:?}"
    );
    assert!(err.is_unreachable());
    assert!(err.to_string().contains(&format!("tcp:{address}")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_that_does_not_resolve_is_a_typed_resolve_error() {
    let options = ConnectOptions::new().handshake_timeout(Duration::from_secs(5));
    let address: Address = "no-such-host.invalid:4444".parse().unwrap();
    let err = within(10, options.connect_to(address)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Resolve { address, .. } if address == "no-such-host.invalid:4444"),
        "{err:?}"
    );
    assert!(err.is_unreachable());
}

/// A TCP server that is not QMP: it accepts, writes `banner`, and holds
/// the connection open.
async fn not_qmp(banner: &'static [u8]) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(banner).await;
            held.push(stream);
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_is_not_qmp_ends_within_the_handshake_budget() {
    let options = ConnectOptions::new().handshake_timeout(Duration::from_millis(500));
    for banner in [
        &b""[..],
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 400 Bad Request\r\n\r\n{\"not\": \"qmp\"}\n",
    ] {
        let address = not_qmp(banner).await;
        let err = within(10, options.connect_to(address)).await.unwrap_err();
        // Silence and a banner without JSON run out the budget; a JSON
        // line that is no greeting is refused at once.
        assert!(
            matches!(&err, Error::Handshake(_) | Error::HandshakeTimeout { .. }),
            "{banner:?}: {err:?}"
        );
        assert_eq!(
            matches!(&err, Error::HandshakeTimeout { .. }),
            !banner.contains(&b'{'),
            "{banner:?}: {err:?}"
        );
        assert!(!err.is_unreachable());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_stream_whose_peer_is_closed_fails_the_handshake() {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(theirs);
    let err = within(10, ConnectOptions::new().connect_stream(ours))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Handshake(m) if m.contains("closed the connection before sending its greeting")),
        "{err:?}"
    );
    let (ours, theirs) = tokio::io::duplex(64);
    drop(theirs);
    let err = within(10, ConnectOptions::new().connect_io(ours))
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::Handshake(_)), "{err:?}");
    // A silent peer: the handshake budget ends it.
    let (ours, _silent) = std::os::unix::net::UnixStream::pair().unwrap();
    let options = ConnectOptions::new().handshake_timeout(Duration::from_millis(300));
    let err = within(10, options.connect_stream(ours)).await.unwrap_err();
    assert!(
        matches!(&err, Error::HandshakeTimeout { peer, budget } if peer == "the Unix socket given" && *budget == Duration::from_millis(300)),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_waits_for_a_starting_vm_that_connects_out() {
    use qmpkit::monitor::{constants, Monitor, MonitorOptions};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mon.sock");
    let listener = Listener::bind(Address::unix(&path)).await.unwrap();
    // Nobody yet: a typed timeout, and the listener stays usable.
    let err = Monitor::accept(&listener, Duration::from_millis(200), MonitorOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AcceptTimeout { .. }), "{err:?}");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let options = MonitorOptions::new().event_handler(move |_, ev| {
        let _ = tx.send((ev.name().to_owned(), ev.data()["reason"].clone()));
    });
    let mut vm = vm_with(|b| b.qmp_connect_out(&path)).await;
    let mon = within(20, Monitor::accept(&listener, Duration::from_secs(15), options))
        .await
        .unwrap();
    // The monitor runs commands, and QEMU's events reach its handler.
    vm.client().execute_raw("cont", Value::Null).await.unwrap();
    let (name, _) = within(10, rx.recv()).await.unwrap();
    assert_eq!(name, "RESUME");
    let st: Value = mon.call("query-status", &()).await.unwrap();
    assert_eq!(st["status"], "running");
    // QEMU vanishing is the one shutdown notice, as for a connected monitor.
    vm.kill();
    let (name, reason) = within(10, rx.recv()).await.unwrap();
    assert_eq!(name, constants::EVENT_VM_SHUTDOWN);
    assert_eq!(reason, constants::SHUTDOWN_REASON_DISCONNECT);
    within(10, mon.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_budget_bounds_a_tcp_connect_that_gets_no_answer() {
    // A listener whose accept queue is full: Linux drops further SYNs, so
    // a connect gets no answer at all, as behind a dropping firewall.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(0).unwrap();
    let address = full.local_addr().unwrap();
    let mut queued = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(address),
        )
        .await
        {
            Ok(stream) => queued.push(stream.unwrap()),
            // This connect got no answer: the queue is full.
            Err(_) => break,
        }
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    let options = ConnectOptions::new().handshake_timeout(Duration::from_millis(300));
    let err = within(10, options.connect_to(address)).await.unwrap_err();
    assert!(
        matches!(&err, Error::ConnectTcp { source, .. } if source.kind() == std::io::ErrorKind::TimedOut),
        "{err:?}"
    );
    assert!(err.is_unreachable());
    assert!(err.to_string().contains("not connected within 300ms"), "{err}");
}
