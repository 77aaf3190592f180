//! Exit codes, the error kinds that choose them, and how errors are printed.
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | success |
//! | 1 | the operation failed (job, migration, tour step, local file, launch) |
//! | 2 | bad usage: options, invalid JSON arguments, unknown command |
//! | 3 | QEMU answered with an error |
//! | 4 | connection failure: no socket, nobody listening, no greeting, lost |
//! | 5 | timeout |
//! | 130 | interrupted by SIGINT or SIGTERM |

use std::io::Write;
use std::process::ExitCode;

/// The operation failed for another reason.
pub const FAILURE: u8 = 1;
/// Bad usage.
pub const USAGE: u8 = 2;
/// QEMU answered with an error.
pub const QMP_ERROR: u8 = 3;
/// The connection could not be made or was lost.
pub const CONNECTION: u8 = 4;
/// A deadline passed.
pub const TIMEOUT: u8 = 5;
/// Interrupted by a signal.
pub const INTERRUPTED: u8 = 130;

/// The user asked for something that cannot work as asked; nothing was done.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Makes a usage error.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// The socket could not be reached or did not speak QMP.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectFailure(pub String);

/// An operation ran out of the time `--timeout` gave it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Deadline(pub String);

/// SIGINT or SIGTERM arrived.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {0}")]
pub struct Interrupted(&'static str);

/// Resolves when SIGINT or SIGTERM arrives (so that a launched QEMU is still
/// cleaned up: the error unwinds through its owner's `Drop`).
pub async fn interrupted() -> Interrupted {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => Interrupted("SIGINT"),
        _ = term.recv() => Interrupted("SIGTERM"),
    }
}

/// The exit code an error stands for. This tool's own kinds (which may wrap
/// a library error as their cause) come first; then the first library error
/// in the chain decides.
pub fn code_of(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<Interrupted>().is_some() {
        return INTERRUPTED;
    }
    if err.downcast_ref::<UsageError>().is_some() {
        return USAGE;
    }
    if err.downcast_ref::<ConnectFailure>().is_some() {
        return CONNECTION;
    }
    if err.downcast_ref::<Deadline>().is_some() {
        return TIMEOUT;
    }
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<qmpkit::Error>() {
            return qmp_code(e);
        }
        if let Some(qmpkit::launch::LaunchError::Connect(e)) = cause.downcast_ref() {
            return qmp_code(e);
        }
    }
    FAILURE
}

fn qmp_code(e: &qmpkit::Error) -> u8 {
    match e {
        qmpkit::Error::Qmp(_) | qmpkit::Error::Console(_) => QMP_ERROR,
        qmpkit::Error::Timeout { .. } => TIMEOUT,
        qmpkit::Error::Connect { .. }
        | qmpkit::Error::ConnectTcp { .. }
        | qmpkit::Error::Resolve { .. }
        | qmpkit::Error::AcceptTimeout { .. }
        | qmpkit::Error::Handshake(_)
        | qmpkit::Error::HandshakeTimeout { .. }
        | qmpkit::Error::Disconnected { .. }
        | qmpkit::Error::Io(_)
        | qmpkit::Error::Protocol(_)
        | qmpkit::Error::AgentUnavailable { .. } => CONNECTION,
        qmpkit::Error::InvalidRequest(_)
        | qmpkit::Error::TooManyFds { .. }
        | qmpkit::Error::InvalidAddress { .. }
        | qmpkit::Error::FdPassingUnsupported { .. } => USAGE,
        _ => FAILURE,
    }
}

/// True when the error is stdout's reader having gone away.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error's messages, outermost first, leaving out a cause whose text
/// the message before it already contains.
pub fn chain_lines(err: &anyhow::Error) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if lines.last().is_some_and(|prev| prev.contains(&text)) {
            continue;
        }
        lines.push(text);
    }
    lines
}

/// The name of an exit code's kind, as `--json` errors give it.
pub fn kind_name(code: u8) -> &'static str {
    match code {
        USAGE => "usage",
        QMP_ERROR => "qmp",
        CONNECTION => "connection",
        TIMEOUT => "timeout",
        INTERRUPTED => "interrupted",
        _ => "failure",
    }
}

/// QEMU's error class, when QEMU's answer is what failed.
pub fn qmp_class(err: &anyhow::Error) -> Option<String> {
    err.chain().find_map(|c| {
        c.downcast_ref::<qmpkit::Error>()
            .and_then(|e| e.class())
            .map(|class| class.as_str().to_owned())
    })
}

/// The error as the one JSON object `--json` prints on stderr:
/// `{"error": {"kind", "message", "class", "exit_code"}}`.
pub fn json_error(err: &anyhow::Error) -> serde_json::Value {
    let code = code_of(err);
    serde_json::json!({
        "error": {
            "kind": kind_name(code),
            "message": chain_lines(err).join(": "),
            "class": qmp_class(err),
            "exit_code": code,
        }
    })
}

/// Prints the error on stderr: its cause chain for people, one JSON object
/// (one line) for programs.
pub fn print_error(err: &anyhow::Error, json: bool) {
    let mut stderr = std::io::stderr().lock();
    if json {
        let _ = writeln!(stderr, "{}", json_error(err));
        return;
    }
    for (i, message) in chain_lines(err).iter().enumerate() {
        let mut message_lines = message.lines();
        if let Some(l) = message_lines.next() {
            let lead = if i == 0 { "qmpctl: " } else { "  caused by: " };
            let _ = writeln!(stderr, "{lead}{l}");
        }
        for l in message_lines {
            let _ = writeln!(stderr, "  {l}");
        }
    }
}

/// Prints the error (unless it is a broken pipe) and returns its exit code.
pub fn report(err: &anyhow::Error, json: bool) -> ExitCode {
    if is_broken_pipe(err) {
        return ExitCode::SUCCESS;
    }
    print_error(err, json);
    ExitCode::from(code_of(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_first_telling_cause() {
        let e = anyhow::Error::new(qmpkit::Error::InvalidRequest("x".into())).context("running exec");
        assert_eq!(code_of(&e), USAGE);
        let e = anyhow::Error::new(qmpkit::Error::Timeout {
            command: "stop".into(),
            budget: std::time::Duration::from_secs(1),
        });
        assert_eq!(code_of(&e), TIMEOUT);
        let e =
            anyhow::Error::new(qmpkit::Error::InvalidRequest("x".into())).context(ConnectFailure("y".into()));
        assert_eq!(code_of(&e), CONNECTION);
        assert_eq!(code_of(&anyhow::anyhow!("plain")), FAILURE);
    }

    #[test]
    fn repeated_causes_are_left_out() {
        let io = std::io::Error::other("boom");
        let e = anyhow::Error::new(io)
            .context("cannot read: boom")
            .context("step 3");
        assert_eq!(chain_lines(&e), ["step 3", "cannot read: boom"]);
    }
}
