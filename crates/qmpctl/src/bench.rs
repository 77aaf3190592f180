//! `qmpctl bench`: measures the library's cost per command and per event.
//! (Being written.)

use std::path::PathBuf;

/// Arguments of `qmpctl bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// How many commands to run.
    #[arg(long, default_value_t = 10000)]
    pub count: usize,
    /// How many commands to keep in flight, from that many concurrent callers.
    #[arg(long, default_value_t = 1)]
    pub depth: usize,
}

/// Runs the benchmark against the socket.
pub async fn run(_socket: PathBuf, _args: BenchArgs, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
