//! A client for the QEMU Machine Protocol (QMP): the JSON protocol on QEMU's
//! monitor socket through which VM managers control their VMs.
//!
//! ```no_run
//! # async fn f() -> qmpkit::Result<()> {
//! let client = qmpkit::Client::connect("/run/vm1/qmp.sock").await?;
//! println!("QEMU {}", client.greeting().version);
//!
//! let mut events = client.events();
//! let status: serde_json::Value = client.execute_raw("query-status", serde_json::Value::Null).await?;
//! println!("{}", status["status"]);
//!
//! while let Some(event) = events.next().await {
//!     println!("{} at {:?}", event.name(), event.timestamp());
//! }
//! # Ok(()) }
//! ```
//!
//! # Behaviour
//!
//! - **Pipelining.** One task owns the socket. Any number of tasks may have
//!   commands in flight through clones of one [`Client`]; replies are matched
//!   by id, never by order. With the `oob` capability (negotiated when QEMU
//!   offers it) QEMU queues up to 8 commands, so the client keeps at most 8
//!   in-band commands at QEMU and queues the rest itself.
//!
//!   ```text
//!   task A ──execute──┐                       ┌──reply #1──> task A
//!   task B ──execute──┼─> [connection task] ──┼──reply #2──> task B
//!   task C ──subscribe┘     one socket        └──events────> task C (bounded queue)
//!   ```
//! - **Deadlines.** Every command has a budget (30 s by default, longer for
//!   known slow commands, settable per command name and per call). A timeout
//!   fails that call only: the connection stays up, a request not yet written
//!   is never written, and a late reply is dropped by id.
//! - **Failure.** Only end-of-stream or a socket error means the connection is
//!   gone: then every pending call fails with [`Error::Disconnected`] at once,
//!   later calls fail at once, and [`Client::closed`] wakes.
//! - **Framing.** The stream is split as JSON, not by lines, with no line
//!   length cap; a message over the size limit (64 MiB by default) fails the
//!   command it answers with [`Error::MessageTooLarge`] and is skipped. After
//!   a corrupt or truncated message the next line that starts with `{` starts
//!   afresh, so one bad message never silences the connection.
//! - **Lost replies.** QEMU answers in-band commands in order, so a reply to
//!   a later command proves an earlier unanswered one's reply lost: its
//!   caller gets [`Error::ReplyLost`] at once, and its place in QEMU's queue
//!   is freed. A reply that carries a caller's id but is not a valid reply
//!   ends that call at once with [`Error::Decode`], quoting it.
//! - **Events** go to every subscriber through its own bounded queue, in the
//!   order QEMU sent them; a subscriber that falls behind is told how many it
//!   missed ([`EventItem::Missed`]) and never slows anything else.
//! - **Transports.** A Unix socket path, TCP ([`ConnectOptions::connect_to`]),
//!   a Unix socket or any tokio byte stream you hold
//!   ([`ConnectOptions::connect_stream`], [`ConnectOptions::connect_io`]), or
//!   QEMU connecting out to a [`Listener`]: the same client over each.
//! - **File descriptors** travel as SCM_RIGHTS on the `sendmsg` that carries
//!   their command's first byte ([`CallOptions::fds`]); the client closes its
//!   copies exactly once. Only a Unix socket carries them: elsewhere such a call
//!   fails with [`Error::FdPassingUnsupported`] before anything is written.
//!
//! # Layers
//!
//! | module | what |
//! | --- | --- |
//! | [`Client`], [`ConnectOptions`] | the async client |
//! | [`Address`], [`Listener`] | where QEMU is: a Unix socket or TCP; [`ConnectOptions::connect_stream`] and [`ConnectOptions::connect_io`] for a stream you hold, [`Listener`] for QEMU connecting to you |
//! | [`qapi`] | every QEMU 10 command and event as types generated from QEMU's schema; run them with [`Client::execute`] |
//! | [`commands`] | the typed operations (lifecycle, CPUs, memory, block, jobs, NBD, migration, devices, chardevs, fds, misc), as methods on [`Client`] |
//! | [`guest_agent`] | the QEMU guest agent (`qemu-ga` in the guest): exec, files, fsfreeze, shutdown, ... |
//! | [`monitor`] | Incus's `qmp` package's `Monitor`: one shared, self-watching connection per VM |
//! | [`event`] | subscriptions and typed views of events |
//! | [`schema`] | the server's command schema, for version-dependent choices |
//! | [`blocking`] | the same client for synchronous code |
//! | [`launch`] | start a throwaway QEMU for tests and tools |
//!
//! # Features
//!
//! | feature | default | what it adds |
//! | --- | --- | --- |
//! | `monitor` | yes | [`monitor`]: the Monitor of Incus's Go package `qmp` |
//! | `blocking` | yes | [`blocking`], with its own multi-thread runtime (turns on tokio's `rt-multi-thread`) |
//! | `launch` | yes | [`launch`]: the QEMU launcher |
//! | `traffic-log` | yes | [`ConnectOptions::traffic_log`]: a transcript in Incus's `qmp` package's format |
//! | `tracing` | yes | diagnostics (dropped and late replies, skipped garbage, latencies, the agent's traffic) as [`tracing`](https://docs.rs/tracing) events; without it the crate does not depend on `tracing` |
//!
//! Without defaults (`default-features = false`) the crate is the client,
//! the typed operations, events, the schema, the generated types and the
//! guest agent client, on
//! tokio's `rt`, `net`, `sync`, `time` and `io-util`: it runs on whichever
//! runtime flavour the application builds.

#![warn(missing_docs)]
// Without the `tracing` feature the diagnostics macros expand to nothing,
// so a value bound only to be logged is unused there (and only there).
#![cfg_attr(not(feature = "tracing"), allow(unused_variables, clippy::single_match))]

#[cfg(feature = "blocking")]
pub mod blocking;
mod client;
pub mod commands;
mod connection;
mod diag;
mod error;
pub mod event;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod guest_agent;
#[cfg(feature = "launch")]
pub mod launch;
#[cfg(feature = "monitor")]
pub mod monitor;
pub mod schema;
mod wire;

pub use client::{CallOptions, Client, Command, Empty, IntoUnixStream, MAX_FDS_PER_CALL};
pub use connection::{
    Address, ConnectOptions, Listener, DEFAULT_COMMAND_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_LOG_EXCLUDED, DEFAULT_MAX_MESSAGE_SIZE,
};
pub use error::{ConsoleError, Error, ErrorClass, QmpError, Result};
pub use event::{Event, EventFilter, EventItem, EventStream, KnownEvent};
/// Every QEMU 10 command and event, typed: the `qmpkit-qapi` crate.
pub use qmpkit_qapi as qapi;
pub use wire::{Greeting, Timestamp, Version};
