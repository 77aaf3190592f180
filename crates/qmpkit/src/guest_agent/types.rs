//! What the guest agent's commands take and return (QEMU's `qga/qapi-schema.json`).

use serde::{Deserialize, Serialize};

/// `guest-info`: the agent's version and its commands.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct AgentInfo {
    /// The agent's version (for example `10.0.2`).
    pub version: String,
    /// Every command the agent knows, enabled or not.
    pub supported_commands: Vec<AgentCommandInfo>,
}

impl AgentInfo {
    /// True when the agent has the command and it is enabled.
    pub fn supports(&self, command: &str) -> bool {
        self.supported_commands
            .iter()
            .any(|c| c.name == command && c.enabled)
    }
}

/// One command in [`AgentInfo::supported_commands`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct AgentCommandInfo {
    /// The command's name.
    pub name: String,
    /// False when the agent was told to refuse it (`--block-rpcs`, `--allow-rpcs`).
    pub enabled: bool,
    /// False for the commands that do not answer on success (`guest-shutdown`, ...).
    #[serde(rename = "success-response")]
    pub success_response: bool,
}

/// `guest-get-osinfo`: the guest's operating system. Every field is optional:
/// the agent fills in what the guest tells it (`uname`, `/etc/os-release`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OsInfo {
    /// The kernel release (`uname -r`).
    pub kernel_release: Option<String>,
    /// The kernel version (`uname -v`).
    pub kernel_version: Option<String>,
    /// The machine hardware name (`uname -m`).
    pub machine: Option<String>,
    /// `ID` from os-release (for example `debian`).
    pub id: Option<String>,
    /// `NAME` from os-release.
    pub name: Option<String>,
    /// `PRETTY_NAME` from os-release.
    pub pretty_name: Option<String>,
    /// `VERSION` from os-release.
    pub version: Option<String>,
    /// `VERSION_ID` from os-release.
    pub version_id: Option<String>,
    /// `VARIANT` from os-release.
    pub variant: Option<String>,
    /// `VARIANT_ID` from os-release.
    pub variant_id: Option<String>,
}

/// One network interface of the guest (`guest-network-get-interfaces`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NetworkInterface {
    /// The interface's name (for example `eth0`).
    pub name: String,
    /// Its MAC address, if it has one.
    pub hardware_address: Option<String>,
    /// Its addresses.
    #[serde(default)]
    pub ip_addresses: Vec<IpAddress>,
    /// Its counters, when the agent reports them.
    pub statistics: Option<NetworkStatistics>,
}

/// An address of a [`NetworkInterface`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IpAddress {
    /// `ipv4` or `ipv6`.
    pub ip_address_type: String,
    /// The address.
    pub ip_address: String,
    /// The prefix length.
    pub prefix: u32,
}

/// The counters of a [`NetworkInterface`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub struct NetworkStatistics {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errs: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errs: u64,
    pub tx_dropped: u64,
}

/// Whether the guest's filesystems are frozen (`guest-fsfreeze-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsFreezeStatus {
    /// Not frozen.
    Thawed,
    /// Frozen by `guest-fsfreeze-freeze`.
    Frozen,
}

/// An open file in the guest (from [`GuestAgent::file_open`](super::GuestAgent::file_open)).
/// Close it with [`GuestAgent::file_close`](super::GuestAgent::file_close): the
/// agent keeps it open until then (or until it restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(transparent)]
pub struct FileHandle(pub i64);

/// What [`GuestAgent::file_read`](super::GuestAgent::file_read) returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChunk {
    /// The bytes read (decoded from the agent's base64).
    pub data: Vec<u8>,
    /// True when the end of the file was reached.
    pub eof: bool,
}

/// Where [`GuestAgent::file_seek`](super::GuestAgent::file_seek) counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Whence {
    /// From the start of the file.
    Set,
    /// From the current position.
    Cur,
    /// From the end of the file.
    End,
}

/// The position after a seek.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct FilePosition {
    /// The new offset from the start.
    pub position: u64,
    /// True when at the end of the file.
    pub eof: bool,
}

/// A program to run in the guest ([`GuestAgent::exec`](super::GuestAgent::exec)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub(crate) path: String,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<String>,
    pub(crate) input: Option<Vec<u8>>,
    pub(crate) capture_output: bool,
}

impl ExecRequest {
    /// Runs `path` (a path in the guest; the agent searches `PATH` for a bare
    /// name), with output captured.
    pub fn new(path: impl Into<String>) -> Self {
        ExecRequest {
            path: path.into(),
            args: Vec::new(),
            env: Vec::new(),
            input: None,
            capture_output: true,
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable (`NAME=value`); with any, the program
    /// gets only these.
    pub fn env(mut self, var: impl Into<String>) -> Self {
        self.env.push(var.into());
        self
    }

    /// Bytes for the program's stdin.
    pub fn input(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.input = Some(bytes.into());
        self
    }

    /// Whether to capture stdout and stderr (default true).
    pub fn capture_output(mut self, capture: bool) -> Self {
        self.capture_output = capture;
        self
    }
}

/// The guest process id that `guest-exec` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub struct ExecPid(pub i64);

/// A program's state (`guest-exec-status`), output decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecStatus {
    /// True once it ended (then the output is complete).
    pub exited: bool,
    /// Its exit code, if it exited normally.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// What it wrote to stdout (if captured).
    pub stdout: Vec<u8>,
    /// What it wrote to stderr (if captured).
    pub stderr: Vec<u8>,
    /// True when stdout was cut short (the agent keeps at most 16 MiB).
    pub stdout_truncated: bool,
    /// True when stderr was cut short.
    pub stderr_truncated: bool,
}

impl ExecStatus {
    /// True when it exited normally with code 0.
    pub fn success(&self) -> bool {
        self.exited && self.exit_code == Some(0)
    }
}

/// How [`GuestAgent::shutdown`](super::GuestAgent::shutdown) ends the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownMode {
    /// Power off (the agent's default).
    #[default]
    Powerdown,
    /// Halt without powering off.
    Halt,
    /// Reboot.
    Reboot,
}

/// How [`GuestAgent::suspend`](super::GuestAgent::suspend) suspends the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendMode {
    /// Suspend to disk (`guest-suspend-disk`).
    Disk,
    /// Suspend to RAM (`guest-suspend-ram`).
    Ram,
    /// Both (`guest-suspend-hybrid`).
    Hybrid,
}

impl SuspendMode {
    /// The agent command.
    pub fn command(self) -> &'static str {
        match self {
            SuspendMode::Disk => "guest-suspend-disk",
            SuspendMode::Ram => "guest-suspend-ram",
            SuspendMode::Hybrid => "guest-suspend-hybrid",
        }
    }
}
