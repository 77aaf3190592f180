//! One monitor per socket path: connect or reuse.
//!
//! The map is behind a plain mutex that is never held across an await: a
//! connect to a frozen VM waits only on its own socket, never on the map, so
//! it cannot hold up connects to other VMs. Concurrent connects to one path
//! share one attempt (QEMU serves one client per socket, so a second
//! connection would only wait for a greeting that never comes). The attempt
//! runs in a task of its own, so a caller that gives up does not abandon the
//! others.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use tokio::sync::watch;

use crate::error::Result;

use super::options::MonitorOptions;
use super::Monitor;

/// The process-wide registry behind [`Monitor::connect`].
static DEFAULT: LazyLock<MonitorRegistry> = LazyLock::new(MonitorRegistry::new);

/// The outcome of a connect attempt, once there is one.
type Outcome = Option<Result<Monitor>>;

enum Slot {
    Live(Monitor),
    Connecting(watch::Receiver<Outcome>),
}

#[derive(Default)]
pub(crate) struct Slots {
    map: Mutex<HashMap<PathBuf, Slot>>,
}

impl Slots {
    fn lock(&self) -> MutexGuard<'_, HashMap<PathBuf, Slot>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets `mon` if it is still the monitor registered for its path.
    pub(crate) fn forget(&self, mon: &Monitor) {
        let mut map = self.lock();
        if matches!(map.get(mon.path()), Some(Slot::Live(m)) if m == mon) {
            map.remove(mon.path());
        }
    }
}

/// A set of monitors, at most one per socket path.
///
/// [`Monitor::connect`] uses a process-wide one ([`MonitorRegistry::global`]);
/// a registry of your own keeps a test's monitors apart from everyone else's.
///
/// ```no_run
/// # async fn f() -> qmpkit::Result<()> {
/// use qmpkit::monitor::{MonitorOptions, MonitorRegistry};
/// let registry = MonitorRegistry::new();
/// let a = registry.connect("/run/vm1/qmp.sock", MonitorOptions::new()).await?;
/// let b = registry.connect("/run/vm1/qmp.sock", MonitorOptions::new()).await?;
/// assert!(a == b); // one connection, shared
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct MonitorRegistry {
    slots: Arc<Slots>,
}

impl std::fmt::Debug for MonitorRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitorRegistry")
            .field("live", &self.len())
            .finish()
    }
}

impl MonitorRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide registry that [`Monitor::connect`] uses.
    pub fn global() -> &'static MonitorRegistry {
        &DEFAULT
    }

    /// Returns the live monitor for `path`, or connects a new one (the Go `Connect`).
    ///
    /// A live monitor is returned as it is, except that its event handler
    /// becomes the one in `options`, or none if `options` has none, as in Go:
    /// connecting with no handler before a deliberate `quit` silences the
    /// `SHUTDOWN` that follows. An ejected-media callback in `options`
    /// replaces the current one; the other options only apply to a new
    /// connection. A new monitor starts
    /// [initialized](super::Monitor::set_initialized). A monitor whose
    /// connection ended is forgotten, and a new one is made. Concurrent
    /// connects to one path share one attempt and its outcome.
    ///
    /// Errors: invalid options ([`Error::InvalidRequest`](crate::Error::InvalidRequest)),
    /// connection and handshake failures, and those of the first read of the
    /// agent's ring buffer other than its absence: a serial chardev that is
    /// missing or not a ring buffer is logged as a warning and the monitor
    /// connects without watching the agent, as Go's does.
    pub async fn connect(&self, path: impl AsRef<Path>, options: MonitorOptions) -> Result<Monitor> {
        options.validate()?;
        let path = path.as_ref();
        loop {
            let (mut outcome, ours) = {
                let mut map = self.slots.lock();
                match map.get(path) {
                    Some(Slot::Live(m)) if m.is_alive() => {
                        m.adopt(&options);
                        return Ok(m.clone());
                    }
                    // An attempt whose task is gone (a panic, a runtime shut
                    // down) left no outcome: start over.
                    Some(Slot::Connecting(rx)) if rx.has_changed().is_ok() => (rx.clone(), false),
                    _ => {
                        let (tx, rx) = watch::channel(None);
                        map.insert(path.to_owned(), Slot::Connecting(rx.clone()));
                        tokio::spawn(attempt(
                            Arc::downgrade(&self.slots),
                            path.to_owned(),
                            options.clone(),
                            tx,
                        ));
                        (rx, true)
                    }
                }
            };
            let result = match outcome.wait_for(Option::is_some).await {
                Ok(done) => done.clone().expect("waited for an outcome"),
                Err(_) => continue,
            };
            if let (Ok(m), false) = (&result, ours) {
                m.adopt(&options);
            }
            return result;
        }
    }

    /// The live monitor for `path`, if there is one.
    pub fn get(&self, path: impl AsRef<Path>) -> Option<Monitor> {
        match self.slots.lock().get(path.as_ref()) {
            Some(Slot::Live(m)) if m.is_alive() => Some(m.clone()),
            _ => None,
        }
    }

    /// How many live monitors the registry holds.
    pub fn len(&self) -> usize {
        self.slots
            .lock()
            .values()
            .filter(|s| matches!(s, Slot::Live(m) if m.is_alive()))
            .count()
    }

    /// True when the registry holds no live monitor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Connects one monitor and publishes the outcome to everyone waiting for it.
async fn attempt(slots: Weak<Slots>, path: PathBuf, options: MonitorOptions, tx: watch::Sender<Outcome>) {
    let result = Monitor::open(&path, &options, slots.clone()).await;
    if let Some(slots) = slots.upgrade() {
        let mut map = slots.lock();
        match &result {
            // It may have died already; then its own end has found the slot
            // still connecting, and the next connect sees it dead.
            Ok(m) => {
                map.insert(path, Slot::Live(m.clone()));
            }
            Err(_) => {
                map.remove(&path);
            }
        }
    }
    tx.send_replace(Some(result));
}
