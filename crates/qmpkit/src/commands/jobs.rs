//! Block jobs: commit, mirror, cancel and complete, each run to its end.
//!
//! Every operation here waits for its job to finish, driven by QEMU's job
//! events rather than by polling:
//!
//! - the event subscription is made *before* the job is started, so a job
//!   that fails at once cannot slip by unseen;
//! - jobs are started with `auto-dismiss: false`, so that when a job
//!   concludes its error can still be read (`query-jobs`); the wait then
//!   dismisses it;
//! - a job that becomes `ready` (a mirror, or a commit of the active layer)
//!   is completed, and the wait goes on until it has concluded;
//! - a job that concludes with an error is [`Error::JobFailed`] with
//!   QEMU's own message;
//! - `query-jobs` is consulted only when events were missed and, as a
//!   safety net, every few seconds.
//!
//! Each wait takes a timeout, a deadline for the whole operation (see
//! [the rule](super#waits-keep-their-callers-deadline)): every command sent
//! on the way gets what is left of it, so a QEMU that stops answering cannot
//! stretch the wait. When it runs out, a job this crate started is cancelled
//! and dismissed, and [`Error::Timeout`] is returned; the caller waits for
//! that clean-up [`CLEANUP_BUDGET`] at most. A clean-up that needs longer
//! (QEMU is not answering, or the job is slow to cancel) goes on in a
//! background task for up to a minute, which dismisses the job once QEMU
//! has cancelled it, so that the job's id can be used again. Dropping the future
//! of [`Client::block_commit`] or [`Client::block_dev_mirror`] does the same
//! clean-up in the background, so no orphaned job is left in QEMU.
//!
//! ```no_run
//! # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
//! use std::time::Duration;
//! // Merge the active layer "top" into its backing image.
//! client.block_commit("top", None, None, Duration::from_secs(600)).await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use qmpkit_qapi::{commands as c, types as t};
use serde::Deserialize;

use crate::client::{CallOptions, Client, Command};
use crate::commands::Deadline;
use crate::error::{Error, Result};
use crate::event::{BlockJobEvent, EventFilter, EventItem, EventStream, KnownEvent, Woken};

/// How often `query-jobs` is consulted while waiting, in case an event was lost.
const SAFETY_POLL: Duration = Duration::from_secs(5);

/// How long a wait that gave up on a job it started goes on past its
/// deadline, cancelling and dismissing the job: the most by which
/// [`Client::block_commit`] and [`Client::block_dev_mirror`] overrun their
/// timeout. A responsive QEMU cancels a job in milliseconds; what is not
/// done by then goes on in the background (see the module docs).
pub const CLEANUP_BUDGET: Duration = Duration::from_secs(2);

/// How long the clean-up of a job given up on may go on in the background
/// (after its wait has returned, or after the wait's future was dropped).
/// Long enough for a QEMU that was stopped for a while to cancel the job
/// and for the job to be dismissed; bounded, since the task keeps the
/// connection open.
const LATE_CLEANUP: Duration = Duration::from_secs(60);

/// A job as `query-jobs` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// The job type (`commit`, `mirror`, `stream`, ...).
    #[serde(rename = "type")]
    pub job_type: String,
    /// Its status (`created`, `running`, `ready`, `concluded`, ...).
    pub status: String,
    /// Progress so far, in an arbitrary unit.
    #[serde(rename = "current-progress")]
    pub current_progress: u64,
    /// The progress value at which the job is done.
    #[serde(rename = "total-progress")]
    pub total_progress: u64,
    /// QEMU's error message, once the job has concluded with an error.
    pub error: Option<String>,
}

/// What a wait does when the job becomes `ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnReady {
    /// Tell the job to complete (commit of the active layer, mirror).
    Complete,
    /// Nothing; keep waiting for it to conclude (after a cancel or complete).
    Wait,
}

/// Follows one job through its events until it concludes.
///
/// Make it (with [`Client::watch_job`]) *before* starting the job, for
/// jobs started by other means than this module:
///
/// ```no_run
/// # async fn f(client: qmpkit::Client) -> qmpkit::Result<()> {
/// use std::time::Duration;
/// let mut watch = client.watch_job("backup0");
/// client
///     .execute_raw("blockdev-backup", serde_json::json!({
///         "job-id": "backup0", "device": "disk0", "target": "backup", "sync": "full"}))
///     .await?;
/// watch.wait(false, Duration::from_secs(3600)).await?;
/// # Ok(()) }
/// ```
pub struct JobWatch {
    client: Client,
    id: String,
    events: EventStream,
    /// The error from `BLOCK_JOB_COMPLETED`, for jobs that dismiss themselves.
    event_error: Option<String>,
    /// `BLOCK_JOB_CANCELLED` was seen.
    cancelled_event: bool,
    /// This wait asked for the job to be cancelled.
    cancel_requested: bool,
    /// The job went through `concluded` (it may be gone by now).
    concluded: bool,
    /// Complete was already asked for.
    completing: bool,
}

impl std::fmt::Debug for JobWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobWatch")
            .field("id", &self.id)
            .field("concluded", &self.concluded)
            .field("completing", &self.completing)
            .finish_non_exhaustive()
    }
}

/// How a watched job ended.
enum Outcome {
    /// Concluded without an error.
    Done,
    /// Concluded after being cancelled.
    Cancelled,
    /// Concluded with this error.
    Failed(String),
}

impl Client {
    /// Starts the job `id` with `command` and runs it to its end: completes
    /// it when it becomes ready, cancels it when the wait is given up
    /// (timeout, or the future dropped).
    async fn run_job<C: Command>(&self, id: &str, command: &C, deadline: &Deadline) -> Result<()> {
        let mut watch = self.watch_job(id);
        // Past the deadline already: nothing is sent, so nothing to clean up.
        let left = deadline.remaining()?;
        // Armed before the command is sent: a caller that gives up while the
        // command is in flight leaves no job behind either.
        let mut guard = Abandon {
            client: Some((self.clone(), id.to_owned())),
        };
        let result = match self.run_with(command, CallOptions::new().timeout(left)).await {
            // The command may still reach QEMU and start the job: clean up
            // as for a job that was running.
            Err(e) if e.is_timeout() => Err(deadline.expired()),
            Err(e) => {
                guard.disarm();
                return Err(e);
            }
            Ok(_) => watch.wait_end(OnReady::Complete, deadline).await,
        };
        guard.disarm();
        if matches!(result, Err(Error::Timeout { .. })) {
            cleanup_within_margin(self, id).await;
        }
        result
    }

    /// Starts following the job `id`: subscribes to its events now, so
    /// nothing is missed between starting the job and waiting for it.
    pub fn watch_job(&self, id: &str) -> JobWatch {
        let events = self.subscribe(EventFilter::names([
            "JOB_STATUS_CHANGE",
            "BLOCK_JOB_COMPLETED",
            "BLOCK_JOB_CANCELLED",
            "BLOCK_JOB_READY",
            "BLOCK_JOB_ERROR",
        ]));
        JobWatch {
            client: self.clone(),
            id: id.to_owned(),
            events,
            event_error: None,
            cancelled_event: false,
            cancel_requested: false,
            concluded: false,
            completing: false,
        }
    }

    /// Every job QEMU knows, running or concluded (`query-jobs`).
    pub async fn query_jobs(&self) -> Result<Vec<JobInfo>> {
        self.run_as(&c::QueryJobs, CallOptions::new()).await
    }

    /// Merges the images from `top` down to just above `base` into `base`
    /// (`block-commit`) and waits until the job has finished and is
    /// dismissed. `device` is the chain's top node; the job's id is
    /// `device` too. `top` defaults to `device` (commit of the active
    /// layer) and `base` to the bottom of the chain.
    ///
    /// A commit of the active layer becomes `ready` and is then completed
    /// (the device switches to `base`); a commit of a lower layer finishes
    /// by itself. A failed job is [`Error::JobFailed`]; at `timeout` the job
    /// is cancelled and [`Error::Timeout`] returned, at most
    /// [`CLEANUP_BUDGET`] after `timeout` even when QEMU does not answer
    /// (see the module docs).
    #[doc(alias = "BlockCommit")]
    pub async fn block_commit(
        &self,
        device: &str,
        top: Option<&str>,
        base: Option<&str>,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Deadline::after(timeout, "block-commit");
        #[allow(deprecated)] // `top` and `base` (file names) are left out for the node names
        let commit = c::BlockCommit {
            job_id: Some(device.into()),
            device: device.into(),
            base_node: base.map(Into::into),
            base: None,
            top_node: top.map(Into::into),
            top: None,
            backing_file: None,
            backing_mask_protocol: None,
            speed: None,
            on_error: None,
            filter_node_name: None,
            auto_finalize: None,
            // Kept until the wait has read how the job ended.
            auto_dismiss: Some(false),
        };
        self.run_job(device, &commit, &deadline).await
    }

    /// Copies the node `device` to the node `target` (`blockdev-mirror`,
    /// only the top image, writes copied synchronously once in sync), then
    /// completes the job so that `target` replaces `device` in the graph,
    /// and waits until the job is finished and dismissed. The job's id is
    /// `device`.
    ///
    /// A failed job is [`Error::JobFailed`]; at `timeout` the job is
    /// cancelled (the source stays in use) and [`Error::Timeout`] returned,
    /// at most [`CLEANUP_BUDGET`] after `timeout` even when QEMU does not
    /// answer (see the module docs).
    #[doc(alias = "BlockDevMirror")]
    pub async fn block_dev_mirror(&self, device: &str, target: &str, timeout: Duration) -> Result<()> {
        let deadline = Deadline::after(timeout, "blockdev-mirror");
        // QEMUs before 3.0 have no copy mode (and copy in the background).
        let copy_mode = deadline
            .schema(self)
            .await?
            .has_argument(c::BlockdevMirror::NAME, "copy-mode")
            .then_some(t::MirrorCopyMode::WriteBlocking);
        let mirror = c::BlockdevMirror {
            job_id: Some(device.into()),
            device: device.into(),
            target: target.into(),
            replaces: None,
            sync: t::MirrorSyncMode::Top,
            speed: None,
            granularity: None,
            buf_size: None,
            on_source_error: None,
            on_target_error: None,
            filter_node_name: None,
            copy_mode,
            auto_finalize: None,
            // Kept until the wait has read how the job ended.
            auto_dismiss: Some(false),
        };
        self.run_job(device, &mirror, &deadline).await
    }

    /// Cancels the block job `id` (`block-job-cancel`) and waits until it
    /// has ended (and dismisses it if it waits for that). A mirror that was
    /// `ready` stops without switching to its target. A job that failed by
    /// itself before the cancel took effect is [`Error::JobFailed`]. When
    /// `timeout` runs out (QEMU answering or not), [`Error::Timeout`]; the
    /// job is then left to QEMU, which may still cancel it.
    #[doc(alias = "BlockJobCancel")]
    pub async fn block_job_cancel(&self, id: &str, timeout: Duration) -> Result<()> {
        let deadline = Deadline::after(timeout, "block-job-cancel");
        let mut watch = self.watch_job(id);
        if deadline.schema(self).await?.has_command(c::BlockJobCancel::NAME) {
            let cancel = c::BlockJobCancel {
                device: id.into(),
                force: None,
            };
            deadline.run(self, &cancel).await?;
        } else {
            deadline.run(self, &c::JobCancel { id: id.into() }).await?;
        }
        watch.cancel_requested = true;
        watch.wait_end(OnReady::Wait, &deadline).await
    }

    /// Completes the `ready` job `id` (`job-complete`, or
    /// `block-job-complete` on a QEMU without it) and waits until it has
    /// concluded, then dismisses it. When `timeout` runs out (QEMU
    /// answering or not), [`Error::Timeout`]; the job is left as it is.
    #[doc(alias = "BlockJobComplete")]
    pub async fn block_job_complete(&self, id: &str, timeout: Duration) -> Result<()> {
        let deadline = Deadline::after(timeout, "block-job-complete");
        let mut watch = self.watch_job(id);
        watch.complete(&deadline).await?;
        watch.wait_end(OnReady::Wait, &deadline).await
    }
}

/// Cancels and dismisses a job this crate started if the wait for it is
/// abandoned (dropped) before the job ended.
struct Abandon {
    client: Option<(Client, String)>,
}

impl Abandon {
    fn disarm(&mut self) {
        self.client = None;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some((client, id)) = self.client.take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let deadline = Deadline::after(LATE_CLEANUP, "job-cancel");
                handle.spawn(async move { cleanup(&client, &id, &deadline).await });
            }
        }
    }
}

/// Cleans up a job given up on at a wait's deadline: waits for the clean-up
/// [`CLEANUP_BUDGET`] at most, and leaves the rest of it to a background
/// task bounded by [`LATE_CLEANUP`].
async fn cleanup_within_margin(client: &Client, id: &str) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            let (client, id) = (client.clone(), id.to_owned());
            let deadline = Deadline::after(LATE_CLEANUP, "job-cancel");
            let task = handle.spawn(async move { cleanup(&client, &id, &deadline).await });
            // Dropping the handle at the margin detaches the task; it goes on.
            let _ = tokio::time::timeout(CLEANUP_BUDGET, task).await;
        }
        // Not on a tokio runtime: nothing to hand over to, so the margin is all.
        Err(_) => cleanup(client, id, &Deadline::after(CLEANUP_BUDGET, "job-cancel")).await,
    }
}

/// Best effort, within `deadline`: cancels the job, waits for it to
/// conclude, dismisses it.
async fn cleanup(client: &Client, id: &str, deadline: &Deadline) {
    let mut watch = client.watch_job(id);
    let _ = deadline.run(client, &c::JobCancel { id: id.into() }).await;
    watch.cancel_requested = true;
    let _ = watch.wait_end(OnReady::Wait, deadline).await;
    let _ = deadline.run(client, &c::JobDismiss { id: id.into() }).await;
}

impl JobWatch {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits until the job has concluded, completing it when it becomes
    /// `ready` if `complete_when_ready`, and dismisses it. A job that ended
    /// with an error is [`Error::JobFailed`]; when `timeout` runs out (QEMU
    /// answering or not), [`Error::Timeout`] (the job is left as it is).
    pub async fn wait(&mut self, complete_when_ready: bool, timeout: Duration) -> Result<()> {
        let on_ready = if complete_when_ready {
            OnReady::Complete
        } else {
            OnReady::Wait
        };
        let deadline = Deadline::after(timeout, "job wait");
        self.wait_end(on_ready, &deadline).await
    }

    async fn complete(&mut self, deadline: &Deadline) -> Result<()> {
        self.completing = true;
        let client = &self.client;
        if deadline.schema(client).await?.has_command(c::JobComplete::NAME) {
            let complete = c::JobComplete { id: self.id.clone() };
            deadline.run(client, &complete).await?;
        } else {
            let complete = c::BlockJobComplete {
                device: self.id.clone(),
            };
            deadline.run(client, &complete).await?;
        }
        Ok(())
    }

    /// Waits for the job to conclude, then reads its error and dismisses it.
    /// Every command it sends is bounded by `deadline`.
    async fn wait_end(&mut self, on_ready: OnReady, deadline: &Deadline) -> Result<()> {
        // The job may already be past some states: look once now.
        let mut status = self.poll(deadline).await?;
        loop {
            match status.as_deref() {
                Some("ready") if on_ready == OnReady::Complete && !self.completing => {
                    self.complete(deadline).await?;
                }
                Some("concluded") => self.concluded = true,
                // Gone: dismissed by itself (auto-dismiss) or by someone else.
                None | Some("null") => {
                    // Take in what is already queued: it may say how it ended.
                    while let Some(e) = self.events.try_next() {
                        self.note(&e.known());
                    }
                    let ended = self.concluded
                        || self.cancel_requested
                        || self.completing
                        || self.cancelled_event
                        || self.event_error.is_some();
                    if ended {
                        break;
                    }
                    return Err(Error::JobFailed {
                        job: self.id.clone(),
                        message: "the job does not exist (or vanished before it concluded)".into(),
                    });
                }
                _ => {}
            }
            if self.concluded {
                break;
            }
            let tick = tokio::time::Instant::now() + SAFETY_POLL;
            status = match self.events.next_or_timer(Some(tick), Some(deadline.at())).await {
                Woken::Item(None) => return Err(self.client.closed().await),
                Woken::Item(Some(EventItem::Missed(_))) => self.poll(deadline).await?,
                Woken::Item(Some(EventItem::Event(e))) => match self.note(&e.known()) {
                    Some(s) => Some(s),
                    None => continue,
                },
                Woken::Tick => self.poll(deadline).await?,
                Woken::Deadline => return Err(deadline.expired()),
            };
        }
        match self.finish(deadline).await? {
            Outcome::Done | Outcome::Cancelled => Ok(()),
            Outcome::Failed(message) => Err(Error::JobFailed {
                job: self.id.clone(),
                message,
            }),
        }
    }

    /// Takes in one event; returns the job's new status if the event says it.
    fn note(&mut self, event: &KnownEvent) -> Option<String> {
        match event {
            KnownEvent::JobStatusChange { id, status } if *id == self.id => {
                if status == "concluded" {
                    self.concluded = true;
                }
                Some(status.clone())
            }
            KnownEvent::BlockJob {
                kind, device, error, ..
            } if *device == self.id => {
                match kind {
                    BlockJobEvent::Completed if error.is_some() => {
                        self.event_error = error.clone();
                    }
                    BlockJobEvent::Cancelled => self.cancelled_event = true,
                    _ => {}
                }
                None
            }
            _ => None,
        }
    }

    /// The job's status from `query-jobs`; `None` when it is not listed.
    async fn poll(&mut self, deadline: &Deadline) -> Result<Option<String>> {
        let jobs: Vec<JobInfo> = deadline.run_as(&self.client, &c::QueryJobs).await?;
        Ok(jobs.into_iter().find(|j| j.id == self.id).map(|j| j.status))
    }

    /// After `concluded`: reads the error and dismisses the job if it is still there.
    async fn finish(&mut self, deadline: &Deadline) -> Result<Outcome> {
        let jobs: Vec<JobInfo> = deadline.run_as(&self.client, &c::QueryJobs).await?;
        // BLOCK_JOB_COMPLETED with an error: the job failed by itself.
        let failed_event = self.event_error.take();
        let error = match jobs.into_iter().find(|j| j.id == self.id) {
            Some(job) => {
                if job.status == "concluded" {
                    let dismiss = c::JobDismiss { id: self.id.clone() };
                    deadline.run(&self.client, &dismiss).await?;
                }
                job.error.or_else(|| failed_event.clone())
            }
            None => failed_event.clone(),
        };
        Ok(match error {
            None => Outcome::Done,
            // The cancel this wait asked for, not a failure of the job's own.
            Some(_) if self.cancel_requested && failed_event.is_none() => Outcome::Cancelled,
            Some(message) => Outcome::Failed(message),
        })
    }
}
