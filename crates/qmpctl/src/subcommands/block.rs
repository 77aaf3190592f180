//! Block devices, nodes, snapshots, jobs, throttling, and the NBD server.

use std::path::Path;

use serde_json::json;

use super::{done, emit};
use crate::cli::*;
use crate::conn::Ctx;
use crate::exit::usage;
use crate::ops::{self, LONG_WAIT, UNPLUG_WAIT};
use crate::out::{bytes, parse_size, Table};
use crate::progress::Progress;
use qmpkit::qapi::commands::{
    self as c, QueryBlock, QueryBlockExports, QueryBlockstats, QueryJobs, QueryNamedBlockNodes,
};
use qmpkit::qapi::types as t;

/// An optional text for a table cell (`-` when absent).
fn text(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
}

/// A size QEMU counts in a signed integer, for a table cell.
fn size(n: i64) -> String {
    u64::try_from(n).map(bytes).unwrap_or_else(|_| "-".into())
}

pub async fn block(ctx: &Ctx, command: BlockCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    match command {
        BlockCommand::List => {
            let (v, devices) = ctx.query(&QueryBlock).await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&["DEVICE", "NODE", "FORMAT", "SIZE", "RO", "FILE"]);
                for b in &devices {
                    let name = b.qdev.as_deref().filter(|s| !s.is_empty()).unwrap_or(&b.device);
                    let row = match &b.inserted {
                        None => vec![
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "(no medium)".into(),
                        ],
                        Some(ins) => vec![
                            text(&ins.node_name),
                            ins.drv.clone(),
                            size(ins.image.virtual_size),
                            ins.ro.to_string(),
                            ins.file.clone(),
                        ],
                    };
                    t.row(std::iter::once(short_qdev(name)).chain(row).collect());
                }
                t.print("no block devices")
            })
        }
        BlockCommand::Stats => {
            let (v, stats) = ctx
                .query(&QueryBlockstats {
                    query_nodes: Some(false),
                })
                .await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&[
                    "DEVICE",
                    "NODE",
                    "READ",
                    "WRITTEN",
                    "READ OPS",
                    "WRITE OPS",
                    "FLUSHES",
                ]);
                for b in &stats {
                    let s = &b.stats;
                    let name = b.qdev.as_deref().or(b.device.as_deref()).unwrap_or("-");
                    t.row(vec![
                        short_qdev(name),
                        text(&b.node_name),
                        size(s.rd_bytes),
                        size(s.wr_bytes),
                        s.rd_operations.to_string(),
                        s.wr_operations.to_string(),
                        s.flush_operations.to_string(),
                    ]);
                }
                t.print("no block devices")
            })
        }
        BlockCommand::Nodes => {
            let (v, nodes) = ctx.query(&QueryNamedBlockNodes { flat: Some(true) }).await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&["NODE", "DRIVER", "SIZE", "RO", "BACKING", "FILE"]);
                for n in &nodes {
                    t.row(vec![
                        text(&n.node_name),
                        n.drv.clone(),
                        size(n.image.virtual_size),
                        n.ro.to_string(),
                        text(&n.backing_file),
                        n.file.clone(),
                    ]);
                }
                t.print("no named block nodes")
            })
        }
        BlockCommand::Add(a) => {
            let file = ops::absolute(&a.file)?;
            let node = json!({
                "driver": a.format, "node-name": a.id, "read-only": a.read_only,
                "file": {"driver": "file", "filename": file},
            });
            if a.no_device {
                ctx.call("blockdev-add", &node).await?;
            } else {
                let mut dev = json!({"driver": a.driver, "id": a.id, "drive": a.id});
                if let Some(bus) = &a.bus {
                    dev["bus"] = json!(bus);
                }
                ctx.within("block add", async {
                    Ok(client.add_block_device(&node, &dev, false).await?)
                })
                .await?;
            }
            let what = if a.no_device { "block node" } else { "disk" };
            done(
                ctx,
                json!({"id": a.id, "device": !a.no_device}),
                &format!("added {what} {} ({})", a.id, a.file.display()),
            )
        }
        BlockCommand::Remove { id, keep_node } => {
            ctx.within("block remove", remove_disk(ctx, &id, keep_node))
                .await?;
            done(ctx, json!({"id": id}), &format!("removed {id}"))
        }
        BlockCommand::Snapshot { node, overlay, name } => {
            let name = name.unwrap_or_else(|| format!("{node}-snap"));
            let file = ops::absolute(&overlay)?;
            // QEMU creates the overlay file itself.
            ctx.run(&c::BlockdevSnapshotSync(t::BlockdevSnapshotSync {
                device: None,
                node_name: Some(node.clone()),
                snapshot_file: file.display().to_string(),
                snapshot_node_name: Some(name.clone()),
                format: Some("qcow2".into()),
                mode: None,
            }))
            .await?;
            done(
                ctx,
                json!({"node": node, "overlay": name, "file": file}),
                &format!("{node} now writes to overlay {name} ({})", file.display()),
            )
        }
        BlockCommand::Commit(a) => {
            let bar = Progress::bytes("commit", ctx.json);
            let budget = ctx.timeout.unwrap_or(LONG_WAIT);
            let work = client.block_commit(&a.node, a.top.as_deref(), a.base.as_deref(), budget);
            ops::with_progress(work, || ops::job_progress(client, &a.node, &bar)).await?;
            bar.finish();
            done(
                ctx,
                json!({"job": a.node}),
                &format!("commit of {} completed", a.node),
            )
        }
        BlockCommand::Mirror(a) => {
            let bar = Progress::bytes("mirror", ctx.json);
            let budget = ctx.timeout.unwrap_or(LONG_WAIT);
            let work = client.block_dev_mirror(&a.node, &a.target, budget);
            ops::with_progress(work, || ops::job_progress(client, &a.node, &bar)).await?;
            bar.finish();
            done(
                ctx,
                json!({"job": a.node, "target": a.target}),
                &format!("mirror of {} completed: {} took its place", a.node, a.target),
            )
        }
        BlockCommand::Resize { node, size } => {
            let size = parse_size(&size)?;
            ctx.within("resize", async {
                Ok(client.update_block_size(&node, size).await?)
            })
            .await?;
            done(
                ctx,
                json!({"node": node, "size": size}),
                &format!("{node} is now {}", bytes(size)),
            )
        }
        BlockCommand::Throttle(a) => {
            ctx.within("throttle", async {
                Ok(client
                    .set_block_throttle(&a.device, a.bps_read, a.bps_write, a.iops_read, a.iops_write)
                    .await?)
            })
            .await?;
            done(
                ctx,
                json!({"device": a.device, "bps_rd": a.bps_read, "bps_wr": a.bps_write, "iops_rd": a.iops_read, "iops_wr": a.iops_write}),
                &format!(
                    "{}: read {} B/s, write {} B/s, {} read IOPS, {} write IOPS (0 = unlimited)",
                    a.device, a.bps_read, a.bps_write, a.iops_read, a.iops_write
                ),
            )
        }
        BlockCommand::Jobs => {
            let (v, jobs) = ctx.query(&QueryJobs).await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&["ID", "TYPE", "STATUS", "PROGRESS", "ERROR"]);
                for j in &jobs {
                    t.row(vec![
                        j.id.clone(),
                        j.r#type.as_str().to_owned(),
                        j.status.as_str().to_owned(),
                        format!("{}/{}", j.current_progress, j.total_progress),
                        text(&j.error),
                    ]);
                }
                t.print("no jobs")
            })
        }
    }
}

/// A qdev path's last component (`/machine/peripheral/disk1/...` is `disk1`).
fn short_qdev(name: &str) -> String {
    name.strip_prefix("/machine/peripheral/")
        .map(|rest| rest.split('/').next().unwrap_or(rest))
        .unwrap_or(name)
        .to_owned()
}

/// Removes a disk: its device (waiting until the guest lets go), then its
/// node. A name that is neither is QEMU's not-found error.
async fn remove_disk(ctx: &Ctx, id: &str, keep_node: bool) -> anyhow::Result<()> {
    let client = &ctx.client;
    let device = ops::qom_devices(client).await?.iter().any(|(d, _)| d == id);
    if device {
        client
            .remove_device_and_wait(id, ctx.timeout.unwrap_or(UNPLUG_WAIT))
            .await?;
    }
    if keep_node {
        return Ok(());
    }
    if client.query_named_block_nodes().await?.iter().any(|n| n == id) {
        client.remove_block_device(id).await?;
    } else if !device {
        // Let QEMU say that there is no such node.
        ctx.run(&c::BlockdevDel { node_name: id.into() }).await?;
    }
    Ok(())
}

pub async fn nbd(ctx: &Ctx, command: NbdCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    match command {
        NbdCommand::Start { address, tcp } => {
            if tcp {
                let (host, port) = address
                    .rsplit_once(':')
                    .ok_or_else(|| usage(format!("--tcp needs HOST:PORT, got {address:?}")))?;
                let addr = t::InetSocketAddress {
                    host: host.into(),
                    port: port.into(),
                    numeric: None,
                    to: None,
                    ipv4: None,
                    ipv6: None,
                    keep_alive: None,
                    mptcp: None,
                };
                ctx.run(&c::NbdServerStart(t::NbdServerOptionsLegacy {
                    handshake_max_seconds: None,
                    tls_creds: None,
                    tls_authz: None,
                    max_connections: None,
                    addr: t::SocketAddressLegacy::Inet(t::InetSocketAddressWrapper { data: addr }),
                }))
                .await?;
            } else {
                let path = ops::absolute(Path::new(&address))?;
                ctx.within("nbd start", async {
                    Ok(client.nbd_unix_server_start(&path).await?)
                })
                .await?;
            }
            done(
                ctx,
                json!({"address": address}),
                &format!("NBD server listening on {address}"),
            )
        }
        NbdCommand::Export { node, writable } => {
            ctx.within("nbd export", async {
                Ok(client.nbd_block_export_add::<&str>(&node, writable, &[]).await?)
            })
            .await?;
            let rw = if writable { " (writable)" } else { "" };
            done(ctx, json!({"export": node}), &format!("exported {node}{rw}"))
        }
        NbdCommand::Unexport { name } => {
            ctx.run(&c::BlockExportDel {
                id: name.clone(),
                mode: None,
            })
            .await?;
            done(ctx, json!({"export": name}), &format!("removed export {name:?}"))
        }
        NbdCommand::List => {
            let (v, exports) = ctx.query(&QueryBlockExports).await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&["ID", "TYPE", "NODE", "SHUTTING DOWN"]);
                for e in &exports {
                    t.row(vec![
                        e.id.clone(),
                        e.r#type.as_str().to_owned(),
                        e.node_name.clone(),
                        e.shutting_down.to_string(),
                    ]);
                }
                t.print("no exports")
            })
        }
        NbdCommand::Stop => {
            ctx.within("nbd stop", async { Ok(client.nbd_server_stop().await?) })
                .await?;
            done(ctx, json!({}), "NBD server stopped")
        }
    }
}
