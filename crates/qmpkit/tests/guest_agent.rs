//! The guest agent client against Debian's `qemu-ga` in the real test guest
//! (scripts/build-guest-image starts it when the kernel command line says
//! `qmpkit.qga`), under TCG. Every operation's effect is checked in the
//! guest, through its serial console; a guest reboot and a shutdown through
//! the agent are seen on QMP.

mod common;

use std::time::Duration;

use common::guest::{guest_image, Console, APPEND, BOOT_SECS, READY};
use common::{eventually, vm_with, within};
use qmpkit::guest_agent::{ExecRequest, FsFreezeStatus, GuestAgent, ShutdownMode};
use qmpkit::launch::QemuBuilder;
use qmpkit::{Error, EventFilter};

/// A guest with the agent's port, its console connected, CPUs running, and a
/// client that has synced with the agent in the guest.
struct AgentGuest {
    vm: common::Vm,
    console: Console,
    agent: GuestAgent,
}

impl Drop for AgentGuest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.console.take_what_is_there();
            eprintln!(
                "console:\n{}\nQEMU's stderr:\n{}",
                self.console.tail(),
                self.vm.stderr()
            );
        }
    }
}

async fn boot(extra: &[&str]) -> AgentGuest {
    let image = guest_image();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let vm = vm_with(|b: QemuBuilder| {
        b.accel("tcg")
            .memory("256M")
            .kernel(&image.kernel, &image.initrd, format!("{APPEND} qmpkit.qga"))
            .console_socket()
            .guest_agent_port()
            .args(extra)
    })
    .await;
    let mut console = Console::connect(&vm.console_socket()).await;
    // Connected before the guest runs: the first call's sync waits for it.
    let agent = GuestAgent::options()
        .sync_on_connect(false)
        .connect(vm.guest_agent_socket())
        .await
        .expect("the agent port's socket");
    within(10, vm.client().start()).await.expect("cont");
    console.line_with(READY, BOOT_SECS).await;
    within(
        BOOT_SECS,
        agent.with_timeout(Duration::from_secs(BOOT_SECS)).sync(),
    )
    .await
    .expect("qemu-ga in the guest answers");
    AgentGuest { vm, console, agent }
}

impl AgentGuest {
    /// Runs a shell command on the guest's console and returns what it
    /// printed (one line).
    async fn sh(&mut self, script: &str) -> String {
        self.console.send(&format!("sh echo \"@out $({script})\"")).await;
        let line = self.console.line_with("@out", 60).await;
        line[line.find("@out").unwrap() + 4..].trim().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_typed_operation_takes_effect_in_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    // A blank disk the guest formats (busybox mke2fs) and mounts: the
    // initramfs's own root cannot be frozen.
    let disk = dir.path().join("scratch.raw");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let drive = format!("file={},format=raw,if=none,id=scratch", disk.display());
    let mut g = boot(&["-drive", &drive, "-device", "virtio-blk-pci,drive=scratch"]).await;
    let agent = g.agent.clone();

    // Who and what the guest is.
    agent.ping().await.unwrap();
    let info = agent.info().await.unwrap();
    assert!(info.version.starts_with("10."), "{}", info.version);
    for cmd in [
        "guest-exec",
        "guest-file-open",
        "guest-fsfreeze-freeze",
        "guest-shutdown",
        "guest-set-user-password",
    ] {
        assert!(info.supports(cmd), "{cmd} missing from {info:?}");
    }
    let os = agent.os_info().await.unwrap();
    assert_eq!(os.id.as_deref(), Some("qmpkit-guest"));
    assert_eq!(os.pretty_name.as_deref(), Some("qmpkit test guest 1"));
    assert_eq!(
        os.kernel_release.as_deref(),
        Some(g.sh("uname -r").await.as_str())
    );
    assert_eq!(agent.host_name().await.unwrap(), "qmpkit-guest");
    let ifaces = agent.network_interfaces().await.unwrap();
    let lo = ifaces.iter().find(|i| i.name == "lo").expect("lo");
    assert!(
        lo.ip_addresses.iter().any(|a| a.ip_address == "127.0.0.1"),
        "{lo:?}"
    );

    // The clock, set and read back, and seen by the guest's own date.
    let y2030_ns: i64 = 1_893_456_000 * 1_000_000_000;
    agent.set_time(Some(y2030_ns)).await.unwrap();
    let now = agent.time_ns().await.unwrap();
    assert!((y2030_ns..y2030_ns + 3_600_000_000_000).contains(&now), "{now}");
    assert_eq!(g.sh("date -u +%Y").await, "2030");

    // Programs: exit status, both outputs, stdin, and an effect on the guest.
    let out = agent
        .exec_and_wait(&ExecRequest::new("/bin/sh").args(["-c", "echo out; echo err >&2; exit 3"]))
        .await
        .unwrap();
    assert_eq!(
        (out.exit_code, out.stdout.as_slice(), out.stderr.as_slice()),
        (Some(3), &b"out\n"[..], &b"err\n"[..])
    );
    let out = agent
        .exec_and_wait(
            &ExecRequest::new("/bin/sh")
                .args(["-c", "cat >/tmp/from-exec"])
                .input(&b"via stdin"[..]),
        )
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(g.sh("cat /tmp/from-exec").await, "via stdin");

    // Files: written through the agent, read on the console, and back.
    agent
        .write_file("/tmp/agent-file", b"written by the agent\n")
        .await
        .unwrap();
    assert_eq!(g.sh("cat /tmp/agent-file").await, "written by the agent");
    g.sh("echo typed on the console >/tmp/console-file").await;
    assert_eq!(
        agent.read_file("/tmp/console-file").await.unwrap(),
        b"typed on the console\n"
    );
    let big: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    agent.write_file("/tmp/big", &big).await.unwrap();
    assert_eq!(g.sh("wc -c </tmp/big").await, "1500000");
    assert_eq!(agent.read_file("/tmp/big").await.unwrap(), big);

    // Freezing: the scratch filesystem is frozen (a write to it blocks) and
    // thawed (the write completes).
    assert_eq!(g.sh("mke2fs -q /dev/vda >/dev/null 2>&1 && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo mounted").await, "mounted");
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FsFreezeStatus::Thawed);
    let frozen = agent.fsfreeze_freeze().await.unwrap();
    assert_eq!(frozen, 1, "only the scratch disk can freeze");
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FsFreezeStatus::Frozen);
    // While frozen the agent refuses what could write.
    let e = agent.write_file("/tmp/refused", b"x").await.unwrap_err();
    assert!(e.is_qmp() && e.to_string().contains("disabled"), "{e:?}");
    g.sh("sh -c 'echo frozen-write >/mnt/w; echo done >/tmp/wdone' </dev/null >/dev/null 2>&1 & echo $! >/tmp/wpid").await;
    // The writer blocks in the kernel (state D) on the frozen filesystem.
    let mut state = String::new();
    for _ in 0..100 {
        state = g.sh("cut -d' ' -f3 /proc/$(cat /tmp/wpid)/stat").await;
        if state == "D" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, "D", "the writer should block on the frozen filesystem");
    assert_eq!(
        g.sh("cat /tmp/wdone 2>/dev/null || echo pending").await,
        "pending"
    );
    assert_eq!(agent.fsfreeze_thaw().await.unwrap(), 1);
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FsFreezeStatus::Thawed);
    let mut done = String::new();
    for _ in 0..100 {
        done = g.sh("cat /tmp/wdone 2>/dev/null || echo pending").await;
        if done == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(done, "done");
    assert_eq!(g.sh("cat /mnt/w").await, "frozen-write");
    assert_eq!(agent.fsfreeze_freeze_list(&["/mnt"]).await.unwrap(), 1);
    assert_eq!(agent.fsfreeze_thaw().await.unwrap(), 1);

    // Passwords: a hash given as is, then a plain one the guest hashes.
    let hash = "$6$qmpkitsalt$Xq0LhbZ2u7bU3c3m0J3fS8Zk1aQmM9p0y2kK8vQm9q3oVf1bQZr1B7xKpD9xZ0gN5s1HcT2u4wYy6eE8rR0a1.";
    agent.set_user_password("tester", hash, true).await.unwrap();
    assert_eq!(g.sh("grep ^tester: /etc/shadow | cut -d: -f2").await, hash);
    agent
        .set_user_password("tester", "s3cret pass", false)
        .await
        .unwrap();
    let stored = g.sh("grep ^tester: /etc/shadow | cut -d: -f2").await;
    assert!(
        stored.starts_with('$') && stored != hash && !stored.contains("s3cret"),
        "{stored}"
    );
    let e = agent
        .set_user_password("nobody-here", "x", false)
        .await
        .unwrap_err();
    assert!(e.is_qmp(), "{e:?}");
    agent.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_resyncs_across_a_guest_reboot_and_shutdown_is_seen_on_qmp() {
    let mut g = boot(&[]).await;
    let mut events = g.vm.client().events();
    // The traffic log, and so the suites' event audit, leaves these out.
    let mut port_changes = g.vm.client().subscribe(EventFilter::names(["VSERPORT_CHANGE"]));
    let agent = g.agent.clone();
    agent.write_file("/tmp/before-reboot", b"x").await.unwrap();

    // A reboot through the agent: no reply, QMP sees the reset.
    agent.shutdown(ShutdownMode::Reboot).await.unwrap();
    within(60, events.wait_for("RESET")).await.unwrap();
    // While the guest reboots, nobody reads the port: a call fails typed.
    let e = agent
        .with_timeout(Duration::from_millis(500))
        .ping()
        .await
        .unwrap_err();
    assert!(e.is_agent_unavailable() || e.is_timeout(), "{e:?}");
    g.console.line_with(READY, BOOT_SECS).await;
    // The same client, once the new agent is up: everything queued meanwhile
    // is dropped by the resync.
    within(
        BOOT_SECS,
        agent.with_timeout(Duration::from_secs(BOOT_SECS)).ping(),
    )
    .await
    .unwrap();
    // A fresh boot: the file from before is gone.
    let e = agent.read_file("/tmp/before-reboot").await.unwrap_err();
    assert!(e.is_qmp(), "{e:?}");
    // The agent closed its port at the reboot and opened it again: both
    // events decode into their typed form and back unchanged.
    let mut opened = Vec::new();
    while let Some(ev) = port_changes.try_next() {
        let problems = common::event_audit::problems_of(ev.name(), ev.data());
        assert!(problems.is_empty(), "{problems:?}");
        opened.push(ev.data()["open"] == true);
    }
    assert!(
        opened.contains(&false) && opened.last() == Some(&true),
        "{opened:?}"
    );

    // A power-off through the agent: QEMU announces SHUTDOWN (the guest's own).
    agent.shutdown(ShutdownMode::Powerdown).await.unwrap();
    let ev = within(60, events.wait_for("SHUTDOWN")).await.unwrap();
    assert_eq!(ev.data()["guest"], true, "{ev:?}");
    // QEMU exits and the port's socket with it: typed errors, no hang.
    assert!(within(60, g.vm.wait_exit(Duration::from_secs(60)))
        .await
        .is_some());
    let e = within(10, agent.ping()).await.unwrap_err();
    assert!(e.is_disconnected() || matches!(e, Error::Connect { .. }), "{e:?}");
}

#[tokio::test]
async fn a_port_with_no_agent_behind_it_fails_typed_without_hanging() {
    // QEMU's socket accepts, but with the CPUs stopped nobody reads the port.
    let vm = vm_with(|b: QemuBuilder| b.guest_agent_port()).await;
    let e = within(
        10,
        GuestAgent::options()
            .connect_timeout(Duration::from_millis(800))
            .connect(vm.guest_agent_socket()),
    )
    .await
    .unwrap_err();
    assert!(e.is_agent_unavailable(), "{e:?}");
    let agent = GuestAgent::options()
        .sync_on_connect(false)
        .command_timeout(Duration::from_millis(600))
        .connect(vm.guest_agent_socket())
        .await
        .unwrap();
    for _ in 0..3 {
        let e = within(10, agent.exec_and_wait(&ExecRequest::new("/bin/true")))
            .await
            .unwrap_err();
        assert!(e.is_agent_unavailable(), "{e:?}");
    }
    // QEMU itself is fine.
    let status: serde_json::Value = vm
        .client()
        .execute_raw("query-status", serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(status["status"], "prelaunch");
    // The socket of a VM that is gone.
    let path = vm.guest_agent_socket();
    drop(vm);
    let e = eventually(10, || async { GuestAgent::connect(&path).await.err() }).await;
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
}
