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
//! # A guest that keeps dirtying memory
//!
//! A pre-copy migration sends the RAM, then again what the guest dirtied
//! meanwhile, round after round, and switches over once the rest fits in
//! the downtime limit at the bandwidth. A busy guest can outrun it for
//! ever; [`Client::query_migrate`] shows that as RAM transferred growing,
//! `dirty_pages_rate` above zero and the sync count rising with no end.
//! The ways out, all typed here: more bandwidth or a longer downtime limit
//! ([`Client::migrate_tune`], also mid-flight), auto-converge throttling
//! the guest's CPUs ([`Client::migrate_set_auto_converge`], before the
//! migration), switching to post-copy ([`Client::migrate_set_postcopy`] on
//! both sides before, [`Client::migrate_start_postcopy`] during), or giving
//! up ([`Client::migrate_cancel`]: the guest stays, running, on the source).
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

use qmpkit_qapi::{commands as c, types as t};
use serde::{Deserialize, Serialize};

use crate::client::{CallOptions, Client, Command, Empty};
use crate::commands::block::to_object;
use crate::commands::Deadline;
use crate::error::{Error, Result};
use crate::event::{EventFilter, EventItem, KnownEvent, Woken};

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

/// The migration settings that decide whether and how fast a migration of
/// a busy guest converges, for [`Client::migrate_tune`]. Each setting left
/// out keeps its current value; all of them may change while a migration
/// runs, and take effect at once.
///
/// A pre-copy migration completes when what is still dirty can be sent
/// within the downtime limit at the migration's bandwidth. A guest that
/// dirties memory faster than that never gets there: raise the bandwidth
/// or the downtime limit, let auto-converge slow the guest down
/// ([`Client::migrate_set_auto_converge`], tuned by the throttle settings
/// here), or switch to post-copy ([`Client::migrate_start_postcopy`]).
///
/// ```
/// use std::time::Duration;
/// use qmpkit::commands::migration::MigrationTuning;
/// let tight = MigrationTuning::new()
///     .max_bandwidth(8 << 20)
///     .downtime_limit(Duration::from_millis(1))
///     .cpu_throttle(20, 10);
/// assert_eq!(tight.to_parameters().max_bandwidth, Some(8 << 20));
/// assert_eq!(tight.to_parameters().downtime_limit, Some(1));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationTuning {
    max_bandwidth: Option<u64>,
    downtime_limit: Option<Duration>,
    cpu_throttle_initial: Option<u8>,
    cpu_throttle_increment: Option<u8>,
    max_cpu_throttle: Option<u8>,
    throttle_trigger_threshold: Option<u8>,
    max_postcopy_bandwidth: Option<u64>,
}

impl MigrationTuning {
    /// No change to any setting.
    pub fn new() -> Self {
        Self::default()
    }

    /// The most the migration may send, in bytes per second (QEMU's
    /// `max-bandwidth`; its default is 128 MiB/s).
    pub fn max_bandwidth(mut self, bytes_per_second: u64) -> Self {
        self.max_bandwidth = Some(bytes_per_second);
        self
    }

    /// The longest the guest may be stopped at the switch-over (QEMU's
    /// `downtime-limit`, in whole milliseconds; its default is 300 ms).
    pub fn downtime_limit(mut self, limit: Duration) -> Self {
        self.downtime_limit = Some(limit);
        self
    }

    /// Auto-converge's first throttle and each further step, in percent of
    /// the guest's CPU time (QEMU's `cpu-throttle-initial`, default 20,
    /// and `cpu-throttle-increment`, default 10).
    pub fn cpu_throttle(mut self, initial_percent: u8, increment_percent: u8) -> Self {
        self.cpu_throttle_initial = Some(initial_percent);
        self.cpu_throttle_increment = Some(increment_percent);
        self
    }

    /// The most auto-converge may throttle, in percent (QEMU's
    /// `max-cpu-throttle`, default 99).
    pub fn max_cpu_throttle(mut self, percent: u8) -> Self {
        self.max_cpu_throttle = Some(percent);
        self
    }

    /// When auto-converge steps in: once the guest dirtied more than this
    /// share of what was sent in a round, in percent, twice (QEMU's
    /// `throttle-trigger-threshold`, 1 to 100, default 50).
    pub fn throttle_trigger_threshold(mut self, percent: u8) -> Self {
        self.throttle_trigger_threshold = Some(percent);
        self
    }

    /// The most the post-copy phase may send, in bytes per second (QEMU's
    /// `max-postcopy-bandwidth`; 0, its default, means no limit).
    pub fn max_postcopy_bandwidth(mut self, bytes_per_second: u64) -> Self {
        self.max_postcopy_bandwidth = Some(bytes_per_second);
        self
    }

    /// These settings as the arguments of `migrate-set-parameters` (the
    /// generated [`qapi::types::MigrateSetParameters`](crate::qapi::types::MigrateSetParameters)).
    pub fn to_parameters(&self) -> crate::qapi::types::MigrateSetParameters {
        crate::qapi::types::MigrateSetParameters {
            max_bandwidth: self.max_bandwidth,
            // Whole milliseconds, rounded up: a limit below 1 ms is 1 ms,
            // never 0 (which would forbid any downtime, so no switch-over).
            downtime_limit: self
                .downtime_limit
                .map(|d| d.as_nanos().div_ceil(1_000_000).try_into().unwrap_or(u64::MAX)),
            cpu_throttle_initial: self.cpu_throttle_initial,
            cpu_throttle_increment: self.cpu_throttle_increment,
            max_cpu_throttle: self.max_cpu_throttle,
            throttle_trigger_threshold: self.throttle_trigger_threshold,
            max_postcopy_bandwidth: self.max_postcopy_bandwidth,
            ..Default::default()
        }
    }
}

/// `migrate-set-capabilities` with capabilities by name, for those the
/// generated [`t::MigrationCapability`] lacks.
#[derive(Serialize)]
struct Capabilities<'a> {
    capabilities: Vec<Capability<'a>>,
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
        let typed: Option<Vec<t::MigrationCapabilityStatus>> = caps
            .iter()
            .map(|(k, state)| {
                let capability = k.as_ref().parse().ok()?;
                Some(t::MigrationCapabilityStatus {
                    capability,
                    state: *state,
                })
            })
            .collect();
        match typed {
            Some(capabilities) => {
                self.run(&c::MigrateSetCapabilities { capabilities }).await?;
            }
            // A capability QEMU 10 does not have (one an older QEMU had, such
            // as `block`, or one of a newer QEMU): sent by name as given.
            None => {
                let capabilities = caps
                    .iter()
                    .map(|(k, state)| Capability {
                        capability: k.as_ref(),
                        state: *state,
                    })
                    .collect();
                self.call::<_, Empty>(c::MigrateSetCapabilities::NAME, &Capabilities { capabilities })
                    .await?;
            }
        }
        Ok(())
    }

    /// Sets migration parameters (`migrate-set-parameters`), given as any
    /// serialisable object, for example `json!({"max-bandwidth": 1 << 20})`.
    #[doc(alias = "MigrateSetParameters")]
    pub async fn migrate_set_parameters(&self, parameters: &impl Serialize) -> Result<()> {
        let params = to_object(parameters, "migration parameters")?;
        self.call::<_, Empty>(c::MigrateSetParameters::NAME, &params)
            .await?;
        Ok(())
    }

    /// Changes the settings that decide whether a migration converges
    /// (`migrate-set-parameters` with the settings given; see
    /// [`MigrationTuning`]). Allowed before and during a migration.
    ///
    /// Errors: QEMU's, for a value out of its range (a throttle above 99 %,
    /// a downtime limit above 2000 s, ...); nothing changes then.
    ///
    /// ```no_run
    /// # async fn f(src: qmpkit::Client) -> qmpkit::Result<()> {
    /// use std::time::Duration;
    /// use qmpkit::commands::migration::MigrationTuning;
    /// // The guest dirties memory faster than it can be sent: give it more.
    /// src.migrate_tune(
    ///     &MigrationTuning::new()
    ///         .max_bandwidth(1 << 30)
    ///         .downtime_limit(Duration::from_millis(500)),
    /// ).await?;
    /// # Ok(()) }
    /// ```
    pub async fn migrate_tune(&self, tuning: &MigrationTuning) -> Result<()> {
        self.execute(&crate::qapi::commands::MigrateSetParameters(
            tuning.to_parameters(),
        ))
        .await
        .map(drop)
    }

    /// The current migration parameters (`query-migrate-parameters`), as
    /// the generated [`qapi::types::MigrationParameters`](crate::qapi::types::MigrationParameters).
    #[doc(alias = "query-migrate-parameters")]
    pub async fn query_migrate_parameters(&self) -> Result<crate::qapi::types::MigrationParameters> {
        self.execute(&crate::qapi::commands::QueryMigrateParameters).await
    }

    /// Turns auto-converge on or off (the `auto-converge` capability): while
    /// the guest dirties memory faster than the migration sends it, QEMU
    /// throttles the guest's CPUs, from [`MigrationTuning::cpu_throttle`]'s
    /// first step up. `query_migrate`'s `cpu_throttle_percentage` shows the
    /// throttle. Capabilities can only change while no migration runs:
    /// QEMU refuses otherwise.
    pub async fn migrate_set_auto_converge(&self, on: bool) -> Result<()> {
        self.set_migration_capability(crate::qapi::types::MigrationCapability::AutoConverge, on)
            .await
    }

    /// Allows (or forbids) switching this migration to post-copy (the
    /// `postcopy-ram` capability), which [`Client::migrate_start_postcopy`]
    /// then does. It must be on in both QEMUs, the destination's before its
    /// `migrate-incoming`, and can only change while no migration runs.
    /// A destination that cannot do post-copy (a host without
    /// `userfaultfd`) refuses it here, with QEMU's error.
    pub async fn migrate_set_postcopy(&self, on: bool) -> Result<()> {
        self.set_migration_capability(crate::qapi::types::MigrationCapability::PostcopyRam, on)
            .await
    }

    /// Switches a running pre-copy migration to post-copy
    /// (`migrate-start-postcopy`): the guest runs on the destination at
    /// once, which fetches the pages it still lacks from the source on
    /// demand. It converges whatever the guest dirties, but a failure from
    /// here on loses the guest (neither side has all of it). Needs
    /// [`Client::migrate_set_postcopy`] on both sides before the migration
    /// started; QEMU refuses it otherwise, or when no migration runs.
    #[doc(alias = "migrate-start-postcopy")]
    pub async fn migrate_start_postcopy(&self) -> Result<()> {
        self.execute(&crate::qapi::commands::MigrateStartPostcopy)
            .await
            .map(drop)
    }

    /// Cancels the outgoing migration (`migrate_cancel`) and waits, up to
    /// `timeout`, until it has ended. The source keeps the guest, running
    /// as before, and a [`Client::migrate_wait`] under way ends with
    /// [`Error::MigrationFailed`] whose status is `cancelled`
    /// ([`Error::is_migration_cancelled`]).
    ///
    /// Returns the migration's state afterwards: `status` is `cancelled`,
    /// or the final state a migration had reached before the cancel could
    /// take (`completed`: the guest has moved; `failed`), or `none` when no
    /// migration had started. When `timeout` runs out first,
    /// [`Error::Timeout`] (the cancel may still take effect).
    ///
    /// ```no_run
    /// # async fn f(src: qmpkit::Client) -> qmpkit::Result<()> {
    /// use std::time::Duration;
    /// let after = src.migrate_cancel(Duration::from_secs(30)).await?;
    /// if after.status == "completed" {
    ///     println!("too late: the guest runs on the destination");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn migrate_cancel(&self, timeout: Duration) -> Result<MigrationStatus> {
        let deadline = Deadline::after(timeout, "migrate_cancel");
        deadline.run(self, &c::MigrateCancel).await?;
        let now: MigrationStatus = deadline.run_as(self, &c::QueryMigrate).await?;
        if now.status == "none" {
            return Ok(now);
        }
        match self.migrate_wait_until("cancelled", &deadline).await {
            Ok(()) | Err(Error::MigrationFailed { .. }) => deadline.run_as(self, &c::QueryMigrate).await,
            Err(e) => Err(e),
        }
    }

    async fn set_migration_capability(
        &self,
        capability: crate::qapi::types::MigrationCapability,
        state: bool,
    ) -> Result<()> {
        let set = crate::qapi::commands::MigrateSetCapabilities {
            capabilities: vec![crate::qapi::types::MigrationCapabilityStatus { capability, state }],
        };
        self.execute(&set).await.map(drop)
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
        let (uri, channels) = self.fd_channel(c::Migrate::NAME, fd_name, None).await?;
        let migrate = c::Migrate {
            uri,
            channels,
            detach: None,
            resume: None,
        };
        self.run(&migrate).await?;
        Ok(())
    }

    /// The migration's state and statistics (`query-migrate`).
    #[doc(alias = "QueryMigrate")]
    pub async fn query_migrate(&self) -> Result<MigrationStatus> {
        self.run_as(&c::QueryMigrate, CallOptions::new()).await
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
        match from_state.parse() {
            Ok(state) => {
                self.run(&c::MigrateContinue { state }).await?;
            }
            // A state QEMU 10 does not have: sent as given, for QEMU to judge.
            Err(_) => {
                #[derive(Serialize)]
                struct MigrateContinue<'a> {
                    state: &'a str,
                }
                self.call::<_, Empty>(c::MigrateContinue::NAME, &MigrateContinue { state: from_state })
                    .await?;
            }
        }
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
            deadline.run(self, &events_capability()).await?;
        }
        let (uri, channels) = self
            .fd_channel(c::MigrateIncoming::NAME, fd_name, Some(&deadline))
            .await?;
        let incoming = c::MigrateIncoming {
            uri,
            channels,
            exit_on_error: None,
        };
        deadline.run(self, &incoming).await?;
        self.migrate_wait_until("completed", &deadline).await
    }

    /// The `uri` or `channels` argument naming an fd as the migration
    /// channel, in the form this QEMU takes; the schema lookup within
    /// `deadline`, when given.
    async fn fd_channel(
        &self,
        command: &str,
        fd_name: &str,
        deadline: Option<&Deadline>,
    ) -> Result<(Option<String>, Option<Vec<t::MigrationChannel>>)> {
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
            let channel = t::MigrationChannel {
                channel_type: t::MigrationChannelType::Main,
                addr: t::MigrationAddress::Socket(t::SocketAddress::Fd(t::FdSocketAddress {
                    str: fd_name.into(),
                })),
            };
            (None, Some(vec![channel]))
        } else {
            // QEMUs before 8.2 take the channel as a URI only.
            (Some(format!("fd:{fd_name}")), None)
        })
    }

    /// True when the `events` capability is on; the query within
    /// `deadline`, when given.
    async fn migration_events_on(&self, deadline: Option<&Deadline>) -> Result<bool> {
        let caps: Vec<CapabilityState> = match deadline {
            Some(d) => d.run_as(self, &c::QueryMigrateCapabilities).await?,
            None => {
                self.run_as(&c::QueryMigrateCapabilities, CallOptions::new())
                    .await?
            }
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
            false => match deadline.run(self, &events_capability()).await {
                Ok(_) => true,
                Err(e) if e.is_timeout() => return Err(e),
                // Cannot be changed while a migration runs; then poll instead.
                Err(_) => false,
            },
        };
        let poll_every = if events_on { SAFETY_POLL } else { FALLBACK_POLL };
        let query = || deadline.run_as::<_, MigrationStatus>(self, &c::QueryMigrate);

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
            let tick = tokio::time::Instant::now() + poll_every;
            status = match events.next_or_timer(Some(tick), Some(deadline.at())).await {
                Woken::Item(None) => return Err(self.closed().await),
                Woken::Item(Some(EventItem::Event(e))) => match e.known() {
                    KnownEvent::Migration { status } => status,
                    _ => continue,
                },
                Woken::Item(Some(EventItem::Missed(_))) => query().await?.status,
                Woken::Tick => query().await?.status,
                Woken::Deadline => return Err(deadline.expired()),
            };
        }
    }
}

/// The `migrate-set-capabilities` that turns `events` on.
fn events_capability() -> c::MigrateSetCapabilities {
    c::MigrateSetCapabilities {
        capabilities: vec![t::MigrationCapabilityStatus {
            capability: t::MigrationCapability::Events,
            state: true,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
