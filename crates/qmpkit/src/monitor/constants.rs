//! Incus's `qmp` package's exported names, as constants.
//!
//! | Go | here |
//! | --- | --- |
//! | `EventAgentStarted` | [`EVENT_AGENT_STARTED`] |
//! | `EventAgentStopped` | [`EVENT_AGENT_STOPPED`] |
//! | `EventBlockJobCompleted` | [`EVENT_BLOCK_JOB_COMPLETED`] |
//! | `EventBlockJobError` | [`EVENT_BLOCK_JOB_ERROR`] |
//! | `EventDiskEjected` | [`EVENT_DISK_EJECTED`] |
//! | `EventRTCChange` | [`EVENT_RTC_CHANGE`] |
//! | `EventVMReset` | [`EVENT_VM_RESET`] |
//! | `EventVMShutdown` | [`EVENT_VM_SHUTDOWN`] |
//! | `EventVMShutdownReasonDisconnect` | [`SHUTDOWN_REASON_DISCONNECT`] |
//! | `EventVMShutdownReasonGuestShutdown` | [`SHUTDOWN_REASON_GUEST_SHUTDOWN`] |
//! | `EventVMShutdownReasonQuit` | [`SHUTDOWN_REASON_QUIT`] |
//! | `ExcludedCommands` | [`EXCLUDED_COMMANDS`] |
//! | `RingbufSize` | [`RINGBUF_SIZE`] (16 bytes: the size of the agent's ring buffer as Incus creates it, and how much Go reads at a time); our read size is [`DEFAULT_RINGBUF_READ_SIZE`], a setting: [`MonitorOptions::ringbuf_read_size`](super::MonitorOptions::ringbuf_read_size) |

use std::time::Duration;

/// Event a monitor makes when the guest agent announces itself (`STARTED` on its serial port).
pub const EVENT_AGENT_STARTED: &str = "AGENT-STARTED";

/// Event a monitor makes when the guest agent says it stopped (`STOPPED` on its serial port).
pub const EVENT_AGENT_STOPPED: &str = "AGENT-STOPPED";

/// QEMU's event for a block job that finished.
pub const EVENT_BLOCK_JOB_COMPLETED: &str = "BLOCK_JOB_COMPLETED";

/// QEMU's event for a block job that hit an I/O error.
pub const EVENT_BLOCK_JOB_ERROR: &str = "BLOCK_JOB_ERROR";

/// QEMU's event for a removable medium's tray moving (the guest or the host ejected a disc).
pub const EVENT_DISK_EJECTED: &str = "DEVICE_TRAY_MOVED";

/// QEMU's event for the guest changing its real-time clock.
pub const EVENT_RTC_CHANGE: &str = "RTC_CHANGE";

/// QEMU's event for a reset of the VM (a guest reboot, or `system_reset`).
pub const EVENT_VM_RESET: &str = "RESET";

/// QEMU's event for the VM shutting down; a monitor synthesises one with
/// reason [`SHUTDOWN_REASON_DISCONNECT`] when QEMU vanishes without sending it.
pub const EVENT_VM_SHUTDOWN: &str = "SHUTDOWN";

/// The `reason` of a SHUTDOWN that a monitor synthesised because the
/// connection dropped while the VM was initialized.
pub const SHUTDOWN_REASON_DISCONNECT: &str = "disconnect";

/// The `reason` QEMU gives when the guest shut itself down (for example after an ACPI power-down).
pub const SHUTDOWN_REASON_GUEST_SHUTDOWN: &str = "guest-shutdown";

/// Incus's `qmp` package's name for a shutdown caused by QMP `quit`. QEMU itself
/// reports such a shutdown as [`SHUTDOWN_REASON_HOST_QMP_QUIT`].
pub const SHUTDOWN_REASON_QUIT: &str = "quit";

/// The `reason` QEMU 4.0 and later give for a shutdown caused by QMP `quit`.
pub const SHUTDOWN_REASON_HOST_QMP_QUIT: &str = "host-qmp-quit";

/// Commands kept out of the traffic log: the agent poller's frequent ring-buffer reads.
pub const EXCLUDED_COMMANDS: &[&str] = crate::DEFAULT_LOG_EXCLUDED;

/// The size in bytes of the agent's serial ring buffer as Incus creates it
/// (`-chardev ringbuf,id=qemu_serial-chardev,size=16`), which is also how
/// much Incus's Go package `qmp` reads at a time (the Go `RingbufSize`). When the
/// agent writes more than this between two reads, QEMU keeps the newest 16
/// bytes, so a read may start inside a line.
pub const RINGBUF_SIZE: usize = 16;

/// How many bytes one read of the agent's serial ring buffer asks for,
/// unless set otherwise: 16 KiB, so that one read drains Incus's 16-byte
/// ring buffer and any other of up to that size. (Go reads [`RINGBUF_SIZE`]
/// bytes, which from a larger ring buffer is not all there is.)
pub const DEFAULT_RINGBUF_READ_SIZE: usize = 16 * 1024;

/// How long after a deliberate reset ([`Monitor::reset`](super::Monitor::reset),
/// [`Monitor::expect_reset`](super::Monitor::expect_reset)), by QEMU's
/// timestamps, a guest reset counts as the firmware's part of it.
///
/// On q35 with SeaBIOS every reset is followed, 40-150 ms later, by a
/// second `RESET {guest: true, reason: "guest-reset"}`: the firmware turning
/// the warm start into a cold one, long before any guest OS runs.
/// [`Monitor::handle_reset`](super::Monitor::handle_reset) is true for that
/// one too. Only the first guest reset after a deliberate one is taken, and
/// only within this window (counted from the VM's next `RESUME` when it was
/// paused), which no OS can boot and reboot in.
pub const FIRMWARE_RESET_WINDOW: Duration = Duration::from_secs(5);

/// How often the agent's serial ring buffer is read when nothing else prompts a read.
pub const DEFAULT_AGENT_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// Queue length of a monitor's own event subscription (its handler's backlog).
pub const DEFAULT_MONITOR_EVENT_QUEUE: usize = 65_536;

/// Queue length of a per-device event channel ([`Monitor::create_event_channel`](super::Monitor::create_event_channel)).
pub const EVENT_CHANNEL_CAPACITY: usize = 64;
