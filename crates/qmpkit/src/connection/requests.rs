//! The way from the callers to the connection's task: a queue under a
//! lock, with the task's waker beside it.
//!
//! It replaces an unbounded channel, which allocated a block of slots and a
//! cache-padded header for every connection, idle or not, and cost a few
//! hundred instructions more per command than a lock taken once on each
//! side. The queue owns no memory until a request arrives, and the first
//! request after the task went to sleep is the only one that wakes it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};

use super::call::Request;
use super::Shared;

/// The queue, shared by the task and the handles (it lives in [`Shared`]).
#[derive(Default)]
pub(crate) struct Requests {
    state: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Request>,
    /// The task's waker, while it waits for requests; taken by the first
    /// request (or signal) that arrives after it was left.
    waker: Option<Waker>,
    /// A handle asked to close the connection.
    disconnect: bool,
    /// Every handle is gone.
    handles_gone: bool,
    /// The task ended: nothing is taken any more.
    closed: bool,
}

/// What ends the connection from the callers' side.
pub(crate) enum Signal {
    /// [`Sender::disconnect`] was called.
    Disconnect,
    /// Every handle was dropped.
    Dropped,
}

impl Requests {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding it; a poisoned lock still holds a
        // consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands every queued request to `each`, in order, then says whether
    /// the callers' side ended the connection; otherwise the task is woken
    /// by the next request.
    pub(crate) fn take(&self, cx: &Context<'_>, mut each: impl FnMut(Request)) -> Option<Signal> {
        let mut q = self.lock();
        while let Some(out) = q.items.pop_front() {
            each(out);
        }
        if q.disconnect {
            return Some(Signal::Disconnect);
        }
        if q.handles_gone {
            return Some(Signal::Dropped);
        }
        match &q.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => q.waker = Some(cx.waker().clone()),
        }
        None
    }

    /// Stops taking requests (the task is ending) and returns those still
    /// queued, for their callers to be told.
    pub(crate) fn close(&self) -> VecDeque<Request> {
        let mut q = self.lock();
        q.closed = true;
        q.waker = None;
        std::mem::take(&mut q.items)
    }

    /// Queues a request and wakes the task if it sleeps; hands the request
    /// back if the task has ended.
    fn push(&self, out: Request) -> Result<(), Request> {
        let waker = {
            let mut q = self.lock();
            if q.closed {
                return Err(out);
            }
            q.items.push_back(out);
            q.waker.take()
        };
        // Woken outside the lock, so that the task never finds it held.
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    fn signal(&self, set: impl FnOnce(&mut Queue)) {
        let waker = {
            let mut q = self.lock();
            set(&mut q);
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The callers' end: one per connection, kept by every clone of its
/// [`Client`](crate::Client). Dropping it (the last handle) ends the task.
pub(crate) struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Sender { shared }
    }

    /// Queues a request; hands it back if the connection has ended.
    pub(crate) fn send(&self, out: Request) -> Result<(), Request> {
        self.shared.requests.push(out)
    }

    /// Asks the task to close the connection.
    pub(crate) fn disconnect(&self) {
        self.shared.requests.signal(|q| q.disconnect = true);
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.shared.requests.signal(|q| q.handles_gone = true);
    }
}
