//! What a monitor is told at connect time: the Go `Connect` arguments and more.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crate::connection::ConnectOptions;
use crate::error::{Error, Result};
use crate::event::Event;

use super::constants::{DEFAULT_AGENT_POLL_INTERVAL, DEFAULT_MONITOR_EVENT_QUEUE, DEFAULT_RINGBUF_READ_SIZE};
use super::Monitor;

type SyncHandler = dyn Fn(&Monitor, &Event) + Send + Sync;
type AsyncHandler = dyn Fn(Monitor, Event) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

/// The default connection options, made once: a clone shares their
/// settings (copied only when changed), where `ConnectOptions::new()` makes
/// a fresh copy that every connection made with it then keeps.
static DEFAULT_CONNECT: LazyLock<ConnectOptions> = LazyLock::new(ConnectOptions::new);

/// An event handler, in one of its two shapes.
#[derive(Clone)]
pub(crate) enum Handler {
    Sync(Arc<SyncHandler>),
    Async(Arc<AsyncHandler>),
}

/// The ejected-media callback.
pub(crate) type EjectedFn = Arc<dyn Fn(&str) + Send + Sync>;

/// How to connect a [`Monitor`]: the Go `Connect(path, serialCharDev,
/// eventHandler, logFile, detachDisk)` arguments as a builder, plus settings
/// Incus's Go package `qmp` hard-codes.
///
/// ```no_run
/// # async fn f() -> qmpkit::Result<()> {
/// use qmpkit::monitor::{Monitor, MonitorOptions};
/// let options = MonitorOptions::new()
///     .serial_chardev("qemu_serial")
///     .event_handler(|_mon, ev| println!("{ev}"))
///     .on_ejected(|id| println!("{id} ejected"))
///     .traffic_log("/var/log/vm1/qemu.qmp.log");
/// let mon = Monitor::connect("/run/vm1/qmp.sock", options).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MonitorOptions {
    pub(crate) serial_chardev: Option<String>,
    pub(crate) handler: Option<Handler>,
    pub(crate) on_ejected: Option<EjectedFn>,
    pub(crate) ringbuf_read_size: usize,
    pub(crate) agent_poll_interval: Duration,
    pub(crate) event_queue: usize,
    pub(crate) route_block_jobs: bool,
    pub(crate) agent_started: bool,
    pub(crate) connect: ConnectOptions,
}

impl std::fmt::Debug for MonitorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitorOptions")
            .field("serial_chardev", &self.serial_chardev)
            .field("handler", &self.handler.is_some())
            .field("on_ejected", &self.on_ejected.is_some())
            .field("ringbuf_read_size", &self.ringbuf_read_size)
            .field("agent_poll_interval", &self.agent_poll_interval)
            .field("event_queue", &self.event_queue)
            .field("agent_started", &self.agent_started)
            .field("connect", &self.connect)
            .finish()
    }
}

impl Default for MonitorOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl MonitorOptions {
    /// No agent detection, no handler, no callback, no log; 16 KiB ring-buffer
    /// reads every 10 s once an agent chardev is set; default [`ConnectOptions`].
    pub fn new() -> Self {
        MonitorOptions {
            serial_chardev: None,
            handler: None,
            on_ejected: None,
            ringbuf_read_size: DEFAULT_RINGBUF_READ_SIZE,
            agent_poll_interval: DEFAULT_AGENT_POLL_INTERVAL,
            event_queue: DEFAULT_MONITOR_EVENT_QUEUE,
            route_block_jobs: false,
            agent_started: false,
            connect: DEFAULT_CONNECT.clone(),
        }
    }

    /// Whether the monitor itself hands `BLOCK_JOB_COMPLETED` and
    /// `BLOCK_JOB_ERROR` events to the device's event channel (default
    /// false). Incus's Go monitor leaves that to the event handler, which
    /// calls `PushEvent` (here [`Monitor::push_event`](super::Monitor::push_event));
    /// a handler ported from Incus does the same, and with routing on would
    /// deliver each event twice. Turn it on when there is no such handler.
    pub fn route_block_job_events(mut self, route: bool) -> Self {
        self.route_block_jobs = route;
        self
    }

    /// The `ringbuf` chardev behind the guest agent's serial port; the
    /// monitor watches it for `STARTED` / `STOPPED` lines (the Go `serialCharDev`).
    pub fn serial_chardev(mut self, chardev: impl Into<String>) -> Self {
        self.serial_chardev = Some(chardev.into());
        self
    }

    /// Whether the guest agent is already running when the monitor connects
    /// (default false). A monitor knows the agent only from the `STARTED` /
    /// `STOPPED` lines it reads, and some were read by another: a guest that
    /// came over by live migration wrote its `STARTED` into the source
    /// QEMU's ring buffer, and a daemon that restarts had read it before.
    /// With `true`, [`Monitor::agent_started`](super::Monitor::agent_started)
    /// says so from the start (no `AGENT-STARTED` reaches the handler for
    /// it), and the guest's next `STOPPED` is a transition the handler
    /// hears of. Has no effect without a [serial chardev](Self::serial_chardev),
    /// nor when connect returns a monitor that was already live (use
    /// [`Monitor::set_agent_started`](super::Monitor::set_agent_started) there).
    pub fn agent_started(mut self, started: bool) -> Self {
        self.agent_started = started;
        self
    }

    /// Calls `handler` for every event, in QEMU's order, plus the monitor's
    /// own (`AGENT-STARTED`, `AGENT-STOPPED`, a synthesised `SHUTDOWN`).
    ///
    /// It runs on the monitor's event task, never on the connection's reader,
    /// so it cannot stall command replies; but events queue up behind it and
    /// it runs on a runtime thread, so it must not block: keep it short, or
    /// use [`MonitorOptions::async_event_handler`] to run QMP commands from it.
    /// A panic in it is logged and the next event is handled as usual.
    pub fn event_handler(mut self, handler: impl Fn(&Monitor, &Event) + Send + Sync + 'static) -> Self {
        self.handler = Some(Handler::Sync(Arc::new(handler)));
        self
    }

    /// Like [`MonitorOptions::event_handler`], for a handler that awaits:
    /// each returned future runs to completion before the next event is
    /// handled, so the order holds, and it may run QMP commands on the monitor
    /// it is given.
    ///
    /// ```no_run
    /// # async fn f() -> qmpkit::Result<()> {
    /// use qmpkit::monitor::{Monitor, MonitorOptions};
    /// let options = MonitorOptions::new().async_event_handler(|mon, ev| async move {
    ///     if ev.name() == "RESET" && !mon.handle_reset() {
    ///         let status: serde_json::Value = mon.call("query-status", &()).await.unwrap_or_default();
    ///         println!("guest rebooted, now {}", status["status"]);
    ///     }
    /// });
    /// let mon = Monitor::connect("/run/vm1/qmp.sock", options).await?;
    /// # Ok(()) }
    /// ```
    pub fn async_event_handler<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Monitor, Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handler = Some(Handler::Async(Arc::new(move |mon, ev| {
            Box::pin(handler(mon, ev))
        })));
        self
    }

    /// Calls `callback` with the device's id (the event's `id`, else its
    /// `device`) when a removable medium's tray opens, once per opening even
    /// when QEMU repeats the event (the Go `detachDisk`). It runs on the
    /// monitor's event task, after the event handler.
    pub fn on_ejected(mut self, callback: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_ejected = Some(Arc::new(callback));
        self
    }

    /// Appends a transcript of the traffic to this file in Incus's `qmp` package's
    /// format (see [`ConnectOptions::traffic_log`]), except the agent
    /// poller's ring-buffer reads (the Go `logFile`). No log, and no error,
    /// when the file cannot be opened (for example when its directory is missing).
    #[cfg(feature = "traffic-log")]
    pub fn traffic_log(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.connect = self.connect.traffic_log(path);
        self
    }

    /// How many bytes one read of the agent's ring buffer asks for (default
    /// 16 KiB, [`DEFAULT_RINGBUF_READ_SIZE`]; Incus's Go package `qmp` reads
    /// [`RINGBUF_SIZE`](super::constants::RINGBUF_SIZE), 16 bytes). A full
    /// read is followed by another at once, so any size drains the buffer.
    pub fn ringbuf_read_size(mut self, bytes: usize) -> Self {
        self.ringbuf_read_size = bytes;
        self
    }

    /// How often the agent's ring buffer is read when no event prompts a
    /// read: this long after the last read ended (default 10 s).
    pub fn agent_poll_interval(mut self, interval: Duration) -> Self {
        self.agent_poll_interval = interval;
        self
    }

    /// Queue length of the monitor's own event subscription (default 65536).
    /// A handler that falls this far behind misses events (logged as a warning).
    pub fn event_queue(mut self, len: usize) -> Self {
        self.event_queue = len;
        self
    }

    /// The options of the underlying connection (timeouts, size limit, oob).
    /// A traffic log set here is kept unless [`MonitorOptions::traffic_log`] follows.
    pub fn connect_options(mut self, options: ConnectOptions) -> Self {
        self.connect = options;
        self
    }

    /// Refuses settings that cannot work, before anything is connected.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.serial_chardev.as_deref() == Some("") {
            return Err(Error::InvalidRequest("the serial chardev name is empty".into()));
        }
        if self.ringbuf_read_size == 0 {
            return Err(Error::InvalidRequest(
                "the ring buffer read size must be at least 1 byte".into(),
            ));
        }
        if self.agent_poll_interval.is_zero() {
            return Err(Error::InvalidRequest(
                "the agent poll interval must not be zero".into(),
            ));
        }
        if self.event_queue == 0 {
            return Err(Error::InvalidRequest(
                "the event queue length must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
