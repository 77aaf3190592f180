//! `qmpkit-fake-server SOCKET [--events-every-ms N]`: serves the instant QMP
//! responder on SOCKET until killed, printing `ready` once listening.
//!
//! Runs on a single-threaded tokio runtime and raises the open-file soft limit
//! to the hard limit, so one process can hold 10,000+ connections cheaply.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::process::ExitCode;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

const USAGE: &str = "usage: qmpkit-fake-server SOCKET [--events-every-ms N]";

fn main() -> ExitCode {
    let mut socket = None;
    let mut every = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--events-every-ms" => match args.next().and_then(|n| n.parse::<u64>().ok()) {
                Some(ms) if ms > 0 => every = Some(Duration::from_millis(ms)),
                _ => return usage(),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ if socket.is_none() && !arg.starts_with('-') => socket = Some(arg),
            _ => return usage(),
        }
    }
    let Some(socket) = socket else { return usage() };
    raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(&socket, every)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qmpkit-fake-server: {socket}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

fn raise_nofile_limit() {
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let new = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, new) {
            eprintln!(
                "qmpkit-fake-server: cannot raise RLIMIT_NOFILE to {:?}: {e}",
                lim.maximum
            );
        }
    }
}

async fn run(socket: &str, every: Option<Duration>) -> std::io::Result<()> {
    // Replace a stale socket left by an earlier run, but never any other file.
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(socket)?;
        }
    }
    let listener = tokio::net::UnixListener::bind(socket)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    drop(stdout);
    let script = move |mut conn: qmpkit_fake::FakeConn| async move {
        if conn.greet().await.is_ok() {
            conn.serve_instant_with_events(every).await;
        }
    };
    qmpkit_fake::serve(listener, script, Arc::new(AtomicUsize::new(0))).await;
    Ok(())
}
