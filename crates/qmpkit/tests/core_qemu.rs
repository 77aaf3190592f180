//! The protocol core against a real QEMU: handshake, pipelining, errors,
//! events, fd passing, a frozen QEMU, a killed QEMU, quit, long paths,
//! large replies, the traffic log and the blocking facade.

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use common::{vm, vm_with, within};
use qmpkit::{CallOptions, Client, ConnectOptions, Error, ErrorClass, KnownEvent};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_reports_version_and_negotiates_oob() {
    let vm = vm().await;
    let c = vm.client();
    let g = c.greeting();
    assert!(g.version.major >= 10, "{g:?}");
    assert!(g.capabilities.iter().any(|c| c == "oob"));
    assert!(c.oob_enabled());
    // Capabilities were negotiated: an ordinary command works, a second
    // qmp_capabilities is refused as QEMU refuses it.
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "prelaunch");
    let err = c.execute_raw("qmp_capabilities", Value::Null).await.unwrap_err();
    assert_eq!(err.class(), Some(&ErrorClass::CommandNotFound), "{err:?}");
    // Without oob when asked so.
    let plain = ConnectOptions::new().oob(false);
    drop(vm);
    let vm = vm_with(|b| b.connect_options(plain)).await;
    assert!(!vm.client().oob_enabled());
    let st: Value = vm
        .client()
        .execute_raw("query-status", Value::Null)
        .await
        .unwrap();
    assert_eq!(st["running"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_pipeline_different_commands_and_each_gets_its_own_reply() {
    let vm = vm().await;
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let c = vm.client().clone();
            tokio::spawn(async move {
                for i in 0..30 {
                    // Different commands with differently shaped replies: a
                    // mismatched reply would fail to decode or compare.
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
                            let v: Value = c.execute_raw("query-name", Value::Null).await.unwrap();
                            assert!(v.is_object() && v.get("status").is_none(), "{v}");
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        within(60, t).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_errors_keep_qemus_class_and_description() {
    let vm = vm().await;
    let c = vm.client();
    let err = c.execute_raw("no-such-command", Value::Null).await.unwrap_err();
    let q = err.as_qmp().expect("a QMP error");
    assert_eq!(q.class, ErrorClass::CommandNotFound);
    assert_eq!(q.command, "no-such-command");
    assert!(q.desc.contains("no-such-command"), "{q:?}");
    assert!(err.is_not_found());
    let err = c
        .execute_raw("device_del", json!({"id": "ghost"}))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(!err.is_disconnected() && !err.is_timeout());
    let err = c
        .execute_raw("query-status", json!({"bogus": 1}))
        .await
        .unwrap_err();
    assert_eq!(err.class(), Some(&ErrorClass::GenericError));
    assert!(!err.is_not_found());
    // An error reply never harms the connection.
    assert!(!c.is_closed());
    c.execute_raw("query-status", Value::Null).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_cont_and_reset_produce_events_in_order() {
    let vm = vm().await;
    let c = vm.client();
    let mut events = c.events();
    let mut resets = c.subscribe(qmpkit::EventFilter::names(["RESET"]));
    c.execute_raw("cont", Value::Null).await.unwrap();
    c.execute_raw("stop", Value::Null).await.unwrap();
    c.execute_raw("system_reset", Value::Null).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = within(10, events.next()).await.expect("event");
        seen.push(e.known());
    }
    assert_eq!(seen[0], KnownEvent::Resume);
    assert_eq!(seen[1], KnownEvent::Stop);
    assert_eq!(
        seen[2],
        KnownEvent::Reset {
            guest: false,
            reason: "host-qmp-system-reset".into()
        }
    );
    assert!(c.shutdown_event().is_none(), "no SHUTDOWN was sent");
    let r = within(10, resets.next()).await.unwrap();
    assert_eq!(r.name(), "RESET");
    assert!(r.timestamp().seconds > 1_600_000_000);
}

fn temp_file(dir: &std::path::Path, name: &str) -> OwnedFd {
    std::fs::File::create(dir.join(name)).unwrap().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fds_pass_with_getfd_and_add_fd_and_show_in_query_fdsets() {
    let vm = vm().await;
    let c = vm.client();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    // getfd: a named fd, usable by name, closable by name.
    c.call_with::<_, qmpkit::Empty>(
        "getfd",
        &json!({"fdname": "f1"}),
        CallOptions::new().fds([temp_file(&dir, "a")]),
    )
    .await
    .unwrap();
    c.call::<_, qmpkit::Empty>("closefd", &json!({"fdname": "f1"}))
        .await
        .unwrap();
    let err = c
        .call::<_, qmpkit::Empty>("closefd", &json!({"fdname": "f1"}))
        .await
        .unwrap_err();
    assert!(err.is_qmp(), "{err:?}");
    // getfd without an fd is QEMU's error, not a hang.
    let err = c
        .call::<_, qmpkit::Empty>("getfd", &json!({"fdname": "f2"}))
        .await
        .unwrap_err();
    assert!(err.is_qmp(), "{err:?}");
    // add-fd: appears in query-fdsets with its opaque string.
    let info: Value = c
        .call_with(
            "add-fd",
            &json!({"opaque": "rdwr:disk0"}),
            CallOptions::new().fds([temp_file(&dir, "b")]),
        )
        .await
        .unwrap();
    let set = info["fdset-id"].as_i64().unwrap();
    let fdsets: Value = c.execute_raw("query-fdsets", Value::Null).await.unwrap();
    let fds = fdsets
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["fdset-id"] == set)
        .expect("fdset listed")["fds"]
        .clone();
    assert_eq!(fds[0]["opaque"], "rdwr:disk0");
    assert_eq!(fds[0]["fd"], info["fd"]);
    c.call::<_, qmpkit::Empty>("remove-fd", &json!({"fdset-id": set}))
        .await
        .unwrap();
    let fdsets: Value = c.execute_raw("query-fdsets", Value::Null).await.unwrap();
    assert!(
        fdsets.as_array().unwrap().iter().all(|s| s["fdset-id"] != set),
        "{fdsets}"
    );
    // Without oob negotiated fd passing works the same.
    drop(vm);
    let vm = vm_with(|b| b.connect_options(ConnectOptions::new().oob(false))).await;
    let info: Value = vm
        .client()
        .call_with(
            "add-fd",
            &json!({}),
            CallOptions::new().fds([temp_file(&dir, "c")]),
        )
        .await
        .unwrap();
    assert!(info["fd"].as_i64().unwrap() > 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_qemu_times_out_then_recovers_with_correct_replies() {
    let vm = vm().await;
    let c = vm.client();
    c.execute_raw("query-status", Value::Null).await.unwrap();
    vm.freeze().unwrap();
    let short = || CallOptions::new().timeout(Duration::from_millis(300));
    let err = within(10, c.call_with::<_, Value>("query-status", &(), short()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { command, .. } if command == "query-status"),
        "{err:?}"
    );
    // Writes have a deadline too: a command far larger than the socket
    // buffers cannot be written while QEMU is frozen.
    let big = json!({"command-line": format!("echo {}", "x".repeat(512 << 10))});
    let err = within(
        10,
        c.call_with::<_, Value>("human-monitor-command", &big, short()),
    )
    .await
    .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(!c.is_closed(), "a frozen QEMU is slow, not dead");
    vm.thaw().unwrap();
    // The next commands get their own replies, not the late ones.
    let kvm: Value = within(30, c.execute_raw("query-kvm", Value::Null)).await.unwrap();
    assert!(kvm.get("enabled").is_some(), "{kvm}");
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "prelaunch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_commands_in_flight_fails_them_all_at_once() {
    let mut vm = vm().await;
    let c = vm.client().clone();
    // Freeze QEMU so the commands are certainly in flight.
    vm.freeze().unwrap();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.execute_raw("query-status", Value::Null).await })
        })
        .collect();
    // Let them reach the connection task.
    tokio::task::yield_now().await;
    vm.kill();
    for call in calls {
        let err = within(10, call).await.unwrap().unwrap_err();
        assert!(err.is_disconnected(), "{err:?}");
    }
    within(10, c.closed()).await;
    let err = c.execute_raw("query-status", Value::Null).await.unwrap_err();
    assert!(err.is_disconnected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_sends_shutdown_then_closes() {
    let mut vm = vm().await;
    let c = vm.client().clone();
    let mut events = c.events();
    // QEMU may close the socket right after its reply; either way quit worked.
    match c.execute_raw("quit", Value::Null).await {
        Ok(_) => {}
        Err(e) => assert!(e.is_disconnected(), "{e:?}"),
    }
    let shutdown = within(10, events.next()).await.expect("SHUTDOWN before the end");
    assert_eq!(
        shutdown.known(),
        KnownEvent::Shutdown {
            guest: false,
            reason: "host-qmp-quit".into()
        }
    );
    let reason = within(10, c.closed()).await;
    assert!(reason.is_disconnected());
    // The connection itself remembers why QEMU went away.
    assert_eq!(
        c.shutdown_event().map(|e| e.data()["reason"].clone()),
        Some(json!("host-qmp-quit"))
    );
    assert!(
        within(10, events.next()).await.is_none(),
        "the stream ends after the disconnect"
    );
    assert!(vm.wait_exit(Duration::from_secs(10)).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_paths_longer_than_sun_path_work() {
    let vm = vm_with(|b| b.extra_qmp_socket("ctl")).await;
    let long_dir = vm.dir().join("d".repeat(70)).join("e".repeat(70));
    std::fs::create_dir_all(&long_dir).unwrap();
    let long = long_dir.join("q.sock");
    assert!(long.as_os_str().len() >= 150, "{}", long.display());
    // QEMU cannot bind such a path itself; a hard link reaches the same socket.
    std::fs::hard_link(vm.socket("ctl"), &long).unwrap();
    let c = within(10, Client::connect(&long)).await.unwrap();
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "prelaunch");
    assert_eq!(c.path(), long.as_path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_kb_ringbuf_read_reply_arrives_whole() {
    let vm = vm_with(|b| b.args(["-chardev", "ringbuf,id=rb0,size=16384"])).await;
    let c = vm.client();
    let data = "\u{1}".repeat(16384);
    c.call::<_, qmpkit::Empty>(
        "ringbuf-write",
        &json!({"device": "rb0", "data": data, "format": "utf8"}),
    )
    .await
    .unwrap();
    let out: String = c
        .call(
            "ringbuf-read",
            &json!({"device": "rb0", "size": 16384, "format": "utf8"}),
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 16384);
    assert!(out.chars().all(|ch| ch == '\u{1}'));
    // The same reply with a limit below its size is a clear error, and the
    // connection survives it.
    drop(vm);
    let vm = vm_with(|b| {
        b.args(["-chardev", "ringbuf,id=rb0,size=16384"])
            .connect_options(ConnectOptions::new().max_message_size(32 * 1024))
    })
    .await;
    let c = vm.client();
    c.call::<_, qmpkit::Empty>(
        "ringbuf-write",
        &json!({"device": "rb0", "data": data, "format": "utf8"}),
    )
    .await
    .unwrap();
    let result = c
        .call::<_, String>(
            "ringbuf-read",
            &json!({"device": "rb0", "size": 16384, "format": "utf8"}),
        )
        .await;
    match result {
        Err(Error::MessageTooLarge { limit: 32768, size }) => assert!(size > 32768, "{size}"),
        Err(other) => panic!("expected MessageTooLarge, got {other:?}"),
        Ok(text) => panic!("expected MessageTooLarge, got a reply of {} bytes", text.len()),
    }
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "prelaunch");
}

/// Checks that `line` reads `[TIME] KIND: ...` with TIME as Go's RFC 3339
/// prints it in UTC (the test machines' zone), and returns what follows "] ".
fn go_log_line(line: &str) -> &str {
    let (stamp, rest) = line
        .strip_prefix('[')
        .and_then(|l| l.split_once("] "))
        .unwrap_or_else(|| panic!("not a log line: {line:?}"));
    let shape: String = stamp
        .chars()
        .map(|c| if c.is_ascii_digit() { '9' } else { c })
        .collect();
    assert!(
        shape == "9999-99-99T99:99:99Z" || (shape.len() == 25 && shape.starts_with("9999-99-99T99:99:99")),
        "not Go's RFC 3339: {stamp:?}"
    );
    rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_log_records_commands_replies_and_events_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("qmp.log");
    let vm = vm_with(|b| {
        b.args(["-chardev", "ringbuf,id=rb0"])
            .connect_options(ConnectOptions::new().traffic_log(&log))
    })
    .await;
    let c = vm.client();
    c.execute_raw("stop", Value::Null).await.unwrap();
    // Its arguments serialise as qom-type, id, data, format: not sorted.
    c.add_secret("sec0", "hunter2").await.unwrap();
    let _: String = c
        .call("ringbuf-read", &json!({"device": "rb0", "size": 10}))
        .await
        .unwrap();
    // Passing a file: Go's SendFile does not log, and neither do we.
    c.send_file("fd0", std::fs::File::open("/dev/null").unwrap())
        .await
        .unwrap();
    // An error reply: logged, where Go logs none.
    c.execute_raw("no-such-command", Value::Null).await.unwrap_err();
    let mut events = c.events();
    c.execute_raw("cont", Value::Null).await.unwrap();
    within(10, events.wait_for("RESUME")).await.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();

    // Line by line, in Go's format: every reply is followed by an empty line.
    let mut lines = text.split('\n').peekable();
    let mut bodies = Vec::new();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            assert!(lines.peek().is_none(), "an empty line not after a reply: {text}");
            break;
        }
        let body = go_log_line(line);
        if body.starts_with("REPLY: ") {
            assert_eq!(lines.next(), Some(""), "no empty line after {line:?}: {text}");
        } else {
            assert!(
                body.starts_with("QUERY: ") || body.starts_with("Event: "),
                "{line:?}"
            );
        }
        bodies.push(body.to_owned());
    }
    // Requests as written (key order kept), secrets blanked in place.
    let id_of = |name: &str| {
        let prefix = format!("QUERY: {{\"execute\":\"{name}\"");
        let body = bodies
            .iter()
            .find(|b| b.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {name}: {text}"));
        body.rsplit_once("\"id\":")
            .unwrap()
            .1
            .trim_end_matches('}')
            .to_owned()
    };
    let stop = id_of("stop");
    assert!(
        bodies.contains(&format!("QUERY: {{\"execute\":\"stop\",\"id\":{stop}}}")),
        "{text}"
    );
    assert!(
        bodies.contains(&format!("REPLY: {{\"return\": {{}}, \"id\": {stop}}}")),
        "{text}"
    );
    let add = id_of("object-add");
    assert!(
        bodies.contains(&format!(
            "QUERY: {{\"execute\":\"object-add\",\"arguments\":{{\"qom-type\":\"secret\",\"id\":\"sec0\",\"data\":\"<redacted>\",\"format\":\"raw\"}},\"id\":{add}}}"
        )),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "secret leaked: {text}");
    assert!(!text.contains("ringbuf-read"), "excluded command logged: {text}");
    assert!(
        !text.contains("getfd"),
        "a call passing a file was logged: {text}"
    );
    let bad = id_of("no-such-command");
    assert!(
        bodies.iter().any(|b| b.starts_with("REPLY: {")
            && b.contains("\"error\"")
            && b.contains(&format!("\"id\": {bad}"))),
        "{text}"
    );
    assert!(
        bodies
            .iter()
            .any(|b| b.starts_with("Event: {") && b.contains("\"RESUME\"")),
        "{text}"
    );

    // A log in a missing directory is no log, not an error.
    let vm2 =
        vm_with(|b| b.connect_options(ConnectOptions::new().traffic_log(dir.path().join("no/such/dir/log"))))
            .await;
    vm2.client()
        .execute_raw("query-status", Value::Null)
        .await
        .unwrap();
}

#[test]
fn blocking_client_runs_commands_and_events_keep_flowing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vm = rt.block_on(vm_with(|b| b.extra_qmp_socket("sync")));
    // The blocking facade runs outside any runtime.
    let c = qmpkit::blocking::Client::connect(vm.socket("sync")).unwrap();
    let mut events = c.subscribe(qmpkit::EventFilter::names(["RESUME", "STOP"]));
    assert_eq!(
        c.execute_raw("query-status", Value::Null).unwrap()["status"],
        "prelaunch"
    );
    c.execute_raw("cont", Value::Null).unwrap();
    c.execute_raw("stop", Value::Null).unwrap();
    assert_eq!(events.blocking_next().unwrap().name(), "RESUME");
    assert_eq!(events.blocking_next().unwrap().name(), "STOP");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    assert_eq!(
                        c.execute_raw("query-status", Value::Null).unwrap()["status"],
                        "paused"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let err = c.execute_raw("nope", Value::Null).unwrap_err();
    assert!(err.is_not_found());
    c.disconnect();
    assert!(c.wait_closed().is_disconnected());
    drop(vm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_oob_runs_commands_that_allow_it() {
    let vm = vm().await;
    let c = vm.client();
    let schema = c.schema().await.unwrap();
    assert!(schema.has_command("query-status") && schema.command_names().len() > 100);
    assert!(
        schema.allows_oob("migrate-pause"),
        "QEMU 10 allows migrate-pause out of band"
    );
    assert!(!schema.allows_oob("query-status"));
    // migrate-pause outside a postcopy migration is refused, out of band.
    let err = c
        .call_with::<_, Value>("migrate-pause", &json!({}), CallOptions::new().oob(true))
        .await
        .unwrap_err();
    assert_eq!(err.class(), Some(&ErrorClass::GenericError), "{err:?}");
    // A command that does not allow OOB is refused by QEMU, not hung.
    let err = c
        .execute_json(r#"{"exec-oob": "query-status"}"#)
        .await
        .unwrap_err();
    assert!(err.is_qmp(), "{err:?}");
    // The connection carries on in band.
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "prelaunch");
    // Without oob negotiated the client refuses exec-oob itself.
    drop(vm);
    let vm = vm_with(|b| b.connect_options(ConnectOptions::new().oob(false))).await;
    let err = vm
        .client()
        .call_with::<_, Value>("migrate-pause", &json!({}), CallOptions::new().oob(true))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
}

/// True when the process is gone or a zombie (dead, not yet reaped).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_dies_with_the_process_that_launched_it() {
    const CHILD: &str = "QMP_TEST_LAUNCH_AND_HANG";
    if std::env::var_os(CHILD).is_some() {
        // The child's part: launch, say which pid, and hang until killed.
        let vm = vm().await;
        println!("QEMU-PID {}", vm.pid());
        std::future::pending::<()>().await;
    }
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "qemu_dies_with_the_process_that_launched_it",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let pid: u32 = tokio::task::spawn_blocking(move || {
        stdout
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("QEMU-PID ").and_then(|p| p.trim().parse().ok()))
    })
    .await
    .unwrap()
    .expect("the child launched QEMU");
    assert!(!dead(pid), "QEMU runs while its launcher does");
    // SIGKILL: no destructor runs in the child, yet QEMU must not survive it.
    child.kill().unwrap();
    child.wait().unwrap();
    common::eventually(10, || async { dead(pid).then_some(()) }).await;
}
