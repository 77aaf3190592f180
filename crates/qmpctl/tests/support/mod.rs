//! Helpers for running the qmpctl binary against a real QEMU.
#![allow(dead_code)]

use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use qmpkit::launch::{Qemu, QemuBuilder};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// The qmpctl binary under test.
pub const QMPCTL: &str = env!("CARGO_BIN_EXE_qmpctl");

/// A VM like qmpctl's scratch VM (SCSI and USB controllers, balloon, VGA,
/// ring-buffer console `console0`, memory slots, a free CPU slot), with a
/// second QMP socket `cli` for the binary under test.
pub async fn vm() -> Qemu {
    vm_with(&[]).await
}

/// [`vm`] with extra QEMU arguments.
pub async fn vm_with(extra: &[&str]) -> Qemu {
    let b = QemuBuilder::new()
        .scratch_devices()
        .args(extra)
        .extra_qmp_socket("cli");
    match b.spawn().await {
        Ok(vm) => vm,
        Err(e) => panic!("cannot launch QEMU: {e}"),
    }
}

/// Fails the test if `fut` takes longer than `secs` seconds.
pub async fn within<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {secs} s"))
}

/// What a run of qmpctl left behind.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts success and returns the run.
    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "qmpctl failed: {}{}", self.stdout, self.stderr);
        self
    }

    /// Asserts the exit code and a piece of the error message.
    #[track_caller]
    pub fn fails(&self, code: i32, needle: &str) {
        assert_eq!(
            self.code, code,
            "expected exit code {code}; stdout: {} stderr: {}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {}",
            self.stderr
        );
        assert!(
            self.stderr.starts_with("qmpctl: ") || self.stderr.starts_with("error: "),
            "not a plain error message: {}",
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
    }

    /// Stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(QMPCTL);
    cmd.args(args)
        .env_remove("QMPCTL_SOCKET")
        .env_remove("QMPCTL_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn with_socket<'a>(socket: &'a Path, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--socket", socket.to_str().expect("UTF-8 path")];
    all.extend_from_slice(args);
    all
}

/// Runs qmpctl on a socket.
pub async fn ctl(socket: &Path, args: &[&str]) -> Run {
    run_ctl(&with_socket(socket, args), None, None).await
}

/// Runs qmpctl on a socket with these environment variables set.
pub async fn ctl_env(socket: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = command(&with_socket(socket, args));
    cmd.envs(env.iter().copied());
    finish(cmd.spawn().expect("run qmpctl")).await
}

/// Runs qmpctl on a socket with text on its stdin.
pub async fn ctl_stdin(socket: &Path, args: &[&str], stdin: &str) -> Run {
    run_ctl(&with_socket(socket, args), Some(stdin), None).await
}

/// Runs qmpctl on a socket with `fd` as its stdin (fd 0).
pub async fn ctl_with_stdin_fd(socket: &Path, args: &[&str], fd: OwnedFd) -> Run {
    let mut cmd = command(&with_socket(socket, args));
    cmd.stdin(Stdio::from(fd));
    let child = cmd.spawn().expect("run qmpctl");
    finish(child).await
}

/// Runs qmpctl; with `stdin` it is written to its stdin, with `read_limit`
/// only that many bytes of stdout are read before the pipe is closed.
pub async fn run_ctl(args: &[&str], stdin: Option<&str>, read_limit: Option<usize>) -> Run {
    let mut cmd = command(args);
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("run qmpctl");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).await.unwrap();
        drop(pipe);
    }
    if let Some(limit) = read_limit {
        let mut out = child.stdout.take().unwrap();
        let mut buf = vec![0u8; limit];
        within(60, out.read_exact(&mut buf)).await.unwrap();
        drop(out);
        let err = read_stderr(&mut child).await;
        let status = within(60, child.wait()).await.unwrap();
        return Run {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&buf).into_owned(),
            stderr: err,
        };
    }
    finish(child).await
}

/// Spawns qmpctl on a socket without waiting for it.
pub fn spawn_ctl(socket: &Path, args: &[&str]) -> Child {
    command(&with_socket(socket, args)).spawn().expect("run qmpctl")
}

/// Waits for a spawned qmpctl and collects its output.
pub async fn finish(child: Child) -> Run {
    let out = within(120, child.wait_with_output())
        .await
        .expect("wait for qmpctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A spawned `qmpctl events` whose stdout lines are collected as they come.
pub struct Stream {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub seen: Vec<String>,
}

impl Stream {
    /// Spawns qmpctl and starts collecting its stdout.
    pub fn spawn(socket: &Path, args: &[&str]) -> Stream {
        let mut child = spawn_ctl(socket, args);
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Stream {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Runs `commands` (which make QEMU send events) until qmpctl has printed
    /// `n` lines or exited; the stream may have subscribed after the first pokes.
    pub async fn poke_until(&mut self, client: &qmpkit::Client, commands: &[(&str, Value)], n: usize) {
        within(30, async {
            loop {
                for (name, args) in commands {
                    let _: Value = client.call(name, args).await.unwrap();
                }
                let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
                while let Ok(Some(line)) = tokio::time::timeout_at(deadline, self.lines.recv()).await {
                    self.seen.push(line);
                }
                if self.seen.len() >= n || self.child.try_wait().unwrap().is_some() {
                    return;
                }
            }
        })
        .await
    }

    /// Waits for qmpctl to exit; its stdout lines are in `seen`.
    pub async fn finish(mut self) -> Run {
        let status = within(60, self.child.wait()).await.unwrap();
        while let Some(line) = within(10, self.lines.recv()).await {
            self.seen.push(line);
        }
        let err = read_stderr(&mut self.child).await;
        Run {
            code: status.code().unwrap_or(-1),
            stdout: self.seen.join("\n"),
            stderr: err,
        }
    }
}

/// Runs qemu-img.
pub fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The VM's run state, asked by the test's own connection.
pub async fn status(c: &qmpkit::Client) -> String {
    let v: Value = c.call("query-status", &()).await.unwrap();
    v["status"].as_str().unwrap().to_owned()
}

/// The node a device reads, from query-block (None: no such device).
pub async fn device_node(c: &qmpkit::Client, qdev: &str) -> Option<String> {
    let v: Value = c.call("query-block", &()).await.unwrap();
    v.as_array()?
        .iter()
        .find(|b| b["qdev"] == qdev)
        .and_then(|b| b["inserted"]["node-name"].as_str().map(str::to_owned))
}

/// The ids of the devices added with one.
pub async fn peripherals(c: &qmpkit::Client) -> Vec<String> {
    let v: Value = c
        .call("qom-list", &json!({"path": "/machine/peripheral"}))
        .await
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"].as_str().is_some_and(|t| t.starts_with("child<")))
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until an incoming migration has completed on the target.
pub async fn incoming_completed(c: &qmpkit::Client) {
    within(30, async {
        loop {
            let v: Value = c.call("query-migrate", &()).await.unwrap();
            match v["status"].as_str() {
                Some("completed") => return,
                Some("failed") | Some("cancelled") => panic!("incoming migration ended: {v}"),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
}

/// Spawns qmpctl with a pipe on its stdin.
pub fn spawn_with_stdin(args: &[&str]) -> Child {
    let mut cmd = command(args);
    cmd.stdin(Stdio::piped());
    cmd.spawn().expect("run qmpctl")
}

/// The pids of a process's children.
pub fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        found.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    found
}

/// True while the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

/// Everything the child writes to its (piped) standard error, to its end.
async fn read_stderr(child: &mut Child) -> String {
    let mut err = String::new();
    let mut stderr = child.stderr.take().expect("stderr is piped");
    stderr.read_to_string(&mut err).await.unwrap();
    err
}
