//! Starting a throwaway QEMU with a QMP socket, for tests, examples and tools.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let vm = qmpkit::launch::QemuBuilder::new().spawn().await?;
//! let status: serde_json::Value = vm.client().execute_raw("query-status", serde_json::Value::Null).await?;
//! assert_eq!(status["status"], "prelaunch");
//! // Dropping `vm` kills QEMU, reaps it and removes its directory.
//! # Ok(()) }
//! ```
//!
//! # Booting a guest
//!
//! Most tests need no guest OS at all. Those that do boot a kernel and an
//! initramfs directly, usually under TCG (a guest kernel may not run under
//! every KVM), with a serial console on a socket and Incus's agent port:
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use qmpkit::launch::{QemuBuilder, INCUS_AGENT_CHARDEV};
//! let vm = QemuBuilder::new()
//!     .accel("tcg")
//!     .kernel("/path/to/vmlinux", "/path/to/initrd.img", "console=ttyS0 quiet")
//!     .console_socket()
//!     .incus_agent_port()
//!     .spawn()
//!     .await?;
//! // Connect to vm.console_socket() before starting the CPUs, so that no
//! // output is lost; the agent's lines are in the ring buffer INCUS_AGENT_CHARDEV.
//! vm.client().start().await?;
//! # Ok(()) }
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::connection::address::split_host_port;
use crate::connection::{Address, ConnectOptions};

/// The QEMU binary used unless told otherwise (`QMP_QEMU` in the environment overrides it).
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";

/// The id of the ring-buffer chardev behind Incus's agent port, as Incus
/// names it (see [`QemuBuilder::incus_agent_port`]); give it to
/// [`MonitorOptions::serial_chardev`](crate::monitor::MonitorOptions::serial_chardev).
pub const INCUS_AGENT_CHARDEV: &str = "qemu_serial-chardev";

/// The name of Incus's agent port, by which the guest finds it
/// (`/sys/class/virtio-ports/*/name`).
pub const INCUS_AGENT_PORT: &str = "org.linuxcontainers.incus";

/// The file name of the serial console's socket in the VM's directory
/// (see [`QemuBuilder::console_socket`]).
const CONSOLE_SOCKET: &str = "console.sock";

/// The file name of the guest agent port's socket in the VM's directory
/// (see [`QemuBuilder::guest_agent_port`]).
const GUEST_AGENT_SOCKET: &str = "qga.sock";

/// Why QEMU could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// The temporary directory could not be made.
    #[error("cannot create a directory for QEMU: {0}")]
    TempDir(#[source] std::io::Error),
    /// The binary could not be run.
    #[error("cannot run {binary}: {source} (is QEMU installed? see README)")]
    Spawn {
        /// The binary.
        binary: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited before its QMP socket was ready.
    #[error("QEMU exited with {status} before its QMP socket was ready: {stderr}")]
    Exited {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// `qemu-ga` exited before its socket was ready ([`HostGuestAgent`]).
    #[error("qemu-ga exited with {status} before its socket was ready: {log}")]
    GuestAgentExited {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it logged.
        log: String,
    },
    /// The socket did not accept a QMP connection in time.
    #[error("QEMU's QMP socket was not ready within {0:?}")]
    Timeout(Duration),
    /// Connecting to the socket failed.
    #[error("cannot connect to QEMU: {0}")]
    Connect(#[from] crate::Error),
}

/// Builds the command line of a throwaway QEMU.
///
/// By default: `-machine q35,accel=kvm:tcg -m 128M -nodefaults -display none -S`
/// (KVM when it works, TCG otherwise; CPUs stopped in `prelaunch`), and a QMP
/// socket in a fresh temporary directory.
#[derive(Debug, Clone)]
pub struct QemuBuilder {
    binary: OsString,
    base: bool,
    paused: bool,
    memory: String,
    machine: String,
    accel: String,
    /// `-kernel`, `-initrd` and `-append`.
    kernel: Option<(PathBuf, PathBuf, String)>,
    console_socket: bool,
    guest_agent_port: bool,
    args: Vec<OsString>,
    extra_sockets: Vec<String>,
    qmp_path: Option<PathBuf>,
    qmp_tcp: bool,
    connect_out: Vec<Address>,
    options: ConnectOptions,
    start_timeout: Duration,
    die_with_parent: bool,
}

impl Default for QemuBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl QemuBuilder {
    /// The defaults described above.
    pub fn new() -> Self {
        QemuBuilder {
            binary: std::env::var_os("QMP_QEMU").unwrap_or_else(|| DEFAULT_QEMU.into()),
            base: true,
            paused: true,
            memory: "128M".into(),
            machine: "q35".into(),
            accel: "kvm:tcg".into(),
            kernel: None,
            console_socket: false,
            guest_agent_port: false,
            args: Vec::new(),
            extra_sockets: Vec::new(),
            qmp_path: None,
            qmp_tcp: false,
            connect_out: Vec::new(),
            options: ConnectOptions::new(),
            start_timeout: Duration::from_secs(20),
            die_with_parent: true,
        }
    }

    /// The QEMU binary to run.
    pub fn binary(mut self, binary: impl Into<OsString>) -> Self {
        self.binary = binary.into();
        self
    }

    /// The `-machine` type and its options (default `q35`). The accelerator
    /// is added as `accel=` (see [`QemuBuilder::accel`]) unless this value
    /// already has one.
    pub fn machine(mut self, machine: impl Into<String>) -> Self {
        self.machine = machine.into();
        self
    }

    /// The accelerator, or a `:`-separated list of them tried in turn
    /// (default `kvm:tcg`: KVM when it works, TCG otherwise).
    ///
    /// Choose `tcg` to boot a guest kernel where KVM is present but cannot
    /// run one: on a paravirtual KVM, QEMU without a guest runs fine, but a
    /// real guest kernel hangs early in its boot.
    pub fn accel(mut self, accel: impl Into<String>) -> Self {
        self.accel = accel.into();
        self
    }

    /// Boots this kernel directly (`-kernel`), with this initramfs
    /// (`-initrd`) and kernel command line (`-append`), instead of looking
    /// for a disk to boot from. An uncompressed `vmlinux` with a PVH entry
    /// point (as Debian's kernels have) boots fastest under TCG: QEMU loads
    /// it as it is, with no decompression in the guest.
    ///
    /// `scripts/build-guest-image` builds a kernel and initramfs for tests.
    pub fn kernel(
        mut self,
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
        append: impl Into<String>,
    ) -> Self {
        self.kernel = Some((kernel.into(), initrd.into(), append.into()));
        self
    }

    /// Gives the VM a serial port (the guest's `ttyS0`) on a Unix socket,
    /// [`Qemu::console_socket`], in the VM's directory. QEMU listens without
    /// waiting; what the guest prints while nobody is connected is lost, so
    /// connect before starting the CPUs. Writing to the socket types on the
    /// guest's console.
    ///
    /// Once connected, keep reading: QEMU passes the guest's output on a
    /// byte at a time, a few hundred unread bytes fill the socket, and the
    /// guest's serial output then crawls (a kernel panic's report takes
    /// half a minute, and the panic reaches QEMU only after it).
    pub fn console_socket(mut self) -> Self {
        self.console_socket = true;
        self
    }

    /// Adds Incus's agent port, as Incus wires it: a `virtio-serial-pci`
    /// controller and a port named [`INCUS_AGENT_PORT`] whose host side is
    /// the 16-byte ring buffer [`INCUS_AGENT_CHARDEV`]. The agent in the
    /// guest writes `STARTED` and `STOPPED` lines to the port, and a
    /// [`Monitor`](crate::monitor::Monitor) connected with that chardev
    /// reads them.
    pub fn incus_agent_port(self) -> Self {
        self.args([
            "-device".to_owned(),
            "virtio-serial-pci,id=qemu_serial".to_owned(),
            "-chardev".to_owned(),
            format!("ringbuf,id={INCUS_AGENT_CHARDEV},size=16"),
            "-device".to_owned(),
            format!("virtserialport,name={INCUS_AGENT_PORT},chardev={INCUS_AGENT_CHARDEV}"),
        ])
    }

    /// Adds the QEMU guest agent's port: a `virtio-serial-pci` controller and
    /// a port named [`GUEST_AGENT_PORT`](crate::guest_agent::GUEST_AGENT_PORT)
    /// whose host side is a socket in the VM's directory
    /// ([`Qemu::guest_agent_socket`]); connect a
    /// [`GuestAgent`](crate::guest_agent::GuestAgent) to it. The guest must
    /// run `qemu-ga` on the port. The port's device id is `qga0`, so QEMU
    /// announces the agent opening and closing it (`VSERPORT_CHANGE`).
    pub fn guest_agent_port(mut self) -> Self {
        self.guest_agent_port = true;
        self
    }

    /// The `-m` value (default `128M`); for example `"256M,slots=4,maxmem=1G"`.
    pub fn memory(mut self, memory: impl Into<String>) -> Self {
        self.memory = memory.into();
        self
    }

    /// Whether to pass `-S` (default true: CPUs stay stopped until `cont`).
    pub fn paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }

    /// Leaves out every default argument but the QMP socket.
    pub fn bare(mut self) -> Self {
        self.base = false;
        self
    }

    /// Gives the VM the devices that most operations can be tried on without
    /// a guest: a SCSI controller `scsi0` and a USB controller `usb0` (whose
    /// disks and devices unplug without the guest's help), a balloon
    /// `balloon0`, a VGA display `vga0` (for screendumps), a ring-buffer serial
    /// console `console0`, two memory slots up to 1 GiB and a spare CPU slot.
    /// `qmpctl --launch` and `qmpctl tour` use it.
    pub fn scratch_devices(self) -> Self {
        self.memory("128M,slots=2,maxmem=1G").args([
            "-smp",
            "1,maxcpus=2",
            "-device",
            "virtio-scsi-pci,id=scsi0",
            "-device",
            "qemu-xhci,id=usb0",
            "-device",
            "virtio-balloon-pci,id=balloon0",
            "-device",
            "VGA,id=vga0",
            "-chardev",
            "ringbuf,id=console0,size=65536",
            "-serial",
            "chardev:console0",
        ])
    }

    /// Adds one argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds a second QMP socket `NAME.sock` in the VM's directory (a control
    /// channel for a test); see [`Qemu::socket`].
    pub fn extra_qmp_socket(mut self, name: &str) -> Self {
        self.extra_sockets.push(name.to_owned());
        self
    }

    /// Puts the main QMP socket at this path instead of the temporary directory.
    pub fn qmp_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.qmp_path = Some(path.into());
        self
    }

    /// Puts the main QMP monitor on TCP instead of a Unix socket:
    /// `-qmp tcp:127.0.0.1:PORT,server=on,wait=off` on a free port (a new
    /// one, should another program take it before QEMU binds it), and the
    /// launcher's client connects over TCP; see [`Qemu::qmp_address`].
    pub fn qmp_tcp(mut self) -> Self {
        self.qmp_tcp = true;
        self
    }

    /// Adds a QMP monitor that QEMU connects out to: `-chardev
    /// socket,server=off,reconnect-ms=500` to this Unix path or TCP
    /// address (a [`Listener`](crate::Listener)'s), with `-mon
    /// mode=control`. QEMU tries again every 500 ms until something
    /// listens there, and after each disconnect. The main QMP socket stays
    /// (the launcher connects to it as usual).
    pub fn qmp_connect_out(mut self, address: impl Into<Address>) -> Self {
        self.connect_out.push(address.into());
        self
    }

    /// Options for the connection the launcher makes.
    pub fn connect_options(mut self, options: ConnectOptions) -> Self {
        self.options = options;
        self
    }

    /// How long QEMU may take to open its socket (default 20 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Whether QEMU is killed when the thread that started it ends (default
    /// true), so that a test process killed with SIGKILL leaves no QEMU
    /// behind. Linux ties this to the starting *thread*: turn it off when
    /// spawning from a short-lived thread (for example inside
    /// `spawn_blocking`) whose QEMU must outlive it.
    pub fn die_with_parent(mut self, die: bool) -> Self {
        self.die_with_parent = die;
        self
    }

    /// Starts QEMU, waits for its QMP socket and connects.
    pub async fn spawn(self) -> Result<Qemu, LaunchError> {
        // A free TCP port is only free until someone binds it: QEMU may
        // lose the race to another program (or test) and exit; then the
        // launch is tried again on a new port.
        const TCP_ATTEMPTS: usize = 5;
        let mut attempt = 1;
        loop {
            match self.start().await {
                Err(LaunchError::Exited { stderr, .. })
                    if self.qmp_tcp
                        && attempt < TCP_ATTEMPTS
                        && stderr.contains("Address already in use") =>
                {
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    async fn start(&self) -> Result<Qemu, LaunchError> {
        let dir = tempfile::Builder::new()
            .prefix("qmpkit-")
            .tempdir()
            .map_err(LaunchError::TempDir)?;
        let qmp_path = self
            .qmp_path
            .clone()
            .unwrap_or_else(|| dir.path().join("qmp.sock"));
        let qmp_address = if self.qmp_tcp {
            let port = free_tcp_port().map_err(LaunchError::TempDir)?;
            Address::tcp("127.0.0.1", port)
        } else {
            Address::Unix(qmp_path.clone())
        };
        let stderr_path = dir.path().join("qemu.stderr");
        let stderr = std::fs::File::create(&stderr_path).map_err(LaunchError::TempDir)?;
        let mut cmd = Command::new(&self.binary);
        if self.base {
            let machine = if self.machine.contains("accel=") {
                self.machine.clone()
            } else {
                format!("{},accel={}", self.machine, self.accel)
            };
            cmd.args([
                "-machine",
                &machine,
                "-m",
                &self.memory,
                "-nodefaults",
                "-display",
                "none",
            ]);
            if self.paused {
                cmd.arg("-S");
            }
        }
        if let Some((kernel, initrd, append)) = &self.kernel {
            cmd.arg("-kernel").arg(kernel);
            cmd.arg("-initrd").arg(initrd);
            cmd.arg("-append").arg(append);
        }
        if self.console_socket {
            let mut chardev = OsString::from("socket,id=console-sock,server=on,wait=off,path=");
            chardev.push(dir.path().join(CONSOLE_SOCKET));
            cmd.arg("-chardev").arg(chardev);
            cmd.args(["-serial", "chardev:console-sock"]);
        }
        if self.guest_agent_port {
            let mut chardev = OsString::from("socket,id=qga0,server=on,wait=off,path=");
            chardev.push(dir.path().join(GUEST_AGENT_SOCKET));
            cmd.arg("-chardev").arg(chardev);
            cmd.args(["-device", "virtio-serial-pci,id=qga_serial", "-device"]);
            cmd.arg(format!(
                "virtserialport,bus=qga_serial.0,chardev=qga0,id=qga0,name={}",
                crate::guest_agent::GUEST_AGENT_PORT
            ));
        }
        cmd.arg("-qmp").arg(qmp_arg(&qmp_address));
        for name in &self.extra_sockets {
            cmd.arg("-qmp")
                .arg(qmp_arg(&Address::Unix(dir.path().join(format!("{name}.sock")))));
        }
        for (i, address) in self.connect_out.iter().enumerate() {
            let mut chardev = OsString::from(format!("socket,id=qmp-out{i},server=off,reconnect-ms=500,"));
            match address {
                Address::Unix(path) => {
                    chardev.push("path=");
                    chardev.push(path);
                }
                Address::Tcp(text) => {
                    let (host, port) = split_host_port(text).map_err(|reason| {
                        LaunchError::Connect(crate::Error::InvalidAddress {
                            address: text.clone(),
                            reason: reason.to_owned(),
                        })
                    })?;
                    chardev.push(format!("host={host},port={port}"));
                }
            }
            cmd.arg("-chardev").arg(chardev);
            cmd.arg("-mon").arg(format!("chardev=qmp-out{i},mode=control"));
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if self.die_with_parent {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the child between fork and exec, where only
            // async-signal-safe calls are allowed: this is one prctl(2).
            unsafe {
                cmd.pre_exec(|| {
                    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            binary: self.binary.to_string_lossy().into_owned(),
            source,
        })?;
        let mut qemu = Qemu {
            child,
            dir,
            qmp_path,
            qmp_address,
            stderr_path,
            client: None,
        };
        let client = qemu.await_socket(&self.options, self.start_timeout).await?;
        qemu.client = Some(client);
        Ok(qemu)
    }
}

/// A TCP port on 127.0.0.1 that nobody listens on now.
fn free_tcp_port() -> std::io::Result<u16> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?.port())
}

fn qmp_arg(address: &Address) -> OsString {
    let mut s = OsString::from(match address {
        Address::Unix(_) => "unix:",
        Address::Tcp(_) => "tcp:",
    });
    match address {
        Address::Unix(path) => s.push(path.as_os_str()),
        Address::Tcp(text) => s.push(text),
    }
    s.push(",server=on,wait=off");
    s
}
/// A running QEMU. Dropping it kills QEMU (SIGKILL), reaps it and removes
/// its temporary directory, also when a test panics.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    dir: tempfile::TempDir,
    qmp_path: PathBuf,
    qmp_address: Address,
    stderr_path: PathBuf,
    client: Option<Client>,
}

impl Qemu {
    async fn await_socket(
        &mut self,
        options: &ConnectOptions,
        budget: Duration,
    ) -> Result<Client, LaunchError> {
        let deadline = Instant::now() + budget;
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(status) = self.child.try_wait().ok().flatten() {
                return Err(LaunchError::Exited {
                    status,
                    stderr: self.stderr(),
                });
            }
            match options.connect_to(&self.qmp_address).await {
                Ok(client) => return Ok(client),
                // Not there yet (or not listening yet): poll until the deadline.
                Err(crate::Error::Connect { .. } | crate::Error::ConnectTcp { .. })
                    if Instant::now() < deadline => {}
                Err(crate::Error::Connect { .. } | crate::Error::ConnectTcp { .. }) => {
                    return Err(LaunchError::Timeout(budget))
                }
                Err(e) => return Err(e.into()),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The connection the launcher made.
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("connected at spawn")
    }

    /// The main QMP socket's path (where it would be, with
    /// [`QemuBuilder::qmp_tcp`]: see [`Qemu::qmp_address`]).
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_path
    }

    /// The main QMP monitor's address: its Unix socket, or its TCP address
    /// with [`QemuBuilder::qmp_tcp`].
    pub fn qmp_address(&self) -> &Address {
        &self.qmp_address
    }

    /// The path of an extra QMP socket added with [`QemuBuilder::extra_qmp_socket`].
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    /// The serial console's socket (see [`QemuBuilder::console_socket`]).
    pub fn console_socket(&self) -> PathBuf {
        self.dir.path().join(CONSOLE_SOCKET)
    }

    /// The host side of the guest agent's port (see [`QemuBuilder::guest_agent_port`]).
    pub fn guest_agent_socket(&self) -> PathBuf {
        self.dir.path().join(GUEST_AGENT_SOCKET)
    }

    /// The VM's temporary directory (for images, dumps, sockets of a test's own).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What QEMU has written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Kills QEMU with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for QEMU to exit by itself, polling up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Freezes QEMU (`SIGSTOP`): it stops reading its sockets and answering,
    /// as a QEMU stuck in the kernel or on a lock would, until
    /// [`Qemu::thaw`]. For tests of deadlines and timeouts.
    pub fn freeze(&self) -> std::io::Result<()> {
        self.signal(rustix::process::Signal::STOP)
    }

    /// Lets a frozen QEMU run again (`SIGCONT`).
    pub fn thaw(&self) -> std::io::Result<()> {
        self.signal(rustix::process::Signal::CONT)
    }

    fn signal(&self, signal: rustix::process::Signal) -> std::io::Result<()> {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32)
            .ok_or_else(|| std::io::Error::other("no pid"))?;
        rustix::process::kill_process(pid, signal).map_err(Into::into)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Some(c) = &self.client {
            c.disconnect();
        }
        // A stopped QEMU still dies of SIGKILL.
        self.kill();
    }
}

/// The guest agent commands that are harmless on the machine the agent runs
/// on: they read state, or touch only files and programs the caller names.
/// [`HostGuestAgent`] enables only these by default, so that a test cannot
/// freeze, shut down or re-password the host by mistake.
pub const HOST_SAFE_AGENT_COMMANDS: &[&str] = &[
    "guest-sync-delimited",
    "guest-sync",
    "guest-ping",
    "guest-info",
    "guest-get-osinfo",
    "guest-get-host-name",
    "guest-get-time",
    "guest-get-timezone",
    "guest-network-get-interfaces",
    "guest-fsfreeze-status",
    "guest-exec",
    "guest-exec-status",
    "guest-file-open",
    "guest-file-read",
    "guest-file-write",
    "guest-file-seek",
    "guest-file-flush",
    "guest-file-close",
];

/// The guest agent binary used unless told otherwise (`QMP_QEMU_GA` in the
/// environment overrides it).
pub const DEFAULT_QEMU_GA: &str = "qemu-ga";

/// A QEMU guest agent (`qemu-ga -m unix-listen`) running on the host, for
/// testing a [`GuestAgent`](crate::guest_agent::GuestAgent) without booting
/// a guest. It runs as the current user in a temporary directory, with only
/// [`HOST_SAFE_AGENT_COMMANDS`] enabled unless told otherwise. Dropping it
/// kills it (SIGKILL), reaps it and removes the directory.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let host_agent = qmpkit::launch::HostGuestAgent::spawn().await?;
/// let agent = qmpkit::guest_agent::GuestAgent::connect(host_agent.socket()).await?;
/// agent.ping().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct HostGuestAgent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    allowed: Vec<String>,
}

impl HostGuestAgent {
    /// Starts `qemu-ga` with [`HOST_SAFE_AGENT_COMMANDS`] and waits until it listens.
    pub async fn spawn() -> Result<HostGuestAgent, LaunchError> {
        Self::spawn_allowing(HOST_SAFE_AGENT_COMMANDS).await
    }

    /// Starts `qemu-ga` with only these commands enabled (`--allow-rpcs`).
    pub async fn spawn_allowing<S: AsRef<str>>(commands: &[S]) -> Result<HostGuestAgent, LaunchError> {
        let dir = tempfile::Builder::new()
            .prefix("qmpkit-qga-")
            .tempdir()
            .map_err(LaunchError::TempDir)?;
        let mut agent = HostGuestAgent {
            child: None,
            dir,
            allowed: commands.iter().map(|c| c.as_ref().to_owned()).collect(),
        };
        agent.start().await?;
        Ok(agent)
    }

    /// The agent's listening socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("qga.sock")
    }

    /// The temporary directory (the agent's state directory; a place for test files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the agent has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qga.log")).unwrap_or_default()
    }

    /// Kills the agent (SIGKILL) and reaps it; its socket goes away with it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.socket());
    }

    /// Starts the agent again on the same socket (after [`HostGuestAgent::kill`]).
    pub async fn restart(&mut self) -> Result<(), LaunchError> {
        self.kill();
        self.start().await
    }

    async fn start(&mut self) -> Result<(), LaunchError> {
        let binary = std::env::var_os("QMP_QEMU_GA").unwrap_or_else(|| DEFAULT_QEMU_GA.into());
        let socket = self.socket();
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::create(self.dir.path().join("qga.log")).map_err(LaunchError::TempDir)?;
        let mut cmd = Command::new(&binary);
        cmd.args(["-m", "unix-listen", "-p"])
            .arg(&socket)
            .arg("-t")
            .arg(self.dir.path())
            .arg("-f")
            .arg(self.dir.path().join("qga.pid"))
            .arg(format!("--allow-rpcs={}", self.allowed.join(",")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the child between fork and exec, where only
            // async-signal-safe calls are allowed: this is one prctl(2).
            unsafe {
                cmd.pre_exec(|| {
                    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            binary: binary.to_string_lossy().into_owned(),
            source,
        })?;
        self.child = Some(child);
        // Ready once the socket exists: qemu-ga binds and listens in one go.
        let budget = Duration::from_secs(10);
        let deadline = Instant::now() + budget;
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(LaunchError::GuestAgentExited {
                    status,
                    log: self.log(),
                });
            }
            if socket.exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::Timeout(budget));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

impl Drop for HostGuestAgent {
    fn drop(&mut self) {
        self.kill();
    }
}
