//! The typed subcommands: each runs its commands and prints a table, a short
//! line, or (with `--json`) QEMU's answer as JSON.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::cli::*;
use crate::conn::Ctx;
use crate::exit::usage;
use crate::ops::{self, Disk};
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
        Command::Tour(_) | Command::Bench(_) => unreachable!("dispatched before connecting"),
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
    ctx.call(command, &()).await?;
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
    ctx.call("quit", &()).await?;
    // QEMU closes the socket once it has gone.
    ctx.within("quit", async {
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
                outln!(
                    "plugged memory: {}",
                    v["plugged-memory"]
                        .as_u64()
                        .map(bytes)
                        .unwrap_or_else(|| "0 B".into())
                )
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
            ctx.call("balloon", &json!({"value": target})).await?;
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
                    t.row(vec![
                        short_qdev(name),
                        cell(&ins["node-name"]),
                        cell(&ins["drv"]),
                        size_cell(&ins["image"]["virtual-size"]),
                        cell(&ins["ro"]),
                        if ins.is_null() {
                            "(no medium)".into()
                        } else {
                            cell(&ins["file"])
                        },
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
            let disk = Disk {
                id: &a.id,
                file: &a.file,
                format: &a.format,
                driver: &a.driver,
                bus: a.bus.as_deref(),
                read_only: a.read_only,
                device: !a.no_device,
            };
            ctx.within("block add", ops::add_disk(client, &disk)).await?;
            let what = if a.no_device { "block node" } else { "disk" };
            done(
                ctx,
                json!({"id": a.id, "device": !a.no_device}),
                &format!("added {what} {} ({})", a.id, a.file.display()),
            )
        }
        BlockCommand::Remove { id, keep_node } => {
            let budget = ctx.timeout.unwrap_or(ops::UNPLUG_WAIT);
            ctx.within("block remove", ops::remove_disk(client, &id, keep_node, budget))
                .await?;
            done(ctx, json!({"id": id}), &format!("removed {id}"))
        }
        BlockCommand::Snapshot { node, overlay, name } => {
            let name = name.unwrap_or_else(|| format!("{node}-snap"));
            let file = ops::absolute(&overlay)?;
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
            let mut args = json!({"job-id": a.job_id, "device": a.node, "auto-dismiss": false});
            if let Some(top) = &a.top {
                args["top-node"] = json!(top);
            }
            if let Some(base) = &a.base {
                args["base-node"] = json!(base);
            }
            block_job(ctx, "block-commit", args, &a.job_id, a.no_wait, "commit").await
        }
        BlockCommand::Mirror(a) => {
            let args = json!({
                "job-id": a.job_id, "device": a.node, "target": a.target,
                "sync": a.sync, "auto-dismiss": false,
            });
            block_job(ctx, "blockdev-mirror", args, &a.job_id, a.no_wait, "mirror").await
        }
        BlockCommand::Resize { node, size } => {
            let size = parse_size(&size)?;
            ctx.call("block_resize", &json!({"node-name": node, "size": size}))
                .await?;
            done(
                ctx,
                json!({"node": node, "size": size}),
                &format!("{node} is now {}", bytes(size)),
            )
        }
        BlockCommand::Throttle(a) => {
            ctx.call(
                "block_set_io_throttle",
                &json!({
                    "id": a.device, "bps": 0, "bps_rd": a.bps_read, "bps_wr": a.bps_write,
                    "iops": 0, "iops_rd": a.iops_read, "iops_wr": a.iops_write,
                }),
            )
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

async fn block_job(
    ctx: &Ctx,
    command: &str,
    args: Value,
    job_id: &str,
    no_wait: bool,
    label: &str,
) -> anyhow::Result<()> {
    if no_wait {
        ctx.call(command, &args).await?;
        return done(
            ctx,
            json!({"job": job_id}),
            &format!("started job {job_id} (see `qmpctl block jobs`)"),
        );
    }
    let bar = Progress::bytes(label, ctx.json);
    let last = ctx
        .within(label, ops::run_job(&ctx.client, job_id, (command, args), &bar))
        .await?;
    done(
        ctx,
        json!({"job": job_id, "result": last}),
        &format!(
            "job {job_id} ({label}) completed: {}",
            bytes(last["total-progress"].as_u64().unwrap_or(0))
        ),
    )
}

async fn nbd(ctx: &Ctx, command: NbdCommand) -> anyhow::Result<()> {
    match command {
        NbdCommand::Start { address, tcp } => {
            let addr = if tcp {
                let (host, port) = address
                    .rsplit_once(':')
                    .ok_or_else(|| usage(format!("--tcp needs HOST:PORT, got {address:?}")))?;
                json!({"type": "inet", "data": {"host": host, "port": port}})
            } else {
                json!({"type": "unix", "data": {"path": ops::absolute(Path::new(&address))?}})
            };
            ctx.call("nbd-server-start", &json!({"addr": addr})).await?;
            done(
                ctx,
                json!({"addr": addr}),
                &format!("NBD server listening on {address}"),
            )
        }
        NbdCommand::Export { node, name, writable } => {
            let name = name.unwrap_or_else(|| node.clone());
            ctx.call(
                "block-export-add",
                &json!({"type": "nbd", "id": name, "node-name": node, "name": name, "writable": writable}),
            )
            .await?;
            done(
                ctx,
                json!({"export": name, "node": node}),
                &format!(
                    "exported {node} as {name:?}{}",
                    if writable { " (writable)" } else { "" }
                ),
            )
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
            ctx.call("nbd-server-stop", &()).await?;
            done(ctx, json!({}), "NBD server stopped")
        }
    }
}

async fn device(ctx: &Ctx, command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Add { driver, id, props } => {
            let mut args = crate::exec::parse_pairs(props.iter().map(String::as_str))?;
            args["driver"] = json!(driver);
            args["id"] = json!(id);
            ctx.call("device_add", &args).await?;
            done(ctx, json!({"id": id}), &format!("added {driver} {id}"))
        }
        DeviceCommand::Remove { id } => {
            let budget = ctx.timeout.unwrap_or(ops::UNPLUG_WAIT);
            ctx.within("device remove", ops::remove_device(&ctx.client, &id, budget))
                .await?;
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
            let data = crate::exec::parse_pairs(options.iter().map(String::as_str))?;
            let v = ctx
                .call(
                    "chardev-add",
                    &json!({"id": id, "backend": {"type": backend, "data": data}}),
                )
                .await?;
            let pty = v["pty"].as_str().map(|p| format!(" on {p}")).unwrap_or_default();
            done(
                ctx,
                json!({"id": id, "reply": v}),
                &format!("added chardev {id} ({backend}){pty}"),
            )
        }
        ChardevCommand::Remove { id } => {
            ctx.call("chardev-remove", &json!({"id": id})).await?;
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
            ctx.call("netdev_add", &json!({"type": netdev, "id": id})).await?;
            let mut dev = json!({"driver": model, "id": id, "netdev": id});
            if let Some(mac) = &mac {
                dev["mac"] = json!(mac);
            }
            if let Some(bus) = &bus {
                dev["bus"] = json!(bus);
            }
            if let Err(e) = ctx.call("device_add", &dev).await {
                let _ = ctx.call("netdev_del", &json!({"id": id})).await;
                return Err(e);
            }
            if link_down {
                ctx.call("set_link", &json!({"name": id, "up": false})).await?;
            }
            done(
                ctx,
                json!({"id": id}),
                &format!("added {model} {id} on a {netdev} backend"),
            )
        }
        NicCommand::Remove { id } => {
            let budget = ctx.timeout.unwrap_or(ops::UNPLUG_WAIT);
            ctx.within("nic remove", ops::remove_device(&ctx.client, &id, budget))
                .await?;
            ctx.call("netdev_del", &json!({"id": id})).await?;
            done(ctx, json!({"id": id}), &format!("removed {id} and its backend"))
        }
        NicCommand::Link { id, state } => {
            ctx.call("set_link", &json!({"name": id, "up": state == "up"}))
                .await?;
            done(
                ctx,
                json!({"id": id, "up": state == "up"}),
                &format!("{id}: link {state}"),
            )
        }
    }
}

async fn console(ctx: &Ctx, a: ConsoleArgs) -> anyhow::Result<()> {
    loop {
        let text = ctx
            .within("console", ops::drain_ringbuf(&ctx.client, &a.chardev))
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
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn screendump(ctx: &Ctx, a: ScreendumpArgs) -> anyhow::Result<()> {
    let file = ops::absolute(&a.file)?;
    let mut args = json!({"filename": file, "format": a.format});
    if let Some(d) = &a.device {
        args["device"] = json!(d);
    }
    ctx.call("screendump", &args).await?;
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

async fn migrate(ctx: &Ctx, command: MigrateCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    match command {
        MigrateCommand::To { target, fd, no_wait } => {
            let uri = match (target, fd) {
                (Some(t), _) => migration_uri(&t)?,
                (None, Some(fd)) => {
                    let owned = dup_fd(fd)?;
                    client
                        .call_with::<_, Value>(
                            "getfd",
                            &json!({"fdname": "qmpctl-migration"}),
                            qmp::CallOptions::new().fds([owned]),
                        )
                        .await?;
                    "fd:qmpctl-migration".to_owned()
                }
                (None, None) => return Err(usage("migrate to needs a target or --fd")),
            };
            let args = json!({"uri": uri});
            if no_wait {
                ops::enable_migration_events(client).await?;
                ctx.call("migrate", &args).await?;
                return done(ctx, json!({"uri": uri}), &format!("migration to {uri} started"));
            }
            let bar = Progress::bytes("migrate", ctx.json);
            let info = ctx
                .within("migrate", ops::migrate_and_wait(client, Some(args), &bar))
                .await?;
            let line = migration_summary(&info);
            done(
                ctx,
                json!({"uri": uri, "result": info}),
                &format!("migration to {uri} completed: {line}"),
            )
        }
        MigrateCommand::Incoming { address, wait } => {
            let uri = migration_uri(&address)?;
            ops::enable_migration_events(client).await?;
            ctx.call("migrate-incoming", &json!({"uri": uri})).await?;
            if !wait {
                return done(
                    ctx,
                    json!({"uri": uri}),
                    &format!("waiting for a migration on {uri}"),
                );
            }
            let bar = Progress::bytes("incoming", ctx.json);
            let info = ctx
                .within("migrate incoming", ops::migrate_and_wait(client, None, &bar))
                .await?;
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
            "--fd {fd}: {} (open it in the shell, e.g. `3<>FILE`)",
            std::io::Error::from(e)
        ))
    })
}
