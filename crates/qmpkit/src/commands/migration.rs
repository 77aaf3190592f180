//! Live migration over a file descriptor, and waiting for it, driven by
//! QEMU's `MIGRATION` events.
//!
//! The stream travels over a file descriptor that was first passed to each
//! QEMU with `getfd` under a name; [`Client::migrate`] and
//! [`Client::migrate_incoming`] take that name.
//!
//! Waiting ([`Client::migrate_wait`], [`Client::migrate_incoming`])
//! subscribes to `MIGRATION` events before it first asks for the state, so
//! no transition is missed; `completed`, `failed` and `cancelled` are final.
//! `query-migrate` is polled only as a safety net (every few seconds), or
//! often when the `events` capability could not be turned on.
//!
//! The caller's timeout is one deadline for the whole wait, kept whatever
//! QEMU does (see [the rule](super#waits-keep-their-callers-deadline)):
//! every command sent on the way, and the schema lookup, gets what is left
//! of it. A wait that times out leaves the migration alone, so it returns at
//! its deadline, with no clean-up margin.
//!
//! ```no_run
//! # async fn f(src: qmpkit::Client) -> qmpkit::Result<()> {
//! use std::time::Duration;
//! // "mig" was passed to this QEMU with getfd; the other end of the socket
//! // went to the destination, which runs migrate_incoming("mig", ..).
//! src.migrate("mig").await?;
//! src.migrate_wait("completed", Duration::from_secs(300)).await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::{Client, Empty};
use crate::commands::block::to_object;
use crate::commands::Deadline;
use crate::error::{Error, Result};
use crate::event::{EventFilter, EventItem, KnownEvent};

/// How often the state is polled when `MIGRATION` events are on (a safety net only).
const SAFETY_POLL: Duration = Duration::from_secs(5);

/// How often the state is polled when events could not be turned on.
const FALLBACK_POLL: Duration = Duration::from_millis(250);

/// The states after which a migration does not change any more.
const FINAL_STATES: [&str; 3] = ["completed", "failed", "cancelled"];

fn none() -> String {
    "none".into()
}

/// The state of the migration (`query-migrate`), on the source or the
/// destination. Fields QEMU leaves out are zero.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct MigrationStatus {
    /// `none`, `setup`, `active`, `pre-switchover`, `device`, `completed`,
    /// `failed`, `cancelling`, `cancelled`, `postcopy-active`, ...
    #[serde(default = "none")]
    pub status: String,
    /// RAM transfer statistics.
    pub ram: MigrationRamStats,
    /// Milliseconds since the migration started (until it ended, once done).
    #[serde(rename = "total-time")]
    pub total_time: i64,
    /// Milliseconds the guest was stopped (once completed).
    pub downtime: i64,
    /// Milliseconds the guest is expected to stop (while active).
    #[serde(rename = "expected-downtime")]
    pub expected_downtime: i64,
    /// Milliseconds spent in setup.
    #[serde(rename = "setup-time")]
    pub setup_time: i64,
    /// Percentage of CPU throttling (auto-converge).
    #[serde(rename = "cpu-throttle-percentage")]
    pub cpu_throttle_percentage: i64,
    /// Total postcopy blocktime, in milliseconds.
    #[serde(rename = "postcopy-blocktime")]
    pub postcopy_blocktime: i64,
    /// Postcopy blocktime per vCPU, in milliseconds.
    #[serde(rename = "postcopy-vcpu-blocktime")]
    pub postcopy_vcpu_blocktime: Vec<i64>,
    /// Dirty-limit throttle time per round, in microseconds.
    #[serde(rename = "dirty-limit-throttle-time-per-round")]
    pub dirty_limit_throttle_time_per_round: i64,
    /// Dirty ring full time, in microseconds.
    #[serde(rename = "dirty-limit-ring-full-time")]
    pub dirty_limit_ring_full_time: i64,
    /// QEMU's description of the failure, when it failed.
    #[serde(rename = "error-desc")]
    pub error_desc: Option<String>,
}

/// RAM statistics of a migration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct MigrationRamStats {
    /// Bytes transferred.
    pub transferred: u64,
    /// Bytes still to transfer.
    pub remaining: u64,
    /// Total guest RAM, in bytes.
    pub total: u64,
    /// Pages found to be all zero.
    pub duplicate: u64,
    /// Pages sent in full.
    pub normal: u64,
    /// Bytes sent in full pages.
    #[serde(rename = "normal-bytes")]
    pub normal_bytes: u64,
    /// Pages dirtied per second.
    #[serde(rename = "dirty-pages-rate")]
    pub dirty_pages_rate: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    /// How many times dirty RAM was synchronised.
    #[serde(rename = "dirty-sync-count")]
    pub dirty_sync_count: u64,
    /// Page requests from the destination during postcopy.
    #[serde(rename = "postcopy-requests")]
    pub postcopy_requests: u64,
    /// The target page size.
    #[serde(rename = "page-size")]
    pub page_size: u64,
    /// Bytes sent through multifd channels.
    #[serde(rename = "multifd-bytes")]
    pub multifd_bytes: u64,
    /// Pages transferred per second.
    #[serde(rename = "pages-per-second")]
    pub pages_per_second: u64,
    /// Bytes sent in the precopy phase.
    #[serde(rename = "precopy-bytes")]
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was stopped.
    #[serde(rename = "downtime-bytes")]
    pub downtime_bytes: u64,
    /// Bytes sent in the postcopy phase.
    #[serde(rename = "postcopy-bytes")]
    pub postcopy_bytes: u64,
    /// Dirty syncs that missed zero-copy sends.
    #[serde(rename = "dirty-sync-missed-zero-copy")]
    pub dirty_sync_missed_zero_copy: u64,
}

#[derive(Serialize)]
struct Capability<'a> {
    capability: &'a str,
    state: bool,
}

#[derive(Deserialize)]
struct CapabilityState {
    capability: String,
    state: bool,
}

impl Client {
    /// Turns migration capabilities on or off (`migrate-set-capabilities`),
    /// for example `[("events", true), ("pause-before-switchover", true)]`
    /// or a `HashMap<String, bool>`.
    #[doc(alias = "MigrateSetCapabilities")]
    pub async fn migrate_set_capabilities<I, K>(&self, capabilities: I) -> Result<()>
    where
        I: IntoIterator<Item = (K, bool)>,
        K: AsRef<str>,
    {
        let caps: Vec<(K, bool)> = capabilities.into_iter().collect();
        let list: Vec<Capability<'_>> = caps
            .iter()
            .map(|(k, state)| Capability {
                capability: k.as_ref(),
                state: *state,
            })
            .collect();
        self.call::<_, Empty>("migrate-set-capabilities", &json!({ "capabilities": list }))
            .await?;
        Ok(())
    }

    /// Sets migration parameters (`migrate-set-parameters`), given as any
    /// serialisable object, for example `json!({"max-bandwidth": 1 << 20})`.
    #[doc(alias = "MigrateSetParameters")]
    pub async fn migrate_set_parameters(&self, parameters: &impl Serialize) -> Result<()> {
        let params = to_object(parameters, "migration parameters")?;
        self.call::<_, Empty>("migrate-set-parameters", &params).await?;
        Ok(())
    }

    /// Starts migrating to the file descriptor passed earlier with `getfd`
    /// under `fd_name` (`migrate` with a `fd` channel, or the `fd:NAME` URI
    /// on a QEMU without channels), after turning on the `events`
    /// capability so that [`Client::migrate_wait`] is event-driven. Returns
    /// once the migration has started; wait for it with
    /// [`Client::migrate_wait`].
    #[doc(alias = "Migrate")]
    pub async fn migrate(&self, fd_name: &str) -> Result<()> {
        self.enable_migration_events().await?;
        let args = self.fd_channel("migrate", fd_name, None).await?;
        self.call::<_, Empty>("migrate", &args).await?;
        Ok(())
    }

    /// The migration's state and statistics (`query-migrate`).
    #[doc(alias = "QueryMigrate")]
    pub async fn query_migrate(&self) -> Result<MigrationStatus> {
        self.call("query-migrate", &()).await
    }

    /// Waits until the migration reaches `state` (for example `completed`,
    /// or `pre-switchover` with the `pause-before-switchover` capability).
    ///
    /// A migration that ends in another final state (`completed`, `failed`,
    /// `cancelled`) is [`Error::MigrationFailed`] with QEMU's `error-desc`.
    /// When `timeout` runs out, QEMU answering or not, the migration is left
    /// alone and [`Error::Timeout`] is returned. Dropping the future stops
    /// waiting.
    #[doc(alias = "MigrateWait")]
    pub async fn migrate_wait(&self, state: &str, timeout: Duration) -> Result<()> {
        let deadline = Deadline::after(timeout, format!("waiting for migration state {state}"));
        self.migrate_wait_until(state, &deadline).await
    }

    /// Resumes a migration paused in `from_state` (`migrate-continue`),
    /// for example `pre-switchover`.
    #[doc(alias = "MigrateContinue")]
    pub async fn migrate_continue(&self, from_state: &str) -> Result<()> {
        self.call::<_, Empty>("migrate-continue", &json!({ "state": from_state }))
            .await?;
        Ok(())
    }

    /// Receives a migration on the file descriptor passed earlier with
    /// `getfd` under `fd_name` (`migrate-incoming`; QEMU must have been
    /// started with `-incoming defer`) and waits until it has completed.
    ///
    /// The `events` capability is turned on first. A failed incoming
    /// migration makes QEMU exit by default, which shows as
    /// [`Error::Disconnected`]. `timeout` covers the whole call, the
    /// preparation included; when it runs out, QEMU answering or not,
    /// [`Error::Timeout`], and an incoming migration already under way is
    /// left to run.
    #[doc(alias = "MigrateIncoming")]
    pub async fn migrate_incoming(&self, fd_name: &str, timeout: Duration) -> Result<()> {
        let deadline = Deadline::after(timeout, "migrate-incoming");
        if !self.migration_events_on(Some(&deadline)).await? {
            deadline
                .call::<_, Empty>(self, "migrate-set-capabilities", &events_capability())
                .await?;
        }
        let args = self
            .fd_channel("migrate-incoming", fd_name, Some(&deadline))
            .await?;
        deadline.call::<_, Empty>(self, "migrate-incoming", &args).await?;
        self.migrate_wait_until("completed", &deadline).await
    }

    /// The arguments naming an fd as the migration channel, in the form this
    /// QEMU takes; the schema lookup within `deadline`, when given.
    async fn fd_channel(&self, command: &str, fd_name: &str, deadline: Option<&Deadline>) -> Result<Value> {
        if fd_name.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "{command}: the fd name must not be empty"
            )));
        }
        let schema = match deadline {
            Some(d) => d.schema(self).await?,
            None => self.schema().await?,
        };
        Ok(if schema.has_argument(command, "channels") {
            json!({"channels": [{
                "channel-type": "main",
                "addr": {"transport": "socket", "type": "fd", "str": fd_name},
            }]})
        } else {
            json!({ "uri": format!("fd:{fd_name}") })
        })
    }

    /// True when the `events` capability is on; the query within
    /// `deadline`, when given.
    async fn migration_events_on(&self, deadline: Option<&Deadline>) -> Result<bool> {
        let caps: Vec<CapabilityState> = match deadline {
            Some(d) => d.call(self, "query-migrate-capabilities", &()).await?,
            None => self.call("query-migrate-capabilities", &()).await?,
        };
        Ok(caps.iter().any(|c| c.capability == "events" && c.state))
    }

    /// Turns on the `events` capability unless it is on already.
    async fn enable_migration_events(&self) -> Result<()> {
        if !self.migration_events_on(None).await? {
            self.migrate_set_capabilities([("events", true)]).await?;
        }
        Ok(())
    }

    async fn migrate_wait_until(&self, wanted: &str, deadline: &Deadline) -> Result<()> {
        // Subscribe before the first look, so no transition falls in between.
        let mut events = self.subscribe(EventFilter::names(["MIGRATION"]));
        let events_on = match self.migration_events_on(Some(deadline)).await? {
            true => true,
            false => match deadline
                .call::<_, Empty>(self, "migrate-set-capabilities", &events_capability())
                .await
            {
                Ok(_) => true,
                Err(e) if e.is_timeout() => return Err(e),
                // Cannot be changed while a migration runs; then poll instead.
                Err(_) => false,
            },
        };
        let poll_every = if events_on { SAFETY_POLL } else { FALLBACK_POLL };
        let query = || deadline.call::<_, MigrationStatus>(self, "query-migrate", &());

        let mut status = query().await?.status;
        loop {
            if status == wanted {
                return Ok(());
            }
            if FINAL_STATES.contains(&status.as_str()) {
                // The event carries no reason; query-migrate has it.
                let info = query().await?;
                if info.status == wanted {
                    return Ok(());
                }
                return Err(Error::MigrationFailed {
                    status,
                    message: info.error_desc,
                });
            }
            status = tokio::select! {
                item = events.recv() => match item {
                    None => return Err(self.closed().await),
                    Some(EventItem::Event(e)) => match e.known() {
                        KnownEvent::Migration { status } => status,
                        _ => continue,
                    },
                    Some(EventItem::Missed(_)) => query().await?.status,
                },
                _ = tokio::time::sleep(poll_every) => query().await?.status,
                _ = tokio::time::sleep_until(deadline.at()) => return Err(deadline.expired()),
            };
        }
    }
}

/// The arguments of `migrate-set-capabilities` that turn `events` on.
fn events_capability() -> Value {
    json!({"capabilities": [Capability { capability: "events", state: true }]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_decodes_tolerantly() {
        let fresh: MigrationStatus = serde_json::from_value(json!({})).unwrap();
        assert_eq!(fresh.status, "none");
        let done: MigrationStatus = serde_json::from_value(json!({
            "status": "completed", "total-time": 120, "downtime": 12, "setup-time": 1,
            "ram": {"transferred": 1000, "mbps": 812.5, "dirty-sync-count": 3, "new": 1},
            "some-future-field": {"a": 1}
        }))
        .unwrap();
        assert_eq!(done.ram.transferred, 1000);
        assert_eq!(done.ram.dirty_sync_count, 3);
        assert_eq!(done.downtime, 12);
    }
}
