//! The monitor's event task: one per monitor, it hands every event to the
//! handler in QEMU's order, reacts to ejected media, routes block-job events
//! to device channels, and gives the one shutdown notice at the end.
//!
//! It reads the monitor's own subscription, so the connection's reader never
//! waits for it, and a handler that runs QMP commands cannot deadlock: their
//! replies travel on the reader, not through this task.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;

use serde_json::json;
use tokio::sync::mpsc;

use crate::event::{Event, EventItem, EventStream, KnownEvent};

use super::constants::{
    EVENT_AGENT_STOPPED, EVENT_DISK_EJECTED, EVENT_VM_SHUTDOWN, SHUTDOWN_REASON_DISCONNECT,
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
pub(crate) async fn run(mon: Monitor, mut events: EventStream, mut own: mpsc::UnboundedReceiver<Event>) {
    let finish = Finish(mon);
    let mon = &finish.0;
    let mut state = State::default();
    loop {
        tokio::select! {
            // The monitor's own events (agent transitions) were made before
            // any QEMU event that is ready at the same time.
            biased;
            Some(ev) = own.recv() => deliver(mon, &ev).await,
            item = events.recv() => match item {
                Some(EventItem::Event(ev)) => {
                    state.qemu_event(mon, &ev).await;
                    if let Some(agent) = &mon.inner.agent {
                        agent.wake.notify_one();
                    }
                }
                Some(EventItem::Missed(n)) => tracing::warn!(
                    path = %mon.path().display(),
                    missed = n,
                    "monitor event handler fell behind; events were dropped"
                ),
                None => break,
            },
        }
    }
    // The connection is gone and every QEMU event was read; hand over what
    // the agent watcher queued before it noticed.
    while let Ok(ev) = own.try_recv() {
        deliver(mon, &ev).await;
    }
    if state.shutdown_seen {
        return;
    }
    // The connection keeps QEMU's last SHUTDOWN (unless a RESUME followed):
    // should the handler have fallen so far behind that its queue dropped
    // it, that one still becomes the notice, rather than a made-up one.
    if let Some(ev) = mon.inner.client.shutdown_event() {
        // QEMU's own, lost from the handler's queue: late beats never.
        deliver(mon, &ev).await;
    } else if mon.is_initialized() && !mon.disconnect_requested() {
        let ev = Event::new(
            EVENT_VM_SHUTDOWN,
            json!({"guest": false, "reason": SHUTDOWN_REASON_DISCONNECT}),
            now(),
        );
        deliver(mon, &ev).await;
    }
}

#[derive(Default)]
struct State {
    /// QEMU sent a SHUTDOWN and the VM has not run since.
    shutdown_seen: bool,
    /// Devices whose tray is open, so a repeated "opened" is not a new eject.
    open_trays: HashSet<String>,
}

impl State {
    async fn qemu_event(&mut self, mon: &Monitor, ev: &Event) {
        let known = ev.known();
        match &known {
            KnownEvent::Shutdown { .. } => self.shutdown_seen = true,
            // Running again (after `-no-shutdown`): a later loss of the
            // connection is a new shutdown.
            KnownEvent::Resume => self.shutdown_seen = false,
            KnownEvent::BlockJob { device, .. } => {
                mon.inner.channels.push(device, ev.clone());
            }
            _ => {}
        }
        // A reset takes the guest's agent down with it (it says STARTED again
        // when the guest is back): the handler sees the RESET with the agent
        // already stopped, then the AGENT-STOPPED.
        let agent_was_up = match (&known, &mon.inner.agent) {
            (KnownEvent::Reset { .. }, Some(agent)) => agent.forget().await,
            _ => false,
        };
        deliver(mon, ev).await;
        if agent_was_up {
            deliver(
                mon,
                &Event::new(EVENT_AGENT_STOPPED, serde_json::Value::Null, now()),
            )
            .await;
        }
        if let KnownEvent::DeviceTrayMoved {
            device,
            id,
            tray_open,
        } = known
        {
            debug_assert_eq!(ev.name(), EVENT_DISK_EJECTED);
            let name = if id.is_empty() { device } else { id };
            if !tray_open {
                self.open_trays.remove(&name);
            } else if self.open_trays.insert(name.clone()) {
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
        }
    }
}

/// Hands one event to the current handler. A panicking handler is logged
/// and the next event is handled as usual.
async fn deliver(mon: &Monitor, ev: &Event) {
    let handler = mon
        .inner
        .handler
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match handler {
        None => {}
        Some(Handler::Sync(h)) => {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| h(mon, ev)));
            if outcome.is_err() {
                tracing::error!(event = ev.name(), "monitor event handler panicked");
            }
        }
        Some(Handler::Async(h)) => {
            // Its own task, awaited at once: order is kept and a panic stays in it.
            if let Err(e) = tokio::spawn(h(mon.clone(), ev.clone())).await {
                tracing::error!(event = ev.name(), error = %e, "monitor event handler failed");
            }
        }
    }
}
