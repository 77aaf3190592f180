//! The task that owns the socket.
//!
//! One task reads and writes; callers reach it through a channel, each request
//! carrying its own reply slot. Because there is one writer, a command's file
//! descriptors always travel on the `sendmsg` that starts with that command's
//! first byte. Replies are matched by id, never by order.
//!
//! The task never waits on a caller or a subscriber: replies go into oneshot
//! slots and events into bounded per-subscriber queues. Only end-of-stream or
//! a socket error ends it (or every handle being dropped, or `disconnect`).
//!
//! Writing is guarded so that a frozen QEMU cannot make a timed-out command
//! run later: requests move from the client-side queue into the write buffer
//! only when the previous batch is fully written, and a request whose caller
//! has already given up is dropped before it is written.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use serde_json::value::RawValue;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Sleep;

use super::handshake::Handshaken;
use super::socket;
use super::traffic_log::TrafficLog;
use super::Config;
use crate::client::{Client, Shared};
use crate::error::{Error, ErrorClass, QmpError};
use crate::event::{Event, Subscribers};
use crate::wire::splitter::{Frame, Oversized};
use crate::wire::{parse_message, quick_event, success_reply, Incoming, ReturnOf, Timestamp};

/// QEMU queues at most this many in-band commands when OOB is enabled
/// (QMP_REQ_QUEUE_LEN_MAX) and stops reading beyond that.
const QEMU_QUEUE_LIMIT: usize = 8;

/// What a caller gets back: a success reply, or an error.
pub(crate) type ReplyResult = Result<Reply, Error>;

/// A success reply on its way to the caller, who decodes it.
pub(crate) enum Reply {
    /// A whole `{"return": VALUE, "id": ID}` message, recognised without
    /// parsing it (see [`success_reply`]), and where VALUE lies in it: the
    /// caller's typed decode is then the only pass over it.
    Message {
        bytes: Box<[u8]>,
        value: std::ops::Range<usize>,
    },
    /// The `return` value of a message that needed the full parse.
    Value(Box<RawValue>),
}

impl Reply {
    /// Decodes the `return` value into the caller's type.
    pub(crate) fn decode<R: serde::de::DeserializeOwned>(&self, command: &str) -> Result<R, Error> {
        match self {
            // The value alone first; if its bytes are not one JSON value
            // (a message only shaped like a plain reply), the whole message
            // decides, and gives the error if there is one.
            Reply::Message { bytes, value } => parse_message::<R>(&bytes[value.clone()])
                .or_else(|_| parse_message::<ReturnOf<R>>(bytes).map(|r| r.value)),
            Reply::Value(raw) => serde_json::from_str(raw.get()),
        }
        .map_err(|e| Error::decode(command, e))
    }
}

/// A message to the task.
pub(crate) enum ToDriver {
    Command(Box<Outgoing>),
    Disconnect,
}

/// One serialised request on its way to QEMU.
pub(crate) struct Outgoing {
    pub id: u64,
    pub name: Cow<'static, str>,
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    pub oob: bool,
    pub log: bool,
    /// How long the caller waits for the reply.
    pub budget: Duration,
    /// When the caller gives up; set by the task when the request reaches it
    /// (`None`: a budget too large to represent, so never).
    pub deadline: Option<Instant>,
    pub reply: oneshot::Sender<ReplyResult>,
}

/// A request written (or being written) to QEMU and not yet answered.
struct Pending {
    name: Cow<'static, str>,
    /// `None` once the caller was told it timed out: QEMU still has the
    /// command (it counts towards QEMU's queue limit), and its late reply
    /// is dropped.
    reply: Option<oneshot::Sender<ReplyResult>>,
    budget: Duration,
    deadline: Option<Instant>,
    oob: bool,
    log: bool,
    /// When it was written; only measured when debug tracing is on, since
    /// reading the clock is a visible share of a command's cost.
    sent_at: Option<Instant>,
}

/// Starts the task for a connection that completed its handshake.
pub(crate) fn spawn(hs: Handshaken, config: Arc<Config>, log: Option<TrafficLog>, path: PathBuf) -> Client {
    let (tx, rx) = mpsc::unbounded_channel();
    let (closed, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        next_id: AtomicU64::new(1),
        config,
        greeting: hs.greeting,
        oob: hs.oob,
        subscribers: Subscribers::new(),
        closed,
        close_reason: OnceLock::new(),
        path,
        schema: Default::default(),
        last_shutdown: Default::default(),
    });
    let driver = Driver {
        stream: hs.stream,
        early_events: hs.early_events,
        splitter: hs.splitter,
        rx,
        state: State {
            shared: shared.clone(),
            log,
            pending: FxHashMap::default(),
            inband_order: VecDeque::new(),
            queue: VecDeque::new(),
            oob_queue: VecDeque::new(),
            wbuf: Vec::new(),
            wpos: 0,
            wfds: Vec::new(),
            fd_command: None,
            events: Vec::new(),
            deadline_timer: None,
        },
    };
    tokio::spawn(driver.run());
    Client::new(tx, shared)
}

struct Driver {
    stream: UnixStream,
    early_events: Vec<Vec<u8>>,
    splitter: crate::wire::splitter::Splitter,
    rx: mpsc::UnboundedReceiver<ToDriver>,
    state: State,
}

/// Everything but the socket, the splitter and the channel, so that frames
/// borrowed from the splitter can be handled while the state changes.
struct State {
    shared: Arc<Shared>,
    log: Option<TrafficLog>,
    /// Keyed by our own ids, so a fast non-keyed hash is safe: SipHash was
    /// ~300 instructions per command.
    pending: FxHashMap<u64, Pending>,
    /// In-band ids written and unanswered, oldest first.
    inband_order: VecDeque<u64>,
    /// Requests not yet written, in-band and out-of-band.
    queue: VecDeque<Box<Outgoing>>,
    oob_queue: VecDeque<Box<Outgoing>>,
    /// Bytes committed to the socket, written up to `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// File descriptors to attach to the next write (which starts at the
    /// first byte of the command they belong to).
    wfds: Vec<OwnedFd>,
    /// The unanswered command that carried fds: QEMU keeps only the latest
    /// fds it received, so a second one must wait for the first's reply.
    fd_command: Option<u64>,
    /// Events parsed from the current read, handed over in one batch.
    events: Vec<Event>,
    /// Wakes the task at the earliest deadline it knows of (it may be one
    /// that was met since; it is not moved back on every reply, so a busy
    /// connection does not touch the timer per command). `None` while
    /// nothing has a deadline.
    deadline_timer: Option<DeadlineTimer>,
}

/// The connection's one timer, for the earliest deadline it knows of.
struct DeadlineTimer {
    at: Instant,
    sleep: Pin<Box<Sleep>>,
    /// Whether the sleep holds this task's waker since it was last set. A
    /// task's waker does not change, so after that a cheap `is_elapsed`
    /// tells whether it fired, without polling it on every pass.
    polled: bool,
}

impl DeadlineTimer {
    fn fired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.polled && !self.sleep.is_elapsed() {
            return false;
        }
        self.polled = true;
        // Outside tokio's per-poll budget: a poll refused for lack of budget
        // would return Pending without arming the timer at all, and
        // `is_elapsed` would then never turn true (a burst of hundreds of
        // requests did exactly that: none of them ever timed out).
        let mut sleep = tokio::task::unconstrained(self.sleep.as_mut());
        Pin::new(&mut sleep).poll(cx).is_ready()
    }
}

/// Reads what the socket holds now, without waiting.
///
/// Unlike `try_read`, tokio's `poll_read` takes a short read as proof that the
/// socket is drained (it is, with epoll) and clears its readiness; so the next
/// wait goes straight to `epoll_wait` instead of first making a `recvfrom`
/// that can only fail with `EAGAIN`: one system call less per round trip.
fn read_now(stream: &mut UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::task::Waker;
    use tokio::io::{AsyncRead, ReadBuf};
    // A no-op waker is enough: the task registers its own waker with
    // `poll_read_ready` before it sleeps, and readiness set in between is kept.
    let mut cx = Context::from_waker(Waker::noop());
    let mut rb = ReadBuf::new(buf);
    match std::pin::Pin::new(stream).poll_read(&mut cx, &mut rb) {
        Poll::Ready(Ok(())) => Ok(rb.filled().len()),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

thread_local! {
    /// The read buffer that idle connections on this thread share.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer grown larger than this by a big message is freed, not pooled.
const POOLED_BUFFER_MAX: usize = 256 * 1024;

/// How many reads one wake-up may do before the task lets others run.
const READS_PER_WAKE: usize = 4;

/// How a read reaches the socket.
#[derive(Clone, Copy)]
enum ReadVia {
    /// Through tokio: the usual reads, which know when the socket is empty
    /// without a system call and yield when the task's budget is spent.
    Reactor,
    /// A plain non-blocking `recv`, for when everything there must be read
    /// now (draining after a failed write).
    Socket,
}

/// What a round of reading found.
enum Read {
    /// The socket has nothing more for now.
    Drained,
    /// There is probably more to read.
    More,
    /// End of stream.
    Eof,
}

/// What ended the connection.
enum Ending {
    Eof,
    Io(io::Error),
    Requested,
    Dropped,
}

impl Driver {
    async fn run(mut self) {
        // The handshake may have read events already.
        for event in std::mem::take(&mut self.early_events) {
            self.state.handle_message(&event);
        }
        self.process_frames();
        self.state.flush_events();
        self.return_read_buffer();
        let ending = std::future::poll_fn(|cx| self.poll_connection(cx)).await;
        self.shutdown(ending);
    }

    /// Does everything that can be done without waiting (take requests,
    /// write, read and dispatch) and returns `Pending` once each source it
    /// waits on has this task's waker; `Ready` only when the connection ends.
    ///
    /// Written as one poll function rather than a `select!` loop: polling the
    /// socket's readiness directly registers one waker per direction, where
    /// `readable()` futures would join and leave a waiter list (two lock
    /// round trips) on every pass; per command, that difference shows.
    fn poll_connection(&mut self, cx: &mut Context<'_>) -> Poll<Ending> {
        loop {
            // Requests first: a server flooding us with events must not
            // starve the callers. All of those queued now go out in one write.
            let mut now = None;
            loop {
                match self.rx.poll_recv(cx) {
                    Poll::Ready(Some(ToDriver::Command(out))) => {
                        // One clock read for everything that arrived together.
                        let now = *now.get_or_insert_with(Instant::now);
                        self.state.enqueue(out, now);
                    }
                    Poll::Ready(Some(ToDriver::Disconnect)) => return Poll::Ready(Ending::Requested),
                    Poll::Ready(None) => return Poll::Ready(Ending::Dropped),
                    Poll::Pending => break,
                }
            }
            if let Err(e) = self.write_ready() {
                return Poll::Ready(self.after_write_error(e));
            }
            if let Some(timer) = &mut self.state.deadline_timer {
                if timer.fired(cx) {
                    self.state.deadline_timer = None;
                    self.state.expire_overdue(Instant::now());
                    // Round again, so that a re-armed timer is polled.
                    continue;
                }
            }
            if self.state.wpos < self.state.wbuf.len() {
                // The socket is full: be woken when it drains.
                match self.stream.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Ending::Io(e)),
                    Poll::Pending => {}
                }
            }
            match self.stream.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Ending::Io(e)),
                Poll::Ready(Ok(())) => match self.read_ready(ReadVia::Reactor) {
                    // Round again: new requests, then sleep on the socket.
                    Ok(Read::Drained) => {}
                    Ok(Read::More) => {
                        // A fast server can keep the socket full forever: let
                        // the callers and subscribers on this thread run too.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    Ok(Read::Eof) => return Poll::Ready(Ending::Eof),
                    Err(e) => return Poll::Ready(Ending::Io(e)),
                },
            }
        }
    }

    /// A write failed (QEMU closed its end, typically after `quit`): what
    /// QEMU sent before closing is already here, so read it to the end
    /// before giving up: a SHUTDOWN event or the last replies are not lost.
    ///
    /// These reads go straight to the socket, not through tokio: this may
    /// run in a poll that used up tokio's budget, and tokio's readiness may
    /// not know yet of what arrived since the last wait; either would make
    /// the socket look empty and lose what QEMU sent last.
    fn after_write_error(&mut self, write_error: io::Error) -> Ending {
        loop {
            match self.read_ready(ReadVia::Socket) {
                Ok(Read::Eof) => return Ending::Eof,
                Ok(Read::More) => continue,
                Ok(Read::Drained) | Err(_) => return Ending::Io(write_error),
            }
        }
    }

    /// Reads what is available (up to a few buffers' worth) and handles
    /// every complete message.
    ///
    /// An idle connection owns no read buffer: it borrows the thread's for
    /// the read and gives it back once every message in it was handled. Only
    /// a connection left holding part of a message keeps one.
    fn read_ready(&mut self, via: ReadVia) -> io::Result<Read> {
        if self.splitter.is_drained() {
            READ_BUFFER.with(|pool| self.splitter.adopt(std::mem::take(&mut *pool.borrow_mut())));
        }
        let outcome = self.read_some(via);
        self.return_read_buffer();
        outcome
    }

    /// Hands the read buffer to the thread's pool when no message is in it.
    fn return_read_buffer(&mut self) {
        if self.splitter.is_drained() {
            let buf = self.splitter.release();
            if buf.capacity() <= POOLED_BUFFER_MAX {
                READ_BUFFER.with(|pool| {
                    let mut pool = pool.borrow_mut();
                    if pool.capacity() < buf.capacity() {
                        *pool = buf;
                    }
                });
            }
        }
    }

    fn read_some(&mut self, via: ReadVia) -> io::Result<Read> {
        let mut outcome = Read::More;
        for _ in 0..READS_PER_WAKE {
            let spare = self.splitter.spare();
            let room = spare.len();
            let read = match via {
                ReadVia::Reactor => read_now(&mut self.stream, spare),
                ReadVia::Socket => rustix::net::recv(&self.stream, spare, rustix::net::RecvFlags::DONTWAIT)
                    .map(|(n, _)| n)
                    .map_err(io::Error::from),
            };
            match read {
                Ok(0) => {
                    self.process_frames();
                    if self.splitter.has_partial() {
                        tracing::warn!("QMP: the connection closed in the middle of a message");
                    }
                    self.state.flush_events();
                    return Ok(Read::Eof);
                }
                Ok(n) => {
                    self.splitter.filled(n);
                    self.process_frames();
                    if n < room {
                        outcome = Read::Drained;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    outcome = Read::Drained;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.state.flush_events();
        Ok(outcome)
    }

    fn process_frames(&mut self) {
        while let Some(frame) = self.splitter.next_frame() {
            match frame {
                Frame::Message(range) => self.state.handle_message(self.splitter.bytes(range)),
                Frame::Garbage(n) => {
                    tracing::warn!(bytes = n, "QMP: skipped bytes that are not JSON objects");
                }
                Frame::TooLarge(o) => self.state.handle_oversized(o),
            }
        }
    }

    /// Moves queued requests into the write buffer and writes as much as the
    /// socket takes now.
    fn write_ready(&mut self) -> io::Result<()> {
        loop {
            let st = &mut self.state;
            if st.wpos == st.wbuf.len() {
                if st.wbuf.capacity() > 64 * 1024 {
                    // Do not keep a huge command's buffer for the connection's life.
                    st.wbuf = Vec::new();
                }
                st.wbuf.clear();
                st.wpos = 0;
                st.fill_write_buffer();
                if st.wbuf.is_empty() {
                    return Ok(());
                }
            }
            let chunk = &st.wbuf[st.wpos..];
            let written = if st.wfds.is_empty() {
                self.stream.try_write(chunk)
            } else {
                socket::try_send_with_fds(&self.stream, chunk, &st.wfds)
            };
            match written {
                Ok(n) => {
                    // The kernel holds its own references now.
                    st.wfds.clear();
                    st.wpos += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn shutdown(mut self, ending: Ending) {
        let reason: Arc<str> = match &ending {
            Ending::Eof => "QEMU closed the connection".into(),
            Ending::Io(e) => format!("socket error: {e}").into(),
            Ending::Requested => "disconnect requested".into(),
            Ending::Dropped => "every client handle was dropped".into(),
        };
        match &ending {
            Ending::Io(e) => tracing::warn!(error = %e, "QMP connection failed"),
            _ => tracing::debug!(%reason, "QMP connection closed"),
        }
        let err = Error::Disconnected { reason: Some(reason) };
        let st = &mut self.state;
        let _ = st.shared.close_reason.set(err.clone());
        // No request may slip in after this point unanswered.
        self.rx.close();
        while let Ok(msg) = self.rx.try_recv() {
            if let ToDriver::Command(out) = msg {
                let _ = out.reply.send(Err(err.clone()));
            }
        }
        for out in st.queue.drain(..).chain(st.oob_queue.drain(..)) {
            let _ = out.reply.send(Err(err.clone()));
        }
        for (_, p) in st.pending.drain() {
            if let Some(reply) = p.reply {
                let _ = reply.send(Err(err.clone()));
            }
        }
        st.shared.subscribers.close();
        st.shared.closed.send_replace(true);
        // The socket closes when `self.stream` drops here.
    }
}

impl State {
    fn enqueue(&mut self, mut out: Box<Outgoing>, now: Instant) {
        out.deadline = now.checked_add(out.budget);
        if let Some(deadline) = out.deadline {
            self.arm_deadline_timer(deadline);
        }
        if out.oob {
            self.oob_queue.push_back(out);
        } else {
            self.queue.push_back(out);
        }
    }

    /// Makes sure the task wakes by `deadline`.
    fn arm_deadline_timer(&mut self, deadline: Instant) {
        match &mut self.deadline_timer {
            Some(timer) if timer.at <= deadline => {}
            Some(timer) => {
                timer.sleep.as_mut().reset(deadline.into());
                timer.at = deadline;
                timer.polled = false;
            }
            None => {
                self.deadline_timer = Some(DeadlineTimer {
                    at: deadline,
                    sleep: Box::pin(tokio::time::sleep_until(deadline.into())),
                    polled: false,
                });
            }
        }
    }

    /// Tells every caller whose deadline has passed that its command timed
    /// out, and sets the timer for the next deadline. A request not written
    /// yet is dropped, so it never reaches QEMU; a written one stays known
    /// until QEMU answers, and that late reply is dropped by id.
    fn expire_overdue(&mut self, now: Instant) {
        let mut next: Option<Instant> = None;
        let mut still_waiting = |d: Instant| next = Some(next.map_or(d, |n| n.min(d)));
        let timeout = |name: &str, budget: Duration| Error::Timeout {
            command: name.to_owned(),
            budget,
        };
        for queue in [&mut self.queue, &mut self.oob_queue] {
            for out in std::mem::take(queue) {
                match out.deadline {
                    Some(d) if d <= now => {
                        tracing::debug!(command = %out.name, id = out.id, "QMP: timed out before it was written");
                        let _ = out.reply.send(Err(timeout(&out.name, out.budget)));
                    }
                    d => {
                        if let Some(d) = d {
                            still_waiting(d);
                        }
                        queue.push_back(out);
                    }
                }
            }
        }
        for (id, p) in &mut self.pending {
            let Some(d) = p.deadline.filter(|_| p.reply.is_some()) else {
                continue;
            };
            if d <= now {
                tracing::debug!(command = %p.name, id, "QMP: timed out waiting for the reply");
                if let Some(reply) = p.reply.take() {
                    let _ = reply.send(Err(timeout(&p.name, p.budget)));
                }
            } else {
                still_waiting(d);
            }
        }
        if let Some(d) = next {
            self.arm_deadline_timer(d);
        }
    }

    /// Commits queued requests to the (empty) write buffer: out-of-band ones
    /// first, then in-band ones up to QEMU's queue limit. A request with fds
    /// goes alone: its `sendmsg` carries its bytes and nothing else, so the
    /// server can tell whose fds they are.
    fn fill_write_buffer(&mut self) {
        let limit = if self.shared.oob {
            QEMU_QUEUE_LIMIT
        } else {
            usize::MAX
        };
        loop {
            let from_oob = !self.oob_queue.is_empty();
            let queue = if from_oob {
                &mut self.oob_queue
            } else {
                &mut self.queue
            };
            let Some(next) = queue.front() else { return };
            if !from_oob && self.inband_order.len() >= limit {
                return;
            }
            let with_fds = !next.fds.is_empty();
            if with_fds && (!self.wbuf.is_empty() || self.fd_command.is_some()) {
                return;
            }
            let out = queue.pop_front().expect("front exists");
            if self.commit(*out) && with_fds {
                return;
            }
        }
    }

    /// Adds a request to the write buffer; false if its caller gave up already.
    fn commit(&mut self, out: Outgoing) -> bool {
        if out.reply.is_closed() {
            // The caller gave up (timeout or cancellation) before the request
            // was written: it never reaches QEMU. Its fds close on drop.
            tracing::debug!(command = %out.name, id = out.id, "dropped a request whose caller gave up");
            return false;
        }
        if let Some(log) = self.log.as_ref().filter(|_| out.log) {
            log.query(&out.bytes);
        }
        self.wbuf.extend_from_slice(&out.bytes);
        if !out.fds.is_empty() {
            self.wfds = out.fds;
            self.fd_command = Some(out.id);
        }
        if !out.oob {
            self.inband_order.push_back(out.id);
        }
        self.pending.insert(
            out.id,
            Pending {
                name: out.name,
                reply: Some(out.reply),
                budget: out.budget,
                deadline: out.deadline,
                oob: out.oob,
                log: out.log,
                sent_at: tracing::enabled!(tracing::Level::DEBUG).then(Instant::now),
            },
        );
        true
    }

    fn handle_message(&mut self, bytes: &[u8]) {
        if let Some(reply) = success_reply(bytes) {
            self.deliver(reply.id, bytes, |_| {
                Ok(Reply::Message {
                    bytes: bytes.into(),
                    value: reply.value,
                })
            });
            return;
        }
        if let Some(event) = quick_event(bytes) {
            let data = match event.data {
                None => Some(serde_json::Value::Null),
                // Fails on anything that is not exactly one JSON value, such
                // as further members after `data`: the general parse decides.
                Some(text) => serde_json::from_str(text).ok(),
            };
            if let Some(data) = data {
                self.handle_event(bytes, event.name, data, event.timestamp);
                return;
            }
        }
        let msg = match parse_message::<Incoming>(bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, message = %String::from_utf8_lossy(&bytes[..bytes.len().min(200)]), "QMP: skipped an unparseable message");
                return;
            }
        };
        if let Some(name) = msg.event.as_deref() {
            let timestamp = msg.timestamp.unwrap_or(Timestamp {
                seconds: -1,
                microseconds: -1,
            });
            self.handle_event(
                bytes,
                name,
                msg.data.unwrap_or(serde_json::Value::Null),
                timestamp,
            );
            return;
        }
        if msg.ret.is_none() && msg.error.is_none() {
            if msg.greeting.is_none() {
                tracing::warn!(message = %String::from_utf8_lossy(&bytes[..bytes.len().min(200)]), "QMP: skipped a message that is neither reply nor event");
            }
            return;
        }
        let id = match msg.id {
            Some(_) => match msg.numeric_id() {
                Some(id) => Some(id),
                None => {
                    tracing::warn!(id = %msg.id.map(|r| r.get()).unwrap_or(""), "QMP: reply with an id this client did not send");
                    return;
                }
            },
            None => None,
        };
        let id = match id.or_else(|| self.owner_of_idless_error()) {
            Some(id) => id,
            None => {
                tracing::warn!(message = %String::from_utf8_lossy(bytes), "QMP: error without an id, and no way to tell which command caused it");
                return;
            }
        };
        let (error, ret) = (msg.error, msg.ret);
        self.deliver(id, bytes, |command| match (error, ret) {
            (Some(err), _) => Err(Error::Qmp(QmpError {
                command: command.to_string(),
                class: ErrorClass::from_name(&err.class),
                desc: err.desc,
            })),
            (None, Some(ret)) => Ok(Reply::Value(ret.to_owned())),
            (None, None) => unreachable!("checked above"),
        });
    }

    /// Logs an event, remembers the last SHUTDOWN, and queues the event
    /// for the subscribers (handed over after the current read).
    fn handle_event(&mut self, bytes: &[u8], name: &str, data: serde_json::Value, timestamp: Timestamp) {
        if let Some(log) = &self.log {
            log.event(bytes);
        }
        tracing::trace!(event = name, "QMP event");
        let event = Event::new(name, data, timestamp);
        let remember = match name {
            "SHUTDOWN" => Some(Some(event.clone())),
            "RESUME" => Some(None),
            _ => None,
        };
        if let Some(value) = remember {
            *self
                .shared
                .last_shutdown
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = value;
        }
        self.events.push(event);
    }

    /// Hands a reply to the caller waiting for `id`, if it still waits.
    fn deliver(&mut self, id: u64, bytes: &[u8], result: impl FnOnce(&str) -> ReplyResult) {
        let Some(p) = self.take_pending(id) else {
            tracing::debug!(id, "QMP: dropped a reply to a command this client did not send");
            return;
        };
        let Some(reply) = p.reply else {
            tracing::debug!(command = %p.name, id, "QMP: dropped a late reply (its caller timed out)");
            return;
        };
        // Events QEMU sent before this reply are visible to subscribers by
        // the time the caller has the reply.
        self.flush_events();
        if p.log {
            if let Some(log) = &self.log {
                log.reply(bytes);
            }
        }
        let result = result(&p.name);
        tracing::debug!(
            command = %p.name,
            id,
            latency_us = p.sent_at.map(|t| t.elapsed().as_micros() as u64),
            ok = result.is_ok(),
            "QMP reply"
        );
        let _ = reply.send(result);
    }

    /// The command an error without an id belongs to, when that is certain:
    /// the only one in flight, or without OOB (where QEMU answers strictly
    /// in order) the oldest one.
    fn owner_of_idless_error(&self) -> Option<u64> {
        if self.pending.len() == 1 {
            return self.pending.keys().next().copied();
        }
        if !self.shared.oob {
            return self.inband_order.front().copied();
        }
        None
    }

    fn take_pending(&mut self, id: u64) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if !p.oob {
            if let Some(i) = self.inband_order.iter().position(|&x| x == id) {
                self.inband_order.remove(i);
            }
        }
        if self.fd_command == Some(id) {
            self.fd_command = None;
        }
        Some(p)
    }

    fn handle_oversized(&mut self, o: Oversized) {
        let limit = self.shared.config.max_message_size;
        if o.looks_like_event() {
            tracing::warn!(
                size = o.size,
                limit,
                "QMP: skipped an event larger than the message size limit"
            );
            return;
        }
        let id = o
            .id()
            .filter(|id| self.pending.contains_key(id))
            .or_else(|| self.owner_of_idless_error());
        match id.and_then(|id| self.take_pending(id)) {
            Some(p) => {
                tracing::warn!(command = %p.name, size = o.size, limit, "QMP: reply larger than the message size limit");
                if let Some(reply) = p.reply {
                    let _ = reply.send(Err(Error::MessageTooLarge { size: o.size, limit }));
                }
            }
            None => tracing::warn!(
                size = o.size,
                limit,
                "QMP: skipped a message larger than the size limit"
            ),
        }
    }

    fn flush_events(&mut self) {
        if !self.events.is_empty() {
            self.shared.subscribers.publish(&self.events);
            self.events.clear();
        }
    }
}
