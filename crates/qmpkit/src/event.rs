//! Events: subscriptions with bounded queues, and typed views of common events.
//!
//! The connection's reader hands each event to every matching subscriber
//! without ever waiting: each subscriber has its own bounded queue, and one
//! that falls behind is told how many events it missed, in order, at the point
//! where it missed them. A slow subscriber therefore never stalls replies or
//! other subscribers.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::Error;
use crate::wire::EventName;
pub use crate::wire::Timestamp;
pub use qmpkit_qapi::EventData;

/// Queue length of a subscriber unless set otherwise.
pub const DEFAULT_EVENT_QUEUE: usize = 4096;

/// How many events are kept for the first subscriber when they arrive before
/// anyone has subscribed (for example right after the handshake).
const BACKLOG: usize = 1024;

/// An event from QEMU. Cheap to clone.
#[derive(Clone)]
pub struct Event(Arc<EventInner>);

struct EventInner {
    /// Static for the names the schema knows (see [`Event::from_wire`]).
    name: Cow<'static, str>,
    data: Value,
    timestamp: Timestamp,
}

impl Event {
    /// Makes an event (the connection makes them; a test or a monitor may too).
    pub fn new(name: impl Into<String>, data: Value, timestamp: Timestamp) -> Self {
        Event(Arc::new(EventInner {
            name: Cow::Owned(name.into()),
            data,
            timestamp,
        }))
    }

    /// Makes an event read from the wire: a name the schema knows costs no
    /// allocation.
    pub(crate) fn from_wire(name: EventName<'_>, data: Value, timestamp: Timestamp) -> Self {
        let name = match name {
            EventName::Known(name) => Cow::Borrowed(name),
            EventName::Other(name) => Cow::Owned(name.into_owned()),
        };
        Event(Arc::new(EventInner {
            name,
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

    /// The event typed: one of QEMU 10's events with its data decoded
    /// ([`qapi::events::Event`](crate::qapi::events::Event)), or
    /// [`Other`](crate::qapi::events::Event::Other) for an event that
    /// schema does not know (a newer QEMU's, or a monitor's own such as
    /// `AGENT-STARTED`). An error when a known event's data does not fit
    /// its type.
    ///
    /// ```no_run
    /// # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
    /// use qmpkit::qapi::events::Event as Typed;
    /// let mut events = client.events();
    /// while let Some(ev) = events.next().await {
    ///     match ev.typed() {
    ///         Ok(Typed::DeviceDeleted(d)) => println!("{:?} is gone", d.device),
    ///         Ok(Typed::Shutdown(s)) => println!("shutting down: {}", s.reason.as_str()),
    ///         Ok(other) => println!("{}", other.name()),
    ///         Err(e) => eprintln!("{ev}: {e}"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn typed(&self) -> Result<qmpkit_qapi::events::Event, serde_json::Error> {
        qmpkit_qapi::events::Event::decode(&self.0.name, &self.0.data)
    }

    /// The event's data as `T` when this is `T`'s event (`None` for any
    /// other event).
    ///
    /// ```
    /// use qmpkit::qapi::events::DeviceDeleted;
    /// let ev = qmpkit::Event::new("DEVICE_DELETED", serde_json::json!({"path": "/machine/peripheral/nic0", "device": "nic0"}), Default::default());
    /// let data = ev.data_of::<DeviceDeleted>().unwrap().unwrap();
    /// assert_eq!(data.device.as_deref(), Some("nic0"));
    /// ```
    pub fn data_of<T: EventData>(&self) -> Option<Result<T, serde_json::Error>> {
        (self.0.name == T::NAME).then(|| T::deserialize(&self.0.data))
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

/// Typed views of the events Incus's Go package `qmp` handles. Unknown events, and known
/// ones whose data does not decode, are [`KnownEvent::Other`].
///
/// These views are lenient on purpose: states and reasons are strings and
/// missing members take defaults, so a newer QEMU's new status or cause
/// still arrives as what it is (the generated enums would refuse it), and
/// the Monitor's synthesised `SHUTDOWN` (reason `disconnect`) fits. For every
/// QEMU 10 event with its exact schema types, use [`Event::typed`] or
/// [`Event::data_of`].
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
#[non_exhaustive]
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

    /// Only the events of type `T` (one of
    /// [`qapi::events`](crate::qapi::events)), by its name.
    pub fn of<T: EventData>() -> Self {
        Self::names([T::NAME])
    }

    /// Also the events of type `T`.
    pub fn and<T: EventData>(mut self) -> Self {
        if let Some(names) = &mut self.names {
            names.push(T::NAME.to_owned());
        }
        self
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
/// Each subscription has a bounded queue ([`EventFilter::capacity`]). When it
/// is full, the connection drops the event rather than wait, and the
/// subscriber is told with an [`EventItem::Missed`] note carrying the number
/// dropped. [`EventStream::recv`] delivers a note:
///
/// - in the queue, just before the next event that found room after the
///   drops, when events keep arriving;
/// - at once when the queue is empty and drops since the last queued event
///   have not been reported: a subscriber learns of drops the next time it
///   asks, even if no event follows them;
/// - first of all, for the first subscriber of a connection, when events that
///   arrived before it subscribed did not fit the connection's backlog of
///   1,024 (counting only the events its filter wants);
/// - last, once the connection has closed and the queue is drained, for
///   drops not reported yet.
///
/// Every drop is reported exactly once, and a note never comes before an
/// event that was queued ahead of the drops it counts. [`EventStream::next`],
/// [`EventStream::try_next`] and [`EventStream::blocking_next`] pass over
/// notes; [`EventStream::wait_for`] ends with [`Error::EventsMissed`] at one,
/// since the event waited for may be among those dropped.
///
/// Dropping it unsubscribes. It ends (returns `None`) when the connection
/// closes and everything queued has been read.
pub struct EventStream {
    rx: queue::Receiver,
    drops: Arc<Drops>,
}

/// What the two sides of a subscription share about dropped events.
#[derive(Default)]
struct Drops {
    /// Drops that neither a note in the queue nor the stream reported yet.
    /// Behind a lock so that the stream's "the queue is empty and these drops
    /// are unreported" is one observation, and the connection's "these drops
    /// are now in a note in the queue" one step: either side may report a
    /// drop, only one does, and never ahead of an event queued before it.
    unreported: Mutex<u64>,
    /// Every drop so far, reported or not.
    total: AtomicU64,
}

/// What the stream can hand over without waiting.
enum Now {
    Item(EventItem),
    /// Nothing queued and no drops to report; the connection is up.
    Empty,
    /// Nothing queued, nothing to report, and the connection is gone.
    Closed,
}

/// What ended [`EventStream::next_or_timer`].
pub(crate) enum Woken {
    /// The next item (`None`: the connection closed).
    Item(Option<EventItem>),
    /// The tick came first.
    Tick,
    /// The deadline came first.
    Deadline,
}

impl EventStream {
    /// The next event or missed-events note; `None` once the connection has
    /// closed and every queued event was read. Cancel-safe: nothing is lost
    /// when the future is dropped unfinished (as in `tokio::select!`).
    pub async fn recv(&mut self) -> Option<EventItem> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next item, unless the `tick` instant (if any) or the `deadline`
    /// (if any) comes first; the item wins a tie. For waits that look at
    /// QEMU's state now and then whatever the events say.
    pub(crate) async fn next_or_timer(
        &mut self,
        tick: Option<tokio::time::Instant>,
        deadline: Option<tokio::time::Instant>,
    ) -> Woken {
        let mut tick = std::pin::pin!(tick.map(tokio::time::sleep_until));
        let mut deadline = std::pin::pin!(deadline.map(tokio::time::sleep_until));
        std::future::poll_fn(|cx| {
            if let Poll::Ready(item) = self.poll_recv(cx) {
                return Poll::Ready(Woken::Item(item));
            }
            if let Some(tick) = tick.as_mut().as_pin_mut() {
                if std::future::Future::poll(tick, cx).is_ready() {
                    return Poll::Ready(Woken::Tick);
                }
            }
            if let Some(deadline) = deadline.as_mut().as_pin_mut() {
                if std::future::Future::poll(deadline, cx).is_ready() {
                    return Poll::Ready(Woken::Deadline);
                }
            }
            Poll::Pending
        })
        .await
    }

    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<EventItem>> {
        match self.take_now() {
            Now::Item(item) => return Poll::Ready(Some(item)),
            Now::Closed => return Poll::Ready(None),
            Now::Empty => {}
        }
        // Nothing to give. No drop can happen before the next event arrives
        // and wakes this poll: a drop needs a full queue, and the queue was
        // just seen empty.
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            // Closed since the look above: report drops from before the close.
            Poll::Ready(None) => match self.take_now() {
                Now::Item(item) => Poll::Ready(Some(item)),
                Now::Empty | Now::Closed => Poll::Ready(None),
            },
            Poll::Pending => Poll::Pending,
        }
    }

    /// The next queued item, or, when the queue is empty, a note of the
    /// drops no one reported yet.
    fn take_now(&mut self) -> Now {
        // A queued item is always in its place: no lock needed to take it.
        if let Ok(item) = self.rx.try_recv() {
            return Now::Item(item);
        }
        let mut unreported = lock(&self.drops.unreported);
        // Look again under the lock: the connection may have queued a note
        // (taking the unreported drops) since the look above.
        let closed = match self.rx.try_recv() {
            Ok(item) => return Now::Item(item),
            Err(queue::TryRecvError::Empty) => false,
            Err(queue::TryRecvError::Disconnected) => true,
        };
        match std::mem::take(&mut *unreported) {
            0 if closed => Now::Closed,
            0 => Now::Empty,
            n => Now::Item(EventItem::Missed(n)),
        }
    }

    /// The next event, passing over missed-events notes (counted in
    /// [`EventStream::missed`]); `None` once the connection has closed.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let EventItem::Event(e) = self.recv().await? {
                return Some(e);
            }
        }
    }

    /// The next event if one is queued now, without waiting, passing over notes.
    pub fn try_next(&mut self) -> Option<Event> {
        loop {
            match self.take_now() {
                Now::Item(EventItem::Event(e)) => return Some(e),
                Now::Item(EventItem::Missed(_)) => continue,
                Now::Empty | Now::Closed => return None,
            }
        }
    }

    /// Waits for the next event with this name, passing over others.
    ///
    /// Fails with [`Error::EventsMissed`] when a missed-events note comes
    /// first (the event may have been dropped: re-query the state instead of
    /// waiting on), and with [`Error::Disconnected`] when the connection
    /// closes first ([`Client::closed`](crate::Client::closed) says why).
    pub async fn wait_for(&mut self, name: &str) -> Result<Event, Error> {
        loop {
            match self.recv().await {
                Some(EventItem::Event(e)) if e.name() == name => return Ok(e),
                Some(EventItem::Event(_)) => {}
                Some(EventItem::Missed(count)) => {
                    return Err(Error::EventsMissed {
                        event: name.to_owned(),
                        count,
                    })
                }
                None => return Err(Error::Disconnected { reason: None }),
            }
        }
    }

    /// Waits for the next event of type `T`, passing over others, and
    /// decodes its data. Fails as [`EventStream::wait_for`] does, and with
    /// [`Error::Protocol`] when the event's data does not fit `T`.
    ///
    /// ```no_run
    /// # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
    /// use qmpkit::qapi::events::BlockJobCompleted;
    /// use qmpkit::EventFilter;
    /// let mut jobs = client.subscribe(EventFilter::of::<BlockJobCompleted>());
    /// // ... start a job ...
    /// let done = jobs.wait_for_data::<BlockJobCompleted>().await?;
    /// println!("{} wrote {} bytes", done.device, done.offset);
    /// # Ok(()) }
    /// ```
    pub async fn wait_for_data<T: EventData>(&mut self) -> Result<T, Error> {
        let ev = self.wait_for(T::NAME).await?;
        T::deserialize(ev.data()).map_err(|e| {
            Error::Protocol(format!(
                "the data of event {} does not decode: {e} (data: {})",
                T::NAME,
                ev.data()
            ))
        })
    }

    /// How many events this subscriber has missed so far because it fell
    /// behind, including drops not reported by a note yet.
    pub fn missed(&self) -> u64 {
        self.drops.total.load(Ordering::Acquire)
    }

    /// Blocking version of [`EventStream::next`], for the blocking facade.
    /// Must not be called from inside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        loop {
            let item = match self.take_now() {
                Now::Item(item) => item,
                Now::Closed => return None,
                // None: closed meanwhile; look again for drops before the close.
                Now::Empty => match self.rx.blocking_recv() {
                    Some(item) => item,
                    None => continue,
                },
            };
            if let EventItem::Event(e) = item {
                return Some(e);
            }
        }
    }
}

/// Locks a mutex, going on after a panic elsewhere (the counts stay usable).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The connection's side of one subscription.
struct Subscriber {
    tx: queue::Sender,
    filter: EventFilter,
    drops: Arc<Drops>,
    /// Set when this side may have left drops unreported. Until it finds them
    /// reported, offers go through the lock; otherwise they need none.
    behind: bool,
}

impl Subscriber {
    /// Hands over events in order without waiting, as [`Subscriber::offer`]
    /// does one by one. False when the subscriber is gone.
    fn offer_all(&mut self, events: &[Event]) -> bool {
        let mut rest = events;
        while !rest.is_empty() {
            if !self.behind {
                // While nothing is unreported, the events that fit go in
                // under one lock, with one wake-up.
                match self.tx.try_send_all(rest, &self.filter) {
                    Ok(taken) => rest = &rest[taken..],
                    Err(queue::Closed) => return false,
                }
            }
            // Full, or drops to report: one at a time.
            let Some((first, after)) = rest.split_first() else {
                break;
            };
            if !self.offer(first) {
                return false;
            }
            rest = after;
        }
        true
    }

    /// Hands over an event without waiting. False when the subscriber is gone.
    fn offer(&mut self, ev: &Event) -> bool {
        use queue::TrySendError;
        if !self.filter.matches(ev.name()) {
            return !self.tx.is_closed();
        }
        let mut item = EventItem::Event(ev.clone());
        if !self.behind {
            match self.tx.try_send(item) {
                Ok(()) => return true,
                Err(TrySendError::Closed) => return false,
                // Full a moment ago; the stream may have read since, so the
                // drop is decided under the lock (see Drops::unreported).
                Err(TrySendError::Full(back)) => item = back,
            }
        }
        let mut unreported = lock(&self.drops.unreported);
        if *unreported > 0 {
            match self.tx.try_send(EventItem::Missed(*unreported)) {
                Ok(()) => *unreported = 0,
                Err(TrySendError::Full(_)) => {
                    *unreported += 1;
                    self.drops.total.fetch_add(1, Ordering::Release);
                    self.behind = true;
                    return true;
                }
                Err(TrySendError::Closed) => return false,
            }
        }
        match self.tx.try_send(item) {
            Ok(()) => {
                // Nothing is unreported now, and only this side adds to it.
                self.behind = false;
                true
            }
            Err(TrySendError::Full(_)) => {
                *unreported += 1;
                self.drops.total.fetch_add(1, Ordering::Release);
                self.behind = true;
                true
            }
            Err(TrySendError::Closed) => false,
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
    /// subscription, from when on events nobody wants are dropped. Boxed:
    /// it lives only until then, and inline it would stay in every connection.
    backlog: Option<Box<Backlog>>,
    closed: bool,
}

/// How many distinct names of events pushed out of the backlog are counted
/// one by one (QEMU has about a hundred events; a server inventing names
/// must not grow this without bound).
const LOST_NAMES: usize = 256;

/// The events kept for the first subscriber, and a count of those that did
/// not fit.
#[derive(Default)]
struct Backlog {
    events: VecDeque<Event>,
    /// Events pushed out for lack of room, by name, so that the first
    /// subscriber is told how many of the events its filter wants it lost.
    lost: rustc_hash::FxHashMap<Box<str>, u64>,
    /// Events pushed out whose names were past [`LOST_NAMES`]: counted
    /// against every filter, since their names are not known any more.
    lost_unnamed: u64,
}

impl Backlog {
    fn push(&mut self, ev: &Event) {
        if self.events.len() == BACKLOG {
            if let Some(old) = self.events.pop_front() {
                self.count_lost(old.name());
            }
        }
        self.events.push_back(ev.clone());
    }

    fn count_lost(&mut self, name: &str) {
        if let Some(n) = self.lost.get_mut(name) {
            *n += 1;
        } else if self.lost.len() < LOST_NAMES {
            self.lost.insert(name.into(), 1);
        } else {
            self.lost_unnamed += 1;
        }
    }

    /// How many of the lost events `filter` wants.
    fn lost_for(&self, filter: &EventFilter) -> u64 {
        let named: u64 = self
            .lost
            .iter()
            .filter(|(name, _)| filter.matches(name))
            .map(|(_, n)| n)
            .sum();
        named + self.lost_unnamed
    }
}

impl Subscribers {
    pub(crate) fn new() -> Self {
        Subscribers {
            inner: Mutex::new(SubscribersInner {
                list: Vec::new(),
                backlog: Some(Box::default()),
                closed: false,
            }),
        }
    }

    /// Adds a subscription. The first one also receives the events that
    /// arrived before it (up to its capacity), after a note of those that did
    /// not fit the backlog.
    pub(crate) fn subscribe(&self, filter: EventFilter) -> EventStream {
        let capacity = filter.capacity.unwrap_or(DEFAULT_EVENT_QUEUE);
        let (tx, rx) = queue::channel(capacity);
        let drops = Arc::new(Drops::default());
        let mut sub = Subscriber {
            tx,
            filter,
            drops: drops.clone(),
            behind: false,
        };
        let mut inner = lock(&self.inner);
        if let Some(backlog) = inner.backlog.take() {
            let lost = backlog.lost_for(&sub.filter);
            if lost > 0 {
                // They came before the kept events: as unreported drops, the
                // first offer below puts their note ahead of it (or, if none
                // matches, the stream reports them when it finds the queue empty).
                *lock(&drops.unreported) = lost;
                drops.total.store(lost, Ordering::Release);
                sub.behind = true;
            }
            for ev in &backlog.events {
                sub.offer(ev);
            }
        }
        if !inner.closed {
            // Room for exactly one at first: most connections have one
            // subscriber (a Monitor's), and a `Vec`'s first growth would
            // make room for four (~200 bytes more in every connection).
            if inner.list.capacity() == 0 {
                inner.list.reserve_exact(1);
            }
            inner.list.push(sub);
        }
        EventStream { rx, drops }
    }

    /// Hands events to every matching subscriber, in order, without waiting.
    pub(crate) fn publish(&self, events: &[Event]) {
        let mut inner = lock(&self.inner);
        if let Some(backlog) = inner.backlog.as_mut() {
            for ev in events {
                backlog.push(ev);
            }
            return;
        }
        // Subscriber by subscriber: each one's queue gets the events in
        // order, which is all a subscriber can see of the order.
        inner.list.retain_mut(|s| s.offer_all(events));
    }

    /// Ends every subscription (their streams return `None` once drained).
    pub(crate) fn close(&self) {
        let mut inner = lock(&self.inner);
        inner.closed = true;
        inner.list.clear();
    }
}

/// A subscription's bounded queue. Unlike tokio's bounded channel, which
/// allocates a block of slots and a padded header for every subscription,
/// it holds nothing until an event is queued: most subscriptions (a
/// Monitor's, a wait's) are idle most of the time, and a process may hold
/// tens of thousands of them.
mod queue {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};

    use super::{lock, Event, EventFilter, EventItem};

    struct Shared {
        state: Mutex<State>,
        capacity: usize,
    }

    #[derive(Default)]
    struct State {
        items: VecDeque<EventItem>,
        /// The receiver's waker, while it waits.
        waker: Option<Waker>,
        sender_gone: bool,
        receiver_gone: bool,
    }

    /// Why [`Sender::try_send`] did not queue the item (a full queue gives it back).
    pub(super) enum TrySendError {
        Full(EventItem),
        Closed,
    }

    /// The receiver is gone.
    pub(super) struct Closed;

    /// Why [`Receiver::try_recv`] gave nothing.
    pub(super) enum TryRecvError {
        Empty,
        Disconnected,
    }

    /// The connection's end.
    pub(super) struct Sender(Arc<Shared>);

    /// The subscriber's end.
    pub(super) struct Receiver(Arc<Shared>);

    /// A queue of at most `capacity` items.
    pub(super) fn channel(capacity: usize) -> (Sender, Receiver) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            capacity: capacity.max(1),
        });
        (Sender(shared.clone()), Receiver(shared))
    }

    impl Sender {
        /// Queues, in order, the events at the front of `events` that
        /// `filter` wants, as long as there is room, passing over the ones
        /// it does not want; how many of `events` it went through (it stops
        /// at the first wanted event with no room).
        pub(super) fn try_send_all(&self, events: &[Event], filter: &EventFilter) -> Result<usize, Closed> {
            let mut state = lock(&self.0.state);
            if state.receiver_gone {
                return Err(Closed);
            }
            let (mut taken, mut queued) = (0, false);
            for ev in events {
                if filter.matches(ev.name()) {
                    if state.items.len() >= self.0.capacity {
                        break;
                    }
                    state.items.push_back(EventItem::Event(ev.clone()));
                    queued = true;
                }
                taken += 1;
            }
            // As try_send, a wake-up only for something queued.
            let waker = if queued { state.waker.take() } else { None };
            drop(state);
            if let Some(w) = waker {
                w.wake();
            }
            Ok(taken)
        }

        pub(super) fn try_send(&self, item: EventItem) -> Result<(), TrySendError> {
            let mut state = lock(&self.0.state);
            if state.receiver_gone {
                return Err(TrySendError::Closed);
            }
            if state.items.len() >= self.0.capacity {
                return Err(TrySendError::Full(item));
            }
            state.items.push_back(item);
            let waker = state.waker.take();
            drop(state);
            if let Some(w) = waker {
                w.wake();
            }
            Ok(())
        }

        pub(super) fn is_closed(&self) -> bool {
            lock(&self.0.state).receiver_gone
        }
    }

    impl Drop for Sender {
        fn drop(&mut self) {
            let mut state = lock(&self.0.state);
            state.sender_gone = true;
            let waker = state.waker.take();
            drop(state);
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    impl Receiver {
        pub(super) fn try_recv(&mut self) -> Result<EventItem, TryRecvError> {
            let mut state = lock(&self.0.state);
            match state.items.pop_front() {
                Some(item) => Ok(item),
                None if state.sender_gone => Err(TryRecvError::Disconnected),
                None => Err(TryRecvError::Empty),
            }
        }

        /// The next item; `None` once the sender is gone and the queue empty.
        pub(super) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<EventItem>> {
            let mut state = lock(&self.0.state);
            if let Some(item) = state.items.pop_front() {
                return Poll::Ready(Some(item));
            }
            if state.sender_gone {
                return Poll::Ready(None);
            }
            match &mut state.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        }
    }

    impl Receiver {
        /// [`Receiver::poll_recv`], parking this thread until it is ready.
        pub(super) fn blocking_recv(&mut self) -> Option<EventItem> {
            struct Unpark(std::thread::Thread);
            impl std::task::Wake for Unpark {
                fn wake(self: Arc<Self>) {
                    self.0.unpark();
                }
            }
            let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
            let mut cx = Context::from_waker(&waker);
            loop {
                if let Poll::Ready(item) = self.poll_recv(&mut cx) {
                    return item;
                }
                std::thread::park();
            }
        }
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            let mut state = lock(&self.0.state);
            state.receiver_gone = true;
            // What was queued goes now, not when the connection next looks.
            state.items = VecDeque::new();
        }
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

    /// Polls `fut` once: `Some` with its output if it is ready at once.
    fn now<T>(fut: impl std::future::Future<Output = T>) -> Option<T> {
        let mut fut = std::pin::pin!(fut);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    /// An item as text, for comparing a run of them.
    fn show(item: EventItem) -> String {
        match item {
            EventItem::Event(e) => format!("{} {}", e.name(), e.data()),
            EventItem::Missed(n) => format!("missed {n}"),
        }
    }

    /// Every item ready now, as text.
    fn ready_now(s: &mut EventStream) -> Vec<String> {
        std::iter::from_fn(|| now(s.recv()).flatten()).map(show).collect()
    }

    fn numbered(name: &str, range: std::ops::Range<u64>) -> Vec<Event> {
        range.map(|i| ev(name, json!(i))).collect()
    }

    #[test]
    fn first_subscriber_is_told_how_much_of_the_backlog_it_lost() {
        let subs = Subscribers::new();
        subs.publish(&numbered("E", 0..5000));
        let mut s = subs.subscribe(EventFilter::all());
        let got = ready_now(&mut s);
        // The lost events came first, so their note does too.
        assert_eq!(got[0], "missed 3976");
        assert_eq!(got[1], "E 3976");
        assert_eq!(got.len(), 1 + 1024);
        assert_eq!(got[1024], "E 4999");
        assert_eq!(s.missed(), 3976);
    }

    #[test]
    fn backlog_losses_count_only_what_the_filter_wants() {
        let subs = Subscribers::new();
        let events: Vec<Event> = (0..2000u64)
            .map(|i| ev(if i % 2 == 0 { "A" } else { "B" }, json!(i)))
            .collect();
        subs.publish(&events);
        let mut only_b = subs.subscribe(EventFilter::names(["B"]));
        let got = ready_now(&mut only_b);
        // 976 lost, half of them B; the 1,024 kept hold 512 B.
        assert_eq!(got[0], "missed 488");
        assert_eq!(got[1], "B 977");
        assert_eq!(got.len(), 1 + 512);
        assert_eq!(only_b.missed(), 488);
    }

    #[test]
    fn a_small_first_subscriber_hears_of_the_lost_backlog_then_of_its_own_overflow() {
        let subs = Subscribers::new();
        subs.publish(&numbered("E", 0..5000));
        let mut s = subs.subscribe(EventFilter::all().capacity(10));
        let got = ready_now(&mut s);
        let mut want = vec!["missed 3976".to_owned()];
        want.extend((3976..3985).map(|i| format!("E {i}")));
        want.push("missed 1015".into());
        assert_eq!(got, want);
        assert_eq!(s.missed(), 5000 - 9);
    }

    #[test]
    fn drops_after_the_last_queued_event_are_reported_once_the_queue_is_empty() {
        let subs = Subscribers::new();
        let mut s = subs.subscribe(EventFilter::all().capacity(10));
        let mut burst = numbered("TICK", 0..99);
        burst.push(ev("BLOCK_JOB_COMPLETED", json!({"device": "j"})));
        subs.publish(&burst);
        // The connection stays open: nothing else will arrive.
        let got = ready_now(&mut s);
        let mut want: Vec<String> = (0..10).map(|i| format!("TICK {i}")).collect();
        want.push("missed 90".into());
        assert_eq!(got, want);
        assert_eq!(s.missed(), 90);
        // Reported once: nothing more to say until something arrives, and
        // the next event comes without another note.
        assert!(now(s.recv()).is_none());
        subs.publish(&[ev("STOP", Value::Null)]);
        assert_eq!(ready_now(&mut s), ["STOP null"]);
        assert_eq!(s.missed(), 90);
    }

    #[test]
    fn each_drop_is_reported_once_in_the_queue_or_at_its_end() {
        let subs = Subscribers::new();
        let mut s = subs.subscribe(EventFilter::all().capacity(2));
        subs.publish(&numbered("E", 0..10));
        assert_eq!(show(now(s.recv()).flatten().unwrap()), "E 0");
        // Room for the note of the 8 dropped, not for the event after it.
        subs.publish(&numbered("E", 10..11));
        assert_eq!(ready_now(&mut s), ["E 1", "missed 8", "missed 1"]);
        subs.publish(&numbered("E", 11..12));
        subs.close();
        assert_eq!(ready_now(&mut s), ["E 11"]);
        assert_eq!(s.missed(), 9);
    }

    #[test]
    fn try_next_passes_over_notes_and_counts_them() {
        let subs = Subscribers::new();
        let mut s = subs.subscribe(EventFilter::all().capacity(2));
        subs.publish(&numbered("E", 0..5));
        assert_eq!(s.try_next().unwrap().data(), &json!(0));
        assert_eq!(s.try_next().unwrap().data(), &json!(1));
        assert!(s.try_next().is_none());
        assert_eq!(s.missed(), 3);
        // The drops were taken in by try_next: recv has nothing to report.
        assert!(now(s.recv()).is_none());
    }

    #[test]
    fn wait_for_ends_with_events_missed_when_its_event_may_be_dropped() {
        let subs = Subscribers::new();
        let mut s = subs.subscribe(EventFilter::all().capacity(10));
        let mut burst = numbered("TICK", 0..99);
        burst.push(ev("BLOCK_JOB_COMPLETED", json!({"device": "j"})));
        subs.publish(&burst);
        let err = now(s.wait_for("BLOCK_JOB_COMPLETED"))
            .expect("wait_for hung on a dropped event")
            .unwrap_err();
        assert!(err.is_events_missed(), "{err:?}");
        assert!(matches!(&err, Error::EventsMissed { event, count: 90 } if event == "BLOCK_JOB_COMPLETED"));
        assert_eq!(
            err.to_string(),
            "missed 90 event(s) while waiting for event BLOCK_JOB_COMPLETED; it may have been among them"
        );
        // The stream goes on: a later event is found as usual.
        subs.publish(&[ev("BLOCK_JOB_COMPLETED", json!({"device": "k"}))]);
        let e = now(s.wait_for("BLOCK_JOB_COMPLETED")).unwrap().unwrap();
        assert_eq!(e.data(), &json!({"device": "k"}));
    }

    #[test]
    fn wait_for_passes_over_other_events_and_fails_when_the_connection_closes() {
        let subs = Subscribers::new();
        let mut s = subs.subscribe(EventFilter::all());
        subs.publish(&[ev("STOP", Value::Null), ev("RESUME", Value::Null)]);
        assert_eq!(now(s.wait_for("RESUME")).unwrap().unwrap().name(), "RESUME");
        assert!(now(s.wait_for("RESUME")).is_none());
        subs.publish(&[ev("STOP", Value::Null)]);
        subs.close();
        let err = now(s.wait_for("RESUME")).unwrap().unwrap_err();
        assert!(err.is_disconnected(), "{err:?}");
    }

    #[test]
    fn blocking_next_passes_over_notes_including_the_last_one() {
        let subs = Subscribers::new();
        let mut s = subs.subscribe(EventFilter::all().capacity(2));
        subs.publish(&numbered("E", 0..5));
        assert_eq!(s.blocking_next().unwrap().data(), &json!(0));
        assert_eq!(s.blocking_next().unwrap().data(), &json!(1));
        subs.publish(&numbered("E", 5..6));
        subs.close();
        assert_eq!(s.blocking_next().unwrap().data(), &json!(5));
        assert!(s.blocking_next().is_none());
        assert_eq!(s.missed(), 3);
    }

    /// The connection publishes from one thread while the subscriber reads on
    /// another, so that notes are queued by the one and reported by the other
    /// in every interleaving: the notes between two delivered events always
    /// add up to exactly the events missing between them.
    #[test]
    fn notes_count_every_gap_exactly_while_both_sides_race() {
        const N: u64 = 200_000;
        let subs = Arc::new(Subscribers::new());
        let mut s = subs.subscribe(EventFilter::all().capacity(4));
        let publisher = std::thread::spawn({
            let subs = subs.clone();
            move || {
                let mut i = 0;
                let mut size = 1;
                while i < N {
                    let end = (i + size).min(N);
                    subs.publish(&numbered("E", i..end));
                    i = end;
                    size = size % 7 + 1;
                }
                subs.close();
            }
        });
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (mut next, mut noted, mut notes) = (0, 0, 0);
        rt.block_on(async {
            while let Some(item) = s.recv().await {
                match item {
                    EventItem::Missed(n) => {
                        assert!(n > 0);
                        noted += n;
                        notes += n;
                    }
                    EventItem::Event(e) => {
                        let i = e.data().as_u64().unwrap();
                        assert_eq!(
                            i,
                            next + noted,
                            "notes before event {i} count {noted}, not the gap"
                        );
                        next = i + 1;
                        noted = 0;
                    }
                }
            }
        });
        publisher.join().unwrap();
        assert_eq!(next + noted, N);
        assert_eq!(s.missed(), notes);
    }

    /// Publishing events in one batch gives every subscriber what
    /// publishing them one at a time gives, notes included, whatever the
    /// filters, queue lengths and reads in between.
    #[test]
    fn a_batch_is_delivered_as_its_events_one_by_one() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            let filters: Vec<EventFilter> = (0..3)
                .map(|_| {
                    let f = match rng.u8(..3) {
                        0 => EventFilter::all(),
                        1 => EventFilter::names(["B"]),
                        _ => EventFilter::names(["A", "C"]),
                    };
                    f.capacity(rng.usize(1..6))
                })
                .collect();
            let (batched, single) = (Subscribers::new(), Subscribers::new());
            let mut streams: Vec<(EventStream, EventStream)> = filters
                .iter()
                .map(|f| (batched.subscribe(f.clone()), single.subscribe(f.clone())))
                .collect();
            let mut n = 0;
            for round in 0..6 {
                let burst: Vec<Event> = (0..rng.usize(0..12))
                    .map(|_| {
                        n += 1;
                        ev(["A", "B", "C"][rng.usize(..3)], json!(n))
                    })
                    .collect();
                batched.publish(&burst);
                for e in &burst {
                    single.publish(std::slice::from_ref(e));
                }
                if round == 4 {
                    // A subscriber gone in the middle.
                    streams.remove(0);
                }
                for (b, s) in &mut streams {
                    // Read some, so that later bursts find room again.
                    for _ in 0..rng.usize(0..4) {
                        let (x, y) = (now(b.recv()).flatten(), now(s.recv()).flatten());
                        assert_eq!(x.map(show), y.map(show));
                    }
                }
            }
            batched.close();
            single.close();
            for (b, s) in &mut streams {
                assert_eq!(ready_now(b), ready_now(s));
                assert_eq!(b.missed(), s.missed());
            }
        }
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
