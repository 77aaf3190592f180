//! The bookkeeping of requests between the callers and QEMU: which are
//! queued, which are written and unanswered, when each caller gives up, and
//! what may be written next. No I/O: the connection's task feeds it events
//! (a request arrived, bytes may be written, a reply came, time passed) and
//! does what it says.
//!
//! # The rules
//!
//! - **Queue limit.** With `oob` negotiated QEMU queues at most
//!   [`QEMU_QUEUE_LIMIT`] in-band commands and stops reading beyond that, so
//!   no more than that are written at once (out-of-band ones jump the queue
//!   and are not counted). Without `oob` QEMU reads one command at a time
//!   and nothing is held back.
//! - **File descriptors.** QEMU keeps only the latest fds it received, so a
//!   command carrying fds is written only when no earlier fd command is
//!   unanswered. Commands without fds are not held up by that.
//! - **Deadlines.** A caller whose deadline passes gets [`Error::Timeout`].
//!   A request not written yet is then never written; a written one stays
//!   known (it still occupies QEMU's queue) and its late reply is dropped.
//! - **Lost replies.** QEMU answers in-band commands in the order it read
//!   them, with or without `oob`. So a reply to an in-band command proves
//!   that every in-band command written before it and still unanswered will
//!   never be answered (its reply was lost, corrupt or dropped on the way):
//!   those are released, and callers still waiting get [`Error::ReplyLost`].
//! - **Probes.** When something waits to be written only because of
//!   commands nobody waits for any more (a queue limit filled by commands
//!   whose callers timed out, or an fd command whose caller did), a lost
//!   reply would otherwise hold the connection forever. One `query-version`
//!   is then written in-band, beyond the limit (at most one at a time): its
//!   reply releases everything written before it. Against a frozen QEMU it
//!   simply waits, as the callers' commands would have.
//! - **Bounded memory.** At most [`ABANDONED_LIMIT`] commands whose callers
//!   gave up are remembered; beyond that the oldest are forgotten (their
//!   late replies are then dropped as unknown), and an error without an id
//!   is no longer attributed by order until the in-band queue empties.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::call::Request;
use super::clock::Tick;
use crate::error::Error;

/// QEMU queues at most this many in-band commands when OOB is enabled
/// (QMP_REQ_QUEUE_LEN_MAX) and stops reading beyond that.
pub(crate) const QEMU_QUEUE_LIMIT: usize = 8;

/// How many commands whose callers gave up are remembered at most.
pub(crate) const ABANDONED_LIMIT: usize = 1024;

/// Probes take ids from the top half of the id space, which the client's
/// own counter (starting at 1) never reaches.
const PROBE_IDS: u64 = 1 << 63;

/// A request written to QEMU and not yet answered.
pub(crate) struct Pending {
    pub request: Request,
    /// Its deadline passed: the caller was told (a probe: forgotten).
    pub expired: bool,
    /// When it was written, if the connection measures latencies.
    pub sent_at: Option<Instant>,
}

impl Pending {
    /// True while a caller waits for this reply.
    pub(crate) fn has_caller(&self) -> bool {
        !self.expired && !self.request.is_closed()
    }
}

/// Commands written and unanswered, by id: one held inline, the rest in a
/// map. A connection with at most one command in flight at a time (the
/// usual case, and every idle one) never allocates the map, and finds its
/// one command without hashing.
pub(crate) struct PendingMap<V> {
    one: Option<(u64, V)>,
    more: FxHashMap<u64, V>,
}

impl<V> Default for PendingMap<V> {
    fn default() -> Self {
        PendingMap {
            one: None,
            more: FxHashMap::default(),
        }
    }
}

impl<V> PendingMap<V> {
    /// Adds `value` under `id`, which is not in the map (ids are never reused).
    fn insert(&mut self, id: u64, value: V) {
        if self.one.is_none() {
            self.one = Some((id, value));
        } else {
            self.more.insert(id, value);
        }
    }

    fn get(&self, id: &u64) -> Option<&V> {
        match &self.one {
            Some((k, v)) if k == id => Some(v),
            _ => self.more.get(id),
        }
    }

    fn contains_key(&self, id: &u64) -> bool {
        self.get(id).is_some()
    }

    fn remove(&mut self, id: &u64) -> Option<V> {
        if self.one.as_ref().is_some_and(|(k, _)| k == id) {
            return self.one.take().map(|(_, v)| v);
        }
        if self.more.is_empty() {
            return None;
        }
        self.more.remove(id)
    }

    fn len(&self) -> usize {
        usize::from(self.one.is_some()) + self.more.len()
    }

    /// Some id in the map (the only one, when there is one).
    fn first_id(&self) -> Option<u64> {
        match &self.one {
            Some((k, _)) => Some(*k),
            None => self.more.keys().next().copied(),
        }
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut V)> {
        let one = self.one.as_mut().map(|(k, v)| (*k, v));
        one.into_iter().chain(self.more.iter_mut().map(|(k, v)| (*k, v)))
    }

    fn drain(&mut self) -> impl Iterator<Item = (u64, V)> + '_ {
        self.one.take().into_iter().chain(self.more.drain())
    }
}

/// What [`InFlight::fill`] put in the write buffer needs besides its bytes.
#[derive(Default)]
pub(crate) struct Filled {
    /// File descriptors to attach to the buffer's first byte.
    pub fds: Vec<OwnedFd>,
    /// The deadline of a probe written with it, for the timer.
    pub probe_deadline: Option<Tick>,
}

/// The bookkeeping of one connection. `S` is where callers' results go.
pub(crate) struct InFlight {
    /// QEMU's queue limit applies (`oob` was negotiated).
    oob: bool,
    /// The server answers in-band commands in order, as QEMU does: a reply
    /// proves earlier ones lost, and probes can release them.
    in_order: bool,
    /// Written and unanswered, by id.
    pending: PendingMap<Pending>,
    /// In-band ids written and unanswered (or at least not known lost), oldest first.
    inband: VecDeque<u64>,
    /// Requests not written yet.
    queue: VecDeque<Request>,
    /// What only out-of-band commands, fd passing and callers that gave
    /// up need; `None` until then.
    seldom: Option<Box<Seldom>>,
    /// The unanswered command that carried fds.
    fd_command: Option<u64>,
    /// The probe in flight.
    probe: Option<u64>,
    next_probe: u64,
    /// Abandoned commands were forgotten: the in-band order is no longer
    /// known completely, so errors without an id are not attributed by it.
    lost_track: bool,
}

/// The queues a connection needs only for out-of-band commands, commands
/// that pass fds, and commands whose callers gave up. Allocated on first
/// use: 96 bytes less in every connection's task, which for a connection
/// that never uses them is a smaller allocation size class (see the
/// driver's `Task`).
#[derive(Default)]
struct Seldom {
    oob_queue: VecDeque<Request>,
    /// Requests with fds held back by the fd rule, in order.
    fd_queue: VecDeque<Request>,
    /// Ids whose callers gave up, oldest first (some may be answered since).
    abandoned: VecDeque<u64>,
}

impl InFlight {
    /// Bookkeeping for a connection; `oob` when QEMU's queue limit applies.
    /// `in_order` unless the server may answer in-band commands out of order.
    pub(crate) fn new(oob: bool, in_order: bool) -> Self {
        InFlight {
            oob,
            in_order,
            pending: PendingMap::default(),
            inband: VecDeque::new(),
            queue: VecDeque::new(),
            seldom: None,
            fd_command: None,
            probe: None,
            next_probe: PROBE_IDS,
            lost_track: false,
        }
    }

    /// How many commands are written and unanswered.
    #[cfg(test)]
    pub(crate) fn written(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is queued.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
            + self
                .seldom
                .as_ref()
                .map_or(0, |s| s.oob_queue.len() + s.fd_queue.len())
    }

    /// The seldom-used queues, made on first use.
    fn seldom(&mut self) -> &mut Seldom {
        self.seldom.get_or_insert_with(Box::default)
    }

    /// True when a request waits to be written (or held back, which may
    /// call for a probe): [`InFlight::fill`] has something to do.
    pub(crate) fn has_unwritten(&self) -> bool {
        !self.queue.is_empty()
            || self
                .seldom
                .as_ref()
                .is_some_and(|s| !s.oob_queue.is_empty() || !s.fd_queue.is_empty())
    }

    /// True when requests with fds are held back by the fd rule.
    fn fds_waiting(&self) -> bool {
        self.seldom.as_ref().is_some_and(|s| !s.fd_queue.is_empty())
    }

    /// Takes a request from a caller; returns its deadline, for the timer.
    pub(crate) fn enqueue(&mut self, out: Request, now: Tick) -> Option<Tick> {
        let deadline = out.start_clock(now);
        if out.oob {
            self.seldom().oob_queue.push_back(out);
        } else {
            self.queue.push_back(out);
        }
        deadline
    }

    /// Moves what may be written now into `wbuf` (which the task writes
    /// whole before calling again): out-of-band requests first, then
    /// in-band ones within the rules. A request with fds goes alone, at the
    /// start of a batch, so that its `sendmsg` carries its bytes only.
    /// `written` sees each request as it is committed (for the traffic log);
    /// `now` is for latency measurement, when wanted; `probe_budget` is the
    /// budget of a probe, if one goes out.
    pub(crate) fn fill(
        &mut self,
        wbuf: &mut Vec<u8>,
        now: Option<Instant>,
        probe_budget: Duration,
        mut written: impl FnMut(&Request, &[u8]),
    ) -> Filled {
        let mut batch = Filled::default();
        loop {
            // Out-of-band requests are never held back.
            if let Some(out) = self.seldom.as_mut().and_then(|s| s.oob_queue.pop_front()) {
                self.commit(out, wbuf, &mut batch, now, &mut written);
                continue;
            }
            // An fd request held back goes first once the rule allows it.
            let fd_ready = self.fd_command.is_none() && self.fds_waiting();
            if fd_ready || !self.queue.is_empty() {
                if !self.window_open() {
                    batch.probe_deadline = self.maybe_probe(wbuf, probe_budget);
                    return batch;
                }
                let out = if fd_ready {
                    self.seldom().fd_queue.pop_front()
                } else {
                    self.queue.pop_front()
                }
                .expect("checked non-empty");
                if out.passes_fds {
                    if out.is_closed() {
                        // Its caller gave up: never written, fds closed.
                        continue;
                    }
                    if self.fd_command.is_some() {
                        self.seldom().fd_queue.push_back(out);
                        continue;
                    }
                    if !wbuf.is_empty() {
                        // Starts the next batch instead.
                        self.queue.push_front(out);
                        return batch;
                    }
                    self.commit(out, wbuf, &mut batch, now, &mut written);
                    return batch;
                }
                self.commit(out, wbuf, &mut batch, now, &mut written);
                continue;
            }
            // Only fd requests wait, held by an fd command nobody waits for.
            if self.fds_waiting() {
                batch.probe_deadline = self.maybe_probe(wbuf, probe_budget);
            }
            return batch;
        }
    }

    /// True when one more in-band command may be written.
    fn window_open(&self) -> bool {
        !self.oob || self.inband.len() < QEMU_QUEUE_LIMIT
    }

    /// Writes a probe if what blocks the queue are only commands whose
    /// callers gave up (see the module docs), and no probe is out already.
    /// Returns the probe's deadline if one was written.
    fn maybe_probe(&mut self, wbuf: &mut Vec<u8>, budget: Duration) -> Option<Tick> {
        if self.probe.is_some() || !self.in_order {
            return None;
        }
        let stuck = if !self.window_open() {
            self.inband
                .iter()
                .all(|id| self.pending.get(id).is_none_or(|p| !p.has_caller()))
        } else {
            self.fd_command
                .and_then(|id| self.pending.get(&id))
                .is_some_and(|p| !p.has_caller())
        };
        if !stuck {
            return None;
        }
        let id = self.next_probe;
        self.next_probe += 1;
        use crate::wire::{encode_request, CommandName};
        encode_request(wbuf, const { CommandName::new("query-version") }, &(), id, false)
            .expect("a request without arguments encodes");
        self.probe = Some(id);
        self.inband.push_back(id);
        let probe = Request::probe(id, budget);
        let deadline = probe.start_clock(Tick::now());
        self.pending.insert(
            id,
            Pending {
                request: probe,
                expired: false,
                sent_at: None,
            },
        );
        crate::diag::debug!(
            id,
            "QMP: probing with query-version: commands nobody waits for hold the queue"
        );
        deadline
    }

    /// Adds a request to the batch; false if its caller gave up already.
    fn commit(
        &mut self,
        out: Request,
        wbuf: &mut Vec<u8>,
        batch: &mut Filled,
        now: Option<Instant>,
        written: &mut impl FnMut(&Request, &[u8]),
    ) -> bool {
        if out.is_closed() {
            // The caller gave up (timeout or cancellation) before the
            // request was written: it never reaches QEMU. Its fds close on drop.
            crate::diag::debug!(command = %out.name, id = out.id, "dropped a request whose caller gave up");
            return false;
        }
        let start = wbuf.len();
        let fds = out.write_into(wbuf);
        written(&out, &wbuf[start..]);
        if !fds.is_empty() {
            batch.fds = fds;
            self.fd_command = Some(out.id);
        }
        if !out.oob {
            self.inband.push_back(out.id);
        }
        self.pending.insert(
            out.id,
            Pending {
                request: out,
                expired: false,
                sent_at: now,
            },
        );
        true
    }

    /// A reply (or a message that answers `id` somehow) arrived: the
    /// request's bookkeeping, if `id` is one of ours and unanswered. Earlier
    /// in-band commands are released as lost (see the module docs).
    pub(crate) fn answer(&mut self, id: u64) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if self.fd_command == Some(id) {
            self.fd_command = None;
        }
        if self.probe == Some(id) {
            self.probe = None;
        }
        if !p.request.oob {
            if let Some(at) = self.inband.iter().position(|&x| x == id) {
                if self.in_order {
                    for lost in self.inband.drain(..at).collect::<Vec<_>>() {
                        self.release_lost(lost);
                    }
                    self.inband.pop_front();
                } else {
                    self.inband.remove(at);
                }
            }
            if self.inband.is_empty() {
                self.lost_track = false;
            }
        }
        Some(p)
    }

    /// Forgets a command that will never be answered, telling its caller.
    fn release_lost(&mut self, id: u64) {
        let Some(p) = self.pending.remove(&id) else { return };
        if self.fd_command == Some(id) {
            self.fd_command = None;
        }
        if self.probe == Some(id) {
            self.probe = None;
        }
        if p.has_caller() {
            crate::diag::warning!(command = %p.request.name, id, "QMP: a later reply came first: this command's reply was lost");
            let command = p.request.name.to_string();
            p.request.fail(Error::ReplyLost { command });
        } else {
            crate::diag::debug!(command = %p.request.name, id, "QMP: forgot a timed-out command whose reply was lost")
        }
    }

    /// The command an error without an id belongs to, when that is
    /// certain: the only one in flight, or without OOB (where QEMU answers
    /// strictly in order) the oldest one.
    pub(crate) fn owner_of_idless_error(&self) -> Option<u64> {
        if self.pending.len() == 1 {
            return self.pending.first_id();
        }
        if !self.oob && !self.lost_track {
            return self.inband.front().copied();
        }
        None
    }

    /// True when `id` is written and unanswered.
    pub(crate) fn is_pending(&self, id: u64) -> bool {
        self.pending.contains_key(&id)
    }

    /// Tells every caller whose deadline has passed that its command timed
    /// out; returns the next deadline to wake up for.
    pub(crate) fn expire(&mut self, now: Tick) -> Option<Tick> {
        let mut next: Option<Tick> = None;
        let mut still_waiting = |d: Tick| next = Some(next.map_or(d, |n| n.min(d)));
        let timeout = |name: &str, budget: Duration| Error::Timeout {
            command: name.to_owned(),
            budget,
        };
        let (oob_queue, fd_queue) = match self.seldom.as_deref_mut() {
            Some(s) => (Some(&mut s.oob_queue), Some(&mut s.fd_queue)),
            None => (None, None),
        };
        for queue in [Some(&mut self.queue), oob_queue, fd_queue].into_iter().flatten() {
            for out in std::mem::take(queue) {
                match out.deadline() {
                    Some(d) if d <= now => {
                        crate::diag::debug!(command = %out.name, id = out.id, "QMP: timed out before it was written");
                        out.fail(timeout(&out.name, out.budget));
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
        let mut newly_abandoned = Vec::new();
        for (id, p) in self.pending.iter_mut() {
            if p.expired {
                continue;
            }
            let Some(d) = p.request.deadline() else { continue };
            if d > now {
                still_waiting(d);
                continue;
            }
            p.expired = true;
            if !p.request.is_closed() {
                crate::diag::debug!(command = %p.request.name, id, "QMP: timed out waiting for the reply");
                p.request.fail(timeout(&p.request.name, p.request.budget));
            }
            newly_abandoned.push(id);
        }
        for id in newly_abandoned {
            if self.probe == Some(id) {
                // A new probe may go out; this one stays counted until answered.
                self.probe = None;
            }
            self.seldom().abandoned.push_back(id);
        }
        self.forget_excess_abandoned();
        next
    }

    /// Keeps at most [`ABANDONED_LIMIT`] commands nobody waits for.
    fn forget_excess_abandoned(&mut self) {
        while let Some(id) = self
            .seldom
            .as_mut()
            .filter(|s| s.abandoned.len() > ABANDONED_LIMIT)
            .and_then(|s| s.abandoned.pop_front())
        {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            crate::diag::debug!(command = %p.request.name, id, "QMP: forgot a timed-out command (too many unanswered)");
            if !p.request.oob {
                if let Some(at) = self.inband.iter().position(|&x| x == id) {
                    self.inband.remove(at);
                    self.lost_track = true;
                }
            }
            if self.fd_command == Some(id) {
                self.fd_command = None;
            }
        }
        // Ids answered since they were abandoned need no memory either.
        if let Some(s) = self
            .seldom
            .as_mut()
            .filter(|s| s.abandoned.len() > ABANDONED_LIMIT / 2)
        {
            let pending = &self.pending;
            s.abandoned.retain(|id| pending.contains_key(id));
        }
    }

    /// Fails everything, queued or written, with `err` (the connection ended).
    pub(crate) fn fail_all(&mut self, err: &Error) {
        let seldom = self.seldom.take().map(|s| *s).unwrap_or_default();
        let queued = self
            .queue
            .drain(..)
            .chain(seldom.oob_queue)
            .chain(seldom.fd_queue);
        for out in queued {
            out.fail(err.clone());
        }
        for (_, p) in self.pending.drain() {
            if p.has_caller() {
                p.request.fail(err.clone());
            }
        }
        self.inband.clear();
        self.fd_command = None;
        self.probe = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::call::{Call, NewCall, Waiter};
    use std::sync::Arc;

    /// A caller's end. The rig keeps a clone of each, so that a test that
    /// ignores a caller does not make it look gone: only `give_up` does.
    #[derive(Clone)]
    struct Caller(Arc<Waiter>);

    impl Caller {
        fn result(&self) -> Option<Result<(), Error>> {
            self.0.peek()
        }
        fn lost(&self) -> bool {
            matches!(self.result(), Some(Err(Error::ReplyLost { .. })))
        }
        fn timed_out(&self) -> bool {
            matches!(self.result(), Some(Err(Error::Timeout { .. })))
        }
        fn give_up(&self) {
            self.0.give_up();
        }
    }

    struct Rig {
        book: InFlight,
        callers: Vec<Caller>,
        now: Tick,
        wire: Vec<u8>,
    }

    const SECOND: Duration = Duration::from_secs(1);

    impl Rig {
        fn new(oob: bool) -> Self {
            Rig {
                book: InFlight::new(oob, true),
                callers: Vec::new(),
                now: Tick::now(),
                wire: Vec::new(),
            }
        }

        /// Queues a request with this id; `fds` of them.
        fn request(&mut self, id: u64, fds: usize, oob: bool) -> Caller {
            let fds = (0..fds)
                .map(|_| rustix::io::dup(std::io::stdin()).expect("dup"))
                .collect();
            let (waiter, request) = Call::start(
                NewCall {
                    id,
                    name: format!("cmd{id}").into(),
                    fds,
                    oob,
                    log: false,
                    budget: SECOND,
                },
                format!("<{id}>").as_bytes(),
            );
            self.book.enqueue(request, self.now);
            let caller = Caller(Arc::new(waiter));
            self.callers.push(caller.clone());
            caller
        }

        /// What the next write carries: the requests' markers, and how many fds.
        fn write(&mut self) -> (String, usize) {
            let mut wbuf = Vec::new();
            let filled = self.book.fill(&mut wbuf, None, 5 * SECOND, |_, _| {});
            self.wire.extend_from_slice(&wbuf);
            (String::from_utf8(wbuf).unwrap(), filled.fds.len())
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
            self.book.expire(self.now);
        }

        /// The request answered by `id`, if a caller still waits for it.
        fn answer(&mut self, id: u64) -> Option<Request> {
            self.book.answer(id).filter(|p| p.has_caller()).map(|p| p.request)
        }
    }

    fn probe_id(batch: &str) -> Option<u64> {
        let at = batch.find("\"execute\":\"query-version\",\"id\":")?;
        let rest = &batch[at + 31..];
        rest[..rest.find('}').unwrap()].parse().ok()
    }

    #[test]
    fn the_pending_map_finds_every_command_inline_or_not() {
        let mut map = PendingMap::default();
        assert_eq!((map.len(), map.first_id()), (0, None));
        for id in [5, 7, 9] {
            map.insert(id, id * 10);
        }
        assert_eq!(map.len(), 3);
        assert!([5, 7, 9].iter().all(|id| map.get(id) == Some(&(id * 10))));
        assert_eq!(map.remove(&5), Some(50), "the inline one");
        assert_eq!(map.remove(&5), None);
        // The inline slot is free again and takes the next one.
        map.insert(11, 110);
        let mut seen: Vec<_> = map.iter_mut().map(|(id, v)| (id, *v)).collect();
        seen.sort();
        assert_eq!(seen, [(7, 70), (9, 90), (11, 110)]);
        assert_eq!(map.remove(&9), Some(90));
        assert!(!map.contains_key(&9) && map.contains_key(&7));
        let mut drained: Vec<_> = map.drain().collect();
        drained.sort();
        assert_eq!(drained, [(7, 70), (11, 110)]);
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn a_later_in_band_reply_releases_earlier_unanswered_ones() {
        let mut rig = Rig::new(false);
        let callers: Vec<_> = (1..=4).map(|id| rig.request(id, 0, false)).collect();
        assert_eq!(rig.write().0, "<1><2><3><4>");
        rig.answer(3).unwrap().reply_message(b"{}", 0..2);
        assert!(callers[0].lost() && callers[1].lost());
        assert!(matches!(callers[2].result(), Some(Ok(()))));
        assert!(callers[3].result().is_none(), "a later command is not released");
        assert_eq!(rig.book.written(), 1);
        // A late reply to a released command is unknown now.
        assert!(rig.answer(1).is_none());
    }

    #[test]
    fn out_of_band_replies_release_nothing() {
        let mut rig = Rig::new(true);
        let a = rig.request(1, 0, false);
        let _b = rig.request(2, 0, true);
        assert_eq!(rig.write().0, "<2><1>");
        assert!(rig.answer(2).is_some());
        assert!(a.result().is_none());
        assert_eq!(rig.book.written(), 1);
    }

    #[test]
    fn a_full_queue_of_abandoned_commands_is_probed_then_released() {
        let mut rig = Rig::new(true);
        for id in 1..=8 {
            rig.request(id, 0, false);
        }
        assert_eq!(rig.write().0, "<1><2><3><4><5><6><7><8>");
        // Their replies never come: every caller times out.
        rig.advance(2 * SECOND);
        let next = rig.request(9, 0, false);
        let batch = rig.write().0;
        let probe = probe_id(&batch).expect("a probe is written");
        assert!(!batch.contains("<9>"), "the queue limit still holds: {batch}");
        assert_eq!(rig.write().0, "", "one probe at a time");
        // The probe's reply proves the eight lost: their slots are free.
        assert!(rig.answer(probe).is_none(), "nobody waits for a probe");
        assert_eq!(rig.book.written(), 0);
        assert_eq!(rig.write().0, "<9>");
        rig.answer(9).unwrap().reply_message(b"{}", 0..2);
        assert!(matches!(next.result(), Some(Ok(()))));
    }

    #[test]
    fn no_probe_while_a_caller_still_waits() {
        let mut rig = Rig::new(true);
        for id in 1..=8 {
            rig.request(id, 0, false);
        }
        rig.write();
        rig.now += SECOND / 2;
        rig.request(9, 0, false);
        assert_eq!(rig.write().0, "", "QEMU may just be slow");
    }

    #[test]
    fn a_probe_that_times_out_is_followed_by_another() {
        let mut rig = Rig::new(true);
        for id in 1..=8 {
            rig.request(id, 0, false);
        }
        rig.write();
        rig.advance(2 * SECOND);
        rig.request(9, 0, false);
        let first = probe_id(&rig.write().0).unwrap();
        // Request 9 times out with it; another request finds the queue stuck.
        rig.advance(10 * SECOND);
        rig.request(10, 0, false);
        let second = probe_id(&rig.write().0).unwrap();
        assert_ne!(first, second);
        // Answering the second releases the first and the eight.
        rig.answer(second);
        assert_eq!(rig.book.written(), 0);
        assert_eq!(rig.write().0, "<10>");
    }

    #[test]
    fn fd_commands_wait_for_the_last_one_and_plain_ones_do_not() {
        let mut rig = Rig::new(false);
        let a = rig.request(1, 1, false);
        let b = rig.request(2, 2, false);
        let c = rig.request(3, 0, false);
        assert_eq!(rig.write(), ("<1>".into(), 1));
        // The second fd command waits; the plain one goes past it.
        assert_eq!(rig.write(), ("<3>".into(), 0));
        assert_eq!(rig.write(), ("".into(), 0));
        // C's reply proves A's lost: B may go now.
        rig.answer(3).unwrap().reply_message(b"{}", 0..2);
        assert!(a.lost() && matches!(c.result(), Some(Ok(()))));
        assert_eq!(rig.write(), ("<2>".into(), 2));
        assert!(b.result().is_none());
    }

    #[test]
    fn an_fd_command_goes_alone_at_the_start_of_a_write() {
        let mut rig = Rig::new(false);
        rig.request(1, 0, false);
        rig.request(2, 1, false);
        rig.request(3, 0, false);
        assert_eq!(rig.write(), ("<1>".into(), 0));
        assert_eq!(rig.write(), ("<2>".into(), 1));
        assert_eq!(rig.write(), ("<3>".into(), 0));
    }

    #[test]
    fn an_abandoned_fd_command_with_only_fd_commands_behind_it_is_probed() {
        let mut rig = Rig::new(false);
        rig.request(1, 1, false);
        rig.write();
        rig.advance(2 * SECOND);
        let b = rig.request(2, 1, false);
        let probe = probe_id(&rig.write().0).expect("probe");
        rig.answer(probe);
        assert_eq!(rig.write(), ("<2>".into(), 1));
        rig.answer(2).unwrap().reply_message(b"{}", 0..2);
        assert!(matches!(b.result(), Some(Ok(()))));
    }

    #[test]
    fn deadlines_end_queued_and_written_requests() {
        let mut rig = Rig::new(true);
        for id in 1..=9 {
            rig.request(id, 0, false);
        }
        let callers: Vec<_> = (10..=11).map(|id| rig.request(id, 0, false)).collect();
        rig.write();
        rig.advance(2 * SECOND);
        assert!(callers.iter().all(Caller::timed_out));
        assert_eq!(rig.book.queued(), 0, "a timed-out request is never written");
        assert!(!String::from_utf8_lossy(&rig.wire).contains("<10>"));
    }

    #[test]
    fn a_cancelled_caller_is_not_written() {
        let mut rig = Rig::new(false);
        let a = rig.request(1, 1, false);
        a.give_up();
        assert_eq!(rig.write(), ("".into(), 0));
    }

    #[test]
    fn memory_for_abandoned_commands_is_bounded() {
        let mut rig = Rig::new(false);
        for round in 0..10u64 {
            for i in 0..1000 {
                rig.request(round * 1000 + i + 1, 0, false);
            }
            rig.write();
            rig.advance(2 * SECOND);
        }
        assert!(
            rig.book.written() <= ABANDONED_LIMIT,
            "{} remembered",
            rig.book.written()
        );
        assert!(rig.book.seldom.as_ref().map_or(0, |s| s.abandoned.len()) <= ABANDONED_LIMIT);
        // The in-band order is no longer known whole: an error without an
        // id is not attributed by it.
        assert_eq!(rig.book.owner_of_idless_error(), None);
        // A reply to the newest releases everything: memory back to nothing.
        rig.book.answer(10_000);
        assert_eq!(rig.book.written(), 0);
        let a = rig.request(20_000, 0, false);
        rig.request(20_001, 0, false);
        rig.write();
        assert_eq!(rig.book.owner_of_idless_error(), Some(20_000));
        drop(a);
    }

    #[test]
    fn errors_without_an_id_go_to_the_only_or_oldest_command() {
        let mut rig = Rig::new(true);
        rig.request(1, 0, false);
        rig.write();
        assert_eq!(rig.book.owner_of_idless_error(), Some(1));
        rig.request(2, 0, false);
        rig.write();
        assert_eq!(
            rig.book.owner_of_idless_error(),
            None,
            "with oob, order proves nothing"
        );
        let mut rig = Rig::new(false);
        rig.request(1, 0, false);
        rig.request(2, 0, false);
        rig.write();
        assert_eq!(rig.book.owner_of_idless_error(), Some(1));
    }

    #[test]
    fn fail_all_reaches_every_caller() {
        let mut rig = Rig::new(true);
        let callers: Vec<_> = (1..=10)
            .map(|id| rig.request(id, usize::from(id == 3), id == 2))
            .collect();
        rig.write();
        rig.book.fail_all(&Error::disconnected("gone"));
        assert!(callers
            .iter()
            .all(|c| matches!(c.result(), Some(Err(Error::Disconnected { .. })))));
    }

    #[test]
    fn a_server_that_answers_out_of_order_loses_nothing_when_told() {
        let mut rig = Rig::new(false);
        rig.book = InFlight::new(false, false);
        let a = rig.request(1, 0, false);
        rig.request(2, 0, false);
        rig.write();
        assert!(rig.answer(2).is_some());
        assert!(a.result().is_none());
        assert!(rig.answer(1).is_some());
    }
}
