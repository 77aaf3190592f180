//! The typed subcommands: each runs its commands and prints a table, a short
//! line, or (with `--json`) QEMU's answer as JSON.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::cli::*;
use crate::conn::Ctx;
use crate::exit::usage;
use qmpkit::commands::chardev::ChardevBackend;
use qmpkit::commands::devices::{DeviceSpec, NetdevSpec};

use crate::ops::{self, LONG_WAIT, UNPLUG_WAIT};
use crate::out::{self, bytes, cell, parse_size, size_cell, Table};
use crate::outln;
use crate::progress::Progress;

/// Runs a subcommand that needs a connection.
pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Status => status(ctx).await?,
        Command::Start => lifecycle(ctx, "cont").await?,
        Command::Pause => lifecycle(ctx, "stop").await?,
        Command::Reset => lifecycle(ctx, "system_reset").await?,
        Command::Powerdown => lifecycle(ctx, "system_powerdown").await?,
        Command::Quit => quit(ctx).await?,
        Command::Cpus(a) => cpus(ctx, a).await?,
        Command::Memory(a) => memory(ctx, a.command).await?,
        Command::Block(c) => block(ctx, c).await?,
        Command::Nbd(c) => nbd(ctx, c).await?,
        Command::Device(c) => device(ctx, c).await?,
        Command::Chardev(c) => chardev(ctx, c).await?,
        Command::Nic(c) => nic(ctx, c).await?,
        Command::Console(a) => console(ctx, a).await?,
        Command::Screendump(a) => screendump(ctx, a).await?,
        Command::DumpMemory(a) => dump_memory(ctx, a).await?,
        Command::Migrate(c) => migrate(ctx, c).await?,
        Command::Exec(a) => return crate::exec::run(ctx, a).await,
        Command::Events(a) => return crate::events::run(ctx, a).await,
        Command::Shell(a) => return crate::shell::run(ctx, a).await,
        Command::Tour(_) | Command::Bench(_) | Command::Agent(_) => {
            unreachable!("dispatched before connecting")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `value` as JSON with `--json`, else runs `human`.
fn emit(ctx: &Ctx, value: &Value, human: impl FnOnce() -> std::io::Result<()>) -> anyhow::Result<()> {
    if ctx.json {
        out::json(value, true)?;
    } else {
        human()?;
    }
    Ok(())
}

/// Prints a one-line confirmation (`{"ok": true, ...}` with `--json`).
fn done(ctx: &Ctx, mut value: Value, line: &str) -> anyhow::Result<()> {
    if let Value::Object(m) = &mut value {
        m.insert("ok".into(), Value::Bool(true));
    }
    emit(ctx, &value, || outln!("{line}"))
}

async fn status(ctx: &Ctx) -> anyhow::Result<()> {
    let v = ctx.call("query-status", &()).await?;
    emit(ctx, &v, || outln!("{}", cell(&v["status"])))
}

async fn lifecycle(ctx: &Ctx, command: &str) -> anyhow::Result<()> {
    let c = &ctx.client;
    ctx.within(command, async {
        match command {
            "cont" => c.start().await?,
            "stop" => c.pause().await?,
            "system_reset" => c.reset().await?,
            _ => c.powerdown().await?,
        }
        Ok(())
    })
    .await?;
    let after = ctx.call("query-status", &()).await?;
    let line = match command {
        "system_powerdown" => format!(
            "power button pressed (the guest decides what to do); status: {}",
            cell(&after["status"])
        ),
        "system_reset" => format!("reset; status: {}", cell(&after["status"])),
        _ => cell(&after["status"]),
    };
    done(ctx, after, &line)
}

async fn quit(ctx: &Ctx) -> anyhow::Result<()> {
    ctx.within("quit", async {
        ctx.client.quit().await?;
        // QEMU closes the socket once it has gone.
        ctx.client.closed().await;
        Ok(())
    })
    .await?;
    done(ctx, json!({}), "QEMU has quit")
}

async fn cpus(ctx: &Ctx, a: CpusArgs) -> anyhow::Result<()> {
    if a.hotpluggable {
        let v = ctx.call("query-hotpluggable-cpus", &()).await?;
        return emit(ctx, &v, || {
            let mut t = Table::new(&["TYPE", "VCPUS", "SOCKET", "CORE", "THREAD", "PLUGGED AS"]);
            for c in v.as_array().into_iter().flatten() {
                let p = &c["props"];
                t.row(vec![
                    cell(&c["type"]),
                    cell(&c["vcpus-count"]),
                    cell(&p["socket-id"]),
                    cell(&p["core-id"]),
                    cell(&p["thread-id"]),
                    c["qom-path"].as_str().unwrap_or("(free)").to_owned(),
                ]);
            }
            t.print("no hotpluggable CPUs")
        });
    }
    let v = ctx.call("query-cpus-fast", &()).await?;
    emit(ctx, &v, || {
        let mut t = Table::new(&["CPU", "THREAD", "SOCKET", "CORE", "ARCH", "QOM PATH"]);
        for c in v.as_array().into_iter().flatten() {
            t.row(vec![
                cell(&c["cpu-index"]),
                cell(&c["thread-id"]),
                cell(&c["props"]["socket-id"]),
                cell(&c["props"]["core-id"]),
                cell(&c["target"]),
                cell(&c["qom-path"]),
            ]);
        }
        t.print("no CPUs")
    })
}

async fn memory(ctx: &Ctx, command: Option<MemoryCommand>) -> anyhow::Result<()> {
    match command {
        None | Some(MemoryCommand::Size) => {
            let v = ctx.call("query-memory-size-summary", &()).await?;
            emit(ctx, &v, || {
                outln!("base memory:    {}", size_cell(&v["base-memory"]))?;
                let plugged = v["plugged-memory"].as_u64().unwrap_or(0);
                outln!("plugged memory: {}", bytes(plugged))
            })
        }
        Some(MemoryCommand::Balloon { size: None }) => {
            let v = ctx.call("query-balloon", &()).await?;
            emit(ctx, &v, || {
                outln!("balloon: guest has {}", size_cell(&v["actual"]))
            })
        }
        Some(MemoryCommand::Balloon { size: Some(size) }) => {
            let target = parse_size(&size)?;
            let signed = i64::try_from(target).map_err(|_| usage(format!("{size} is too large")))?;
            ctx.within("balloon", async {
                Ok(ctx.client.set_memory_balloon_size_bytes(signed).await?)
            })
            .await?;
            done(
                ctx,
                json!({"target": target}),
                &format!(
                    "balloon target set to {} (the guest's driver moves towards it)",
                    bytes(target)
                ),
            )
        }
        Some(MemoryCommand::Devices) => {
            let v = ctx.call("query-memory-devices", &()).await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&["TYPE", "ID", "SIZE", "MEMDEV", "SLOT", "HOTPLUGGED"]);
                for d in v.as_array().into_iter().flatten() {
                    let data = &d["data"];
                    t.row(vec![
                        cell(&d["type"]),
                        cell(&data["id"]),
                        size_cell(&data["size"]),
                        cell(&data["memdev"]),
                        cell(&data["slot"]),
                        cell(&data["hotplugged"]),
                    ]);
                }
                t.print("no memory devices")
            })
        }
    }
}

async fn block(ctx: &Ctx, command: BlockCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    match command {
        BlockCommand::List => {
            let v = ctx.call("query-block", &()).await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&["DEVICE", "NODE", "FORMAT", "SIZE", "RO", "FILE"]);
                for b in v.as_array().into_iter().flatten() {
                    let ins = &b["inserted"];
                    let name = b["qdev"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .or(b["device"].as_str())
                        .unwrap_or("-");
                    let file = if ins.is_null() {
                        "(no medium)".into()
                    } else {
                        cell(&ins["file"])
                    };
                    t.row(vec![
                        short_qdev(name),
                        cell(&ins["node-name"]),
                        cell(&ins["drv"]),
                        size_cell(&ins["image"]["virtual-size"]),
                        cell(&ins["ro"]),
                        file,
                    ]);
                }
                t.print("no block devices")
            })
        }
        BlockCommand::Stats => {
            let v = ctx
                .call("query-blockstats", &json!({"query-nodes": false}))
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
                for b in v.as_array().into_iter().flatten() {
                    let s = &b["stats"];
                    let name = b["qdev"].as_str().or(b["device"].as_str()).unwrap_or("-");
                    t.row(vec![
                        short_qdev(name),
                        cell(&b["node-name"]),
                        size_cell(&s["rd_bytes"]),
                        size_cell(&s["wr_bytes"]),
                        cell(&s["rd_operations"]),
                        cell(&s["wr_operations"]),
                        cell(&s["flush_operations"]),
                    ]);
                }
                t.print("no block devices")
            })
        }
        BlockCommand::Nodes => {
            let v = ctx
                .call("query-named-block-nodes", &json!({"flat": true}))
                .await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&["NODE", "DRIVER", "SIZE", "RO", "BACKING", "FILE"]);
                for n in v.as_array().into_iter().flatten() {
                    t.row(vec![
                        cell(&n["node-name"]),
                        cell(&n["drv"]),
                        size_cell(&n["image"]["virtual-size"]),
                        cell(&n["ro"]),
                        cell(&n["backing_file"]),
                        cell(&n["file"]),
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
            ctx.call(
                "blockdev-snapshot-sync",
                &json!({"node-name": node, "snapshot-file": file, "snapshot-node-name": name, "format": "qcow2"}),
            )
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
            let v = ctx.call("query-jobs", &()).await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&["ID", "TYPE", "STATUS", "PROGRESS", "ERROR"]);
                for j in v.as_array().into_iter().flatten() {
                    t.row(vec![
                        cell(&j["id"]),
                        cell(&j["type"]),
                        cell(&j["status"]),
                        format!("{}/{}", cell(&j["current-progress"]), cell(&j["total-progress"])),
                        cell(&j["error"]),
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
        ctx.call("blockdev-del", &json!({"node-name": id})).await?;
    }
    Ok(())
}

async fn nbd(ctx: &Ctx, command: NbdCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    match command {
        NbdCommand::Start { address, tcp } => {
            if tcp {
                let (host, port) = address
                    .rsplit_once(':')
                    .ok_or_else(|| usage(format!("--tcp needs HOST:PORT, got {address:?}")))?;
                let addr = json!({"type": "inet", "data": {"host": host, "port": port}});
                ctx.call("nbd-server-start", &json!({"addr": addr})).await?;
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
            ctx.call("block-export-del", &json!({"id": name})).await?;
            done(ctx, json!({"export": name}), &format!("removed export {name:?}"))
        }
        NbdCommand::List => {
            let v = ctx.call("query-block-exports", &()).await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&["ID", "TYPE", "NODE", "SHUTTING DOWN"]);
                for e in v.as_array().into_iter().flatten() {
                    t.row(vec![
                        cell(&e["id"]),
                        cell(&e["type"]),
                        cell(&e["node-name"]),
                        cell(&e["shutting-down"]),
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

async fn device(ctx: &Ctx, command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Add { driver, id, props } => {
            let props = crate::exec::parse_pairs(props.iter().map(String::as_str))?;
            let mut spec = DeviceSpec::new(&driver).id(&id);
            for (k, v) in props.as_object().into_iter().flatten() {
                spec = spec.prop(k, v.clone());
            }
            ctx.within("device add", async { Ok(ctx.client.add_device(&spec).await?) })
                .await?;
            done(ctx, json!({"id": id}), &format!("added {driver} {id}"))
        }
        DeviceCommand::Remove { id } => {
            let budget = ctx.timeout.unwrap_or(UNPLUG_WAIT);
            ctx.client.remove_device_and_wait(&id, budget).await?;
            done(ctx, json!({"id": id}), &format!("removed {id}"))
        }
        DeviceCommand::List => {
            let list = ctx.within("device list", ops::qom_devices(&ctx.client)).await?;
            let v: Value = list
                .iter()
                .map(|(id, ty)| json!({"id": id, "type": ty}))
                .collect();
            emit(ctx, &v, || {
                let mut t = Table::new(&["ID", "TYPE"]);
                for (id, ty) in &list {
                    t.row(vec![id.clone(), ty.clone()]);
                }
                t.print("no devices with an id")
            })
        }
    }
}

async fn chardev(ctx: &Ctx, command: ChardevCommand) -> anyhow::Result<()> {
    match command {
        ChardevCommand::Add { id, backend, options } => {
            let data = match crate::exec::parse_pairs(options.iter().map(String::as_str))? {
                Value::Object(m) => m,
                _ => unreachable!("parse_pairs makes an object"),
            };
            let spec = ChardevBackend::new(&backend, data);
            let added = ctx
                .within("chardev add", async {
                    Ok(ctx.client.add_char_device(&id, &spec).await?)
                })
                .await?;
            let pty = added
                .pty
                .as_deref()
                .map(|p| format!(" on {p}"))
                .unwrap_or_default();
            done(
                ctx,
                json!({"id": id, "pty": added.pty}),
                &format!("added chardev {id} ({backend}){pty}"),
            )
        }
        ChardevCommand::Remove { id } => {
            ctx.within("chardev remove", async {
                Ok(ctx.client.remove_char_device(&id).await?)
            })
            .await?;
            done(ctx, json!({"id": id}), &format!("removed chardev {id}"))
        }
        ChardevCommand::List => {
            let v = ctx.call("query-chardev", &()).await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&["ID", "OPEN", "BACKEND"]);
                for c in v.as_array().into_iter().flatten() {
                    t.row(vec![
                        cell(&c["label"]),
                        cell(&c["frontend-open"]),
                        cell(&c["filename"]),
                    ]);
                }
                t.print("no chardevs")
            })
        }
    }
}

async fn nic(ctx: &Ctx, command: NicCommand) -> anyhow::Result<()> {
    match command {
        NicCommand::Add {
            id,
            model,
            netdev,
            mac,
            bus,
            link_down,
        } => {
            let mut dev = DeviceSpec::new(&model).id(&id);
            if let Some(mac) = &mac {
                dev = dev.prop("mac", mac.as_str());
            }
            if let Some(bus) = &bus {
                dev = dev.bus(bus);
            }
            let backend = NetdevSpec::new(&netdev, &id);
            ctx.within("nic add", async {
                Ok(ctx.client.add_nic(&backend, &dev, !link_down).await?)
            })
            .await?;
            done(
                ctx,
                json!({"id": id}),
                &format!("added {model} {id} on a {netdev} backend"),
            )
        }
        NicCommand::Remove { id } => {
            let budget = ctx.timeout.unwrap_or(UNPLUG_WAIT);
            ctx.client.remove_nic_and_wait(&id, Some(&id), budget).await?;
            done(ctx, json!({"id": id}), &format!("removed {id} and its backend"))
        }
        NicCommand::Link { id, state } => {
            let up = state == "up";
            ctx.within("nic link", async { Ok(ctx.client.set_nic_link(&id, up).await?) })
                .await?;
            done(ctx, json!({"id": id, "up": up}), &format!("{id}: link {state}"))
        }
    }
}

async fn console(ctx: &Ctx, a: ConsoleArgs) -> anyhow::Result<()> {
    loop {
        let text = ctx
            .within("console", async {
                Ok(ctx.client.ringbuf_read(&a.chardev).await?)
            })
            .await?;
        if ctx.json {
            if !a.follow || !text.is_empty() {
                out::json(&json!({"chardev": a.chardev, "data": text}), true)?;
            }
        } else if !text.is_empty() {
            use std::io::Write as _;
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(text.as_bytes())?;
            stdout.flush()?;
        }
        if !a.follow {
            return Ok(());
        }
        // A ring buffer has no event for new data: poll it.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn screendump(ctx: &Ctx, a: ScreendumpArgs) -> anyhow::Result<()> {
    let file = ops::absolute(&a.file)?;
    if a.format == "png" && a.device.is_none() {
        ctx.within("screendump", async { Ok(ctx.client.screendump(&file).await?) })
            .await?;
    } else {
        let mut args = json!({"filename": file, "format": a.format});
        if let Some(d) = &a.device {
            args["device"] = json!(d);
        }
        ctx.call("screendump", &args).await?;
    }
    let size = std::fs::metadata(&file)
        .with_context(|| format!("QEMU reported success but {} cannot be read", file.display()))?
        .len();
    let dims = image_size(&file);
    let dims_text = dims.map(|(w, h)| format!("{w}x{h}, ")).unwrap_or_default();
    done(
        ctx,
        json!({"file": file, "bytes": size, "width": dims.map(|d| d.0), "height": dims.map(|d| d.1)}),
        &format!("wrote {} ({dims_text}{})", file.display(), bytes(size)),
    )
}

/// The width and height of a PNG or binary PPM file, from its header.
pub fn image_size(path: &Path) -> Option<(u32, u32)> {
    let data = std::fs::read(path).ok()?;
    if data.starts_with(b"\x89PNG\r\n\x1a\n") && data.len() >= 24 {
        let w = u32::from_be_bytes(data[16..20].try_into().ok()?);
        let h = u32::from_be_bytes(data[20..24].try_into().ok()?);
        return Some((w, h));
    }
    if data.starts_with(b"P6") {
        let head = String::from_utf8_lossy(&data[..data.len().min(64)]).into_owned();
        let mut it = head.split_ascii_whitespace().skip(1);
        return Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?));
    }
    None
}

async fn dump_memory(ctx: &Ctx, a: DumpArgs) -> anyhow::Result<()> {
    let bar = Progress::bytes("dump", ctx.json);
    let info = ctx
        .within(
            "dump-memory",
            ops::dump_memory(&ctx.client, &a.file, &a.format, &bar),
        )
        .await?;
    let file = ops::absolute(&a.file)?;
    done(
        ctx,
        json!({"file": file, "result": info}),
        &format!(
            "dumped {} of guest memory to {}",
            bytes(info["total"].as_u64().unwrap_or(0)),
            file.display()
        ),
    )
}

/// A migration target as QEMU's URI: a plain path is a Unix socket.
fn migration_uri(target: &str) -> anyhow::Result<String> {
    const SCHEMES: [&str; 6] = ["unix:", "tcp:", "exec:", "fd:", "file:", "rdma:"];
    if SCHEMES.iter().any(|s| target.starts_with(s)) {
        return Ok(target.to_owned());
    }
    Ok(format!("unix:{}", ops::absolute(Path::new(target))?.display()))
}

/// The name under which `migrate to --fd` hands its descriptor to QEMU.
const MIGRATION_FD: &str = "qmpctl-migration";

async fn migrate(ctx: &Ctx, command: MigrateCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    let budget = ctx.timeout.unwrap_or(LONG_WAIT);
    match command {
        MigrateCommand::To { target, fd, no_wait } => {
            let uri = match (target, fd) {
                (Some(t), _) => {
                    let uri = migration_uri(&t)?;
                    ctx.within("migrate", ops::migrate_to_uri(client, &uri)).await?;
                    uri
                }
                (None, Some(fd)) => {
                    let owned = dup_fd(fd)?;
                    ctx.within("migrate", async {
                        client.send_file(MIGRATION_FD, owned).await?;
                        Ok(client.migrate(MIGRATION_FD).await?)
                    })
                    .await?;
                    format!("fd:{MIGRATION_FD}")
                }
                (None, None) => return Err(usage("migrate to needs a target or --fd")),
            };
            if no_wait {
                return done(ctx, json!({"uri": uri}), &format!("migration to {uri} started"));
            }
            let bar = Progress::bytes("migrate", ctx.json);
            let info = ops::wait_migration(client, budget, &bar).await?;
            done(
                ctx,
                json!({"uri": uri, "result": info}),
                &format!("migration to {uri} completed: {}", migration_summary(&info)),
            )
        }
        MigrateCommand::Incoming { address, wait } => {
            let uri = migration_uri(&address)?;
            ctx.within("migrate incoming", ops::migrate_incoming_uri(client, &uri))
                .await?;
            if !wait {
                return done(
                    ctx,
                    json!({"uri": uri}),
                    &format!("waiting for a migration on {uri}"),
                );
            }
            let bar = Progress::bytes("incoming", ctx.json);
            // The wait keeps `--timeout` itself (its budget); a second
            // timer of the same length would race it for the message.
            let info = ops::wait_migration(client, budget, &bar).await?;
            done(
                ctx,
                json!({"uri": uri, "result": info}),
                &format!("received the VM on {uri}"),
            )
        }
        MigrateCommand::Status => {
            let v = ctx.call("query-migrate", &()).await?;
            emit(ctx, &v, || {
                outln!("status: {}", v["status"].as_str().unwrap_or("none"))?;
                if v["ram"].is_object() {
                    outln!("{}", migration_summary(&v))?;
                }
                if let Some(e) = v["error-desc"].as_str() {
                    outln!("error: {e}")?;
                }
                Ok(())
            })
        }
        MigrateCommand::Cancel => {
            ctx.call("migrate_cancel", &()).await?;
            done(ctx, json!({}), "migration cancel requested")
        }
    }
}

/// One line of migration figures.
pub fn migration_summary(info: &Value) -> String {
    let ram = &info["ram"];
    let mut parts = vec![format!(
        "{} of {} RAM sent",
        bytes(ram["transferred"].as_u64().unwrap_or(0)),
        bytes(ram["total"].as_u64().unwrap_or(0))
    )];
    if let Some(t) = info["total-time"].as_u64() {
        parts.push(format!("in {t} ms"));
    }
    if let Some(d) = info["downtime"].as_u64() {
        parts.push(format!("downtime {d} ms"));
    }
    parts.join(", ")
}

/// A copy of one of this process's file descriptors, to hand to QEMU.
fn dup_fd(fd: i32) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::BorrowedFd;
    if fd < 0 {
        return Err(usage(format!("--fd {fd} is not a file descriptor")));
    }
    // SAFETY: the descriptor is only borrowed for the dup below; if it is not
    // open, fcntl fails with EBADF and nothing else is touched.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_dupfd_cloexec(borrowed, 3).map_err(|e| {
        usage(format!(
            "--fd {fd}: {} (give qmpctl the descriptor, e.g. `qmpctl migrate to --fd 3 3>vm.state`)",
            std::io::Error::from(e)
        ))
    })
}
