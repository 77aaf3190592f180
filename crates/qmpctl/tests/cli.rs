//! The qmpctl binary against real QEMU: each subcommand group, the tour, and
//! every kind of bad input, checked by exit code, by output, and by asking
//! QEMU back through the test's own connection.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_status_start_pause_reset_powerdown_quit() {
    let mut vm = vm().await;
    let c = vm.client().clone();
    let sock = vm.socket("cli");
    let log = vm.dir().join("traffic.log");

    let r = ctl(&sock, &["status"]).await.ok();
    assert_eq!(r.stdout.trim(), "prelaunch");
    let r = ctl(&sock, &["--json", "status"]).await.ok();
    assert_eq!(r.json()["status"], "prelaunch");

    let r = ctl(&sock, &["--log", log.to_str().unwrap(), "start"]).await.ok();
    assert_eq!(r.stdout.trim(), "running");
    assert_eq!(status(&c).await, "running");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("QUERY") && logged.contains("\"cont\""),
        "{logged}"
    );

    let r = ctl(&sock, &["pause"]).await.ok();
    assert_eq!(r.stdout.trim(), "paused");
    assert_eq!(status(&c).await, "paused");

    let mut events = c.subscribe(qmpkit::EventFilter::names(["RESET", "POWERDOWN"]));
    ctl(&sock, &["reset"]).await.ok();
    let e = within(10, events.next()).await.unwrap();
    assert_eq!(e.name(), "RESET");
    assert_eq!(e.data()["reason"], "host-qmp-system-reset");
    let r = ctl(&sock, &["powerdown"]).await.ok();
    assert!(r.stdout.contains("power button pressed"), "{}", r.stdout);
    assert_eq!(within(10, events.next()).await.unwrap().name(), "POWERDOWN");

    let r = ctl(&sock, &["quit"]).await.ok();
    assert_eq!(r.stdout.trim(), "QEMU has quit");
    assert!(
        vm.wait_exit(Duration::from_secs(10)).await.is_some(),
        "QEMU still runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpus_and_memory() {
    let vm = vm().await;
    let c = vm.client().clone();
    let sock = vm.socket("cli");

    let cpus: Value = c.call("query-cpus-fast", &()).await.unwrap();
    let thread = cpus[0]["thread-id"].to_string();
    let r = ctl(&sock, &["cpus"]).await.ok();
    let row = r.stdout.lines().nth(1).expect("a CPU row");
    assert!(row.starts_with("0 ") && row.contains(&thread), "{}", r.stdout);
    let r = ctl(&sock, &["--json", "cpus", "--hotpluggable"]).await.ok();
    let slots = r.json();
    assert_eq!(slots.as_array().unwrap().len(), 2, "1 plugged + 1 free: {slots}");
    assert_eq!(
        slots
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["qom-path"].is_null())
            .count(),
        1
    );

    let r = ctl(&sock, &["memory"]).await.ok();
    assert!(r.stdout.contains("base memory:    128 MiB"), "{}", r.stdout);
    let r = ctl(&sock, &["memory", "balloon"]).await.ok();
    assert_eq!(r.stdout.trim(), "balloon: guest has 128 MiB");
    let r = ctl(&sock, &["memory", "balloon", "96M"]).await.ok();
    assert!(r.stdout.contains("balloon target set to 96 MiB"), "{}", r.stdout);
    let r = ctl(&sock, &["memory", "balloon", "12 parsecs"]).await;
    r.fails(2, "invalid size");

    let r = ctl(&sock, &["memory", "devices"]).await.ok();
    assert_eq!(r.stdout.trim(), "no memory devices");
    let _: Value = c
        .call(
            "object-add",
            &json!({"qom-type": "memory-backend-ram", "id": "mem1", "size": 128u64 << 20}),
        )
        .await
        .unwrap();
    let _: Value = c
        .call(
            "device_add",
            &json!({"driver": "pc-dimm", "id": "dimm1", "memdev": "mem1"}),
        )
        .await
        .unwrap();
    let r = ctl(&sock, &["memory", "devices"]).await.ok();
    assert!(
        r.stdout.contains("dimm1") && r.stdout.contains("128 MiB"),
        "{}",
        r.stdout
    );
    let r = ctl(&sock, &["memory", "size"]).await.ok();
    assert!(r.stdout.contains("plugged memory: 128 MiB"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_devices_snapshots_jobs_resize_throttle() {
    let vm = vm().await;
    let c = vm.client().clone();
    let sock = vm.socket("cli");
    let dir = vm.dir().to_owned();
    let base = dir.join("base.qcow2");
    let copy = dir.join("copy.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", copy.to_str().unwrap(), "64M"]);

    ctl(&sock, &["block", "list"]).await.ok();
    let r = ctl(&sock, &["block", "add", "disk1", base.to_str().unwrap()])
        .await
        .ok();
    assert!(r.stdout.contains("added disk disk1"), "{}", r.stdout);
    assert_eq!(device_node(&c, "disk1").await.as_deref(), Some("disk1"));
    let r = ctl(&sock, &["block", "list"]).await.ok();
    assert!(
        r.stdout.contains("disk1") && r.stdout.contains("64 MiB"),
        "{}",
        r.stdout
    );
    let r = ctl(&sock, &["block", "nodes"]).await.ok();
    assert!(r.stdout.contains(base.to_str().unwrap()), "{}", r.stdout);
    let r = ctl(&sock, &["--json", "block", "stats"]).await.ok();
    assert!(r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["node-name"] == "disk1"));

    let overlay = dir.join("overlay.qcow2");
    ctl(&sock, &["block", "snapshot", "disk1", overlay.to_str().unwrap()])
        .await
        .ok();
    assert_eq!(device_node(&c, "disk1").await.as_deref(), Some("disk1-snap"));
    assert!(overlay.exists());

    let r = ctl(&sock, &["block", "commit", "disk1-snap"]).await.ok();
    assert!(
        r.stdout.contains("commit of disk1-snap completed"),
        "{}",
        r.stdout
    );
    assert!(
        !r.stderr.contains('['),
        "no progress bar when piped: {}",
        r.stderr
    );
    assert_eq!(device_node(&c, "disk1").await.as_deref(), Some("disk1"));

    ctl(
        &sock,
        &["block", "add", "copy", copy.to_str().unwrap(), "--no-device"],
    )
    .await
    .ok();
    let r = ctl(&sock, &["block", "mirror", "disk1", "copy"]).await.ok();
    assert!(
        r.stdout
            .contains("mirror of disk1 completed: copy took its place"),
        "{}",
        r.stdout
    );
    assert_eq!(device_node(&c, "disk1").await.as_deref(), Some("copy"));
    let r = ctl(&sock, &["block", "jobs"]).await.ok();
    assert_eq!(r.stdout.trim(), "no jobs");

    ctl(&sock, &["block", "resize", "copy", "128M"]).await.ok();
    let nodes: Value = c
        .call("query-named-block-nodes", &json!({"flat": true}))
        .await
        .unwrap();
    let size = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "copy")
        .map(|n| n["image"]["virtual-size"].clone());
    assert_eq!(size, Some(json!(128u64 << 20)));

    ctl(
        &sock,
        &[
            "block",
            "throttle",
            "disk1",
            "--bps-read",
            "1000000",
            "--iops-write",
            "50",
        ],
    )
    .await
    .ok();
    let blocks: Value = c.call("query-block", &()).await.unwrap();
    let ins = &blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"] == "disk1")
        .unwrap()["inserted"];
    assert_eq!(
        (ins["bps_rd"].clone(), ins["iops_wr"].clone()),
        (json!(1000000), json!(50))
    );

    ctl(&sock, &["block", "remove", "disk1"]).await.ok();
    assert_eq!(device_node(&c, "disk1").await, None);
    ctl(&sock, &["block", "remove", "nothere"])
        .await
        .fails(3, "nothere");
    ctl(&sock, &["block", "commit", "nothere"])
        .await
        .fails(3, "nothere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_export_read_back() {
    let vm = vm().await;
    let c = vm.client().clone();
    let sock = vm.socket("cli");
    let dir = vm.dir().to_owned();
    let raw = dir.join("d.raw");
    let mut data = vec![0u8; 1 << 20];
    data[..4096].fill(0xab);
    std::fs::write(&raw, &data).unwrap();
    ctl(
        &sock,
        &[
            "block",
            "add",
            "d",
            raw.to_str().unwrap(),
            "--format",
            "raw",
            "--no-device",
        ],
    )
    .await
    .ok();

    let nbd = dir.join("nbd.sock");
    ctl(&sock, &["nbd", "export", "d"])
        .await
        .fails(3, "NBD server not running");
    ctl(&sock, &["nbd", "start", nbd.to_str().unwrap()]).await.ok();
    let r = ctl(&sock, &["nbd", "export", "d"]).await.ok();
    assert_eq!(r.stdout.trim(), "exported d");
    let r = ctl(&sock, &["nbd", "list"]).await.ok();
    assert!(
        r.stdout.lines().any(|l| l.starts_with("d ") && l.contains("nbd")),
        "{}",
        r.stdout
    );

    let out = dir.join("out.raw");
    qemu_img(&[
        "dd",
        "-f",
        "raw",
        "-O",
        "raw",
        "bs=4096",
        "count=2",
        &format!("if=nbd+unix:///d?socket={}", nbd.display()),
        &format!("of={}", out.display()),
    ]);
    let back = std::fs::read(&out).unwrap();
    assert!(back[..4096].iter().all(|b| *b == 0xab) && back[4096..8192].iter().all(|b| *b == 0));

    ctl(&sock, &["nbd", "export", "nonode"]).await.fails(3, "nonode");
    ctl(&sock, &["nbd", "unexport", "d"]).await.ok();
    let exports: Value = within(10, async {
        loop {
            let v: Value = c.call("query-block-exports", &()).await.unwrap();
            if v.as_array().unwrap().is_empty() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(exports, json!([]));
    ctl(&sock, &["nbd", "stop"]).await.ok();
    ctl(&sock, &["nbd", "stop"])
        .await
        .fails(3, "NBD server not running");
    // Over TCP, on a port the kernel picks: QEMU really listens (a second
    // start is refused while it does), and stops.
    ctl(&sock, &["nbd", "start", "--tcp", "127.0.0.1:0"]).await.ok();
    ctl(&sock, &["nbd", "start", "--tcp", "127.0.0.1:0"])
        .await
        .fails(3, "already running");
    ctl(&sock, &["nbd", "stop"]).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_chardevs_and_nics() {
    let vm = vm().await;
    let c = vm.client().clone();
    let sock = vm.socket("cli");

    ctl(&sock, &["device", "add", "usb-tablet", "--id", "tab0"])
        .await
        .ok();
    assert!(peripherals(&c).await.contains(&"tab0".to_owned()));
    let r = ctl(&sock, &["device", "list"]).await.ok();
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("tab0") && l.contains("usb-tablet")),
        "{}",
        r.stdout
    );
    ctl(&sock, &["device", "remove", "tab0"]).await.ok();
    assert!(!peripherals(&c).await.contains(&"tab0".to_owned()));
    ctl(&sock, &["device", "remove", "tab0"]).await.fails(3, "tab0");
    ctl(&sock, &["device", "add", "no-such-driver", "--id", "x"])
        .await
        .fails(3, "no-such-driver");

    ctl(&sock, &["chardev", "add", "log0", "ringbuf", "size=4096"])
        .await
        .ok();
    let r = ctl(&sock, &["chardev", "list"]).await.ok();
    assert!(r.stdout.contains("log0"), "{}", r.stdout);
    let chardevs: Value = c.call("query-chardev", &()).await.unwrap();
    assert!(chardevs.as_array().unwrap().iter().any(|c| c["label"] == "log0"));
    ctl(&sock, &["chardev", "remove", "log0"]).await.ok();
    let chardevs: Value = c.call("query-chardev", &()).await.unwrap();
    assert!(!chardevs.as_array().unwrap().iter().any(|c| c["label"] == "log0"));
    ctl(&sock, &["chardev", "remove", "log0"]).await.fails(3, "log0");

    ctl(
        &sock,
        &[
            "nic",
            "add",
            "net1",
            "--model",
            "usb-net",
            "--mac",
            "52:54:00:aa:bb:cc",
        ],
    )
    .await
    .ok();
    let mac: Value = c
        .call(
            "qom-get",
            &json!({"path": "/machine/peripheral/net1", "property": "mac"}),
        )
        .await
        .unwrap();
    assert_eq!(mac, "52:54:00:aa:bb:cc");
    ctl(&sock, &["nic", "link", "net1", "down"]).await.ok();
    ctl(&sock, &["nic", "link", "nonic", "down"])
        .await
        .fails(3, "nonic");
    ctl(&sock, &["nic", "remove", "net1"]).await.ok();
    assert!(!peripherals(&c).await.contains(&"net1".to_owned()));
    // The backend went too: its id is free again.
    let _: Value = c
        .call("netdev_add", &json!({"type": "user", "id": "net1"}))
        .await
        .unwrap();
    ctl(&sock, &["nic", "add", "net2", "--model", "no-such-nic"])
        .await
        .fails(3, "no-such-nic");
    // A failed device_add leaves no backend behind.
    let _: Value = c
        .call("netdev_add", &json!({"type": "user", "id": "net2"}))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_screendump_and_memory_dump() {
    let vm = vm().await;
    let c = vm.client().clone();
    let sock = vm.socket("cli");
    let dir = vm.dir().to_owned();

    let _: Value = c
        .call(
            "ringbuf-write",
            &json!({"device": "console0", "data": "login: \u{e9}t\u{e9}\n"}),
        )
        .await
        .unwrap();
    let r = ctl(&sock, &["console"]).await.ok();
    assert_eq!(r.stdout, "login: \u{e9}t\u{e9}\n");
    let r = ctl(&sock, &["console"]).await.ok();
    assert_eq!(r.stdout, "", "reading drains the buffer");
    ctl(&sock, &["console", "nosuch"])
        .await
        .fails(3, "couldn't be found");
    ctl(&sock, &["console", "compat_monitor0"])
        .await
        .fails(3, "isn't a ring buffer");

    let png = dir.join("screen.png");
    let r = ctl(&sock, &["screendump", png.to_str().unwrap()]).await.ok();
    assert!(r.stdout.contains("640x480"), "{}", r.stdout);
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    let ppm = dir.join("screen.ppm");
    ctl(&sock, &["screendump", ppm.to_str().unwrap(), "--format", "ppm"])
        .await
        .ok();
    assert!(std::fs::read(&ppm).unwrap().starts_with(b"P6\n640 480"));
    ctl(&sock, &["screendump", "/nonexistent/dir/x.png"])
        .await
        .fails(3, "nonexistent");

    let dump = dir.join("mem.elf");
    let r = ctl(&sock, &["--json", "dump-memory", dump.to_str().unwrap()])
        .await
        .ok();
    assert_eq!(r.json()["result"]["status"], "completed");
    let head = std::fs::read(&dump).unwrap();
    assert!(head.starts_with(b"\x7fELF") && head.len() > 128 << 20);
    let status: Value = c.call("query-dump", &()).await.unwrap();
    assert_eq!(status["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_to_a_path_and_to_an_fd() {
    let source = vm().await;
    let target = vm_with(&["-incoming", "defer"]).await;
    let mig = target.dir().join("mig.sock");

    let r = ctl(
        &target.socket("cli"),
        &["migrate", "incoming", mig.to_str().unwrap()],
    )
    .await
    .ok();
    assert!(r.stdout.contains("waiting for a migration"), "{}", r.stdout);
    ctl(&source.socket("cli"), &["start"]).await.ok();
    let r = ctl(&source.socket("cli"), &["migrate", "to", mig.to_str().unwrap()])
        .await
        .ok();
    assert!(
        r.stdout.contains("completed") && r.stdout.contains("RAM sent"),
        "{}",
        r.stdout
    );
    let info: Value = source.client().call("query-migrate", &()).await.unwrap();
    assert_eq!(info["status"], "completed");
    incoming_completed(target.client()).await;
    let r = ctl(&target.socket("cli"), &["migrate", "status"]).await.ok();
    assert!(r.stdout.starts_with("status: completed"), "{}", r.stdout);

    // The same through a file descriptor: the test connects to the second
    // target and hands the connection to qmpctl as its stdin, fd 0.
    let source2 = vm().await;
    let target2 = vm_with(&["-incoming", "defer"]).await;
    let mig2 = target2.dir().join("mig.sock");
    ctl(
        &source2.socket("cli"),
        &["migrate", "to", "/nonexistent/mig.sock"],
    )
    .await
    .fails(
        1,
        "migration ended as failed: Failed to connect to '/nonexistent/mig.sock'",
    );
    ctl(
        &target2.socket("cli"),
        &["migrate", "incoming", mig2.to_str().unwrap()],
    )
    .await
    .ok();
    let conn = std::os::unix::net::UnixStream::connect(&mig2).unwrap();
    let r = ctl_with_stdin_fd(
        &source2.socket("cli"),
        &["migrate", "to", "--fd", "0"],
        conn.into(),
    )
    .await
    .ok();
    assert!(
        r.stdout.contains("migration to fd:qmpctl-migration completed"),
        "{}",
        r.stdout
    );
    incoming_completed(target2.client()).await;
    ctl(&source2.socket("cli"), &["migrate", "to", "--fd", "77"])
        .await
        .fails(2, "--fd 77");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_anything_and_explains_bad_input() {
    let vm = vm().await;
    let sock = vm.socket("cli");

    let r = ctl(&sock, &["exec", "query-status"]).await.ok();
    assert_eq!(r.json()["status"], "prelaunch");
    let r = ctl(&sock, &["--json", "exec", "query-name"]).await.ok();
    assert_eq!(r.stdout.trim(), "{}");
    ctl(
        &sock,
        &["exec", "ringbuf-write", r#"{"device": "console0", "data": "a"}"#],
    )
    .await
    .ok();
    ctl(&sock, &["exec", "ringbuf-write", "device=console0", "data=b"])
        .await
        .ok();
    let r = ctl_stdin(
        &sock,
        &["exec", "ringbuf-read", "-"],
        r#"{"device": "console0", "size": 10}"#,
    )
    .await
    .ok();
    assert_eq!(r.json(), "ab");

    let r = ctl(&sock, &["exec", "ringbuf-write", r#"{"device" "console0"}"#]).await;
    r.fails(2, "line 1 column 11");
    assert!(
        r.stderr.contains("{\"device\" \"console0\"}\n            ^"),
        "{}",
        r.stderr
    );
    let r = ctl_stdin(
        &sock,
        &["exec", "ringbuf-write", "-"],
        "{\n  \"device\": \"console0\",\n  \"data\": x\n}",
    )
    .await;
    r.fails(2, "line 3 column 11");
    ctl(&sock, &["exec", "ringbuf-write", "[1, 2]"])
        .await
        .fails(2, "must be a JSON object");
    ctl(&sock, &["exec", "ringbuf-write", "device"])
        .await
        .fails(2, "not key=value");

    let r = ctl(&sock, &["exec", "query-stauts"]).await;
    r.fails(2, "unknown command \"query-stauts\"");
    assert!(
        r.stderr.contains("did you mean one of query-status"),
        "{}",
        r.stderr
    );
    ctl(&sock, &["exec", "device_del", r#"{"id": "nope"}"#])
        .await
        .fails(3, "Device 'nope' not found (DeviceNotFound)");
    ctl(&sock, &["exec", "ringbuf-write", "{}"])
        .await
        .fails(3, "'device' is missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_filter_count_until() {
    let vm = vm().await;
    let c = vm.client().clone();
    let sock = vm.socket("cli");

    let _: Value = c.call("cont", &()).await.unwrap();
    // The stream may subscribe after the first pokes: poke until it ends.
    // Each poke also plugs and unplugs a tablet, whose DEVICE_DELETED the
    // filter must keep out.
    let tablet = json!({"driver": "usb-tablet", "id": "tab"});
    let pokes = [
        ("device_add", tablet),
        ("device_del", json!({"id": "tab"})),
        ("stop", Value::Null),
        ("cont", Value::Null),
    ];
    let mut stream = Stream::spawn(&sock, &["events", "--filter", "STOP", "--until", "RESUME"]);
    stream.poke_until(&c, &pokes, usize::MAX).await;
    let r = stream.finish().await.ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines.last().unwrap().ends_with(" RESUME"), "{}", r.stdout);
    assert!(
        lines[..lines.len() - 1].iter().all(|l| l.ends_with(" STOP")),
        "{}",
        r.stdout
    );
    assert!(
        !r.stdout.contains("DEVICE_DELETED"),
        "the filter let DEVICE_DELETED through: {}",
        r.stdout
    );

    let mut stream = Stream::spawn(&sock, &["--json", "events", "--count", "3"]);
    stream.poke_until(&c, &pokes[2..], usize::MAX).await;
    let r = stream.finish().await.ok();
    let events: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{}", r.stdout);
    assert!(events
        .iter()
        .all(|e| e["event"].is_string() && e["timestamp"]["seconds"].is_i64()));

    ctl(&sock, &["events", "--filter", "STOPP"])
        .await
        .fails(2, "did you mean STOP");

    // QEMU goes away before the stream has what it asked for.
    let mut stream = Stream::spawn(&sock, &["events", "--count", "1000"]);
    stream.poke_until(&c, &pokes[2..], 1).await;
    let _: Value = c.call("quit", &()).await.unwrap();
    let r = stream.finish().await;
    r.fails(4, "the connection closed after");
    assert!(r.stdout.contains("SHUTDOWN"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    let r = ctl(&file, &["status"]).await;
    r.fails(4, "is not a socket (it is a regular file)");

    let r = ctl(&dir.path().join("missing.sock"), &["status"]).await;
    r.fails(4, "the file does not exist");

    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    ctl(&stale, &["status"]).await.fails(4, "nobody is listening");

    let vm = vm().await;
    let held = vm.socket("cli");
    let holder = qmpkit::Client::connect(&held).await.unwrap();
    let r = ctl(&held, &["--connect-timeout", "300ms", "status"]).await;
    r.fails(4, "another client probably holds the socket");
    holder.disconnect();
    within(10, holder.closed()).await;

    let r = run_ctl(&["status"], None, None).await;
    r.fails(2, "no QMP socket: give --socket PATH");
    run_ctl(&["--frobnicate"], None, None)
        .await
        .fails(2, "--frobnicate");
    run_ctl(&["--launch", "--socket", "/x", "status"], None, None)
        .await
        .fails(2, "cannot be used with");

    // A wait that outlives --timeout: a migration that never comes.
    let target = vm_with(&["-incoming", "defer"]).await;
    let mig = target.dir().join("mig.sock");
    let r = ctl(
        &target.socket("cli"),
        &[
            "--timeout",
            "300ms",
            "migrate",
            "incoming",
            mig.to_str().unwrap(),
            "--wait",
        ],
    )
    .await;
    r.fails(5, "timed out after 300 ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_shell_script_and_broken_pipe() {
    let r = run_ctl(&["--launch", "status"], None, None).await.ok();
    assert_eq!(r.stdout.trim(), "prelaunch");
    let r = run_ctl(
        &[
            "--launch",
            "--qemu-arg",
            "-name",
            "--qemu-arg",
            "scratch",
            "exec",
            "query-name",
        ],
        None,
        None,
    )
    .await
    .ok();
    assert_eq!(r.json()["name"], "scratch");

    // The shell reads commands from a pipe, one per line.
    let script = "# a comment\nquery-status\nstop\ncont\n{\"execute\": \"query-status\"}\n";
    let r = run_ctl(&["--launch", "--json", "shell"], Some(script), None)
        .await
        .ok();
    let replies: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replies[0]["status"], "prelaunch");
    assert_eq!(replies[3]["status"], "running");
    let r = run_ctl(&["--launch", "shell"], Some("query-status\nquery-stauts\n"), None).await;
    r.fails(2, "line 2: query-stauts");

    // A reader that goes away early ends qmpctl quietly, with success.
    let r = run_ctl(&["--launch", "exec", "query-qmp-schema"], None, Some(100)).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launched_qemu_goes_away_with_sigterm() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    // The shell reading a pipe runs each line as it arrives: the reply
    // shows that qmpctl and its QEMU are up.
    let mut child = spawn_with_stdin(&["--launch", "--json", "shell"]);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"query-status\n").await.unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let reply = within(30, out.next_line()).await.unwrap().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&reply).unwrap()["status"],
        "prelaunch"
    );
    let pid = child.id().unwrap();
    let qemu: Vec<u32> = children(pid)
        .into_iter()
        .filter(|c| std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| n.starts_with("qemu")))
        .collect();
    assert_eq!(qemu.len(), 1, "one QEMU child: {qemu:?}");

    let target = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(target, rustix::process::Signal::TERM).unwrap();
    let r = finish(child).await;
    // --json: the error is one JSON object.
    let e = json_error(&r, 130);
    assert_eq!(e["kind"], "interrupted");
    assert_eq!(e["message"], "interrupted by SIGTERM");
    within(10, async {
        while alive(qemu[0]) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(stdin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tour_walks_every_step() {
    let keep = tempfile::tempdir().unwrap();
    let r = run_ctl(&["tour", "--keep", keep.path().to_str().unwrap()], None, None)
        .await
        .ok();
    for step in [
        "connect and handshake",
        "status, and starting the CPUs",
        "CPUs and memory",
        "hotplug a disk",
        "external snapshot",
        "commit the snapshot",
        "NBD",
        "screendump",
        "events as they arrive",
        "guest agent",
        "unplug the disk",
        "live migration",
        "quit both VMs",
    ] {
        assert!(r.stdout.contains(step), "missing step {step}: {}", r.stdout);
    }
    assert_eq!(r.stdout.matches("        ok (").count(), 14, "{}", r.stdout);
    assert!(r.stdout.contains("tour complete: 14 steps"), "{}", r.stdout);
    assert!(
        r.stdout.contains("MIGRATION events on the source: setup"),
        "{}",
        r.stdout
    );
    assert!(keep.path().join("tour-screen.png").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_takes_tcp_addresses_and_says_which_form_it_understood() {
    let vm = qmpkit::launch::QemuBuilder::new()
        .qmp_tcp()
        .extra_qmp_socket("control")
        .spawn()
        .await
        .unwrap();
    let control = qmpkit::Client::connect(vm.socket("control")).await.unwrap();
    let qmpkit::Address::Tcp(tcp) = vm.qmp_address().clone() else {
        unreachable!("launched with qmp_tcp")
    };
    // QEMU serves one client per monitor: the launcher's leaves first.
    vm.client().disconnect();
    within(10, vm.client().closed()).await;

    let bare = std::path::PathBuf::from(&tcp);
    let r = ctl(&bare, &["status"]).await.ok();
    assert_eq!(r.stdout.trim(), "prelaunch");
    let prefixed = std::path::PathBuf::from(format!("tcp:{tcp}"));
    ctl(&prefixed, &["start"]).await.ok();
    assert_eq!(status(&control).await, "running");
    // fd passing cannot work over TCP: refused, and nothing reached QEMU.
    let file = std::fs::File::create(vm.dir().join("state")).unwrap();
    let r = ctl_with_stdin_fd(&bare, &["migrate", "to", "--fd", "0"], file.into()).await;
    r.fails(2, "cannot pass file descriptors over TCP");
    let mig: Value = control.call("query-migrate", &()).await.unwrap();
    assert!(mig.get("status").is_none(), "{mig}");

    // A closed port, a name that does not resolve, a bad tcp: address,
    // and a path that only looks like HOST:PORT: each says how it was read.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let r = ctl(std::path::Path::new(&format!("127.0.0.1:{port}")), &["status"]).await;
    r.fails(
        4,
        &format!("nobody is listening on tcp:127.0.0.1:{port} (read as a TCP address HOST:PORT"),
    );
    let r = ctl(std::path::Path::new("no-such-host.invalid:4445"), &["status"]).await;
    r.fails(4, "cannot resolve the host of tcp:no-such-host.invalid:4445");
    let r = ctl(std::path::Path::new("tcp:127.0.0.1"), &["status"]).await;
    r.fails(
        2,
        "invalid QMP address \"tcp:127.0.0.1\": a TCP address needs a port",
    );
    let r = ctl(std::path::Path::new("./127.0.0.1:4445"), &["status"]).await;
    r.fails(4, "the file does not exist (read as a Unix socket path");
    let r = ctl(std::path::Path::new("unix:127.0.0.1:4445"), &["status"]).await;
    r.fails(
        4,
        "no QMP socket at 127.0.0.1:4445: the file does not exist (read as a Unix socket path",
    );
}

/// Parses the one JSON error object `--json` prints on stderr.
#[track_caller]
fn json_error(r: &Run, code: i32) -> Value {
    assert_eq!(r.code, code, "stdout: {} stderr: {}", r.stdout, r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "not one line: {}", r.stderr);
    let v: Value = serde_json::from_str(&r.stderr).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.stderr));
    assert_eq!(v["error"]["exit_code"], code, "{v}");
    assert!(
        v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    v["error"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_errors_name_kind_class_and_exit_code() {
    let vm = vm().await;
    let sock = vm.socket("cli");

    // QEMU's error: its class comes through.
    let e = json_error(&ctl(&sock, &["--json", "exec", "device_del", "id=nope"]).await, 3);
    assert_eq!(e["kind"], "qmp");
    assert_eq!(e["class"], "DeviceNotFound");
    assert!(e["message"].as_str().unwrap().contains("nope"), "{e}");

    // Bad input found before anything is sent: no class.
    let e = json_error(
        &ctl(&sock, &["--json", "exec", "blockdev-add", "driver=qcow3"]).await,
        2,
    );
    assert_eq!(e["kind"], "usage");
    assert!(e["class"].is_null());
    assert!(
        e["message"].as_str().unwrap().contains("did you mean qcow2"),
        "{e}"
    );

    // Options clap refuses, and a socket that is not there.
    let e = json_error(&ctl(&sock, &["--json", "--no-such-option", "status"]).await, 2);
    assert_eq!(e["kind"], "usage");
    let missing = vm.dir().join("missing.sock");
    let e = json_error(&ctl(&missing, &["--json", "status"]).await, 4);
    assert_eq!(e["kind"], "connection");

    // Without --json the same error is text.
    ctl(&sock, &["exec", "device_del", "id=nope"])
        .await
        .fails(3, "nope");
    // QEMU is still there and unchanged.
    assert_eq!(status(vm.client()).await, "prelaunch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_end_on_timeout_quit_and_kill() {
    let mut vm = vm().await;
    let c = vm.client().clone();
    let sock = vm.socket("cli");
    let pokes = [("stop", Value::Null), ("cont", Value::Null)];

    // --timeout bounds the stream: an open-ended one ends with success, one
    // that waits for more than arrived is a timeout.
    let r = within(30, ctl(&sock, &["--timeout", "1s", "events"])).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    within(30, ctl(&sock, &["--timeout", "1s", "events", "--count", "1000"]))
        .await
        .fails(5, "--timeout");

    // QEMU quits (SHUTDOWN, then the socket closes): success.
    let mut stream = Stream::spawn(&sock, &["events"]);
    stream.poke_until(&c, &pokes, 1).await;
    let _: Value = c.call("quit", &()).await.unwrap();
    let r = stream.finish().await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("SHUTDOWN"), "{}", r.stdout);

    // QEMU vanishes without a word (kill -9): a failure that says so.
    let mut vm2 = support::vm().await;
    let c2 = vm2.client().clone();
    let sock2 = vm2.socket("cli");
    let mut stream = Stream::spawn(&sock2, &["events", "--filter", "STOP"]);
    stream.poke_until(&c2, &pokes, 1).await;
    vm2.kill();
    let r = stream.finish().await;
    r.fails(4, "QEMU went away without a SHUTDOWN event");
    assert!(r.stdout.contains("STOP"), "{}", r.stdout);
    vm.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_colour_when_piped_and_piped_shell_exit_status() {
    let vm = vm().await;
    let c = vm.client().clone();
    let sock = vm.socket("cli");
    let _: Value = c.call("cont", &()).await.unwrap();

    // Debug logs and errors on a pipe: plain text, no escape codes.
    let r = ctl(&sock, &["-vv", "status"]).await.ok();
    assert!(
        r.stderr.contains("DEBUG") || r.stderr.contains("TRACE"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains('\x1b'), "colour on a pipe: {:?}", r.stderr);
    let r = ctl(&sock, &["--no-such-option"]).await;
    assert_eq!(r.code, 2);
    assert!(!r.stderr.contains('\x1b'), "colour on a pipe: {:?}", r.stderr);
    let r = ctl_env(&sock, &["-vv", "status"], &[("NO_COLOR", "1")])
        .await
        .ok();
    assert!(!r.stderr.contains('\x1b'), "{:?}", r.stderr);

    // Stop at the first failure (default): `stop` never runs.
    let script = "query-status\nquery-stauts\nstop\n";
    let r = ctl_stdin(&sock, &["shell"], script).await;
    r.fails(2, "line 2: query-stauts");
    assert_eq!(status(&c).await, "running");

    // --keep-going runs every line; the status is the first failure's.
    let script = "query-status\nquery-stauts\ndevice_del id=nope\nstop\n";
    let r = ctl_stdin(&sock, &["shell", "--keep-going"], script).await;
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("line 2: query-stauts"), "{}", r.stderr);
    assert!(r.stderr.contains("line 3: device_del"), "{}", r.stderr);
    assert!(r.stderr.contains("2 of the commands failed"), "{}", r.stderr);
    assert_eq!(status(&c).await, "paused");

    // With --json each failure is a JSON line on stderr.
    let r = ctl_stdin(
        &sock,
        &["--json", "shell", "--keep-going"],
        "device_del id=nope\ncont\n",
    )
    .await;
    assert_eq!(r.code, 3);
    let e: Value = serde_json::from_str(r.stderr.trim()).unwrap();
    assert_eq!(e["error"]["class"], "DeviceNotFound");
    assert_eq!(status(&c).await, "running");

    // Every line succeeded: 0.
    ctl_stdin(&sock, &["shell", "--keep-going"], "stop\nquery-status\n")
        .await
        .ok();
    assert_eq!(status(&c).await, "paused");
}

/// A node of query-named-block-nodes, by name.
async fn named_node(c: &qmpkit::Client, name: &str) -> Option<Value> {
    let nodes: Value = c
        .call("query-named-block-nodes", &json!({"flat": true}))
        .await
        .unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == name)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_arguments_take_their_types_from_the_schema() {
    let vm = vm().await;
    let c = vm.client().clone();
    let sock = vm.socket("cli");
    let img = vm.dir().join("a.qcow2");
    let img2 = vm.dir().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", img2.to_str().unwrap(), "64M"]);

    // Strings that look like numbers stay strings.
    ctl(
        &sock,
        &["exec", "object-add", "qom-type=secret", "id=s1", "data=1234"],
    )
    .await
    .ok();
    ctl(&sock, &["exec", "chardev-add", "id=7", "backend.type=null"])
        .await
        .ok();
    let objects: Value = c.call("qom-list", &json!({"path": "/objects"})).await.unwrap();
    assert!(
        objects.as_array().unwrap().iter().any(|o| o["name"] == "s1"),
        "{objects}"
    );
    let chardevs: Value = c.call("query-chardev", &()).await.unwrap();
    assert!(
        chardevs.as_array().unwrap().iter().any(|d| d["label"] == "7"),
        "{chardevs}"
    );

    // A union (driver selects the members), a boolean, nested objects.
    let file = format!("file.filename={}", img.display());
    ctl(
        &sock,
        &[
            "exec",
            "blockdev-add",
            "driver=qcow2",
            "node-name=n1",
            "read-only=on",
            "file.driver=file",
            &file,
        ],
    )
    .await
    .ok();
    let n1 = named_node(&c, "n1").await.expect("n1 added");
    assert_eq!(n1["drv"], "qcow2");
    assert_eq!(n1["ro"], true);

    // An integer; a list through a union (a transaction's actions).
    let file2 = format!("file.filename={}", img2.display());
    ctl(
        &sock,
        &[
            "exec",
            "blockdev-add",
            "driver=qcow2",
            "node-name=n2",
            "file.driver=file",
            &file2,
        ],
    )
    .await
    .ok();
    ctl(&sock, &["exec", "block_resize", "node-name=n2", "size=134217728"])
        .await
        .ok();
    ctl(
        &sock,
        &[
            "exec",
            "transaction",
            "actions.0.type=block-dirty-bitmap-add",
            "actions.0.data.node=n2",
            "actions.0.data.name=b0",
            "actions.0.data.persistent=no",
        ],
    )
    .await
    .ok();
    let n2 = named_node(&c, "n2").await.unwrap();
    assert_eq!(n2["image"]["virtual-size"], 134217728, "{n2}");
    assert!(
        n2["dirty-bitmaps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"] == "b0"),
        "{n2}"
    );

    // key:=JSON passes verbatim.
    ctl(
        &sock,
        &["exec", "object-add", "qom-type=secret", "id=s2", "data:=\"x\""],
    )
    .await
    .ok();
    let objects: Value = c.call("qom-list", &json!({"path": "/objects"})).await.unwrap();
    assert!(
        objects.as_array().unwrap().iter().any(|o| o["name"] == "s2"),
        "{objects}"
    );

    // Wrong values are refused before anything is sent.
    ctl(&sock, &["exec", "blockdev-add", "driver=qcow3", "node-name=n3"])
        .await
        .fails(2, "did you mean qcow2");
    ctl(&sock, &["exec", "block_resize", "node-name=n2", "size=big"])
        .await
        .fails(2, "size must be an integer");
    ctl(
        &sock,
        &[
            "exec",
            "blockdev-add",
            "driver=qcow2",
            "node-name=n3",
            "lazy-refcount=on",
        ],
    )
    .await
    .fails(2, "did you mean lazy-refcounts");
    assert!(named_node(&c, "n3").await.is_none());

    // help shows real type names and enum values, never type numbers.
    let r = ctl_stdin(
        &sock,
        &["shell"],
        "help blockdev-add\nhelp blockdev-add driver=qcow2\nhelp query-status\n",
    )
    .await
    .ok();
    assert!(r.stdout.contains("BlockdevDriver"), "{}", r.stdout);
    assert!(
        r.stdout.contains("lazy-refcounts?") && r.stdout.contains("BlockdevRef"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("returns StatusInfo"), "{}", r.stdout);
    let numbered = r.stdout.split('(').skip(1).any(|s| {
        s.split(')')
            .next()
            .is_some_and(|x| !x.is_empty() && x.chars().all(|c| c.is_ascii_digit()))
    });
    assert!(!numbered, "a masked type number: {}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmp_prints_the_monitor_text_as_text() {
    let vm = vm_with(&["-name", "hmp-vm"]).await;
    let sock = vm.socket("cli");

    let r = ctl(&sock, &["hmp", "info", "status"]).await.ok();
    assert_eq!(r.stdout, "VM status: paused (prelaunch)\n");
    let r = ctl(&sock, &["hmp", "info chardev"]).await.ok();
    assert!(r.stdout.lines().count() > 1, "{}", r.stdout);
    assert!(r.stdout.contains("console0"), "{}", r.stdout);
    assert!(
        !r.stdout.contains('\r') && !r.stdout.contains("\\r\\n"),
        "{:?}",
        r.stdout
    );

    let r = ctl(&sock, &["--json", "hmp", "info", "name"]).await.ok();
    assert_eq!(r.json()["output"], "hmp-vm\n");

    // The shell: `!` and `hmp` lines, the text as text; an HMP mistake is text too.
    let r = ctl_stdin(&sock, &["shell"], "!info name\nhmp info status\n")
        .await
        .ok();
    assert_eq!(r.stdout, "hmp-vm\nVM status: paused (prelaunch)\n");
    let r = ctl(&sock, &["hmp", "info", "no-such-thing"]).await.ok();
    assert!(r.stdout.contains("info"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_snapshots_two_disks_atomically() {
    let vm = vm().await;
    let c = vm.client().clone();
    let sock = vm.socket("cli");
    let dir = vm.dir().to_owned();
    for d in ["d0", "d1"] {
        let img = dir.join(format!("{d}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
        ctl(&sock, &["block", "add", d, img.to_str().unwrap()]).await.ok();
    }
    let action = |d: &str, name: &str| {
        format!(
            "blockdev-snapshot-sync node-name={d} snapshot-node-name={name} format=qcow2 snapshot-file={}",
            dir.join(format!("{name}.qcow2")).display()
        )
    };

    let r = ctl(
        &sock,
        &[
            "transaction",
            "-a",
            &action("d0", "d0-ov"),
            "-a",
            &action("d1", "d1-ov"),
        ],
    )
    .await
    .ok();
    assert!(r.stdout.contains("transaction of 2 actions done"), "{}", r.stdout);
    assert_eq!(device_node(&c, "d0").await.as_deref(), Some("d0-ov"));
    assert_eq!(device_node(&c, "d1").await.as_deref(), Some("d1-ov"));
    assert!(named_node(&c, "d0-ov").await.is_some() && named_node(&c, "d1-ov").await.is_some());

    // One bad action: nothing happens to the other disk either.
    let script = format!(
        "transaction(\n{}\n{}\n)\n",
        action("d0-ov", "d0-ov2"),
        action("no-such-node", "x-ov")
    );
    let r = ctl_stdin(&sock, &["shell"], &script).await;
    r.fails(3, "no-such-node");
    assert!(named_node(&c, "d0-ov2").await.is_none());
    assert_eq!(device_node(&c, "d0").await.as_deref(), Some("d0-ov"));

    // The shell form, and the JSON form of the subcommand.
    let script = format!(
        "transaction(\n{}\n{}\n)\n",
        action("d0-ov", "d0-ov2"),
        action("d1-ov", "d1-ov2")
    );
    let r = ctl_stdin(&sock, &["--json", "shell"], &script).await.ok();
    assert!(r.stdout.contains("\"transaction\":2"), "{}", r.stdout);
    assert_eq!(device_node(&c, "d0").await.as_deref(), Some("d0-ov2"));
    assert_eq!(device_node(&c, "d1").await.as_deref(), Some("d1-ov2"));
    let r = ctl(
        &sock,
        &["--json", "transaction", r#"[{"type": "abort", "data": {}}]"#],
    )
    .await;
    assert_eq!(json_error(&r, 3)["kind"], "qmp");
    ctl(
        &sock,
        &["transaction", "-a", "blockdev-snapshot-synk node-name=d0"],
    )
    .await
    .fails(2, "blockdev-snapshot-sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_man_page_are_generated() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, mark) in [
        ("bash", "_qmpctl()"),
        ("zsh", "#compdef qmpctl"),
        ("fish", "complete -c qmpctl"),
    ] {
        let r = run_ctl(&["completions", shell], None, None).await.ok();
        assert!(
            r.stdout.contains(mark),
            "{shell}: {}",
            &r.stdout[..r.stdout.len().min(300)]
        );
        assert!(
            r.stdout.contains("transaction") && r.stdout.contains("keep-going"),
            "{shell}"
        );
        let file = dir.path().join(format!("qmpctl.{shell}"));
        std::fs::write(&file, &r.stdout).unwrap();
        if shell == "bash" {
            // The script parses, and defines the completion function.
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(format!("source {} && complete -p qmpctl", file.display()))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert!(String::from_utf8_lossy(&out.stdout).contains("_qmpctl"));
        }
    }
    run_ctl(&["completions", "tcsh"], None, None)
        .await
        .fails(2, "tcsh");

    let r = run_ctl(&["man"], None, None).await.ok();
    assert!(
        r.stdout.starts_with(".ie") || r.stdout.contains(".TH qmpctl"),
        "{}",
        &r.stdout[..200]
    );
    assert!(
        r.stdout.contains("transaction") && r.stdout.contains("Exit codes"),
        "man page lacks parts"
    );
    let pages = dir.path().join("man");
    run_ctl(&["man", "--dir", pages.to_str().unwrap()], None, None)
        .await
        .ok();
    for page in [
        "qmpctl.1",
        "qmpctl-block.1",
        "qmpctl-transaction.1",
        "qmpctl-block-snapshot.1",
    ] {
        let text = std::fs::read_to_string(pages.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
}
