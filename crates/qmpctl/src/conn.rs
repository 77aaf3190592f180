//! Reaching a VM: connecting to a socket with clear messages when that
//! fails, or launching a throwaway QEMU (`--launch`).

use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use qmpkit::launch::{Qemu, QemuBuilder};
use qmpkit::{Address, Client, ConnectOptions};
use serde::{Deserialize as _, Serialize};
use serde_json::Value;

use crate::cli::Globals;
use crate::exit::{usage, ConnectFailure, Deadline};

/// What every subcommand runs with: the connection, the output mode and the
/// deadline; and the launched QEMU, when there is one (dropping it kills it).
pub struct Ctx {
    pub client: Client,
    pub json: bool,
    pub timeout: Option<Duration>,
    pub _vm: Option<Qemu>,
}

impl Ctx {
    /// Connects to `--socket`, or launches a QEMU with `--launch`.
    pub async fn open(g: &Globals) -> anyhow::Result<Ctx> {
        let options = connect_options(g);
        let (client, vm) = if g.launch {
            let builder = scratch_vm().args(&g.qemu_args).connect_options(options);
            let vm = builder.spawn().await.context("cannot launch QEMU for --launch")?;
            (vm.client().clone(), Some(vm))
        } else {
            let Some(path) = &g.socket else {
                return Err(usage(
                    "no QMP socket: give --socket PATH (or HOST:PORT), set QMPCTL_SOCKET, or use --launch for a throwaway VM",
                ));
            };
            (connect(path, &options, g.connect_timeout).await?, None)
        };
        Ok(Ctx {
            client,
            json: g.json,
            timeout: g.timeout,
            _vm: vm,
        })
    }

    /// Runs `fut` within `--timeout`, when one was given.
    pub async fn within<T>(
        &self,
        what: &str,
        fut: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        match self.timeout {
            None => fut.await,
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => Err(anyhow::Error::new(Deadline(format!(
                    "{what} did not finish within {} (--timeout)",
                    humantime::format_duration(t)
                )))),
            },
        }
    }

    /// Runs a generated command (`qmpkit::qapi::commands`) within `--timeout`
    /// and returns QEMU's answer twice: as JSON, exactly as QEMU sent it (what
    /// `--json` prints), and decoded through the command's generated type
    /// (what the tables read).
    pub async fn query<C: qmpkit::qapi::Command>(&self, command: &C) -> anyhow::Result<(Value, C::Returns)> {
        let raw = self.call(C::NAME, command).await?;
        let typed = C::Returns::deserialize(&raw)
            .with_context(|| format!("QEMU's answer to {} does not match its schema", C::NAME))?;
        Ok((raw, typed))
    }

    /// Runs one generated command and returns its reply as JSON, within `--timeout`.
    pub async fn run<C: qmpkit::qapi::Command>(&self, command: &C) -> anyhow::Result<Value> {
        self.call(C::NAME, command).await
    }

    /// Runs one command by name and returns its reply as JSON, within `--timeout`.
    pub async fn call<A: Serialize + ?Sized>(&self, name: &str, args: &A) -> anyhow::Result<Value> {
        self.within(name, async {
            Ok(self.client.call::<A, Value>(name, args).await?)
        })
        .await
    }
}

/// Connection options from the global flags.
pub fn connect_options(g: &Globals) -> ConnectOptions {
    let mut o = ConnectOptions::new().handshake_timeout(g.connect_timeout);
    if let Some(t) = g.timeout {
        o = o.command_timeout(t);
    }
    if let Some(log) = &g.log {
        o = o.traffic_log(log);
    }
    o
}

/// The throwaway VM of `--launch` and of the tour: paused, with a SCSI
/// controller and a USB controller (their disks and devices unplug without
/// a guest's help), a balloon, a VGA display, a ring-buffer serial console
/// `console0`, memory slots and a spare CPU slot.
pub fn scratch_vm() -> QemuBuilder {
    QemuBuilder::new().scratch_devices()
}

/// What `--socket` names: a Unix socket path or a TCP address, read as
/// [`qmpkit::Address`] reads it (`unix:PATH`, `tcp:HOST:PORT`, `HOST:PORT`;
/// anything else, or anything with a `/`, is a path).
pub fn address_of(socket: &Path) -> anyhow::Result<Address> {
    match socket.to_str() {
        // Not UTF-8: no address syntax can apply, so it is a path.
        None => Ok(Address::Unix(socket.to_owned())),
        Some(text) => Address::parse(text).map_err(|e| usage(e.to_string())),
    }
}

/// Connects to a QMP socket (a Unix path or a TCP address), explaining in
/// plain words, and naming the form understood, why it did not work.
pub async fn connect(
    socket: &Path,
    options: &ConnectOptions,
    greeting_budget: Duration,
) -> anyhow::Result<Client> {
    match address_of(socket)? {
        Address::Unix(path) => connect_unix(&path, options, greeting_budget).await,
        address => connect_tcp(address, options, greeting_budget).await,
    }
}

async fn connect_tcp(
    address: Address,
    options: &ConnectOptions,
    greeting_budget: Duration,
) -> anyhow::Result<Client> {
    let shown = address.to_string();
    let Address::Tcp(text) = &address else {
        unreachable!("only TCP comes here")
    };
    let form = "read as a TCP address HOST:PORT; write ./PATH or unix:PATH for a socket file";
    options.connect_to(&address).await.map_err(|e| {
        let msg = match &e {
            qmpkit::Error::ConnectTcp { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused => format!(
                "nobody is listening on {shown} ({form}): is QEMU running with -qmp tcp:{text},server=on,wait=off?"
            ),
            qmpkit::Error::ConnectTcp { .. } => format!("cannot reach {shown} ({form})"),
            qmpkit::Error::Resolve { .. } => format!("cannot resolve the host of {shown} ({form})"),
            qmpkit::Error::HandshakeTimeout { .. } => format!(
                "no QMP greeting from {shown} within {}: not a QMP port, another client holds the monitor (QEMU serves one client at a time), or QEMU is frozen",
                humantime::format_duration(greeting_budget)
            ),
            qmpkit::Error::Handshake(_) => format!("{shown} does not speak QMP ({form})"),
            _ => format!("cannot connect to {shown} ({form})"),
        };
        anyhow::Error::new(e).context(ConnectFailure(msg))
    })
}

async fn connect_unix(
    path: &Path,
    options: &ConnectOptions,
    greeting_budget: Duration,
) -> anyhow::Result<Client> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(anyhow::Error::new(e).context(ConnectFailure(format!(
                "no QMP socket at {shown}: the file does not exist (read as a Unix socket path; is QEMU running with -qmp unix:{shown},server=on? for TCP give HOST:PORT)"
            ))));
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(ConnectFailure(format!("cannot use {shown}"))));
        }
        Ok(m) if !m.file_type().is_socket() => {
            let kind = if m.is_dir() {
                "a directory"
            } else if m.is_file() {
                "a regular file"
            } else {
                "not a socket"
            };
            return Err(anyhow::Error::new(ConnectFailure(format!(
                "{shown} is not a socket (it is {kind}); give the path of QEMU's -qmp unix: socket"
            ))));
        }
        Ok(_) => {}
    }
    options.connect(path).await.map_err(|e| {
        let msg = match &e {
            qmpkit::Error::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused => format!(
                "nobody is listening on {shown}: QEMU has exited and left its socket file behind, or another program owns the path"
            ),
            qmpkit::Error::Connect { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
                format!("no permission to connect to {shown}: run as the user that owns the VM")
            }
            qmpkit::Error::HandshakeTimeout { .. } => format!(
                "no QMP greeting from {shown} within {}: another client probably holds the socket (QEMU serves one client at a time on each QMP socket), or QEMU is frozen",
                humantime::format_duration(greeting_budget)
            ),
            _ => format!("cannot connect to {shown}"),
        };
        anyhow::Error::new(e).context(ConnectFailure(msg))
    })
}
