//! The command line: global options and every subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

const AFTER_HELP: &str = "\
Exit codes:
  0    success
  1    the operation failed (a block job, a migration, a tour step, a local file)
  2    bad usage (unknown option or command, invalid JSON arguments)
  3    QEMU answered with an error
  4    connection failure (no socket, nobody listening, no greeting, connection lost)
  5    timeout
  130  interrupted (Ctrl-C or SIGTERM)

With --json, an error is one JSON object on stderr:
  {\"error\": {\"kind\", \"message\", \"class\", \"exit_code\"}}

Try it without a VM: `qmpctl --launch shell`, or the guided tour: `qmpctl tour`.";

/// A command-line tool for the QEMU Machine Protocol (QMP).
#[derive(Debug, Parser)]
#[command(name = "qmpctl", version, after_help = AFTER_HELP, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,

    /// More logging on stderr (-v: debug, -vv: trace; QMPCTL_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand understands.
#[derive(Debug, Clone, Args)]
pub struct Globals {
    /// The VM's QMP monitor: a Unix socket path (QEMU's `-qmp
    /// unix:PATH,server=on`) or a TCP address `HOST:PORT` (`-qmp
    /// tcp:HOST:PORT,server=on`). `unix:PATH` and `tcp:HOST:PORT` say which;
    /// anything with a `/`, or not `HOST:PORT`, is a path.
    #[arg(
        short,
        long,
        env = "QMPCTL_SOCKET",
        global = true,
        value_name = "PATH|HOST:PORT"
    )]
    pub socket: Option<PathBuf>,

    /// Start a throwaway QEMU for this one command instead of connecting to a
    /// socket (see `--qemu-arg`; the VM is killed when qmpctl exits).
    #[arg(long, global = true, conflicts_with = "socket")]
    pub launch: bool,

    /// An extra argument for the QEMU that --launch starts (repeat it).
    #[arg(
        long = "qemu-arg",
        value_name = "ARG",
        global = true,
        allow_hyphen_values = true,
        requires = "launch"
    )]
    pub qemu_args: Vec<String>,

    /// Give up on an operation after this long (for example 10s, 2m). Applies
    /// to each command and to the waits of migrations, block jobs and dumps.
    #[arg(long, global = true, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,

    /// How long to wait for the QMP greeting when connecting.
    #[arg(long, global = true, value_parser = humantime::parse_duration, default_value = "5s", value_name = "DURATION")]
    pub connect_timeout: Duration,

    /// Append a transcript of the QMP traffic to this file, in the format of
    /// Incus's qemu.qmp.log (secrets redacted).
    #[arg(long, global = true, value_name = "FILE")]
    pub log: Option<PathBuf>,

    /// Print JSON instead of tables (one object per line for streams).
    #[arg(long, global = true)]
    pub json: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the VM's run state (running, paused, prelaunch, ...).
    Status,
    /// Start or resume the VM's CPUs (`cont`).
    Start,
    /// Pause the VM's CPUs (`stop`).
    Pause,
    /// Reset the VM, as the reset button would.
    Reset,
    /// Ask the guest to power down (ACPI power button).
    Powerdown,
    /// Make QEMU exit.
    Quit,
    /// List the virtual CPUs.
    Cpus(CpusArgs),
    /// Memory: size, balloon, memory devices.
    Memory(MemoryArgs),
    /// Block devices: list, stats, hotplug, snapshots, jobs, resize, throttling.
    #[command(subcommand)]
    Block(BlockCommand),
    /// The NBD server: start it, export block nodes, stop it.
    #[command(subcommand)]
    Nbd(NbdCommand),
    /// Add, remove or list devices (device_add / device_del).
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Add, remove or list character devices.
    #[command(subcommand)]
    Chardev(ChardevCommand),
    /// Add or remove a network card with its backend.
    #[command(subcommand)]
    Nic(NicCommand),
    /// Print what a ring-buffer chardev (a serial console) holds, draining it.
    Console(ConsoleArgs),
    /// Save the display as an image.
    Screendump(ScreendumpArgs),
    /// Dump the guest's memory to a file, with progress.
    DumpMemory(DumpArgs),
    /// Live migration: send the VM, receive it, watch or cancel it.
    #[command(subcommand)]
    Migrate(MigrateCommand),
    /// Run any QMP command: `exec NAME [JSON-ARGS | - | key=value...]`.
    Exec(ExecArgs),
    /// Print events as they happen.
    Events(EventsArgs),
    /// An interactive QMP shell with history and completion.
    Shell(ShellArgs),
    /// Walk through what the library does, on scratch VMs (needs only QEMU).
    Tour(TourArgs),
    /// Measure the cost of a command through the library.
    Bench(crate::bench::BenchArgs),
    /// The QEMU guest agent in the guest: `--socket` is then the host side of
    /// its port (`-chardev socket,path=PATH,...` behind a virtserialport named
    /// org.qemu.guest_agent.0), not a QMP socket.
    Agent(AgentArgs),
    /// Run a human monitor (HMP) command and print its text: `hmp info block`.
    Hmp(HmpArgs),
    /// Run several actions atomically (QMP `transaction`): all or none.
    Transaction(TransactionArgs),
    /// Print a shell completion script: `qmpctl completions bash > /etc/bash_completion.d/qmpctl`.
    Completions(CompletionsArgs),
    /// Print the manual page (roff): `qmpctl man > qmpctl.1`, or `--dir` for one per subcommand.
    Man(ManArgs),
}

/// `man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write qmpctl.1 and a page per subcommand (qmpctl-block.1, ...) into this directory.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `hmp`.
#[derive(Debug, Args)]
pub struct HmpArgs {
    /// The HMP command line (its words are joined with spaces).
    #[arg(required = true, allow_hyphen_values = true, trailing_var_arg = true)]
    pub command: Vec<String>,
    /// Run it on this virtual CPU (for `info registers` and the like).
    #[arg(long)]
    pub cpu: Option<i64>,
}

/// `transaction`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  qmpctl transaction \\
    -a 'blockdev-snapshot-sync device=d0 snapshot-file=/v/d0.snap format=qcow2' \\
    -a 'blockdev-snapshot-sync device=d1 snapshot-file=/v/d1.snap format=qcow2'
  qmpctl transaction '[{\"type\": \"abort\", \"data\": {}}]'")]
pub struct TransactionArgs {
    /// An action: `TYPE key=value...` (typed from the schema, like `exec`); repeat it.
    #[arg(short, long = "action", value_name = "ACTION")]
    pub actions: Vec<String>,
    /// Or the actions as one JSON array (`-` reads it from stdin).
    #[arg(
        value_name = "JSON",
        conflicts_with = "actions",
        required_unless_present = "actions"
    )]
    pub list: Option<String>,
}

/// `completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// `agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: AgentCommand,
}

/// `agent` subcommands.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Check that the agent answers.
    Ping,
    /// The agent's version and commands.
    Info,
    /// The guest's kernel and distribution.
    Osinfo,
    /// The guest's clock.
    Time,
    /// The guest's network interfaces and addresses.
    Interfaces,
    /// Run a program in the guest; its output is printed and its exit status
    /// becomes qmpctl's (128 + N when signal N ended it).
    Exec {
        /// The program (a path in the guest).
        program: String,
        /// Its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Copy files to and from the guest.
    #[command(subcommand)]
    File(AgentFileCommand),
    /// Freeze or thaw the guest's filesystems (for a consistent snapshot).
    #[command(subcommand)]
    Fsfreeze(FsfreezeCommand),
    /// Power the guest down, halt or reboot it (the agent does not answer).
    Shutdown {
        /// How.
        #[arg(long, value_enum, default_value = "powerdown")]
        mode: ShutdownModeArg,
    },
    /// Set a guest user's password, read from the first line of stdin.
    SetPassword {
        /// The user.
        user: String,
        /// The password is already hashed (as crypt(3) makes it).
        #[arg(long)]
        crypted: bool,
    },
}

/// `agent file` subcommands.
#[derive(Debug, Subcommand)]
pub enum AgentFileCommand {
    /// Copy a file from the guest (LOCAL `-`: to stdout).
    Get {
        /// The file in the guest.
        guest_path: String,
        /// Where to write it.
        local: PathBuf,
    },
    /// Copy a file into the guest (LOCAL `-`: from stdin).
    Put {
        /// The file to send.
        local: PathBuf,
        /// Where to write it in the guest.
        guest_path: String,
    },
}

/// `agent fsfreeze` subcommands.
#[derive(Debug, Subcommand)]
pub enum FsfreezeCommand {
    /// Whether the filesystems are frozen.
    Status,
    /// Freeze every filesystem (or only those mounted at these paths).
    Freeze {
        /// Mount points.
        mountpoints: Vec<String>,
    },
    /// Thaw what was frozen.
    Thaw,
}

/// `agent shutdown --mode`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ShutdownModeArg {
    /// Power off.
    Powerdown,
    /// Halt without powering off.
    Halt,
    /// Reboot.
    Reboot,
}

/// `cpus`.
#[derive(Debug, Args)]
pub struct CpusArgs {
    /// List the hotpluggable CPU slots instead (plugged or not).
    #[arg(long)]
    pub hotpluggable: bool,
}

/// `memory`.
#[derive(Debug, Args)]
pub struct MemoryArgs {
    #[command(subcommand)]
    pub command: Option<MemoryCommand>,
}

/// `memory ...`.
#[derive(Debug, Subcommand)]
pub enum MemoryCommand {
    /// Base and hotplugged memory.
    Size,
    /// Show the balloon's size, or set it (for example `memory balloon 96M`).
    Balloon {
        /// The new size of the guest's memory (bytes, or with K/M/G/T).
        size: Option<String>,
    },
    /// List the memory devices (DIMMs, virtio-mem, ...).
    Devices,
}

/// `block ...`.
#[derive(Debug, Subcommand)]
pub enum BlockCommand {
    /// List the block devices and their media.
    List,
    /// I/O statistics per device.
    Stats,
    /// List every named block node (the graph, flattened).
    Nodes,
    /// Add a disk: a block node for an image file and, unless --no-device, a
    /// device using it.
    Add(BlockAddArgs),
    /// Remove a disk: its device (waiting for the guest to let go) and its node.
    Remove {
        /// The id given to `block add`.
        id: String,
        /// Remove the device only, keeping the block node.
        #[arg(long)]
        keep_node: bool,
    },
    /// Take an external snapshot: a new qcow2 overlay on top of NODE.
    Snapshot {
        /// The node (or device) to snapshot.
        node: String,
        /// The overlay file QEMU creates.
        overlay: PathBuf,
        /// The overlay's node name (default: NODE-snap).
        #[arg(long)]
        name: Option<String>,
    },
    /// Merge an overlay into its backing file (block-commit), with progress;
    /// the job is named after NODE.
    Commit(CommitArgs),
    /// Copy a node to another node and switch to it (blockdev-mirror), with
    /// progress; the job is named after NODE.
    Mirror(MirrorArgs),
    /// Grow a node to SIZE.
    Resize {
        /// The node name.
        node: String,
        /// The new size (bytes, or with K/M/G/T).
        size: String,
    },
    /// Limit a device's I/O (0 removes a limit).
    Throttle(ThrottleArgs),
    /// List block jobs.
    Jobs,
}

/// `block add`.
#[derive(Debug, Args)]
pub struct BlockAddArgs {
    /// Names the block node and the device.
    pub id: String,
    /// The image file.
    pub file: PathBuf,
    /// The image format.
    #[arg(long, default_value = "qcow2")]
    pub format: String,
    /// The device driver (scsi-hd needs a SCSI controller; virtio-blk-pci a PCI slot).
    #[arg(long, default_value = "scsi-hd")]
    pub driver: String,
    /// The bus to plug the device into.
    #[arg(long)]
    pub bus: Option<String>,
    /// Open the image read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Add the block node only (for example as a mirror target).
    #[arg(long)]
    pub no_device: bool,
}

/// `block commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// The device's top node (where the chain starts).
    pub node: String,
    /// The overlay to commit (default: the active layer, then the job pivots).
    #[arg(long)]
    pub top: Option<String>,
    /// The node to commit into (default: the bottom of the chain).
    #[arg(long)]
    pub base: Option<String>,
}

/// `block mirror`.
#[derive(Debug, Args)]
pub struct MirrorArgs {
    /// The source node.
    pub node: String,
    /// The target node (add it first, for example with `block add --no-device`).
    pub target: String,
}

/// `block throttle`.
#[derive(Debug, Args)]
pub struct ThrottleArgs {
    /// The device's id.
    pub device: String,
    /// Read bytes per second.
    #[arg(long, default_value_t = 0)]
    pub bps_read: u64,
    /// Write bytes per second.
    #[arg(long, default_value_t = 0)]
    pub bps_write: u64,
    /// Read operations per second.
    #[arg(long, default_value_t = 0)]
    pub iops_read: u64,
    /// Write operations per second.
    #[arg(long, default_value_t = 0)]
    pub iops_write: u64,
}

/// `nbd ...`.
#[derive(Debug, Subcommand)]
pub enum NbdCommand {
    /// Start the NBD server on a Unix socket (or host:port with --tcp).
    Start {
        /// The socket path, or HOST:PORT with --tcp.
        address: String,
        /// Listen on TCP instead of a Unix socket.
        #[arg(long)]
        tcp: bool,
    },
    /// Export a block node (the export is named after the node).
    Export {
        /// The node to export.
        node: String,
        /// Let clients write.
        #[arg(long)]
        writable: bool,
    },
    /// Remove an export.
    Unexport {
        /// The export's name (its node's name).
        name: String,
    },
    /// List the exports.
    List,
    /// Stop the NBD server.
    Stop,
}

/// `device ...`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Add a device: `device add DRIVER --id ID [prop=value...]`.
    Add {
        /// The device driver (for example usb-tablet, virtio-rng-pci).
        driver: String,
        /// The device's id.
        #[arg(long)]
        id: String,
        /// Properties as prop=value.
        props: Vec<String>,
    },
    /// Remove a device, waiting until the guest has let it go.
    Remove {
        /// The device's id.
        id: String,
    },
    /// List the devices added with an id.
    List,
}

/// `chardev ...`.
#[derive(Debug, Subcommand)]
pub enum ChardevCommand {
    /// Add a chardev: `chardev add ID BACKEND [key=value...]`
    /// (for example `chardev add log0 ringbuf size=4096`).
    Add {
        /// The chardev's id.
        id: String,
        /// The backend type (ringbuf, socket, file, null, pty, ...).
        backend: String,
        /// The backend's options as key=value (a.b=c nests).
        options: Vec<String>,
    },
    /// Remove a chardev.
    Remove {
        /// The chardev's id.
        id: String,
    },
    /// List the chardevs.
    List,
}

/// `nic ...`.
#[derive(Debug, Subcommand)]
pub enum NicCommand {
    /// Add a network card and its backend, both named ID.
    Add {
        /// Names the backend and the device.
        id: String,
        /// The device model.
        #[arg(long, default_value = "virtio-net-pci")]
        model: String,
        /// The backend type (user, tap, ...).
        #[arg(long, default_value = "user")]
        netdev: String,
        /// The MAC address.
        #[arg(long)]
        mac: Option<String>,
        /// The bus to plug the device into.
        #[arg(long)]
        bus: Option<String>,
        /// Start with the link down.
        #[arg(long)]
        link_down: bool,
    },
    /// Remove a network card and its backend.
    Remove {
        /// The id given to `nic add`.
        id: String,
    },
    /// Set a card's link up or down.
    Link {
        /// The device's id.
        id: String,
        /// up or down.
        #[arg(value_parser = ["up", "down"])]
        state: String,
    },
}

/// `console`.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// The ring-buffer chardev.
    #[arg(default_value = "console0")]
    pub chardev: String,
    /// Keep reading until interrupted.
    #[arg(short, long)]
    pub follow: bool,
}

/// `screendump`.
#[derive(Debug, Args)]
pub struct ScreendumpArgs {
    /// The file QEMU writes.
    pub file: PathBuf,
    /// png or ppm.
    #[arg(long, default_value = "png")]
    pub format: qmpkit::qapi::types::ImageFormat,
    /// The display device (default: the first).
    #[arg(long)]
    pub device: Option<String>,
}

/// `dump-memory`.
#[derive(Debug, Args)]
pub struct DumpArgs {
    /// The file QEMU writes.
    pub file: PathBuf,
    /// elf, kdump-zlib, kdump-lzo, kdump-snappy, win-dmp.
    #[arg(long, default_value = "elf")]
    pub format: qmpkit::qapi::types::DumpGuestMemoryFormat,
}

/// `migrate ...`.
#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Send the VM: to a Unix socket path, a URI (tcp:, unix:, exec:, file:), or an fd.
    To {
        /// A socket path or a migration URI.
        #[arg(required_unless_present = "fd", conflicts_with = "fd")]
        target: Option<String>,
        /// Send over this inherited descriptor: a connected socket, or a file (`--fd 3 3>vm.state`).
        #[arg(long)]
        fd: Option<i32>,
        /// Return once the migration started.
        #[arg(long)]
        no_wait: bool,
    },
    /// Receive a VM (QEMU must run with `-incoming defer`).
    Incoming {
        /// A socket path or a migration URI to listen on.
        address: String,
        /// Wait until the migration completed.
        #[arg(long)]
        wait: bool,
    },
    /// Show the migration's state and figures.
    Status,
    /// Cancel the migration in progress.
    Cancel,
}

/// `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The QMP command.
    pub name: String,
    /// Its arguments: a JSON object, `-` to read it from stdin, or key=value pairs
    /// (typed from QEMU's schema; a.b=c nests, a.0=x makes a list, key:=JSON is verbatim).
    pub args: Vec<String>,
}

/// `events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only these events (repeat, or separate with commas).
    #[arg(long, value_delimiter = ',', value_name = "NAME")]
    pub filter: Vec<String>,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after the first event with this name (printed, filtered or not).
    #[arg(long, value_name = "NAME")]
    pub until: Option<String>,
}

/// `shell`.
#[derive(Debug, Args)]
pub struct ShellArgs {
    /// When stdin is not a terminal: run every line even after one fails
    /// (the exit status is still the first failure's).
    #[arg(long)]
    pub keep_going: bool,
    /// The history file (default: $XDG_STATE_HOME/qmpctl/history).
    #[arg(long, env = "QMPCTL_HISTORY")]
    pub history: Option<PathBuf>,
}

/// `tour`.
#[derive(Debug, Args)]
pub struct TourArgs {
    /// Keep the scratch files (images, screendump) in this directory.
    #[arg(long)]
    pub keep: Option<PathBuf>,
}
