//! `qmpctl bench --scale N`: thousands of monitors in one process.
//!
//! Each is a full [`qmpkit::monitor::Monitor`] with guest-agent polling on (a
//! ring-buffer read at connect and every poll interval) and an event handler.
//! A fake QMP server runs in another process (the open-file limit is per
//! process) and is reached through N hard links to its socket, so that every
//! connection has a path of its own, as every VM has. The figures: resident
//! memory added per connection, CPU used while they sit idle, and the time
//! of one `query-status` issued on every connection at once.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::bench::BenchArgs;

/// Kills the fake server when the benchmark ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the scale benchmark and prints its figures.
pub async fn run(n: usize, args: &BenchArgs, json: bool) -> anyhow::Result<()> {
    if n == 0 {
        bail!("--scale needs at least 1 connection");
    }
    raise_nofile_limit(n)?;
    let dir = tempfile::Builder::new().prefix("qmpctl-scale-").tempdir()?;
    let socket = dir.path().join("fake.sock");
    let binary = args.fake_server.clone().unwrap_or_else(default_fake_server);
    let mut child = Command::new(&binary)
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start the fake server {}", binary.display()))?;
    let stdout = child.stdout.take().context("fake server stdout")?;
    let _server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("the fake server did not start: {line:?}");
    }
    let links = dir.path().join("vms");
    std::fs::create_dir(&links)?;
    let paths: Vec<PathBuf> = (0..n)
        .map(|i| {
            let p = links.join(format!("vm{i}.sock"));
            std::fs::hard_link(&socket, &p).map(|_| p)
        })
        .collect::<Result<_, _>>()?;

    let idle = Duration::from_secs_f64(args.idle_secs.max(0.1));
    let poll = Duration::from_secs_f64(args.agent_poll_secs.max(0.01));
    let rounds = args.scale_rounds;
    // One thread holds every connection, on a runtime of its own.
    let figures = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(measure(paths, idle, poll, rounds))
    })
    .await??;
    if json {
        println!(
            r#"{{"client":"qmpkit","monitors":{},"agent_poll_s":{},"rss_kib_per_monitor":{:.2},"idle_cpu_percent":{:.3},"all_at_once_ms":{:.1},"connect_all_ms":{:.1}}}"#,
            n,
            args.agent_poll_secs,
            figures.rss_per_conn_kib,
            figures.idle_cpu_percent,
            figures.all_at_once_ms,
            figures.connect_ms
        );
    } else {
        println!(
            "{n} monitors (agent polling every {} s), each to its own socket path:",
            args.agent_poll_secs
        );
        println!("  connecting all:            {:.1} ms", figures.connect_ms);
        println!("  resident memory each:      {:.2} KiB", figures.rss_per_conn_kib);
        println!("  CPU while idle:            {:.3} %", figures.idle_cpu_percent);
        println!("  query-status on all at once: {:.1} ms", figures.all_at_once_ms);
    }
    Ok(())
}

struct Figures {
    connect_ms: f64,
    rss_per_conn_kib: f64,
    idle_cpu_percent: f64,
    all_at_once_ms: f64,
}

async fn measure(
    paths: Vec<PathBuf>,
    idle: Duration,
    poll: Duration,
    rounds: u32,
) -> anyhow::Result<Figures> {
    let n = paths.len();
    let registry = std::sync::Arc::new(qmpkit::monitor::MonitorRegistry::new());
    let options = || {
        qmpkit::monitor::MonitorOptions::new()
            .serial_chardev("agent0")
            .agent_poll_interval(poll)
            .event_handler(|_monitor, _event| {})
    };
    // Warm the allocator and the runtime before the baseline.
    {
        let warm = registry.connect(&paths[0], options()).await?;
        warm.disconnect();
        warm.wait().await;
    }
    let rss_before = resident_kib()?;
    let started = Instant::now();
    let mut clients = Vec::with_capacity(n);
    for batch in paths.chunks(256) {
        let mut set = tokio::task::JoinSet::new();
        for (i, p) in batch.iter().enumerate() {
            let registry = registry.clone();
            let options = options();
            let p = p.clone();
            set.spawn(async move { (i, registry.connect(&p, options).await) });
        }
        let mut got: Vec<Option<qmpkit::monitor::Monitor>> = vec![None; batch.len()];
        while let Some(r) = set.join_next().await {
            let (i, c) = r?;
            got[i] = Some(c.with_context(|| format!("connect {}", batch[i].display()))?);
        }
        clients.extend(got.into_iter().flatten());
    }
    let connect_ms = started.elapsed().as_secs_f64() * 1e3;
    // One command each, so every connection has done real work once.
    all_at_once(&clients).await?;
    let rss_after = resident_kib()?;

    let cpu_before = cpu_time()?;
    let idle_started = Instant::now();
    tokio::time::sleep(idle).await;
    let idle_cpu = cpu_time()? - cpu_before;
    let idle_cpu_percent = idle_cpu.as_secs_f64() * 100.0 / idle_started.elapsed().as_secs_f64();

    let mut best = f64::MAX;
    for _ in 0..rounds {
        best = best.min(all_at_once(&clients).await?);
    }
    Ok(Figures {
        connect_ms,
        rss_per_conn_kib: (rss_after.saturating_sub(rss_before)) as f64 / n as f64,
        idle_cpu_percent,
        all_at_once_ms: best,
    })
}

/// Issues `query-status` on every connection at once; returns milliseconds.
async fn all_at_once(clients: &[qmpkit::monitor::Monitor]) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for c in clients {
        let c = c.clone();
        set.spawn(async move { c.status().await });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

fn default_fake_server() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("qmpkit-fake-server")));
    match beside {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("qmpkit-fake-server"),
    }
}

fn raise_nofile_limit(n: usize) -> anyhow::Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let want = (n as u64 + 256).min(lim.maximum.unwrap_or(u64::MAX));
    if lim.current.is_some_and(|c| c < want) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum: lim.maximum,
            },
        )?;
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if now < n as u64 + 64 {
        bail!("the open-file limit ({now}) is too low for {n} connections");
    }
    Ok(())
}

fn resident_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")
}

/// CPU time used by this process so far (all threads, user and system).
fn cpu_time() -> anyhow::Result<Duration> {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Ok(Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
}
