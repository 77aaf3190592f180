//! The monitor's one task: it hands every event to the handler in QEMU's
//! order, reacts to ejected media, routes block-job events to device
//! channels, polls the guest agent's ring buffer, and gives the one shutdown
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
use std::time::Duration;

use serde_json::json;
use tokio::time::{Instant, Sleep};

use crate::client::Client;
use crate::event::{Event, EventItem, EventStream, KnownEvent};

use super::agent::Agent;
use super::constants::{
    EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED, EVENT_DISK_EJECTED, EVENT_VM_SHUTDOWN,
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

/// Runs until the connection closes and every event has been handled.
///
/// The task's future is the larger part of a monitor's memory, so it is kept
/// small: the arguments are bound before the `async` block (an `async fn`
/// would keep them twice), and rare or large waits are boxed.
pub(crate) fn run(mon: Monitor, events: EventStream) -> impl Future<Output = ()> + Send + 'static {
    let finish = Finish(mon);
    let mut events = events;
    async move {
        let mon = &finish.0;
        let agent = mon.inner.agent.as_ref();
        // Connect has just read the ring buffer: the first poll is one interval on.
        let timer = tokio::time::sleep(agent.map_or(Duration::MAX, |a| a.interval));
        tokio::pin!(timer);
        let mut poller = Poller {
            agent,
            client: &mon.inner.client,
            read: None,
            again: false,
            stopped: agent.is_none(),
            timer,
        };
        let mut state = State::default();
        loop {
            // Transitions found so far come before any QEMU event not yet handled.
            state.hand_over_agent(mon, &mut poller).await;
            tokio::select! {
                biased;
                done = in_flight(&mut poller.read) => poller.done(done),
                () = queued(agent) => {}
                item = events.recv() => match item {
                    Some(EventItem::Event(ev)) => {
                        state.qemu_event(mon, &ev, &mut poller).await;
                        // Any event prompts a read: the guest may have reacted.
                        poller.request();
                    }
                    Some(EventItem::Missed(n)) => tracing::warn!(
                        path = %mon.path().display(),
                        missed = n,
                        "monitor event handler fell behind; events were dropped"
                    ),
                    None => break,
                },
                () = &mut poller.timer, if poller.read.is_none() && !poller.stopped => poller.request(),
            }
        }
        // The connection is gone and every QEMU event was read. A read in flight
        // fails at once now; the transitions found before it are handed over
        // ahead of the shutdown notice.
        if let Some(read) = poller.read.take() {
            let _ = read.await;
        }
        poller.stopped = true;
        state.hand_over_agent(mon, &mut poller).await;
        if state.shutdown_seen {
            return;
        }
        // The connection keeps QEMU's last SHUTDOWN (unless a RESUME followed):
        // should the handler have fallen so far behind that its queue dropped
        // it, that one still becomes the notice, rather than a made-up one.
        if let Some(ev) = mon.inner.client.shutdown_event() {
            // QEMU's own, lost from the handler's queue: late beats never.
            deliver(mon, &ev, &mut poller).await;
        } else if mon.is_initialized() && !mon.disconnect_requested() {
            let ev = Event::new(
                EVENT_VM_SHUTDOWN,
                json!({"guest": false, "reason": SHUTDOWN_REASON_DISCONNECT}),
                now(),
            );
            deliver(mon, &ev, &mut poller).await;
        }
    }
}

/// A ring-buffer read in flight (see [`Agent::check`]); true when it found
/// the connection gone.
type Read<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// The agent poller's side of the event task: at most one read in flight,
/// boxed only while it is, so an idle monitor holds none.
struct Poller<'a> {
    agent: Option<&'a Agent>,
    client: &'a Client,
    read: Option<Read<'a>>,
    /// A read was asked for while one was in flight: another follows it.
    again: bool,
    /// No agent, or the connection is gone: no more reads.
    stopped: bool,
    /// The next periodic read, one interval after the last read ended.
    timer: Pin<&'a mut Sleep>,
}

impl Poller<'_> {
    /// Starts a read now, or right after the one in flight.
    fn request(&mut self) {
        let Some(agent) = self.agent.filter(|_| !self.stopped) else {
            return;
        };
        if self.read.is_some() {
            self.again = true;
            return;
        }
        let client = self.client;
        self.read = Some(Box::pin(async move {
            match agent.check(client).await {
                Ok(_) => false,
                Err(e) if e.is_disconnected() => true,
                Err(e) => {
                    tracing::debug!(chardev = %agent.chardev, error = %e, "agent ring buffer read failed");
                    false
                }
            }
        }));
    }

    /// A read ended (its transitions are queued in the agent).
    fn done(&mut self, gone: bool) {
        self.read = None;
        if gone {
            self.stopped = true;
            return;
        }
        if std::mem::take(&mut self.again) {
            self.request();
        } else if let Some(agent) = self.agent {
            self.timer.as_mut().reset(Instant::now() + agent.interval);
        }
    }

    /// Awaits `work` while keeping the read in flight going, so that `work`
    /// may wait for that read (through the ring buffer's lock) without a deadlock.
    async fn drive<F: Future>(&mut self, work: F) -> F::Output {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                done = in_flight(&mut self.read) => self.done(done),
            }
        }
    }
}

/// The outcome of the read in flight; never, when there is none.
async fn in_flight(read: &mut Option<Read<'_>>) -> bool {
    match read {
        Some(read) => read.await,
        None => std::future::pending().await,
    }
}

/// Resolves when a read outside the event task (a `check_agent` call) queued a transition.
async fn queued(agent: Option<&Agent>) {
    match agent {
        Some(agent) => agent.queued.notified().await,
        None => std::future::pending().await,
    }
}

fn agent_event(started: bool) -> Event {
    let name = if started {
        EVENT_AGENT_STARTED
    } else {
        EVENT_AGENT_STOPPED
    };
    Event::new(name, serde_json::Value::Null, now())
}

#[derive(Default)]
struct State {
    /// QEMU sent a SHUTDOWN and the VM has not run since.
    shutdown_seen: bool,
    /// Devices whose tray is open, so a repeated "opened" is not a new eject
    /// (a handful at most: a list is smaller than a set).
    open_trays: Vec<String>,
}

impl State {
    /// Hands every queued agent transition to the handler, oldest first.
    async fn hand_over_agent(&mut self, mon: &Monitor, poller: &mut Poller<'_>) {
        let Some(agent) = mon.inner.agent.as_ref() else {
            return;
        };
        while let Some(started) = agent.next_transition() {
            deliver(mon, &agent_event(started), poller).await;
        }
    }

    async fn qemu_event(&mut self, mon: &Monitor, ev: &Event, poller: &mut Poller<'_>) {
        // The typed view is not kept across an await: this future lives in
        // every monitor's task, and is the larger for whatever it keeps.
        let reset = match ev.known() {
            KnownEvent::Shutdown { .. } => {
                self.shutdown_seen = true;
                false
            }
            // Running again (after `-no-shutdown`): a later loss of the
            // connection is a new shutdown.
            KnownEvent::Resume => {
                self.shutdown_seen = false;
                false
            }
            KnownEvent::BlockJob { device, .. } => {
                mon.inner.channels.push(&device, ev.clone());
                false
            }
            KnownEvent::Reset { .. } => true,
            _ => false,
        };
        // A reset takes the guest's agent down with it (it says STARTED again
        // when the guest is back): the handler sees the transitions read
        // before it, the RESET with the agent already stopped, then the
        // AGENT-STOPPED.
        let mut agent_was_up = false;
        if let (true, Some(agent)) = (reset, mon.inner.agent.as_ref()) {
            // Boxed, as it is rare, rather than room for it in every task.
            let (earlier, was_up) = Box::pin(poller.drive(agent.forget())).await;
            agent_was_up = was_up;
            for started in earlier {
                deliver(mon, &agent_event(started), poller).await;
            }
        }
        deliver(mon, ev, poller).await;
        if agent_was_up {
            deliver(mon, &agent_event(false), poller).await;
        }
        if ev.name() == EVENT_DISK_EJECTED {
            self.tray_moved(mon, ev);
        }
    }

    /// Calls the ejected-media callback when a tray opens, once per opening.
    fn tray_moved(&mut self, mon: &Monitor, ev: &Event) {
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
                let callback = mon
                    .inner
                    .on_ejected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let Some(callback) = callback {
                    if std::panic::catch_unwind(AssertUnwindSafe(|| callback(&name))).is_err() {
                        tracing::error!(device = %name, "ejected-media callback panicked");
                    }
                }
            }
            _ => {}
        }
    }
}

/// Hands one event to the current handler. A panicking handler is logged
/// and the next event is handled as usual.
async fn deliver(mon: &Monitor, ev: &Event, poller: &mut Poller<'_>) {
    if let Some(task) = start_handler(mon, ev) {
        // Awaited at once: order is kept and a panic stays in the task. The
        // read in flight goes on meanwhile, as the handler may wait for it.
        // Boxed: only async handlers need it, and they spawn a task per event anyway.
        if let Err(e) = Box::pin(poller.drive(task)).await {
            tracing::error!(event = ev.name(), error = %e, "monitor event handler failed");
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
                tracing::error!(event = ev.name(), "monitor event handler panicked");
            }
            None
        }
        Handler::Async(h) => Some(tokio::spawn(h(mon.clone(), ev.clone()))),
    }
}
