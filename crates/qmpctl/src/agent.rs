//! `qmpctl agent`: the QEMU guest agent in the guest, through the host side
//! of its virtio-serial port (`--socket` names that socket here, not QMP's).

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::cli::{AgentArgs, AgentCommand, AgentFileCommand, FsfreezeCommand, Globals, ShutdownModeArg};
use crate::exit::usage;
use crate::out::{self, Table};
use crate::outln;
use qmpkit::guest_agent::{ExecRequest, GuestAgent, ShutdownMode};

/// Runs an `agent` subcommand.
pub async fn run(args: AgentArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let Some(socket) = &globals.socket else {
        return Err(usage(
            "no guest agent socket: give --socket PATH, the host side of the guest's org.qemu.guest_agent.0 port",
        ));
    };
    if globals.log.is_some() {
        return Err(usage(
            "--log records QMP traffic; `agent` talks to the guest agent, which has no traffic log",
        ));
    }
    let mut options = GuestAgent::options().connect_timeout(globals.connect_timeout);
    if let Some(t) = globals.timeout {
        options = options.command_timeout(t);
    }
    let agent = options
        .connect(socket)
        .await
        .with_context(|| format!("cannot reach the guest agent at {}", socket.display()))?;
    let json = globals.json;
    match args.command {
        AgentCommand::Ping => {
            agent.ping().await?;
            emit(json, &json!({"ok": true}), || outln!("the guest agent answered"))?;
        }
        AgentCommand::Info => {
            let info = agent.info().await?;
            emit(json, &serde_json::to_value(&info)?, || {
                outln!("qemu-ga {}", info.version)?;
                let mut t = Table::new(&["COMMAND", "ENABLED"]);
                for c in &info.supported_commands {
                    t.row(vec![c.name.clone(), if c.enabled { "yes" } else { "no" }.into()]);
                }
                t.print("no commands")
            })?;
        }
        AgentCommand::Osinfo => {
            let os = agent.os_info().await?;
            let v = serde_json::to_value(&os)?;
            emit(json, &v, || {
                for (k, val) in v.as_object().into_iter().flatten() {
                    if let Some(s) = val.as_str() {
                        outln!("{k}: {s}")?;
                    }
                }
                Ok(())
            })?;
        }
        AgentCommand::Time => {
            let ns = agent.time_ns().await?;
            let when = SystemTime::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
            emit(json, &json!({"time-ns": ns}), || {
                outln!("{}", humantime::format_rfc3339_nanos(when))
            })?;
        }
        AgentCommand::Interfaces => {
            let ifaces = agent.network_interfaces().await?;
            emit(json, &serde_json::to_value(&ifaces)?, || {
                let mut t = Table::new(&["NAME", "MAC", "ADDRESSES"]);
                for i in &ifaces {
                    let addrs: Vec<String> = i
                        .ip_addresses
                        .iter()
                        .map(|a| format!("{}/{}", a.ip_address, a.prefix))
                        .collect();
                    t.row(vec![
                        i.name.clone(),
                        i.hardware_address.clone().unwrap_or_else(|| "-".into()),
                        addrs.join(" "),
                    ]);
                }
                t.print("no interfaces")
            })?;
        }
        AgentCommand::Exec { program, args } => return exec(&agent, globals, program, args).await,
        AgentCommand::File(AgentFileCommand::Get { guest_path, local }) => {
            let data = agent.read_file(&guest_path).await?;
            if local == Path::new("-") {
                std::io::stdout().lock().write_all(&data)?;
            } else {
                std::fs::write(&local, &data).with_context(|| format!("cannot write {}", local.display()))?;
                let v = json!({"ok": true, "bytes": data.len()});
                emit(json, &v, || {
                    outln!(
                        "copied {} bytes from the guest's {guest_path} to {}",
                        data.len(),
                        local.display()
                    )
                })?;
            }
        }
        AgentCommand::File(AgentFileCommand::Put { local, guest_path }) => {
            let data = if local == Path::new("-") {
                let mut buf = Vec::new();
                std::io::stdin().lock().read_to_end(&mut buf)?;
                buf
            } else {
                std::fs::read(&local).with_context(|| format!("cannot read {}", local.display()))?
            };
            agent.write_file(&guest_path, &data).await?;
            let v = json!({"ok": true, "bytes": data.len()});
            emit(json, &v, || {
                outln!("copied {} bytes to the guest's {guest_path}", data.len())
            })?;
        }
        AgentCommand::Fsfreeze(c) => match c {
            FsfreezeCommand::Status => {
                let s = agent.fsfreeze_status().await?;
                let v = serde_json::to_value(s)?;
                emit(json, &json!({"status": v}), || {
                    outln!("{}", v.as_str().unwrap_or_default())
                })?;
            }
            FsfreezeCommand::Freeze { mountpoints } => {
                let n = if mountpoints.is_empty() {
                    agent.fsfreeze_freeze().await?
                } else {
                    agent.fsfreeze_freeze_list(&mountpoints).await?
                };
                emit(json, &json!({"ok": true, "frozen": n}), || {
                    outln!("froze {n} filesystem(s)")
                })?;
            }
            FsfreezeCommand::Thaw => {
                let n = agent.fsfreeze_thaw().await?;
                emit(json, &json!({"ok": true, "thawed": n}), || {
                    outln!("thawed {n} filesystem(s)")
                })?;
            }
        },
        AgentCommand::Shutdown { mode } => {
            let mode = match mode {
                ShutdownModeArg::Powerdown => ShutdownMode::Powerdown,
                ShutdownModeArg::Halt => ShutdownMode::Halt,
                ShutdownModeArg::Reboot => ShutdownMode::Reboot,
            };
            // The agent answers this command only when it fails, so a
            // disabled one is caught beforehand.
            if !agent.info().await?.supports("guest-shutdown") {
                anyhow::bail!(qmpkit::Error::Qmp(qmpkit::QmpError::new(
                    "guest-shutdown",
                    qmpkit::ErrorClass::GenericError,
                    "the guest agent has this command disabled",
                )));
            }
            agent.shutdown(mode).await?;
            let name = serde_json::to_value(mode)?;
            emit(json, &json!({"ok": true, "mode": name}), || {
                outln!(
                    "asked the guest to {} (the agent does not answer; QMP's SHUTDOWN or RESET event tells when it happens)",
                    name.as_str().unwrap_or_default()
                )
            })?;
        }
        AgentCommand::SetPassword { user, crypted } => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("cannot read the password from stdin")?;
            let password = password.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                return Err(usage("no password on stdin"));
            }
            agent.set_user_password(&user, password, crypted).await?;
            emit(json, &json!({"ok": true, "user": user}), || {
                outln!("password of {user} set")
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `agent exec`: runs the program, prints its output, and exits with its
/// status (128 + the signal when a signal ended it). Without `--timeout` it
/// waits as long as the program runs.
async fn exec(
    agent: &GuestAgent,
    globals: &Globals,
    program: String,
    args: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let agent = agent.with_timeout(globals.timeout.unwrap_or(Duration::MAX));
    let out = agent.exec_and_wait(&ExecRequest::new(program).args(args)).await?;
    if globals.json {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        out::json(
            &json!({
                "exit-code": out.exit_code,
                "signal": out.signal,
                "stdout": text(&out.stdout),
                "stderr": text(&out.stderr),
                "stdout-truncated": out.stdout_truncated,
                "stderr-truncated": out.stderr_truncated,
            }),
            true,
        )?;
    } else {
        std::io::stdout().lock().write_all(&out.stdout)?;
        std::io::stderr().lock().write_all(&out.stderr)?;
    }
    let code = match (out.exit_code, out.signal) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        (None, None) => 1,
    };
    Ok(ExitCode::from(code))
}

fn emit(json: bool, value: &Value, human: impl FnOnce() -> std::io::Result<()>) -> anyhow::Result<()> {
    if json {
        out::json(value, true)?;
    } else {
        human()?;
    }
    Ok(())
}
