//! Floors for a QMP client on tokio: how few instructions per command a
//! client can spend on tokio's I/O, on the hop between a caller's task and
//! the task that owns the socket, and on decoding the reply into a typed
//! struct. Set beside qmpkit's figure (bench/instructions.sh with FLOORS=1),
//! they tell the library's own overhead from what any typed, pipelining
//! client on tokio pays.
//!
//! usage: tokio-floor SOCKET N DEPTH MODE, against the floor's `fakeqmp`
//!   inline       one task writes the requests and reads reply lines itself
//!   task         callers send requests to a connection task through a
//!                channel and await each reply line on a oneshot
//!   task-decode  as `task`, and each caller decodes its reply with serde_json
//!   task-decode-timer
//!                as `task-decode`, with one timer pending in the runtime
//!                (an hour away): what tokio's time driver costs each park
//!                once any timer exists, as one always does in a program with
//!                a timeout or a periodic poll (and in qmpkit, whose
//!                connection keeps one for its commands' deadlines)
//! Prints one JSON line, as the floor's `raw` client does:
//! {"client":"tokio-floor","mode":M,"n":N,"depth":D,"total_s":T,"us_per_cmd":U}
//!
//! Each mode does the least its step needs: no timeouts, no events, no
//! traffic log, no error replies, and replies are assumed in order (QMP
//! without oob answers in order), so only the floor's cost is left.
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Inline,
    Task,
    TaskDecode,
    TaskDecodeTimer,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Inline, Mode::Task, Mode::TaskDecode, Mode::TaskDecodeTimer];

    fn name(self) -> &'static str {
        match self {
            Mode::Inline => "inline",
            Mode::Task => "task",
            Mode::TaskDecode => "task-decode",
            Mode::TaskDecodeTimer => "task-decode-timer",
        }
    }
}

/// query-status's reply, as a typed client decodes it. The reply's `id`
/// is left to serde's skipping of unknown fields, as a client that has
/// already matched the reply by id would.
#[derive(Deserialize)]
struct Reply {
    r#return: StatusInfo,
}

#[derive(Deserialize)]
struct StatusInfo {
    status: RunState,
    singlestep: bool,
    running: bool,
}

/// QAPI's RunState: matching the string against every variant is part of
/// what a typed client pays.
#[derive(Deserialize, PartialEq, Debug)]
#[serde(rename_all = "kebab-case")]
enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let parsed = match args.as_slice() {
        [_, socket, n, depth, mode] => (|| {
            let n: usize = n.parse().ok().filter(|&n| n > 0)?;
            let depth: usize = depth.parse().ok().filter(|&d| d > 0)?;
            let mode = Mode::ALL.into_iter().find(|m| m.name() == mode)?;
            Some((socket.clone(), n, depth, mode))
        })(),
        _ => None,
    };
    let Some((socket, n, depth, mode)) = parsed else {
        eprintln!(
            "usage: tokio-floor SOCKET N DEPTH inline|task|task-decode|task-decode-timer  (N, DEPTH >= 1)"
        );
        std::process::exit(2);
    };
    // One thread, with the I/O and time drivers, as `qmpctl bench` builds
    // its runtime: the floor parks the way qmpkit does.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime");
    match runtime.block_on(run(&socket, n, depth, mode)) {
        Ok(secs) => println!(
            r#"{{"client":"tokio-floor","mode":"{}","n":{},"depth":{},"total_s":{:.6},"us_per_cmd":{:.2}}}"#,
            mode.name(),
            n,
            depth,
            secs,
            secs * 1e6 / n as f64
        ),
        Err(e) => {
            eprintln!("tokio-floor: {e}");
            std::process::exit(1);
        }
    }
}

/// Connects, shakes hands, runs N commands; returns the seconds they took.
async fn run(socket: &str, n: usize, depth: usize, mode: Mode) -> io::Result<f64> {
    let mut stream = UnixStream::connect(socket).await?;
    let mut lines = Lines::new();
    let greeting = read_line(&mut stream, &mut lines).await?;
    if !greeting.starts_with(b"{\"QMP\"") {
        return Err(io::Error::other("the server sent no QMP greeting"));
    }
    stream.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").await?;
    let reply = read_line(&mut stream, &mut lines).await?;
    if !reply.starts_with(b"{\"return\"") {
        return Err(io::Error::other("qmp_capabilities failed"));
    }

    // Pending for the whole run and never reached: the time driver has a
    // timer to look at on every park, and nothing else changes.
    let _timer = (mode == Mode::TaskDecodeTimer).then(|| {
        tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        })
    });
    let started = Instant::now();
    if mode == Mode::Inline {
        // Spawned rather than run in block_on's own future, so that it is
        // polled as a task, as the other modes' tasks and qmpkit's are.
        tokio::spawn(inline(stream, lines, n, depth))
            .await
            .map_err(io::Error::other)??;
        return Ok(started.elapsed().as_secs_f64());
    }

    let (requests, queue) = mpsc::unbounded_channel();
    let connection = tokio::spawn(Connection {
        stream,
        lines,
        queue,
        open: true,
        out: Vec::with_capacity(4096),
        written: 0,
        next_id: 1,
        first_id: 1,
        waiting: VecDeque::new(),
    });
    // DEPTH in flight: DEPTH caller tasks on this one thread, each taking the
    // next of the N commands from a shared count and awaiting its reply
    // before it sends another. This is how `qmpctl bench` keeps its depth,
    // so each caller's await, wake-up and reschedule is in the floor as it is
    // in qmpkit's figure (a single loop over a window of futures would pay
    // for a combinator that no caller of a library uses), and N need not be
    // a multiple of DEPTH.
    let next = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..depth.min(n))
        .map(|_| {
            tokio::spawn(caller(
                requests.clone(),
                next.clone(),
                n,
                matches!(mode, Mode::TaskDecode | Mode::TaskDecodeTimer),
            ))
        })
        .collect();
    // The connection task ends once every sender is gone and every reply is in.
    drop(requests);
    for c in callers {
        c.await.map_err(io::Error::other)??;
    }
    connection.await.map_err(io::Error::other)??;
    Ok(started.elapsed().as_secs_f64())
}

/// `inline`: one task writes and reads, and only counts reply lines: the
/// cost of tokio's I/O (readiness, the reactor, parking) and nothing else.
async fn inline(mut stream: UnixStream, mut lines: Lines, n: usize, depth: usize) -> io::Result<()> {
    let mut out = Vec::with_capacity(4096);
    let (mut sent, mut got) = (0, 0);
    while got < n {
        // Top the window up and send what it lacks in one write, as a
        // pipelining client would; at depth 1 that is one request.
        while sent < n && sent - got < depth {
            sent += 1;
            push_request(&mut out, sent as u64);
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        let k = stream.read(lines.spare()).await?;
        if k == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        lines.filled(k);
        while lines.next_line().is_some() {
            got += 1;
        }
    }
    Ok(())
}

/// A caller's request: only where its reply goes, since every command is
/// query-status; the connection task gives it an id.
struct Request {
    reply: oneshot::Sender<Vec<u8>>,
}

/// `task` and `task-decode`: one caller, sending a command at a time.
async fn caller(
    requests: mpsc::UnboundedSender<Request>,
    next: Arc<AtomicUsize>,
    n: usize,
    decode: bool,
) -> io::Result<()> {
    let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "the connection task ended");
    while next.fetch_add(1, Ordering::Relaxed) < n {
        let (reply, wait) = oneshot::channel();
        requests.send(Request { reply }).map_err(|_| closed())?;
        let line = wait.await.map_err(|_| closed())?;
        if decode {
            // One UTF-8 check of the whole line, then from_str: from_slice
            // checks each string it borrows on its own, which cost ~440 more
            // instructions per reply here (six short strings).
            let text = std::str::from_utf8(&line).map_err(io::Error::other)?;
            let info = serde_json::from_str::<Reply>(text)
                .map_err(io::Error::other)?
                .r#return;
            // Look at every field, so none of the decoding can be optimised away.
            if info.status != RunState::Prelaunch || info.running || info.singlestep {
                return Err(io::Error::other(format!("unexpected status {:?}", info.status)));
            }
        } else {
            std::hint::black_box(&line);
        }
    }
    Ok(())
}

/// The task that owns the socket. A hand-written future rather than an
/// async loop around `select!`: it takes every queued request, writes them
/// in one go, and reads until the socket has nothing more, registering for
/// both wake-ups in one poll, which is the least a connection task can do.
struct Connection {
    stream: UnixStream,
    lines: Lines,
    queue: mpsc::UnboundedReceiver<Request>,
    /// Whether any caller may still send.
    open: bool,
    /// Encoded requests, and how much of them the socket has taken.
    out: Vec<u8>,
    written: usize,
    next_id: u64,
    /// The callers awaiting replies: `waiting[i]` awaits id `first_id + i`.
    /// Ids are handed out in sequence and replies come in order, so the
    /// match is an index (a hash map would cost a hash per command); a reply
    /// out of order leaves a `None` that is popped when the front catches up.
    first_id: u64,
    waiting: VecDeque<Option<oneshot::Sender<Vec<u8>>>>,
}

impl Future for Connection {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.open {
            match this.queue.poll_recv(cx) {
                Poll::Ready(Some(request)) => {
                    push_request(&mut this.out, this.next_id);
                    this.next_id += 1;
                    this.waiting.push_back(Some(request.reply));
                }
                Poll::Ready(None) => this.open = false,
                Poll::Pending => break,
            }
        }
        while this.written < this.out.len() {
            match Pin::new(&mut this.stream).poll_write(cx, &this.out[this.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(k)) => this.written += k,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // Woken when the socket takes more; read meanwhile, so that
                // a server blocked on writing its replies is drained.
                Poll::Pending => break,
            }
        }
        if this.written == this.out.len() {
            this.out.clear();
            this.written = 0;
        }
        loop {
            if !this.open && this.waiting.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(this.lines.spare());
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let k = buf.filled().len();
                    if k == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    this.lines.filled(k);
                }
            }
            while let Some(line) = this.lines.next_line() {
                let Some(id) = trailing_id(line) else {
                    return Poll::Ready(Err(io::Error::other("a reply without an id")));
                };
                let slot = id
                    .checked_sub(this.first_id)
                    .and_then(|i| this.waiting.get_mut(i as usize));
                let Some(reply) = slot.and_then(Option::take) else {
                    return Poll::Ready(Err(io::Error::other(format!("a reply to unknown id {id}"))));
                };
                // A caller that has gone no longer wants its reply.
                let _ = reply.send(line.to_vec());
                while let Some(None) = this.waiting.front() {
                    this.waiting.pop_front();
                    this.first_id += 1;
                }
            }
        }
    }
}

/// Appends `{"execute":"query-status","id":ID}\n`; the digits by hand,
/// since `write!` would bring the formatting machinery into the floor.
fn push_request(out: &mut Vec<u8>, id: u64) {
    out.extend_from_slice(b"{\"execute\":\"query-status\",\"id\":");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = id;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"}\n");
}

/// The id of a reply that ends `"id": N}`, as fakeqmp's and QEMU's do (the
/// id is the last member, numbers only): the digits before the last `}`.
fn trailing_id(line: &[u8]) -> Option<u64> {
    let end = line.iter().rposition(|&b| b == b'}')?;
    let body = line[..end].trim_ascii_end();
    let start = body
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    let digits = &body[start..];
    if digits.is_empty() || digits.len() > 19 || !body[..start].trim_ascii_end().ends_with(b"\"id\":") {
        return None;
    }
    Some(digits.iter().fold(0, |v, &d| v * 10 + u64::from(d - b'0')))
}

/// Bytes read and not yet split into lines: `buf[head..tail]`.
struct Lines {
    buf: Vec<u8>,
    head: usize,
    tail: usize,
}

impl Lines {
    fn new() -> Lines {
        Lines {
            buf: vec![0; 64 * 1024],
            head: 0,
            tail: 0,
        }
    }

    /// The next complete line, without its `\r\n` or `\n`.
    fn next_line(&mut self) -> Option<&[u8]> {
        let at = self.head + memchr::memchr(b'\n', &self.buf[self.head..self.tail])?;
        let start = self.head;
        self.head = at + 1;
        let line = &self.buf[start..at];
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    }

    /// Room to read into: at the start again once everything is consumed,
    /// moving a partial line down, or growing for a line as long as the buffer.
    fn spare(&mut self) -> &mut [u8] {
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        } else if self.tail == self.buf.len() {
            if self.head > 0 {
                self.buf.copy_within(self.head..self.tail, 0);
                self.tail -= self.head;
                self.head = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        &mut self.buf[self.tail..]
    }

    fn filled(&mut self, k: usize) {
        self.tail += k;
    }
}

/// One line for the handshake, reading as needed.
async fn read_line(stream: &mut UnixStream, lines: &mut Lines) -> io::Result<Vec<u8>> {
    loop {
        if let Some(line) = lines.next_line() {
            return Ok(line.to_vec());
        }
        let k = stream.read(lines.spare()).await?;
        if k == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        lines.filled(k);
    }
}
