//! Guest agent detection through the agent's serial ring buffer.
//!
//! The agent here is Incus's (incus-agent), not the QEMU guest agent
//! (`qemu-ga`), which [`crate::guest_agent`] talks to.
//!
//! The agent writes `STARTED\n` when it comes up and `STOPPED\n` when it goes
//! down, to a virtio serial port whose host side is a `ringbuf` chardev. The
//! monitor drains that buffer with `ringbuf-read` (format `base64`, so any
//! byte survives, and unlogged) and looks at every complete line in order: a
//! read that holds `STARTED\nSTOPPED\n` is two transitions, and a line split
//! across two reads is put back together. Anything else is ignored.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use qmpkit_qapi::{commands as c, types as t};
use tokio::sync::{Mutex, Notify};

use crate::client::{CallOptions, Client};
use crate::error::{ConsoleError, Error, Result};

/// The longest line kept while waiting for its end. A status line is a few
/// bytes; anything longer is garbage, and is skipped up to the next newline.
const MAX_LINE: usize = 4096;

/// At most this many reads in a row when each comes back full, so that a
/// guest flooding its port cannot keep the poller busy forever.
const MAX_READS_PER_CHECK: usize = 64;

/// What a status line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Started,
    Stopped,
}

/// Splits the byte stream from the ring buffer into lines, keeping a partial
/// trailing line for the next read.
#[derive(Debug, Default)]
pub(crate) struct LineBuffer {
    partial: Vec<u8>,
    /// The current line outgrew [`MAX_LINE`]: drop bytes up to its end.
    skipping: bool,
}

impl LineBuffer {
    /// Feeds bytes in and returns the status of every complete status line, in order.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Vec<Status> {
        let mut found = Vec::new();
        while let Some(nl) = memchr::memchr(b'\n', bytes) {
            let (line, rest) = (&bytes[..nl], &bytes[nl + 1..]);
            bytes = rest;
            if self.skipping {
                self.skipping = false;
                continue;
            }
            let status = if self.partial.is_empty() {
                parse(line)
            } else {
                self.partial.extend_from_slice(line);
                let status = parse(&self.partial);
                self.partial.clear();
                status
            };
            found.extend(status);
        }
        if !self.skipping {
            self.partial.extend_from_slice(bytes);
            if self.partial.len() > MAX_LINE {
                self.partial.clear();
                self.skipping = true;
            }
        }
        found
    }
}

fn parse(line: &[u8]) -> Option<Status> {
    match line.trim_ascii() {
        b"STARTED" => Some(Status::Started),
        b"STOPPED" => Some(Status::Stopped),
        _ => None,
    }
}

/// Decodes QEMU's base64 (standard alphabet, padded); `None` when it is not base64.
pub(crate) fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text.trim()).ok()
}

/// The agent watcher's state, shared by the monitor's event task (which polls)
/// and [`super::Monitor::check_agent`].
pub(crate) struct Agent {
    pub chardev: String,
    pub read_size: usize,
    pub interval: Duration,
    started: AtomicBool,
    /// The chardev was missing or no ring buffer at connect: the monitor
    /// does not poll it, and never reports the agent.
    disabled: AtomicBool,
    /// Held across a read and the processing of its bytes, so that reads are
    /// processed in the order QEMU answered them.
    lines: Mutex<LineBuffer>,
    /// Transitions found and not yet handed to the event handler, oldest
    /// first (true for started). Only ever locked briefly, never across an await.
    pending: std::sync::Mutex<VecDeque<bool>>,
    /// Wakes the event task when a transition is queued.
    pub queued: Notify,
}

impl Agent {
    /// A watcher of `chardev`; `started` is what the caller knows of the
    /// agent from before the monitor (see [`super::MonitorOptions::agent_started`]).
    pub(crate) fn new(chardev: String, read_size: usize, interval: Duration, started: bool) -> Self {
        Agent {
            chardev,
            read_size,
            interval,
            started: AtomicBool::new(started),
            disabled: AtomicBool::new(false),
            lines: Mutex::new(LineBuffer::default()),
            pending: std::sync::Mutex::new(VecDeque::new()),
            queued: Notify::new(),
        }
    }

    /// Whether the agent is running, as last seen.
    pub(crate) fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Takes the caller's word for the agent's state, without a transition
    /// for the handler (see [`super::Monitor::set_agent_started`]).
    pub(crate) fn set_started(&self, started: bool) {
        if !self.disabled() {
            self.started.store(started, Ordering::Release);
        }
    }

    /// Stops watching for good: the chardev cannot be read.
    pub(crate) fn disable(&self) {
        self.disabled.store(true, Ordering::Release);
        self.started.store(false, Ordering::Release);
    }

    /// True once [`Agent::disable`] was called.
    pub(crate) fn disabled(&self) -> bool {
        self.disabled.load(Ordering::Acquire)
    }

    /// Forgets the agent (the VM is gone).
    pub(crate) fn reset(&self) {
        self.started.store(false, Ordering::Release);
    }

    /// Forgets the agent and returns whether it was running: one more
    /// transition to report (QEMU is gone, and the agent with it).
    pub(crate) fn stop(&self) -> bool {
        self.started.swap(false, Ordering::AcqRel)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, VecDeque<bool>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The oldest transition not yet handed to the handler (true for started).
    pub(crate) fn next_transition(&self) -> Option<bool> {
        self.pending().pop_front()
    }

    /// Forgets the agent and any partial line (the guest was reset). Returns
    /// the transitions found before, still to be handed over, and whether the
    /// agent was running, which is one more transition to report.
    pub(crate) async fn forget(&self) -> (VecDeque<bool>, bool) {
        let mut lines = self.lines.lock().await;
        *lines = LineBuffer::default();
        let earlier = std::mem::take(&mut *self.pending());
        (earlier, self.started.swap(false, Ordering::AcqRel))
    }

    /// Drains the ring buffer and queues every transition, in order, for
    /// the event task (see [`Agent::next_transition`]). Returns the state afterwards.
    pub(crate) async fn check(&self, client: &Client) -> Result<bool> {
        let mut lines = self.lines.lock().await;
        for _ in 0..MAX_READS_PER_CHECK {
            let read = c::RingbufRead {
                device: self.chardev.clone(),
                // A size beyond QEMU's integers is refused by QEMU either way.
                size: i64::try_from(self.read_size).unwrap_or(i64::MAX),
                format: Some(t::DataFormat::Base64),
            };
            let text = client
                .run_with(&read, CallOptions::new().unlogged())
                .await
                .map_err(|e| ringbuf_error(&self.chardev, e))?;
            let bytes = decode_base64(&text).ok_or_else(|| {
                Error::Protocol(format!(
                    "ringbuf-read of {} returned invalid base64",
                    self.chardev
                ))
            })?;
            for status in lines.feed(&bytes) {
                let now = status == Status::Started;
                if self.started.swap(now, Ordering::AcqRel) != now {
                    self.pending().push_back(now);
                    self.queued.notify_one();
                }
            }
            if bytes.len() < self.read_size {
                break;
            }
        }
        Ok(self.started())
    }
}

/// Turns QEMU's replies about a missing or wrong chardev into the typed errors.
pub(crate) fn ringbuf_error(chardev: &str, e: Error) -> Error {
    match e.as_qmp() {
        Some(q) if q.desc.contains("not a ringbuf") => ConsoleError::NotARingbuf(chardev.to_owned()).into(),
        Some(q) if q.is_not_found() => ConsoleError::NotFound(chardev.to_owned()).into(),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::*;

    #[test]
    fn every_complete_line_in_order() {
        let mut b = LineBuffer::default();
        assert_eq!(b.feed(b"STARTED\nSTOPPED\n"), [Started, Stopped]);
        assert_eq!(b.feed(b"STAR"), []);
        assert_eq!(b.feed(b"TED\r\nSTO"), [Started]);
        assert_eq!(b.feed(b"PPED\n"), [Stopped]);
        assert_eq!(b.feed(b"xSTARTED\nSTARTEDx\n\n  STARTED  \n"), [Started]);
    }

    #[test]
    fn overlong_garbage_is_skipped_to_its_newline() {
        let mut b = LineBuffer::default();
        let junk = vec![b'S'; MAX_LINE * 3];
        assert_eq!(b.feed(&junk), []);
        assert_eq!(b.feed(b"STARTED\n"), [], "the tail of a garbage line is garbage");
        assert_eq!(b.feed(b"STARTED\n"), [Started]);
        assert!(b.partial.is_empty());
    }

    #[test]
    fn base64_round_trips() {
        assert_eq!(decode_base64("U1RBUgHDqXgK").unwrap(), b"STAR\x01\xc3\xa9x\n");
        assert_eq!(decode_base64("YQ==").unwrap(), b"a");
        assert_eq!(decode_base64("YWI=").unwrap(), b"ab");
        assert_eq!(decode_base64("").unwrap(), b"");
        assert!(decode_base64("a*b").is_none());
    }
}
