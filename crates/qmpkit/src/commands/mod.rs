//! Typed operations, grouped by domain. Each is a method on [`crate::Client`]
//! (and so on [`crate::monitor::Monitor`], which derefs to it).
//!
//! # Waits keep their caller's deadline
//!
//! The operations that wait for something to happen in QEMU (a block job
//! to end, a migration to reach a state, a device to be gone) take a
//! `timeout`, and it is one deadline for the whole operation, whatever QEMU
//! does. Every command sent on the way (the queries, the job and migration
//! commands, the schema lookup that picks the form this QEMU takes) gets
//! what is left of that deadline as its own budget, instead of the
//! connection's per-command budgets (30 s and up). A QEMU that stops
//! answering, because it is stopped (SIGSTOP, a debugger), swapped out or
//! stuck in I/O, therefore cannot stretch a wait past its deadline. Once the
//! deadline has passed, nothing more is sent, and the result is
//! [`Error::Timeout`] naming the operation and the caller's timeout. A
//! command that timed out may still reach QEMU and take effect later, as
//! with any timed-out command.
//!
//! The one allowance past the deadline is clean-up of something the
//! operation started itself and must not leave behind: a block job given
//! up on is cancelled and dismissed within [`jobs::CLEANUP_BUDGET`], so
//! [`Client::block_commit`] and [`Client::block_dev_mirror`] return at most
//! that long after their deadline. Every other wait returns at its deadline.

pub mod block;
pub mod chardev;
pub mod cpu;
pub mod devices;
pub mod fds;
pub mod jobs;
pub mod memory;
pub mod migration;
pub mod misc;
pub mod nbd;
pub mod vm;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::client::{CallOptions, Client, Command};
use crate::error::{Error, Result};
use crate::schema::Schema;

/// The deadline of one wait, and how its timeout is reported.
#[derive(Debug, Clone)]
pub(crate) struct Deadline {
    at: Instant,
    /// What [`Error::Timeout`] names: the operation, not whichever command
    /// happened to be in flight when time ran out.
    what: String,
    /// The caller's timeout, as [`Error::Timeout`] reports it.
    budget: Duration,
}

impl Deadline {
    /// `budget` from now.
    pub(crate) fn after(budget: Duration, what: impl Into<String>) -> Self {
        let now = Instant::now();
        // A timeout such as Duration::MAX means "no limit"; Instant + it
        // would overflow, so it becomes a deadline no wait will reach.
        let at = now
            .checked_add(budget)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        Deadline {
            at,
            what: what.into(),
            budget,
        }
    }

    /// The same deadline, reported under another name (a later step of one operation).
    pub(crate) fn renamed(&self, what: impl Into<String>) -> Self {
        Deadline {
            what: what.into(),
            ..self.clone()
        }
    }

    pub(crate) fn at(&self) -> Instant {
        self.at
    }

    /// The timeout error of this wait.
    pub(crate) fn expired(&self) -> Error {
        Error::Timeout {
            command: self.what.clone(),
            budget: self.budget,
        }
    }

    /// What is left, or this wait's timeout error when nothing is.
    pub(crate) fn remaining(&self) -> Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(self.expired())
        } else {
            Ok(left)
        }
    }

    /// Runs a generated command with what is left of the deadline as its
    /// budget, unchecked like the typed operations' other commands. Nothing
    /// is sent once the deadline has passed.
    pub(crate) async fn run<C: Command>(&self, client: &Client, command: &C) -> Result<C::Returns> {
        self.run_as(client, command).await
    }

    /// [`Deadline::run`] with the reply decoded into a type of the
    /// operation's own.
    pub(crate) async fn run_as<C: Command, R: DeserializeOwned>(
        &self,
        client: &Client,
        command: &C,
    ) -> Result<R> {
        let left = self.remaining()?;
        client
            .run_as(command, CallOptions::new().timeout(left))
            .await
            // Its budget was the rest of this wait: its timeout is the wait's.
            .map_err(|e| if e.is_timeout() { self.expired() } else { e })
    }

    /// Runs `work` (which may send commands with budgets of their own)
    /// until the deadline at most.
    pub(crate) async fn bound<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout_at(self.at, work).await {
            Ok(Ok(v)) => Ok(v),
            // A timeout of the wait's own making is reported as the wait's;
            // an earlier one (a command's own, shorter budget) as it is.
            Ok(Err(e)) if e.is_timeout() && Instant::now() >= self.at => Err(self.expired()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.expired()),
        }
    }

    /// The QEMU's schema, fetched (once per connection) within the deadline.
    pub(crate) async fn schema(&self, client: &Client) -> Result<Arc<Schema>> {
        self.remaining()?;
        self.bound(client.schema()).await
    }
}
