//! Incus's `qmp` package's `Monitor`: one live, self-watching connection per VM.
//!
//! A [`Monitor`] is a [`Client`] (it derefs to one, so every command and
//! typed operation works on it) that also keeps the VM under watch:
//!
//! - **One per socket path.** [`Monitor::connect`] returns the live monitor
//!   for a path if there is one, and connects otherwise; a monitor whose
//!   connection ended is forgotten. See [`MonitorRegistry`].
//! - **Events to a handler**, in the order QEMU sent them, on a task of the
//!   monitor's own: never on the connection's reader, so a slow handler never
//!   stalls command replies and a handler may run QMP commands.
//! - **One shutdown notice.** Exactly one `SHUTDOWN` reaches the handler per
//!   VM: QEMU's own, or, when the connection drops while the monitor is
//!   [initialized](Monitor::set_initialized), one with reason
//!   [`SHUTDOWN_REASON_DISCONNECT`](constants::SHUTDOWN_REASON_DISCONNECT).
//!   As in Go, a new monitor starts initialized (a daemon that reconnects to
//!   a running VM hears of its crash without further ado), and QEMU's own
//!   `SHUTDOWN` reaching a handler clears the flag.
//! - **Ejected media.** A tray that opens calls the ejected-media callback
//!   once, even when QEMU repeats the event.
//! - **Guest agent.** With a serial chardev set, the agent's `STARTED` and
//!   `STOPPED` lines on its ring buffer become `AGENT-STARTED` and
//!   `AGENT-STOPPED` events and [`Monitor::agent_started`]. A running agent
//!   also stops, for the handler, with the guest: after a `RESET`, before a
//!   `SHUTDOWN`, and before the shutdown notice when QEMU vanishes.
//! - **Deliberate resets** ([`Monitor::reset`], [`Monitor::expect_reset`],
//!   [`Monitor::handle_reset`]) tell a handler which `RESET` it caused
//!   itself, the firmware's reset that follows it included.
//! - **Per-device event channels** for callers waiting on one device's
//!   block-job events.
//!
//! ```no_run
//! # async fn f() -> qmpkit::Result<()> {
//! use qmpkit::monitor::{constants, Monitor, MonitorOptions};
//! let options = MonitorOptions::new()
//!     .serial_chardev("qemu_serial")
//!     .event_handler(|mon, ev| match ev.name() {
//!         constants::EVENT_VM_RESET if mon.handle_reset() => {} // our own reset
//!         constants::EVENT_VM_SHUTDOWN => println!("VM gone: {}", ev.data()["reason"]),
//!         constants::EVENT_AGENT_STARTED => println!("agent up"),
//!         _ => {}
//!     });
//! let mon = Monitor::connect("/run/vm1/qmp.sock", options).await?;
//! let status: serde_json::Value = mon.call("query-status", &()).await?;
//! println!("{}", status["status"]);
//! mon.wait().await; // until QEMU is gone and the handler saw the last event
//! # Ok(()) }
//! ```
//!
//! A monitor lives until its connection ends (QEMU exits or closes the
//! socket) or [`Monitor::disconnect`] is called; dropping every handle does
//! not close it, because the registry and the monitor's own task keep it.

mod agent;
mod channels;
pub mod constants;
mod dispatch;
mod options;
mod registry;

use std::future::Future;
use std::ops::Deref;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde_json::Value;
use tokio::sync::Notify;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::event::{Event, EventFilter, Timestamp};

pub use channels::{Delivery, DeviceEvents};
pub use options::MonitorOptions;
pub use registry::MonitorRegistry;

use agent::Agent;
use channels::Channels;
use options::{EjectedFn, Handler};
use registry::Slots;

/// A shared, watched connection to one VM (Incus's `qmp` package's `Monitor`).
///
/// Cheap to clone; clones are the same monitor, and `==` tells whether two
/// handles are. It derefs to its [`Client`], so `mon.call(...)`,
/// `mon.execute(...)`, `mon.events()`, `mon.next_id()` (the Go
/// `IncreaseID`) and every typed operation are available on it.
#[derive(Clone)]
pub struct Monitor {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    initialized: AtomicBool,
    expecting_reset: AtomicBool,
    /// True while the handler has the firmware's reset that follows a
    /// deliberate one (see [`constants::FIRMWARE_RESET_WINDOW`]).
    firmware_reset: AtomicBool,
    disconnect_requested: AtomicBool,
    handler: Mutex<Option<Handler>>,
    on_ejected: Mutex<Option<EjectedFn>>,
    channels: Channels,
    /// Block-job events go to the device channels without the handler.
    route_block_jobs: bool,
    agent: Option<Agent>,
    /// True once the event task has handled the last event.
    finished: AtomicBool,
    /// Wakes [`Monitor::wait`]ers when `finished` turns true (inline, where a
    /// watch channel would be an allocation of its own).
    finished_notify: Notify,
    registry: Weak<Slots>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("client", &self.inner.client)
            .field("initialized", &self.is_initialized())
            .field("agent_started", &self.agent_started())
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl PartialEq for Monitor {
    /// True when both handles are the same monitor (and so the same connection).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for Monitor {}

impl Deref for Monitor {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.inner.client
    }
}

impl Monitor {
    /// Returns the live monitor for `path` from the process-wide registry,
    /// or connects a new one (the Go `Connect`). See [`MonitorRegistry::connect`].
    pub async fn connect(path: impl AsRef<Path>, options: MonitorOptions) -> Result<Monitor> {
        MonitorRegistry::global().connect(path, options).await
    }

    /// Waits up to `timeout` for QEMU to connect to `listener` (a VM still
    /// starting, whose monitor connects out: `-chardev
    /// socket,id=mon0,path=PATH,server=off,reconnect-ms=500 -mon
    /// chardev=mon0,mode=control`) and makes a monitor of the connection,
    /// as [`Monitor::connect`] does of one it makes. Bind the listener
    /// before starting QEMU, or let `reconnect-ms` bring QEMU in later.
    ///
    /// The monitor is not kept in the registry (it has no socket path of
    /// QEMU's to be found by): keep the handle. Nobody connecting in time
    /// fails with [`Error::AcceptTimeout`].
    ///
    /// ```no_run
    /// # async fn f() -> qmpkit::Result<()> {
    /// use std::time::Duration;
    /// use qmpkit::monitor::{Monitor, MonitorOptions};
    /// let listener = qmpkit::Listener::bind(qmpkit::Address::unix("/run/vm1/qmp.sock")).await?;
    /// // ... start QEMU, which connects to /run/vm1/qmp.sock ...
    /// let mon = Monitor::accept(&listener, Duration::from_secs(60), MonitorOptions::new()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn accept(
        listener: &crate::Listener,
        timeout: std::time::Duration,
        options: MonitorOptions,
    ) -> Result<Monitor> {
        options.validate()?;
        let client = options.connect.accept(listener, timeout).await?;
        Monitor::watch(client, &options, Weak::new()).await
    }

    /// Connects, checks the agent chardev, and starts the monitor's task.
    async fn open(path: &Path, options: &MonitorOptions, registry: Weak<Slots>) -> Result<Monitor> {
        let client = options.connect.connect(path).await?;
        Monitor::watch(client, options, registry).await
    }

    /// Checks the agent chardev and starts the monitor's task on a connection.
    async fn watch(client: Client, options: &MonitorOptions, registry: Weak<Slots>) -> Result<Monitor> {
        // Subscribed before anything else: the first subscriber also gets
        // the events that came with the handshake.
        let events = client.subscribe(EventFilter::all().capacity(options.event_queue));
        let agent = options.serial_chardev.as_ref().map(|chardev| {
            Agent::new(
                chardev.clone(),
                options.ringbuf_read_size,
                options.agent_poll_interval,
                options.agent_started,
            )
        });
        let mon = Monitor {
            inner: Arc::new(Inner {
                client,
                // As Go's Connect: losing the connection is a shutdown
                // until QEMU's own SHUTDOWN (or the caller) says otherwise.
                initialized: AtomicBool::new(true),
                expecting_reset: AtomicBool::new(false),
                firmware_reset: AtomicBool::new(false),
                disconnect_requested: AtomicBool::new(false),
                handler: Mutex::new(options.handler.clone()),
                on_ejected: Mutex::new(options.on_ejected.clone()),
                channels: Channels::default(),
                route_block_jobs: options.route_block_jobs,
                agent,
                finished: AtomicBool::new(false),
                finished_notify: Notify::new(),
                registry,
            }),
        };
        match mon.check_agent_inner().await {
            Ok(_) => {}
            // Go's Connect never looks: Incus connects its feature-probe
            // QEMU, which has no agent port, with the port's name. So the
            // monitor connects, and watches no agent rather than poll a
            // chardev that cannot answer.
            Err(e @ Error::Console(_)) => {
                crate::diag::warning!(
                    path = %mon.inner.client.path().display(),
                    error = %e,
                    "the guest agent's serial chardev is unusable; not watching the agent"
                );
                if let Some(agent) = &mon.inner.agent {
                    agent.disable();
                }
            }
            Err(e) => {
                mon.inner.disconnect_requested.store(true, Ordering::Release);
                mon.inner.client.disconnect();
                return Err(e);
            }
        }
        // One task per monitor: events, the agent poller, the shutdown notice.
        tokio::spawn(dispatch::run(mon.clone(), events));
        Ok(mon)
    }

    /// Takes over a later connect's handler, none included (Go's Connect
    /// does so: Incus connects with no handler before `quit` to silence the
    /// SHUTDOWN that follows), and its ejected-media callback if it brought one.
    fn adopt(&self, options: &MonitorOptions) {
        *self.inner.handler.lock().unwrap_or_else(|e| e.into_inner()) = options.handler.clone();
        if let Some(f) = &options.on_ejected {
            *self.inner.on_ejected.lock().unwrap_or_else(|e| e.into_inner()) = Some(f.clone());
        }
    }

    /// Alive: connected, not asked to disconnect, and its event task running.
    fn is_alive(&self) -> bool {
        !self.inner.client.is_closed() && !self.disconnect_requested() && !self.is_finished()
    }

    fn is_finished(&self) -> bool {
        self.inner.finished.load(Ordering::Acquire)
    }

    fn disconnect_requested(&self) -> bool {
        self.inner.disconnect_requested.load(Ordering::Acquire)
    }

    /// Called once by the event task as it ends.
    fn finish(&self) {
        if let Some(agent) = &self.inner.agent {
            agent.reset();
        }
        self.inner.channels.close_all();
        self.forget();
        self.inner.finished.store(true, Ordering::Release);
        self.inner.finished_notify.notify_waiters();
    }

    fn forget(&self) {
        if let Some(slots) = self.inner.registry.upgrade() {
            slots.forget(self);
        }
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Closes the connection (the Go `Disconnect`): pending commands fail,
    /// the registry forgets the monitor, device channels end, and
    /// [`Monitor::wait`] resolves once the handler has seen the last event.
    /// A disconnect you asked for is not a shutdown: no `SHUTDOWN` is synthesised.
    pub fn disconnect(&self) {
        self.inner.disconnect_requested.store(true, Ordering::Release);
        self.forget();
        self.inner.client.disconnect();
    }

    /// Resolves when the monitor is done: its connection has ended and the
    /// handler has been given every event, the final `SHUTDOWN` included (the
    /// Go `Wait`, whose channel closes on disconnection). The future does not
    /// borrow the monitor. It waits for the handler, so a handler that never
    /// returns holds it up; for the moment the socket closes, use
    /// [`Client::closed`].
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            // Made before the check: a notify_waiters between the two still reaches it.
            let notified = inner.finished_notify.notified();
            if !inner.finished.load(Ordering::Acquire) {
                notified.await;
            }
        }
    }

    /// Turns the shutdown notice on (true) or off (the Go `SetInitialized`):
    /// while it is on, losing the connection without a `SHUTDOWN` from QEMU
    /// makes the monitor hand the handler one with reason `disconnect`.
    ///
    /// A new monitor starts with it on, and QEMU's own `SHUTDOWN` turns it
    /// off when it reaches a handler, so that the handler sees one notice,
    /// not two (a `SHUTDOWN` that arrives while no handler is set leaves it
    /// as it is, as in Go). Turn it off before stopping a VM whose loss the
    /// handler should not hear of, or on again once a VM that shut down runs
    /// again.
    pub fn set_initialized(&self, initialized: bool) {
        self.inner.initialized.store(initialized, Ordering::Release);
    }

    /// Whether the shutdown notice is on (the Go `IsInitialized`): true
    /// from connect until QEMU's `SHUTDOWN` reaches a handler or
    /// [`Monitor::set_initialized`] says otherwise.
    pub fn is_initialized(&self) -> bool {
        self.inner.initialized.load(Ordering::Acquire)
    }

    /// QEMU's SHUTDOWN is about to reach the handler: as Go's event loop
    /// does, that ends the initialized state, so the connection's end is no
    /// second notice. Without a handler Go leaves the flag alone, and so do we.
    fn shutdown_reached_handler(&self) {
        let has_handler = self
            .inner
            .handler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if has_handler {
            self.set_initialized(false);
        }
    }

    /// Whether the guest agent is running, as last read from its serial ring
    /// buffer (the Go `AgenStarted`). Always false without a serial chardev
    /// or with one that was missing or no ring buffer at connect, after a
    /// `RESET` or a `SHUTDOWN`, and once the connection has ended.
    pub fn agent_started(&self) -> bool {
        self.inner.agent.as_ref().is_some_and(|a| a.started())
    }

    /// Takes the caller's word for whether the guest agent is running, for
    /// what this monitor could not read itself: after a live migration, the
    /// target's monitor never sees the `STARTED` the guest wrote into the
    /// source's ring buffer, so [`Monitor::agent_started`] says false until
    /// told (Incus keeps the agent's state in its own records, and carries
    /// it over). The handler gets no `AGENT-STARTED` or `AGENT-STOPPED` for
    /// this; from here on, lines the guest writes are transitions from this
    /// state (a `STOPPED` after `set_agent_started(true)` reaches the handler).
    ///
    /// Call it once the migration has completed and before the guest can
    /// have written again: a line read before the call was judged against
    /// the old state. At connect time, [`MonitorOptions::agent_started`]
    /// does the same.
    ///
    /// Errors: [`Error::InvalidRequest`] when the monitor watches no agent
    /// (no serial chardev, or one that was unusable at connect).
    ///
    /// ```no_run
    /// # async fn f(target: qmpkit::monitor::Monitor, source_agent_up: bool) -> qmpkit::Result<()> {
    /// // The migration completed; the source's monitor had seen the agent start.
    /// target.set_agent_started(source_agent_up)?;
    /// assert_eq!(target.agent_started(), source_agent_up);
    /// # Ok(()) }
    /// ```
    pub fn set_agent_started(&self, started: bool) -> Result<()> {
        match &self.inner.agent {
            Some(agent) if !agent.disabled() => {
                agent.set_started(started);
                Ok(())
            }
            _ => Err(Error::InvalidRequest(
                "this monitor watches no agent: no usable serial chardev at connect".into(),
            )),
        }
    }

    /// Reads the agent's ring buffer now rather than at the next poll, hands
    /// any transitions to the handler, and returns whether the agent is running.
    ///
    /// Errors: [`Error::InvalidRequest`] without a serial chardev, else those
    /// of `ringbuf-read` ([`crate::ConsoleError::NotFound`] for a chardev that does
    /// not exist, [`crate::ConsoleError::NotARingbuf`] for one of another kind).
    pub async fn check_agent(&self) -> Result<bool> {
        if self.inner.agent.is_none() {
            return Err(Error::InvalidRequest(
                "this monitor watches no agent: it was connected without a serial chardev".into(),
            ));
        }
        self.check_agent_inner().await
    }

    async fn check_agent_inner(&self) -> Result<bool> {
        match &self.inner.agent {
            Some(agent) => agent.check(&self.inner.client).await,
            None => Ok(false),
        }
    }

    /// Announces that the next `RESET` is ours (the Go `ExpectReset`), for
    /// example before a `system_reset` sent another way than [`Monitor::reset`].
    pub fn expect_reset(&self) {
        self.inner.expecting_reset.store(true, Ordering::Release);
    }

    /// True, once, if a reset was announced: call it from the handler on a
    /// `RESET` to tell a deliberate reset from a guest reboot (the Go `HandleReset`).
    ///
    /// Also true, once, while the handler has the `RESET` the firmware makes
    /// right after a deliberate one (see
    /// [`constants::FIRMWARE_RESET_WINDOW`]): that reset is part of ours, not
    /// a reboot by the guest.
    pub fn handle_reset(&self) -> bool {
        // The firmware's first, so that an announcement made meanwhile is
        // kept for the reset it announces.
        self.inner.firmware_reset.swap(false, Ordering::AcqRel)
            || self.inner.expecting_reset.swap(false, Ordering::AcqRel)
    }

    /// Resets the VM with `system_reset`, announcing it first so that the
    /// handler's [`Monitor::handle_reset`] recognises the `RESET`; the
    /// announcement is withdrawn if the command fails (the Go `Reset`).
    pub async fn reset(&self) -> Result<()> {
        self.expect_reset();
        match self.inner.client.run(&qmpkit_qapi::commands::SystemReset).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.inner.expecting_reset.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Registers a channel for one device's events (the Go
    /// `CreateEventChannel`): block-job events whose `device` is this name
    /// (for a job, its job id), and whatever [`Monitor::push_event`] sends.
    /// It holds up to [`constants::EVENT_CHANNEL_CAPACITY`] unread events and
    /// ends when the monitor does.
    ///
    /// Errors: [`Error::InvalidRequest`] for an empty name, or when the device
    /// already has a channel whose receiver is still alive.
    ///
    /// ```no_run
    /// # async fn f(mon: qmpkit::monitor::Monitor) -> qmpkit::Result<()> {
    /// let mut done = mon.create_event_channel("job0")?;
    /// // ... start a block job with job-id "job0" ...
    /// while let Some(ev) = done.recv().await {
    ///     if ev.name() == "BLOCK_JOB_COMPLETED" { break; }
    /// }
    /// mon.cleanup_event_channel("job0");
    /// # Ok(()) }
    /// ```
    pub fn create_event_channel(&self, device: &str) -> Result<DeviceEvents> {
        self.inner.channels.create(device)
    }

    /// Unregisters a device's channel (the Go `CleanupEventChannel`); its
    /// receiver ends once drained. True if there was one.
    pub fn cleanup_event_channel(&self, device: &str) -> bool {
        self.inner.channels.cleanup(device)
    }

    /// Sends an event to the channel of the device named in `data["device"]`
    /// (the Go `PushEvent`). Never waits: a full channel drops the event (see
    /// [`Delivery`]).
    ///
    /// Errors: [`Error::InvalidRequest`] when `data` has no string `device`.
    pub fn push_event(&self, event: &str, data: Value) -> Result<Delivery> {
        let Some(device) = data.get("device").and_then(Value::as_str).map(str::to_owned) else {
            return Err(Error::InvalidRequest(format!(
                "push_event({event}): the data names no device (a string \"device\" member)"
            )));
        };
        Ok(self.inner.channels.push(&device, Event::new(event, data, now())))
    }
}

/// The current time as a QMP timestamp, for the monitor's own events.
pub(crate) fn now() -> Timestamp {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: t.as_secs() as i64,
        microseconds: t.subsec_micros() as i64,
    }
}
