//! The guest agent client against Debian's `qemu-ga` running on the host
//! (`-m unix-listen`, only harmless commands enabled), and against a fake
//! agent for what a real one will not do on demand (noise, stale replies,
//! silence, queued requests).

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, within};
use qmpkit::guest_agent::{ExecRequest, GuestAgent, Whence};
use qmpkit::launch::HostGuestAgent;
use qmpkit::Error;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

async fn host_agent() -> (HostGuestAgent, GuestAgent) {
    let host = HostGuestAgent::spawn()
        .await
        .expect("qemu-ga (apt-get install qemu-guest-agent)");
    let agent = GuestAgent::connect(host.socket()).await.expect("connect");
    (host, agent)
}

#[tokio::test]
async fn host_agent_answers_ping_info_osinfo_hostname_time_interfaces() {
    let (_host, agent) = host_agent().await;
    within(30, async {
        agent.ping().await.unwrap();
        let info = agent.info().await.unwrap();
        assert!(info.version.starts_with("10."), "{}", info.version);
        assert!(info.supports("guest-exec") && info.supports("guest-file-read"));
        // Left out of the host's allow list, so listed but disabled.
        assert!(info
            .supported_commands
            .iter()
            .any(|c| c.name == "guest-shutdown" && !c.enabled));
        assert!(!info.supports("guest-shutdown"));
        let shutdown = info
            .supported_commands
            .iter()
            .find(|c| c.name == "guest-shutdown")
            .unwrap();
        assert!(!shutdown.success_response);

        let os = agent.os_info().await.unwrap();
        let kernel = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
                .unwrap()
                .trim()
                .to_owned()
        };
        assert_eq!(os.kernel_release.as_deref(), Some(kernel("osrelease").as_str()));
        assert_eq!(os.machine.as_deref(), Some(std::env::consts::ARCH));

        assert_eq!(agent.host_name().await.unwrap(), kernel("hostname"));

        let ns = agent.time_ns().await.unwrap();
        assert!(ns > 1_600_000_000_000_000_000, "{ns}");

        let ifaces = agent.network_interfaces().await.unwrap();
        let lo = ifaces.iter().find(|i| i.name == "lo").expect("lo");
        assert!(lo
            .ip_addresses
            .iter()
            .any(|a| a.ip_address == "127.0.0.1" && a.prefix == 8));

        // A command the agent refuses is QEMU's kind of error, and the connection stays fine.
        let e = agent
            .execute_raw("guest-get-users", Value::Null)
            .await
            .unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        assert!(e.to_string().contains("disabled"), "{e}");
        agent.ping().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn host_agent_exec_reports_exit_status_and_both_outputs() {
    let (_host, agent) = host_agent().await;
    within(30, async {
        let out = agent
            .exec_and_wait(&ExecRequest::new("/bin/sh").args(["-c", "echo out; echo err >&2; exit 3"]))
            .await
            .unwrap();
        assert!(out.exited && !out.success());
        assert_eq!(out.exit_code, Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");

        let out = agent
            .exec_and_wait(&ExecRequest::new("/bin/cat").input(&b"to stdin\n"[..]))
            .await
            .unwrap();
        assert!(out.success());
        assert_eq!(out.stdout, b"to stdin\n");

        let out = agent
            .exec_and_wait(&ExecRequest::new("/bin/sh").args(["-c", "kill -9 $$"]))
            .await
            .unwrap();
        assert_eq!(out.signal, Some(9));

        let e = agent
            .exec_and_wait(&ExecRequest::new("/nonexistent/program"))
            .await
            .unwrap_err();
        assert!(e.is_qmp(), "{e:?}");

        // A program that outlives the budget: a typed timeout, and the agent still answers.
        let marker = _host.dir().join("slow-started");
        let e = agent
            .with_timeout(Duration::from_millis(300))
            .exec_and_wait(
                &ExecRequest::new("/bin/sh")
                    .args(["-c", &format!("touch {}; exec sleep 5", marker.display())]),
            )
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        assert!(marker.exists());
        agent.ping().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn host_agent_files_round_trip_and_match_the_host_filesystem() {
    let (host, agent) = host_agent().await;
    within(60, async {
        let path = host.dir().join("data.bin");
        let p = path.to_str().unwrap();
        // More than one chunk each way, every byte value.
        let data: Vec<u8> = (0..2_500_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        agent.write_file(p, &data).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(agent.read_file(p).await.unwrap(), data);

        std::fs::write(&path, b"0123456789").unwrap();
        let h = agent.file_open(p, "r+").await.unwrap();
        let pos = agent.file_seek(h, 4, Whence::Set).await.unwrap();
        assert_eq!(pos.position, 4);
        let chunk = agent.file_read(h, 3).await.unwrap();
        assert_eq!(chunk.data, b"456");
        assert!(!chunk.eof);
        assert_eq!(agent.file_seek(h, -2, Whence::End).await.unwrap().position, 8);
        assert_eq!(agent.file_write(h, b"XY").await.unwrap(), 2);
        agent.file_flush(h).await.unwrap();
        agent.file_close(h).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"01234567XY");
        // The handle is gone.
        assert!(agent.file_read(h, 1).await.unwrap_err().is_qmp());

        let empty = host.dir().join("empty");
        agent.write_file(empty.to_str().unwrap(), b"").await.unwrap();
        assert_eq!(std::fs::read(&empty).unwrap(), b"");
        assert_eq!(agent.read_file(empty.to_str().unwrap()).await.unwrap(), b"");

        let missing = host.dir().join("no/such/file");
        let e = agent.read_file(missing.to_str().unwrap()).await.unwrap_err();
        assert!(e.is_qmp(), "{e:?}");
        agent.ping().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn agent_killed_mid_call_fails_typed_and_the_next_call_after_restart_works() {
    let (mut host, agent) = host_agent().await;
    within(60, async {
        let marker = host.dir().join("started");
        let call = tokio::spawn({
            let agent = agent.clone();
            let script = format!("touch {}; exec sleep 20", marker.display());
            async move {
                agent
                    .exec_and_wait(&ExecRequest::new("/bin/sh").args(["-c", &script]))
                    .await
            }
        });
        eventually(20, || async { marker.exists().then_some(()) }).await;
        host.kill();
        let e = call.await.unwrap().unwrap_err();
        assert!(e.is_disconnected(), "{e:?}");
        // While it is down: a typed error, at once.
        let e = agent.ping().await.unwrap_err();
        assert!(matches!(e, Error::Connect { .. }), "{e:?}");
        host.restart().await.unwrap();
        agent.ping().await.unwrap();
        assert!(agent.info().await.unwrap().supports("guest-ping"));
    })
    .await;
}

#[tokio::test]
async fn bad_paths_and_silent_peers_fail_typed_without_hanging() {
    within(30, async {
        let dir = tempfile::tempdir().unwrap();
        let e = GuestAgent::connect(dir.path().join("missing.sock"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Connect { .. }), "{e:?}");

        // A peer that accepts and reads but never writes: no agent there.
        let path = dir.path().join("silent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let _peer = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                held.push(s);
            }
        });
        let e = GuestAgent::options()
            .connect_timeout(Duration::from_millis(400))
            .connect(&path)
            .await
            .unwrap_err();
        assert!(e.is_agent_unavailable(), "{e:?}");
        assert!(e.to_string().contains("guest-sync-delimited"), "{e}");

        let agent = GuestAgent::options()
            .sync_on_connect(false)
            .command_timeout(Duration::from_millis(400))
            .connect(&path)
            .await
            .unwrap();
        let e = agent.ping().await.unwrap_err();
        assert!(e.is_agent_unavailable(), "{e:?}");
        let e = agent.read_file("/etc/hostname").await.unwrap_err();
        assert!(e.is_agent_unavailable(), "{e:?}");

        // A long socket path (over sun_path's 108 bytes) is reached too.
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let e = GuestAgent::connect(deep.join("qga.sock")).await.unwrap_err();
        assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    })
    .await;
}

// ---- a fake agent for exact noise and timing ----

/// How the fake behaves; shared with the test.
struct Script {
    /// Syncs answered so far.
    syncs: AtomicUsize,
    /// Requests read so far (of any kind), answered or not.
    requests: AtomicUsize,
    /// While true, the fake reads requests but answers none: they queue, as
    /// with a guest whose agent is not running. Set back to false, it
    /// answers them all in order.
    asleep: tokio::sync::watch::Sender<bool>,
}

struct FakeAgent {
    _dir: tempfile::TempDir,
    path: PathBuf,
    script: Arc<Script>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Noise the fake writes before each sync answer: bytes that are not
/// UTF-8, half a message, a stale reply and an answer to another sync.
const SYNC_NOISE: &[u8] =
    b"\xfe\xfd garbage {\"return\": {\"half\": \"\n{\"return\": {\"stale\": true}}\n{\"return\": 4242}\n";

impl FakeAgent {
    async fn start() -> FakeAgent {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake-qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let script = Arc::new(Script {
            syncs: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            asleep: tokio::sync::watch::channel(false).0,
        });
        let task = tokio::spawn({
            let script = script.clone();
            async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    // One client at a time, as qemu-ga serves them.
                    Served::default().serve(stream, &script).await;
                }
            }
        });
        FakeAgent {
            _dir: dir,
            path,
            script,
            task,
        }
    }

    fn sleep(&self) {
        self.script.asleep.send_replace(true);
    }

    fn wake(&self) {
        self.script.asleep.send_replace(false);
    }
}

/// One connection's state.
#[derive(Default)]
struct Served {
    time_calls: u32,
    info_calls: u32,
    /// A reply held back from a command the client gave up on.
    stale: Option<&'static [u8]>,
}

impl Served {
    /// Serves one connection: requests are lines; 0xFF bytes are dropped.
    async fn serve(mut self, mut stream: UnixStream, script: &Script) {
        let mut buf = Vec::new();
        let mut backlog: Vec<Value> = Vec::new();
        let mut asleep = script.asleep.subscribe();
        loop {
            let mut chunk = [0u8; 4096];
            tokio::select! {
                read = stream.read(&mut chunk) => {
                    let n = match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=nl).filter(|&b| b != 0xFF).collect();
                        if let Ok(request) = serde_json::from_slice::<Value>(&line) {
                            script.requests.fetch_add(1, Ordering::SeqCst);
                            backlog.push(request);
                        }
                    }
                }
                _ = asleep.wait_for(|a| !*a), if !backlog.is_empty() => {}
            }
            if *asleep.borrow() {
                continue;
            }
            for request in std::mem::take(&mut backlog) {
                let Some(reply) = self.answer(&request, script) else {
                    return;
                };
                stream.write_all(&reply).await.unwrap();
            }
        }
    }

    /// The bytes to send for one request; `None` to hang up.
    fn answer(&mut self, request: &Value, script: &Script) -> Option<Vec<u8>> {
        // A slow agent's late reply goes out before the next answer.
        let mut out = self.stale.take().map(<[u8]>::to_vec).unwrap_or_default();
        match request["execute"].as_str().unwrap_or_default() {
            "guest-sync-delimited" => {
                script.syncs.fetch_add(1, Ordering::SeqCst);
                out.extend_from_slice(SYNC_NOISE);
                out.push(0xFF);
                out.extend_from_slice(format!("{{\"return\": {}}}\n", request["arguments"]["id"]).as_bytes());
            }
            "guest-ping" => out.extend_from_slice(b"{\"return\": {}}\n"),
            "guest-get-host-name" => out.extend_from_slice(b"{\"return\": {\"host-name\": \"fake\"}}\n"),
            "guest-get-time" => {
                self.time_calls += 1;
                if self.time_calls == 1 {
                    // Not answered in time: the reply comes late.
                    self.stale = Some(b"{\"return\": 111}\n");
                } else {
                    out.extend_from_slice(b"{\"return\": 222}\n");
                }
            }
            "guest-info" => {
                self.info_calls += 1;
                let reply = json!({"return": {"version": format!("fake-{}", self.info_calls), "supported_commands": []}});
                out.extend_from_slice(b"\x00\x01 noise \xc3\x28\n");
                out.extend_from_slice(format!("{reply}\n").as_bytes());
            }
            "test-hang-up" => return None,
            "test-not-a-reply" => out.extend_from_slice(b"{\"something\": 1}\n"),
            _ => out.extend_from_slice(
                b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no such command\"}}\n",
            ),
        }
        Some(out)
    }
}

#[tokio::test]
async fn sync_drops_noise_stale_replies_and_other_ids() {
    let fake = FakeAgent::start().await;
    within(20, async {
        let agent = GuestAgent::connect(&fake.path).await.unwrap();
        assert_eq!(fake.script.syncs.load(Ordering::SeqCst), 1);
        // The noise before the sync answer (a stale reply among it) was dropped.
        assert_eq!(agent.host_name().await.unwrap(), "fake");
        agent.ping().await.unwrap();
        // In sync: no more syncs.
        assert_eq!(fake.script.syncs.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn a_late_reply_after_a_timeout_never_reaches_the_next_call() {
    let fake = FakeAgent::start().await;
    within(20, async {
        let agent = GuestAgent::connect(&fake.path).await.unwrap();
        let e = agent
            .with_timeout(Duration::from_millis(200))
            .time_ns()
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        // The fake now sends the late 111 before anything else; the resync drops it.
        assert_eq!(agent.time_ns().await.unwrap(), 222);
        assert_eq!(fake.script.syncs.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test]
async fn noise_around_a_reply_is_skipped_and_forces_a_resync() {
    let fake = FakeAgent::start().await;
    within(20, async {
        let agent = GuestAgent::connect(&fake.path).await.unwrap();
        assert_eq!(agent.info().await.unwrap().version, "fake-1");
        assert_eq!(fake.script.syncs.load(Ordering::SeqCst), 1);
        agent.ping().await.unwrap();
        assert_eq!(
            fake.script.syncs.load(Ordering::SeqCst),
            2,
            "noise must force a resync"
        );
        assert_eq!(agent.info().await.unwrap().version, "fake-2");

        // A JSON object that is not a reply: a typed error, then a resync.
        let e = agent
            .execute_raw("test-not-a-reply", Value::Null)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e:?}");
        let e = agent.execute_raw("test-unknown", Value::Null).await.unwrap_err();
        assert_eq!(e.class().map(|c| c.as_str()), Some("CommandNotFound"), "{e:?}");
        // Arguments that are not an object are refused before sending.
        let e = agent.execute_raw("guest-ping", json!([1])).await.unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
        agent.ping().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn an_agent_that_comes_back_answers_queued_syncs_and_only_the_latest_counts() {
    let fake = FakeAgent::start().await;
    within(30, async {
        let agent = GuestAgent::connect(&fake.path).await.unwrap();
        // The peer hangs up during a call: typed, and the next call reconnects.
        let e = agent.execute_raw("test-hang-up", Value::Null).await.unwrap_err();
        assert!(e.is_disconnected(), "{e:?}");
        agent.ping().await.unwrap();

        // The agent goes away (a rebooting guest): a call in sync sends its
        // command at once and times out...
        fake.sleep();
        let e = agent
            .with_timeout(Duration::from_millis(300))
            .time_ns()
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        // ...the next one's sync goes unanswered...
        let e = agent
            .with_timeout(Duration::from_millis(700))
            .ping()
            .await
            .unwrap_err();
        assert!(e.is_agent_unavailable(), "{e:?}");
        // ...and a call made while it is away waits for it within its budget.
        // When it is back it answers everything queued meanwhile in order
        // (the late time reply, every sync): only the newest sync id counts.
        let queued = fake.script.requests.load(Ordering::SeqCst);
        let call = tokio::spawn({
            let agent = agent.clone();
            async move { agent.with_timeout(Duration::from_secs(15)).host_name().await }
        });
        eventually(10, || async {
            (fake.script.requests.load(Ordering::SeqCst) >= queued + 2).then_some(())
        })
        .await;
        let syncs_before = fake.script.syncs.load(Ordering::SeqCst);
        fake.wake();
        assert_eq!(call.await.unwrap().unwrap(), "fake");
        let answered = fake.script.syncs.load(Ordering::SeqCst) - syncs_before;
        assert!(answered >= 4, "every queued sync was answered: {answered}");
        agent.ping().await.unwrap();
        assert_eq!(agent.time_ns().await.unwrap(), 222);
    })
    .await;
}

#[tokio::test]
async fn concurrent_calls_take_turns() {
    let (_host, agent) = host_agent().await;
    within(30, async {
        let calls = (0..8).map(|i| {
            let agent = agent.clone();
            tokio::spawn(async move {
                let out = agent
                    .exec_and_wait(&ExecRequest::new("/bin/echo").arg(i.to_string()))
                    .await
                    .unwrap();
                (i, out.stdout)
            })
        });
        for call in calls.collect::<Vec<_>>() {
            let (i, out) = call.await.unwrap();
            assert_eq!(out, format!("{i}\n").as_bytes());
        }
    })
    .await;
}
