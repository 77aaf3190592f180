//! The operations that take more than one command or a wait: disk hotplug,
//! block jobs, device removal, migrations, memory dumps, ring buffers.
//! Shared by the subcommands and the tour. Each waits on QEMU's events,
//! subscribing before the command that causes them, and polls the matching
//! query only for the figures of a progress bar.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use qmp::{Client, EventFilter};
use serde_json::{json, Value};

use crate::progress::Progress;

/// How often figures for progress bars are asked for.
const TICK: Duration = Duration::from_millis(100);

/// How long `device_del` may take before the guest is blamed.
pub const UNPLUG_WAIT: Duration = Duration::from_secs(30);

/// Runs a command whose reply carries nothing of interest.
pub async fn run(client: &Client, name: &str, args: Value) -> anyhow::Result<()> {
    client.call::<Value, Value>(name, &args).await?;
    Ok(())
}

/// Runs a command and returns its reply.
pub async fn query(client: &Client, name: &str) -> anyhow::Result<Value> {
    Ok(client.call::<Value, Value>(name, &Value::Null).await?)
}

/// A path as QEMU must see it: absolute (QEMU's working directory is not ours).
pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// The VM's run state (`running`, `paused`, `prelaunch`, ...).
pub async fn status(client: &Client) -> anyhow::Result<String> {
    let v = query(client, "query-status").await?;
    Ok(v["status"].as_str().unwrap_or("unknown").to_owned())
}

/// What `block add` needs.
pub struct Disk<'a> {
    pub id: &'a str,
    pub file: &'a Path,
    pub format: &'a str,
    pub driver: &'a str,
    pub bus: Option<&'a str>,
    pub read_only: bool,
    pub device: bool,
}

/// Adds a block node named `id` for an image file, and a device using it.
/// If the device cannot be added, the node is removed again.
pub async fn add_disk(client: &Client, d: &Disk<'_>) -> anyhow::Result<()> {
    let file = absolute(d.file)?;
    run(
        client,
        "blockdev-add",
        json!({
            "driver": d.format,
            "node-name": d.id,
            "read-only": d.read_only,
            "file": {"driver": "file", "filename": file},
        }),
    )
    .await?;
    if !d.device {
        return Ok(());
    }
    let mut dev = json!({"driver": d.driver, "id": d.id, "drive": d.id});
    if let Some(bus) = d.bus {
        dev["bus"] = json!(bus);
    }
    if let Err(e) = run(client, "device_add", dev).await {
        let _ = run(client, "blockdev-del", json!({"node-name": d.id})).await;
        return Err(e);
    }
    Ok(())
}

/// Removes a device and waits until QEMU reports it gone (`DEVICE_DELETED`);
/// some buses (PCIe) need the guest's consent, so the wait is bounded.
pub async fn remove_device(client: &Client, id: &str, budget: Duration) -> anyhow::Result<()> {
    let mut events = client.subscribe(EventFilter::names(["DEVICE_DELETED"]));
    run(client, "device_del", json!({"id": id})).await?;
    let wait = async {
        while let Some(e) = events.next().await {
            if e.data()["device"].as_str() == Some(id) {
                return Ok(());
            }
        }
        Err(anyhow::Error::new(client.closed().await))
    };
    match tokio::time::timeout(budget, wait).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::Error::new(crate::exit::Deadline(format!(
            "device {id} was not released within {}: a PCIe or ACPI device needs the guest to let go of it",
            humantime::format_duration(budget)
        )))),
    }
}

/// Removes a disk added by [`add_disk`]: the device, then the node.
pub async fn remove_disk(client: &Client, id: &str, keep_node: bool, budget: Duration) -> anyhow::Result<()> {
    let devices = qom_ids(client).await.unwrap_or_default();
    if devices.iter().any(|d| d == id) {
        remove_device(client, id, budget).await?;
    }
    if !keep_node {
        run(client, "blockdev-del", json!({"node-name": id})).await?;
    }
    Ok(())
}

/// The ids of the devices added with one (`/machine/peripheral`).
pub async fn qom_ids(client: &Client) -> anyhow::Result<Vec<String>> {
    Ok(qom_devices(client).await?.into_iter().map(|(id, _)| id).collect())
}

/// The devices added with an id, with their types.
pub async fn qom_devices(client: &Client) -> anyhow::Result<Vec<(String, String)>> {
    let v = client
        .call::<Value, Value>("qom-list", &json!({"path": "/machine/peripheral"}))
        .await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            let ty = p["type"].as_str()?;
            let ty = ty.strip_prefix("child<")?.strip_suffix('>')?;
            Some((name.to_owned(), ty.to_owned()))
        })
        .collect())
}

/// Starts a block job with `start` (which must pass `auto-dismiss: false`),
/// follows it to its end with a progress bar (completing it when it is
/// ready: a mirror or an active commit then switches the device over),
/// dismisses it, and returns its last `query-jobs` entry. A job that ends
/// with an error is an error.
pub async fn run_job(
    client: &Client,
    job_id: &str,
    start: (&str, Value),
    bar: &Progress,
) -> anyhow::Result<Value> {
    let mut events = client.subscribe(EventFilter::names(["JOB_STATUS_CHANGE"]));
    run(client, start.0, start.1).await?;
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            e = events.next() => {
                let Some(e) = e else { return Err(anyhow::Error::new(client.closed().await)) };
                if e.data()["id"].as_str() != Some(job_id) {
                    continue;
                }
                let status = e.data()["status"].as_str().unwrap_or_default().to_owned();
                bar.message(&status);
                match status.as_str() {
                    "ready" => {
                        run(client, "job-complete", json!({"id": job_id})).await?;
                    }
                    "concluded" => break,
                    _ => {}
                }
            }
            _ = tick.tick() => {
                if let Some(job) = find_job(client, job_id).await? {
                    let done = job["current-progress"].as_u64().unwrap_or(0);
                    let total = job["total-progress"].as_u64().unwrap_or(0);
                    bar.set(done, total);
                }
            }
        }
    }
    let last = find_job(client, job_id).await?.unwrap_or(Value::Null);
    bar.finish();
    let _ = run(client, "job-dismiss", json!({"id": job_id})).await;
    if let Some(message) = last["error"].as_str() {
        return Err(qmp::Error::JobFailed {
            job: job_id.to_owned(),
            message: message.to_owned(),
        }
        .into());
    }
    Ok(last)
}

async fn find_job(client: &Client, id: &str) -> anyhow::Result<Option<Value>> {
    let jobs = query(client, "query-jobs").await?;
    Ok(jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["id"].as_str() == Some(id)).cloned()))
}

/// True for a migration state from which nothing follows.
fn migration_final(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

/// Turns on the `MIGRATION` event, so that waits need not poll.
pub async fn enable_migration_events(client: &Client) -> anyhow::Result<()> {
    run(
        client,
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    )
    .await
}

/// Starts a migration (`start` is the `migrate` command and its arguments)
/// and follows it to a final state with a progress bar, returning the last
/// `query-migrate`. A state other than `completed` is an error.
pub async fn migrate_and_wait(
    client: &Client,
    start: Option<Value>,
    bar: &Progress,
) -> anyhow::Result<Value> {
    let _ = enable_migration_events(client).await;
    let mut events = client.subscribe(EventFilter::names(["MIGRATION"]));
    if let Some(args) = start {
        run(client, "migrate", args).await?;
    }
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            e = events.next() => {
                let Some(e) = e else { return Err(anyhow::Error::new(client.closed().await)) };
                let status = e.data()["status"].as_str().unwrap_or_default();
                bar.message(status);
                if migration_final(status) {
                    break;
                }
            }
            _ = tick.tick() => {
                let info = query(client, "query-migrate").await?;
                let status = info["status"].as_str().unwrap_or_default();
                bar.set(
                    info["ram"]["transferred"].as_u64().unwrap_or(0),
                    info["ram"]["total"].as_u64().unwrap_or(0),
                );
                if migration_final(status) {
                    break;
                }
            }
        }
    }
    let info = query(client, "query-migrate").await?;
    bar.finish();
    let status = info["status"].as_str().unwrap_or("unknown");
    if status != "completed" {
        return Err(qmp::Error::MigrationFailed {
            status: status.to_owned(),
            message: info["error-desc"].as_str().map(str::to_owned),
        }
        .into());
    }
    Ok(info)
}

/// Dumps guest memory to a file in the background and follows it with a
/// progress bar; returns the last `query-dump`.
pub async fn dump_memory(
    client: &Client,
    file: &Path,
    format: &str,
    bar: &Progress,
) -> anyhow::Result<Value> {
    let file = absolute(file)?;
    let mut events = client.subscribe(EventFilter::names(["DUMP_COMPLETED"]));
    run(
        client,
        "dump-guest-memory",
        json!({"paging": false, "protocol": format!("file:{}", file.display()), "detach": true, "format": format}),
    )
    .await?;
    let mut tick = tokio::time::interval(TICK);
    let error = loop {
        tokio::select! {
            e = events.next() => {
                let Some(e) = e else { return Err(anyhow::Error::new(client.closed().await)) };
                break e.data()["error"].as_str().map(str::to_owned);
            }
            _ = tick.tick() => {
                let info = query(client, "query-dump").await?;
                bar.set(info["completed"].as_u64().unwrap_or(0), info["total"].as_u64().unwrap_or(0));
            }
        }
    };
    bar.finish();
    let info = query(client, "query-dump").await?;
    if let Some(message) = error {
        anyhow::bail!("the memory dump failed: {message}");
    }
    if info["status"] != "completed" {
        anyhow::bail!("the memory dump ended as {}", info["status"]);
    }
    Ok(info)
}

/// Reads everything a ring-buffer chardev holds (reading drains it).
pub async fn drain_ringbuf(client: &Client, chardev: &str) -> anyhow::Result<String> {
    let mut all = String::new();
    loop {
        let chunk: Value = client
            .call_with(
                "ringbuf-read",
                &json!({"device": chardev, "size": 65536, "format": "utf8"}),
                qmp::CallOptions::new().unlogged(),
            )
            .await
            .map_err(|e| ringbuf_error(e, chardev))?;
        let text = chunk.as_str().unwrap_or_default();
        if text.is_empty() {
            return Ok(all);
        }
        all.push_str(text);
    }
}

/// QEMU's errors for a missing or wrong chardev, as the library's typed ones.
fn ringbuf_error(e: qmp::Error, chardev: &str) -> anyhow::Error {
    match e.as_qmp().map(|q| q.desc.as_str()) {
        Some(d) if d.contains("not found") => qmp::Error::BadConsole(chardev.to_owned()).into(),
        Some(d) if d.contains("not a ringbuf") => qmp::Error::NotARingbuf(chardev.to_owned()).into(),
        _ => e.into(),
    }
}
