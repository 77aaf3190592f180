//! `tour`: the library at work, step by step, on scratch VMs.
//!
//! It needs QEMU and nothing else: it launches two throwaway VMs, makes its
//! own disk images with qemu-img, and plays the guest agent itself by
//! writing to the agent's ring buffer. Each step prints what it did and
//! what QEMU answered; the first step that fails ends the tour with an
//! error naming it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use qmp::launch::Qemu;
use qmp::{Client, EventFilter};
use serde_json::{json, Value};

use crate::cli::{Globals, TourArgs};
use crate::conn::{connect_options, scratch_vm};
use crate::exit::Deadline;
use crate::ops::{self, query, run as cmd, Disk};
use crate::out::bytes;
use crate::outln;
use crate::progress::Progress;

/// The most one step may take.
const STEP_BUDGET: Duration = Duration::from_secs(30);

/// How many steps there are.
const STEPS: usize = 14;

/// The pattern the tour writes into its image before plugging it in, and
/// the one it writes through QEMU into the snapshot overlay.
const BASE_BYTE: u8 = 0x5a;
const OVERLAY_BYTE: u8 = 0x77;
const MIB: usize = 1 << 20;

/// Runs the tour.
pub async fn run(args: TourArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut steps = Steps { n: 0 };
    outln!("qmpctl tour: the qmp library at work on scratch VMs ({STEPS} steps)")?;
    let tour = Tour::default();
    let result = tour.walk(&mut steps, &args, g).await;
    let elapsed = started.elapsed();
    match result {
        Ok(()) => {
            outln!(
                "\ntour complete: {STEPS} steps in {:.1} s. Next: `qmpctl --launch shell`, or see `qmpctl --help`.",
                elapsed.as_secs_f64()
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e),
    }
}

/// Prints numbered steps and their outcome.
struct Steps {
    n: usize,
}

impl Steps {
    async fn run<T>(
        &mut self,
        title: &str,
        work: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        self.n += 1;
        let n = self.n;
        outln!("\n[{n:>2}/{STEPS}] {title}")?;
        let t0 = Instant::now();
        let outcome = match tokio::time::timeout(STEP_BUDGET, work).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::Error::new(Deadline(format!(
                "the step took more than {} s",
                STEP_BUDGET.as_secs()
            )))),
        };
        match outcome {
            Ok(v) => {
                say(&format!("ok ({} ms)", t0.elapsed().as_millis()))?;
                Ok(v)
            }
            Err(e) => {
                say("FAILED")?;
                Err(e.context(format!("tour step {n} ({title}) failed")))
            }
        }
    }
}

/// One indented line of a step's report.
fn say(line: &str) -> std::io::Result<()> {
    outln!("        {line}")
}

/// The VMs and files the tour makes along the way.
#[derive(Default)]
struct Tour {
    source: Option<Qemu>,
    client: Option<Client>,
    target: Option<Qemu>,
}

impl Tour {
    fn client(&self) -> &Client {
        self.client.as_ref().expect("connected in step 2")
    }

    async fn walk(mut self, steps: &mut Steps, args: &TourArgs, g: &Globals) -> anyhow::Result<()> {
        let vm = steps.run("launch a scratch VM", launch(g, false)).await?;
        let work = match &args.keep {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
                ops::absolute(dir)?
            }
            None => vm.dir().to_owned(),
        };
        let socket = vm.socket("tour");
        self.source = Some(vm);
        let client = steps.run("connect and handshake", handshake(&socket, g)).await?;
        // From here on, every event the VM sends is seen.
        let mut all_events = client.events();
        self.client = Some(client);
        let c = self.client().clone();

        steps.run("status, and starting the CPUs", status(&c)).await?;
        steps.run("CPUs and memory", cpus_and_memory(&c)).await?;
        steps
            .run("hotplug a disk backed by a new qcow2 image", hotplug(&c, &work))
            .await?;
        steps
            .run(
                "write through QEMU into an external snapshot",
                snapshot(&c, &work),
            )
            .await?;
        steps
            .run("commit the snapshot back into its base image", commit(&c))
            .await?;
        steps
            .run("export the disk over NBD and read it back", nbd(&c, &work))
            .await?;
        steps.run("screendump", screendump(&c, &work)).await?;
        steps.run("events as they arrive", events(&c)).await?;
        steps
            .run("guest agent detection through its ring buffer", agent(&c))
            .await?;
        steps.run("unplug the disk", unplug(&c)).await?;
        let target = steps
            .run("live migration to a second VM", migrate(&c, g, &work))
            .await?;
        self.target = Some(target);
        let target_client = self.target.as_ref().map(|t| t.client().clone());
        steps
            .run("quit both VMs", quit(&c, target_client.as_ref(), &mut all_events))
            .await?;
        Ok(())
    }
}

/// The scratch VM, plus a ring buffer for the agent and a QMP socket for the tour.
async fn launch(g: &Globals, incoming: bool) -> anyhow::Result<Qemu> {
    let mut b = scratch_vm()
        .args(["-chardev", "ringbuf,id=agent0,size=4096"])
        .extra_qmp_socket("tour")
        .connect_options(connect_options(g));
    if incoming {
        b = b.args(["-incoming", "defer"]);
    }
    let vm = b.spawn().await.context("cannot launch QEMU")?;
    say(&format!("QEMU pid {} in {}", vm.pid(), vm.dir().display()))?;
    Ok(vm)
}

async fn handshake(socket: &Path, g: &Globals) -> anyhow::Result<Client> {
    let t0 = Instant::now();
    let client = crate::conn::connect(socket, &connect_options(g), g.connect_timeout).await?;
    let gr = client.greeting();
    say(&format!(
        "greeting: QEMU {} ({}), offers [{}]",
        gr.version,
        gr.package.trim(),
        gr.capabilities.join(", ")
    ))?;
    say(&format!(
        "capabilities negotiated in {} µs; out-of-band execution: {}",
        t0.elapsed().as_micros(),
        if client.oob_enabled() { "on" } else { "off" }
    ))?;
    Ok(client)
}

async fn status(c: &Client) -> anyhow::Result<()> {
    let before = ops::status(c).await?;
    let mut resumed = c.subscribe(EventFilter::names(["RESUME"]));
    cmd(c, "cont", Value::Null).await?;
    resumed.next().await.context("no RESUME event after cont")?;
    let after = ops::status(c).await?;
    say(&format!(
        "status: {before}; after cont (RESUME event seen): {after}"
    ))?;
    ensure!(after == "running", "the VM is {after}, not running, after cont");
    Ok(())
}

async fn cpus_and_memory(c: &Client) -> anyhow::Result<()> {
    let cpus = query(c, "query-cpus-fast").await?;
    let list = cpus.as_array().cloned().unwrap_or_default();
    ensure!(!list.is_empty(), "query-cpus-fast listed no CPUs");
    for cpu in &list {
        say(&format!(
            "CPU {}: {} on host thread {}",
            cpu["cpu-index"],
            cpu["target"].as_str().unwrap_or("?"),
            cpu["thread-id"]
        ))?;
    }
    let slots = query(c, "query-hotpluggable-cpus").await?;
    let free = slots
        .as_array()
        .map(|a| a.iter().filter(|s| s["qom-path"].is_null()).count())
        .unwrap_or(0);
    say(&format!(
        "hotpluggable CPU slots: {} ({free} free)",
        slots.as_array().map_or(0, Vec::len)
    ))?;
    let mem = query(c, "query-memory-size-summary").await?;
    let balloon = query(c, "query-balloon").await?;
    say(&format!(
        "memory: {} base, {} hotplugged; the balloon leaves the guest {}",
        bytes(mem["base-memory"].as_u64().unwrap_or(0)),
        bytes(mem["plugged-memory"].as_u64().unwrap_or(0)),
        bytes(balloon["actual"].as_u64().unwrap_or(0))
    ))?;
    Ok(())
}

/// Makes a 64 MiB qcow2 image whose first MiB holds BASE_BYTE.
fn make_image(dir: &Path) -> anyhow::Result<PathBuf> {
    let raw = dir.join("tour-base.raw");
    let qcow2 = dir.join("tour-disk.qcow2");
    let mut data = vec![0u8; 64 * MIB];
    data[..MIB].fill(BASE_BYTE);
    std::fs::write(&raw, &data).with_context(|| format!("cannot write {}", raw.display()))?;
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2"], &[&raw, &qcow2])?;
    let _ = std::fs::remove_file(&raw);
    Ok(qcow2)
}

fn qemu_img(args: &[&str], paths: &[&Path]) -> anyhow::Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .args(paths)
        .output()
        .context("cannot run qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "qemu-img {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

async fn hotplug(c: &Client, work: &Path) -> anyhow::Result<()> {
    let image = make_image(work)?;
    say(&format!(
        "qemu-img made {} (64 MiB, first MiB filled with 0x{BASE_BYTE:x})",
        image.display()
    ))?;
    let disk = Disk {
        id: "disk0",
        file: &image,
        format: "qcow2",
        driver: "scsi-hd",
        bus: None,
        read_only: false,
        device: true,
    };
    ops::add_disk(c, &disk).await?;
    say("blockdev-add node disk0, device_add scsi-hd disk0 on the virtio-scsi controller")?;
    let node = device_node(c, "disk0").await?;
    say(&format!("query-block: device disk0 reads node {node}"))?;
    ensure!(node == "disk0", "device disk0 uses node {node}, not disk0");
    Ok(())
}

/// The node a device's medium is, from query-block.
async fn device_node(c: &Client, qdev: &str) -> anyhow::Result<String> {
    let blocks = query(c, "query-block").await?;
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| {
            b["qdev"]
                .as_str()
                .is_some_and(|q| q == qdev || q.ends_with(&format!("/{qdev}/virtio-backend")))
        })
        .and_then(|b| b["inserted"]["node-name"].as_str().map(str::to_owned))
        .with_context(|| format!("query-block does not list device {qdev}"))
}

async fn snapshot(c: &Client, work: &Path) -> anyhow::Result<()> {
    let overlay = work.join("tour-overlay.qcow2");
    let _ = std::fs::remove_file(&overlay);
    cmd(
        c,
        "blockdev-snapshot-sync",
        json!({"node-name": "disk0", "snapshot-file": overlay, "snapshot-node-name": "disk0-snap", "format": "qcow2"}),
    )
    .await?;
    say(&format!(
        "blockdev-snapshot-sync: new overlay disk0-snap ({})",
        overlay.display()
    ))?;
    // Write as the guest would, through the device's own block backend.
    let reply = c
        .call::<_, Value>(
            "human-monitor-command",
            &json!({"command-line": format!("qemu-io -d disk0 \"write -P 0x{OVERLAY_BYTE:x} 1M 64k\"")}),
        )
        .await?;
    let text = reply.as_str().unwrap_or_default().trim();
    ensure!(text.is_empty(), "the write through qemu-io failed: {text}");
    say(&format!(
        "wrote 64 KiB of 0x{OVERLAY_BYTE:x} at 1 MiB through device disk0: it lands in the overlay"
    ))?;
    let node = device_node(c, "disk0").await?;
    ensure!(node == "disk0-snap", "device disk0 reads {node}, not the overlay");
    say("the device now reads node disk0-snap, whose backing file is the base image")?;
    Ok(())
}

async fn commit(c: &Client) -> anyhow::Result<()> {
    let bar = Progress::bytes("commit", false);
    let mut job_events = c.subscribe(EventFilter::names(["JOB_STATUS_CHANGE"]));
    let last = ops::run_job(
        c,
        "tour-commit",
        (
            "block-commit",
            json!({"job-id": "tour-commit", "device": "disk0-snap", "auto-dismiss": false}),
        ),
        &bar,
    )
    .await?;
    let mut seen = Vec::new();
    while let Some(e) = job_events.try_next() {
        if let Some(s) = e.data()["status"].as_str() {
            seen.push(s.to_owned());
        }
    }
    say(&format!("block-commit job states: {}", seen.join(" -> ")))?;
    say(&format!(
        "committed {} from the overlay into disk0; job-complete pivoted the device",
        bytes(last["total-progress"].as_u64().unwrap_or(0))
    ))?;
    let node = device_node(c, "disk0").await?;
    ensure!(
        node == "disk0",
        "after the commit device disk0 reads {node}, not disk0"
    );
    say("the device reads node disk0 again")?;
    Ok(())
}

async fn nbd(c: &Client, work: &Path) -> anyhow::Result<()> {
    let sock = work.join("tour-nbd.sock");
    cmd(
        c,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    )
    .await?;
    cmd(
        c,
        "block-export-add",
        json!({"type": "nbd", "id": "disk0", "node-name": "disk0", "name": "disk0", "writable": false}),
    )
    .await?;
    say(&format!("NBD server on {}, export disk0", sock.display()))?;
    let copy = work.join("tour-nbd-copy.raw");
    let url = format!("if=nbd+unix:///disk0?socket={}", sock.display());
    let of = format!("of={}", copy.display());
    let read = qemu_img(
        &["dd", "-f", "raw", "-O", "raw", "bs=1M", "count=2", &url, &of],
        &[],
    );
    let mut removed = c.subscribe(EventFilter::names(["BLOCK_EXPORT_DELETED"]));
    cmd(c, "block-export-del", json!({"id": "disk0"})).await?;
    removed.wait_for("BLOCK_EXPORT_DELETED").await;
    cmd(c, "nbd-server-stop", Value::Null).await?;
    read?;
    let data = std::fs::read(&copy).with_context(|| format!("cannot read {}", copy.display()))?;
    ensure!(
        data.len() == 2 * MIB,
        "read {} bytes over NBD, not 2 MiB",
        data.len()
    );
    ensure!(
        data[..MIB].iter().all(|b| *b == BASE_BYTE),
        "the first MiB read over NBD is not 0x{BASE_BYTE:x}"
    );
    ensure!(
        data[MIB..MIB + 65536].iter().all(|b| *b == OVERLAY_BYTE),
        "the 64 KiB written into the overlay did not reach the base image"
    );
    say(&format!(
        "qemu-img read 2 MiB back: 1 MiB of 0x{BASE_BYTE:x} (the image as made), 64 KiB of 0x{OVERLAY_BYTE:x} (the committed write)"
    ))?;
    say("export removed (BLOCK_EXPORT_DELETED), server stopped")?;
    Ok(())
}

async fn screendump(c: &Client, work: &Path) -> anyhow::Result<()> {
    let file = work.join("tour-screen.png");
    cmd(c, "screendump", json!({"filename": file, "format": "png"})).await?;
    let (w, h) = crate::subcommands::image_size(&file).context("the screendump is not a PNG image")?;
    let size = std::fs::metadata(&file)?.len();
    say(&format!("{}: PNG, {w}x{h}, {}", file.display(), bytes(size)))?;
    Ok(())
}

async fn events(c: &Client) -> anyhow::Result<()> {
    let mut events = c.subscribe(EventFilter::names(["STOP", "RESUME", "RESET"]));
    // Reset while paused: resetting running CPUs trips KVM now and then
    // under nested virtualisation.
    for command in ["stop", "system_reset", "cont"] {
        cmd(c, command, Value::Null).await?;
        let e = events.next().await.context("the connection closed")?;
        say(&format!("{command:<12} -> {}", crate::events::human_line(&e)))?;
    }
    Ok(())
}

async fn agent(c: &Client) -> anyhow::Result<()> {
    // The guest agent announces itself with lines on its serial port; the
    // tour plays the agent by writing them into the port's ring buffer.
    let mut transitions = Vec::new();
    let mut partial = String::new();
    for chunk in ["STAR", "TED\n", "STOPPED\nSTARTED\n"] {
        cmd(c, "ringbuf-write", json!({"device": "agent0", "data": chunk})).await?;
        let text = ops::drain_ringbuf(c, "agent0").await?;
        partial.push_str(&text);
        while let Some(i) = partial.find('\n') {
            let line: String = partial.drain(..=i).collect();
            match line.trim() {
                "STARTED" => transitions.push("AGENT-STARTED"),
                "STOPPED" => transitions.push("AGENT-STOPPED"),
                _ => {}
            }
        }
        say(&format!(
            "agent wrote {chunk:?}: transitions so far {transitions:?}"
        ))?;
    }
    ensure!(
        transitions == ["AGENT-STARTED", "AGENT-STOPPED", "AGENT-STARTED"],
        "agent transitions were {transitions:?}"
    );
    say("agent running")?;
    Ok(())
}

async fn unplug(c: &Client) -> anyhow::Result<()> {
    ops::remove_disk(c, "disk0", false, ops::UNPLUG_WAIT).await?;
    say("device_del disk0 (DEVICE_DELETED seen), blockdev-del disk0")?;
    let blocks = query(c, "query-block").await?;
    ensure!(
        blocks
            .as_array()
            .map_or(true, |a| a.iter().all(|b| b["qdev"].as_str() != Some("disk0"))),
        "query-block still lists disk0"
    );
    say("query-block no longer lists it")?;
    Ok(())
}

async fn migrate(c: &Client, g: &Globals, work: &Path) -> anyhow::Result<Qemu> {
    let target = launch(g, true).await?;
    let tc = target.client();
    let uri = format!("unix:{}", work.join("tour-migration.sock").display());
    ops::enable_migration_events(tc).await?;
    cmd(tc, "migrate-incoming", json!({"uri": uri})).await?;
    say(&format!(
        "target listens on {uri} (-incoming defer, migrate-incoming)"
    ))?;
    let mut states = c.subscribe(EventFilter::names(["MIGRATION"]));
    let bar = Progress::bytes("migrate", false);
    let info = ops::migrate_and_wait(c, Some(json!({"uri": uri})), &bar).await?;
    let mut seen = Vec::new();
    while let Some(e) = states.try_next() {
        if let Some(s) = e.data()["status"].as_str() {
            seen.push(s.to_owned());
        }
    }
    say(&format!("MIGRATION events on the source: {}", seen.join(" -> ")))?;
    say(&crate::subcommands::migration_summary(&info))?;
    // The target finishes loading on its own schedule; wait for its own event.
    ops::migrate_and_wait(tc, None, &Progress::hidden()).await?;
    let landed = ops::status(tc).await?;
    ensure!(
        landed == "paused",
        "the target arrived {landed}, not paused; its QEMU said: {}",
        target.stderr().trim()
    );
    cmd(tc, "cont", Value::Null).await?;
    // The source's run state moves from finish-migrate to postmigrate just
    // after the migration reports completed.
    let mut src = ops::status(c).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while src == "finish-migrate" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        src = ops::status(c).await?;
    }
    let dst = ops::status(tc).await?;
    say(&format!("source is {src}; target is {dst} after cont"))?;
    ensure!(src == "postmigrate", "the source is {src}, not postmigrate");
    ensure!(dst == "running", "the target is {dst}, not running");
    Ok(target)
}

async fn quit(c: &Client, target: Option<&Client>, all: &mut qmp::EventStream) -> anyhow::Result<()> {
    for (name, client) in [("source", Some(c)), ("target", target)] {
        let Some(client) = client else { continue };
        let mut shutdown = client.subscribe(EventFilter::names(["SHUTDOWN"]));
        cmd(client, "quit", Value::Null).await?;
        let e = shutdown
            .next()
            .await
            .context("no SHUTDOWN event before the socket closed")?;
        let reason = client.closed().await;
        say(&format!("{name}: SHUTDOWN {}; then {reason}", e.data()))?;
    }
    let mut names = Vec::new();
    while let Some(e) = all.try_next() {
        names.push(e.name().to_owned());
    }
    say(&format!(
        "the source sent {} events during the tour: {}",
        names.len(),
        names.join(" ")
    ))?;
    Ok(())
}
