//! The monitor's one task: it hands every event to the handler in QEMU's
//! order, reacts to ejected media, routes block-job events to device
//! channels (when asked to), polls the guest agent's ring buffer, and gives the one shutdown
//! notice at the end.
//!
//! It reads the monitor's own subscription, so the connection's reader never
//! waits for it, and a handler that runs QMP commands cannot deadlock: their
//! replies travel on the reader, not through this task.
//!
//! The agent's ring-buffer read is a future of its own, kept beside the
//! task's other work and polled whenever the task waits for anything (the
//! next event, the poll timer, a handler, the ring buffer's lock). So a slow
//! read never holds up events, and a handler that calls
//! [`Monitor::check_agent`], whose read waits for the one in flight to
//! release the ring buffer, never waits for a read that nobody polls.
//! Transitions found by any read are queued in the [`Agent`] and handed to
//! the handler by this task between events: those found while an event was
//! being handled follow that event, before the next one.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::event::{Event, EventItem, EventStream, KnownEvent};
use crate::wire::Timestamp;

use super::agent::Agent;
use super::constants::{
    EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED, EVENT_DISK_EJECTED, EVENT_VM_SHUTDOWN, FIRMWARE_RESET_WINDOW,
    SHUTDOWN_REASON_DISCONNECT,
};
use super::options::Handler;
use super::{now, Monitor};

/// Marks the monitor finished when the task ends, also if it is dropped
/// (its runtime shut down) or a bug makes it unwind.
struct Finish(Monitor);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// QEMU's event for a guest that panicked (through pvpanic, Hyper-V or s390).
const EVENT_GUEST_PANICKED: &str = "GUEST_PANICKED";

/// Never notified: the wake-up of a monitor that watches no agent.
static NO_AGENT: Notify = Notify::const_new();

/// Runs until the connection closes and every event has been handled.
///
/// The task's future is the larger part of a monitor's own memory, so it is
/// kept small: the arguments are bound before the `async` block (an `async
/// fn` would keep them twice), the task's state is one struct, nothing used
/// only at the start is bound to a name, and rare or large waits are boxed.
/// On x86-64 tokio adds 112 bytes to a task and rounds it up to 128: at 400
/// bytes or less (384 now) the task takes 512, above that 640. To see the
/// size: `cargo +nightly rustc --release -p qmp --lib -- -Zprint-type-sizes`
/// and look for the async block of this file.
pub(crate) fn run(mon: Monitor, events: EventStream) -> impl Future<Output = ()> + Send + 'static {
    let finish = Finish(mon);
    let mut events = events;
    async move {
        // Connect has just read the ring buffer: the first poll is one interval on.
        let timer = tokio::time::sleep(poll_interval(&finish.0));
        tokio::pin!(timer);
        let mut task = Task {
            mon: &finish.0,
            read: None,
            timer,
            open_trays: Vec::new(),
            again: false,
            stopped: finish.0.inner.agent.as_ref().is_none_or(Agent::disabled),
            shutdown_seen: false,
            resets: Resets::default(),
        };
        loop {
            // Transitions found so far come before any QEMU event not yet handled.
            task.hand_over_agent().await;
            match task.next_wake(&mut events).await {
                Wake::ReadDone(gone) => task.read_done(gone),
                Wake::Nudged => {}
                Wake::Item(Some(EventItem::Event(ev))) => {
                    task.qemu_event(&ev).await;
                    // Any event prompts a read: the guest may have
                    // reacted. Not a panic, nor a SHUTDOWN (no reads
                    // while the VM is down): the guest is gone, and a
                    // command that reaches QEMU 10 just as it exits can
                    // hang its exit for a minute or more.
                    if ev.name() != EVENT_GUEST_PANICKED {
                        task.request_read();
                    }
                }
                Wake::Item(Some(EventItem::Missed(n))) => crate::diag::warning!(
                    path = %task.mon.path().display(),
                    missed = n,
                    "monitor event handler fell behind; events were dropped"
                ),
                Wake::Item(None) => break,
                Wake::Timer => task.request_read(),
            }
        }
        task.end().await;
    }
}

/// A ring-buffer read in flight (see [`Agent::check`]); true when it found
/// the connection gone.
type Read<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// The event task's state.
struct Task<'a> {
    mon: &'a Monitor,
    /// The agent's ring-buffer read in flight, if any: at most one, boxed
    /// only while it is, so an idle monitor holds none.
    read: Option<Read<'a>>,
    /// The next periodic read, one interval after the last read ended.
    timer: Pin<&'a mut Sleep>,
    /// Devices whose tray is open, so a repeated "opened" is not a new eject
    /// (a handful at most: a list is smaller than a set).
    open_trays: Vec<String>,
    /// A read was asked for while one was in flight: another follows it.
    again: bool,
    /// No agent, or the connection is gone: no more reads.
    stopped: bool,
    /// This task handled QEMU's SHUTDOWN and the VM has not run since: no
    /// agent reads.
    shutdown_seen: bool,
    /// Tells the firmware's reset after a deliberate one.
    resets: Resets,
}

/// What a SHUTDOWN or a RESET does to the guest (and its agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GuestEnd {
    Shutdown,
    Reset(ResetKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResetKind {
    /// Any reset but the one below.
    Plain,
    /// The reset SeaBIOS makes as it starts after a reset (a warm start it
    /// turns into a cold one): `RESET {guest: true, reason: "guest-reset"}`
    /// 40-150 ms after the first. It follows a guest reboot and
    /// `system_reset` alike, but never a cold start.
    FirmwareFollowUp,
}

/// Remembers the last deliberate reset, to recognise the firmware's reset
/// that follows it ([`FIRMWARE_RESET_WINDOW`]).
#[derive(Debug, Default)]
struct Resets {
    /// QEMU's time of the last deliberate RESET (or of the RESUME that let
    /// the firmware run after it), in microseconds since the epoch; 0 for
    /// none, or once the follow-up was seen.
    deliberate_at: u64,
}

impl Resets {
    /// Classifies a RESET. One the monitor was told to expect is
    /// deliberate (the handler's [`Monitor::handle_reset`] will say so);
    /// the first guest reset after it, within the window by QEMU's clock,
    /// is its firmware follow-up.
    fn classify(&mut self, mon: &Monitor, ev: &Event, guest: bool, reason: &str) -> ResetKind {
        let at = micros(ev.timestamp());
        if mon.inner.expecting_reset.load(Ordering::Acquire) {
            self.deliberate_at = at;
            return ResetKind::Plain;
        }
        let since = std::mem::take(&mut self.deliberate_at);
        let window = FIRMWARE_RESET_WINDOW.as_micros() as u64;
        if guest && reason == "guest-reset" && since != 0 && at >= since && at - since <= window {
            ResetKind::FirmwareFollowUp
        } else {
            ResetKind::Plain
        }
    }

    /// A RESUME: a deliberate reset of a paused VM is followed by the
    /// firmware's once the VM runs, so the window starts again here.
    fn resumed(&mut self, ev: &Event) {
        if self.deliberate_at != 0 {
            self.deliberate_at = micros(ev.timestamp());
        }
    }
}

/// A QMP timestamp in microseconds since the epoch; 0 when the host clock
/// failed (QEMU sends -1).
fn micros(t: Timestamp) -> u64 {
    match (u64::try_from(t.seconds), u64::try_from(t.microseconds)) {
        (Ok(s), Ok(us)) => s.saturating_mul(1_000_000).saturating_add(us),
        _ => 0,
    }
}

impl<'a> Task<'a> {
    fn agent(&self) -> Option<&'a Agent> {
        self.mon.inner.agent.as_ref()
    }

    /// Starts a read now, or right after the one in flight.
    fn request_read(&mut self) {
        let Some(agent) = self.agent().filter(|_| !self.stopped && !self.shutdown_seen) else {
            return;
        };
        if self.read.is_some() {
            self.again = true;
            return;
        }
        let client = &self.mon.inner.client;
        self.read = Some(Box::pin(async move {
            match agent.check(client).await {
                Ok(_) => false,
                Err(e) if e.is_disconnected() => true,
                Err(e) => {
                    crate::diag::debug!(chardev = %agent.chardev, error = %e, "agent ring buffer read failed");
                    false
                }
            }
        }));
    }

    /// A read ended (its transitions are queued in the agent).
    fn read_done(&mut self, gone: bool) {
        self.read = None;
        if gone {
            self.stopped = true;
            return;
        }
        if std::mem::take(&mut self.again) {
            self.request_read();
        } else if let Some(agent) = self.agent() {
            self.timer.as_mut().reset(Instant::now() + agent.interval);
        }
    }

    /// Awaits `work` while keeping the read in flight going, so that `work`
    /// may wait for that read (through the ring buffer's lock) without a deadlock.
    async fn drive<F: Future>(&mut self, work: F) -> F::Output {
        let mut work = std::pin::pin!(work);
        loop {
            // The work first: once it is done, the read may stay in flight.
            let step = std::future::poll_fn(|cx| {
                if let Poll::Ready(out) = work.as_mut().poll(cx) {
                    return Poll::Ready(Ok(out));
                }
                poll_in_flight(&mut self.read, cx).map(Err)
            })
            .await;
            match step {
                Ok(out) => return out,
                Err(gone) => self.read_done(gone),
            }
        }
    }

    /// Waits for the next thing the event task reacts to, in order of
    /// precedence: the read in flight ending, a transition queued by a read
    /// elsewhere, a QEMU event, the periodic read's timer (armed only while
    /// no read is in flight and the guest can answer).
    async fn next_wake(&mut self, events: &mut EventStream) -> Wake {
        let notified = wake(self.mon).notified();
        let mut notified = std::pin::pin!(notified);
        let timer_armed = self.read.is_none() && !self.stopped && !self.shutdown_seen;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(gone) = poll_in_flight(&mut self.read, cx) {
                return Poll::Ready(Wake::ReadDone(gone));
            }
            if notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Nudged);
            }
            if let Poll::Ready(item) = events.poll_recv(cx) {
                return Poll::Ready(Wake::Item(item));
            }
            if timer_armed && self.timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
            Poll::Pending
        })
        .await
    }

    /// Hands every queued agent transition to the handler, oldest first.
    async fn hand_over_agent(&mut self) {
        let Some(agent) = self.agent() else {
            return;
        };
        while let Some(started) = agent.next_transition() {
            deliver(self, &agent_event(started)).await;
        }
    }

    async fn qemu_event(&mut self, ev: &Event) {
        // The typed view is not kept across an await: this future lives in
        // every monitor's task, and is the larger for whatever it keeps.
        let ends_guest = match ev.known() {
            KnownEvent::Shutdown { .. } => {
                self.shutdown_seen = true;
                self.mon.shutdown_reached_handler();
                Some(GuestEnd::Shutdown)
            }
            // Running again (after `-no-shutdown`): the connection forgets
            // its SHUTDOWN as well, so the two stay in step. Whether a later
            // loss is a notice is up to the initialized flag, as in Go.
            KnownEvent::Resume => {
                self.shutdown_seen = false;
                self.resets.resumed(ev);
                None
            }
            KnownEvent::BlockJob { device, .. } => {
                if self.mon.inner.route_block_jobs {
                    self.mon.inner.channels.push(&device, ev.clone());
                }
                None
            }
            KnownEvent::Reset { guest, reason } => Some(GuestEnd::Reset(
                self.resets.classify(self.mon, ev, guest, &reason),
            )),
            _ => None,
        };
        // A reset or a shutdown takes the guest's agent down with it (after a
        // reset it says STARTED again when the guest is back). The handler
        // sees the transitions read before, then: for a RESET, the RESET
        // with the agent already stopped and then the AGENT-STOPPED; for a
        // SHUTDOWN, the AGENT-STOPPED first, so that the shutdown notice
        // stays the last word on the VM. The guest's own STOPPED, written
        // as it powers off, is often still unread when QEMU exits.
        let mut agent_was_up = false;
        if let (Some(_), Some(agent)) = (ends_guest, self.agent()) {
            // Boxed, as it is rare, rather than room for it in every task.
            let (earlier, was_up) = Box::pin(self.drive(agent.forget())).await;
            agent_was_up = was_up;
            for started in earlier {
                deliver(self, &agent_event(started)).await;
            }
        }
        if agent_was_up && ends_guest == Some(GuestEnd::Shutdown) {
            deliver(self, &agent_event(false)).await;
        }
        match ends_guest {
            // The firmware's reset that follows a deliberate one is part of
            // it: handle_reset says so while the handler has it.
            Some(GuestEnd::Reset(ResetKind::FirmwareFollowUp)) => {
                let firmware_reset = &self.mon.inner.firmware_reset;
                firmware_reset.store(true, Ordering::Release);
                deliver(self, ev).await;
                firmware_reset.store(false, Ordering::Release);
            }
            _ => deliver(self, ev).await,
        }
        if agent_was_up && ends_guest != Some(GuestEnd::Shutdown) {
            deliver(self, &agent_event(false)).await;
        }
        if ev.name() == EVENT_DISK_EJECTED {
            self.tray_moved(ev);
        }
    }

    /// Calls the ejected-media callback when a tray opens, once per opening.
    fn tray_moved(&mut self, ev: &Event) {
        let KnownEvent::DeviceTrayMoved {
            device,
            id,
            tray_open,
        } = ev.known()
        else {
            return;
        };
        let name = if id.is_empty() { device } else { id };
        let was_open = self.open_trays.iter().position(|t| *t == name);
        match (tray_open, was_open) {
            (false, Some(i)) => {
                self.open_trays.swap_remove(i);
            }
            (true, None) => {
                self.open_trays.push(name.clone());
                let callback = self
                    .mon
                    .inner
                    .on_ejected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let Some(callback) = callback {
                    if std::panic::catch_unwind(AssertUnwindSafe(|| callback(&name))).is_err() {
                        crate::diag::error!(device = %name, "ejected-media callback panicked");
                    }
                }
            }
            _ => {}
        }
    }

    /// After the last QEMU event: the read in flight, the transitions found
    /// so far, then the one shutdown notice.
    async fn end(&mut self) {
        // The connection is gone, so a read in flight fails at once; what it
        // and the reads before it found is handed over ahead of the notice.
        if let Some(read) = self.read.take() {
            read.await;
        }
        self.stopped = true;
        self.hand_over_agent().await;
        // QEMU is gone, and the agent with it, whether or not its STOPPED
        // was read (or written) in time: said before the shutdown notice.
        // A disconnect of our own ends the watch, not the agent.
        // (Every transition read is handed over by now, and no read of the
        // task's own is in flight: the state is all there is to forget.)
        if let Some(agent) = self.agent().filter(|_| !self.mon.disconnect_requested()) {
            if agent.stop() {
                deliver(self, &agent_event(false)).await;
            }
        }
        // The connection keeps QEMU's last SHUTDOWN (unless a RESUME followed):
        // should the handler have fallen so far behind that its queue dropped
        // it, it is handed over now, late rather than never, and counts as
        // QEMU's notice, as it would have in Go, where no event is dropped.
        if !self.shutdown_seen {
            if let Some(ev) = self.mon.inner.client.shutdown_event() {
                self.mon.shutdown_reached_handler();
                deliver(self, &ev).await;
            }
        }
        // Go's rule: a notice while initialized and a handler is set (without
        // one, `deliver` does nothing); a disconnect the caller asked for is
        // no shutdown of the VM.
        if self.mon.is_initialized() && !self.mon.disconnect_requested() {
            let ev = Event::new(
                EVENT_VM_SHUTDOWN,
                json!({"guest": false, "reason": SHUTDOWN_REASON_DISCONNECT}),
                now(),
            );
            deliver(self, &ev).await;
        }
    }
}

/// The outcome of the read in flight; never, when there is none.
fn poll_in_flight(read: &mut Option<Read<'_>>, cx: &mut Context<'_>) -> Poll<bool> {
    match read {
        Some(read) => read.as_mut().poll(cx),
        None => Poll::Pending,
    }
}

/// What woke the event task (see [`Task::next_wake`]).
enum Wake {
    /// The ring-buffer read in flight ended; true when the connection is gone.
    ReadDone(bool),
    /// A read outside the task queued an agent transition.
    Nudged,
    /// The next item of QEMU's events (`None`: the connection closed).
    Item(Option<EventItem>),
    /// The periodic read is due.
    Timer,
}

/// How long after a read the next periodic one comes (forever without an agent).
fn poll_interval(mon: &Monitor) -> Duration {
    mon.inner.agent.as_ref().map_or(Duration::MAX, |a| a.interval)
}

/// Notified when a read outside the event task (a `check_agent` call) queued a transition.
fn wake(mon: &Monitor) -> &Notify {
    mon.inner.agent.as_ref().map_or(&NO_AGENT, |a| &a.queued)
}

fn agent_event(started: bool) -> Event {
    let name = if started {
        EVENT_AGENT_STARTED
    } else {
        EVENT_AGENT_STOPPED
    };
    Event::new(name, serde_json::Value::Null, now())
}

/// Hands one event to the current handler. A panicking handler is logged
/// and the next event is handled as usual.
async fn deliver(task: &mut Task<'_>, ev: &Event) {
    if let Some(handle) = start_handler(task.mon, ev) {
        // Awaited at once: order is kept and a panic stays in the task. The
        // read in flight goes on meanwhile, as the handler may wait for it.
        // Boxed: only async handlers need it, and they spawn a task per event anyway.
        if let Err(e) = Box::pin(task.drive(handle)).await {
            crate::diag::error!(event = ev.name(), error = %e, "monitor event handler failed");
        }
    }
}

/// Runs a plain handler to completion, or starts an async one on a task of
/// its own and returns that task.
fn start_handler(mon: &Monitor, ev: &Event) -> Option<tokio::task::JoinHandle<()>> {
    let handler = mon
        .inner
        .handler
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match handler? {
        Handler::Sync(h) => {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| h(mon, ev)));
            if outcome.is_err() {
                crate::diag::error!(event = ev.name(), "monitor event handler panicked");
            }
            None
        }
        Handler::Async(h) => Some(tokio::spawn(h(mon.clone(), ev.clone()))),
    }
}
