//! A client for the QEMU guest agent (QGA): `qemu-ga` running inside the
//! guest, reached through the host side of its virtio-serial port.
//!
//! Not to be confused with the agent that a [`Monitor`](crate::monitor::Monitor)
//! watches (`Monitor::agent_started` and the `monitor::agent` module): that is
//! the *Incus* agent, seen only through the `STARTED`/`STOPPED` lines it
//! writes to a ring-buffer chardev.
//!
//! QEMU wires the port to a Unix socket on the host:
//!
//! ```text
//! -chardev socket,path=/run/vm1/qga.sock,server=on,wait=off,id=qga0
//! -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
//! ```
//!
//! ```no_run
//! # async fn f() -> qmpkit::Result<()> {
//! use qmpkit::guest_agent::{ExecRequest, GuestAgent};
//! let agent = GuestAgent::connect("/run/vm1/qga.sock").await?;
//! agent.ping().await?;
//! let out = agent
//!     .exec_and_wait(&ExecRequest::new("/bin/uname").arg("-r"))
//!     .await?;
//! println!("exit {:?}: {}", out.exit_code, String::from_utf8_lossy(&out.stdout));
//! agent.write_file("/tmp/hello", b"hi\n").await?;
//! assert_eq!(agent.read_file("/tmp/hello").await?, b"hi\n");
//! # Ok(()) }
//! ```
//!
//! # How it differs from QMP
//!
//! - **No greeting, no capabilities.** The agent says nothing until asked.
//! - **No ids in replies.** The agent answers strictly one request after the
//!   other, and its replies do not say which request they answer. So a
//!   [`GuestAgent`] runs **one command at a time**: concurrent calls (from
//!   clones of one handle or from many tasks) wait their turn in a fair
//!   queue, and their budgets include the wait.
//! - **Resynchronisation.** Before the first command, and before the next
//!   command after anything that may have left a reply unread or the channel
//!   dirty (a timeout, a cancelled call, bytes that were not a reply, a
//!   command that never answers, a reconnect), the client sends a `0xFF`
//!   byte (which resets the agent's JSON parser) and `guest-sync-delimited`
//!   with a fresh random id. The agent answers with a `0xFF` byte and the id;
//!   everything before that answer, and any answer with another id, is
//!   dropped. So a late reply to a command that timed out is never taken for
//!   the reply to the next one. If the agent does not answer, the sync is
//!   repeated with a new id (after 0.5 s, 1 s, 2 s, 4 s, ...) until the call's
//!   budget runs out, which fails with [`Error::AgentUnavailable`].
//! - **The agent comes and goes with the guest.** While the guest boots,
//!   reboots or is shut down, nobody reads the port: QEMU keeps the host side
//!   connected and what is written waits in the socket. Calls then fail with
//!   [`Error::AgentUnavailable`] (or [`Error::Timeout`] when the agent went
//!   away after the sync); the next call after the agent is back syncs and
//!   works. If the socket itself closes (QEMU exited, or a host-side
//!   `qemu-ga -m unix-listen` stopped), the call fails with
//!   [`Error::Disconnected`] and the next call connects again.
//! - **Commands that never answer.** `guest-shutdown` and the
//!   `guest-suspend-*` commands reply only on failure; success is the request
//!   having been written. Watch QMP's `SHUTDOWN` / `SUSPEND` events (through a
//!   [`Client`](crate::Client) or [`Monitor`](crate::monitor::Monitor)) to
//!   see them take effect.
//! - **Noise.** Bytes on the channel that are not JSON objects are skipped
//!   (and force a resync before the next command); the `0xFF` byte, which is
//!   not UTF-8, never reaches the JSON parser.
//!
//! Nothing sent or received is logged above `trace` level, and
//! `guest-set-user-password`'s arguments never are: the password shows as
//! `<redacted>`.

mod ops;
mod types;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{timeout_at, Instant};

use crate::commands::Deadline;
use crate::error::{Error, ErrorClass, QmpError, Result};
use crate::wire::splitter::{Frame, Splitter};

pub use types::*;

/// The name of the guest agent's virtio-serial port, by which `qemu-ga` in
/// the guest finds it (`/dev/virtio-ports/org.qemu.guest_agent.0`).
pub const GUEST_AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// The budget of a call unless set otherwise ([`GuestAgentOptions::command_timeout`]).
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The budget of the sync when connecting, unless set otherwise
/// ([`GuestAgentOptions::connect_timeout`]).
pub const DEFAULT_AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The byte that resets the agent's parser and marks a sync reply.
const SYNC_MARKER: u8 = 0xFF;

/// The first wait for a sync reply before syncing again with a new id; it
/// doubles up to [`SYNC_RETRY_MAX`].
const SYNC_RETRY_FIRST: Duration = Duration::from_millis(500);
const SYNC_RETRY_MAX: Duration = Duration::from_secs(4);

/// How a [`GuestAgent`] connects and how long its calls may take.
#[derive(Debug, Clone)]
pub struct GuestAgentOptions {
    command_timeout: Duration,
    connect_timeout: Duration,
    sync_on_connect: bool,
    max_message_size: usize,
}

impl Default for GuestAgentOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestAgentOptions {
    /// The defaults: 30 s per call, 10 s for the sync on connect, 64 MiB messages.
    pub fn new() -> Self {
        GuestAgentOptions {
            command_timeout: DEFAULT_AGENT_TIMEOUT,
            connect_timeout: DEFAULT_AGENT_CONNECT_TIMEOUT,
            sync_on_connect: true,
            max_message_size: crate::DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// The budget of each operation (a composite one such as
    /// [`GuestAgent::read_file`] or [`GuestAgent::exec_and_wait`] has one
    /// deadline for all its steps). [`GuestAgent::with_timeout`] overrides it
    /// for some calls.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// The budget of the sync that [`GuestAgentOptions::connect`] does.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Whether connecting waits for the agent to answer a sync (default
    /// true). Without it, connecting only opens the socket (useful while
    /// the guest is still booting); the first call syncs.
    pub fn sync_on_connect(mut self, sync: bool) -> Self {
        self.sync_on_connect = sync;
        self
    }

    /// The largest reply accepted (default 64 MiB); a larger one fails its
    /// call with [`Error::MessageTooLarge`].
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Connects to the host side of the agent's port and, unless turned
    /// off, syncs with the agent. A socket that cannot be reached fails with
    /// [`Error::Connect`], an agent that does not answer within the connect
    /// budget with [`Error::AgentUnavailable`].
    pub async fn connect(&self, path: impl AsRef<Path>) -> Result<GuestAgent> {
        let agent = GuestAgent {
            shared: Arc::new(Shared {
                path: path.as_ref().to_owned(),
                options: self.clone(),
                link: tokio::sync::Mutex::new(Link::new(self.max_message_size)),
            }),
            timeout: None,
        };
        {
            let mut link = agent.shared.link.lock().await;
            let deadline = Deadline::after(self.connect_timeout, "guest agent connect");
            agent.ensure_open(&mut link, &deadline).await?;
            if self.sync_on_connect {
                agent.sync_link(&mut link, &deadline).await?;
            }
        }
        Ok(agent)
    }
}

struct Shared {
    path: PathBuf,
    options: GuestAgentOptions,
    /// The connection; a call holds the lock from its request to its reply
    /// (the agent's replies carry no id). Tokio's mutex queues waiters fairly.
    link: tokio::sync::Mutex<Link>,
}

/// A connection to a QEMU guest agent. Cheap to clone; clones share the
/// connection and take turns (one command at a time, see the
/// [module docs](self)).
#[derive(Clone)]
pub struct GuestAgent {
    shared: Arc<Shared>,
    /// The budget of this handle's calls, when set by [`GuestAgent::with_timeout`].
    timeout: Option<Duration>,
}

impl std::fmt::Debug for GuestAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestAgent")
            .field("path", &self.shared.path)
            .field("timeout", &self.budget())
            .finish()
    }
}

/// One request as the connection sends it.
pub(crate) struct Request<'a> {
    name: &'a str,
    bytes: Vec<u8>,
    /// The command replies only on failure (`guest-shutdown`, `guest-suspend-*`).
    no_reply: bool,
}

impl GuestAgent {
    /// Connects with the default [`GuestAgentOptions`] (and syncs).
    pub async fn connect(path: impl AsRef<Path>) -> Result<GuestAgent> {
        GuestAgentOptions::new().connect(path).await
    }

    /// Options for connecting.
    pub fn options() -> GuestAgentOptions {
        GuestAgentOptions::new()
    }

    /// The socket this agent handle talks to.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// A handle on the same connection whose calls have this budget (each
    /// operation gets one deadline, also one that takes many commands).
    pub fn with_timeout(&self, timeout: Duration) -> GuestAgent {
        GuestAgent {
            shared: self.shared.clone(),
            timeout: Some(timeout),
        }
    }

    fn budget(&self) -> Duration {
        self.timeout.unwrap_or(self.shared.options.command_timeout)
    }

    pub(crate) fn deadline(&self, what: &str) -> Deadline {
        Deadline::after(self.budget(), what)
    }

    /// Syncs with the agent now (within this handle's budget), even if the
    /// connection is believed in sync: the way to wait for the agent of a
    /// booting guest. Fails with [`Error::AgentUnavailable`] if it does not
    /// answer in time.
    pub async fn sync(&self) -> Result<()> {
        let deadline = self.deadline("guest-sync-delimited");
        let mut link = timeout_at(deadline.at(), self.shared.link.lock())
            .await
            .map_err(|_| deadline.expired())?;
        self.ensure_open(&mut link, &deadline).await?;
        self.sync_link(&mut link, &deadline).await
    }

    /// Runs a command by name with JSON arguments (`Value::Null` for none)
    /// and returns the agent's `return` value.
    pub async fn execute_raw(&self, name: &str, args: Value) -> Result<Value> {
        self.call(name, &args).await
    }

    /// Runs a command by name with any serialisable arguments and decodes
    /// the reply into any type.
    pub async fn call<A, R>(&self, name: &str, args: &A) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let deadline = self.deadline(name);
        self.call_until(name, args, &deadline).await
    }

    /// Sends a command that does not answer when it succeeds (such as
    /// `guest-shutdown`): returns once it is written, after a sync has shown
    /// the agent to be there. A failure reply, if any, is dropped by the
    /// next call's sync.
    pub async fn execute_no_reply(&self, name: &str, args: Value) -> Result<()> {
        let deadline = self.deadline(name);
        let request = encode(name, &args, false)?;
        self.roundtrip(
            Request {
                no_reply: true,
                ..request
            },
            &deadline,
        )
        .await
        .map(drop)
    }

    pub(crate) async fn call_until<A, R>(&self, name: &str, args: &A, deadline: &Deadline) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let request = encode(name, args, false)?;
        let reply = self.roundtrip(request, deadline).await?;
        serde_json::from_value(reply.clone())
            .map_err(|e| Error::decode(name, reply.to_string().as_bytes(), e))
    }

    /// [`GuestAgent::call_until`] for a request whose arguments hold a
    /// secret: it never reaches a log.
    pub(crate) async fn call_secret<A, R>(&self, name: &str, args: &A, deadline: &Deadline) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let request = encode(name, args, true)?;
        let reply = self.roundtrip(request, deadline).await?;
        serde_json::from_value(reply.clone())
            .map_err(|e| Error::decode(name, reply.to_string().as_bytes(), e))
    }

    /// Takes the connection (queueing behind other calls), syncs if needed,
    /// sends the request and reads its reply, all before `deadline`.
    async fn roundtrip(&self, request: Request<'_>, deadline: &Deadline) -> Result<Value> {
        let mut link = timeout_at(deadline.at(), self.shared.link.lock())
            .await
            .map_err(|_| deadline.expired())?;
        let link = &mut *link;
        self.ensure_open(link, deadline).await?;
        if !link.synced {
            self.sync_link(link, deadline).await?;
        }
        // From here until a clean reply, the channel holds something unread:
        // if this future is dropped or fails, the next call resyncs.
        link.synced = false;
        let outcome = timeout_at(deadline.at(), async {
            link.write(&request.bytes).await?;
            if request.no_reply {
                return Ok(Value::Null);
            }
            link.read_reply(request.name).await
        })
        .await;
        match outcome {
            Ok(Ok(value)) => {
                // A no-reply command may still answer (with an error):
                // leave the flag down so the next call's sync drops it.
                link.synced = !request.no_reply && !link.noisy;
                Ok(value)
            }
            Ok(Err(e)) => {
                if e.is_disconnected() || matches!(e, Error::Io(_)) {
                    link.close();
                }
                Err(e)
            }
            Err(_) => Err(deadline.expired()),
        }
    }

    /// Opens the socket if it is not open (the first call, or after it closed).
    async fn ensure_open(&self, link: &mut Link, deadline: &Deadline) -> Result<()> {
        if link.stream.is_some() {
            return Ok(());
        }
        let path = &self.shared.path;
        let stream = timeout_at(deadline.at(), crate::connection::connect_unix(path))
            .await
            .map_err(|_| deadline.expired())?
            .map_err(|source| Error::Connect {
                path: path.clone(),
                source: Arc::new(source),
            })?;
        link.reset(Some(stream));
        Ok(())
    }

    /// Sends `0xFF` + `guest-sync-delimited` with fresh ids until the agent
    /// answers the latest one or `deadline` passes.
    async fn sync_link(&self, link: &mut Link, deadline: &Deadline) -> Result<()> {
        link.synced = false;
        let mut patience = SYNC_RETRY_FIRST;
        let mut attempts = 0u32;
        loop {
            let id = random_sync_id();
            attempts += 1;
            let mut bytes = vec![SYNC_MARKER];
            bytes.extend_from_slice(
                format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n")
                    .as_bytes(),
            );
            let attempt_end = deadline.at().min(Instant::now() + patience);
            let outcome = timeout_at(attempt_end, async {
                link.write(&bytes).await?;
                loop {
                    let reply = link.read_message().await?;
                    // Anything else is what the channel held before: a late
                    // reply, an answer to an earlier sync, noise.
                    if let Some(Value::Number(n)) = reply.get("return") {
                        if n.as_u64() == Some(id) {
                            return Ok::<_, Error>(());
                        }
                    }
                    crate::diag::trace!(target: "qmp::agent", "sync {id}: dropping {}", serde_json::Value::Object(reply));
                }
            })
            .await;
            match outcome {
                Ok(Ok(())) => {
                    crate::diag::debug!(target: "qmp::agent", "synced with the guest agent (id {id}, attempt {attempts})");
                    link.synced = true;
                    link.noisy = false;
                    return Ok(());
                }
                Ok(Err(e)) => {
                    if e.is_disconnected() || matches!(e, Error::Io(_)) {
                        link.close();
                    }
                    return Err(e);
                }
                Err(_) if Instant::now() >= deadline.at() => {
                    return Err(Error::AgentUnavailable {
                        path: self.shared.path.clone(),
                        reason: format!(
                            "no reply to guest-sync-delimited within {:?} ({attempts} attempt(s)); is qemu-ga running in the guest?",
                            deadline_budget(deadline)
                        ),
                    })
                }
                Err(_) => patience = (patience * 2).min(SYNC_RETRY_MAX),
            }
        }
    }
}

fn deadline_budget(deadline: &Deadline) -> Duration {
    match deadline.expired() {
        Error::Timeout { budget, .. } => budget,
        _ => Duration::ZERO,
    }
}

/// Encodes a request (no id: the agent would echo it, but the sync makes it
/// unneeded). Logged at `trace` level unless `secret`.
fn encode<'a, A: Serialize + ?Sized>(name: &'a str, args: &A, secret: bool) -> Result<Request<'a>> {
    let mut bytes = Vec::with_capacity(96);
    bytes.extend_from_slice(b"{\"execute\":");
    serde_json::to_writer(&mut bytes, name).map_err(|e| Error::InvalidRequest(format!("{name}: {e}")))?;
    let args = serde_json::to_value(args).map_err(|e| Error::InvalidRequest(format!("{name}: {e}")))?;
    match &args {
        Value::Null => {}
        Value::Object(map) if map.is_empty() => {}
        Value::Object(_) => {
            bytes.extend_from_slice(b",\"arguments\":");
            serde_json::to_writer(&mut bytes, &args)
                .map_err(|e| Error::InvalidRequest(format!("{name}: {e}")))?;
        }
        _ => {
            return Err(Error::InvalidRequest(format!(
                "{name}: command arguments must be a JSON object"
            )))
        }
    }
    bytes.extend_from_slice(b"}\n");
    if secret {
        crate::diag::debug!(target: "qmp::agent", "-> {name} <redacted>");
    } else {
        crate::diag::debug!(target: "qmp::agent", "-> {name}");
        crate::diag::trace!(target: "qmp::agent", "-> {}", String::from_utf8_lossy(&bytes).trim_end());
    }
    Ok(Request {
        name,
        bytes,
        no_reply: false,
    })
}

/// A random id for `guest-sync-delimited`, within the 53 bits that survive
/// any JSON parser.
fn random_sync_id() -> u64 {
    use std::hash::BuildHasher;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let state = std::collections::hash_map::RandomState::new();
    state.hash_one(COUNTER.fetch_add(1, Ordering::Relaxed)) & ((1 << 53) - 1)
}

/// The socket and what has been read from it.
struct Link {
    stream: Option<UnixStream>,
    splitter: Splitter,
    /// Bytes read but not yet given to the splitter: each is looked at for
    /// the `0xFF` marker first.
    pending: Vec<u8>,
    limit: usize,
    /// True when the channel is known to hold nothing unread: the last
    /// exchange ended cleanly.
    synced: bool,
    /// Noise arrived during the current command: resync before the next.
    noisy: bool,
}

impl Link {
    fn new(limit: usize) -> Self {
        Link {
            stream: None,
            splitter: Splitter::small(limit),
            pending: Vec::new(),
            limit,
            synced: false,
            noisy: false,
        }
    }

    fn reset(&mut self, stream: Option<UnixStream>) {
        self.stream = stream;
        self.splitter = Splitter::small(self.limit);
        self.pending.clear();
        self.synced = false;
        self.noisy = false;
    }

    fn close(&mut self) {
        self.reset(None);
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| Error::disconnected("not connected"))?;
        stream.write_all(bytes).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                Error::disconnected(format!("the guest agent's socket closed: {e}"))
            }
            _ => Error::from(e),
        })
    }

    /// Reads more bytes into `pending`.
    async fn fill(&mut self) -> Result<()> {
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| Error::disconnected("not connected"))?;
        self.pending.reserve(64 * 1024);
        match stream.read_buf(&mut self.pending).await {
            Ok(0) => Err(Error::disconnected("the guest agent's socket closed")),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Err(Error::disconnected(format!(
                "the guest agent's socket closed: {e}"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The next complete frame among the bytes read so far. A `0xFF` byte
    /// ends whatever was open (it is reported as noise) and starts afresh.
    fn next_buffered(&mut self) -> Option<Incoming> {
        loop {
            if let Some(frame) = self.splitter.next_frame() {
                return Some(match frame {
                    Frame::Message(range) => Incoming::Message(self.splitter.bytes(range).to_vec()),
                    Frame::Garbage(n) => Incoming::Noise(n),
                    Frame::Corrupt(f) => Incoming::Noise(f.size),
                    Frame::TooLarge(f) => Incoming::TooLarge(f.size),
                });
            }
            if self.pending.is_empty() {
                return None;
            }
            match memchr::memchr(SYNC_MARKER, &self.pending) {
                Some(0) => {
                    self.pending.drain(..1);
                    let cut = !self.splitter.is_drained();
                    self.splitter = Splitter::small(self.limit);
                    if cut {
                        return Some(Incoming::Noise(0));
                    }
                }
                Some(at) => {
                    self.splitter.push(&self.pending[..at]);
                    self.pending.drain(..at);
                }
                None => {
                    self.splitter.push(&self.pending);
                    self.pending.clear();
                }
            }
        }
    }

    /// The next JSON object on the channel, noise skipped (and remembered).
    async fn read_message(&mut self) -> Result<serde_json::Map<String, Value>> {
        loop {
            match self.next_buffered() {
                Some(Incoming::Message(bytes)) => match serde_json::from_slice(&bytes) {
                    Ok(Value::Object(map)) => return Ok(map),
                    _ => {
                        crate::diag::debug!(target: "qmp::agent", "skipping a corrupt message of {} bytes", bytes.len());
                        self.noisy = true;
                    }
                },
                Some(Incoming::Noise(n)) => {
                    crate::diag::debug!(target: "qmp::agent", "skipping {n} bytes of noise");
                    self.noisy = true;
                }
                Some(Incoming::TooLarge(size)) => {
                    self.noisy = true;
                    return Err(Error::MessageTooLarge {
                        size,
                        limit: self.limit,
                    });
                }
                None => self.fill().await?,
            }
        }
    }

    /// The reply to the command just sent.
    async fn read_reply(&mut self, name: &str) -> Result<Value> {
        let mut map = self.read_message().await?;
        if crate::diag::agent_trace_enabled!() {
            let shown = Value::Object(map.clone());
            crate::diag::trace!(target: "qmp::agent", "<- {name}: {shown}");
        }
        if let Some(value) = map.remove("return") {
            return Ok(value);
        }
        if let Some(Value::Object(err)) = map.get("error") {
            let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
            return Err(Error::Qmp(QmpError {
                command: name.to_owned(),
                class: ErrorClass::from_name(&text("class")),
                desc: text("desc"),
            }));
        }
        self.noisy = true;
        Err(Error::Protocol(format!(
            "the guest agent answered {name} with neither \"return\" nor \"error\": {}",
            Value::Object(map)
        )))
    }
}

enum Incoming {
    Message(Vec<u8>),
    Noise(usize),
    TooLarge(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `chunks` (each as one read) into what `next_buffered` reports.
    fn frames(chunks: &[&[u8]]) -> Vec<String> {
        let mut link = Link::new(1 << 20);
        let mut out = Vec::new();
        for chunk in chunks {
            link.pending.extend_from_slice(chunk);
            while let Some(item) = link.next_buffered() {
                out.push(match item {
                    Incoming::Message(m) => String::from_utf8(m).unwrap(),
                    Incoming::Noise(_) => "noise".into(),
                    Incoming::TooLarge(n) => format!("too large {n}"),
                });
            }
        }
        out
    }

    #[test]
    fn the_marker_ends_whatever_was_open_and_never_reaches_the_parser() {
        // A half message, the marker, the sync answer.
        assert_eq!(
            frames(&[b"{\"return\": {\"a\": \"b", b"\xff{\"return\": 7}\n"]),
            ["noise", "{\"return\": 7}"]
        );
        // A marker inside what looked like a string still cuts.
        assert_eq!(
            frames(&[b"{\"x\": \"\xff{\"return\": 8}\n"]),
            ["noise", "{\"return\": 8}"]
        );
        // Bytes that are not UTF-8 between messages are noise, the messages intact.
        assert_eq!(
            frames(&[b"\x00\xfe junk\n{\"return\": {}}\n\xc3(\n{\"return\": 1}"]),
            ["noise", "noise", "{\"return\": {}}", "noise", "{\"return\": 1}"]
        );
        // A marker split from its message across reads, and back-to-back markers.
        assert_eq!(
            frames(&[b"\xff", b"\xff\xff{\"ret", b"urn\": 9}\n"]),
            ["{\"return\": 9}"]
        );
    }

    #[test]
    fn a_message_over_the_limit_is_reported_once() {
        let mut link = Link::new(64);
        let big = format!("{{\"return\": \"{}\"}}\n{{\"return\": 2}}\n", "x".repeat(2000));
        link.pending.extend_from_slice(big.as_bytes());
        let mut seen = Vec::new();
        while let Some(item) = link.next_buffered() {
            seen.push(matches!(item, Incoming::TooLarge(_)));
        }
        assert_eq!(seen, [true, false]);
    }

    #[test]
    fn requests_are_one_line_and_arguments_must_be_objects() {
        let r = encode("guest-ping", &Value::Null, false).unwrap();
        assert_eq!(r.bytes, b"{\"execute\":\"guest-ping\"}\n");
        let r = encode("guest-file-close", &serde_json::json!({"handle": 3}), false).unwrap();
        assert_eq!(
            r.bytes,
            b"{\"execute\":\"guest-file-close\",\"arguments\":{\"handle\":3}}\n"
        );
        assert!(matches!(
            encode("x", &serde_json::json!([1]), false),
            Err(Error::InvalidRequest(_))
        ));
        let ids: std::collections::HashSet<u64> = (0..1000).map(|_| random_sync_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|&id| id < 1 << 53));
    }
}
