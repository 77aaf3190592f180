//! The way from the callers to the connection's task: a queue under a
//! lock, with the task's waker beside it.
//!
//! It replaces an unbounded channel, which allocated a block of slots and a
//! cache-padded header for every connection, idle or not, and cost a few
//! hundred instructions more per command than a lock taken once on each
//! side. The queue owns no memory until a request arrives, and the first
//! request after the task went to sleep is the only one that wakes it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};

use super::call::Request;
use super::Shared;

/// The queue, shared by the task and the handles (it lives in [`Shared`]).
#[derive(Default)]
pub(crate) struct Requests {
    state: Mutex<Queue>,
    /// True while the task's waker waits in the queue, which means nothing
    /// was queued or signalled since the task last took. The task's passes
    /// that follow a wake-up by the socket or the timer then skip the lock
    /// (two of the three passes a command at depth 1 makes). Set only under
    /// the lock, together with the waker; cleared by whoever takes the
    /// waker, which then wakes the task, so a pass that read a stale `true`
    /// is followed by another.
    quiet: AtomicBool,
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
    ///
    /// The task must be polled with the same waker each time (a tokio
    /// task's never changes): a pass that finds the queue quiet relies on
    /// the waker left there by an earlier one.
    pub(crate) fn take(&self, cx: &Context<'_>, mut each: impl FnMut(Request)) -> Option<Signal> {
        if self.quiet.load(Ordering::Acquire) {
            return None;
        }
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
        self.quiet.store(true, Ordering::Release);
        None
    }

    /// Stops taking requests (the task is ending) and returns those still
    /// queued, for their callers to be told.
    pub(crate) fn close(&self) -> VecDeque<Request> {
        let mut q = self.lock();
        q.closed = true;
        q.waker = None;
        self.quiet.store(false, Ordering::Release);
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
            self.take_waker(&mut q)
        };
        // Woken outside the lock, so that the task never finds it held.
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Takes the task's waker, to wake it once the lock is released: the
    /// queue is no longer quiet.
    fn take_waker(&self, q: &mut Queue) -> Option<Waker> {
        let waker = q.waker.take();
        if waker.is_some() {
            self.quiet.store(false, Ordering::Release);
        }
        waker
    }

    fn signal(&self, set: impl FnOnce(&mut Queue)) {
        let waker = {
            let mut q = self.lock();
            set(&mut q);
            self.take_waker(&mut q)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;
    use std::time::Duration;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task_waker() -> (Waker, Arc<Count>) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (Waker::from(count.clone()), count)
    }

    fn ids(queue: &Requests, cx: &Context<'_>) -> (Vec<u64>, Option<Signal>) {
        let mut got = Vec::new();
        let signal = queue.take(cx, |r| got.push(r.id));
        (got, signal)
    }

    #[test]
    fn a_quiet_pass_skips_the_lock_and_the_next_request_wakes_the_task_and_is_taken() {
        let queue = Requests::default();
        let (waker, woken) = task_waker();
        let cx = Context::from_waker(&waker);
        queue
            .push(Request::probe(1, Duration::from_secs(1)))
            .ok()
            .unwrap();
        assert_eq!(ids(&queue, &cx).0, vec![1]);
        assert!(
            queue.quiet.load(Ordering::SeqCst),
            "the take left the waker: quiet"
        );
        // Passes after a wake-up by the socket: nothing to take, and the lock
        // is not touched (held here, a pass that took it would block).
        {
            let _held = queue.lock();
            assert!(matches!(ids(&queue, &cx), (v, None) if v.is_empty()));
        }
        let push = |id| {
            queue
                .push(Request::probe(id, Duration::from_secs(1)))
                .ok()
                .unwrap()
        };
        push(2);
        let woken = || woken.0.load(Ordering::SeqCst);
        assert_eq!(woken(), 1, "the first request after a quiet take wakes the task");
        assert!(!queue.quiet.load(Ordering::SeqCst));
        push(3);
        assert_eq!(woken(), 1, "the task is awake already: no second wake-up");
        assert_eq!(ids(&queue, &cx).0, vec![2, 3]);
        assert_eq!(ids(&queue, &cx).0, Vec::<u64>::new());
    }

    #[test]
    fn signals_end_a_quiet_queue_and_wake_the_task() {
        for signal in [Signal::Disconnect, Signal::Dropped] {
            let queue = Requests::default();
            let (waker, woken) = task_waker();
            let cx = Context::from_waker(&waker);
            assert!(ids(&queue, &cx).1.is_none());
            assert!(queue.quiet.load(Ordering::SeqCst));
            match signal {
                Signal::Disconnect => queue.signal(|q| q.disconnect = true),
                Signal::Dropped => queue.signal(|q| q.handles_gone = true),
            }
            assert_eq!(woken.0.load(Ordering::SeqCst), 1);
            let got = ids(&queue, &cx).1;
            assert!(
                matches!(
                    (&signal, &got),
                    (Signal::Disconnect, Some(Signal::Disconnect)) | (Signal::Dropped, Some(Signal::Dropped))
                ),
                "the signal is seen by the next pass"
            );
        }
    }

    #[test]
    fn a_closed_queue_refuses_requests_and_is_never_quiet_again() {
        let queue = Requests::default();
        let (waker, _woken) = task_waker();
        let cx = Context::from_waker(&waker);
        assert!(ids(&queue, &cx).1.is_none());
        assert!(queue.close().is_empty());
        assert!(!queue.quiet.load(Ordering::SeqCst));
        assert!(queue.push(Request::probe(9, Duration::from_secs(1))).is_err());
    }
}
