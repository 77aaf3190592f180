//! `qmpctl events` prints whatever timestamp the server sends: a year past
//! 9999 or numbers no clock can hold used to make it panic (exit 101).
//! A fake server sends them, so no QEMU is needed.

mod support;

use qmpkit_fake::FakeServer;
use support::*;

/// Events dated year 10000, the end of i64 and garbage, as a server might send them.
const FAR_EVENTS: &[u8] = b"\
{\"timestamp\": {\"seconds\": 253402300800, \"microseconds\": 5}, \"event\": \"STOP\"}\r\n\
{\"timestamp\": {\"seconds\": 9223372036854775807, \"microseconds\": 9223372036854775807}, \"event\": \"RESUME\"}\r\n\
{\"timestamp\": {\"seconds\": -1, \"microseconds\": -1}, \"event\": \"RESET\", \"data\": {\"guest\": false}}\r\n";

async fn far_future_server() -> FakeServer {
    FakeServer::start(|mut conn| async move {
        if conn.handshake().await.is_err() {
            return;
        }
        // Sent before qmpctl subscribes: the connection keeps them for its
        // first subscriber, so none is lost to the race.
        if conn.send_raw(FAR_EVENTS).await.is_err() {
            return;
        }
        conn.serve_instant().await;
    })
    .await
    .expect("start fake server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_dated_past_year_9999_print_without_a_panic() {
    let srv = far_future_server().await;
    let run = ctl(srv.path(), &["events", "--count", "3"]).await.ok();
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "@253402300800.000005 STOP",
            "(seconds 9223372036854775807, microseconds 9223372036854775807) RESUME",
            "(no time) RESET {\"guest\":false}",
        ],
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_dated_past_year_9999_keep_their_numbers_in_json() {
    let srv = far_future_server().await;
    let run = ctl(srv.path(), &["--json", "events", "--count", "1"]).await.ok();
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["timestamp"]["seconds"], 253_402_300_800i64);
    assert_eq!(v["timestamp"]["microseconds"], 5);
}
