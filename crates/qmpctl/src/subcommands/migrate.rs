//! Live migration: send, receive, watch, cancel.

use std::path::Path;

use qmpkit::qapi::commands::QueryMigrate;
use qmpkit::qapi::types::MigrationInfo;
use serde::Deserialize as _;
use serde_json::{json, Value};

use super::{done, emit};
use crate::cli::*;
use crate::conn::Ctx;
use crate::exit::usage;
use crate::ops::{self, LONG_WAIT};
use crate::out::bytes;
use crate::outln;
use crate::progress::Progress;

/// A migration target as QEMU's URI: a plain path is a Unix socket.
fn migration_uri(target: &str) -> anyhow::Result<String> {
    const SCHEMES: [&str; 6] = ["unix:", "tcp:", "exec:", "fd:", "file:", "rdma:"];
    if SCHEMES.iter().any(|s| target.starts_with(s)) {
        return Ok(target.to_owned());
    }
    Ok(format!("unix:{}", ops::absolute(Path::new(target))?.display()))
}

/// The name under which `migrate to --fd` hands its descriptor to QEMU.
const MIGRATION_FD: &str = "qmpctl-migration";

pub async fn migrate(ctx: &Ctx, command: MigrateCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    let budget = ctx.timeout.unwrap_or(LONG_WAIT);
    match command {
        MigrateCommand::To { target, fd, no_wait } => {
            let uri = match (target, fd) {
                (Some(t), _) => {
                    let uri = migration_uri(&t)?;
                    ctx.within("migrate", ops::migrate_to_uri(client, &uri)).await?;
                    uri
                }
                (None, Some(fd)) => {
                    let owned = dup_fd(fd)?;
                    ctx.within("migrate", async {
                        client.send_file(MIGRATION_FD, owned).await?;
                        Ok(client.migrate(MIGRATION_FD).await?)
                    })
                    .await?;
                    format!("fd:{MIGRATION_FD}")
                }
                (None, None) => return Err(usage("migrate to needs a target or --fd")),
            };
            if no_wait {
                return done(ctx, json!({"uri": uri}), &format!("migration to {uri} started"));
            }
            let bar = Progress::bytes("migrate", ctx.json);
            let info = ops::wait_migration(client, budget, &bar).await?;
            done(
                ctx,
                json!({"uri": uri, "result": info}),
                &format!("migration to {uri} completed: {}", migration_summary(&info)),
            )
        }
        MigrateCommand::Incoming { address, wait } => {
            let uri = migration_uri(&address)?;
            ctx.within("migrate incoming", ops::migrate_incoming_uri(client, &uri))
                .await?;
            if !wait {
                return done(
                    ctx,
                    json!({"uri": uri}),
                    &format!("waiting for a migration on {uri}"),
                );
            }
            let bar = Progress::bytes("incoming", ctx.json);
            // The wait keeps `--timeout` itself (its budget); a second
            // timer of the same length would race it for the message.
            let info = ops::wait_migration(client, budget, &bar).await?;
            done(
                ctx,
                json!({"uri": uri, "result": info}),
                &format!("received the VM on {uri}"),
            )
        }
        MigrateCommand::Status => {
            let (v, info) = ctx.query(&QueryMigrate).await?;
            emit(ctx, &v, || {
                outln!("status: {}", info.status.map_or("none", |s| s.as_str()))?;
                if info.ram.is_some() {
                    outln!("{}", summary_of(&info))?;
                }
                if let Some(e) = &info.error_desc {
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

/// One line of migration figures, from `query-migrate`'s answer.
pub fn migration_summary(info: &Value) -> String {
    match MigrationInfo::deserialize(info) {
        Ok(info) => summary_of(&info),
        Err(e) => format!("(QEMU's migration figures do not match its schema: {e})"),
    }
}

fn summary_of(info: &MigrationInfo) -> String {
    let (sent, total) = info
        .ram
        .as_ref()
        .map(|r| (r.transferred, r.total))
        .unwrap_or_default();
    let mut parts = vec![format!(
        "{} of {} RAM sent",
        bytes(sent.max(0) as u64),
        bytes(total.max(0) as u64)
    )];
    if let Some(t) = info.total_time {
        parts.push(format!("in {t} ms"));
    }
    if let Some(d) = info.downtime {
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
            "--fd {fd}: {} (give qmpctl the descriptor, e.g. `qmpctl migrate to --fd 3 3>vm.state`)",
            std::io::Error::from(e)
        ))
    })
}
