//! The error type: QEMU's own error replies kept apart from transport failures.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to QEMU.
///
/// QEMU's own error replies are [`Error::Qmp`]; everything else is about the
/// transport or the protocol. Use the predicates ([`Error::is_not_found`],
/// [`Error::is_timeout`], [`Error::is_disconnected`], ...) rather than
/// matching on message text.
///
/// Errors are cheap to clone, so one failure can be handed to every caller it
/// affects (for example all commands in flight when QEMU dies).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// QEMU answered the command with an error reply.
    #[error("{0}")]
    Qmp(#[from] QmpError),

    /// The socket could not be reached.
    #[error("cannot connect to socket {}: {source}", path.display())]
    Connect {
        /// The socket path that was tried.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: Arc<io::Error>,
    },

    /// The server accepted the connection but did not complete the QMP
    /// handshake (greeting, `qmp_capabilities`) within the handshake
    /// budget: another client holds QEMU's monitor (QEMU serves one at a
    /// time per socket), QEMU is frozen, or the peer is not a QMP server.
    #[error("no complete QMP handshake from {peer} within {} (is it a QMP server? is another client connected, or is QEMU frozen?)", fmt_duration(*budget))]
    HandshakeTimeout {
        /// The peer, as `unix:PATH` or `tcp:HOST:PORT`, or which stream given.
        peer: String,
        /// The handshake budget that ran out.
        budget: Duration,
    },

    /// A TCP address could not be reached: nobody listens on the port
    /// (`ConnectionRefused`), no route to the host (`HostUnreachable`,
    /// `NetworkUnreachable`), and the like; the source's kind tells which.
    #[error("cannot connect to QMP at tcp:{address}: {source}")]
    ConnectTcp {
        /// The address that was tried, `HOST:PORT`.
        address: String,
        /// Why it failed (for a name with several addresses, the last one's error).
        #[source]
        source: Arc<io::Error>,
    },

    /// The host name of a TCP address did not resolve (or resolved to no address).
    #[error("cannot resolve the host of tcp:{address}: {source}")]
    Resolve {
        /// The address whose host was looked up, `HOST:PORT`.
        address: String,
        /// The resolver's error.
        #[source]
        source: Arc<io::Error>,
    },

    /// Text given as an address is not one (see [`Address`](crate::Address)).
    #[error("invalid QMP address {address:?}: {reason}")]
    InvalidAddress {
        /// The text.
        address: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A call passed file descriptors over a connection that cannot carry
    /// them (TCP, or a stream given to
    /// [`ConnectOptions::connect_io`](crate::ConnectOptions::connect_io)):
    /// only a Unix socket can. Nothing was sent; the connection is still usable.
    #[error("{command}: cannot pass file descriptors over {transport}; only a Unix socket connection can")]
    FdPassingUnsupported {
        /// The command that was refused.
        command: String,
        /// The kind of connection, in words (`"TCP"`, `"a byte stream"`).
        transport: &'static str,
    },

    /// A [`Listener`](crate::Listener) could not be set up.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// Where it tried to listen (`unix:PATH` or `tcp:HOST:PORT`).
        address: String,
        /// Why it failed.
        #[source]
        source: Arc<io::Error>,
    },

    /// Nobody connected to a [`Listener`](crate::Listener) within its deadline.
    #[error("no QMP server connected to {address} within {}", fmt_duration(*waited))]
    AcceptTimeout {
        /// The address waited on (`unix:PATH` or `tcp:HOST:PORT`).
        address: String,
        /// How long it waited.
        waited: Duration,
    },

    /// The greeting or the capabilities negotiation failed.
    #[error("QMP handshake failed: {0}")]
    Handshake(String),

    /// The command got no reply within its budget. The connection is still up:
    /// a late reply is dropped when it arrives.
    #[error("command {command} timed out after {}", fmt_duration(*budget))]
    Timeout {
        /// The command that timed out.
        command: String,
        /// The time it was given.
        budget: Duration,
    },

    /// The connection is gone (QEMU exited, the socket closed, or
    /// [`Client::disconnect`](crate::Client::disconnect) was called).
    #[error("QMP connection closed{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Disconnected {
        /// What ended the connection, when known.
        reason: Option<Arc<str>>,
    },

    /// A socket error.
    #[error("QMP socket I/O error: {0}")]
    Io(Arc<io::Error>),

    /// The server broke the protocol (unparseable output, a reply of the wrong shape).
    #[error("QMP protocol violation: {0}")]
    Protocol(String),

    /// A message from the server exceeded the configured size limit. The
    /// message was skipped; the connection is still usable.
    #[error("QMP message of {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// The size of the message (or how much was read before giving up).
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// A reply could not be decoded: it was malformed (not a valid reply,
    /// or cut short by the next message), or not of the expected Rust type.
    /// The connection is still usable.
    #[error("cannot decode the reply to {command}: {source} (reply: {reply})")]
    Decode {
        /// The command whose reply was malformed.
        command: String,
        /// The reply as received (its first 500 bytes, lossily as UTF-8).
        reply: Arc<str>,
        /// The decoding error.
        #[source]
        source: Arc<serde_json::Error>,
    },

    /// QEMU answered a command written after this one first, so this one's
    /// reply was lost on the way (corrupt, cut short or dropped): QEMU
    /// answers in-band commands in order. Whether the command ran is
    /// unknown; the connection is still usable.
    #[error("the reply to {command} was lost: QEMU answered a later command first")]
    ReplyLost {
        /// The command whose reply was lost.
        command: String,
    },

    /// A call passed more file descriptors than one message can carry.
    /// Nothing was sent.
    #[error("{count} file descriptors in one call; at most {max} can be passed")]
    TooManyFds {
        /// How many were given.
        count: usize,
        /// The most one call can pass ([`crate::MAX_FDS_PER_CALL`]).
        max: usize,
    },

    /// The arguments given were not valid (for example a raw request that is
    /// not a JSON object). Nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// A console (ring-buffer chardev) cannot be used: see [`ConsoleError`].
    #[error(transparent)]
    Console(#[from] ConsoleError),

    /// A block job ended with an error (QEMU's own message).
    #[error("job {job} failed: {message}")]
    JobFailed {
        /// The job's id.
        job: String,
        /// QEMU's description of the failure.
        message: String,
    },

    /// Events were dropped while waiting for one (the subscriber's queue was
    /// full), so it may never come: re-query the state instead.
    #[error("missed {count} event(s) while waiting for event {event}; it may have been among them")]
    EventsMissed {
        /// The event waited for.
        event: String,
        /// How many events were dropped.
        count: u64,
    },

    /// The guest refused to let a device go: its ACPI `_OST` answer to the
    /// eject request (QEMU's `ACPI_DEVICE_OST` event) carried a failure
    /// status. The device stays; nothing is pending any more.
    #[error("the guest refused to unplug {device}: {} (ACPI _OST status {status:#x})", ost_status_meaning(*status))]
    UnplugRefused {
        /// The device's id or QOM path, as the caller gave it.
        device: String,
        /// The guest's `_OST` status code (`0x80` not supported, `0x81`
        /// in use, `0x82` busy, `0x83` a dependent device busy, `0x01`
        /// another failure).
        status: u64,
    },

    /// The QEMU guest agent did not answer the resynchronisation
    /// (`guest-sync-delimited`) in time: it is not running in the guest (the
    /// guest is booting, rebooting or shut down, or has no agent), or it is
    /// stuck. The connection is kept; the next call tries again.
    #[error("the guest agent at {} is not answering: {reason}", path.display())]
    AgentUnavailable {
        /// The agent's socket.
        path: PathBuf,
        /// What was tried.
        reason: String,
    },

    /// A migration ended in a final state other than the one waited for.
    #[error("migration ended as {status}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    MigrationFailed {
        /// The final state (`failed`, `cancelled`, ...).
        status: String,
        /// QEMU's `error-desc`, when it gave one.
        message: Option<String>,
    },

    /// A typed call uses a command or argument that this QEMU's schema
    /// (`query-qmp-schema`) does not have, typically because it is older
    /// than the QEMU the types were generated from. Nothing was sent. See
    /// [`crate::ConnectOptions::check_typed_calls`].
    #[error("this QEMU ({server}) has no {what}{}", since.map(|s| format!(", which QEMU has had since {s}")).unwrap_or_default())]
    Unsupported {
        /// What is missing, for example ``argument `channels` of command `migrate` ``.
        what: String,
        /// The QEMU version that added it, when QEMU's schema says.
        since: Option<&'static str>,
        /// The server's version, from its greeting.
        server: String,
    },
}

/// Why a console (a ring-buffer chardev, read by [`Client::ringbuf_read`] and
/// watched by the Monitor for the guest agent) cannot be used. These are
/// Incus's `qmp` package's `ErrMonitorBadConsole` and `ErrNotARingbuf`.
///
/// [`Client::ringbuf_read`]: crate::Client::ringbuf_read
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    /// No chardev has this id (`ErrMonitorBadConsole`).
    #[error("requested console {0:?} couldn't be found")]
    NotFound(String),
    /// The chardev exists but is not a ring buffer (`ErrNotARingbuf`).
    #[error("requested device {0:?} isn't a ring buffer")]
    NotARingbuf(String),
}

impl Error {
    /// The QEMU error reply, if this is one.
    pub fn as_qmp(&self) -> Option<&QmpError> {
        match self {
            Error::Qmp(e) => Some(e),
            _ => None,
        }
    }

    /// QEMU's error class, if this is an error reply.
    pub fn class(&self) -> Option<&ErrorClass> {
        self.as_qmp().map(|e| &e.class)
    }

    /// True when QEMU said the thing asked for does not exist: class
    /// `DeviceNotFound`, `CommandNotFound`, or a `GenericError` that QEMU uses
    /// for missing nodes, ids and objects.
    pub fn is_not_found(&self) -> bool {
        self.as_qmp().is_some_and(QmpError::is_not_found)
    }

    /// True for a command that ran out of time (the connection is still up).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// True when the connection is gone.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, Error::Disconnected { .. })
    }

    /// True when the server could not be reached: a Unix socket or TCP
    /// address nobody listens on, a missing socket file, an unreachable
    /// host, a name that does not resolve. Nothing was sent.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. } | Error::ConnectTcp { .. } | Error::Resolve { .. }
        )
    }

    /// True when a call was refused for passing file descriptors over a
    /// connection that cannot carry them (see [`Error::FdPassingUnsupported`]).
    pub fn is_fd_passing_unsupported(&self) -> bool {
        matches!(self, Error::FdPassingUnsupported { .. })
    }

    /// True when the guest agent did not answer (see [`Error::AgentUnavailable`]).
    pub fn is_agent_unavailable(&self) -> bool {
        matches!(self, Error::AgentUnavailable { .. })
    }

    /// True when events were dropped while waiting for one (see [`Error::EventsMissed`]).
    pub fn is_events_missed(&self) -> bool {
        matches!(self, Error::EventsMissed { .. })
    }

    /// True when a migration waited for was cancelled (an
    /// [`Error::MigrationFailed`] whose status is `cancelled`).
    pub fn is_migration_cancelled(&self) -> bool {
        matches!(self, Error::MigrationFailed { status, .. } if status == "cancelled")
    }

    /// True when the guest refused an unplug (see [`Error::UnplugRefused`]).
    pub fn is_unplug_refused(&self) -> bool {
        matches!(self, Error::UnplugRefused { .. })
    }

    /// True when QEMU refused because the thing is in use or busy (by a
    /// device, a job, another object); see [`QmpError::is_in_use`]. Holds
    /// for the errors of every call, typed or raw.
    pub fn is_in_use(&self) -> bool {
        self.as_qmp().is_some_and(QmpError::is_in_use)
    }

    /// True for a QEMU error reply (the connection is fine).
    pub fn is_qmp(&self) -> bool {
        matches!(self, Error::Qmp(_))
    }

    pub(crate) fn disconnected(reason: impl Into<Arc<str>>) -> Self {
        Error::Disconnected {
            reason: Some(reason.into()),
        }
    }

    pub(crate) fn decode(command: &str, reply: &[u8], source: serde_json::Error) -> Self {
        const QUOTED: usize = 500;
        let mut quoted = String::from_utf8_lossy(&reply[..reply.len().min(QUOTED)]).into_owned();
        if reply.len() > QUOTED {
            quoted.push_str("...");
        }
        Error::Decode {
            command: command.to_owned(),
            reply: quoted.into(),
            source: Arc::new(source),
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}

/// An error reply from QEMU: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{command}: {desc} ({class})")]
#[non_exhaustive]
pub struct QmpError {
    /// The command that failed.
    pub command: String,
    /// QEMU's error class.
    pub class: ErrorClass,
    /// QEMU's description, in English.
    pub desc: String,
}

impl QmpError {
    /// An error reply, as QEMU would give it (for tests of code that
    /// handles them).
    pub fn new(command: impl Into<String>, class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            command: command.into(),
            class,
            desc: desc.into(),
        }
    }

    /// True when QEMU refused because the thing is in use (by a device, a
    /// job, another object): a `GenericError` whose fixed phrasing says so,
    /// such as "Node 'x' is busy: block device is in use by ..." or
    /// "object 'mem1' is in use, can not be deleted".
    pub fn is_in_use(&self) -> bool {
        self.class == ErrorClass::GenericError
            && (self.desc.contains("in use") || self.desc.contains("is busy"))
    }

    /// True when QEMU said the thing asked for does not exist.
    ///
    /// QEMU reports most missing objects as `GenericError`; for those the
    /// description's fixed phrasing is consulted as a fallback.
    pub fn is_not_found(&self) -> bool {
        match self.class {
            ErrorClass::DeviceNotFound | ErrorClass::CommandNotFound => true,
            ErrorClass::GenericError => {
                let d = self.desc.as_str();
                d.contains("not found")
                    || d.starts_with("Cannot find device")
                    || d.contains("No such")
                    || d.contains("does not exist")
                    || d.starts_with("Failed to find")
                    || d.contains("not exist")
                    || d.contains("not been found")
            }
            _ => false,
        }
    }
}

/// QEMU's error classes. Classes QEMU may add later are kept in [`ErrorClass::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The catch-all class for most errors.
    GenericError,
    /// The command does not exist (or capabilities were not negotiated).
    CommandNotFound,
    /// A device exists but has no driver or medium.
    DeviceNotActive,
    /// The device does not exist.
    DeviceNotFound,
    /// KVM lacks a capability the command needs.
    KVMMissingCap,
    /// Any other class.
    Other(String),
}

impl ErrorClass {
    /// Parses QEMU's class name.
    pub fn from_name(name: &str) -> Self {
        match name {
            "GenericError" => Self::GenericError,
            "CommandNotFound" => Self::CommandNotFound,
            "DeviceNotActive" => Self::DeviceNotActive,
            "DeviceNotFound" => Self::DeviceNotFound,
            "KVMMissingCap" => Self::KVMMissingCap,
            other => Self::Other(other.to_owned()),
        }
    }

    /// QEMU's name for the class.
    pub fn as_str(&self) -> &str {
        match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::KVMMissingCap => "KVMMissingCap",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an ACPI `_OST` status code of an eject request means (ACPI 6.5,
/// section 6.3.5, "_OST (OSPM Status Indication)").
fn ost_status_meaning(status: u64) -> &'static str {
    match status {
        0x00 => "success",
        0x01 => "non-specific failure",
        0x02 => "unrecognized notify code",
        0x80 => "device ejection not supported by OSPM",
        0x81 => "device in use by an application",
        0x82 => "device busy",
        0x83 => "ejection dependency is busy or not supported",
        0x84 => "ejection in progress",
        _ => "unknown failure status",
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.as_secs() > 0 && d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_by_class_and_by_generic_text() {
        let e = |class: &str, desc: &str| QmpError {
            command: "x".into(),
            class: ErrorClass::from_name(class),
            desc: desc.into(),
        };
        assert!(e("DeviceNotFound", "Device 'foo' not found").is_not_found());
        assert!(e("GenericError", "Cannot find device='nope' nor node-name='nope'").is_not_found());
        assert!(!e("GenericError", "Node 'x' is busy: block device is in use").is_not_found());
        assert!(!e("KVMMissingCap", "x").is_not_found());
        assert!(e("GenericError", "File descriptor named 'x' has not been found").is_not_found());
        let busy = e(
            "GenericError",
            "Node 'top' is busy: block device is in use by block job: commit",
        );
        assert!(busy.is_in_use() && !busy.is_not_found());
        assert!(Error::Qmp(busy).is_in_use());
        assert!(e("GenericError", "object 'mem1' is in use, can not be deleted").is_in_use());
        assert!(!e("DeviceNotFound", "is in use").is_in_use());
        assert!(!Error::Qmp(e("GenericError", "Failed to find node")).is_in_use());
        assert_eq!(
            ErrorClass::from_name("NewClass"),
            ErrorClass::Other("NewClass".into())
        );
        assert_eq!(ErrorClass::from_name("KVMMissingCap").as_str(), "KVMMissingCap");
    }

    #[test]
    fn a_refused_unplug_names_the_guests_reason() {
        let e = Error::UnplugRefused {
            device: "cpu2".into(),
            status: 0x80,
        };
        assert_eq!(
            e.to_string(),
            "the guest refused to unplug cpu2: device ejection not supported by OSPM (ACPI _OST status 0x80)"
        );
        assert!(e.is_unplug_refused() && !e.is_qmp() && !e.is_timeout());
        let busy = Error::UnplugRefused {
            device: "dimm1".into(),
            status: 0x82,
        };
        assert!(busy.to_string().contains("device busy"), "{busy}");
    }

    #[test]
    fn timeout_message_names_command_and_budget() {
        let e = Error::Timeout {
            command: "query-status".into(),
            budget: Duration::from_millis(250),
        };
        assert_eq!(e.to_string(), "command query-status timed out after 250 ms");
        assert!(e.is_timeout() && !e.is_disconnected());
    }
}
