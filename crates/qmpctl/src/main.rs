//! qmpctl: a command-line tool for the QEMU Machine Protocol.
//!
//! `main` parses the command line, runs one subcommand on a tokio runtime and
//! turns the outcome into an exit code (see [`exit`]): errors print their
//! whole cause chain, never a panic or a debug dump, and a closed pipe ends
//! the program quietly.

mod agent;
mod bench;
mod cli;
mod conn;
mod exit;
mod install;
mod ops;
mod out;
mod progress;
mod shell;
mod subcommands;
mod tour;
mod typed;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and --version go to stdout and succeed; the rest is bad usage.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // --json was not parsed; a script that asked for it still gets JSON.
            if std::env::args().any(|a| a == "--json") {
                let text = e.render().to_string();
                let message = text
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("error: ");
                return exit::report(&exit::usage(message.to_owned()), true);
            }
            let _ = e.print();
            return ExitCode::from(exit::USAGE);
        }
    };
    init_tracing(cli.verbose);
    let json = cli.globals.json;
    match run(cli) {
        Ok(code) => code,
        Err(e) => exit::report(&e, json),
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "qmp=debug,qmpctl=debug",
        _ => "qmp=trace,qmpctl=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("QMPCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(out::colour(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        tokio::select! {
            r = dispatch(cli) => r,
            sig = exit::interrupted() => Err(anyhow::Error::new(sig)),
        }
    });
    // Do not wait for tasks stuck on a dead peer: the process is ending.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    result
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let globals = cli.globals;
    match cli.command {
        Command::Tour(args) => tour::run(args, &globals).await,
        Command::Agent(args) => agent::run(args, &globals).await,
        Command::Completions(args) => {
            install::completions(args.shell)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man(args) => {
            install::man(args.dir.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            bench::run(globals.socket.clone(), args, globals.json).await?;
            Ok(ExitCode::SUCCESS)
        }
        command => {
            let ctx = conn::Ctx::open(&globals).await?;
            subcommands::run(&ctx, command).await
        }
    }
}
