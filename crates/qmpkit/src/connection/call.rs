//! One command's way from its caller to QEMU and back, in one allocation.
//!
//! A [`Call`] holds the request (its id, name and bytes, the fds it passes)
//! and the slot its result comes back in. The caller keeps one end, a
//! [`Waiter`]; the connection's task keeps the other, a [`Request`]. It
//! replaces a boxed request plus a tokio oneshot (two allocations, and a
//! third for the reply's bytes): the request's byte buffer, once written,
//! takes the reply's bytes, so a command with a small reply allocates twice
//! in all (the call and its buffer) instead of four times.
//!
//! And usually not at all: the last of a call's two ends to go keeps the
//! call, with its buffer, for the next command started on the same thread
//! (a few dozen per thread; see [`Call::blank`]). Making and freeing the
//! two allocations cost ~260 instructions per command.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use super::clock::Tick;

use serde_json::value::RawValue;

use crate::error::Error;
use crate::wire::{parse_message, ReturnOf};

/// What a caller gets back: a success reply, or an error.
pub(crate) type ReplyResult = Result<Reply, Error>;

/// A success reply on its way to the caller, who decodes it.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A whole `{"return": VALUE, "id": ID}` message, recognised without
    /// parsing it, and where VALUE lies in it: the caller's typed decode is
    /// then the only pass over it.
    Message { bytes: Vec<u8>, value: Range<usize> },
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
                .or_else(|_| parse_message::<ReturnOf<R>>(bytes).map(|r| r.value))
                .map_err(|e| Error::decode(command, bytes, e)),
            Reply::Value(raw) => {
                serde_json::from_str(raw.get()).map_err(|e| Error::decode(command, raw.get().as_bytes(), e))
            }
        }
    }
}

/// What a new call carries (its bytes are written into [`Blank::bytes`]).
pub(crate) struct NewCall {
    pub id: u64,
    pub name: Cow<'static, str>,
    pub fds: Vec<OwnedFd>,
    pub oob: bool,
    /// The traffic log records it.
    pub log: bool,
    /// How long the caller waits for the reply.
    pub budget: Duration,
}

/// One command, shared by its caller and the connection's task.
pub(crate) struct Call {
    pub id: u64,
    pub name: Cow<'static, str>,
    pub oob: bool,
    pub log: bool,
    /// It passes file descriptors (they are in the state until written).
    pub passes_fds: bool,
    pub budget: Duration,
    /// When the caller gives up, as [`Tick::nanos`] (`u64::MAX`: never);
    /// set by the task when it takes the request, read only by it.
    /// An atomic so that the call needs no lock for it; the task is its only
    /// user, so relaxed loads and stores do.
    deadline: AtomicU64,
    /// The caller stopped waiting (its future was dropped).
    caller_gone: AtomicBool,
    /// A result was handed over (or the task let go of the call).
    finished: AtomicBool,
    state: Mutex<State>,
}

/// The part of a call that both ends change.
struct State {
    /// The request's bytes; once written, the buffer for the reply's.
    bytes: Vec<u8>,
    /// File descriptors to pass, until written.
    fds: Vec<OwnedFd>,
    result: Outcome,
    /// The caller's waker, while it waits.
    waker: Option<Waker>,
}

enum Outcome {
    Waiting,
    Ready(ReplyResult),
    /// The task let go of the call without a result (it ended abruptly):
    /// the caller reports why the connection closed.
    Dropped,
    /// The caller took the result.
    Taken,
}

/// How many finished calls a thread keeps for its next commands: enough for
/// 64 commands in flight from one thread to run without allocating.
const SPARE_CALLS: usize = 64;

/// A byte buffer grown larger than this (a big command or reply) is not
/// kept with its call.
const SPARE_BUFFER_MAX: usize = 1024;

thread_local! {
    /// Calls whose two ends are gone, reset, each with its byte buffer.
    static SPARE: RefCell<Vec<Arc<Call>>> = const { RefCell::new(Vec::new()) };
}

impl Call {
    /// A call and its two ends, with `bytes` as the request (tests, probes).
    pub(crate) fn start(c: NewCall, bytes: &[u8]) -> (Waiter, Request) {
        let mut blank = Call::blank();
        blank.bytes().extend_from_slice(bytes);
        blank.start(c)
    }

    /// A call to fill in: one this thread kept from a finished command when
    /// it has one (its buffer keeps its capacity), else a new one.
    pub(crate) fn blank() -> Blank {
        let spare = SPARE.try_with(|s| s.borrow_mut().pop()).ok().flatten();
        Blank(Some(spare.unwrap_or_else(|| {
            Arc::new(Call {
                id: 0,
                name: Cow::Borrowed(""),
                oob: false,
                log: false,
                passes_fds: false,
                budget: Duration::ZERO,
                deadline: AtomicU64::new(u64::MAX),
                caller_gone: AtomicBool::new(false),
                finished: AtomicBool::new(false),
                state: Mutex::new(State {
                    bytes: Vec::new(),
                    fds: Vec::new(),
                    result: Outcome::Waiting,
                    waker: None,
                }),
            })
        })))
    }

    /// Makes a finished call like a new one, keeping its byte buffer's
    /// capacity (unless grown large). The request's own fields are set by
    /// [`Blank::start`]; only the name is cleared here, so that a kept call
    /// holds no command name's string.
    fn reset(&mut self) {
        self.name = Cow::Borrowed("");
        *self.deadline.get_mut() = u64::MAX;
        *self.caller_gone.get_mut() = false;
        *self.finished.get_mut() = false;
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if st.bytes.capacity() > SPARE_BUFFER_MAX {
            st.bytes = Vec::new();
        }
        st.bytes.clear();
        st.fds.clear();
        st.result = Outcome::Waiting;
        st.waker = None;
    }

    /// Called by each end as it goes: the last one resets the call and
    /// keeps it for this thread's next command. `Arc::get_mut` says which
    /// end is the last, and orders the other end's last use before the
    /// reset.
    fn recycle(call: &mut Arc<Call>) {
        let Some(c) = Arc::get_mut(call) else { return };
        // Outside the pool's borrow: the reset drops a waker and a result,
        // which may drop other calls (a task's future), which come here.
        c.reset();
        let call = call.clone();
        let _ = SPARE.try_with(|s| {
            let mut spare = s.borrow_mut();
            if spare.len() < SPARE_CALLS {
                spare.push(call);
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock still holds a
        // consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the result `make` builds to the caller, if none was handed
    /// over yet (`make` may reuse the call's state, such as its buffer).
    fn finish(&self, make: impl FnOnce(&mut State) -> Outcome) {
        let waker = {
            let mut st = self.lock();
            if !matches!(st.result, Outcome::Waiting) {
                return;
            }
            st.result = make(&mut st);
            self.finished.store(true, Ordering::Release);
            st.waker.take()
        };
        // Woken outside the lock, so that the caller never finds it held.
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A call being filled in, before its ends exist: its buffer takes the
/// request's bytes. Dropped unstarted (the request did not encode), it goes
/// back to the thread's spare calls.
pub(crate) struct Blank(Option<Arc<Call>>);

impl Blank {
    fn call(&mut self) -> &mut Call {
        self.0
            .as_mut()
            .and_then(Arc::get_mut)
            .expect("a blank call has no other owner")
    }

    /// The buffer to write the request into (empty, perhaps with capacity).
    pub(crate) fn bytes(&mut self) -> &mut Vec<u8> {
        &mut self
            .call()
            .state
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .bytes
    }

    /// The call, with its request, and its two ends.
    pub(crate) fn start(mut self, c: NewCall) -> (Waiter, Request) {
        let call = self.call();
        call.id = c.id;
        call.name = c.name;
        call.oob = c.oob;
        call.log = c.log;
        call.passes_fds = !c.fds.is_empty();
        call.budget = c.budget;
        call.state.get_mut().unwrap_or_else(|e| e.into_inner()).fds = c.fds;
        let call = self.0.take().expect("a blank call is started once");
        (Waiter(call.clone()), Request(call))
    }
}

impl Drop for Blank {
    fn drop(&mut self) {
        if let Some(call) = &mut self.0 {
            Call::recycle(call);
        }
    }
}

/// The connection task's end of a call. Dropping it without a result tells
/// the caller that the connection is gone (as a dropped oneshot sender did),
/// so that no caller waits forever whatever happens to the task.
pub(crate) struct Request(Arc<Call>);

impl std::ops::Deref for Request {
    type Target = Call;

    fn deref(&self) -> &Call {
        &self.0
    }
}

impl Request {
    /// A probe (see `inflight`): a request nobody waits for.
    pub(crate) fn probe(id: u64, budget: Duration) -> Request {
        let (waiter, request) = Call::start(
            NewCall {
                id,
                name: Cow::Borrowed("query-version"),
                fds: Vec::new(),
                oob: false,
                log: false,
                budget,
            },
            &[],
        );
        drop(waiter);
        request
    }

    /// True when the caller stopped waiting.
    pub(crate) fn is_closed(&self) -> bool {
        self.caller_gone.load(Ordering::Acquire)
    }

    /// When the caller gives up (`None`: never).
    pub(crate) fn deadline(&self) -> Option<Tick> {
        Tick::from_nanos(self.deadline.load(Ordering::Relaxed))
    }

    /// Sets the deadline to `now` plus the budget; returns it.
    pub(crate) fn start_clock(&self, now: Tick) -> Option<Tick> {
        let deadline = now.after(self.budget)?;
        self.deadline.store(deadline.nanos(), Ordering::Relaxed);
        Some(deadline)
    }

    /// Appends the request's bytes to `wbuf` and takes its fds.
    pub(crate) fn write_into(&self, wbuf: &mut Vec<u8>) -> Vec<OwnedFd> {
        let mut st = self.lock();
        wbuf.extend_from_slice(&st.bytes);
        std::mem::take(&mut st.fds)
    }

    /// Hands over a plain reply: `message`, whose `return` value lies at
    /// `value`, copied into the request's buffer (written already, so free).
    pub(crate) fn reply_message(self, message: &[u8], value: Range<usize>) {
        self.finish(|st| {
            let mut bytes = std::mem::take(&mut st.bytes);
            bytes.clear();
            bytes.extend_from_slice(message);
            Outcome::Ready(Ok(Reply::Message { bytes, value }))
        });
    }

    /// Hands over a result (unless one was handed over already).
    pub(crate) fn send(&self, result: ReplyResult) {
        self.finish(|_| Outcome::Ready(result));
    }

    /// Hands over an error (unless a result was handed over already).
    pub(crate) fn fail(&self, err: Error) {
        self.send(Err(err));
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.finished.load(Ordering::Acquire) && !self.caller_gone.load(Ordering::Acquire) {
            self.finish(|_| Outcome::Dropped);
        }
        Call::recycle(&mut self.0);
    }
}

/// The caller's end of a call: polls for the result. Dropping it tells the
/// task that nobody waits any more (a request not written yet never will be).
pub(crate) struct Waiter(Arc<Call>);

/// What [`Waiter::poll`] found.
pub(crate) enum Got {
    Result(ReplyResult),
    /// The task let go of the call: the connection is gone.
    Dropped,
}

impl Waiter {
    /// The result, once there is one; until then the caller is woken when it comes.
    pub(crate) fn poll(&mut self, cx: &Context<'_>) -> Poll<Got> {
        let mut st = self.0.lock();
        match std::mem::replace(&mut st.result, Outcome::Taken) {
            Outcome::Ready(result) => Poll::Ready(Got::Result(result)),
            Outcome::Dropped => Poll::Ready(Got::Dropped),
            Outcome::Waiting => {
                st.result = Outcome::Waiting;
                match &st.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => st.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Outcome::Taken => panic!("a call's result was polled after it was taken"),
        }
    }

    /// Gives a decoded reply's buffer back to the call, to be kept with it
    /// for the thread's next command (the call is usually this end's alone
    /// by now: then no lock is taken).
    pub(crate) fn keep_buffer(&mut self, reply: Reply) {
        let Reply::Message { bytes, .. } = reply else {
            return;
        };
        if bytes.capacity() > SPARE_BUFFER_MAX {
            return;
        }
        let keep = |st: &mut State| {
            if st.bytes.capacity() == 0 {
                st.bytes = bytes;
            }
        };
        match Arc::get_mut(&mut self.0) {
            Some(call) => keep(call.state.get_mut().unwrap_or_else(|e| e.into_inner())),
            None => keep(&mut self.0.lock()),
        }
    }

    /// What the caller was sent so far (tests look without taking it).
    #[cfg(test)]
    pub(crate) fn peek(&self) -> Option<Result<(), Error>> {
        match &self.0.lock().result {
            Outcome::Ready(Ok(_)) => Some(Ok(())),
            Outcome::Ready(Err(e)) => Some(Err(e.clone())),
            Outcome::Dropped => Some(Err(Error::disconnected("dropped"))),
            Outcome::Waiting | Outcome::Taken => None,
        }
    }

    /// Stops waiting, as dropping the waiter does (tests keep it to look).
    #[cfg(test)]
    pub(crate) fn give_up(&self) {
        self.0.caller_gone.store(true, Ordering::Release);
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.0.caller_gone.store(true, Ordering::Release);
        if !self.0.finished.load(Ordering::Acquire) {
            // Cancelled while waiting: the stored waker would keep the
            // caller's task allocated (and be woken for nothing) until the
            // reply came, which may be never. A finished call needs no lock.
            self.0.lock().waker = None;
        }
        Call::recycle(&mut self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Count {
        /// A waker that counts its wake-ups here, and the count.
        fn waker() -> (Waker, Arc<Count>) {
            let count = Arc::new(Count(Default::default()));
            (Waker::from(count.clone()), count)
        }

        fn woken(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn call(bytes: &str) -> (Waiter, Request) {
        Call::start(
            NewCall {
                id: 7,
                name: Cow::Borrowed("query-status"),
                fds: Vec::new(),
                oob: false,
                log: false,
                budget: Duration::from_secs(1),
            },
            bytes.as_bytes(),
        )
    }

    #[test]
    fn a_reply_reuses_the_request_buffer_and_wakes_the_caller() {
        let (mut waiter, request) = call("{\"execute\":\"query-status\",\"id\":7}");
        let (waker, count) = Count::waker();
        let cx = Context::from_waker(&waker);
        assert!(waiter.poll(&cx).is_pending());
        let mut wbuf = Vec::new();
        assert!(request.write_into(&mut wbuf).is_empty());
        assert_eq!(wbuf, b"{\"execute\":\"query-status\",\"id\":7}");
        let message = b"{\"return\": {\"a\": 1}, \"id\": 7}";
        request.reply_message(message, 11..19);
        assert_eq!(count.woken(), 1, "woken once");
        match waiter.poll(&cx) {
            Poll::Ready(Got::Result(Ok(reply))) => {
                let value: serde_json::Value = reply.decode("query-status").unwrap();
                assert_eq!(value, serde_json::json!({"a": 1}));
            }
            _ => panic!("expected the reply"),
        }
    }

    /// Checks that `request`, let go of without a result, wakes `waiter`
    /// once and tells it the connection is gone.
    fn dropping_wakes_the_caller(mut waiter: Waiter, request: Request) {
        let (waker, count) = Count::waker();
        let cx = Context::from_waker(&waker);
        assert!(waiter.poll(&cx).is_pending());
        drop(request);
        assert_eq!(count.woken(), 1);
        assert!(matches!(waiter.poll(&cx), Poll::Ready(Got::Dropped)));
    }

    #[test]
    fn a_request_dropped_without_a_result_wakes_its_caller() {
        let (waiter, request) = call("x");
        dropping_wakes_the_caller(waiter, request);
    }

    #[test]
    fn a_cancelled_caller_leaves_no_waker_behind() {
        let (mut waiter, request) = call("x");
        let (waker, count) = Count::waker();
        assert!(waiter.poll(&Context::from_waker(&waker)).is_pending());
        drop(waker);
        assert_eq!(Arc::strong_count(&count), 2, "the call holds the waker");
        drop(waiter);
        assert_eq!(Arc::strong_count(&count), 1, "released with the waiter");
        assert!(request.is_closed());
        request.fail(Error::disconnected("late"));
        assert_eq!(count.woken(), 0, "nobody is woken for nothing");
    }

    #[test]
    fn the_first_result_wins_and_a_dropped_caller_is_seen() {
        let (waiter, request) = call("x");
        assert!(!request.is_closed());
        request.fail(Error::disconnected("first"));
        assert!(matches!(waiter.peek(), Some(Err(Error::Disconnected { .. }))));
        drop(waiter);
        let (waiter, request) = call("x");
        drop(waiter);
        assert!(request.is_closed());
    }

    #[test]
    fn deadlines_round_trip_and_huge_budgets_never_expire() {
        let (_w, request) = call("x");
        let now = Tick::now();
        let d = request.start_clock(now).expect("a deadline");
        assert_eq!(request.deadline(), Some(d));
        assert_eq!(Some(d), now.after(Duration::from_secs(1)));
        let (_w, huge) = Call::start(
            NewCall {
                id: 1,
                name: Cow::Borrowed("x"),
                fds: Vec::new(),
                oob: false,
                log: false,
                budget: Duration::MAX,
            },
            &[],
        );
        assert_eq!(huge.start_clock(now), None);
        assert_eq!(huge.deadline(), None);
    }

    /// How many calls this thread keeps (each test runs on a thread of its own).
    fn spare() -> usize {
        SPARE.with(|s| s.borrow().len())
    }

    fn new_call(id: u64, name: &'static str, fds: Vec<OwnedFd>) -> NewCall {
        NewCall {
            id,
            name: Cow::Borrowed(name),
            fds,
            oob: false,
            log: false,
            budget: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_finished_call_comes_back_reset_with_the_replys_buffer_for_the_next_command() {
        let (mut waiter, request) = call("{\"execute\":\"stop\",\"id\":7}");
        let first = Arc::as_ptr(&waiter.0);
        let (waker, _count) = Count::waker();
        let cx = Context::from_waker(&waker);
        assert!(waiter.poll(&cx).is_pending(), "the caller's waker is stored");
        request.write_into(&mut Vec::new());
        assert!(request.start_clock(Tick::now()).is_some());
        request.reply_message(b"{\"return\": {}, \"id\": 7}", 11..13);
        let Poll::Ready(Got::Result(Ok(reply))) = waiter.poll(&cx) else {
            panic!("expected the reply")
        };
        let Reply::Message { bytes, .. } = &reply else {
            panic!("a plain reply")
        };
        let capacity = bytes.capacity();
        waiter.keep_buffer(reply);
        assert_eq!(spare(), 0, "kept only once both ends are gone");
        drop(waiter);
        assert_eq!(spare(), 1, "the caller's end went last and kept it");

        let mut blank = Call::blank();
        assert_eq!(spare(), 0);
        assert!(blank.bytes().is_empty(), "nothing of the last request or reply");
        assert_eq!(
            blank.bytes().capacity(),
            capacity,
            "the reply's buffer came back with the call"
        );
        blank
            .bytes()
            .extend_from_slice(b"{\"execute\":\"cont\",\"id\":9}");
        let (waiter, request) = blank.start(new_call(9, "cont", Vec::new()));
        assert_eq!(Arc::as_ptr(&waiter.0), first, "the same allocation");
        assert_eq!((request.id, &*request.name), (9, "cont"));
        assert!(!request.is_closed() && !request.passes_fds);
        assert_eq!(request.deadline(), None, "no deadline until the task takes it");
        assert!(waiter.peek().is_none(), "no result carried over");
        assert!(waiter.0.lock().waker.is_none(), "no waker carried over");
        let mut wbuf = Vec::new();
        request.write_into(&mut wbuf);
        assert_eq!(wbuf, b"{\"execute\":\"cont\",\"id\":9}");
        // And it works as a new one: a request let go of without a result
        // still wakes its caller (which a stale `finished` would prevent).
        dropping_wakes_the_caller(waiter, request);
    }

    #[test]
    fn a_call_is_kept_by_the_last_of_its_ends_and_no_more_than_the_limit() {
        let (waiter, request) = call("x");
        drop(waiter);
        assert_eq!(spare(), 0, "the task's end still holds it");
        drop(request);
        assert_eq!(spare(), 1);
        let calls: Vec<_> = (0..SPARE_CALLS + 10).map(|_| call("x")).collect();
        assert_eq!(spare(), 0);
        drop(calls);
        assert_eq!(spare(), SPARE_CALLS);
    }

    #[test]
    fn a_large_buffer_is_not_kept_with_its_call() {
        let big = "x".repeat(SPARE_BUFFER_MAX + 1);
        let (waiter, request) = call(&big);
        drop((waiter, request));
        assert_eq!(spare(), 1);
        assert_eq!(Call::blank().bytes().capacity(), 0);
    }

    #[test]
    fn a_call_whose_last_end_goes_on_another_thread_is_kept_there() {
        let (waiter, request) = call("x");
        drop(request);
        let there = std::thread::spawn(move || {
            drop(waiter);
            spare()
        })
        .join()
        .unwrap();
        assert_eq!((there, spare()), (1, 0));
    }

    #[test]
    fn a_blank_call_dropped_unstarted_is_kept() {
        let mut blank = Call::blank();
        blank.bytes().extend_from_slice(b"half a request");
        drop(blank);
        assert_eq!(spare(), 1);
        assert!(Call::blank().bytes().is_empty());
    }

    #[test]
    fn the_fds_of_a_call_never_written_are_closed_when_it_is_kept() {
        use std::io::Read;
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (waiter, request) = Call::start(new_call(1, "getfd", vec![OwnedFd::from(theirs)]), b"x");
        drop((waiter, request));
        assert_eq!(spare(), 1);
        // The other end is closed: reading sees the end of the stream.
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ours.read(&mut [0u8; 8]).unwrap(), 0);
    }
}
