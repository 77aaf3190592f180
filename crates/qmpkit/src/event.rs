//! Events: subscriptions with bounded queues, and typed views of common events.
//!
//! The connection's reader hands each event to every matching subscriber
//! without ever waiting: each subscriber has its own bounded queue, and one
//! that falls behind is told how many events it missed, in order, at the point
//! where it missed them. A slow subscriber therefore never stalls replies or
//! other subscribers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;

pub use crate::wire::Timestamp;

/// Queue length of a subscriber unless set otherwise.
pub const DEFAULT_EVENT_QUEUE: usize = 4096;

/// How many events are kept for the first subscriber when they arrive before
/// anyone has subscribed (for example right after the handshake).
const BACKLOG: usize = 1024;

/// An event from QEMU. Cheap to clone.
#[derive(Clone)]
pub struct Event(Arc<EventInner>);

struct EventInner {
    name: String,
    data: Value,
    timestamp: Timestamp,
}

impl Event {
    /// Makes an event (the connection makes them; a test or a monitor may too).
    pub fn new(name: impl Into<String>, data: Value, timestamp: Timestamp) -> Self {
        Event(Arc::new(EventInner {
            name: name.into(),
            data,
            timestamp,
        }))
    }

    /// The event's name, for example `SHUTDOWN`.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The event's `data` member (`Value::Null` when it has none).
    pub fn data(&self) -> &Value {
        &self.0.data
    }

    /// QEMU's timestamp.
    pub fn timestamp(&self) -> Timestamp {
        self.0.timestamp
    }

    /// Decodes the data into a type of your own.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.0.data)
    }

    /// A typed view of the events this crate knows; [`KnownEvent::Other`] for the rest.
    pub fn known(&self) -> KnownEvent {
        KnownEvent::from_event(self)
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event")
            .field("name", &self.0.name)
            .field("data", &self.0.data)
            .field("timestamp", &self.0.timestamp)
            .finish()
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.data.is_null() {
            write!(f, "{}", self.0.name)
        } else {
            write!(f, "{} {}", self.0.name, self.0.data)
        }
    }
}

/// Typed views of the events the Go package handles. Unknown events, and known
/// ones whose data does not decode, are [`KnownEvent::Other`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum KnownEvent {
    /// `SHUTDOWN`: QEMU is shutting down.
    Shutdown {
        /// True when the guest asked for it.
        guest: bool,
        /// Why, for example `host-qmp-quit`, `guest-shutdown`, or `disconnect`
        /// when a monitor synthesised it.
        reason: String,
    },
    /// `RESET`: the guest was reset.
    Reset {
        /// True when the guest asked for it.
        guest: bool,
        /// Why, for example `host-qmp-system-reset`.
        reason: String,
    },
    /// `STOP`: the VM stopped.
    Stop,
    /// `RESUME`: the VM resumed.
    Resume,
    /// `DEVICE_TRAY_MOVED`: a removable medium's tray opened or closed.
    DeviceTrayMoved {
        /// The block backend's name (may be empty).
        device: String,
        /// The device's qdev id (or QOM path).
        id: String,
        /// True when the tray is now open.
        tray_open: bool,
    },
    /// `RTC_CHANGE`: the guest changed its real-time clock.
    RtcChange {
        /// Offset from the host clock, in seconds.
        offset: i64,
        /// The RTC device's QOM path.
        qom_path: Option<String>,
    },
    /// `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED`, `BLOCK_JOB_READY`,
    /// `BLOCK_JOB_PENDING` or `BLOCK_JOB_ERROR`.
    BlockJob {
        /// Which of them.
        kind: BlockJobEvent,
        /// The job's id.
        device: String,
        /// The job type (`commit`, `mirror`, ...), absent for `BLOCK_JOB_ERROR`.
        job_type: Option<String>,
        /// The job's error message, when it failed.
        error: Option<String>,
    },
    /// `JOB_STATUS_CHANGE`: a job moved to a new state.
    JobStatusChange {
        /// The job's id.
        id: String,
        /// Its new status (`created`, `running`, `ready`, `concluded`, ...).
        status: String,
    },
    /// `MIGRATION`: the migration state changed.
    Migration {
        /// The new state (`setup`, `active`, `completed`, `failed`, ...).
        status: String,
    },
    /// Any other event; use [`Event::data`].
    Other,
}

/// Which block-job event a [`KnownEvent::BlockJob`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockJobEvent {
    /// `BLOCK_JOB_COMPLETED`
    Completed,
    /// `BLOCK_JOB_CANCELLED`
    Cancelled,
    /// `BLOCK_JOB_READY`
    Ready,
    /// `BLOCK_JOB_PENDING`
    Pending,
    /// `BLOCK_JOB_ERROR`
    Error,
}

#[derive(Deserialize)]
struct GuestReason {
    #[serde(default)]
    guest: bool,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
struct TrayMoved {
    #[serde(default)]
    device: String,
    #[serde(default)]
    id: String,
    #[serde(rename = "tray-open")]
    tray_open: bool,
}

#[derive(Deserialize)]
struct RtcChange {
    offset: i64,
    #[serde(rename = "qom-path", default)]
    qom_path: Option<String>,
}

#[derive(Deserialize)]
struct BlockJobData {
    device: String,
    #[serde(rename = "type", default)]
    job_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct JobStatus {
    id: String,
    status: String,
}

#[derive(Deserialize)]
struct MigrationData {
    status: String,
}

impl KnownEvent {
    fn from_event(ev: &Event) -> KnownEvent {
        let data = ev.data();
        let block = |kind| {
            BlockJobData::deserialize(data)
                .ok()
                .map(|d| KnownEvent::BlockJob {
                    kind,
                    device: d.device,
                    job_type: d.job_type,
                    error: d.error,
                })
        };
        let known = match ev.name() {
            "SHUTDOWN" => GuestReason::deserialize(data).ok().map(|d| KnownEvent::Shutdown {
                guest: d.guest,
                reason: d.reason,
            }),
            "RESET" => GuestReason::deserialize(data).ok().map(|d| KnownEvent::Reset {
                guest: d.guest,
                reason: d.reason,
            }),
            "STOP" => Some(KnownEvent::Stop),
            "RESUME" => Some(KnownEvent::Resume),
            "DEVICE_TRAY_MOVED" => TrayMoved::deserialize(data)
                .ok()
                .map(|d| KnownEvent::DeviceTrayMoved {
                    device: d.device,
                    id: d.id,
                    tray_open: d.tray_open,
                }),
            "RTC_CHANGE" => RtcChange::deserialize(data).ok().map(|d| KnownEvent::RtcChange {
                offset: d.offset,
                qom_path: d.qom_path,
            }),
            "BLOCK_JOB_COMPLETED" => block(BlockJobEvent::Completed),
            "BLOCK_JOB_CANCELLED" => block(BlockJobEvent::Cancelled),
            "BLOCK_JOB_READY" => block(BlockJobEvent::Ready),
            "BLOCK_JOB_PENDING" => block(BlockJobEvent::Pending),
            "BLOCK_JOB_ERROR" => block(BlockJobEvent::Error),
            "JOB_STATUS_CHANGE" => JobStatus::deserialize(data)
                .ok()
                .map(|d| KnownEvent::JobStatusChange {
                    id: d.id,
                    status: d.status,
                }),
            "MIGRATION" => MigrationData::deserialize(data)
                .ok()
                .map(|d| KnownEvent::Migration { status: d.status }),
            _ => None,
        };
        known.unwrap_or(KnownEvent::Other)
    }
}

/// Which events a subscription receives.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    names: Option<Vec<String>>,
    capacity: Option<usize>,
}

impl EventFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only events with one of these names.
    pub fn names<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        EventFilter {
            names: Some(names.into_iter().map(Into::into).collect()),
            capacity: None,
        }
    }

    /// Sets the subscriber's queue length (default [`DEFAULT_EVENT_QUEUE`]).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity.max(1));
        self
    }

    fn matches(&self, name: &str) -> bool {
        match &self.names {
            None => true,
            Some(names) => names.iter().any(|n| n == name),
        }
    }
}

/// What a subscription yields: an event, or a note that some were missed.
#[derive(Debug, Clone)]
pub enum EventItem {
    /// The next event.
    Event(Event),
    /// The subscriber's queue was full and this many events were dropped here.
    Missed(u64),
}

/// A stream of events from one connection, in the order QEMU sent them.
///
/// Dropping it unsubscribes. It ends (returns `None`) when the connection closes.
pub struct EventStream {
    rx: mpsc::Receiver<EventItem>,
    /// Every event dropped for this subscriber, reported or not yet.
    dropped: Arc<AtomicU64>,
    /// How many of them were reported in the stream so far.
    reported: u64,
}

impl EventStream {
    /// The next event or missed-events note; `None` once the connection has
    /// closed and every queued event was read.
    pub async fn recv(&mut self) -> Option<EventItem> {
        let item = self.rx.recv().await;
        self.account(item)
    }

    /// Counts reported drops, and at the end reports drops that happened
    /// after the last delivered event.
    fn account(&mut self, item: Option<EventItem>) -> Option<EventItem> {
        match item {
            Some(EventItem::Missed(n)) => {
                self.reported += n;
                Some(EventItem::Missed(n))
            }
            Some(item) => Some(item),
            None => {
                let rest = self.dropped.load(Ordering::Acquire) - self.reported;
                (rest > 0).then(|| {
                    self.reported += rest;
                    EventItem::Missed(rest)
                })
            }
        }
    }

    /// The next event, passing over missed-events notes (counted in
    /// [`EventStream::missed`]); `None` once the connection has closed.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match self.recv().await? {
                EventItem::Event(e) => return Some(e),
                EventItem::Missed(_) => continue,
            }
        }
    }

    /// The next event if one is queued now, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        loop {
            match self.rx.try_recv().ok()? {
                EventItem::Event(e) => return Some(e),
                EventItem::Missed(n) => self.reported += n,
            }
        }
    }

    /// Waits for the next event with this name, passing over others.
    pub async fn wait_for(&mut self, name: &str) -> Option<Event> {
        loop {
            let e = self.next().await?;
            if e.name() == name {
                return Some(e);
            }
        }
    }

    /// How many events this subscriber has missed so far because it fell behind.
    pub fn missed(&self) -> u64 {
        self.dropped.load(Ordering::Acquire)
    }

    /// Blocking version of [`EventStream::next`], for the blocking facade.
    /// Must not be called from inside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        loop {
            let item = self.rx.blocking_recv();
            match self.account(item)? {
                EventItem::Event(e) => return Some(e),
                EventItem::Missed(_) => continue,
            }
        }
    }
}

/// The connection's side of one subscription.
struct Subscriber {
    tx: mpsc::Sender<EventItem>,
    filter: EventFilter,
    /// Events dropped since the last successful hand-over.
    missed: u64,
    /// Every event dropped, shared with the stream.
    dropped: Arc<AtomicU64>,
}

impl Subscriber {
    fn drop_one(&mut self) {
        self.missed += 1;
        self.dropped.fetch_add(1, Ordering::Release);
    }

    /// Hands over an event without waiting. False when the subscriber is gone.
    fn offer(&mut self, ev: &Event) -> bool {
        if !self.filter.matches(ev.name()) {
            return !self.tx.is_closed();
        }
        if self.missed > 0 {
            match self.tx.try_send(EventItem::Missed(self.missed)) {
                Ok(()) => self.missed = 0,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.drop_one();
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        match self.tx.try_send(EventItem::Event(ev.clone())) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.drop_one();
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Every subscription of one connection.
#[derive(Default)]
pub(crate) struct Subscribers {
    inner: Mutex<SubscribersInner>,
}

#[derive(Default)]
struct SubscribersInner {
    list: Vec<Subscriber>,
    /// Events that arrived before anyone subscribed; `None` after the first
    /// subscription, from when on events nobody wants are dropped.
    backlog: Option<VecDeque<Event>>,
    closed: bool,
}

impl Subscribers {
    pub(crate) fn new() -> Self {
        Subscribers {
            inner: Mutex::new(SubscribersInner {
                list: Vec::new(),
                backlog: Some(VecDeque::new()),
                closed: false,
            }),
        }
    }

    /// Adds a subscription. The first one also receives the events that
    /// arrived before it (up to its capacity).
    pub(crate) fn subscribe(&self, filter: EventFilter) -> EventStream {
        let capacity = filter.capacity.unwrap_or(DEFAULT_EVENT_QUEUE);
        let (tx, rx) = mpsc::channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut sub = Subscriber {
            tx,
            filter,
            missed: 0,
            dropped: dropped.clone(),
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(backlog) = inner.backlog.take() {
            for ev in &backlog {
                sub.offer(ev);
            }
        }
        if !inner.closed {
            inner.list.push(sub);
        }
        EventStream {
            rx,
            dropped,
            reported: 0,
        }
    }

    /// Hands events to every matching subscriber, in order, without waiting.
    pub(crate) fn publish(&self, events: &[Event]) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(backlog) = inner.backlog.as_mut() {
            for ev in events {
                if backlog.len() == BACKLOG {
                    backlog.pop_front();
                }
                backlog.push_back(ev.clone());
            }
            return;
        }
        for ev in events {
            inner.list.retain_mut(|s| s.offer(ev));
        }
    }

    /// Ends every subscription (their streams return `None` once drained).
    pub(crate) fn close(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.closed = true;
        inner.list.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(name: &str, data: Value) -> Event {
        Event::new(name, data, Timestamp::default())
    }

    #[test]
    fn typed_views() {
        assert_eq!(
            ev("SHUTDOWN", json!({"guest": false, "reason": "host-qmp-quit"})).known(),
            KnownEvent::Shutdown {
                guest: false,
                reason: "host-qmp-quit".into()
            }
        );
        assert_eq!(
            ev(
                "DEVICE_TRAY_MOVED",
                json!({"device": "", "id": "cd0", "tray-open": true})
            )
            .known(),
            KnownEvent::DeviceTrayMoved {
                device: "".into(),
                id: "cd0".into(),
                tray_open: true
            }
        );
        assert_eq!(
            ev("JOB_STATUS_CHANGE", json!({"id": "j", "status": "concluded"})).known(),
            KnownEvent::JobStatusChange {
                id: "j".into(),
                status: "concluded".into()
            }
        );
        assert_eq!(
            ev("MIGRATION", json!({"status": "completed"})).known(),
            KnownEvent::Migration {
                status: "completed".into()
            }
        );
        assert_eq!(ev("STOP", Value::Null).known(), KnownEvent::Stop);
        assert_eq!(
            ev("VSERPORT_CHANGE", json!({"id": "x", "open": true})).known(),
            KnownEvent::Other
        );
        // A known name with data it cannot decode stays available raw.
        assert_eq!(ev("MIGRATION", json!({"weird": 1})).known(), KnownEvent::Other);
    }

    #[tokio::test]
    async fn slow_subscriber_is_told_what_it_missed_in_place() {
        let subs = Subscribers::new();
        let mut slow = subs.subscribe(EventFilter::all().capacity(2));
        let mut fast = subs.subscribe(EventFilter::all());
        let events: Vec<Event> = (0..10).map(|i| ev("E", json!(i))).collect();
        subs.publish(&events);
        subs.close();
        let mut got = Vec::new();
        while let Some(item) = slow.recv().await {
            got.push(match item {
                EventItem::Event(e) => e.data().to_string(),
                EventItem::Missed(n) => format!("missed {n}"),
            });
        }
        assert_eq!(got, ["0", "1", "missed 8"]);
        assert_eq!(slow.missed(), 8);
        let mut n = 0;
        while fast.next().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 10);
    }

    #[tokio::test]
    async fn backlog_reaches_first_subscriber_and_filters_apply() {
        let subs = Subscribers::new();
        subs.publish(&[ev("A", Value::Null), ev("B", Value::Null)]);
        let mut only_b = subs.subscribe(EventFilter::names(["B"]));
        subs.publish(&[ev("A", Value::Null), ev("B", json!(2))]);
        subs.close();
        assert_eq!(only_b.next().await.unwrap().data(), &Value::Null);
        assert_eq!(only_b.next().await.unwrap().data(), &json!(2));
        assert!(only_b.next().await.is_none());
    }

    #[tokio::test]
    async fn dropped_subscriber_is_forgotten() {
        let subs = Subscribers::new();
        let s = subs.subscribe(EventFilter::all());
        drop(s);
        subs.publish(&[ev("A", Value::Null)]);
        assert!(subs.inner.lock().unwrap().list.is_empty());
    }
}
