//! The typed operations of [`GuestAgent`].

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use super::types::*;
use super::GuestAgent;
use crate::error::{Error, Result};

/// How much one `guest-file-read` asks for: large enough that a file of a
/// few MiB takes few round trips, small enough that one reply (in base64)
/// stays far below the message limit.
const READ_CHUNK: usize = 1 << 20;

/// How much one `guest-file-write` carries (before base64).
const WRITE_CHUNK: usize = 768 << 10;

/// The first pause between `guest-exec-status` polls; it doubles up to
/// [`EXEC_POLL_MAX`], so a short program is seen to end quickly and a long
/// one is not polled hard.
const EXEC_POLL_FIRST: Duration = Duration::from_millis(10);
const EXEC_POLL_MAX: Duration = Duration::from_millis(250);

fn decode_b64(command: &str, text: &str) -> Result<Vec<u8>> {
    BASE64
        .decode(text)
        .map_err(|e| Error::Protocol(format!("{command}: the agent's base64 does not decode: {e}")))
}

impl GuestAgent {
    /// `guest-ping`: succeeds when the agent answers.
    pub async fn ping(&self) -> Result<()> {
        let _: Value = self.call("guest-ping", &Value::Null).await?;
        Ok(())
    }

    /// `guest-info`: the agent's version and commands.
    pub async fn info(&self) -> Result<AgentInfo> {
        self.call("guest-info", &Value::Null).await
    }

    /// `guest-get-osinfo`: the guest's kernel and distribution.
    pub async fn os_info(&self) -> Result<OsInfo> {
        self.call("guest-get-osinfo", &Value::Null).await
    }

    /// `guest-get-host-name`: the guest's host name.
    pub async fn host_name(&self) -> Result<String> {
        #[derive(Deserialize)]
        struct HostName {
            #[serde(rename = "host-name")]
            host_name: String,
        }
        let reply: HostName = self.call("guest-get-host-name", &Value::Null).await?;
        Ok(reply.host_name)
    }

    /// `guest-get-time`: the guest's clock, in nanoseconds since the Unix epoch.
    pub async fn time_ns(&self) -> Result<i64> {
        self.call("guest-get-time", &Value::Null).await
    }

    /// `guest-set-time`: sets the guest's clock to `ns` nanoseconds since
    /// the epoch, or with `None` from the (virtual) hardware clock, which is
    /// how a guest catches up after being paused.
    pub async fn set_time(&self, ns: Option<i64>) -> Result<()> {
        let args = match ns {
            Some(ns) => json!({ "time": ns }),
            None => Value::Null,
        };
        let _: Value = self.call("guest-set-time", &args).await?;
        Ok(())
    }

    /// `guest-network-get-interfaces`: the guest's interfaces and addresses.
    pub async fn network_interfaces(&self) -> Result<Vec<NetworkInterface>> {
        self.call("guest-network-get-interfaces", &Value::Null).await
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&self) -> Result<FsFreezeStatus> {
        self.call("guest-fsfreeze-status", &Value::Null).await
    }

    /// `guest-fsfreeze-freeze`: freezes every freezable filesystem in the
    /// guest and returns how many it froze. Until thawed, writes in the
    /// guest block (the agent refuses most commands meanwhile).
    pub async fn fsfreeze_freeze(&self) -> Result<u64> {
        self.call("guest-fsfreeze-freeze", &Value::Null).await
    }

    /// `guest-fsfreeze-freeze-list`: freezes the filesystems mounted at
    /// these paths; returns how many it froze.
    pub async fn fsfreeze_freeze_list<S: AsRef<str>>(&self, mountpoints: &[S]) -> Result<u64> {
        let list: Vec<&str> = mountpoints.iter().map(AsRef::as_ref).collect();
        self.call("guest-fsfreeze-freeze-list", &json!({ "mountpoints": list }))
            .await
    }

    /// `guest-fsfreeze-thaw`: thaws what was frozen; returns how many
    /// filesystems it thawed.
    pub async fn fsfreeze_thaw(&self) -> Result<u64> {
        self.call("guest-fsfreeze-thaw", &Value::Null).await
    }

    /// `guest-file-open`: opens a file in the guest with an `fopen` mode
    /// (`r`, `w`, `a`, `r+`, ...).
    pub async fn file_open(&self, path: &str, mode: &str) -> Result<FileHandle> {
        self.call("guest-file-open", &json!({ "path": path, "mode": mode }))
            .await
    }

    /// `guest-file-read`: reads up to `count` bytes.
    pub async fn file_read(&self, handle: FileHandle, count: usize) -> Result<FileChunk> {
        let deadline = self.deadline("guest-file-read");
        self.file_read_until(handle, count, &deadline).await
    }

    async fn file_read_until(
        &self,
        handle: FileHandle,
        count: usize,
        deadline: &crate::commands::Deadline,
    ) -> Result<FileChunk> {
        #[derive(Deserialize)]
        struct Read {
            #[serde(rename = "buf-b64")]
            buf: String,
            eof: bool,
        }
        let reply: Read = self
            .call_until(
                "guest-file-read",
                &json!({ "handle": handle, "count": count }),
                deadline,
            )
            .await?;
        Ok(FileChunk {
            data: decode_b64("guest-file-read", &reply.buf)?,
            eof: reply.eof,
        })
    }

    /// `guest-file-write`: writes `data`; returns how many bytes the agent wrote.
    pub async fn file_write(&self, handle: FileHandle, data: &[u8]) -> Result<usize> {
        let deadline = self.deadline("guest-file-write");
        self.file_write_until(handle, data, &deadline).await
    }

    async fn file_write_until(
        &self,
        handle: FileHandle,
        data: &[u8],
        deadline: &crate::commands::Deadline,
    ) -> Result<usize> {
        #[derive(Deserialize)]
        struct Written {
            count: usize,
        }
        let reply: Written = self
            .call_until(
                "guest-file-write",
                &json!({ "handle": handle, "buf-b64": BASE64.encode(data) }),
                deadline,
            )
            .await?;
        Ok(reply.count)
    }

    /// `guest-file-seek`.
    pub async fn file_seek(&self, handle: FileHandle, offset: i64, whence: Whence) -> Result<FilePosition> {
        self.call(
            "guest-file-seek",
            &json!({ "handle": handle, "offset": offset, "whence": whence }),
        )
        .await
    }

    /// `guest-file-flush`.
    pub async fn file_flush(&self, handle: FileHandle) -> Result<()> {
        let _: Value = self
            .call("guest-file-flush", &json!({ "handle": handle }))
            .await?;
        Ok(())
    }

    /// `guest-file-close`.
    pub async fn file_close(&self, handle: FileHandle) -> Result<()> {
        let _: Value = self
            .call("guest-file-close", &json!({ "handle": handle }))
            .await?;
        Ok(())
    }

    /// Reads a whole file from the guest, in 1 MiB chunks, within one
    /// budget. The file is closed also when a read fails.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let deadline = self.deadline("read_file");
        let handle: FileHandle = self
            .call_until(
                "guest-file-open",
                &json!({ "path": path, "mode": "r" }),
                &deadline,
            )
            .await?;
        let mut data = Vec::new();
        let read = async {
            loop {
                let chunk = self.file_read_until(handle, READ_CHUNK, &deadline).await?;
                data.extend_from_slice(&chunk.data);
                if chunk.eof || chunk.data.is_empty() {
                    return Ok::<_, Error>(());
                }
            }
        }
        .await;
        let closed = self.close_until(handle, &deadline).await;
        read?;
        closed?;
        Ok(data)
    }

    /// Writes a whole file in the guest (created or truncated), in chunks,
    /// within one budget. The file is closed also when a write fails.
    pub async fn write_file(&self, path: &str, data: &[u8]) -> Result<()> {
        let deadline = self.deadline("write_file");
        let handle: FileHandle = self
            .call_until(
                "guest-file-open",
                &json!({ "path": path, "mode": "w" }),
                &deadline,
            )
            .await?;
        let write = async {
            for chunk in data.chunks(WRITE_CHUNK) {
                let mut rest = chunk;
                while !rest.is_empty() {
                    let n = self.file_write_until(handle, rest, &deadline).await?;
                    if n == 0 {
                        return Err(Error::Protocol(format!(
                            "guest-file-write wrote nothing to {path}"
                        )));
                    }
                    rest = &rest[n.min(rest.len())..];
                }
            }
            let _: Value = self
                .call_until("guest-file-flush", &json!({ "handle": handle }), &deadline)
                .await?;
            Ok(())
        }
        .await;
        let closed = self.close_until(handle, &deadline).await;
        write?;
        closed
    }

    async fn close_until(&self, handle: FileHandle, deadline: &crate::commands::Deadline) -> Result<()> {
        let _: Value = self
            .call_until("guest-file-close", &json!({ "handle": handle }), deadline)
            .await?;
        Ok(())
    }

    /// `guest-exec`: starts a program in the guest; returns its pid. Poll
    /// it with [`GuestAgent::exec_status`] (the agent keeps its status and
    /// output until that reports it exited).
    pub async fn exec(&self, request: &ExecRequest) -> Result<ExecPid> {
        let deadline = self.deadline("guest-exec");
        self.exec_until(request, &deadline).await
    }

    async fn exec_until(
        &self,
        request: &ExecRequest,
        deadline: &crate::commands::Deadline,
    ) -> Result<ExecPid> {
        #[derive(Deserialize)]
        struct Started {
            pid: i64,
        }
        let mut args = json!({
            "path": request.path,
            "capture-output": request.capture_output,
        });
        if !request.args.is_empty() {
            args["arg"] = json!(request.args);
        }
        if !request.env.is_empty() {
            args["env"] = json!(request.env);
        }
        if let Some(input) = &request.input {
            args["input-data"] = json!(BASE64.encode(input));
        }
        let started: Started = self.call_until("guest-exec", &args, deadline).await?;
        Ok(ExecPid(started.pid))
    }

    /// `guest-exec-status`: whether the program ended, and its output so far.
    pub async fn exec_status(&self, pid: ExecPid) -> Result<ExecStatus> {
        let deadline = self.deadline("guest-exec-status");
        self.exec_status_until(pid, &deadline).await
    }

    async fn exec_status_until(
        &self,
        pid: ExecPid,
        deadline: &crate::commands::Deadline,
    ) -> Result<ExecStatus> {
        #[derive(Deserialize)]
        #[serde(rename_all = "kebab-case")]
        struct Status {
            exited: bool,
            exitcode: Option<i32>,
            signal: Option<i32>,
            out_data: Option<String>,
            err_data: Option<String>,
            #[serde(default)]
            out_truncated: bool,
            #[serde(default)]
            err_truncated: bool,
        }
        let s: Status = self
            .call_until("guest-exec-status", &json!({ "pid": pid.0 }), deadline)
            .await?;
        let decode = |d: Option<String>| match d {
            Some(text) => decode_b64("guest-exec-status", &text),
            None => Ok(Vec::new()),
        };
        Ok(ExecStatus {
            exited: s.exited,
            exit_code: s.exitcode,
            signal: s.signal,
            stdout: decode(s.out_data)?,
            stderr: decode(s.err_data)?,
            stdout_truncated: s.out_truncated,
            stderr_truncated: s.err_truncated,
        })
    }

    /// Runs a program in the guest and waits for it to end, within one
    /// budget (this handle's: see [`GuestAgent::with_timeout`]); returns its
    /// exit status and output. On [`Error::Timeout`] the program is still
    /// running in the guest.
    ///
    /// ```no_run
    /// # async fn f(agent: qmpkit::guest_agent::GuestAgent) -> qmpkit::Result<()> {
    /// use qmpkit::guest_agent::ExecRequest;
    /// let out = agent
    ///     .with_timeout(std::time::Duration::from_secs(60))
    ///     .exec_and_wait(&ExecRequest::new("/bin/sh").args(["-c", "df -h"]))
    ///     .await?;
    /// assert!(out.success(), "{}", String::from_utf8_lossy(&out.stderr));
    /// # Ok(()) }
    /// ```
    pub async fn exec_and_wait(&self, request: &ExecRequest) -> Result<ExecStatus> {
        let deadline = self.deadline("guest-exec");
        let pid = self.exec_until(request, &deadline).await?;
        let mut pause = EXEC_POLL_FIRST;
        loop {
            let status = self.exec_status_until(pid, &deadline).await?;
            if status.exited {
                return Ok(status);
            }
            let left = deadline.remaining()?;
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(EXEC_POLL_MAX);
        }
    }

    /// `guest-shutdown`: powers the guest down, halts or reboots it. The
    /// agent does not answer when it works: this returns once the request
    /// is written (after a sync showed the agent there). QMP's `SHUTDOWN`
    /// event (or, for a reboot, `RESET`) tells that it happened.
    pub async fn shutdown(&self, mode: ShutdownMode) -> Result<()> {
        self.execute_no_reply("guest-shutdown", json!({ "mode": mode }))
            .await
    }

    /// `guest-suspend-disk`, `-ram` or `-hybrid`: like
    /// [`GuestAgent::shutdown`], no answer when it works (QMP's `SUSPEND`
    /// event tells).
    pub async fn suspend(&self, mode: SuspendMode) -> Result<()> {
        self.execute_no_reply(mode.command(), Value::Null).await
    }

    /// `guest-set-user-password`: sets a guest user's password (`crypted`:
    /// the password is already hashed, as `crypt(3)` makes it). The
    /// password is sent in base64 and never logged.
    pub async fn set_user_password(&self, user: &str, password: &str, crypted: bool) -> Result<()> {
        let deadline = self.deadline("guest-set-user-password");
        let args = json!({
            "username": user,
            "password": BASE64.encode(password),
            "crypted": crypted,
        });
        let _: Value = self
            .call_secret("guest-set-user-password", &args, &deadline)
            .await?;
        Ok(())
    }
}
