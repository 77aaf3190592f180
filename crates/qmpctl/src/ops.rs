//! What the subcommands and the tour share: progress bars beside the
//! library's long operations, and the few operations the library has no
//! typed form of (a migration to a URI, a detached memory dump).
//!
//! The rule throughout the tool: actions go through the library's typed
//! operations (they undo half-done work, wait on events, classify errors);
//! listings show QEMU's own answers, so that `--json` gives all of it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use qmpkit::{Client, EventFilter};
use serde_json::Value;

use crate::progress::Progress;
use qmpkit::qapi::commands::{self as c, QomList, QueryDump, QueryMigrate};
use qmpkit::qapi::events::DumpCompleted;
use qmpkit::qapi::types::{DumpGuestMemoryFormat, DumpQueryResult, DumpStatus};
use qmpkit::qapi::Command as _;
use serde::Deserialize as _;

/// A count QEMU keeps in a signed integer, for a progress bar.
fn non_negative(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// How often figures for progress bars are asked for.
const TICK: Duration = Duration::from_millis(100);

/// How long `device_del` may take before the guest is blamed.
pub const UNPLUG_WAIT: Duration = Duration::from_secs(30);

/// The budget of a long wait (job, migration) when `--timeout` gives none.
pub const LONG_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Runs a command and returns its reply.
pub async fn query(client: &Client, name: &str) -> anyhow::Result<Value> {
    Ok(client.call::<Value, Value>(name, &Value::Null).await?)
}

/// A path as QEMU must see it: absolute (QEMU's working directory is not ours).
pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// Runs `work` while `poll` refreshes a progress bar every tick.
pub async fn with_progress<T, P, PF>(work: impl Future<Output = T>, mut poll: P) -> T
where
    P: FnMut() -> PF,
    PF: Future<Output = ()>,
{
    tokio::pin!(work);
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            biased;
            done = &mut work => return done,
            _ = tick.tick() => {
                // A progress query on a frozen QEMU waits out its own budget:
                // it must never hold back the work's end (its deadline).
                tokio::select! {
                    biased;
                    done = &mut work => return done,
                    () = poll() => {}
                }
            }
        }
    }
}

/// Shows a block job's progress (`query-jobs`) on `bar`.
pub async fn job_progress(client: &Client, job: &str, bar: &Progress) {
    if let Ok(jobs) = client.query_jobs().await {
        if let Some(j) = jobs.iter().find(|j| j.id == job) {
            bar.set(j.current_progress, j.total_progress);
            bar.message(&j.status);
        }
    }
}

/// Shows a migration's progress (`query-migrate`) on `bar`.
pub async fn migration_progress(client: &Client, bar: &Progress) {
    if let Ok(info) = client.execute(&QueryMigrate).await {
        if let Some(ram) = &info.ram {
            bar.set(non_negative(ram.transferred), non_negative(ram.total));
        }
        bar.message(info.status.map_or("", |s| s.as_str()));
    }
}

/// Waits for the migration to complete (the library's event-driven wait)
/// with a progress bar, and returns the last `query-migrate`.
pub async fn wait_migration(client: &Client, budget: Duration, bar: &Progress) -> anyhow::Result<Value> {
    with_progress(client.migrate_wait("completed", budget), || {
        migration_progress(client, bar)
    })
    .await?;
    bar.finish();
    query(client, "query-migrate").await
}

/// Starts a migration to a URI (`unix:PATH`, `tcp:HOST:PORT`, `exec:...`),
/// with the `MIGRATION` event on so that the wait needs no polling.
pub async fn migrate_to_uri(client: &Client, uri: &str) -> anyhow::Result<()> {
    client.migrate_set_capabilities([("events", true)]).await?;
    let migrate = c::Migrate {
        uri: Some(uri.into()),
        channels: None,
        detach: None,
        resume: None,
    };
    client.call::<_, Value>(c::Migrate::NAME, &migrate).await?;
    Ok(())
}

/// Makes a VM started with `-incoming defer` listen for a migration on a URI.
pub async fn migrate_incoming_uri(client: &Client, uri: &str) -> anyhow::Result<()> {
    client.migrate_set_capabilities([("events", true)]).await?;
    let incoming = c::MigrateIncoming {
        uri: Some(uri.into()),
        channels: None,
        exit_on_error: None,
    };
    client
        .call::<_, Value>(c::MigrateIncoming::NAME, &incoming)
        .await?;
    Ok(())
}

/// Dumps guest memory to a file in the background (detached, so that QEMU
/// answers `query-dump` meanwhile) and follows it with a progress bar;
/// returns the last `query-dump`.
pub async fn dump_memory(
    client: &Client,
    file: &Path,
    format: DumpGuestMemoryFormat,
    bar: &Progress,
) -> anyhow::Result<Value> {
    let file = absolute(file)?;
    let mut events = client.subscribe(EventFilter::names(["DUMP_COMPLETED"]));
    let dump = c::DumpGuestMemory {
        paging: false,
        protocol: format!("file:{}", file.display()),
        detach: Some(true),
        begin: None,
        length: None,
        format: Some(format),
    };
    client.call::<_, Value>(c::DumpGuestMemory::NAME, &dump).await?;
    let finished = async {
        match events.next().await {
            Some(e) => match e.data_of::<DumpCompleted>() {
                Some(Ok(done)) => Ok(done.error),
                Some(Err(err)) => {
                    Err(anyhow::Error::new(err).context("QEMU's DUMP_COMPLETED does not match its schema"))
                }
                None => Ok(None),
            },
            None => Err(anyhow::Error::new(client.closed().await)),
        }
    };
    let error = with_progress(finished, || async {
        if let Ok(info) = client.execute(&QueryDump).await {
            bar.set(non_negative(info.completed), non_negative(info.total));
        }
    })
    .await?;
    bar.finish();
    if let Some(message) = error {
        anyhow::bail!("the memory dump failed: {message}");
    }
    let info = query(client, "query-dump").await?;
    let result =
        DumpQueryResult::deserialize(&info).context("QEMU's query-dump answer does not match its schema")?;
    if result.status != DumpStatus::Completed {
        anyhow::bail!("the memory dump ended as {}", result.status.as_str());
    }
    Ok(info)
}

/// The devices added with an id (`/machine/peripheral`), with their types.
pub async fn qom_devices(client: &Client) -> anyhow::Result<Vec<(String, String)>> {
    let list = client
        .execute(&QomList {
            path: "/machine/peripheral".into(),
        })
        .await?;
    Ok(list
        .into_iter()
        .filter_map(|p| {
            let ty = p.r#type.strip_prefix("child<")?.strip_suffix('>')?.to_owned();
            Some((p.name, ty))
        })
        .collect())
}
