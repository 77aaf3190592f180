//! The typed subcommands, one file per group: each runs its commands and
//! prints a table, a short line, or (with `--json`) QEMU's answer as JSON.

mod block;
mod devices;
pub mod events;
pub mod exec;
mod hmp;
mod migrate;
mod vm;

use std::process::ExitCode;

use serde_json::Value;

pub use hmp::{hmp, run_transaction};
pub use migrate::migration_summary;
pub use vm::image_size;

use crate::cli::*;
use crate::conn::Ctx;
use crate::out;
use crate::outln;

/// Runs a subcommand that needs a connection.
pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Status => vm::status(ctx).await?,
        Command::Start => vm::lifecycle(ctx, "cont").await?,
        Command::Pause => vm::lifecycle(ctx, "stop").await?,
        Command::Reset => vm::lifecycle(ctx, "system_reset").await?,
        Command::Powerdown => vm::lifecycle(ctx, "system_powerdown").await?,
        Command::Quit => vm::quit(ctx).await?,
        Command::Cpus(a) => vm::cpus(ctx, a).await?,
        Command::Memory(a) => vm::memory(ctx, a.command).await?,
        Command::Block(c) => block::block(ctx, c).await?,
        Command::Nbd(c) => block::nbd(ctx, c).await?,
        Command::Device(c) => devices::device(ctx, c).await?,
        Command::Chardev(c) => devices::chardev(ctx, c).await?,
        Command::Nic(c) => devices::nic(ctx, c).await?,
        Command::Console(a) => vm::console(ctx, a).await?,
        Command::Screendump(a) => vm::screendump(ctx, a).await?,
        Command::DumpMemory(a) => vm::dump_memory(ctx, a).await?,
        Command::Migrate(c) => migrate::migrate(ctx, c).await?,
        Command::Exec(a) => return exec::run(ctx, a).await,
        Command::Events(a) => return events::run(ctx, a).await,
        Command::Shell(a) => return crate::shell::run(ctx, a).await,
        Command::Hmp(a) => hmp::run(ctx, a).await?,
        Command::Transaction(a) => hmp::transaction(ctx, a).await?,
        Command::Tour(_)
        | Command::Bench(_)
        | Command::Agent(_)
        | Command::Completions(_)
        | Command::Man(_) => {
            unreachable!("dispatched before connecting")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `value` as JSON with `--json`, else runs `human`.
pub(crate) fn emit(
    ctx: &Ctx,
    value: &Value,
    human: impl FnOnce() -> std::io::Result<()>,
) -> anyhow::Result<()> {
    if ctx.json {
        out::json(value, true)?;
    } else {
        human()?;
    }
    Ok(())
}

/// Prints a one-line confirmation (`{"ok": true, ...}` with `--json`).
pub(crate) fn done(ctx: &Ctx, mut value: Value, line: &str) -> anyhow::Result<()> {
    if let Value::Object(m) = &mut value {
        m.insert("ok".into(), Value::Bool(true));
    }
    emit(ctx, &value, || outln!("{line}"))
}
