//! Progress bars as a person sees them: `qmpctl migrate to` run in a
//! pseudo-terminal draws a bar that counts bytes, and a migration cancelled
//! meanwhile ends with the bar cleared and a clear error. (The CLI tests
//! check the other side: no bar when stderr is not a terminal.)

mod support;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::process::Command;

use rexpect::reader::Options;
use rexpect::session::spawn_with_options;
use serde_json::{json, Value};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_on_a_terminal_draws_a_bar_and_a_cancel_clears_it() {
    let vm = vm().await;
    let client = vm.client().clone();
    let socket = vm.socket("cli");

    // 64 KiB/s: the migration lasts long enough for the bar to be drawn
    // several times, and ends only when the test cancels it.
    let _: Value = client
        .call("migrate-set-parameters", &json!({"max-bandwidth": 65536}))
        .await
        .unwrap();

    // The destination: any listener that reads what QEMU sends.
    let dest = vm.dir().join("dest.sock");
    let listener = UnixListener::bind(&dest).unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("QEMU connects");
        let mut sink = Vec::new();
        let _ = conn.read_to_end(&mut sink);
        sink.len()
    });

    let (bar_seen, wait_bar) = tokio::sync::oneshot::channel::<()>();
    let dest_arg = dest.to_str().unwrap().to_owned();
    let pty = tokio::task::spawn_blocking(move || -> Result<String, rexpect::error::Error> {
        let mut cmd = Command::new(QMPCTL);
        cmd.arg("--socket")
            .arg(&socket)
            .args(["migrate", "to", &dest_arg])
            .env("TERM", "xterm")
            .env_remove("QMPCTL_SOCKET");
        let options = Options::new()
            .timeout_ms(Some(30_000))
            .strip_ansi_escape_codes(false);
        let mut p = spawn_with_options(cmd, options)?;
        // The bar: its label, then some bytes sent out of the total
        // (escape sequences kept, to see the bar erased at the end).
        p.exp_string("migrate [")?;
        let (_, counts) = p.exp_regex(r"[1-9][0-9.]* [KMG]?i?B/[0-9.]+ [KMG]i?B")?;
        bar_seen.send(()).expect("test side gone");
        let rest = p.exp_eof()?;
        let exit = p.process().wait()?;
        Ok(format!("{counts}\n{rest}\n{exit:?}"))
    });

    within(30, wait_bar)
        .await
        .expect("the bar was not drawn on the terminal");
    let info: Value = client.call("query-migrate", &()).await.unwrap();
    assert_eq!(info["status"], "active", "{info}");
    let _: Value = client.call("migrate_cancel", &()).await.unwrap();

    let output = within(60, pty).await.unwrap().expect("qmpctl under a pty");
    // The bar is cleared, then the outcome is said plainly, and the exit
    // status is 1, "the operation failed" (the README's exit codes).
    let at = output
        .find("qmpctl: migration ended as cancelled\r\n")
        .unwrap_or_else(|| panic!("no outcome in {output:?}"));
    let after_last_bar = output[..at].rsplit("migrate [").next().unwrap_or("");
    assert!(
        after_last_bar.contains("\r\x1b[2K"),
        "the bar was not erased before the message: {output:?}"
    );
    // Its last frame still shows how far the migration got, though QEMU
    // zeroes the counters when it is cancelled.
    assert!(!after_last_bar.contains(" 0 B/"), "{output:?}");
    assert!(
        output.contains("Exited(") && output.ends_with(", 1)"),
        "{output:?}"
    );
    let received = within(30, tokio::task::spawn_blocking(move || receiver.join()))
        .await
        .unwrap()
        .unwrap();
    assert!(received > 0, "the destination received nothing");
    // The source VM is unharmed.
    let info: Value = client.call("query-migrate", &()).await.unwrap();
    assert_eq!(info["status"], "cancelled", "{info}");
    assert_eq!(status(&client).await, "prelaunch");
}
