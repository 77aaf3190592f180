//! The client for synchronous code.
//!
//! Each call blocks the calling thread until its reply arrives. The
//! connection runs on one small process-wide runtime, so events keep flowing
//! between calls and any number of threads may share a client.
//!
//! Not for use inside an async runtime: blocking a runtime thread on another
//! runtime panics or stalls it. Async code uses [`crate::Client`].
//!
//! ```no_run
//! # fn f() -> qmpkit::Result<()> {
//! let client = qmpkit::blocking::Client::connect("/run/vm1/qmp.sock")?;
//! let status = client.execute_raw("query-status", serde_json::Value::Null)?;
//! println!("{}", status["status"]);
//! # Ok(()) }
//! ```

use std::path::Path;
use std::sync::LazyLock;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::client::{CallOptions, Command};
use crate::connection::ConnectOptions;
use crate::error::{Error, Result};
use crate::event::{EventFilter, EventStream};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("qmp-blocking")
        .enable_all()
        .build()
        .expect("cannot start the runtime of the blocking QMP client")
});

/// A blocking handle on a QMP connection. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    inner: crate::Client,
}

impl Client {
    /// Connects with the default options.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        Self::connect_with(&ConnectOptions::new(), path)
    }

    /// Connects with the given options.
    pub fn connect_with(options: &ConnectOptions, path: impl AsRef<Path>) -> Result<Client> {
        let inner = RUNTIME.block_on(options.connect(path))?;
        Ok(Client { inner })
    }

    /// Connects to a Unix socket or TCP address (see [`crate::Address`])
    /// with the default options.
    pub fn connect_to(address: impl Into<crate::Address>) -> Result<Client> {
        Self::connect_to_with(&ConnectOptions::new(), address)
    }

    /// Connects to a Unix socket or TCP address with the given options.
    pub fn connect_to_with(options: &ConnectOptions, address: impl Into<crate::Address>) -> Result<Client> {
        let inner = RUNTIME.block_on(options.connect_to(address))?;
        Ok(Client { inner })
    }

    /// Runs a typed command.
    pub fn execute<C: Command>(&self, command: &C) -> Result<C::Returns> {
        RUNTIME.block_on(self.inner.execute(command))
    }

    /// Runs a typed command with per-call options.
    pub fn execute_with<C: Command>(&self, command: &C, options: CallOptions) -> Result<C::Returns> {
        RUNTIME.block_on(self.inner.execute_with(command, options))
    }

    /// Runs a command by name with any arguments, decoding the reply.
    pub fn call<A: Serialize + ?Sized, R: DeserializeOwned>(&self, name: &str, args: &A) -> Result<R> {
        RUNTIME.block_on(self.inner.call(name, args))
    }

    /// Runs a command by name with JSON arguments.
    pub fn execute_raw(&self, name: &str, args: Value) -> Result<Value> {
        RUNTIME.block_on(self.inner.execute_raw(name, args))
    }

    /// Runs a whole JSON request given as text.
    pub fn execute_json(&self, request: &str) -> Result<Value> {
        RUNTIME.block_on(self.inner.execute_json(request))
    }

    /// Subscribes to events; read them with [`EventStream::blocking_next`].
    pub fn subscribe(&self, filter: EventFilter) -> EventStream {
        self.inner.subscribe(filter)
    }

    /// Closes the connection.
    pub fn disconnect(&self) {
        self.inner.disconnect()
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Blocks until the connection is gone and returns why.
    pub fn wait_closed(&self) -> Error {
        RUNTIME.block_on(self.inner.closed())
    }

    /// The async client underneath (for use from async code).
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }
}
