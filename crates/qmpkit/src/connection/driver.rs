//! The task that owns the socket.
//!
//! One task reads and writes; callers reach it through a queue (see
//! [`requests`](super::requests)), each request
//! carrying its own reply slot. Because there is one writer, a command's file
//! descriptors always travel on the `sendmsg` that starts with that command's
//! first byte. Replies are matched by id, never by order.
//!
//! The task never waits on a caller or a subscriber: replies go into their
//! calls' slots and events into bounded per-subscriber queues. Only end-of-stream or
//! a socket error ends it (or every handle being dropped, or `disconnect`).
//!
//! Writing is guarded so that a frozen QEMU cannot make a timed-out command
//! run later: requests move from the client-side queue into the write buffer
//! only when the previous batch is fully written, and a request whose caller
//! has already given up is dropped before it is written.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::clock::Tick;

use serde_json::value::RawValue;
use tokio::time::Sleep;

use super::call::{Reply, Request};
use super::handshake::Handshaken;
use super::inflight::{InFlight, Pending};
use super::requests::{Sender, Signal};
use super::traffic_log::TrafficLog;
use super::transport::Transport;
use super::Shared;
use crate::error::{Error, ErrorClass, QmpError};
use crate::event::Event;
use crate::wire::message::{classify, Message, Outcome};
use crate::wire::splitter::{Fragment, Frame};
use crate::wire::{EventName, Timestamp};

/// Starts the task for a connection that completed its handshake; returns
/// the callers' end of its request queue. The task and the handles share `shared`.
pub(crate) fn spawn(hs: Handshaken, shared: Arc<Shared>, log: Option<TrafficLog>) -> Sender {
    let sender = Sender::new(shared.clone());
    let driver = Driver {
        stream: hs.stream,
        splitter: hs.splitter,
        requests: shared.clone(),
        state: State {
            inflight: InFlight::new(shared.oob, shared.config.replies_in_order),
            shared,
            log,
            wbuf: Vec::new(),
            wpos: 0,
            wfds: Vec::new(),
            events: Vec::new(),
            deadline_timer: None,
        },
    };
    tokio::spawn(driver.run(hs.early_events));
    sender
}

/// The connection's task: the driver, polled until the connection ends.
///
/// Written by hand rather than as an `async fn`: the compiler keeps an
/// async function's moved-in argument and the local it becomes side by
/// side, which doubled the task's size (some 1.4 KiB per idle connection
/// instead of about half that).
struct Task(Driver);

impl Future for Task {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let driver = &mut self.get_mut().0;
        match driver.poll_connection(cx) {
            Poll::Ready(ending) => {
                driver.shutdown(ending);
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

struct Driver {
    stream: Transport,
    splitter: crate::wire::splitter::Splitter,
    /// Where the requests queue (`Shared::requests`; a second reference,
    /// so that taking them can borrow it while `state` changes).
    requests: Arc<Shared>,
    state: State,
}

/// Everything but the socket, the splitter and the channel, so that frames
/// borrowed from the splitter can be handled while the state changes.
struct State {
    shared: Arc<Shared>,
    log: Option<TrafficLog>,
    /// Every request between the callers and QEMU.
    inflight: InFlight,
    /// Bytes committed to the socket, written up to `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// File descriptors to attach to the next write (which starts at the
    /// first byte of the command they belong to).
    wfds: Vec<OwnedFd>,
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
    at: Tick,
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
    /// A caller's stream has nothing for now and will wake the task when
    /// it has (the sockets say so through their readiness instead).
    Pending,
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
    /// Handles what the handshake read already and returns the task that
    /// runs the connection from there.
    fn run(mut self, early_events: Vec<Vec<u8>>) -> Task {
        // The handshake may have read events already.
        for event in early_events {
            self.state.handle_message(&event);
        }
        self.process_frames();
        self.state.flush_events();
        self.return_read_buffer();
        Task(self)
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
            let state = &mut self.state;
            let signal = self.requests.requests.take(cx, |out| {
                // One clock read for everything that arrived together.
                let now = *now.get_or_insert_with(Tick::now);
                state.enqueue(out, now);
            });
            match signal {
                None => {}
                Some(Signal::Disconnect) => return Poll::Ready(Ending::Requested),
                Some(Signal::Dropped) => return Poll::Ready(Ending::Dropped),
            }
            if let Err(e) = self.write_ready(cx) {
                return Poll::Ready(self.after_write_error(cx, e));
            }
            if let Some(timer) = &mut self.state.deadline_timer {
                if timer.fired(cx) {
                    self.state.deadline_timer = None;
                    self.state.expire_overdue(Tick::now());
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
                Poll::Ready(Ok(())) => match self.read_ready(cx, ReadVia::Reactor) {
                    // Round again: new requests, then sleep on the socket.
                    Ok(Read::Drained) => {}
                    Ok(Read::Pending) => return Poll::Pending,
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
    fn after_write_error(&mut self, cx: &mut Context<'_>, write_error: io::Error) -> Ending {
        loop {
            match self.read_ready(cx, ReadVia::Socket) {
                Ok(Read::Eof) => return Ending::Eof,
                Ok(Read::More) => continue,
                Ok(Read::Drained | Read::Pending) | Err(_) => return Ending::Io(write_error),
            }
        }
    }

    /// Reads what is available (up to a few buffers' worth) and handles
    /// every complete message.
    ///
    /// An idle connection owns no read buffer: it borrows the thread's for
    /// the read and gives it back once every message in it was handled. Only
    /// a connection left holding part of a message keeps one.
    fn read_ready(&mut self, cx: &mut Context<'_>, via: ReadVia) -> io::Result<Read> {
        if self.splitter.is_drained() {
            READ_BUFFER.with(|pool| self.splitter.adopt(std::mem::take(&mut *pool.borrow_mut())));
        }
        let outcome = self.read_some(cx, via);
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

    fn read_some(&mut self, cx: &mut Context<'_>, via: ReadVia) -> io::Result<Read> {
        let mut outcome = Read::More;
        for _ in 0..READS_PER_WAKE {
            let spare = self.splitter.spare();
            let room = spare.len();
            let read = match via {
                ReadVia::Reactor => self.stream.read_now(cx, spare),
                ReadVia::Socket => self.stream.read_direct(spare),
            };
            match read {
                Ok(0) => {
                    self.process_frames();
                    if self.splitter.has_partial() {
                        crate::diag::warning!("QMP: the connection closed in the middle of a message");
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
                    outcome = if self.stream.read_registers_waker() && matches!(via, ReadVia::Reactor) {
                        Read::Pending
                    } else {
                        Read::Drained
                    };
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
                    crate::diag::warning!(bytes = n, "QMP: skipped bytes that are not JSON objects");
                }
                Frame::TooLarge(o) => self.state.handle_oversized(o),
                Frame::Corrupt(c) => self.state.handle_corrupt(c),
            }
        }
    }

    /// Moves queued requests into the write buffer and writes as much as the
    /// socket takes now.
    fn write_ready(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
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
                    // Everything is written: a caller's stream may still
                    // hold it (a pending flush wakes the task when done).
                    return match self.stream.poll_flush_written(cx) {
                        Poll::Ready(result) => result,
                        Poll::Pending => Ok(()),
                    };
                }
            }
            let chunk = &st.wbuf[st.wpos..];
            let written = if st.wfds.is_empty() {
                self.stream.try_write(cx, chunk)
            } else {
                self.stream.try_send_with_fds(chunk, &st.wfds)
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

    /// Ends the connection: every caller is told, subscribers' streams
    /// end. The socket closes when the task, which owns it, is dropped.
    fn shutdown(&mut self, ending: Ending) {
        let reason: Arc<str> = match &ending {
            Ending::Eof => "QEMU closed the connection".into(),
            Ending::Io(e) => format!("socket error: {e}").into(),
            Ending::Requested => "disconnect requested".into(),
            Ending::Dropped => "every client handle was dropped".into(),
        };
        match &ending {
            Ending::Io(e) => crate::diag::warning!(error = %e, "QMP connection failed"),
            _ => crate::diag::debug!(%reason, "QMP connection closed"),
        }
        let err = Error::Disconnected { reason: Some(reason) };
        let st = &mut self.state;
        let _ = st.shared.close_reason.set(Box::new(err.clone()));
        // No request may slip in after this point unanswered.
        for out in self.requests.requests.close() {
            out.fail(err.clone());
        }
        st.inflight.fail_all(&err);
        st.shared.subscribers.close();
        st.shared.closed.set();
    }
}

impl State {
    fn enqueue(&mut self, out: Request, now: Tick) {
        if let Some(deadline) = self.inflight.enqueue(out, now) {
            self.arm_deadline_timer(deadline);
        }
    }

    /// Makes sure the task wakes by `deadline`.
    fn arm_deadline_timer(&mut self, deadline: Tick) {
        match &mut self.deadline_timer {
            Some(timer) if timer.at <= deadline => {}
            Some(timer) => {
                timer.sleep.as_mut().reset(deadline.to_tokio());
                timer.at = deadline;
                timer.polled = false;
            }
            None => {
                self.deadline_timer = Some(DeadlineTimer {
                    at: deadline,
                    sleep: Box::pin(tokio::time::sleep_until(deadline.to_tokio())),
                    polled: false,
                });
            }
        }
    }

    /// Times out every caller whose deadline passed and sets the timer for
    /// the next deadline.
    fn expire_overdue(&mut self, now: Tick) {
        if let Some(next) = self.inflight.expire(now) {
            self.arm_deadline_timer(next);
        }
    }

    /// Commits what may be written now to the (empty) write buffer.
    fn fill_write_buffer(&mut self) {
        // Most passes find nothing to write (a command at depth 1 makes
        // four): they skip the set-up below.
        if !self.inflight.has_unwritten() {
            return;
        }
        // Latencies are measured only when debug tracing is on: reading the
        // clock is a visible share of a command's cost.
        let now = crate::diag::debug_enabled!().then(Instant::now);
        let log = self.log.as_ref();
        // A probe's budget is the default one, read here rather than kept
        // in the task, which is allocated per connection by size class.
        let probe_budget = self.shared.config.default_timeout;
        let filled = self
            .inflight
            .fill(&mut self.wbuf, now, probe_budget, |out, bytes| {
                if let Some(log) = log.filter(|_| out.log) {
                    log.query(bytes);
                }
            });
        self.wfds = filled.fds;
        if let Some(deadline) = filled.probe_deadline {
            self.arm_deadline_timer(deadline);
        }
    }

    fn handle_message(&mut self, bytes: &[u8]) {
        match classify(bytes) {
            Message::Reply { id, outcome } => self.handle_reply(id, bytes, outcome),
            Message::Event {
                name,
                data,
                timestamp,
            } => self.handle_event(bytes, name, data, timestamp),
            Message::IdlessError(error) => match self.inflight.owner_of_idless_error() {
                Some(id) => self.handle_reply(id, bytes, Outcome::Error(error)),
                None => {
                    crate::diag::warning!(message = %String::from_utf8_lossy(bytes), "QMP: error without an id, and no way to tell which command caused it")
                }
            },
            Message::ForeignReply { id } => {
                crate::diag::warning!(%id, "QMP: reply with an id this client did not send")
            }
            Message::Greeting => crate::diag::warning!("QMP: skipped a second greeting"),
            Message::Unrecognised { why } => {
                crate::diag::warning!(%why, message = %quote(bytes), "QMP: skipped a message that is neither reply nor event")
            }
        }
    }

    /// Hands a reply to the caller waiting for `id`, if it still waits.
    fn handle_reply(&mut self, id: u64, bytes: &[u8], outcome: Outcome<'_>) {
        // Events QEMU sent before this reply are visible to subscribers by
        // the time any caller has a result (this one, or one released as lost).
        self.flush_events();
        let Some(p) = self.inflight.answer(id) else {
            crate::diag::debug!(id, "QMP: dropped a reply to a command this client did not send");
            return;
        };
        let waiting = p.has_caller();
        let Pending { request, sent_at, .. } = p;
        if !waiting {
            crate::diag::debug!(command = %request.name, id, "QMP: dropped a late reply (its caller timed out or gave up)");
            return;
        }
        if request.log {
            if let Some(traffic_log) = &self.log {
                traffic_log.reply(bytes);
            }
        }
        crate::diag::debug!(
            command = %request.name,
            id,
            latency_us = sent_at.map(|t| t.elapsed().as_micros() as u64),
            ok = !matches!(outcome, Outcome::Error(_) | Outcome::Malformed(_)),
            "QMP reply"
        );
        let result = match outcome {
            Outcome::Plain(value) => return request.reply_message(bytes, value),
            Outcome::Return(raw) => Ok(Reply::Value(raw.to_owned())),
            Outcome::Empty => Ok(Reply::Value(
                RawValue::from_string("{}".to_owned()).expect("{} is JSON"),
            )),
            Outcome::Error(err) => Err(Error::Qmp(QmpError {
                command: request.name.to_string(),
                class: ErrorClass::from_name(&err.class),
                desc: err.desc,
            })),
            Outcome::Malformed(e) => {
                crate::diag::warning!(command = %request.name, id, error = %e, "QMP: malformed reply");
                Err(Error::decode(&request.name, bytes, e))
            }
        };
        request.send(result);
    }

    /// Logs an event, remembers the last SHUTDOWN, and queues the event
    /// for the subscribers (handed over after the current read).
    fn handle_event(
        &mut self,
        bytes: &[u8],
        name: EventName<'_>,
        data: serde_json::Value,
        timestamp: Timestamp,
    ) {
        if let Some(log) = &self.log {
            log.event(name.as_str(), bytes);
        }
        crate::diag::trace!(event = name.as_str(), "QMP event");
        let event = Event::from_wire(name, data, timestamp);
        let remember = match event.name() {
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

    /// A message too large to keep: fails the command it answers, if that
    /// can be told.
    fn handle_oversized(&mut self, o: Fragment) {
        let limit = self.shared.config.max_message_size;
        if o.looks_like_event() {
            crate::diag::warning!(
                size = o.size,
                limit,
                "QMP: skipped an event larger than the message size limit"
            );
            return;
        }
        match self.owner_of_fragment(&o).and_then(|id| self.inflight.answer(id)) {
            Some(p) => {
                crate::diag::warning!(command = %p.request.name, size = o.size, limit, "QMP: reply larger than the message size limit");
                if p.has_caller() {
                    p.request.fail(Error::MessageTooLarge { size: o.size, limit });
                }
            }
            None => crate::diag::warning!(
                size = o.size,
                limit,
                "QMP: skipped a message larger than the size limit"
            ),
        }
    }

    /// A message cut short by the next one: fails the command it answers,
    /// if its id is visible; otherwise the loss is logged (and a later reply
    /// releases the command, see [`inflight`]). Unlike an oversized
    /// message, it is never attributed by order: what is left of it may be
    /// the late reply to a command whose caller already gave up.
    fn handle_corrupt(&mut self, c: Fragment) {
        if c.looks_like_event() {
            crate::diag::warning!(size = c.size, head = %quote(&c.head), "QMP: lost an event cut short by the next message");
            return;
        }
        match c.id().and_then(|id| self.inflight.answer(id)) {
            Some(p) => {
                crate::diag::warning!(command = %p.request.name, size = c.size, "QMP: reply cut short by the next message");
                if p.has_caller() {
                    let e = serde_json::from_slice::<serde::de::IgnoredAny>(&c.head)
                        .err()
                        .unwrap_or_else(|| serde::de::Error::custom("the message was cut short"));
                    p.request.fail(Error::decode(&p.request.name, &c.head, e));
                }
            }
            None => crate::diag::warning!(
                size = c.size,
                head = %quote(&c.head),
                "QMP: lost a message cut short by the next one; its command, if any, is released by the next reply"
            ),
        }
    }

    /// The command a fragment answers: its id where QEMU writes one, else
    /// the only or oldest command as for an error without an id.
    fn owner_of_fragment(&self, f: &Fragment) -> Option<u64> {
        f.id()
            .filter(|&id| self.inflight.is_pending(id))
            .or_else(|| self.inflight.owner_of_idless_error())
    }

    fn flush_events(&mut self) {
        if !self.events.is_empty() {
            self.shared.subscribers.publish(&self.events);
            self.events.clear();
        }
    }
}

/// The start of a message, for a log line.
#[cfg(feature = "tracing")]
fn quote(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
}
