//! Connecting: options, the handshake, and the task that owns the socket.

pub(crate) mod address;
mod call;
mod clock;
mod driver;
mod handshake;
mod inflight;
mod listener;
mod requests;
mod socket;
#[cfg(feature = "traffic-log")]
pub(crate) mod traffic_log;
#[cfg(not(feature = "traffic-log"))]
#[path = "traffic_log_off.rs"]
pub(crate) mod traffic_log;
pub(crate) mod transport;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::event::{Event, Subscribers};
use crate::wire::Greeting;

pub use address::Address;
pub(crate) use call::{Call, Got, NewCall, Reply, Waiter};
pub use listener::Listener;
pub(crate) use requests::Sender;
/// The long-path-aware Unix connect, for the guest agent.
pub(crate) use socket::connect as connect_unix;
use transport::Transport;

/// What a connection's task and its handles share: what the handshake
/// found, and what the task keeps up to date for the handles to read.
pub(crate) struct Shared {
    pub config: Arc<Config>,
    pub greeting: Greeting,
    pub oob: bool,
    pub subscribers: Subscribers,
    pub closed: ClosedFlag,
    /// Why the connection ended. Boxed: an `Error` is 72 bytes, and only
    /// an ended connection has one.
    pub close_reason: OnceLock<Box<Error>>,
    /// QEMU's last SHUTDOWN event, unless a RESUME came after it.
    pub last_shutdown: Mutex<Option<Event>>,
    /// `None` when file descriptors can be passed; otherwise the kind of
    /// stream that cannot pass them, for the error.
    pub no_fd_passing: Option<&'static str>,
    /// Requests on their way from the callers to the task.
    pub requests: requests::Requests,
}

/// Whether the connection has ended, and the wake-up of those waiting for
/// it to: a flag and a `Notify` held inline, where a watch channel would be
/// an allocation of its own (~340 bytes for every connection).
#[derive(Default)]
pub(crate) struct ClosedFlag {
    closed: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl ClosedFlag {
    /// True once the connection has ended.
    pub fn is_set(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks the connection ended and wakes every waiter.
    pub fn set(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Returns once the connection has ended.
    pub async fn wait(&self) {
        loop {
            // Registered before the flag is read, so that a `set` between
            // the two still wakes this waiter.
            let mut notified = std::pin::pin!(self.notify.notified());
            notified.as_mut().enable();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

/// The default size limit of one message from QEMU: 64 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;

/// The default budget of a command without a budget of its own.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The default budget of the whole handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The default budget of commands that legitimately take long on a busy
/// host. Too tight a budget fails healthy VMs; too loose a one only delays
/// the report of a frozen QEMU.
const SLOW_COMMANDS: &[(&str, u64)] = &[
    ("dump-guest-memory", 600),
    ("blockdev-create", 300),
    ("blockdev-add", 120),
    ("blockdev-del", 120),
    ("device_add", 120),
    ("device_del", 120),
    ("cont", 120),
    ("stop", 120),
    ("transaction", 120),
    ("block_resize", 120),
    ("x-blockdev-change", 120),
    ("object-add", 120),
    ("system_reset", 60),
    ("screendump", 60),
    ("query-migrate", 60),
    ("migrate", 60),
    ("migrate-incoming", 60),
];

/// What a connection's defaults say of a command, from its name alone: its
/// budget unless the user set one, and whether the traffic log leaves it
/// out unless told otherwise. For a typed command it is worked out at
/// compile time (`const { CommandDefaults::of(C::NAME) }`): looking the name
/// up on every call cost some 85 instructions per command.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CommandDefaults {
    slow_budget: Option<Duration>,
    log_excluded: bool,
}

impl CommandDefaults {
    /// The defaults for the command `name`.
    pub(crate) const fn of(name: &str) -> Self {
        let mut slow_budget = None;
        let mut i = 0;
        while i < SLOW_COMMANDS.len() {
            if same_str(SLOW_COMMANDS[i].0, name) {
                slow_budget = Some(Duration::from_secs(SLOW_COMMANDS[i].1));
                break;
            }
            i += 1;
        }
        let mut log_excluded = false;
        let mut i = 0;
        while i < DEFAULT_LOG_EXCLUDED.len() {
            if same_str(DEFAULT_LOG_EXCLUDED[i], name) {
                log_excluded = true;
                break;
            }
            i += 1;
        }
        CommandDefaults {
            slow_budget,
            log_excluded,
        }
    }
}

/// `a == b`, as a `const fn` (`str`'s `==` is not one).
const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The commands kept out of the traffic log unless told otherwise (the Go
/// package's `ExcludedCommands`).
pub const DEFAULT_LOG_EXCLUDED: &[&str] = &["ringbuf-read"];

/// Settings shared by a connection and its handles. Connections made from
/// one [`ConnectOptions`] share one copy.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub default_timeout: Duration,
    /// Budgets set by the user, by command name (usually empty).
    pub command_timeouts: HashMap<String, Duration>,
    pub max_message_size: usize,
    /// `None` means [`DEFAULT_LOG_EXCLUDED`].
    pub log_excluded: Option<Vec<String>>,
    /// The server answers in-band commands in the order it read them.
    pub replies_in_order: bool,
    /// Typed calls are checked against the server's schema before sending.
    pub check_typed_calls: bool,
}

impl Config {
    /// The budget of a command by name.
    pub(crate) fn timeout_for(&self, name: &str, defaults: CommandDefaults) -> Duration {
        if !self.command_timeouts.is_empty() {
            if let Some(t) = self.command_timeouts.get(name) {
                return *t;
            }
        }
        defaults.slow_budget.unwrap_or(self.default_timeout)
    }

    /// True when the traffic log leaves this command out.
    pub(crate) fn log_excludes(&self, name: &str, defaults: CommandDefaults) -> bool {
        match &self.log_excluded {
            Some(list) => list.iter().any(|x| x == name),
            None => defaults.log_excluded,
        }
    }
}

/// How to connect: timeouts, size limit, capabilities, traffic log.
///
/// ```no_run
/// # async fn f() -> qmpkit::Result<()> {
/// use std::time::Duration;
/// let client = qmpkit::ConnectOptions::new()
///     .handshake_timeout(Duration::from_secs(2))
///     .command_timeout(Duration::from_secs(10))
///     .timeout_for("blockdev-add", Duration::from_secs(300))
///     .traffic_log("/var/log/vm1-qmp.log")
///     .connect("/run/vm1/qmp.sock")
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    handshake_timeout: Duration,
    oob: bool,
    log_file: Option<PathBuf>,
    config: Arc<Config>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnectOptions {
    /// The defaults: 5 s handshake, 30 s per command (60 to 600 s for known
    /// slow commands such as `blockdev-add`, `device_add` or
    /// `dump-guest-memory`), 64 MiB messages, `oob` enabled when offered, no log.
    pub fn new() -> Self {
        // Every connection made with default settings shares one copy of them.
        static DEFAULT_CONFIG: std::sync::LazyLock<Arc<Config>> = std::sync::LazyLock::new(|| {
            Arc::new(Config {
                default_timeout: DEFAULT_COMMAND_TIMEOUT,
                command_timeouts: HashMap::new(),
                max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
                log_excluded: None,
                replies_in_order: true,
                check_typed_calls: true,
            })
        });
        ConnectOptions {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            oob: true,
            log_file: None,
            config: DEFAULT_CONFIG.clone(),
        }
    }

    /// The budget for connecting, reading the greeting and negotiating capabilities.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The budget of every command that has no budget of its own.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.config).default_timeout = timeout;
        self
    }

    /// The budget of one command by name, overriding the default.
    pub fn timeout_for(mut self, command: &str, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.config)
            .command_timeouts
            .insert(command.to_owned(), timeout);
        self
    }

    /// The largest message accepted from QEMU. A larger one fails the command
    /// it answers with [`Error::MessageTooLarge`] and is skipped.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).max_message_size = bytes;
        self
    }

    /// Whether to enable out-of-band execution when QEMU offers it (default
    /// true). With it, QEMU queues up to 8 commands, so pipelining pays off.
    pub fn oob(mut self, enable: bool) -> Self {
        self.oob = enable;
        self
    }

    /// Whether the server answers in-band commands in the order it read
    /// them, as QEMU does (default true). Then a reply to a later command
    /// proves an earlier unanswered one's reply lost: its caller gets
    /// [`Error::ReplyLost`] at once instead of waiting out its budget, and
    /// its place in QEMU's queue is freed. Set it to false only for a
    /// server (a proxy, say) that may reorder replies; replies are matched
    /// by id either way.
    pub fn replies_in_order(mut self, in_order: bool) -> Self {
        Arc::make_mut(&mut self.config).replies_in_order = in_order;
        self
    }

    /// Whether a typed call ([`crate::Client::execute`]) is first checked
    /// against the server's own schema (default true). The first typed call
    /// of a connection fetches `query-qmp-schema` (once; a few ms on QEMU
    /// 10); from then on a call to a command the server has in full costs
    /// one lookup. A call using a command or argument the server lacks
    /// fails with [`Error::Unsupported`], naming it and the QEMU version
    /// that added it, instead of being sent. A server that does not answer
    /// `query-qmp-schema` is not checked. Calls by name
    /// ([`crate::Client::call`], [`crate::Client::execute_raw`]) are never
    /// checked.
    pub fn check_typed_calls(mut self, check: bool) -> Self {
        Arc::make_mut(&mut self.config).check_typed_calls = check;
        self
    }

    /// Appends a transcript of the traffic to this file in Incus's `qmp` package's
    /// format (`[2006-01-02T15:04:05+07:00] QUERY: ...`, `REPLY:` and an empty
    /// line, `Event:`; local time), mode 0600. Unlike Go's, it blanks out
    /// secrets and also logs error replies. Left out, as in Go: the commands
    /// of [`ConnectOptions::log_excluded`], calls that pass file descriptors,
    /// and `VSERPORT_CHANGE` events. If the file cannot be opened, there is
    /// no log and no error.
    #[cfg(feature = "traffic-log")]
    pub fn traffic_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// Commands kept out of the traffic log (default: `ringbuf-read`).
    pub fn log_excluded<I, S>(mut self, commands: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Arc::make_mut(&mut self.config).log_excluded = Some(commands.into_iter().map(Into::into).collect());
        self
    }

    /// Connects to `address`, negotiates capabilities and starts the
    /// connection's task: everything [`ConnectOptions::connect_to`] does but
    /// making the handle.
    pub(crate) async fn open(&self, address: &Address) -> Result<(Sender, Arc<Shared>)> {
        let peer = address.to_string();
        let open = self.open_over(&peer, Some(address), Transport::connect(address));
        crate::diag::in_connect_span(address, open).await
    }

    /// Negotiates over the stream `connect` yields and starts the
    /// connection's task; the handshake budget bounds both. `peer` names
    /// the other end in a timeout's message; `address` is where `connect`
    /// connects, if it does (a budget spent before it connected is then a
    /// connect error, not a handshake error).
    pub(crate) async fn open_over(
        &self,
        peer: &str,
        address: Option<&Address>,
        connect: impl std::future::Future<Output = Result<Transport>>,
    ) -> Result<(Sender, Arc<Shared>)> {
        let started = std::time::Instant::now();
        let budget = self.handshake_timeout;
        let mut connected = false;
        let attempt = async {
            let stream = connect.await?;
            connected = true;
            handshake::run(stream, self.oob, self.config.max_message_size).await
        };
        let done = match tokio::time::timeout(budget, attempt).await {
            Ok(done) => done?,
            Err(_) if !connected && address.is_some() => {
                let source = Arc::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("not connected within {budget:?}, the handshake budget (packets dropped by a firewall, or a host that is down?)"),
                ));
                return Err(match address {
                    Some(Address::Unix(path)) => Error::Connect {
                        path: path.clone(),
                        source,
                    },
                    Some(Address::Tcp(text)) => Error::ConnectTcp {
                        address: text.clone(),
                        source,
                    },
                    None => unreachable!("checked above"),
                });
            }
            Err(_) => {
                return Err(Error::HandshakeTimeout {
                    peer: peer.to_string(),
                    budget,
                })
            }
        };
        let log = self.log_file.as_deref().and_then(traffic_log::TrafficLog::open);
        let no_fd_passing = (!done.stream.passes_fds()).then(|| done.stream.kind());
        let shared = Arc::new(Shared {
            config: self.config.clone(),
            greeting: done.greeting.clone(),
            oob: done.oob,
            subscribers: Subscribers::new(),
            closed: ClosedFlag::default(),
            close_reason: OnceLock::new(),
            last_shutdown: Mutex::new(None),
            no_fd_passing,
            requests: Default::default(),
        });
        crate::diag::debug!(
            elapsed_us = started.elapsed().as_micros() as u64,
            version = %shared.greeting.version,
            oob = shared.oob,
            "connected"
        );
        let tx = driver::spawn(done, shared.clone(), log);
        Ok((tx, shared))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{ClosedFlag, CommandDefaults, ConnectOptions};

    #[tokio::test]
    async fn a_closed_flag_wakes_those_already_waiting_and_answers_later_ones_at_once() {
        let flag = Arc::new(ClosedFlag::default());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let flag = flag.clone();
                tokio::spawn(async move { flag.wait().await })
            })
            .collect();
        // On this one-thread runtime, yielding lets each waiter run up to
        // its wait, registered with the flag.
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(!flag.is_set());
        assert!(
            waiters.iter().all(|w| !w.is_finished()),
            "nobody is woken before the close"
        );
        flag.set();
        assert!(flag.is_set());
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("a waiter from before the close is woken")
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), flag.wait())
            .await
            .expect("a wait after the close ends at once");
    }

    #[test]
    fn command_defaults_give_slow_commands_their_budget_and_leave_ringbuf_read_out_of_the_log() {
        const AT_COMPILE_TIME: CommandDefaults = CommandDefaults::of("dump-guest-memory");
        assert_eq!(
            AT_COMPILE_TIME,
            CommandDefaults::of(&String::from("dump-guest-memory"))
        );
        assert_eq!(AT_COMPILE_TIME.slow_budget, Some(Duration::from_secs(600)));
        for (name, secs) in [("blockdev-create", 300), ("device_del", 120), ("migrate", 60)] {
            assert_eq!(
                CommandDefaults::of(name).slow_budget,
                Some(Duration::from_secs(secs)),
                "{name}"
            );
        }
        // Neither a prefix nor an extension of a slow command's name is one.
        for name in ["query-status", "migrat", "migrate-x", "", "stop "] {
            assert_eq!(CommandDefaults::of(name).slow_budget, None, "{name:?}");
        }
        assert!(CommandDefaults::of("ringbuf-read").log_excluded);
        assert!(!CommandDefaults::of("ringbuf-write").log_excluded);

        let mut config = (*ConnectOptions::new()
            .command_timeout(Duration::from_secs(7))
            .config)
            .clone();
        let status = CommandDefaults::of("query-status");
        assert_eq!(config.timeout_for("query-status", status), Duration::from_secs(7));
        assert_eq!(
            config.timeout_for("migrate", CommandDefaults::of("migrate")),
            Duration::from_secs(60)
        );
        config
            .command_timeouts
            .insert("migrate".into(), Duration::from_secs(5));
        assert_eq!(
            config.timeout_for("migrate", CommandDefaults::of("migrate")),
            Duration::from_secs(5),
            "the user's budget wins"
        );
        assert!(config.log_excludes("ringbuf-read", CommandDefaults::of("ringbuf-read")));
        config.log_excluded = Some(vec!["query-status".into()]);
        assert!(
            !config.log_excludes("ringbuf-read", CommandDefaults::of("ringbuf-read")),
            "the user's list replaces the default"
        );
        assert!(config.log_excludes("query-status", status));
    }
}
