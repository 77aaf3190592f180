//! `qmpctl agent` against Debian's qemu-ga running on the host (only
//! harmless commands enabled: see `HostGuestAgent`), and its bad inputs.
//! What would act on the host (freezing, shutting down, passwords) is
//! checked to be refused by that agent; the guest tests run them for real.

mod support;

use qmpkit::launch::HostGuestAgent;
use support::*;
use tokio::io::AsyncReadExt;

async fn host_agent() -> HostGuestAgent {
    HostGuestAgent::spawn()
        .await
        .expect("qemu-ga (apt-get install qemu-guest-agent)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_info_osinfo_time_interfaces() {
    let host = host_agent().await;
    let sock = host.socket();
    let r = ctl(&sock, &["agent", "ping"]).await.ok();
    assert_eq!(r.stdout.trim(), "the guest agent answered");

    let r = ctl(&sock, &["agent", "info"]).await.ok();
    assert!(r.stdout.starts_with("qemu-ga 10."), "{}", r.stdout);
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("guest-exec ") && l.ends_with("yes")),
        "{}",
        r.stdout
    );
    let info = ctl(&sock, &["--json", "agent", "info"]).await.ok().json();
    let cmds = info["supported_commands"].as_array().unwrap();
    assert!(cmds
        .iter()
        .any(|c| c["name"] == "guest-shutdown" && c["enabled"] == false));

    let os = ctl(&sock, &["--json", "agent", "osinfo"]).await.ok().json();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(os["kernel-release"], release.trim());
    let r = ctl(&sock, &["agent", "osinfo"]).await.ok();
    assert!(
        r.stdout.contains(&format!("kernel-release: {}", release.trim())),
        "{}",
        r.stdout
    );

    let t = ctl(&sock, &["--json", "agent", "time"]).await.ok().json();
    assert!(t["time-ns"].as_i64().unwrap() > 1_600_000_000_000_000_000, "{t}");
    let r = ctl(&sock, &["agent", "time"]).await.ok();
    assert!(r.stdout.trim().ends_with('Z'), "{}", r.stdout);

    let r = ctl(&sock, &["agent", "interfaces"]).await.ok();
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("lo ") && l.contains("127.0.0.1/8")),
        "{}",
        r.stdout
    );
    // The agent is still usable by others after each qmpctl run.
    ctl(&sock, &["agent", "ping"]).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_exits_with_the_programs_status_and_prints_its_output() {
    let host = host_agent().await;
    let sock = host.socket();
    let r = ctl(
        &sock,
        &["agent", "exec", "/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
    )
    .await;
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(r.stdout, "out\n");
    assert_eq!(r.stderr, "err\n");
    let r = ctl(&sock, &["--json", "agent", "exec", "/bin/sh", "-c", "printf hi"])
        .await
        .ok();
    let v = r.json();
    assert_eq!(
        (v["exit-code"].as_i64(), v["stdout"].as_str()),
        (Some(0), Some("hi"))
    );
    let r = ctl(&sock, &["agent", "exec", "/bin/sh", "-c", "kill -9 $$"]).await;
    assert_eq!(r.code, 128 + 9, "{r:?}");
    // A program that does not exist: the agent's error, exit 3.
    ctl(&sock, &["agent", "exec", "/nonexistent"])
        .await
        .fails(3, "guest-exec");
    // One that runs too long: exit 5.
    ctl(&sock, &["--timeout", "300ms", "agent", "exec", "/bin/sleep", "5"])
        .await
        .fails(5, "timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_put_and_get_round_trip_through_the_host_filesystem() {
    let host = host_agent().await;
    let sock = host.socket();
    let local = host.dir().join("local.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    let remote = host.dir().join("remote.bin");
    let r = ctl(
        &sock,
        &[
            "agent",
            "file",
            "put",
            local.to_str().unwrap(),
            remote.to_str().unwrap(),
        ],
    )
    .await
    .ok();
    assert!(r.stdout.contains("copied 300000 bytes"), "{}", r.stdout);
    assert_eq!(std::fs::read(&remote).unwrap(), data);

    let back = host.dir().join("back.bin");
    let r = ctl(
        &sock,
        &[
            "--json",
            "agent",
            "file",
            "get",
            remote.to_str().unwrap(),
            back.to_str().unwrap(),
        ],
    )
    .await
    .ok();
    assert_eq!(r.json()["bytes"], 300000);
    assert_eq!(std::fs::read(&back).unwrap(), data);

    let r = ctl_stdin(
        &sock,
        &["agent", "file", "put", "-", remote.to_str().unwrap()],
        "from stdin\n",
    )
    .await
    .ok();
    assert!(r.stdout.contains("copied 11 bytes"), "{}", r.stdout);
    let r = ctl(&sock, &["agent", "file", "get", remote.to_str().unwrap(), "-"])
        .await
        .ok();
    assert_eq!(r.stdout, "from stdin\n");

    let missing = host.dir().join("no/such");
    ctl(
        &sock,
        &[
            "agent",
            "file",
            "get",
            missing.to_str().unwrap(),
            back.to_str().unwrap(),
        ],
    )
    .await
    .fails(3, "guest-file-open");
    ctl(
        &sock,
        &[
            "agent",
            "file",
            "put",
            "/nonexistent/local",
            remote.to_str().unwrap(),
        ],
    )
    .await
    .fails(1, "cannot read /nonexistent/local");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_the_host_agent_refuses_fail_with_its_error_and_the_password_stays_secret() {
    let host = host_agent().await;
    let sock = host.socket();
    // Disabled on the host's agent: nothing happens to this machine.
    ctl(&sock, &["agent", "fsfreeze", "freeze"])
        .await
        .fails(3, "disabled");
    ctl(&sock, &["agent", "fsfreeze", "thaw"])
        .await
        .fails(3, "disabled");
    let r = ctl(&sock, &["agent", "fsfreeze", "status"]).await.ok();
    assert_eq!(r.stdout.trim(), "thawed");
    ctl(&sock, &["agent", "shutdown", "--mode", "reboot"])
        .await
        .fails(3, "disabled");
    let secret = "Sup3r-secret-pw";
    let r = ctl_stdin(
        &sock,
        &["-vv", "agent", "set-password", "root"],
        &format!("{secret}\n"),
    )
    .await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains("qmpctl: guest-set-user-password") && r.stderr.contains("disabled"),
        "{}",
        r.stderr
    );
    // The trace shows the command went out, without its arguments.
    assert!(
        r.stderr.contains("guest-set-user-password <redacted>"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains(secret) && !r.stdout.contains(secret),
        "{}",
        r.stderr
    );
    ctl_stdin(&sock, &["agent", "set-password", "root"], "")
        .await
        .fails(2, "no password");
    // The agent still answers.
    ctl(&sock, &["agent", "ping"]).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sockets_fail_typed_and_fast() {
    let dir = tempfile::tempdir().unwrap();
    ctl(&dir.path().join("missing.sock"), &["agent", "ping"])
        .await
        .fails(4, "cannot reach the guest agent");
    run_ctl(&["agent", "ping"], None, None)
        .await
        .fails(2, "no guest agent socket");
    ctl(
        &dir.path().join("missing.sock"),
        &["--log", "/dev/null", "agent", "ping"],
    )
    .await
    .fails(2, "no traffic log");

    // A socket nobody answers on (a QMP socket would greet first, then say
    // nothing to the sync: the same thing).
    let path = dir.path().join("silent.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let _peer = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            held.push(s);
        }
    });
    ctl(&path, &["--connect-timeout", "500ms", "agent", "ping"])
        .await
        .fails(4, "not answering");

    // A QMP socket given by mistake: the greeting is noise, the sync unanswered.
    let vm = vm().await;
    ctl(
        &vm.socket("cli"),
        &["--connect-timeout", "500ms", "agent", "ping"],
    )
    .await
    .fails(4, "not answering");
}
