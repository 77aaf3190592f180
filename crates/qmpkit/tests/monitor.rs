//! The Monitor against real QEMU 10 (and, where QEMU will not misbehave on
//! demand, against the fake server): agent detection, ejected media, the
//! shutdown notice, deliberate resets, sharing and restarts, frozen VMs and
//! device channels.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, qemu_img_create, vm_with, within};
use qmpkit::launch::{Qemu, QemuBuilder};
use qmpkit::monitor::constants::{
    DEFAULT_RINGBUF_READ_SIZE, EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED, EVENT_BLOCK_JOB_COMPLETED,
    EVENT_CHANNEL_CAPACITY, EVENT_VM_RESET, EVENT_VM_SHUTDOWN, RINGBUF_SIZE, SHUTDOWN_REASON_DISCONNECT,
    SHUTDOWN_REASON_HOST_QMP_QUIT,
};
use qmpkit::monitor::{Delivery, Monitor, MonitorOptions, MonitorRegistry};
use qmpkit::{Client, ConnectOptions, ConsoleError, Error, Event};
use qmpkit_fake::{FakeConn, FakeServer};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The agent's serial port: a virtio-serial port backed by a ring buffer.
const AGENT_ARGS: [&str; 6] = [
    "-device",
    "virtio-serial-pci,id=vs0",
    "-chardev",
    "ringbuf,id=agent0,size=65536",
    "-device",
    "virtserialport,chardev=agent0,name=org.linuxcontainers.incus",
];

/// A QEMU with the agent port, a control socket `ctl` for the test and a
/// socket `mon` for the monitor (the launcher's own client holds the main one).
async fn agent_vm(extra: &[&str]) -> common::Vm {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    vm_with(|b| {
        b.args(AGENT_ARGS)
            .args(extra)
            .extra_qmp_socket("ctl")
            .extra_qmp_socket("mon")
    })
    .await
}

async fn control(vm: &Qemu) -> Client {
    Client::connect(vm.socket("ctl")).await.expect("control socket")
}

/// Plays the guest agent: writes `data` into the agent's ring buffer.
async fn guest_writes(ctl: &Client, data: &str) {
    let _: Value = ctl
        .call(
            "ringbuf-write",
            &json!({"device": "agent0", "data": data, "format": "utf8"}),
        )
        .await
        .expect("ringbuf-write");
}

/// Adds a handler that forwards every event to the returned receiver.
fn recording(options: MonitorOptions) -> (MonitorOptions, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let options = options.event_handler(move |_, ev| {
        let _ = tx.send(ev.clone());
    });
    (options, rx)
}

/// The next event named `name`, passing over others.
async fn next_named(rx: &mut mpsc::UnboundedReceiver<Event>, name: &str) -> Event {
    within(20, async {
        loop {
            let ev = rx.recv().await.expect("handler channel open");
            if ev.name() == name {
                return ev;
            }
        }
    })
    .await
}

/// Every event left once the monitor is done (call after `wait`).
fn drain(rx: &mut mpsc::UnboundedReceiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        out.push(ev);
    }
    out
}

async fn status(mon: &Monitor) -> qmpkit::Result<String> {
    let v: Value = mon.call("query-status", &()).await?;
    Ok(v["status"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_lines_are_processed_in_order_and_kept_across_reads() {
    let vm = agent_vm(&[]).await;
    let ctl = control(&vm).await;
    let log = vm.dir().join("qmp.log");
    let registry = MonitorRegistry::new();
    let (options, mut events) = recording(
        MonitorOptions::new()
            .serial_chardev("agent0")
            // Reads come from check_agent below (and after events); the
            // periodic poll has its own test.
            .agent_poll_interval(Duration::from_secs(3600))
            .traffic_log(&log),
    );
    let mon = within(10, registry.connect(vm.socket("mon"), options))
        .await
        .unwrap();
    assert!(!mon.agent_started());

    // Two transitions in one read.
    guest_writes(&ctl, "STARTED\nSTOPPED\n").await;
    assert!(!within(10, mon.check_agent()).await.unwrap());
    // One.
    guest_writes(&ctl, "STARTED\n").await;
    assert!(within(10, mon.check_agent()).await.unwrap());
    assert!(mon.agent_started());
    guest_writes(&ctl, "STOPPED\n").await;
    assert!(!within(10, mon.check_agent()).await.unwrap());
    // A line split across two reads.
    guest_writes(&ctl, "STAR").await;
    assert!(!within(10, mon.check_agent()).await.unwrap());
    guest_writes(&ctl, "TED\n").await;
    assert!(within(10, mon.check_agent()).await.unwrap());
    // 16 KiB of garbage: control bytes, non-ASCII, near misses, a 12 KiB line.
    let mut garbage = String::new();
    garbage.push_str(&"\u{1}".repeat(1024));
    garbage.push_str("\nSTOPPEDx\nxSTOPPED\nSTOP PED\n\u{e9}t\u{e9}\n\u{7f}STOPPED\n");
    garbage.push_str(&"STOPPED".repeat(12 * 1024 / 7));
    while garbage.len() < 16 * 1024 - 1 {
        garbage.push('#');
    }
    garbage.push('\n');
    guest_writes(&ctl, &garbage).await;
    assert!(
        within(10, mon.check_agent()).await.unwrap(),
        "garbage changed the state"
    );
    // And a last transition, which must be the next event after the last STARTED.
    guest_writes(&ctl, "STOPPED\n").await;
    assert!(!within(10, mon.check_agent()).await.unwrap());
    assert!(!mon.agent_started());

    let mut agent = Vec::new();
    while agent.len() < 6 {
        let ev = within(10, events.recv()).await.unwrap();
        if ev.name().starts_with("AGENT-") {
            agent.push(ev.name().to_owned());
        }
    }
    let (s, t) = (EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED);
    assert_eq!(agent, [s, t, s, t, s, t]);

    // Any event prompts a read: nobody calls check_agent and the next
    // periodic poll is an hour away.
    guest_writes(&ctl, "STARTED\n").await;
    let _: Value = ctl.call("cont", &()).await.unwrap();
    next_named(&mut events, EVENT_AGENT_STARTED).await;
    assert!(mon.agent_started());

    // The ring-buffer reads stayed out of the traffic log; a command did not.
    assert_eq!(status(&mon).await.unwrap(), "running");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("query-status"), "{text}");
    assert!(!text.contains("ringbuf-read"), "{text}");
    mon.disconnect();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_is_read_at_connect_and_polled_in_small_reads() {
    let vm = agent_vm(&[]).await;
    let ctl = control(&vm).await;
    // Written before the monitor exists: the read at connect finds it.
    guest_writes(&ctl, "junk\nSTARTED\n").await;
    let (options, mut events) = recording(
        MonitorOptions::new()
            .serial_chardev("agent0")
            // Reads of 5 bytes split every line; a full read is followed by another.
            .ringbuf_read_size(5)
            .agent_poll_interval(Duration::from_millis(50))
            // A log in a missing directory means no log, not a failed connect.
            .traffic_log(vm.dir().join("missing/dir/qmp.log")),
    );
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(vm.socket("mon"), options))
        .await
        .unwrap();
    assert!(mon.agent_started(), "the read at connect saw STARTED");
    next_named(&mut events, EVENT_AGENT_STARTED).await;
    assert!(!vm.dir().join("missing").exists());

    // Nobody calls check_agent: the poller finds it.
    guest_writes(&ctl, "xx\nSTOPPED\r\nSTA").await;
    next_named(&mut events, EVENT_AGENT_STOPPED).await;
    assert!(!mon.agent_started());
    guest_writes(&ctl, "RTED\n").await;
    next_named(&mut events, EVENT_AGENT_STARTED).await;
    assert!(mon.agent_started());
    mon.disconnect();
}

/// Incus gives the agent a 16-byte ring buffer. QEMU keeps the newest 16
/// bytes when more arrive between two reads, so a read can start inside a
/// line; Go's reader takes only the last complete line of each read, so it
/// misses a status whose line a read splits. Ours keeps the partial line and
/// misses nothing that is still in the buffer, whatever it reads at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_detection_works_with_incuss_16_byte_ring_buffer() {
    for read_size in [DEFAULT_RINGBUF_READ_SIZE, RINGBUF_SIZE] {
        let vm = vm_with(|b| {
            b.args([
                "-device",
                "virtio-serial-pci,id=vs0",
                "-chardev",
                &format!("ringbuf,id=qemu_serial-chardev,size={RINGBUF_SIZE}"),
                "-device",
                "virtserialport,chardev=qemu_serial-chardev,name=org.linuxcontainers.incus",
            ])
            .extra_qmp_socket("ctl")
            .extra_qmp_socket("mon")
        })
        .await;
        let ctl = control(&vm).await;
        let write = |data: &'static str| {
            let ctl = ctl.clone();
            async move {
                let _: Value = ctl
                    .call(
                        "ringbuf-write",
                        &json!({"device": "qemu_serial-chardev", "data": data}),
                    )
                    .await
                    .unwrap();
            }
        };
        let (options, mut events) = recording(
            MonitorOptions::new()
                .serial_chardev("qemu_serial-chardev")
                .ringbuf_read_size(read_size)
                .agent_poll_interval(Duration::from_secs(3600)),
        );
        let registry = MonitorRegistry::new();
        let mon = within(10, registry.connect(vm.socket("mon"), options))
            .await
            .unwrap();

        write("STARTED\n").await;
        assert!(
            within(10, mon.check_agent()).await.unwrap(),
            "read size {read_size}"
        );
        // 24 bytes: the first line is lost, the last one counts.
        write("STARTED\nSTARTED\nSTOPPED\n").await;
        assert!(
            !within(10, mon.check_agent()).await.unwrap(),
            "read size {read_size}"
        );
        // 20 bytes: the buffer holds "TED\nSTOPPED\nSTAR", a cut line at
        // each end; the one at the end is finished by the next write.
        write("STOPPED\nSTOPPED\nSTAR").await;
        assert!(
            !within(10, mon.check_agent()).await.unwrap(),
            "read size {read_size}"
        );
        write("TED\n").await;
        // Go reads "TED\n" here and misses the agent's start.
        assert!(
            within(10, mon.check_agent()).await.unwrap(),
            "read size {read_size}"
        );
        assert!(mon.agent_started());

        let mut agent = Vec::new();
        while agent.len() < 3 {
            let ev = within(10, events.recv()).await.unwrap();
            if ev.name().starts_with("AGENT-") {
                agent.push(ev.name().to_owned());
            }
        }
        assert_eq!(
            agent,
            [EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED, EVENT_AGENT_STARTED]
        );
        mon.disconnect();
        within(10, mon.wait()).await;
        assert!(drain(&mut events).iter().all(|e| !e.name().starts_with("AGENT-")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_are_typed_errors() {
    let vm = agent_vm(&[]).await;
    let registry = MonitorRegistry::new();
    let path = vm.socket("mon");
    for bad in [
        MonitorOptions::new().ringbuf_read_size(0),
        MonitorOptions::new().agent_poll_interval(Duration::ZERO),
        MonitorOptions::new().serial_chardev(""),
        MonitorOptions::new().event_queue(0),
    ] {
        let e = within(10, registry.connect(&path, bad)).await.unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
    }
    assert!(registry.is_empty());

    // The failed attempts left the socket free: a good connect works.
    let mon = within(10, registry.connect(&path, MonitorOptions::new()))
        .await
        .unwrap();
    assert_eq!(status(&mon).await.unwrap(), "prelaunch");
    let e = mon.check_agent().await.unwrap_err();
    assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
    assert!(!mon.agent_started());
    mon.disconnect();
}

/// An agent state carried over from elsewhere (a migration's source, a
/// daemon's records): the monitor reports it without an AGENT-STARTED, and
/// the guest's next STOPPED is a transition the handler hears of. A monitor
/// that watches no agent says so instead of pretending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_state_carried_over_is_reported_and_its_stop_is_seen() {
    let vm = agent_vm(&["-chardev", "null,id=plain0"]).await;
    let ctl = control(&vm).await;
    let registry = MonitorRegistry::new();
    let (options, mut events) = recording(
        MonitorOptions::new()
            .serial_chardev("agent0")
            .agent_started(true)
            .agent_poll_interval(Duration::from_secs(3600)),
    );
    let mon = within(10, registry.connect(vm.socket("mon"), options))
        .await
        .unwrap();
    assert!(mon.agent_started());
    guest_writes(&ctl, "STOPPED\n").await;
    assert!(!within(10, mon.check_agent()).await.unwrap());
    next_named(&mut events, EVENT_AGENT_STOPPED).await;

    // Told again after connect: the same, without an event for it.
    mon.set_agent_started(true).unwrap();
    assert!(mon.agent_started());
    guest_writes(&ctl, "STOPPED\n").await;
    assert!(!within(10, mon.check_agent()).await.unwrap());
    next_named(&mut events, EVENT_AGENT_STOPPED).await;
    mon.disconnect();
    within(10, mon.wait()).await;
    assert!(
        drain(&mut events).iter().all(|e| e.name() != EVENT_AGENT_STARTED),
        "no AGENT-STARTED for a state carried over"
    );

    // No agent watched: no chardev, or one that is no ring buffer.
    ctl.disconnect();
    let plain = within(10, registry.connect(vm.socket("ctl"), MonitorOptions::new()))
        .await
        .unwrap();
    let e = plain.set_agent_started(true).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
    assert!(!plain.agent_started());
    plain.disconnect();
    let wrong = within(
        10,
        registry.connect(
            vm.socket("mon"),
            MonitorOptions::new().serial_chardev("plain0").agent_started(true),
        ),
    )
    .await
    .unwrap();
    assert!(!wrong.agent_started());
    assert!(wrong.set_agent_started(true).is_err());
    assert!(!wrong.agent_started());
}

/// Incus connects its feature-probe QEMU, which has no agent port, with the
/// port's chardev name: Go's Connect succeeds, so ours must too, and it
/// must never claim an agent. A chardev of the wrong kind is treated alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_chardev_the_vm_lacks_connects_and_never_reports_the_agent() {
    let vm = vm_with(|b| {
        b.args(["-chardev", "null,id=plain0"])
            .extra_qmp_socket("ctl")
            .extra_qmp_socket("mon")
            .extra_qmp_socket("mon2")
    })
    .await;
    let ctl = control(&vm).await;
    let registry = MonitorRegistry::new();
    let (options, mut events) = recording(
        MonitorOptions::new()
            .serial_chardev("qemu_serial-chardev")
            .agent_poll_interval(Duration::from_millis(1)),
    );
    let mon = within(10, registry.connect(vm.socket("mon"), options))
        .await
        .unwrap();
    assert!(!mon.agent_started());
    assert_eq!(status(&mon).await.unwrap(), "prelaunch");
    let _: Value = ctl.call("cont", &()).await.unwrap();
    next_named(&mut events, "RESUME").await;
    let _: Value = ctl.call("stop", &()).await.unwrap();
    next_named(&mut events, "STOP").await;
    assert_eq!(status(&mon).await.unwrap(), "paused");
    assert!(!mon.agent_started());
    assert!(
        drain(&mut events).iter().all(|e| !e.name().starts_with("AGENT-")),
        "no agent event"
    );
    // Asked directly, the monitor says why.
    let e = within(10, mon.check_agent()).await.unwrap_err();
    assert!(
        matches!(&e, Error::Console(ConsoleError::NotFound(c)) if c == "qemu_serial-chardev"),
        "{e:?}"
    );
    mon.disconnect();

    // Not a ring buffer: the same.
    let other = within(
        10,
        registry.connect(vm.socket("mon2"), MonitorOptions::new().serial_chardev("plain0")),
    )
    .await
    .unwrap();
    assert!(!other.agent_started());
    let e = within(10, other.check_agent()).await.unwrap_err();
    assert!(
        matches!(&e, Error::Console(ConsoleError::NotARingbuf(c)) if c == "plain0"),
        "{e:?}"
    );
    other.disconnect();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eject_calls_back_once_per_opening_while_the_handler_runs_commands() {
    let dir = tempfile::tempdir().unwrap();
    let medium = dir.path().join("cd.raw");
    qemu_img_create(&medium, "raw", "1M", None);
    let drive = format!(
        "if=none,id=cd0drv,file={},media=cdrom,format=raw",
        medium.display()
    );
    let vm = agent_vm(&[
        "-drive",
        &drive,
        "-device",
        "ide-cd,drive=cd0drv,id=cd0,bus=ide.0",
    ])
    .await;
    let ctl = control(&vm).await;

    let ejected = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = ejected.clone();
    let (tx, mut reports) = mpsc::unbounded_channel();
    let options = MonitorOptions::new()
        .on_ejected(move |id| seen.lock().unwrap().push(id.to_owned()))
        .async_event_handler(move |mon, ev| {
            let tx = tx.clone();
            async move {
                if ev.name() != "DEVICE_TRAY_MOVED" {
                    return;
                }
                // A QMP command from inside the handler.
                let block: Value = mon
                    .call("query-block", &())
                    .await
                    .expect("query-block from the handler");
                let cd = block
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| b["qdev"] == "cd0")
                    .cloned()
                    .unwrap();
                let _ = tx.send((ev.data()["tray-open"].as_bool().unwrap(), cd["tray_open"].clone()));
            }
        });
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(vm.socket("mon"), options))
        .await
        .unwrap();

    for round in 1..=2 {
        let _: Value = ctl
            .call("eject", &json!({"id": "cd0", "force": true}))
            .await
            .unwrap();
        assert_eq!(within(10, reports.recv()).await.unwrap(), (true, json!(true)));
        let _: Value = ctl
            .call("blockdev-close-tray", &json!({"id": "cd0"}))
            .await
            .unwrap();
        assert_eq!(within(10, reports.recv()).await.unwrap(), (false, json!(false)));
        // The callback runs before the next event is handled.
        assert_eq!(*ejected.lock().unwrap(), vec!["cd0"; round]);
    }
    mon.disconnect();
}

/// A fake QEMU that sends `events` right after the handshake, then serves.
async fn fake_sending(events: Vec<(&'static str, Value)>) -> FakeServer {
    FakeServer::start(move |mut conn: FakeConn| {
        let events = events.clone();
        async move {
            if conn.handshake().await.is_err() {
                return;
            }
            for (name, data) in events {
                if conn.event(name, data).await.is_err() {
                    return;
                }
            }
            conn.serve_instant().await;
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_tray_events_call_back_once_per_opening() {
    let tray = |id: &str, device: &str, open: bool| {
        (
            "DEVICE_TRAY_MOVED",
            json!({"device": device, "id": id, "tray-open": open}),
        )
    };
    let server = fake_sending(vec![
        tray("cd0", "cd0drv", true),
        tray("cd0", "cd0drv", true), // QEMU 7.2 repeats the event
        tray("cd1", "", true),
        tray("cd0", "cd0drv", false),
        tray("cd0", "cd0drv", true),
        tray("", "ide1-cd0", true), // no qdev id: the backend's name
        ("SENTINEL", json!({})),
    ])
    .await;
    let ejected = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = ejected.clone();
    let (options, mut events) =
        recording(MonitorOptions::new().on_ejected(move |id| seen.lock().unwrap().push(id.to_owned())));
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(server.path(), options))
        .await
        .unwrap();
    next_named(&mut events, "SENTINEL").await;
    assert_eq!(*ejected.lock().unwrap(), ["cd0", "cd1", "cd0", "ide1-cd0"]);
    mon.disconnect();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_gives_one_shutdown_with_qemus_reason() {
    let vm = agent_vm(&[]).await;
    let ctl = control(&vm).await;
    let (options, mut events) = recording(MonitorOptions::new());
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(vm.socket("mon"), options))
        .await
        .unwrap();
    assert!(mon.is_initialized(), "a new monitor is initialized, as in Go");
    let _ = ctl.call::<_, Value>("quit", &()).await;
    within(20, mon.wait()).await;
    assert!(!mon.is_initialized(), "QEMU's SHUTDOWN reached the handler");
    let shutdowns: Vec<Event> = drain(&mut events)
        .into_iter()
        .filter(|e| e.name() == EVENT_VM_SHUTDOWN)
        .collect();
    assert_eq!(shutdowns.len(), 1, "{shutdowns:?}");
    assert_eq!(shutdowns[0].data()["reason"], SHUTDOWN_REASON_HOST_QMP_QUIT);
    assert!(registry.get(vm.socket("mon")).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_gives_one_synthesized_shutdown_and_ends_everything() {
    let mut vm = agent_vm(&[]).await;
    let ctl = control(&vm).await;
    guest_writes(&ctl, "STARTED\n").await;
    let (options, mut events) = recording(MonitorOptions::new().serial_chardev("agent0"));
    let registry = MonitorRegistry::new();
    let path = vm.socket("mon");
    let mon = within(10, registry.connect(&path, options)).await.unwrap();
    assert!(mon.agent_started());
    mon.set_initialized(true);
    let mut channel = mon.create_event_channel("drive0").unwrap();
    // Commands in flight when QEMU dies fail; none hangs.
    let inflight: Vec<_> = (0..4)
        .map(|_| {
            let m = mon.clone();
            tokio::spawn(async move { status(&m).await })
        })
        .collect();
    vm.kill();
    within(20, mon.wait()).await;
    for t in inflight {
        let r = within(10, t).await.unwrap();
        assert!(r.is_ok() || r.as_ref().unwrap_err().is_disconnected(), "{r:?}");
    }
    let seen = drain(&mut events);
    let shutdowns: Vec<&Event> = seen.iter().filter(|e| e.name() == EVENT_VM_SHUTDOWN).collect();
    assert_eq!(shutdowns.len(), 1, "{shutdowns:?}");
    assert_eq!(shutdowns[0].data()["reason"], SHUTDOWN_REASON_DISCONNECT);
    // The agent was up: it went with QEMU, and the handler hears so first.
    let agent: Vec<&str> = seen
        .iter()
        .map(|e| e.name())
        .filter(|n| n.starts_with("AGENT-") || *n == EVENT_VM_SHUTDOWN)
        .collect();
    assert_eq!(
        agent,
        [EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED, EVENT_VM_SHUTDOWN]
    );
    assert!(status(&mon).await.unwrap_err().is_disconnected());
    assert!(!mon.agent_started());
    assert!(
        within(5, channel.recv()).await.is_none(),
        "device channels end with the monitor"
    );
    assert!(registry.get(&path).is_none() && registry.is_empty());
}

/// Incus's daemon restarts and reconnects to running VMs without calling
/// SetInitialized: Go's Connect has marked the monitor initialized, so a
/// crash after the reconnect still reaches the handler as a SHUTDOWN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_plain_connect_gives_one_disconnect_shutdown() {
    let mut vm = agent_vm(&[]).await;
    let (options, mut events) = recording(MonitorOptions::new());
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(vm.socket("mon"), options))
        .await
        .unwrap();
    assert!(mon.is_initialized());
    vm.kill();
    within(20, mon.wait()).await;
    let all = drain(&mut events);
    let shutdowns: Vec<&Event> = all.iter().filter(|e| e.name() == EVENT_VM_SHUTDOWN).collect();
    assert_eq!(shutdowns.len(), 1, "{all:?}");
    assert_eq!(shutdowns[0].data()["reason"], SHUTDOWN_REASON_DISCONNECT);
}

/// Incus connects with no handler before it sends `quit`, so that the
/// SHUTDOWN which follows reaches nobody: a connect to a live monitor
/// replaces its handler with the caller's, none included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_without_a_handler_silences_the_old_one() {
    let vm = agent_vm(&[]).await;
    let ctl = control(&vm).await;
    let path = vm.socket("mon");
    let registry = MonitorRegistry::new();
    let (options, mut first) = recording(MonitorOptions::new());
    let mon = within(10, registry.connect(&path, options)).await.unwrap();
    let _: Value = ctl.call("cont", &()).await.unwrap();
    next_named(&mut first, "RESUME").await;
    drain(&mut first);

    let again = within(10, registry.connect(&path, MonitorOptions::new()))
        .await
        .unwrap();
    assert!(again == mon, "the live monitor, not a new one");
    let _ = within(10, again.quit()).await;
    within(20, mon.wait()).await;
    assert!(
        drain(&mut first).is_empty(),
        "the replaced handler saw nothing after the second connect"
    );
    // Go clears the flag only when a handler takes the SHUTDOWN.
    assert!(mon.is_initialized());
    assert!(registry.get(&path).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_shutdown_is_made_up_when_turned_off_or_on_our_own_disconnect() {
    // Turned off: the socket drops, nothing is synthesised.
    let server = FakeServer::instant().await.unwrap();
    let (options, mut events) = recording(MonitorOptions::new());
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(server.path(), options))
        .await
        .unwrap();
    assert!(mon.is_initialized());
    mon.set_initialized(false);
    drop(server);
    within(10, mon.wait()).await;
    assert!(drain(&mut events).is_empty());

    // Initialized, but we hung up ourselves: not a shutdown of the VM.
    let server = FakeServer::instant().await.unwrap();
    let (options, mut events) = recording(MonitorOptions::new());
    let mon = within(10, registry.connect(server.path(), options))
        .await
        .unwrap();
    mon.set_initialized(true);
    mon.disconnect();
    assert!(registry.get(server.path()).is_none(), "forgotten at once");
    within(10, mon.wait()).await;
    assert!(drain(&mut events).is_empty());
    // And the next connect makes a new monitor.
    let again = within(10, registry.connect(server.path(), MonitorOptions::new()))
        .await
        .unwrap();
    assert!(again != mon);
    assert_eq!(status(&again).await.unwrap(), "running");
    assert_eq!(server.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_is_recognised_by_handle_reset() {
    let vm = agent_vm(&[]).await;
    let ctl = control(&vm).await;
    let (tx, mut resets) = mpsc::unbounded_channel();
    let (all_tx, mut events) = mpsc::unbounded_channel();
    let options = MonitorOptions::new()
        .serial_chardev("agent0")
        .agent_poll_interval(Duration::from_secs(3600))
        .async_event_handler(move |mon, ev| {
            let (tx, all_tx) = (tx.clone(), all_tx.clone());
            async move {
                let _ = all_tx.send(ev.name().to_owned());
                if ev.name() == EVENT_VM_RESET {
                    let first = mon.handle_reset();
                    let second = mon.handle_reset();
                    let _ = tx.send((ev.data()["reason"].clone(), first, second));
                }
            }
        });
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(vm.socket("mon"), options))
        .await
        .unwrap();
    guest_writes(&ctl, "STARTED\n").await;
    assert!(mon.check_agent().await.unwrap());

    within(20, mon.reset()).await.unwrap();
    let (reason, first, second) = within(10, resets.recv()).await.unwrap();
    assert_eq!(reason, "host-qmp-system-reset");
    assert!(first && !second, "deliberate reset recognised once");
    // The reset took the agent down with it.
    assert!(!mon.agent_started());

    // A reset the monitor did not announce is not recognised.
    let _: Value = ctl.call("system_reset", &()).await.unwrap();
    let (_, first, _) = within(10, resets.recv()).await.unwrap();
    assert!(!first);
    assert!(!mon.handle_reset());
    // One announced by hand, then sent another way, is.
    mon.expect_reset();
    let _: Value = ctl.call("system_reset", &()).await.unwrap();
    let (_, first, second) = within(10, resets.recv()).await.unwrap();
    assert!(first && !second);

    let mut names = Vec::new();
    while names.len() < 5 {
        names.push(within(10, events.recv()).await.unwrap());
    }
    assert_eq!(
        names,
        [
            EVENT_AGENT_STARTED,
            EVENT_VM_RESET,
            EVENT_AGENT_STOPPED,
            EVENT_VM_RESET,
            EVENT_VM_RESET,
        ]
    );
    mon.disconnect();
}

/// A RESET as QEMU sends it, at `at` (seconds, microseconds) by its clock.
fn reset_at(at: (i64, i64), guest: bool, reason: &str) -> Value {
    json!({"event": "RESET", "data": {"guest": guest, "reason": reason},
           "timestamp": {"seconds": at.0, "microseconds": at.1}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_firmwares_reset_after_a_deliberate_one_is_recognised_by_qemus_clock() {
    // Each command `phaseN` is answered, then its events follow (the
    // deliberate reset is announced before the command is sent).
    let host = "host-qmp-system-reset";
    let phases: Vec<Vec<Value>> = vec![
        // The firmware's reset 130 ms after ours is ours; a second guest
        // reset is the guest's.
        vec![
            reset_at((1000, 0), false, host),
            reset_at((1000, 130_000), true, "guest-reset"),
            reset_at((1000, 200_000), true, "guest-reset"),
        ],
        // A paused VM: the firmware runs, and resets, after the RESUME.
        vec![
            reset_at((2000, 0), false, host),
            json!({"event": "RESUME", "timestamp": {"seconds": 2060, "microseconds": 0}}),
            reset_at((2060, 130_000), true, "guest-reset"),
        ],
        // Outside the window: the guest's.
        vec![
            reset_at((3000, 0), false, host),
            reset_at((3006, 0), true, "guest-reset"),
        ],
        // No clock (QEMU's -1): nothing to go by, so the guest's.
        vec![
            reset_at((-1, -1), false, host),
            reset_at((-1, -1), true, "guest-reset"),
        ],
    ];
    let server = FakeServer::start(move |mut conn: FakeConn| {
        let phases = phases.clone();
        async move {
            if conn.handshake().await.is_err() {
                return;
            }
            while let Ok(Some(req)) = conn.recv().await {
                if conn.reply(&req, json!({})).await.is_err() {
                    return;
                }
                let phase = req.name.as_deref().and_then(|n| n.strip_prefix("phase"));
                if let Some(n) = phase.and_then(|n| n.parse::<usize>().ok()) {
                    for ev in &phases[n] {
                        if conn.send(ev).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    })
    .await
    .unwrap();
    let (tx, mut resets) = mpsc::unbounded_channel();
    let options = MonitorOptions::new().event_handler(move |mon, ev| {
        if ev.name() == EVENT_VM_RESET {
            let _ = tx.send((ev.data()["guest"].as_bool().unwrap(), mon.handle_reset()));
        }
    });
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(server.path(), options))
        .await
        .unwrap();
    let expected: [&[(bool, bool)]; 4] = [
        &[(false, true), (true, true), (true, false)],
        &[(false, true), (true, true)],
        &[(false, true), (true, false)],
        &[(false, true), (true, false)],
    ];
    for (n, want) in expected.iter().enumerate() {
        mon.expect_reset();
        let _: Value = within(10, mon.call(&format!("phase{n}"), &())).await.unwrap();
        let mut got = Vec::new();
        while got.len() < want.len() {
            got.push(within(10, resets.recv()).await.unwrap());
        }
        assert_eq!(got, *want, "phase {n}: (guest, handle_reset)");
    }
    assert!(!mon.handle_reset(), "nothing left over");
    mon.disconnect();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reset_withdraws_its_announcement() {
    let server = FakeServer::start(|mut conn: FakeConn| async move {
        if conn.handshake().await.is_err() {
            return;
        }
        while let Ok(Some(req)) = conn.recv().await {
            let r = if req.name.as_deref() == Some("system_reset") {
                conn.reply_error(&req, "GenericError", "reset refused").await
            } else {
                conn.reply(&req, json!({})).await
            };
            if r.is_err() {
                return;
            }
        }
    })
    .await
    .unwrap();
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(server.path(), MonitorOptions::new()))
        .await
        .unwrap();
    let e = within(10, mon.reset()).await.unwrap_err();
    assert!(e.is_qmp(), "{e:?}");
    assert!(!mon.handle_reset(), "the announcement was withdrawn");
    mon.expect_reset();
    assert!(mon.handle_reset() && !mon.handle_reset());
    mon.disconnect();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_to_one_path_share_one_monitor_and_the_last_handler_wins() {
    let vm = agent_vm(&[]).await;
    let ctl = control(&vm).await;
    let path = vm.socket("mon");
    let (first_opts, mut first) = recording(MonitorOptions::new());
    let (second_opts, mut second) = recording(MonitorOptions::new());
    // Concurrent connects share one attempt (QEMU serves one client per socket).
    let (a, b) = within(10, async {
        tokio::join!(
            Monitor::connect(&path, first_opts),
            Monitor::connect(&path, MonitorOptions::new())
        )
    })
    .await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a == b, "one monitor");
    assert!(qmpkit::monitor::MonitorRegistry::global().get(&path).unwrap() == a);
    // A later connect returns it as well, and brings its own handler.
    let c = within(10, Monitor::connect(&path, second_opts)).await.unwrap();
    assert!(c == a);
    let _: Value = ctl.call("cont", &()).await.unwrap();
    next_named(&mut second, "RESUME").await;
    assert!(first.try_recv().is_err(), "the replaced handler got nothing");
    assert_eq!(status(&c).await.unwrap(), "running");
    a.disconnect();
    within(10, c.wait()).await;
    assert!(MonitorRegistry::global().get(&path).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_the_same_path_gives_a_new_monitor_while_others_poll_status() {
    let keep = tempfile::tempdir().unwrap();
    let path = keep.path().join("vm.sock");
    // QEMU listens on a socket of its own, which the launcher uses and then
    // releases; the socket is then moved to the VM's path, as a restart
    // leaves it. (Launching directly on `path` would race the pollers for
    // QEMU's only client slot.)
    let start = |n: usize| {
        let path = path.clone();
        let staging = keep.path().join(format!("staging{n}.sock"));
        async move {
            let vm = QemuBuilder::new()
                .qmp_socket(&staging)
                .spawn()
                .await
                .expect("QEMU");
            vm.client().disconnect();
            within(10, vm.client().closed()).await;
            std::fs::rename(&staging, &path).unwrap();
            vm
        }
    };
    let registry = MonitorRegistry::new();
    let options = MonitorOptions::new()
        .connect_options(ConnectOptions::new().handshake_timeout(Duration::from_secs(3)));
    let mut vm = start(0).await;
    let mut current = within(10, registry.connect(&path, options.clone()))
        .await
        .unwrap();
    current.set_initialized(true);

    let stop = Arc::new(AtomicBool::new(false));
    // What each poller last got a status from.
    let last_used: Vec<Arc<Mutex<Option<Monitor>>>> = (0..3).map(|_| Arc::default()).collect();
    let pollers: Vec<_> = last_used
        .iter()
        .map(|last| {
            let (registry, path, options) = (registry.clone(), path.clone(), options.clone());
            let (stop, last) = (stop.clone(), last.clone());
            tokio::spawn(async move {
                let mut worked = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Never a hang: every round has a deadline.
                    let round = tokio::time::timeout(Duration::from_secs(15), async {
                        let mon = registry.connect(&path, options.clone()).await?;
                        status(&mon).await.map(|s| (mon, s))
                    })
                    .await
                    .expect("a connect or status call hung");
                    match round {
                        Ok((mon, s)) => {
                            assert_eq!(s, "prelaunch");
                            *last.lock().unwrap() = Some(mon);
                            worked += 1;
                        }
                        Err(e) => {
                            // QEMU is gone, or dies while we connect: only
                            // transport errors, never a QEMU error reply.
                            assert!(
                                e.is_disconnected()
                                    || matches!(
                                        e,
                                        Error::Connect { .. }
                                            | Error::Handshake(_)
                                            | Error::HandshakeTimeout { .. }
                                            | Error::Io(_)
                                    ),
                                "unexpected error {e:?}"
                            );
                            // While QEMU is down: back off a little rather than spin.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                worked
            })
        })
        .collect();

    for n in 1..=3 {
        vm.kill();
        within(20, current.wait()).await;
        vm = start(n).await;
        let fresh = eventually(20, || {
            let (registry, path, options) = (registry.clone(), path.clone(), options.clone());
            async move {
                let mon = registry.connect(&path, options).await.ok()?;
                status(&mon).await.ok().map(|_| mon)
            }
        })
        .await;
        assert!(fresh != current, "round {n}: a new monitor, not the stale one");
        current = fresh;
        current.set_initialized(true);
        // Every poller moves on to the new monitor.
        let target = current.clone();
        eventually(20, || {
            let ok = last_used
                .iter()
                .all(|l| l.lock().unwrap().as_ref() == Some(&target));
            async move { ok.then_some(()) }
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for p in pollers {
        assert!(within(30, p).await.unwrap() > 0);
    }
    current.disconnect();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_vm_delays_no_other_monitor() {
    // Accepts, never greets.
    let frozen = FakeServer::start(|conn: FakeConn| async move {
        let _held = conn;
        std::future::pending::<()>().await
    })
    .await
    .unwrap();
    let mut servers = Vec::new();
    for _ in 0..100 {
        servers.push(FakeServer::instant().await.unwrap());
    }
    let registry = MonitorRegistry::new();
    let connect_all = |registry: MonitorRegistry, paths: Vec<std::path::PathBuf>| async move {
        let mut set = tokio::task::JoinSet::new();
        for p in paths {
            let registry = registry.clone();
            set.spawn(async move {
                let mon = registry.connect(&p, MonitorOptions::new()).await.unwrap();
                assert_eq!(status(&mon).await.unwrap(), "running");
                mon
            });
        }
        let mut out = Vec::new();
        while let Some(m) = set.join_next().await {
            out.push(m.unwrap());
        }
        out
    };
    let paths: Vec<_> = servers.iter().map(|s| s.path().to_owned()).collect();
    let first = within(30, connect_all(registry.clone(), paths.clone())).await;
    assert_eq!(registry.len(), 100);

    // Two connects to the frozen VM, pending for as long as its handshake budget.
    let slow = MonitorOptions::new()
        .connect_options(ConnectOptions::new().handshake_timeout(Duration::from_secs(600)));
    let pending: Vec<_> = (0..2)
        .map(|_| {
            let (registry, path, slow) = (registry.clone(), frozen.path().to_owned(), slow.clone());
            tokio::spawn(async move { registry.connect(&path, slow).await })
        })
        .collect();
    eventually(10, || async { (frozen.connections() >= 1).then_some(()) }).await;

    // Meanwhile: commands on the existing monitors, connects that reuse them,
    // and connects to new VMs all complete.
    let mut set = tokio::task::JoinSet::new();
    for m in &first {
        let m = m.clone();
        set.spawn(async move { status(&m).await.unwrap() });
    }
    within(30, async {
        while let Some(s) = set.join_next().await {
            assert_eq!(s.unwrap(), "running");
        }
    })
    .await;
    let again = within(30, connect_all(registry.clone(), paths)).await;
    assert!(again.iter().all(|m| first.contains(m)), "reused, not reconnected");
    let fresh_server = FakeServer::instant().await.unwrap();
    let fresh = within(10, registry.connect(fresh_server.path(), MonitorOptions::new()))
        .await
        .unwrap();
    assert_eq!(status(&fresh).await.unwrap(), "running");
    assert!(servers.iter().all(|s| s.connections() == 1));

    // The frozen VM's connects are still waiting, on one shared socket connection.
    assert!(pending.iter().all(|p| !p.is_finished()));
    assert_eq!(frozen.connections(), 1);
    for p in pending {
        p.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_never_stalls_replies_and_sees_every_event_in_order() {
    let events: Vec<(&'static str, Value)> = (0..200).map(|n| ("TICK", json!({"n": n}))).collect();
    let server = fake_sending(events).await;
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let (tx, mut seen) = mpsc::unbounded_channel();
    let options = MonitorOptions::new().async_event_handler(move |_mon, ev| {
        let (tx, mut release) = (tx.clone(), release.clone());
        async move {
            // Stuck until the test lets go.
            let _ = release.wait_for(|r| *r).await;
            let _ = tx.send(ev.data()["n"].as_i64().unwrap());
        }
    });
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(server.path(), options))
        .await
        .unwrap();
    for _ in 0..50 {
        assert_eq!(within(10, status(&mon)).await.unwrap(), "running");
    }
    assert!(seen.try_recv().is_err(), "the handler is still stuck");
    release_tx.send_replace(true);
    let mut got = Vec::new();
    while got.len() < 200 {
        got.push(within(10, seen.recv()).await.unwrap());
    }
    assert_eq!(got, (0..200).collect::<Vec<i64>>());
    mon.disconnect();
}

async fn blockdev(mon: &Monitor, args: Value) {
    let _: Value = mon.call("blockdev-add", &args).await.expect("blockdev-add");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_job_events_reach_the_device_channel() {
    let vm = agent_vm(&[]).await;
    let registry = MonitorRegistry::new();
    let options = MonitorOptions::new().route_block_job_events(true);
    let mon = within(10, registry.connect(vm.socket("mon"), options))
        .await
        .unwrap();
    let mut job = mon.create_event_channel("job0").unwrap();
    let e = mon.create_event_channel("job0").unwrap_err();
    assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
    assert!(matches!(
        mon.create_event_channel(""),
        Err(Error::InvalidRequest(_))
    ));

    blockdev(
        &mon,
        json!({"driver": "null-co", "node-name": "src", "size": 1 << 20, "read-zeroes": true}),
    )
    .await;
    blockdev(
        &mon,
        json!({"driver": "null-co", "node-name": "dst", "size": 1 << 20}),
    )
    .await;
    let _: Value = mon
        .call(
            "blockdev-backup",
            &json!({"device": "src", "target": "dst", "sync": "full", "job-id": "job0"}),
        )
        .await
        .unwrap();
    let ev = within(20, job.recv()).await.unwrap();
    assert_eq!(ev.name(), EVENT_BLOCK_JOB_COMPLETED);
    assert_eq!(ev.data()["device"], "job0");
    assert_eq!(ev.data()["offset"], 1 << 20);
    assert!(ev.data().get("error").is_none());

    // The Go PushEvent: by the device named in the data.
    let data = json!({"device": "job0", "len": 1, "offset": 1, "speed": 0, "type": "commit"});
    assert_eq!(
        mon.push_event(EVENT_BLOCK_JOB_COMPLETED, data.clone()).unwrap(),
        Delivery::Delivered
    );
    let ev = within(10, job.recv()).await.unwrap();
    assert_eq!((ev.name(), ev.data()), (EVENT_BLOCK_JOB_COMPLETED, &data));
    assert_eq!(
        mon.push_event(EVENT_BLOCK_JOB_COMPLETED, json!({"device": "other"}))
            .unwrap(),
        Delivery::NoChannel
    );
    let e = mon
        .push_event(EVENT_BLOCK_JOB_COMPLETED, json!({"job": "x"}))
        .unwrap_err();
    assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");

    assert!(mon.cleanup_event_channel("job0"));
    assert!(!mon.cleanup_event_channel("job0"));
    assert!(within(5, job.recv()).await.is_none());
    mon.disconnect();
}

/// Incus's own wiring: the monitor leaves block-job events to the handler,
/// which pushes them to the device's channel, so the channel gets each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incus_style_handler_pushes_each_block_job_event_once() {
    let vm = agent_vm(&[]).await;
    let registry = MonitorRegistry::new();
    let (pushed_tx, mut pushed) = tokio::sync::mpsc::unbounded_channel();
    let options = MonitorOptions::new().event_handler(move |mon, ev| {
        if ev.name() == EVENT_BLOCK_JOB_COMPLETED {
            let delivery = mon.push_event(ev.name(), ev.data().clone()).unwrap();
            let _ = pushed_tx.send(delivery);
        }
    });
    let mon = within(10, registry.connect(vm.socket("mon"), options))
        .await
        .unwrap();
    let mut job = mon.create_event_channel("job1").unwrap();
    blockdev(
        &mon,
        json!({"driver": "null-co", "node-name": "src", "size": 1 << 20, "read-zeroes": true}),
    )
    .await;
    blockdev(
        &mon,
        json!({"driver": "null-co", "node-name": "dst", "size": 1 << 20}),
    )
    .await;
    let _: Value = mon
        .call(
            "blockdev-backup",
            &json!({"device": "src", "target": "dst", "sync": "full", "job-id": "job1"}),
        )
        .await
        .unwrap();
    assert_eq!(within(20, pushed.recv()).await, Some(Delivery::Delivered));
    let ev = within(10, job.recv()).await.unwrap();
    assert_eq!(
        (ev.name(), ev.data()["device"].as_str()),
        (EVENT_BLOCK_JOB_COMPLETED, Some("job1"))
    );
    // The handler has pushed; nothing else was: the closed channel is empty.
    assert!(mon.cleanup_event_channel("job1"));
    assert!(within(5, job.recv()).await.is_none(), "the event arrived twice");
    mon.disconnect();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushing_with_nobody_reading_never_blocks() {
    let server = FakeServer::instant().await.unwrap();
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(server.path(), MonitorOptions::new()))
        .await
        .unwrap();
    let unread = mon.create_event_channel("disk0").unwrap();
    let outcomes = within(10, async {
        (0..EVENT_CHANNEL_CAPACITY + 10)
            .map(|n| {
                mon.push_event("BLOCK_JOB_COMPLETED", json!({"device": "disk0", "n": n}))
                    .unwrap()
            })
            .collect::<Vec<_>>()
    })
    .await;
    assert!(outcomes[..EVENT_CHANNEL_CAPACITY]
        .iter()
        .all(|d| *d == Delivery::Delivered));
    assert!(outcomes[EVENT_CHANNEL_CAPACITY..]
        .iter()
        .all(|d| *d == Delivery::Full));
    // A reader that went away unregisters its channel; a new one can be made.
    drop(unread);
    assert_eq!(
        mon.push_event("BLOCK_JOB_COMPLETED", json!({"device": "disk0"}))
            .unwrap(),
        Delivery::ReaderGone
    );
    let mut fresh = mon.create_event_channel("disk0").unwrap();
    assert_eq!(
        mon.push_event("BLOCK_JOB_ERROR", json!({"device": "disk0"}))
            .unwrap(),
        Delivery::Delivered
    );
    assert_eq!(fresh.recv().await.unwrap().name(), "BLOCK_JOB_ERROR");
    mon.disconnect();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemus_shutdown_survives_a_handler_that_fell_behind() {
    // On "go": a burst of events ending in SHUTDOWN, then the socket closes.
    let server = FakeServer::start(|mut conn: FakeConn| async move {
        if conn.handshake().await.is_err() {
            return;
        }
        let Ok(Some(req)) = conn.recv().await else { return };
        let _ = conn.reply(&req, json!({})).await;
        for n in 0..100 {
            let _ = conn.event("TICK", json!({"n": n})).await;
        }
        let _ = conn
            .event("SHUTDOWN", json!({"guest": true, "reason": "guest-shutdown"}))
            .await;
    })
    .await
    .unwrap();
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let (tx, mut seen) = mpsc::unbounded_channel();
    let options = MonitorOptions::new()
        .event_queue(4)
        .async_event_handler(move |_mon, ev| {
            let (tx, mut release) = (tx.clone(), release.clone());
            async move {
                let _ = release.wait_for(|r| *r).await;
                let _ = tx.send(ev);
            }
        });
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(server.path(), options))
        .await
        .unwrap();
    mon.set_initialized(true);
    let _: Value = within(10, mon.call("go", &())).await.unwrap();
    within(10, mon.closed()).await;
    release_tx.send_replace(true);
    within(10, mon.wait()).await;
    let all = drain(&mut seen);
    assert!(all.len() < 101, "the handler's queue dropped events");
    let shutdowns: Vec<&Event> = all.iter().filter(|e| e.name() == EVENT_VM_SHUTDOWN).collect();
    assert_eq!(shutdowns.len(), 1, "{all:?}");
    assert_eq!(shutdowns[0].data()["reason"], "guest-shutdown");
}

/// A missing agent chardev is read once, at connect, and never polled after:
/// every read would fail the same way (the fake counts them, which QEMU cannot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_agent_chardev_is_not_polled() {
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = reads.clone();
    let server = FakeServer::start(move |mut conn: FakeConn| {
        let reads = counted.clone();
        async move {
            if conn.handshake().await.is_err() {
                return;
            }
            while let Ok(Some(req)) = conn.recv().await {
                let r = match req.name.as_deref() {
                    Some("ringbuf-read") => {
                        reads.fetch_add(1, Ordering::SeqCst);
                        conn.reply_error(&req, "GenericError", "Device 'agent0' not found")
                            .await
                    }
                    Some("poke") => {
                        let r = conn.event("POKED", json!({})).await;
                        r.and(conn.reply(&req, json!({})).await)
                    }
                    _ => conn.reply(&req, json!({})).await,
                };
                if r.is_err() {
                    return;
                }
            }
        }
    })
    .await
    .unwrap();
    let (options, mut events) = recording(
        MonitorOptions::new()
            .serial_chardev("agent0")
            .agent_poll_interval(Duration::from_millis(1)),
    );
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(server.path(), options))
        .await
        .unwrap();
    assert_eq!(reads.load(Ordering::SeqCst), 1, "the read at connect");
    // Each event would prompt a read, and the poll is due every millisecond.
    for _ in 0..20 {
        let _: Value = within(10, mon.call("poke", &())).await.unwrap();
        next_named(&mut events, "POKED").await;
    }
    assert_eq!(reads.load(Ordering::SeqCst), 1, "no read after connect");
    assert!(!mon.agent_started());
    mon.disconnect();
}

/// `STARTED\n`, as `ringbuf-read` returns it in base64.
const STARTED_B64: &str = "U1RBUlRFRAo=";

/// A fake QEMU whose second ring-buffer read (the first periodic poll) gets
/// no answer until the client sends `go`, then finds `STARTED`; meanwhile it
/// sends `burst`. Every other read finds the buffer empty. Also returns the
/// number of reads so far.
async fn fake_with_a_stuck_read(
    burst: Vec<(&'static str, Value)>,
) -> (FakeServer, Arc<std::sync::atomic::AtomicUsize>) {
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = reads.clone();
    let server = FakeServer::start(move |mut conn: FakeConn| {
        let (reads, burst) = (counted.clone(), burst.clone());
        async move {
            if conn.handshake().await.is_err() {
                return;
            }
            let mut held = None;
            while let Ok(Some(req)) = conn.recv().await {
                let r = match req.name.as_deref() {
                    Some("ringbuf-read") if reads.fetch_add(1, Ordering::SeqCst) == 1 => {
                        held = Some(req);
                        let mut r = Ok(());
                        for (name, data) in &burst {
                            r = r.and(conn.event(name, data.clone()).await);
                        }
                        r
                    }
                    Some("ringbuf-read") => conn.reply(&req, json!("")).await,
                    Some("go") => {
                        let read = held.take().expect("the held read");
                        let r = conn.reply(&read, json!(STARTED_B64)).await;
                        r.and(conn.reply(&req, json!({})).await)
                    }
                    _ => conn.reply(&req, json!({})).await,
                };
                if r.is_err() {
                    return;
                }
            }
        }
    })
    .await
    .unwrap();
    (server, reads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_agent_read_holds_up_no_event_and_a_handler_may_check_the_agent() {
    let ticks = (0..20).map(|n| ("TICK", json!({"n": n}))).collect();
    let (server, reads) = fake_with_a_stuck_read(ticks).await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let options = MonitorOptions::new()
        .serial_chardev("agent0")
        .agent_poll_interval(Duration::from_millis(50))
        .async_event_handler(move |mon, ev| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(ev.name().to_owned());
                if ev.name() == "TICK" && ev.data()["n"] == 19 {
                    // Waits for the stuck read to give up the ring buffer:
                    // the monitor must keep that read going meanwhile.
                    let started = mon.check_agent().await.expect("check_agent in the handler");
                    let _ = tx.send(format!("checked {started}"));
                }
            }
        });
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(server.path(), options))
        .await
        .unwrap();
    // All 20 events reach the handler while the read is still unanswered.
    for n in 0..20 {
        assert_eq!(within(10, seen.recv()).await.unwrap(), "TICK", "event {n}");
    }
    assert!(!mon.agent_started());
    let _: Value = within(10, mon.call("go", &())).await.unwrap();
    // The handler's own check ends once the stuck read has (no deadlock),
    // and the transition that read found follows the event being handled.
    assert_eq!(within(10, seen.recv()).await.unwrap(), "checked true");
    assert_eq!(within(10, seen.recv()).await.unwrap(), EVENT_AGENT_STARTED);
    assert!(mon.agent_started());
    // Polling goes on after the stuck read.
    let after = reads.load(Ordering::SeqCst);
    eventually(10, || async {
        (reads.load(Ordering::SeqCst) >= after + 3).then_some(())
    })
    .await;
    mon.disconnect();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_read_follows_a_panic_or_a_shutdown() {
    // QEMU 10 can hang on its way out when a command reaches it as it
    // exits, which is when a guest's panic or shutdown would prompt a read.
    // The fake counts ring-buffer reads and says how many on `count`.
    let server = FakeServer::start(|mut conn: FakeConn| async move {
        if conn.handshake().await.is_err() {
            return;
        }
        let mut reads = 0;
        while let Ok(Some(req)) = conn.recv().await {
            let ret = match req.name.as_deref() {
                Some("ringbuf-read") => {
                    reads += 1;
                    json!("")
                }
                Some("count") => json!(reads),
                _ => json!({}),
            };
            if conn.reply(&req, ret).await.is_err() {
                return;
            }
            if req.name.as_deref() == Some("go") {
                for (name, data) in [
                    ("GUEST_PANICKED", json!({"action": "poweroff"})),
                    ("SHUTDOWN", json!({"guest": true, "reason": "guest-panic"})),
                    ("SENTINEL", json!({})),
                ] {
                    if conn.event(name, data).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await
    .unwrap();
    let (options, mut events) = recording(
        MonitorOptions::new()
            .serial_chardev("agent0")
            .agent_poll_interval(Duration::from_secs(3600)),
    );
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(server.path(), options))
        .await
        .unwrap();
    let count = || async { within(10, mon.call::<_, u64>("count", &())).await.unwrap() };
    assert_eq!(count().await, 1, "the read at connect");
    let _: Value = within(10, mon.call("go", &())).await.unwrap();
    // Handled in order: by SENTINEL, a read prompted by either would have been sent.
    next_named(&mut events, "SENTINEL").await;
    assert_eq!(count().await, 1, "no read after GUEST_PANICKED or SHUTDOWN");
    // check_agent still reads when asked.
    assert!(!within(10, mon.check_agent()).await.unwrap());
    assert_eq!(count().await, 2);
    mon.disconnect();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_transition_read_as_qemu_vanishes_comes_before_the_shutdown_notice() {
    // The first periodic read finds STARTED, and QEMU is gone right after.
    let server = FakeServer::start(|mut conn: FakeConn| async move {
        if conn.handshake().await.is_err() {
            return;
        }
        let mut reads = 0;
        while let Ok(Some(req)) = conn.recv().await {
            let ret = match req.name.as_deref() {
                Some("ringbuf-read") => {
                    reads += 1;
                    json!(if reads == 2 { STARTED_B64 } else { "" })
                }
                _ => json!({}),
            };
            if conn.reply(&req, ret).await.is_err() || reads == 2 {
                return;
            }
        }
    })
    .await
    .unwrap();
    let (options, mut events) = recording(
        MonitorOptions::new()
            .serial_chardev("agent0")
            .agent_poll_interval(Duration::from_millis(50)),
    );
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(server.path(), options))
        .await
        .unwrap();
    mon.set_initialized(true);
    within(10, mon.wait()).await;
    let names: Vec<String> = drain(&mut events).iter().map(|e| e.name().to_owned()).collect();
    // QEMU vanished with the agent up: it stopped too, before the notice.
    assert_eq!(
        names,
        [EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED, EVENT_VM_SHUTDOWN]
    );
    assert!(!mon.agent_started(), "forgotten once the monitor ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_during_a_stuck_agent_read_waits_for_it_and_keeps_the_order() {
    let (server, reads) =
        fake_with_a_stuck_read(vec![("RESET", json!({"guest": true, "reason": "guest-reset"}))]).await;
    let (options, mut events) = recording(
        MonitorOptions::new()
            .serial_chardev("agent0")
            .agent_poll_interval(Duration::from_millis(50)),
    );
    let registry = MonitorRegistry::new();
    let mon = within(10, registry.connect(server.path(), options))
        .await
        .unwrap();
    // The RESET forgets the agent, which waits for the read in flight; the
    // monitor keeps that read going, so the reply to it ends the wait.
    eventually(10, || async { (reads.load(Ordering::SeqCst) >= 2).then_some(()) }).await;
    let _: Value = within(10, mon.call("go", &())).await.unwrap();
    let mut names = Vec::new();
    while names.len() < 3 {
        names.push(within(10, events.recv()).await.unwrap().name().to_owned());
    }
    // What the read found, then the RESET that took the agent down.
    assert_eq!(names, [EVENT_AGENT_STARTED, EVENT_VM_RESET, EVENT_AGENT_STOPPED]);
    assert!(!mon.agent_started());
    mon.disconnect();
}
