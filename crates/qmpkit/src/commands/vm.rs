//! The VM's run state and life cycle: status, start, pause, reset, power
//! down, quit, the actions QEMU takes on guest events, the machine type, and
//! transactions.
//!
//! ```no_run
//! # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
//! use qmpkit::commands::vm::RunState;
//! if client.status().await? == RunState::Prelaunch {
//!     client.start().await?;
//! }
//! println!("machine {}", client.machine_definition().await?);
//! # Ok(()) }
//! ```

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use qmpkit_qapi::{commands as c, types as t};

use crate::client::{CallOptions, Client, Command, Empty};
use crate::error::{Error, Result};

/// The VM's run state, as `query-status` reports it. States QEMU may add
/// later are kept in [`RunState::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RunState {
    /// Started with `-S`; the CPUs have never run.
    Prelaunch,
    /// The CPUs are running.
    Running,
    /// Stopped by `stop` (or a debugger or a migration that finished).
    Paused,
    /// The guest shut down and QEMU was told not to exit (`-no-shutdown`,
    /// or the shutdown action `pause`).
    Shutdown,
    /// Suspended to RAM by the guest.
    Suspended,
    /// Stopped on an I/O error (with `werror=stop` or `rerror=stop`).
    IoError,
    /// Stopped by the guest's watchdog (watchdog action `pause`).
    Watchdog,
    /// The guest panicked (panic action `pause`).
    GuestPanicked,
    /// Stopped on an emulation error.
    InternalError,
    /// Waiting for an incoming migration.
    Inmigrate,
    /// An outgoing migration finished and the VM is stopped.
    Postmigrate,
    /// An outgoing migration is in its final stage.
    FinishMigrate,
    /// A debugger stopped the VM.
    Debug,
    /// Loading a snapshot.
    RestoreVm,
    /// Saving a snapshot.
    SaveVm,
    /// COLO fault tolerance mode.
    Colo,
    /// A state this crate does not know; QEMU's name for it.
    Other(String),
}

impl RunState {
    /// QEMU's name for the state, for example `running`.
    pub fn as_str(&self) -> &str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
            RunState::Suspended => "suspended",
            RunState::IoError => "io-error",
            RunState::Watchdog => "watchdog",
            RunState::GuestPanicked => "guest-panicked",
            RunState::InternalError => "internal-error",
            RunState::Inmigrate => "inmigrate",
            RunState::Postmigrate => "postmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::Debug => "debug",
            RunState::RestoreVm => "restore-vm",
            RunState::SaveVm => "save-vm",
            RunState::Colo => "colo",
            RunState::Other(s) => s,
        }
    }

    /// Parses QEMU's name for a state.
    pub fn from_name(name: &str) -> RunState {
        match name {
            "prelaunch" => RunState::Prelaunch,
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "shutdown" => RunState::Shutdown,
            "suspended" => RunState::Suspended,
            "io-error" => RunState::IoError,
            "watchdog" => RunState::Watchdog,
            "guest-panicked" => RunState::GuestPanicked,
            "internal-error" => RunState::InternalError,
            "inmigrate" => RunState::Inmigrate,
            "postmigrate" => RunState::Postmigrate,
            "finish-migrate" => RunState::FinishMigrate,
            "debug" => RunState::Debug,
            "restore-vm" => RunState::RestoreVm,
            "save-vm" => RunState::SaveVm,
            "colo" => RunState::Colo,
            other => RunState::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RunState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        // A visitor rather than `String`: the known states need no allocation.
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = RunState;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a run state name")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> std::result::Result<RunState, E> {
                Ok(RunState::from_name(name))
            }
        }
        d.deserialize_str(Name)
    }
}

impl Serialize for RunState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The reply to `query-status`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct StatusInfo {
    pub(crate) status: RunState,
}

/// What QEMU does when the guest reboots (`set-action` `reboot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum RebootAction {
    /// Reset the VM (the default).
    Reset,
    /// Treat it as a shutdown (then the [`ShutdownAction`] applies).
    Shutdown,
}

/// What QEMU does when the guest shuts down (`set-action` `shutdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ShutdownAction {
    /// QEMU exits (the default).
    Poweroff,
    /// The VM stops in state `shutdown` and QEMU keeps running.
    Pause,
}

/// What QEMU does when the guest panics (`set-action` `panic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PanicAction {
    /// Stop the VM in state `guest-panicked`.
    Pause,
    /// Shut down (then the [`ShutdownAction`] applies).
    Shutdown,
    /// Only send the `GUEST_PANICKED` event (the default).
    None,
    /// QEMU exits with a failure status.
    ExitFailure,
}

/// What QEMU does when the guest's watchdog fires (`set-action` `watchdog`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum WatchdogAction {
    /// Reset the VM (the default).
    Reset,
    /// Shut down gracefully.
    Shutdown,
    /// Power off at once.
    Poweroff,
    /// Stop the VM.
    Pause,
    /// Stop the VM in state `debug`.
    Debug,
    /// Do nothing.
    None,
    /// Inject a non-maskable interrupt.
    InjectNmi,
}

/// The actions to change with [`Client::set_action`]; fields left `None`
/// keep their current setting.
///
/// ```no_run
/// # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
/// use qmpkit::commands::vm::{Actions, RebootAction, ShutdownAction};
/// // A reboot stops the VM instead of restarting it, and QEMU stays up.
/// client.set_action(&Actions {
///     reboot: Some(RebootAction::Shutdown),
///     shutdown: Some(ShutdownAction::Pause),
///     ..Actions::default()
/// }).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Actions {
    /// On a guest reboot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootAction>,
    /// On a guest shutdown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown: Option<ShutdownAction>,
    /// On a guest panic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub panic: Option<PanicAction>,
    /// When the guest's watchdog fires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<WatchdogAction>,
}

impl From<RebootAction> for t::RebootAction {
    /// The generated enum's value of the same name.
    fn from(action: RebootAction) -> Self {
        match action {
            RebootAction::Reset => t::RebootAction::Reset,
            RebootAction::Shutdown => t::RebootAction::Shutdown,
        }
    }
}

impl From<ShutdownAction> for t::ShutdownAction {
    /// The generated enum's value of the same name.
    fn from(action: ShutdownAction) -> Self {
        match action {
            ShutdownAction::Poweroff => t::ShutdownAction::Poweroff,
            ShutdownAction::Pause => t::ShutdownAction::Pause,
        }
    }
}

impl From<PanicAction> for t::PanicAction {
    /// The generated enum's value of the same name.
    fn from(action: PanicAction) -> Self {
        match action {
            PanicAction::Pause => t::PanicAction::Pause,
            PanicAction::Shutdown => t::PanicAction::Shutdown,
            PanicAction::None => t::PanicAction::None,
            PanicAction::ExitFailure => t::PanicAction::ExitFailure,
        }
    }
}

impl From<WatchdogAction> for t::WatchdogAction {
    /// The generated enum's value of the same name.
    fn from(action: WatchdogAction) -> Self {
        match action {
            WatchdogAction::Reset => t::WatchdogAction::Reset,
            WatchdogAction::Shutdown => t::WatchdogAction::Shutdown,
            WatchdogAction::Poweroff => t::WatchdogAction::Poweroff,
            WatchdogAction::Pause => t::WatchdogAction::Pause,
            WatchdogAction::Debug => t::WatchdogAction::Debug,
            WatchdogAction::None => t::WatchdogAction::None,
            WatchdogAction::InjectNmi => t::WatchdogAction::InjectNmi,
        }
    }
}

impl From<&Actions> for c::SetAction {
    /// The generated `set-action` with the same members.
    fn from(actions: &Actions) -> Self {
        c::SetAction {
            reboot: actions.reboot.map(Into::into),
            shutdown: actions.shutdown.map(Into::into),
            panic: actions.panic.map(Into::into),
            watchdog: actions.watchdog.map(Into::into),
        }
    }
}

/// One action of a [`Client::run_transaction`]: a command name QEMU allows in
/// a transaction (`block-dirty-bitmap-add`, `blockdev-snapshot`, ...) and its
/// arguments.
///
/// Loose on purpose, so that any action of any QEMU can be named; any
/// generated [`t::TransactionAction`] converts into one (`From`), with its
/// members checked by the compiler:
///
/// ```
/// use qmpkit::commands::vm::TransactionAction;
/// use qmpkit::qapi::types as t;
/// let snapshot = TransactionAction::from(t::TransactionAction::BlockdevSnapshot(
///     t::BlockdevSnapshotWrapper {
///         data: t::BlockdevSnapshot { node: "disk0".into(), overlay: "disk0-snap".into() },
///     },
/// ));
/// assert_eq!(snapshot.kind, "blockdev-snapshot");
/// assert_eq!(snapshot.data, serde_json::json!({"node": "disk0", "overlay": "disk0-snap"}));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransactionAction {
    /// The action's type (the command's name).
    #[serde(rename = "type")]
    pub kind: String,
    /// The action's arguments (a JSON object).
    pub data: Value,
}

impl TransactionAction {
    /// An action of this type with these arguments (anything that
    /// serialises to a JSON object).
    ///
    /// ```
    /// let a = qmpkit::commands::vm::TransactionAction::new(
    ///     "block-dirty-bitmap-add",
    ///     serde_json::json!({"node": "disk0", "name": "bm0"}),
    /// )?;
    /// assert_eq!(a.kind, "block-dirty-bitmap-add");
    /// # Ok::<(), qmpkit::Error>(())
    /// ```
    pub fn new(kind: impl Into<String>, data: impl Serialize) -> Result<Self> {
        let kind = kind.into();
        let data = serde_json::to_value(data)
            .map_err(|e| Error::InvalidRequest(format!("transaction action {kind}: {e}")))?;
        if !data.is_object() {
            return Err(Error::InvalidRequest(format!(
                "transaction action {kind}: arguments must be a JSON object"
            )));
        }
        Ok(TransactionAction { kind, data })
    }
}

impl From<t::TransactionAction> for TransactionAction {
    /// The loose form of a generated action: the same type and arguments.
    fn from(action: t::TransactionAction) -> Self {
        // A generated union serialises to {"type": .., "data": {..}}, which
        // cannot fail (string keys only).
        let (kind, data) = match serde_json::to_value(&action) {
            Ok(Value::Object(mut members)) => (members.remove("type"), members.remove("data")),
            Ok(_) | Err(_) => (None, None),
        };
        match (kind, data) {
            (Some(Value::String(kind)), Some(data)) if data.is_object() => TransactionAction { kind, data },
            _ => unreachable!("a generated transaction action serialises to a type and its data"),
        }
    }
}

/// The arguments of `transaction`: the generated command's `actions`, in
/// their loose form (any action of any QEMU).
#[derive(Serialize)]
struct TransactionArgs<'a> {
    actions: &'a [TransactionAction],
}

impl Client {
    /// The VM's run state (`query-status`).
    #[doc(alias = "Status")]
    #[doc(alias = "query-status")]
    pub async fn status(&self) -> Result<RunState> {
        let info: StatusInfo = self.run_as(&c::QueryStatus, CallOptions::new()).await?;
        Ok(info.status)
    }

    /// Starts or resumes the VM's CPUs (`cont`).
    #[doc(alias = "Start")]
    #[doc(alias = "cont")]
    pub async fn start(&self) -> Result<()> {
        self.run(&c::Cont).await.map(drop)
    }

    /// Stops the VM's CPUs (`stop`); [`Client::start`] resumes them.
    #[doc(alias = "Pause")]
    #[doc(alias = "stop")]
    pub async fn pause(&self) -> Result<()> {
        self.run(&c::Stop).await.map(drop)
    }

    /// Tells QEMU to exit at once (`quit`).
    ///
    /// QEMU answers and then closes the socket; a connection that closes
    /// right after the command was sent counts as success too, since that is
    /// QEMU exiting. A connection already closed before the call is an
    /// [`Error::Disconnected`].
    #[doc(alias = "Quit")]
    pub async fn quit(&self) -> Result<()> {
        if self.is_closed() {
            return Err(self.closed().await);
        }
        match self.run(&c::Quit).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_disconnected() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Presses the VM's ACPI power button (`system_powerdown`): the guest
    /// decides whether and when to shut down.
    #[doc(alias = "Powerdown")]
    #[doc(alias = "system_powerdown")]
    pub async fn powerdown(&self) -> Result<()> {
        self.run(&c::SystemPowerdown).await.map(drop)
    }

    /// Resets the VM as if its reset button were pressed (`system_reset`).
    /// QEMU sends a `RESET` event with reason `host-qmp-system-reset` (or,
    /// with the reboot action `shutdown`, a `SHUTDOWN` event).
    #[doc(alias = "Reset")]
    #[doc(alias = "system_reset")]
    pub async fn reset(&self) -> Result<()> {
        self.run(&c::SystemReset).await.map(drop)
    }

    /// Sets what QEMU does on guest reboot, shutdown, panic and watchdog
    /// expiry (`set-action`).
    #[doc(alias = "SetAction")]
    #[doc(alias = "set-action")]
    pub async fn set_action(&self, actions: &Actions) -> Result<()> {
        self.run(&c::SetAction::from(actions)).await.map(drop)
    }

    /// The name of the running machine type, such as `pc-q35-10.0` (never
    /// an alias like `q35`): the type of the QOM object `/machine` without
    /// its `-machine` suffix, as `query-machines` lists it.
    #[doc(alias = "MachineDefinition")]
    pub async fn machine_definition(&self) -> Result<String> {
        let type_name: String = self
            .run_as(&qom_get("/machine", "type"), CallOptions::new())
            .await?;
        Ok(type_name
            .strip_suffix("-machine")
            .map(str::to_owned)
            .unwrap_or(type_name))
    }

    /// Runs several actions atomically (`transaction`): either all take
    /// effect or, when one fails, none does and QEMU's error is returned.
    ///
    /// ```no_run
    /// # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
    /// use qmpkit::commands::vm::TransactionAction;
    /// use serde_json::json;
    /// client.run_transaction(&[
    ///     TransactionAction::new("block-dirty-bitmap-add", json!({"node": "disk0", "name": "a"}))?,
    ///     TransactionAction::new("block-dirty-bitmap-add", json!({"node": "disk1", "name": "a"}))?,
    /// ]).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// The same with the generated actions:
    ///
    /// ```no_run
    /// # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
    /// use qmpkit::qapi::types as t;
    /// let bitmap = |node: &str| {
    ///     t::TransactionAction::BlockDirtyBitmapAdd(t::BlockDirtyBitmapAddWrapper {
    ///         data: t::BlockDirtyBitmapAdd {
    ///             node: node.into(),
    ///             name: "a".into(),
    ///             granularity: None,
    ///             persistent: None,
    ///             disabled: None,
    ///         },
    ///     })
    ///     .into()
    /// };
    /// client.run_transaction(&[bitmap("disk0"), bitmap("disk1")]).await?;
    /// # Ok(()) }
    /// ```
    #[doc(alias = "RunTransaction")]
    #[doc(alias = "transaction")]
    pub async fn run_transaction(&self, actions: &[TransactionAction]) -> Result<()> {
        self.call::<_, Empty>(c::Transaction::NAME, &TransactionArgs { actions })
            .await
            .map(drop)
    }
}

/// `qom-get` of one property.
pub(crate) fn qom_get(path: &str, property: &str) -> c::QomGet {
    c::QomGet {
        path: path.into(),
        property: property.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn run_state_round_trips_and_keeps_unknown_names() {
        for name in [
            "prelaunch",
            "running",
            "io-error",
            "guest-panicked",
            "finish-migrate",
        ] {
            let s: RunState = serde_json::from_value(json!(name)).unwrap();
            assert!(!matches!(s, RunState::Other(_)), "{name}");
            assert_eq!(s.as_str(), name);
            assert_eq!(serde_json::to_value(&s).unwrap(), json!(name));
        }
        let s: RunState = serde_json::from_value(json!("future-state")).unwrap();
        assert_eq!(s, RunState::Other("future-state".into()));
        assert_eq!(s.to_string(), "future-state");
    }

    #[test]
    fn actions_serialise_only_what_is_set() {
        let a = Actions {
            panic: Some(PanicAction::ExitFailure),
            watchdog: Some(WatchdogAction::InjectNmi),
            ..Actions::default()
        };
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            json!({"panic": "exit-failure", "watchdog": "inject-nmi"})
        );
    }

    #[test]
    fn transaction_action_needs_an_object() {
        assert!(TransactionAction::new("x", json!([1])).is_err());
        let a = TransactionAction::new("x", json!({"a": 1})).unwrap();
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            json!({"type": "x", "data": {"a": 1}})
        );
    }
}
