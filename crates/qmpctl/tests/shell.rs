//! `qmpctl shell` driven through a pseudo-terminal, as a person would use
//! it: tab completion from the server's schema, history, and an event that
//! arrives while a line is half typed.

mod support;

use std::process::Command;

use rexpect::reader::Options;
use rexpect::session::{spawn_with_options, PtySession};
use serde_json::Value;
use support::*;

/// Up arrow.
const UP: &str = "\x1b[A";

fn shell(socket: &std::path::Path, history: &std::path::Path) -> PtySession {
    let mut cmd = Command::new(QMPCTL);
    cmd.arg("--socket")
        .arg(socket)
        .arg("shell")
        .arg("--history")
        .arg(history)
        .env("TERM", "xterm")
        .env_remove("QMPCTL_SOCKET");
    let options = Options::new()
        .timeout_ms(Some(20_000))
        .strip_ansi_escape_codes(true);
    spawn_with_options(cmd, options).expect("start qmpctl shell in a pty")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_completes_remembers_and_prints_events_while_typing() {
    let vm = vm().await;
    let client = vm.client().clone();
    let socket = vm.socket("cli");
    let history = vm.dir().join("history");
    let hist = history.clone();

    // The pty is driven from a blocking thread; it asks the test's side to
    // make QEMU send an event once a line is half typed.
    let (want_event, event_wanted) = tokio::sync::oneshot::channel::<()>();
    let (event_sent, wait_event_sent) = std::sync::mpsc::channel::<()>();
    let driver = tokio::task::spawn_blocking(move || -> Result<(), rexpect::error::Error> {
        let mut p = shell(&socket, &hist);
        p.exp_string("Tab completes")?;
        p.exp_string("qmp> ")?;

        // A unique command name completes in place; run it.
        p.send("query-hotp\t")?;
        p.flush()?;
        p.exp_string("luggable-cpus")?;
        p.send("\r")?;
        p.flush()?;
        p.exp_string("\"vcpus-count\"")?;

        // An ambiguous prefix lists the candidates on the second Tab.
        p.send("query-sta\t\t")?;
        p.flush()?;
        p.exp_string("query-stats-schemas")?;
        p.exp_string("query-status")?;
        p.send("\x15")?; // Ctrl-U: drop the line

        // Argument names come from the command's schema.
        p.send("block_resize no\t")?;
        p.flush()?;
        p.exp_string("de-name=")?;
        p.send("\x15")?;

        // Up brings the last command back.
        p.send(UP)?;
        p.flush()?;
        p.exp_string("query-hotpluggable-cpus")?;
        p.send("\r")?;
        p.flush()?;
        p.exp_string("\"vcpus-count\"")?;

        // Half a command typed, then an event arrives: it is printed, and
        // the half line survives to be finished.
        p.send("query-")?;
        p.flush()?;
        p.exp_string("query-")?;
        want_event.send(()).expect("test side gone");
        wait_event_sent.recv().expect("test side gone");
        p.exp_string("event: ")?;
        p.exp_string("RESUME")?;
        p.send("status\r")?;
        p.flush()?;
        p.exp_string("\"status\": \"running\"")?;

        // Bad input in the shell is reported and the shell goes on.
        p.send("query-stauts\r")?;
        p.flush()?;
        p.exp_string("did you mean one of query-status")?;
        p.send("ringbuf-write {\"device\" 1}\r")?;
        p.flush()?;
        p.exp_string("line 1 column 11")?;

        p.send_control('d')?;
        p.exp_eof()?;
        Ok(())
    });

    if within(30, event_wanted).await.is_err() {
        let outcome = within(60, driver).await.unwrap();
        panic!("the shell did not behave: {outcome:?}");
    }
    let _: Value = client.call("cont", &()).await.unwrap();
    event_sent.send(()).unwrap();
    within(60, driver)
        .await
        .unwrap()
        .expect("the shell did not behave");

    assert_eq!(status(&client).await, "running");
    let saved = std::fs::read_to_string(&history).unwrap();
    let entries: Vec<&str> = saved.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        entries,
        [
            "query-hotpluggable-cpus", // once: a repeat is not stored twice
            "query-status",
            "query-stauts",
            "ringbuf-write {\"device\" 1}"
        ],
        "{saved}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_completes_values_runs_transactions_and_hmp() {
    let vm = vm().await;
    let socket = vm.socket("cli");
    let history = vm.dir().join("history");
    let driver = tokio::task::spawn_blocking(move || -> Result<(), rexpect::error::Error> {
        let mut p = shell(&socket, &history);
        p.exp_string("qmp> ")?;
        // An enum value: qcow and qcow2 share the prefix; the second Tab lists both.
        p.send("blockdev-add driver=qco\t\t")?;
        p.flush()?;
        p.exp_string("qcow2")?;
        p.send("2\t")?;
        p.flush()?;
        // Then the qcow2 branch's own members complete.
        p.send("lazy-ref\t")?;
        p.flush()?;
        p.exp_string("counts=")?;
        p.send("\x15")?;
        p.send("help block_resize\r")?;
        p.flush()?;
        p.exp_string("size")?;
        p.exp_string("int")?;
        p.exp_string("qmp> ")?;
        // A transaction collects actions under its own prompt; `)` runs them.
        p.send("transaction(\r")?;
        p.flush()?;
        p.exp_string("transaction> ")?;
        p.send("abort\r")?;
        p.flush()?;
        p.exp_string("transaction> ")?;
        p.send(")\r")?;
        p.flush()?;
        p.exp_string("abort")?;
        p.exp_string("qmp> ")?;
        // A human monitor command prints text.
        p.send("!info status\r")?;
        p.flush()?;
        p.exp_string("VM status: paused (prelaunch)")?;
        p.exp_string("qmp> ")?;
        p.send_control('d')?;
        p.exp_eof()?;
        Ok(())
    });
    within(60, driver).await.unwrap().unwrap();
    // The shell only completed and described: QEMU has no new node.
    let nodes: Value = vm
        .client()
        .call("query-named-block-nodes", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(nodes, serde_json::json!([]));
}
