//! The VM as a whole: run state, lifecycle, CPUs, memory, console, screen, memory dump.

use std::path::Path;

use anyhow::Context as _;
use qmpkit::qapi::types::MemoryDeviceInfo;
use serde::Deserialize as _;
use serde_json::json;

use super::{done, emit};
use crate::cli::*;
use crate::conn::Ctx;
use crate::exit::usage;
use crate::ops;
use crate::out::{self, bytes, parse_size, Table};
use crate::outln;
use crate::progress::Progress;
use qmpkit::qapi::commands::{
    self as c, QueryBalloon, QueryCpusFast, QueryHotpluggableCpus, QueryMemoryDevices,
    QueryMemorySizeSummary, QueryStatus,
};
use qmpkit::qapi::types as t;

/// A row of `memory devices`: the kind, then what each kind has of id,
/// size, backend, slot and hotplug state (`-` where it has none).
fn memory_device_row(d: &MemoryDeviceInfo) -> Vec<String> {
    let dash = || "-".to_owned();
    let id = |id: &Option<String>| id.clone().unwrap_or_else(dash);
    match d {
        MemoryDeviceInfo::Dimm(w) | MemoryDeviceInfo::Nvdimm(w) => {
            let kind = if matches!(d, MemoryDeviceInfo::Dimm(_)) {
                "dimm"
            } else {
                "nvdimm"
            };
            let x = &w.data;
            vec![
                kind.into(),
                id(&x.id),
                bytes(u64::try_from(x.size).unwrap_or(0)),
                x.memdev.clone(),
                x.slot.to_string(),
                x.hotplugged.to_string(),
            ]
        }
        MemoryDeviceInfo::VirtioPmem(w) => {
            let x = &w.data;
            vec![
                "virtio-pmem".into(),
                id(&x.id),
                bytes(x.size),
                x.memdev.clone(),
                dash(),
                dash(),
            ]
        }
        MemoryDeviceInfo::VirtioMem(w) => {
            let x = &w.data;
            vec![
                "virtio-mem".into(),
                id(&x.id),
                bytes(x.size),
                x.memdev.clone(),
                dash(),
                dash(),
            ]
        }
        MemoryDeviceInfo::SgxEpc(w) => {
            let x = &w.data;
            vec![
                "sgx-epc".into(),
                id(&x.id),
                bytes(x.size),
                x.memdev.clone(),
                dash(),
                dash(),
            ]
        }
        MemoryDeviceInfo::HvBalloon(w) => {
            let x = &w.data;
            vec![
                "hv-balloon".into(),
                id(&x.id),
                bytes(x.max_size),
                x.memdev.clone().unwrap_or_else(dash),
                dash(),
                dash(),
            ]
        }
        #[allow(unreachable_patterns)]
        _ => vec![dash(); 6],
    }
}

/// An optional number for a table cell (`-` when absent).
fn opt(n: Option<i64>) -> String {
    n.map(|n| n.to_string()).unwrap_or_else(|| "-".into())
}

pub async fn status(ctx: &Ctx) -> anyhow::Result<()> {
    let (v, info) = ctx.query(&QueryStatus).await?;
    emit(ctx, &v, || outln!("{}", info.status.as_str()))
}

pub async fn lifecycle(ctx: &Ctx, command: &str) -> anyhow::Result<()> {
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
    let (after, info) = ctx.query(&QueryStatus).await?;
    let status = info.status.as_str();
    let line = match command {
        "system_powerdown" => {
            format!("power button pressed (the guest decides what to do); status: {status}")
        }
        "system_reset" => format!("reset; status: {status}"),
        _ => status.to_owned(),
    };
    done(ctx, after, &line)
}

pub async fn quit(ctx: &Ctx) -> anyhow::Result<()> {
    ctx.within("quit", async {
        ctx.client.quit().await?;
        // QEMU closes the socket once it has gone.
        ctx.client.closed().await;
        Ok(())
    })
    .await?;
    done(ctx, json!({}), "QEMU has quit")
}

pub async fn cpus(ctx: &Ctx, a: CpusArgs) -> anyhow::Result<()> {
    if a.hotpluggable {
        let (v, slots) = ctx.query(&QueryHotpluggableCpus).await?;
        return emit(ctx, &v, || {
            let mut t = Table::new(&["TYPE", "VCPUS", "SOCKET", "CORE", "THREAD", "PLUGGED AS"]);
            for c in &slots {
                let p = &c.props;
                t.row(vec![
                    c.r#type.clone(),
                    c.vcpus_count.to_string(),
                    opt(p.socket_id),
                    opt(p.core_id),
                    opt(p.thread_id),
                    c.qom_path.clone().unwrap_or_else(|| "(free)".into()),
                ]);
            }
            t.print("no hotpluggable CPUs")
        });
    }
    let (v, cpus) = ctx.query(&QueryCpusFast).await?;
    emit(ctx, &v, || {
        let mut t = Table::new(&["CPU", "THREAD", "SOCKET", "CORE", "ARCH", "QOM PATH"]);
        for c in &cpus {
            let props = c.props.as_ref();
            t.row(vec![
                c.cpu_index.to_string(),
                c.thread_id.to_string(),
                opt(props.and_then(|p| p.socket_id)),
                opt(props.and_then(|p| p.core_id)),
                // The target is the tag of the branch type: serialized, it is that one member.
                serde_json::to_value(&c.branch)
                    .ok()
                    .and_then(|b| b.get("target").and_then(|t| t.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| "-".into()),
                c.qom_path.clone(),
            ]);
        }
        t.print("no CPUs")
    })
}

pub async fn memory(ctx: &Ctx, command: Option<MemoryCommand>) -> anyhow::Result<()> {
    match command {
        None | Some(MemoryCommand::Size) => {
            let (v, info) = ctx.query(&QueryMemorySizeSummary).await?;
            emit(ctx, &v, || {
                outln!("base memory:    {}", bytes(info.base_memory))?;
                outln!("plugged memory: {}", bytes(info.plugged_memory.unwrap_or(0)))
            })
        }
        Some(MemoryCommand::Balloon { size: None }) => {
            let (v, info) = ctx.query(&QueryBalloon).await?;
            emit(ctx, &v, || {
                outln!("balloon: guest has {}", bytes(info.actual.max(0) as u64))
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
            let (v, devices) = ctx.query(&QueryMemoryDevices).await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&["TYPE", "ID", "SIZE", "MEMDEV", "SLOT", "HOTPLUGGED"]);
                for d in &devices {
                    t.row(memory_device_row(d));
                }
                t.print("no memory devices")
            })
        }
    }
}

pub async fn console(ctx: &Ctx, a: ConsoleArgs) -> anyhow::Result<()> {
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

pub async fn screendump(ctx: &Ctx, a: ScreendumpArgs) -> anyhow::Result<()> {
    let file = ops::absolute(&a.file)?;
    if a.format == t::ImageFormat::Png && a.device.is_none() {
        ctx.within("screendump", async { Ok(ctx.client.screendump(&file).await?) })
            .await?;
    } else {
        ctx.run(&c::Screendump {
            filename: file.display().to_string(),
            device: a.device.clone(),
            head: None,
            format: Some(a.format),
        })
        .await?;
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

pub async fn dump_memory(ctx: &Ctx, a: DumpArgs) -> anyhow::Result<()> {
    let bar = Progress::bytes("dump", ctx.json);
    let info = ctx
        .within(
            "dump-memory",
            ops::dump_memory(&ctx.client, &a.file, a.format, &bar),
        )
        .await?;
    let file = ops::absolute(&a.file)?;
    done(
        ctx,
        json!({"file": file, "result": info}),
        &format!(
            "dumped {} of guest memory to {}",
            bytes(
                qmpkit::qapi::types::DumpQueryResult::deserialize(&info)
                    .map(|r| u64::try_from(r.total).unwrap_or(0))
                    .unwrap_or(0)
            ),
            file.display()
        ),
    )
}
