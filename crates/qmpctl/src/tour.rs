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
use qmpkit::launch::Qemu;
use qmpkit::qapi::commands::{BlockExportDel, HumanMonitorCommand};
use qmpkit::qapi::events::{JobStatusChange, Migration as MigrationEvent};
use qmpkit::{Client, EventFilter};
use serde_json::json;

use crate::cli::{Globals, TourArgs};
use crate::conn::{connect_options, scratch_vm};
use crate::exit::Deadline;
use qmpkit::commands::vm::RunState;
use qmpkit::monitor::constants::{EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED};
use qmpkit::monitor::{Monitor, MonitorOptions};

use crate::ops;
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
        let agent_socket = self
            .source
            .as_ref()
            .map(|v| v.socket("agent"))
            .unwrap_or_default();
        steps
            .run(
                "guest agent detection through its ring buffer",
                agent(&c, &agent_socket),
            )
            .await?;
        steps.run("unplug the disk", unplug(&c)).await?;
        let target = steps.run("live migration to a second VM", migrate(&c, g)).await?;
        self.target = Some(target);
        let target_client = self.target.as_ref().map(|t| t.client().clone());
        steps
            .run("quit both VMs", quit(&c, target_client.as_ref(), &mut all_events))
            .await?;
        Ok(())
    }
}

/// The scratch VM, plus a ring buffer for the agent, a QMP socket for the
/// tour and one for the agent's monitor.
async fn launch(g: &Globals, incoming: bool) -> anyhow::Result<Qemu> {
    let mut b = scratch_vm()
        .args(["-chardev", "ringbuf,id=agent0,size=4096"])
        .extra_qmp_socket("tour")
        .extra_qmp_socket("agent")
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
    let before = c.status().await?;
    let mut resumed = c.subscribe(EventFilter::names(["RESUME"]));
    c.start().await?;
    resumed.next().await.context("no RESUME event after cont")?;
    let after = c.status().await?;
    say(&format!(
        "status: {}; after start (cont; RESUME event seen): {}",
        before.as_str(),
        after.as_str()
    ))?;
    ensure!(
        after == RunState::Running,
        "the VM is {}, not running, after cont",
        after.as_str()
    );
    Ok(())
}

async fn cpus_and_memory(c: &Client) -> anyhow::Result<()> {
    let cpus = c.query_cpus().await?;
    ensure!(!cpus.is_empty(), "query-cpus-fast listed no CPUs");
    for cpu in &cpus {
        say(&format!(
            "CPU {}: {} on host thread {}",
            cpu.cpu_index, cpu.target, cpu.thread_id
        ))?;
    }
    let slots = c.query_hotpluggable_cpus().await?;
    let free = slots.iter().filter(|s| s.qom_path.is_none()).count();
    say(&format!("hotpluggable CPU slots: {} ({free} free)", slots.len()))?;
    let size = c.memory_size_bytes().await?;
    let balloon = c.memory_balloon_size_bytes().await?;
    say(&format!(
        "memory: {}; the balloon leaves the guest {}",
        bytes(size),
        bytes(balloon.max(0) as u64)
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
    let node =
        json!({"driver": "qcow2", "node-name": "disk0", "file": {"driver": "file", "filename": image}});
    let device = json!({"driver": "scsi-hd", "id": "disk0", "drive": "disk0"});
    c.add_block_device(&node, &device, false).await?;
    say("blockdev-add node disk0, device_add scsi-hd disk0 on the virtio-scsi controller")?;
    let node = device_node(c, "disk0").await?;
    say(&format!("query-block: device disk0 reads node {node}"))?;
    ensure!(node == "disk0", "device disk0 uses node {node}, not disk0");
    Ok(())
}

/// The node a device's medium is, from query-block.
async fn device_node(c: &Client, qdev: &str) -> anyhow::Result<String> {
    c.query_block()
        .await?
        .into_iter()
        .find(|b| b.qdev.as_deref() == Some(qdev))
        .and_then(|b| b.inserted.map(|i| i.node_name))
        .with_context(|| format!("query-block does not list device {qdev}"))
}

async fn snapshot(c: &Client, work: &Path) -> anyhow::Result<()> {
    let base = work.join("tour-disk.qcow2");
    let overlay = work.join("tour-overlay.qcow2");
    let _ = std::fs::remove_file(&overlay);
    qemu_img(
        &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"],
        &[&base, &overlay],
    )?;
    let node = json!({
        "driver": "qcow2", "node-name": "disk0-snap", "backing": null,
        "file": {"driver": "file", "filename": overlay},
    });
    c.call::<_, qmpkit::Empty>("blockdev-add", &node).await?;
    c.block_dev_snapshot("disk0", "disk0-snap").await?;
    say(&format!(
        "blockdev-snapshot: overlay disk0-snap ({}) on top of disk0",
        overlay.display()
    ))?;
    // Write as the guest would, through the device's own block backend.
    let write = HumanMonitorCommand {
        command_line: format!("qemu-io -d disk0 \"write -P 0x{OVERLAY_BYTE:x} 1M 64k\""),
        cpu_index: None,
    };
    let reply = c.execute(&write).await?;
    let text = reply.trim();
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
    let work = c.block_commit("disk0-snap", None, None, STEP_BUDGET);
    ops::with_progress(work, || ops::job_progress(c, "disk0-snap", &bar)).await?;
    bar.finish();
    let mut seen = Vec::new();
    while let Some(e) = job_events.try_next() {
        if let Some(Ok(change)) = e.data_of::<JobStatusChange>() {
            seen.push(change.status.as_str());
        }
    }
    say(&format!("block-commit job states: {}", seen.join(" -> ")))?;
    let node = device_node(c, "disk0").await?;
    ensure!(
        node == "disk0",
        "after the commit device disk0 reads {node}, not disk0"
    );
    say("the overlay is merged into disk0 and the device reads node disk0 again")?;
    // The overlay node was added by the tour, so the tour removes it.
    c.remove_block_device("disk0-snap").await?;
    say("blockdev-del disk0-snap: the overlay node is gone")?;
    Ok(())
}

async fn nbd(c: &Client, work: &Path) -> anyhow::Result<()> {
    let sock = work.join("tour-nbd.sock");
    c.nbd_unix_server_start(&sock).await?;
    c.nbd_block_export_add::<&str>("disk0", false, &[]).await?;
    say(&format!("NBD server on {}, export disk0", sock.display()))?;
    let copy = work.join("tour-nbd-copy.raw");
    let url = format!("if=nbd+unix:///disk0?socket={}", sock.display());
    let of = format!("of={}", copy.display());
    let read = qemu_img(
        &["dd", "-f", "raw", "-O", "raw", "bs=1M", "count=2", &url, &of],
        &[],
    );
    let mut removed = c.subscribe(EventFilter::names(["BLOCK_EXPORT_DELETED"]));
    c.execute(&BlockExportDel {
        id: "disk0".into(),
        mode: None,
    })
    .await?;
    removed.wait_for("BLOCK_EXPORT_DELETED").await?;
    c.nbd_server_stop().await?;
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
    c.screendump(&file).await?;
    let (w, h) = crate::subcommands::image_size(&file).context("the screendump is not a PNG image")?;
    let size = std::fs::metadata(&file)?.len();
    say(&format!("{}: PNG, {w}x{h}, {}", file.display(), bytes(size)))?;
    Ok(())
}

async fn events(c: &Client) -> anyhow::Result<()> {
    let mut events = c.subscribe(EventFilter::names(["STOP", "RESUME", "RESET"]));
    // Reset while paused: resetting running CPUs trips KVM now and then
    // under nested virtualisation.
    for step in ["pause", "reset", "start"] {
        match step {
            "pause" => c.pause().await?,
            "reset" => c.reset().await?,
            _ => c.start().await?,
        }
        let e = events.next().await.context("the connection closed")?;
        say(&format!(
            "{step:<6} -> {}",
            crate::subcommands::events::human_line(&e)
        ))?;
    }
    Ok(())
}

async fn agent(c: &Client, socket: &Path) -> anyhow::Result<()> {
    // A Monitor on a second QMP socket watches the agent's ring buffer; the
    // tour plays the agent, writing its status lines into the buffer.
    let (tx, mut transitions) = tokio::sync::mpsc::unbounded_channel::<String>();
    let options = MonitorOptions::new()
        .serial_chardev("agent0")
        .event_handler(move |_, ev| {
            if ev.name().starts_with("AGENT-") {
                let _ = tx.send(ev.name().to_owned());
            }
        });
    let monitor = Monitor::connect(socket, options).await?;
    say("Monitor connected, watching ring buffer agent0")?;
    for chunk in ["STAR", "TED\n", "STOPPED\nSTARTED\n"] {
        c.ringbuf_write("agent0", chunk).await?;
        let running = monitor.check_agent().await?;
        say(&format!("agent wrote {chunk:?}: agent running: {running}"))?;
    }
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(transitions.recv().await.context("the monitor ended")?);
    }
    say(&format!("events from the monitor's handler: {}", seen.join(", ")))?;
    ensure!(
        seen == [EVENT_AGENT_STARTED, EVENT_AGENT_STOPPED, EVENT_AGENT_STARTED],
        "agent transitions were {seen:?}"
    );
    ensure!(
        monitor.agent_started(),
        "the monitor does not see the agent running"
    );
    monitor.disconnect();
    Ok(())
}

async fn unplug(c: &Client) -> anyhow::Result<()> {
    c.remove_device_and_wait("disk0", ops::UNPLUG_WAIT).await?;
    c.remove_block_device("disk0").await?;
    say("device_del disk0 (DEVICE_DELETED seen), blockdev-del disk0")?;
    let blocks = c.query_block().await?;
    ensure!(
        blocks.iter().all(|b| b.qdev.as_deref() != Some("disk0")),
        "query-block still lists disk0"
    );
    say("query-block no longer lists it")?;
    Ok(())
}

async fn migrate(c: &Client, g: &Globals) -> anyhow::Result<Qemu> {
    let target = launch(g, true).await?;
    let tc = target.client().clone();
    // The two ends of one socket pair, handed to the two QEMUs as fds.
    let (a, b) = std::os::unix::net::UnixStream::pair().context("cannot make a socket pair")?;
    c.send_file("migration", a).await?;
    tc.send_file("migration", b).await?;
    say("a socket pair: one end to each QEMU (getfd, SCM_RIGHTS)")?;
    let incoming = tokio::spawn(async move { tc.migrate_incoming("migration", STEP_BUDGET).await });
    let mut states = c.subscribe(EventFilter::names(["MIGRATION"]));
    c.migrate("migration").await?;
    let bar = Progress::bytes("migrate", false);
    let info = ops::wait_migration(c, STEP_BUDGET, &bar).await?;
    incoming.await.context("the incoming side panicked")??;
    let mut seen = Vec::new();
    while let Some(e) = states.try_next() {
        if let Some(Ok(migration)) = e.data_of::<MigrationEvent>() {
            seen.push(migration.status.as_str());
        }
    }
    say(&format!("MIGRATION events on the source: {}", seen.join(" -> ")))?;
    say(&crate::subcommands::migration_summary(&info))?;
    let tc = target.client();
    let landed = tc.status().await?;
    ensure!(
        landed == RunState::Paused,
        "the target arrived {}, not paused; its QEMU said: {}",
        landed.as_str(),
        target.stderr().trim()
    );
    tc.start().await?;
    // The source's run state moves from finish-migrate to postmigrate just
    // after the migration reports completed.
    let mut src = c.status().await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while src == RunState::FinishMigrate && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        src = c.status().await?;
    }
    let dst = tc.status().await?;
    say(&format!(
        "source is {}; target is {} after start",
        src.as_str(),
        dst.as_str()
    ))?;
    ensure!(
        src == RunState::Postmigrate,
        "the source is {}, not postmigrate",
        src.as_str()
    );
    ensure!(
        dst == RunState::Running,
        "the target is {}, not running",
        dst.as_str()
    );
    Ok(target)
}

async fn quit(c: &Client, target: Option<&Client>, all: &mut qmpkit::EventStream) -> anyhow::Result<()> {
    for (name, client) in [("source", Some(c)), ("target", target)] {
        let Some(client) = client else { continue };
        let mut shutdown = client.subscribe(EventFilter::names(["SHUTDOWN"]));
        client.quit().await?;
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
