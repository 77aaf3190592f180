//! Character devices: adding, removing and re-plumbing them, and reading
//! ring buffers (where a guest agent's serial port usually ends up).
//!
//! ```no_run
//! # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
//! use qmpkit::commands::chardev::ChardevBackend;
//! client.add_char_device("console0", &ChardevBackend::ringbuf(Some(65536))).await?;
//! // ... a serial port writes into it ...
//! let text = client.ringbuf_read("console0").await?;
//! print!("{text}");
//! # Ok(()) }
//! ```
//!
//! Any backend QEMU 10 knows can also be given in its generated form,
//! [`qapi::types::ChardevBackend`](crate::qapi::types::ChardevBackend),
//! converted with `.into()`:
//!
//! ```no_run
//! # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
//! use qmpkit::qapi::types as t;
//! let log = t::ChardevBackend::File(t::ChardevFileWrapper {
//!     data: t::ChardevFile {
//!         out: "/var/log/vm1-serial.log".into(),
//!         append: Some(true),
//!         logfile: None,
//!         logappend: None,
//!         r#in: None,
//!     },
//! });
//! client.add_char_device("serial0", &log.into()).await?;
//! # Ok(()) }
//! ```

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use qmpkit_qapi::{commands as c, types as t};

use crate::client::{CallOptions, Client, Command};
use crate::error::{ConsoleError, Result};

/// How much one `ringbuf-read` asks for while draining a ring buffer.
const RINGBUF_READ_CHUNK: u64 = 64 * 1024;

/// A chardev backend: its type and that type's options, as `chardev-add`
/// and `chardev-change` take them.
///
/// Loose on purpose, so that any backend of any QEMU can be named; the
/// constructors here build theirs from the generated types, and any
/// generated [`t::ChardevBackend`] converts into one (`From`).
///
/// ```
/// use qmpkit::commands::chardev::ChardevBackend;
/// let b = ChardevBackend::socket_unix("/run/vm1/console.sock", true);
/// assert_eq!(serde_json::to_value(&b).unwrap()["data"]["addr"]["type"], "unix");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChardevBackend {
    /// The backend type: `ringbuf`, `null`, `file`, `socket`, `pty`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The type's options.
    pub data: Map<String, Value>,
}

impl ChardevBackend {
    /// A backend of any type with these options.
    pub fn new(kind: impl Into<String>, data: Map<String, Value>) -> Self {
        ChardevBackend {
            kind: kind.into(),
            data,
        }
    }

    /// A ring buffer of `size` bytes (a power of two; QEMU's default 64 KiB when `None`).
    pub fn ringbuf(size: Option<u64>) -> Self {
        // A size beyond QEMU's integers is refused by QEMU either way.
        let size = size.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
        t::ChardevBackend::Ringbuf(t::ChardevRingbufWrapper {
            data: t::ChardevRingbuf {
                size,
                ..Default::default()
            },
        })
        .into()
    }

    /// A backend that discards output and never has input.
    pub fn null() -> Self {
        t::ChardevBackend::Null(t::ChardevCommonWrapper {
            data: t::ChardevCommon::default(),
        })
        .into()
    }

    /// Output to a file (QEMU truncates it first).
    pub fn file(path: &str) -> Self {
        t::ChardevBackend::File(t::ChardevFileWrapper {
            data: t::ChardevFile {
                out: path.into(),
                logfile: None,
                logappend: None,
                r#in: None,
                append: None,
            },
        })
        .into()
    }

    /// A Unix socket at `path`: QEMU listens when `server` (without waiting
    /// for a client), else it connects.
    pub fn socket_unix(path: &str, server: bool) -> Self {
        let addr = t::SocketAddressLegacy::Unix(t::UnixSocketAddressWrapper {
            data: t::UnixSocketAddress {
                path: path.into(),
                r#abstract: None,
                tight: None,
            },
        });
        socket(addr, server, server.then_some(false))
    }

    /// A connected socket QEMU already holds under an fd name (see
    /// [`Client::send_file`]).
    pub fn socket_fd(fdname: &str) -> Self {
        let addr = t::SocketAddressLegacy::Fd(t::FdSocketAddressWrapper {
            data: t::FdSocketAddress { str: fdname.into() },
        });
        socket(addr, false, None)
    }
}

/// A `socket` backend at `addr`, with `server` and `wait` and nothing else set.
fn socket(addr: t::SocketAddressLegacy, server: bool, wait: Option<bool>) -> ChardevBackend {
    #[allow(deprecated)] // `reconnect` is left out
    let socket = t::ChardevSocket {
        addr,
        server: Some(server),
        wait,
        logfile: None,
        logappend: None,
        tls_creds: None,
        tls_authz: None,
        nodelay: None,
        telnet: None,
        tn3270: None,
        websocket: None,
        reconnect: None,
        reconnect_ms: None,
    };
    t::ChardevBackend::Socket(t::ChardevSocketWrapper { data: socket }).into()
}

impl From<t::ChardevBackend> for ChardevBackend {
    /// The loose form of a generated backend: the same type and options.
    ///
    /// ```
    /// use qmpkit::commands::chardev::ChardevBackend;
    /// use qmpkit::qapi::types as t;
    /// let null = t::ChardevBackend::Null(t::ChardevCommonWrapper { data: Default::default() });
    /// assert_eq!(ChardevBackend::from(null), ChardevBackend::null());
    /// ```
    fn from(backend: t::ChardevBackend) -> Self {
        // A generated union serialises to {"type": .., "data": {..}}, which
        // cannot fail (string keys only).
        let (kind, data) = match serde_json::to_value(&backend) {
            Ok(Value::Object(mut members)) => (members.remove("type"), members.remove("data")),
            Ok(_) | Err(_) => (None, None),
        };
        match (kind, data) {
            (Some(Value::String(kind)), Some(Value::Object(data))) => ChardevBackend { kind, data },
            _ => unreachable!("a generated chardev backend serialises to a type and its data"),
        }
    }
}

impl From<t::ChardevBackend> for ChardevChange {
    /// [`ChardevChange::Backend`] with the generated backend's loose form.
    fn from(backend: t::ChardevBackend) -> Self {
        ChardevChange::Backend(backend.into())
    }
}

/// The arguments of `chardev-add` and `chardev-change`: the generated
/// commands' members, with the backend in its loose form (any backend of
/// any QEMU).
#[derive(Serialize)]
struct ChardevArgs<'a> {
    id: &'a str,
    backend: &'a ChardevBackend,
}

/// What `chardev-add` reports back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct ChardevAdded {
    /// The path of the pseudo-terminal, for a `pty` backend.
    #[serde(default)]
    pub pty: Option<String>,
}

/// A character device (an entry of `query-chardev`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct ChardevInfo {
    /// Its id.
    pub label: String,
    /// QEMU's description of the backend: `ringbuf`, `null`, `unix:PATH,server=on`, ...
    #[serde(default)]
    pub filename: String,
    /// True when the device using it (its frontend) has opened it.
    #[serde(rename = "frontend-open", default)]
    pub frontend_open: bool,
}

impl ChardevInfo {
    /// True for a ring buffer (the `ringbuf` backend or its alias `memory`).
    pub fn is_ringbuf(&self) -> bool {
        self.filename == "ringbuf" || self.filename == "memory"
    }
}

/// A new backend for [`Client::chardev_change`] (Incus's `qmp` package's
/// `ChardevChangeInfo`).
#[derive(Debug)]
#[non_exhaustive]
pub enum ChardevChange {
    /// A connected socket, for example one end of a socket pair. It is
    /// passed to QEMU under `fdname` first ([`Client::send_file`]).
    Socket {
        /// The socket; moved in and closed here once sent.
        file: OwnedFd,
        /// The name QEMU holds it under until the backend takes it.
        fdname: String,
    },
    /// A ring buffer of `size` bytes (QEMU's default when `None`).
    Ringbuf {
        /// Its size, a power of two.
        size: Option<u64>,
    },
    /// Any other backend.
    Backend(ChardevBackend),
}

impl Client {
    /// Adds a character device (`chardev-add`).
    #[doc(alias = "AddCharDevice")]
    #[doc(alias = "chardev-add")]
    pub async fn add_char_device(&self, id: &str, backend: &ChardevBackend) -> Result<ChardevAdded> {
        self.call(c::ChardevAdd::NAME, &ChardevArgs { id, backend }).await
    }

    /// Removes a character device (`chardev-remove`). One still used by a
    /// device fails with [`Error::is_in_use`](crate::Error::is_in_use) true; an unknown id is a not-found error.
    #[doc(alias = "RemoveCharDevice")]
    #[doc(alias = "chardev-remove")]
    pub async fn remove_char_device(&self, id: &str) -> Result<()> {
        self.run(&c::ChardevRemove { id: id.into() }).await.map(drop)
    }

    /// The character devices (`query-chardev`).
    #[doc(alias = "query-chardev")]
    pub async fn query_chardev(&self) -> Result<Vec<ChardevInfo>> {
        self.run_as(&c::QueryChardev, CallOptions::new()).await
    }

    /// Writes text into a ring buffer (`ringbuf-write`), as if the device
    /// behind it had written it.
    #[doc(alias = "ringbuf-write")]
    pub async fn ringbuf_write(&self, device: &str, data: &str) -> Result<()> {
        let write = c::RingbufWrite {
            device: device.into(),
            data: data.into(),
            format: None,
        };
        self.run(&write).await.map(drop)
    }

    /// Drains a ring buffer and returns everything it held (`ringbuf-read`
    /// until it comes back empty). The reads are kept out of the traffic log.
    ///
    /// QEMU returns the bytes as UTF-8 text, replacing invalid sequences.
    /// A chardev that does not exist is [`ConsoleError::NotFound`]; one that
    /// is not a ring buffer is [`ConsoleError::NotARingbuf`].
    #[doc(alias = "RingbufRead")]
    #[doc(alias = "ringbuf-read")]
    pub async fn ringbuf_read(&self, device: &str) -> Result<String> {
        let chardevs = self.query_chardev().await?;
        match chardevs.iter().find(|c| c.label == device) {
            None => return Err(ConsoleError::NotFound(device.to_owned()).into()),
            Some(c) if !c.is_ringbuf() => return Err(ConsoleError::NotARingbuf(device.to_owned()).into()),
            Some(_) => {}
        }
        let mut out = String::new();
        loop {
            let read = c::RingbufRead {
                device: device.into(),
                size: RINGBUF_READ_CHUNK as i64,
                format: Some(t::DataFormat::Utf8),
            };
            let chunk = self.run_with(&read, CallOptions::new().unlogged()).await?;
            if chunk.is_empty() {
                return Ok(out);
            }
            out.push_str(&chunk);
        }
    }

    /// Gives a character device a new backend (`chardev-change`) while the
    /// device using it stays. The frontend must support the swap (serial
    /// ports do, `virtserialport` does not: QEMU refuses).
    ///
    /// For [`ChardevChange::Socket`] the socket is first passed with `getfd`;
    /// when the change then fails, that fd name is closed again so nothing
    /// stays behind in QEMU.
    #[doc(alias = "ChardevChange")]
    #[doc(alias = "chardev-change")]
    pub async fn chardev_change(&self, id: &str, change: ChardevChange) -> Result<()> {
        let (backend, fdname) = match change {
            ChardevChange::Socket { file, fdname } => {
                self.send_file(&fdname, file).await?;
                (ChardevBackend::socket_fd(&fdname), Some(fdname))
            }
            ChardevChange::Ringbuf { size } => (ChardevBackend::ringbuf(size), None),
            ChardevChange::Backend(b) => (b, None),
        };
        let result = self
            .call::<_, Value>(
                c::ChardevChange::NAME,
                &ChardevArgs {
                    id,
                    backend: &backend,
                },
            )
            .await;
        match (result, fdname) {
            (Ok(_), _) => Ok(()),
            (Err(e), Some(name)) => {
                let _ = self.close_file(&name).await;
                Err(e)
            }
            (Err(e), None) => Err(e),
        }
    }
}
