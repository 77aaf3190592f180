//! `qmpctl bench`: the library's cost per command and per event, measured
//! through the public typed API, on any QMP socket.
//!
//! The figures are comparable with the floor client in `shared/bench/floor`
//! (`{"client":"raw","n":N,"depth":D,"total_s":T,"us_per_cmd":U}`): only
//! ratios taken in one run on one machine mean anything.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

mod scale;

/// Arguments of `qmpctl bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// How many `query-status` commands to run.
    #[arg(long, default_value_t = 10000)]
    pub count: usize,
    /// How many commands to keep in flight, from that many concurrent callers.
    #[arg(long, default_value_t = 1)]
    pub depth: usize,
    /// Instead of commands, time from the first to the K-th event received by
    /// one subscriber (for a server that sends a burst of events, such as the
    /// floor's `EVENTS=K fakeqmp`).
    #[arg(long, value_name = "K")]
    pub events: Option<usize>,
    /// Run the callers on a multi-threaded runtime instead of one thread.
    #[arg(long)]
    pub multi_thread: bool,
    /// Send `query-status` through the raw JSON path (`Client::execute_raw`)
    /// instead of the typed `Client::status`, to compare the two.
    #[arg(long, conflicts_with = "generated")]
    pub raw: bool,
    /// Send the generated `qapi::commands::QueryStatus` with
    /// `Client::execute`, checked against the server's schema (on a server
    /// that gives one), instead of the typed `Client::status`.
    #[arg(long)]
    pub generated: bool,
    /// Do not negotiate the `oob` capability.
    #[arg(long)]
    pub no_oob: bool,
    /// Send the commands through a [`qmpkit::monitor::Monitor`] (the
    /// Incus-compatible layer, with an event handler, as Incus runs it)
    /// instead of a bare `Client`, to compare the two command paths.
    #[arg(long)]
    pub monitor: bool,
    /// Instead, hold N monitors (agent polling on) at once, connected to a
    /// fake QMP server in another process, and report memory per monitor,
    /// CPU while idle, and the time of one command on all of them at once.
    /// Needs no `--socket`.
    #[arg(long, value_name = "N")]
    pub scale: Option<usize>,
    /// With `--scale`: how long to measure idle CPU use, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub idle_secs: f64,
    /// With `--scale`: the monitors' guest-agent poll interval, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub agent_poll_secs: f64,
    /// With `--scale`: how many times to run the command on all monitors
    /// at once after the idle period; the best time is reported (more
    /// rounds give a profiler a steady state to look at).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub scale_rounds: u32,
    /// With `--scale`: the fake server binary (default: `qmpkit-fake-server`
    /// beside this program, else on PATH).
    #[arg(long)]
    pub fake_server: Option<PathBuf>,
}

/// Runs the benchmark against the socket and prints its figure.
///
/// It runs on a runtime of its own (one thread unless `--multi-thread`), so
/// the figure does not depend on how the caller's runtime is configured.
pub async fn run(socket: Option<PathBuf>, args: BenchArgs, json: bool) -> anyhow::Result<()> {
    if let Some(n) = args.scale {
        return scale::run(n, &args, json).await;
    }
    let socket = socket.context("bench needs --socket (or --scale N)")?;
    let multi = args.multi_thread;
    let line = tokio::task::spawn_blocking(move || {
        let rt = if multi {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()
        } else {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        .context("cannot start the benchmark's runtime")?;
        rt.block_on(measure(socket, args))
    })
    .await
    .context("the benchmark panicked")??;
    if json {
        println!("{}", line.json());
    } else {
        println!("{}", line.human());
    }
    Ok(())
}

/// One benchmark result.
struct Figure {
    n: usize,
    depth: usize,
    total: Duration,
    events: bool,
}

impl Figure {
    fn per_item_us(&self) -> f64 {
        self.total.as_secs_f64() * 1e6 / self.n.max(1) as f64
    }

    fn json(&self) -> String {
        if self.events {
            format!(
                r#"{{"client":"qmpkit","n":{},"total_s":{:.6},"us_per_event":{:.3}}}"#,
                self.n,
                self.total.as_secs_f64(),
                self.per_item_us()
            )
        } else {
            format!(
                r#"{{"client":"qmpkit","n":{},"depth":{},"total_s":{:.6},"us_per_cmd":{:.2}}}"#,
                self.n,
                self.depth,
                self.total.as_secs_f64(),
                self.per_item_us()
            )
        }
    }

    fn human(&self) -> String {
        if self.events {
            format!(
                "{} events in {:.3} s: {:.3} µs per event ({:.0} events/s)",
                self.n,
                self.total.as_secs_f64(),
                self.per_item_us(),
                self.n as f64 / self.total.as_secs_f64()
            )
        } else {
            format!(
                "{} commands at depth {} in {:.3} s: {:.2} µs per command",
                self.n,
                self.depth,
                self.total.as_secs_f64(),
                self.per_item_us()
            )
        }
    }
}

async fn measure(socket: PathBuf, args: BenchArgs) -> anyhow::Result<Figure> {
    let options = qmpkit::ConnectOptions::new().oob(!args.no_oob);
    // The monitor is kept until the end; its commands are its client's
    // (`Monitor` derefs to `Client`), so what it may add is its event task
    // and subscription.
    let (client, _monitor) = if args.monitor {
        let mon = qmpkit::monitor::MonitorRegistry::new()
            .connect(
                &socket,
                qmpkit::monitor::MonitorOptions::new()
                    .connect_options(options)
                    .event_handler(|_monitor, _event| {}),
            )
            .await
            .with_context(|| format!("cannot connect a monitor to {}", socket.display()))?;
        (mon.client().clone(), Some(mon))
    } else {
        let address = crate::conn::address_of(&socket)?;
        let client = options
            .connect_to(address)
            .await
            .with_context(|| format!("cannot connect to {}", socket.display()))?;
        (client, None)
    };
    if let Some(k) = args.events {
        return measure_events(client, k).await;
    }
    if args.count == 0 || args.depth == 0 {
        bail!("--count and --depth must be at least 1");
    }
    // Warm up: the first commands pay for allocations and page faults.
    for _ in 0..args.count.min(200) {
        client.status().await?;
    }
    let next = Arc::new(AtomicUsize::new(0));
    let n = args.count;
    let raw = args.raw;
    let generated = args.generated;
    if generated {
        // The schema is fetched by the first generated call; not timed.
        client.execute(&qmpkit::qapi::commands::QueryStatus).await?;
    }
    let started = Instant::now();
    let callers: Vec<_> = (0..args.depth.min(n))
        .map(|_| {
            let client = client.clone();
            let next = next.clone();
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    if raw {
                        let reply = client
                            .execute_raw("query-status", serde_json::Value::Null)
                            .await?;
                        if !reply["status"].is_string() {
                            bail!("query-status returned {reply}");
                        }
                    } else if generated {
                        let status = client.execute(&qmpkit::qapi::commands::QueryStatus).await?;
                        if status.running && status.status == qmpkit::qapi::types::RunState::Paused {
                            bail!("query-status returned {status:?}");
                        }
                    } else if let qmpkit::commands::vm::RunState::Other(state) = client.status().await? {
                        bail!("query-status returned an unknown state {state:?}");
                    }
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for caller in callers {
        caller.await.context("a benchmark caller panicked")??;
    }
    Ok(Figure {
        n,
        depth: args.depth,
        total: started.elapsed(),
        events: false,
    })
}

async fn measure_events(client: qmpkit::Client, k: usize) -> anyhow::Result<Figure> {
    if k < 2 {
        bail!("--events needs at least 2 events");
    }
    // A queue as large as the burst: this measures throughput, not drops.
    let mut events = client.subscribe(qmpkit::EventFilter::all().capacity(k));
    let first = events
        .next()
        .await
        .context("the connection closed before any event")?;
    let started = Instant::now();
    let _ = first;
    for received in 1..k {
        if events.next().await.is_none() {
            bail!("the connection closed after {received} of {k} events");
        }
    }
    if events.missed() > 0 {
        bail!("the subscriber missed {} events", events.missed());
    }
    Ok(Figure {
        n: k - 1,
        depth: 1,
        total: started.elapsed(),
        events: true,
    })
}
