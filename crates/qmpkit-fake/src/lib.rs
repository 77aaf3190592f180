//! A scriptable fake QMP (QEMU Machine Protocol) server.
//!
//! It exists for the things real QEMU will not do on demand: malformed input,
//! races, exact timing, and holding thousands of connections for benchmarks.
//!
//! [`FakeServer::start`] listens on a Unix socket in a fresh temporary
//! directory and hands every accepted connection, as a [`FakeConn`], to a
//! script. The script decides what to send and when; [`FakeServer::instant`]
//! is a ready-made script that behaves like QEMU's happy path.
//!
//! Incoming requests are split as a JSON stream (see [`JsonSplitter`]), not by
//! newline, and file descriptors sent as `SCM_RIGHTS` ancillary data are
//! attached to the [`Request`] they arrived with.
#![warn(missing_docs)]

pub mod hostile;
mod splitter;

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::MissedTickBehavior;

pub use splitter::JsonSplitter;

/// The greeting sent by [`FakeConn::greet`], including its `\r\n`.
pub const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"fake\"}, \"capabilities\": [\"oob\"]}}\r\n";

/// Size of the per-thread read buffer.
const READ_BUF: usize = 64 * 1024;
/// Most fds Linux passes in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
const MAX_FDS: usize = 253;

thread_local! {
    /// Shared read buffer, so idle connections hold no 64 KiB buffer each.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUF]);
}

/// A fake QMP server listening on a Unix socket in its own temporary directory.
///
/// Dropping it stops the listener, aborts every connection task (so clients
/// see the connection close soon after), and removes the directory.
#[must_use]
pub struct FakeServer {
    path: PathBuf,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl FakeServer {
    /// Starts listening on a fresh socket in a new temporary directory and
    /// serves every accepted connection by spawning `script` on it.
    pub async fn start<F, Fut>(script: F) -> io::Result<FakeServer>
    where
        F: Fn(FakeConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let dir = tempfile::Builder::new().prefix("qmpkit-fake-").tempdir()?;
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path)?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(serve(listener, script, accepted.clone()));
        Ok(FakeServer {
            path,
            accepted,
            task,
            _dir: dir,
        })
    }

    /// Starts a server that behaves like QEMU's happy path on every
    /// connection: greets, then answers as [`FakeConn::serve_instant`] does.
    pub async fn instant() -> io::Result<FakeServer> {
        Self::start(|mut conn: FakeConn| async move {
            if conn.greet().await.is_ok() {
                conn.serve_instant().await;
            }
        })
        .await
    }

    /// The socket path clients should connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many connections have been accepted so far. A client's `connect`
    /// may return before the server has accepted it.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections on `listener` forever, spawning `script` on each and
/// counting them in `accepted`. Dropping the returned future aborts every
/// connection task.
pub async fn serve<F, Fut>(listener: UnixListener, script: F, accepted: Arc<AtomicUsize>)
where
    F: Fn(FakeConn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::SeqCst);
                while conns.try_join_next().is_some() {}
                conns.spawn(script(FakeConn::new(stream)));
            }
            // Typically EMFILE: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One request received from the client.
#[derive(Debug)]
pub struct Request {
    /// The exact bytes of the request value.
    pub raw: Vec<u8>,
    /// The parsed value, or `Value::Null` if `raw` is not valid JSON.
    pub value: Value,
    /// The parser's message if `raw` is not valid JSON.
    pub parse_error: Option<String>,
    /// File descriptors received together with the bytes of this request.
    pub fds: Vec<OwnedFd>,
    /// The command name, from `execute` or `exec-oob`.
    pub name: Option<String>,
    /// The request's `id` member, if any.
    pub id: Option<Value>,
    /// Whether the command was sent with `exec-oob`.
    pub oob: bool,
}

impl Request {
    /// Parses `raw` into a request carrying `fds`.
    pub fn parse(raw: Vec<u8>, fds: Vec<OwnedFd>) -> Request {
        let (value, parse_error) = match serde_json::from_slice(&raw) {
            Ok(v) => (v, None),
            Err(e) => (Value::Null, Some(e.to_string())),
        };
        let (name, oob) = match (value.get("execute"), value.get("exec-oob")) {
            (Some(Value::String(n)), _) => (Some(n.clone()), false),
            (_, Some(Value::String(n))) => (Some(n.clone()), true),
            _ => (None, false),
        };
        let id = value.get("id").cloned();
        Request {
            raw,
            value,
            parse_error,
            fds,
            name,
            id,
            oob,
        }
    }

    /// The `arguments` member, if any.
    pub fn arguments(&self) -> Option<&Value> {
        self.value.get("arguments")
    }
}

/// One accepted connection, owned by the server's script.
#[derive(Debug)]
pub struct FakeConn {
    stream: UnixStream,
    splitter: JsonSplitter,
    /// Requests split from the reads so far, not yet received by the script.
    ready: std::collections::VecDeque<Request>,
    /// Fds whose request has not been completely read yet.
    fds: Vec<OwnedFd>,
    negotiated: bool,
}

impl FakeConn {
    /// Wraps an accepted stream.
    pub fn new(stream: UnixStream) -> FakeConn {
        FakeConn {
            stream,
            splitter: JsonSplitter::new(),
            ready: std::collections::VecDeque::new(),
            fds: Vec::new(),
            negotiated: false,
        }
    }

    /// Sends exactly `bytes`, adding no newline.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Sends `v` as compact JSON followed by `\r\n`.
    pub async fn send(&mut self, v: &Value) -> io::Result<()> {
        let mut out = serde_json::to_vec(v)?;
        out.extend_from_slice(b"\r\n");
        self.send_raw(&out).await
    }

    /// Sends the [`GREETING`].
    pub async fn greet(&mut self) -> io::Result<()> {
        self.send_raw(GREETING).await
    }

    /// Receives the next request; `None` at end of stream (a trailing
    /// partial request is discarded).
    pub async fn recv(&mut self) -> io::Result<Option<Request>> {
        loop {
            if let Some(req) = self.next_buffered() {
                return Ok(Some(req));
            }
            if self.read_some().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Greets, receives `qmp_capabilities` and replies `{"return": {}}`.
    /// Fails with `InvalidData` if the first request is anything else.
    pub async fn handshake(&mut self) -> io::Result<()> {
        self.greet().await?;
        let req = self.recv().await?.ok_or(io::ErrorKind::UnexpectedEof)?;
        if req.name.as_deref() != Some("qmp_capabilities") {
            let raw = String::from_utf8_lossy(&req.raw);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected qmp_capabilities, got {raw}"),
            ));
        }
        self.reply(&req, json!({})).await
    }

    /// Replies `{"return": ret, "id": id}` to `req` (no `id` if it had none).
    pub async fn reply(&mut self, req: &Request, ret: Value) -> io::Result<()> {
        if req.name.as_deref() == Some("qmp_capabilities") {
            self.negotiated = true;
        }
        let mut out = Vec::new();
        encode_reply(&mut out, "return", &ret, req.id.as_ref());
        self.send_raw(&out).await
    }

    /// Replies `{"error": {"class": class, "desc": desc}, "id": id}` to `req`.
    pub async fn reply_error(&mut self, req: &Request, class: &str, desc: &str) -> io::Result<()> {
        let mut out = Vec::new();
        encode_reply(
            &mut out,
            "error",
            &json!({"class": class, "desc": desc}),
            req.id.as_ref(),
        );
        self.send_raw(&out).await
    }

    /// Sends event `name` with `data` (omitted if `Null`) and the current
    /// wall-clock timestamp.
    pub async fn event(&mut self, name: &str, data: Value) -> io::Result<()> {
        let mut out = Vec::new();
        encode_event(&mut out, name, &data);
        self.send_raw(&out).await
    }

    /// Answers every request from here on like QEMU's happy path, until end
    /// of stream or an I/O error. See [`serve_instant_with_events`](Self::serve_instant_with_events).
    pub async fn serve_instant(self) {
        self.serve_instant_with_events(None).await
    }

    /// Like [`serve_instant`](Self::serve_instant), additionally sending a
    /// `STOP` event every `every` once capabilities are negotiated.
    ///
    /// Replies: `query-status` returns
    /// `{"status":"running","singlestep":false,"running":true}`,
    /// `ringbuf-read` an empty string, any other command `{}`. Before `qmp_capabilities`, other commands fail with
    /// `CommandNotFound` as in QEMU; invalid JSON, non-objects and requests
    /// without a command get a `GenericError`. Replies to all requests
    /// already buffered are written with one write.
    pub async fn serve_instant_with_events(mut self, every: Option<Duration>) {
        let mut tick = every.map(|d| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            t.set_missed_tick_behavior(MissedTickBehavior::Skip);
            t
        });
        let mut out = Vec::new();
        loop {
            let first = tokio::select! {
                r = self.recv() => match r {
                    Ok(Some(req)) => Some(req),
                    _ => return,
                },
                _ = async { tick.as_mut().expect("guarded").tick().await }, if tick.is_some() => None,
            };
            match first {
                Some(req) => {
                    instant_reply(&mut out, &req, &mut self.negotiated);
                    while let Some(req) = self.next_buffered() {
                        instant_reply(&mut out, &req, &mut self.negotiated);
                    }
                }
                None if self.negotiated => encode_event(&mut out, "STOP", &json!({})),
                None => continue,
            }
            if self.send_raw(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }

    /// Returns the underlying stream; requests buffered but not yet received
    /// are lost.
    pub fn into_inner(self) -> UnixStream {
        self.stream
    }

    fn next_buffered(&mut self) -> Option<Request> {
        self.ready.pop_front()
    }

    /// Splits what the last read completed into requests and gives fds to
    /// the request they came with. The kernel ends a `recvmsg` right after
    /// the data that carried fds, and a client sends a command with fds on a
    /// `sendmsg` of its own, so new fds belong to the last request this read
    /// completed; fds whose request is still incomplete go to the next one.
    fn split_read(&mut self, mut new_fds: Vec<OwnedFd>) {
        let first = self.ready.len();
        while let Some(raw) = self.splitter.next() {
            self.ready.push_back(Request::parse(raw, Vec::new()));
        }
        let completed = self.ready.len() - first;
        if completed > 0 && !self.fds.is_empty() {
            self.ready[first].fds = std::mem::take(&mut self.fds);
        }
        if !new_fds.is_empty() {
            match self.ready.back_mut().filter(|_| completed > 0) {
                Some(last) => last.fds.append(&mut new_fds),
                None => self.fds.append(&mut new_fds),
            }
        }
    }

    /// One `recvmsg` into the splitter, collecting any fds; 0 at EOF.
    async fn read_some(&mut self) -> io::Result<usize> {
        loop {
            self.stream.readable().await?;
            let FakeConn { stream, splitter, .. } = self;
            let mut fds = Vec::new();
            let res = stream.try_io(Interest::READABLE, || {
                SCRATCH.with_borrow_mut(|buf| {
                    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
                    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
                    let mut iov = [IoSliceMut::new(buf)];
                    let n = recvmsg(&*stream, &mut iov, &mut cmsg, RecvFlags::CMSG_CLOEXEC)?.bytes;
                    for msg in cmsg.drain() {
                        if let RecvAncillaryMessage::ScmRights(received) = msg {
                            fds.extend(received);
                        }
                    }
                    splitter.push(&buf[..n]);
                    Ok(n)
                })
            });
            match res {
                Ok(n) => {
                    self.split_read(fds);
                    return Ok(n);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Appends the happy-path answer to `req` to `out`.
fn instant_reply(out: &mut Vec<u8>, req: &Request, negotiated: &mut bool) {
    let id = req.id.as_ref();
    let error = |out: &mut Vec<u8>, class: &str, desc: &str| {
        encode_reply(out, "error", &json!({"class": class, "desc": desc}), id)
    };
    let Some(name) = req.name.as_deref() else {
        let desc = match &req.parse_error {
            Some(e) => format!("JSON parse error, {e}"),
            None if !req.value.is_object() => "QMP input must be a JSON object".to_owned(),
            None => "QMP input lacks member 'execute'".to_owned(),
        };
        return error(out, "GenericError", &desc);
    };
    match (name, *negotiated) {
        ("qmp_capabilities", false) => {
            *negotiated = true;
            encode_reply(out, "return", &json!({}), id)
        }
        ("qmp_capabilities", true) => error(
            out,
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
        ),
        (_, false) => error(
            out,
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        ),
        ("query-status", true) => encode_reply(
            out,
            "return",
            &json!({"status": "running", "singlestep": false, "running": true}),
            id,
        ),
        // An empty ring buffer, as a guest agent's serial port is when idle.
        ("ringbuf-read", true) => encode_reply(out, "return", &json!(""), id),
        (_, true) => encode_reply(out, "return", &json!({}), id),
    }
}

/// Appends `{"<key>": body, "id": id}\r\n` to `out`.
fn encode_reply(out: &mut Vec<u8>, key: &str, body: &Value, id: Option<&Value>) {
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\": ");
    write_json(out, body);
    if let Some(id) = id {
        out.extend_from_slice(b", \"id\": ");
        write_json(out, id);
    }
    out.extend_from_slice(b"}\r\n");
}

/// Appends an event with the current wall-clock timestamp to `out`.
fn encode_event(out: &mut Vec<u8>, name: &str, data: &Value) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    out.extend_from_slice(b"{\"event\": ");
    write_json(out, &Value::from(name));
    if !data.is_null() {
        out.extend_from_slice(b", \"data\": ");
        write_json(out, data);
    }
    let ts = format!(
        ", \"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}}}\r\n",
        now.as_secs(),
        now.subsec_micros()
    );
    out.extend_from_slice(ts.as_bytes());
}

fn write_json(out: &mut Vec<u8>, v: &Value) {
    serde_json::to_writer(out, v).expect("serializing a Value into a Vec cannot fail");
}
