//! qmpctl: a command-line tool for the QEMU Machine Protocol. (Being written:
//! for now only `bench`.)

mod bench;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Command-line options.
#[derive(Parser)]
#[command(name = "qmpctl", version, about = "Talk to QEMU over QMP")]
struct Cli {
    /// The QMP socket.
    #[arg(long, env = "QMPCTL_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure the cost per command or per event.
    Bench(bench::BenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Bench(args) => bench::run(cli.socket, args, cli.json).await,
    }
}
