//! The cheap, cloneable handle through which commands are sent.

use std::borrow::Cow;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::connection::transport::Transport;
use crate::connection::{
    Address, Call, CommandDefaults, ConnectOptions, Got, NewCall, Reply, Sender, Shared, Waiter,
};
use crate::error::{Error, Result};
use crate::event::{EventFilter, EventStream};
use crate::schema::Schema;
use crate::wire::{encode_request, CommandName, Greeting};

// The trait and `Empty` live in qmpkit-qapi, next to the generated commands
// that implement it; `qmpkit::Command` and `qmpkit::Empty` re-export them.
pub use qmpkit_qapi::{Command, Empty};

/// The most file descriptors one call may pass: Linux refuses more than
/// this in one `sendmsg` (SCM_MAX_FD).
pub const MAX_FDS_PER_CALL: usize = 253;

/// Per-call settings: a budget of its own, file descriptors to pass,
/// out-of-band execution, and whether the traffic log records it.
#[derive(Debug, Default)]
pub struct CallOptions {
    timeout: Option<Duration>,
    fds: Vec<OwnedFd>,
    oob: bool,
    no_log: bool,
}

impl CallOptions {
    /// The defaults: the connection's budget for this command, no fds, in-band, logged.
    pub fn new() -> Self {
        Self::default()
    }

    /// The budget of this call, overriding the connection's.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Passes these file descriptors with the command (SCM_RIGHTS, on the
    /// same `sendmsg` as the command's first byte), for `getfd`, `add-fd` and
    /// the like. They are moved in: the client closes its copies once they
    /// are sent, or when the call fails before sending. More than
    /// [`MAX_FDS_PER_CALL`] fail the call with [`Error::TooManyFds`] before
    /// anything is sent. A call that passes fds is kept out of the traffic
    /// log, as Incus's `qmp` package's `SendFile` and `SendFileWithFDSet` are.
    pub fn fds(mut self, fds: impl IntoIterator<Item = OwnedFd>) -> Self {
        self.fds.extend(fds);
        self
    }

    /// Sends the command with `exec-oob` (it jumps QEMU's queue; needs the
    /// `oob` capability and a command that allows it).
    pub fn oob(mut self, oob: bool) -> Self {
        self.oob = oob;
        self
    }

    /// Keeps this call out of the traffic log.
    pub fn unlogged(mut self) -> Self {
        self.no_log = true;
        self
    }
}

impl ConnectOptions {
    /// Connects to the Unix socket at `path` and negotiates capabilities.
    /// The path is taken as it is, never parsed as an [`Address`]: use
    /// [`ConnectOptions::connect_to`] for TCP or for text a user typed.
    ///
    /// The whole of it has the handshake budget; on failure nothing is left
    /// behind (socket, log file, task). Events that QEMU sends right after the
    /// handshake are kept for the first subscriber.
    pub async fn connect(&self, path: impl AsRef<Path>) -> Result<Client> {
        self.connect_to(Address::Unix(path.as_ref().to_owned())).await
    }

    /// Connects to a Unix socket or a TCP address (QEMU's
    /// `-qmp tcp:HOST:PORT,server=on,wait=off`) and negotiates capabilities.
    ///
    /// The handshake budget bounds the whole of it: name resolution,
    /// connecting (each of a name's addresses in turn) and the handshake.
    /// Errors are typed: [`Error::Connect`] (Unix), [`Error::ConnectTcp`]
    /// (refused, unreachable, or `TimedOut` when nothing answered within the
    /// budget: see its source's kind), [`Error::Resolve`] (DNS),
    /// [`Error::Handshake`] (not QMP, or silent); all but the last
    /// answer [`Error::is_unreachable`]. Over TCP, `TCP_NODELAY` is set, and
    /// calls that pass file descriptors fail with
    /// [`Error::FdPassingUnsupported`] before anything is sent.
    ///
    /// ```no_run
    /// # async fn f() -> qmpkit::Result<()> {
    /// use qmpkit::{Address, ConnectOptions};
    /// let options = ConnectOptions::new();
    /// let tcp = options.connect_to("127.0.0.1:4444".parse::<Address>()?).await?;
    /// let unix = options.connect_to(Address::unix("/run/vm1/qmp.sock")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_to(&self, address: impl Into<Address>) -> Result<Client> {
        let address = address.into();
        let (tx, shared) = self.open(&address).await?;
        Ok(Client::new(tx, shared, Some(address)))
    }

    /// Speaks QMP over a Unix socket that is already connected: from a
    /// `socketpair`, systemd socket activation, a jailer that hands the
    /// monitor over, or `UnixStream::from(OwnedFd)`. Either std's
    /// [`UnixStream`](std::os::unix::net::UnixStream) (made non-blocking
    /// here) or tokio's. File descriptors can be passed as over
    /// [`ConnectOptions::connect`]. The handshake budget bounds the handshake;
    /// a stream whose peer is gone fails with [`Error::Handshake`].
    ///
    /// ```no_run
    /// # async fn f() -> qmpkit::Result<()> {
    /// let stream = std::os::unix::net::UnixStream::connect("/run/vm1/qmp.sock")?;
    /// let client = qmpkit::ConnectOptions::new().connect_stream(stream).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_stream(&self, stream: impl IntoUnixStream) -> Result<Client> {
        let stream = stream.into_tokio()?;
        let address = stream
            .peer_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| Address::Unix(p.to_owned())));
        let peer = address
            .as_ref()
            .map_or_else(|| "the Unix socket given".to_owned(), |a| a.to_string());
        let (tx, shared) = self
            .open_over(&peer, None, std::future::ready(Ok(Transport::Unix(stream))))
            .await?;
        Ok(Client::new(tx, shared, address))
    }

    /// Speaks QMP over any byte stream: a TLS or SSH tunnel, an in-memory
    /// pipe, the halves of a split socket (`tokio::io::join`), a TCP stream
    /// connected by hand. Bytes written are flushed before the client waits
    /// for the reply. Calls that pass file descriptors fail with
    /// [`Error::FdPassingUnsupported`] before anything is sent (use
    /// [`ConnectOptions::connect_stream`] for a Unix socket). The handshake
    /// budget bounds the handshake.
    ///
    /// ```no_run
    /// # async fn f() -> qmpkit::Result<()> {
    /// let tcp = tokio::net::TcpStream::connect("127.0.0.1:4444").await?;
    /// let (read, write) = tcp.into_split();
    /// let client = qmpkit::ConnectOptions::new().connect_io(tokio::io::join(read, write)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_io<S>(&self, stream: S) -> Result<Client>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (tx, shared) = self
            .open_over(
                "the stream given",
                None,
                std::future::ready(Ok(Transport::io(stream))),
            )
            .await?;
        Ok(Client::new(tx, shared, None))
    }
}

/// A connected Unix socket that [`ConnectOptions::connect_stream`] takes:
/// std's [`UnixStream`](std::os::unix::net::UnixStream) or tokio's
/// [`UnixStream`](tokio::net::UnixStream).
pub trait IntoUnixStream: sealed::Sealed {}

mod sealed {
    /// Turns the stream into tokio's (inside a runtime).
    pub trait Sealed {
        fn into_tokio(self) -> std::io::Result<tokio::net::UnixStream>;
    }
}

impl IntoUnixStream for std::os::unix::net::UnixStream {}

impl sealed::Sealed for std::os::unix::net::UnixStream {
    fn into_tokio(self) -> std::io::Result<tokio::net::UnixStream> {
        self.set_nonblocking(true)?;
        tokio::net::UnixStream::from_std(self)
    }
}

impl IntoUnixStream for tokio::net::UnixStream {}

impl sealed::Sealed for tokio::net::UnixStream {
    fn into_tokio(self) -> std::io::Result<tokio::net::UnixStream> {
        Ok(self)
    }
}

struct Inner {
    // Dropping the last handle drops this sender, which ends the task.
    tx: Sender,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    /// Where the client connected, when known (not for a stream given to
    /// `connect_io`, or an unnamed socket).
    address: Option<Address>,
    /// Made by the first call that needs the schema: most connections
    /// never fetch it, and its cell and checks are 160 bytes.
    schema: std::sync::OnceLock<Box<SchemaState>>,
}

/// The server's schema, fetched once, and what typed calls learned from it.
#[derive(Default)]
struct SchemaState {
    schema: tokio::sync::OnceCell<Arc<Schema>>,
    checks: crate::schema::check::Checks,
}

/// A connection to a QMP server. Cheap to clone; every clone talks over the
/// same socket, and any number of commands may be in flight from any number
/// of tasks at once.
///
/// ```no_run
/// # async fn f() -> qmpkit::Result<()> {
/// let client = qmpkit::Client::connect("/run/vm1/qmp.sock").await?;
/// let status: serde_json::Value = client.execute_raw("query-status", serde_json::json!({})).await?;
/// println!("{}", status["status"]);
/// let mut events = client.events();
/// client.execute_raw("stop", serde_json::Value::Null).await?;
/// println!("{:?}", events.next().await);
/// # Ok(()) }
/// ```
///
/// The connection closes when QEMU closes it, on [`Client::disconnect`], or
/// when the last handle is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.inner.address)
            .field("version", &self.inner.shared.greeting.version)
            .field("oob", &self.inner.shared.oob)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Client {
    pub(crate) fn new(tx: Sender, shared: Arc<Shared>, address: Option<Address>) -> Self {
        Client {
            inner: Arc::new(Inner {
                tx,
                shared,
                next_id: AtomicU64::new(1),
                address,
                schema: Default::default(),
            }),
        }
    }

    /// Connects to a Unix socket with the default [`ConnectOptions`].
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client> {
        ConnectOptions::new().connect(path).await
    }

    /// Connects to a Unix socket or TCP address with the default
    /// [`ConnectOptions`]; see [`ConnectOptions::connect_to`].
    ///
    /// ```no_run
    /// # async fn f() -> qmpkit::Result<()> {
    /// let client = qmpkit::Client::connect_to("tcp:127.0.0.1:4444".parse::<qmpkit::Address>()?).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_to(address: impl Into<Address>) -> Result<Client> {
        ConnectOptions::new().connect_to(address).await
    }

    /// Options for connecting.
    pub fn options() -> ConnectOptions {
        ConnectOptions::new()
    }

    /// The server's greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.shared.greeting
    }

    /// True when out-of-band execution was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.inner.shared.oob
    }

    /// The Unix socket path this client connected to (or accepted on);
    /// empty for TCP and for a stream without a path.
    pub fn path(&self) -> &Path {
        self.inner
            .address
            .as_ref()
            .and_then(Address::as_path)
            .unwrap_or(Path::new(""))
    }

    /// Where this client connected (or the [`Listener`](crate::Listener)
    /// that accepted it); `None` for a stream given to
    /// [`ConnectOptions::connect_io`] or an unnamed Unix socket.
    pub fn address(&self) -> Option<&Address> {
        self.inner.address.as_ref()
    }

    /// True when calls may pass file descriptors ([`CallOptions::fds`]):
    /// the connection is a Unix socket.
    pub fn passes_fds(&self) -> bool {
        self.inner.shared.no_fd_passing.is_none()
    }

    /// Runs a typed command.
    pub async fn execute<C: Command>(&self, command: &C) -> Result<C::Returns> {
        self.execute_with(command, CallOptions::new()).await
    }

    /// Runs a typed command with per-call options.
    pub async fn execute_with<C: Command>(&self, command: &C, options: CallOptions) -> Result<C::Returns> {
        if self.inner.shared.config.check_typed_calls {
            self.check(command).await?;
        }
        self.run_with(command, options).await
    }

    /// A generated command, unchecked: the typed operations (the Go
    /// package's) run their commands through this, so that they behave the
    /// same whether or not the schema was fetched, and never fetch it.
    ///
    /// Unlike a public call, this sends when called, not when first polled:
    /// every caller is an `async fn` that awaits it at once, and the future
    /// then holds only the wait for the reply (see [`Typed`]).
    pub(crate) fn run<C: Command>(&self, command: &C) -> Typed<'_, C::Returns> {
        self.run_as(command, CallOptions::new())
    }

    /// A generated command whose reply decodes into a type of the caller's
    /// (the typed operations keep their own result types), unchecked. Sends
    /// when called, as [`Client::run`].
    pub(crate) fn run_as<C: Command, R: DeserializeOwned>(
        &self,
        command: &C,
        options: CallOptions,
    ) -> Typed<'_, R> {
        let sent = self.send(
            Cow::Borrowed(C::NAME),
            const { CommandDefaults::of(C::NAME) },
            |out, id, oob| encode_request(out, const { CommandName::new(C::NAME) }, command, id, oob),
            options,
        );
        Typed {
            sent: sent.map_err(|e| Some(Box::new(e))),
            name: C::NAME,
            returns: std::marker::PhantomData,
        }
    }

    /// [`Client::run`] with per-call options.
    pub(crate) fn run_with<C: Command>(&self, command: &C, options: CallOptions) -> Typed<'_, C::Returns> {
        self.run_as(command, options)
    }

    /// Runs a command by name with any serialisable arguments and decodes the
    /// reply into any type (`serde_json::Value` for raw JSON).
    pub async fn call<A, R>(&self, name: &str, args: &A) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.call_with(name, args, CallOptions::new()).await
    }

    /// [`Client::call`] with per-call options.
    pub async fn call_with<A, R>(&self, name: &str, args: &A, options: CallOptions) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let raw = self
            .send(
                Cow::Owned(name.to_owned()),
                CommandDefaults::of(name),
                |out, id, oob| encode_request(out, CommandName::new(name), args, id, oob),
                options,
            )?
            .await?;
        raw.decode(name)
    }

    /// Runs a command by name with JSON arguments (`Value::Null` for none)
    /// and returns QEMU's `return` value as JSON.
    pub async fn execute_raw(&self, name: &str, args: Value) -> Result<Value> {
        self.call(name, &args).await
    }

    /// Runs a whole JSON request as text, such as
    /// `{"execute": "query-status"}`. Any `id` in it is replaced by the
    /// client's own (replies are matched by id). `exec-oob` requests are sent
    /// out-of-band. Invalid JSON is refused before anything is sent.
    pub async fn execute_json(&self, request: &str) -> Result<Value> {
        self.execute_json_with(request, CallOptions::new()).await
    }

    /// [`Client::execute_json`] with per-call options.
    pub async fn execute_json_with(&self, request: &str, options: CallOptions) -> Result<Value> {
        let mut obj: serde_json::Map<String, Value> = serde_json::from_str(request)
            .map_err(|e| Error::InvalidRequest(format!("not a JSON object: {e}")))?;
        obj.remove("id");
        let (name, oob) = match (obj.remove("execute"), obj.remove("exec-oob")) {
            (Some(Value::String(n)), None) => (n, false),
            (None, Some(Value::String(n))) => (n, true),
            _ => {
                return Err(Error::InvalidRequest(
                    "a request needs exactly one of \"execute\" or \"exec-oob\" naming the command".into(),
                ))
            }
        };
        let args = obj.remove("arguments").unwrap_or(Value::Null);
        if let Some(extra) = obj.keys().next() {
            return Err(Error::InvalidRequest(format!("unknown request member {extra:?}")));
        }
        self.call_with(&name, &args, options.oob(oob)).await
    }

    /// Subscribes to every event. See [`Client::subscribe`].
    pub fn events(&self) -> EventStream {
        self.subscribe(EventFilter::all())
    }

    /// Subscribes to events. Each subscription has its own bounded queue; the
    /// connection never waits for a subscriber, and one that falls behind is
    /// told how many events it missed. The first subscription also receives
    /// the events that arrived before it (from the handshake on).
    pub fn subscribe(&self, filter: EventFilter) -> EventStream {
        self.inner.shared.subscribers.subscribe(filter)
    }

    /// The `SHUTDOWN` event QEMU sent on this connection, unless the VM ran
    /// again after it (a `RESUME`). Kept by the connection itself, so it is
    /// known even to someone who was not subscribed, or whose queue dropped
    /// it: after a disconnect it tells a shutdown QEMU announced from a crash.
    pub fn shutdown_event(&self) -> Option<crate::event::Event> {
        self.inner
            .shared
            .last_shutdown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed.is_set()
    }

    /// Waits until the connection is gone and returns why.
    pub async fn closed(&self) -> Error {
        self.inner.shared.closed.wait().await;
        self.close_reason()
    }

    fn close_reason(&self) -> Error {
        self.inner
            .shared
            .close_reason
            .get()
            .map(|e| (**e).clone())
            .unwrap_or_else(|| Error::disconnected("connection closed"))
    }

    /// Closes the connection: pending commands fail with
    /// [`Error::Disconnected`], later ones fail at once, event streams end.
    pub fn disconnect(&self) {
        self.inner.tx.disconnect();
    }

    /// Returns a fresh id from the connection's counter (Incus's `qmp` package's
    /// `IncreaseID`). The client numbers its own requests from the same counter.
    pub fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The server's schema, fetched on first use and kept for the connection
    /// (kept out of the traffic log).
    pub async fn schema(&self) -> Result<Arc<Schema>> {
        self.schema_state()
            .schema
            .get_or_try_init(|| async {
                // Kept out of the traffic log: fetched on the library's own
                // account (by the first typed call), and a reply of some
                // 200 KB would swamp the operator's transcript.
                let reply: Value = self
                    .call_with("query-qmp-schema", &(), CallOptions::new().unlogged())
                    .await?;
                Ok(Arc::new(Schema::from_reply(&reply)))
            })
            .await
            .cloned()
    }

    fn schema_state(&self) -> &SchemaState {
        self.inner.schema.get_or_init(Box::default)
    }

    /// Checks a typed call against the server's schema without sending it:
    /// [`Error::Unsupported`] when the server lacks its command or an
    /// argument it sets (what [`Client::execute`] does first unless
    /// [`ConnectOptions::check_typed_calls`] turns it off).
    ///
    /// ```no_run
    /// # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
    /// use qmpkit::qapi::commands::QueryStats;
    /// use qmpkit::qapi::types::{StatsFilter, StatsFilterBranch, StatsTarget};
    /// let query = QueryStats(StatsFilter { providers: None, branch: StatsFilterBranch::Vm });
    /// match client.check(&query).await {
    ///     Ok(()) => println!("{:?}", client.execute(&query).await?),
    ///     Err(qmpkit::Error::Unsupported { since, .. }) => println!("needs QEMU {since:?}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn check<C: Command>(&self, command: &C) -> Result<()> {
        match self.schema_state().checks.judgement(|| self.schema()).await? {
            Some(judgement) => judgement.check(C::NAME, command, &self.inner.shared.greeting.version),
            None => Ok(()),
        }
    }

    /// Queues one request for the connection's task and returns the wait
    /// for its reply, which ends within the request's budget.
    ///
    /// Not an `async fn`: the future a caller awaits holds the reply slot
    /// and the client alone, not the arguments and locals of the sending
    /// (an `async fn` keeps its arguments for its whole life, beside the
    /// locals they move into: some 220 bytes in every command in flight).
    fn send(
        &self,
        name: Cow<'static, str>,
        defaults: CommandDefaults,
        encode: impl FnOnce(&mut Vec<u8>, u64, bool) -> Result<(), serde_json::Error>,
        options: CallOptions,
    ) -> Result<ReplyWait<'_>> {
        let shared = &self.inner.shared;
        if self.is_closed() {
            return Err(self.close_reason());
        }
        if options.oob && !shared.oob {
            return Err(Error::InvalidRequest(format!(
                "{name}: exec-oob needs the oob capability, which this connection did not negotiate"
            )));
        }
        if let (false, Some(transport)) = (options.fds.is_empty(), shared.no_fd_passing) {
            // Refused here, before an id is taken or a byte written: the
            // connection is untouched. The fds close as `options` drops.
            return Err(Error::FdPassingUnsupported {
                command: name.into_owned(),
                transport,
            });
        }
        if options.fds.len() > MAX_FDS_PER_CALL {
            return Err(Error::TooManyFds {
                count: options.fds.len(),
                max: MAX_FDS_PER_CALL,
            });
        }
        let id = self.next_id();
        // A call this thread kept from a finished command, when it has one:
        // its buffer has room already (or a new one, sized for most requests).
        let mut call = Call::blank();
        let bytes = call.bytes();
        if bytes.capacity() == 0 {
            bytes.reserve(96);
        }
        encode(bytes, id, options.oob).map_err(|e| Error::InvalidRequest(format!("{name}: {e}")))?;
        let budget = options
            .timeout
            .unwrap_or_else(|| shared.config.timeout_for(&name, defaults));
        // Go logs what goes through its RunJSON, and fd passing does not.
        let log = !options.no_log && options.fds.is_empty() && !shared.config.log_excludes(&name, defaults);
        // The request and its reply slot are one call (kept from an earlier
        // command when this thread has one); the queues hold one pointer
        // per request, which keeps an idle connection's queues small.
        let (waiter, request) = call.start(NewCall {
            id,
            name,
            fds: options.fds,
            oob: options.oob,
            log,
            budget,
        });
        if let Err(request) = self.inner.tx.send(request) {
            // Told nothing: the waiter is dropped first, so the request's
            // drop does not bother to hand it a result.
            drop(waiter);
            drop(request);
            return Err(self.close_reason());
        }
        Ok(ReplyWait { client: self, waiter })
    }
}

/// A generated command's decoded reply on its way ([`Client::run_as`]).
///
/// A type of its own rather than an `async` block: 32 bytes, where
/// an `async fn` keeping its arguments beside the wait was 160, in every
/// typed operation's future and so in every task that runs one.
pub(crate) struct Typed<'a, R> {
    /// The wait for the reply, or why the request was refused (boxed: an
    /// `Error` is 72 bytes, and refusals are rare).
    sent: std::result::Result<ReplyWait<'a>, Option<Box<Error>>>,
    name: &'static str,
    returns: std::marker::PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned> std::future::Future for Typed<'_, R> {
    type Output = Result<R>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<R>> {
        let name = self.name;
        match &mut self.sent {
            Ok(wait) => std::pin::Pin::new(&mut *wait).poll(cx).map(|reply| {
                reply.and_then(|raw| {
                    let decoded = raw.decode(name);
                    // The reply's buffer goes back with the call.
                    wait.waiter.keep_buffer(raw);
                    decoded
                })
            }),
            Err(refused) => std::task::Poll::Ready(Err(*refused.take().expect("polled after it completed"))),
        }
    }
}

/// The wait for one request's reply ([`Client::send`]).
///
/// The connection's task keeps the deadline (one timer for the whole
/// connection, not one per call) and answers `Error::Timeout` when it
/// passes. Dropping this future instead (cancellation) works too: a
/// request not written yet never will be, and its reply is discarded.
struct ReplyWait<'a> {
    client: &'a Client,
    waiter: Waiter,
}

impl std::future::Future for ReplyWait<'_> {
    type Output = Result<Reply>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Reply>> {
        self.waiter.poll(cx).map(|got| match got {
            Got::Result(result) => result,
            Got::Dropped => Err(self.client.close_reason()),
        })
    }
}
