//! A subscriber that falls behind is told what it missed, through a real
//! connection to a fake server: drops after its last event are reported the
//! next time it asks (not only when the connection closes), events lost
//! before the first subscription are counted, and `wait_for` never hangs on
//! an event that was dropped.

mod common;

use common::within;
use qmpkit::{Client, EventFilter, EventItem};
use qmpkit_fake::{FakeConn, FakeServer};
use serde_json::{json, Value};

/// `n` events in QEMU's layout, in one buffer: `TICK`s numbered from 0, and
/// `last` as the final one.
fn burst(n: u64, last: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let name = if i + 1 == n { last } else { "TICK" };
        out.extend_from_slice(
            format!(
                "{{\"timestamp\": {{\"seconds\": 1700000000, \"microseconds\": {i}}}, \
                 \"event\": \"{name}\", \"data\": {{\"n\": {i}}}}}\r\n"
            )
            .as_bytes(),
        );
    }
    out
}

/// Answers `burst-100` with 100 events ending in `BLOCK_JOB_COMPLETED`,
/// `burst-5000` with 5,000 ending in `STOP`, each sent before the reply, and
/// everything else with `{}`; closes after `quit`. The connection stays open
/// otherwise.
async fn script(mut conn: FakeConn) {
    if conn.handshake().await.is_err() {
        return;
    }
    while let Ok(Some(req)) = conn.recv().await {
        let events = match req.name.as_deref() {
            Some("burst-100") => burst(100, "BLOCK_JOB_COMPLETED"),
            Some("burst-5000") => burst(5000, "STOP"),
            _ => Vec::new(),
        };
        if conn.send_raw(&events).await.is_err() || conn.reply(&req, json!({})).await.is_err() {
            return;
        }
        if req.name.as_deref() == Some("quit") {
            return;
        }
    }
}

async fn connect() -> (FakeServer, Client) {
    let srv = FakeServer::start(script).await.expect("start fake server");
    let client = within(10, Client::connect(srv.path())).await.unwrap();
    (srv, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_after_the_last_event_are_reported_at_once_while_connected() {
    let (_srv, client) = connect().await;
    let mut events = client.subscribe(EventFilter::all().capacity(10));
    // The reply comes after the events, so all 100 have been handed out
    // (10 queued, 90 dropped) when it returns.
    within(10, client.execute_raw("burst-100", Value::Null))
        .await
        .unwrap();
    for i in 0..10 {
        match within(10, events.recv()).await {
            Some(EventItem::Event(e)) => assert_eq!(e.data()["n"], i),
            other => panic!("expected event {i}, got {other:?}"),
        }
    }
    // The connection is still open and nothing else will come: the note
    // must not wait for a next event or for the close.
    match within(10, events.recv()).await {
        Some(EventItem::Missed(90)) => {}
        other => panic!("expected a note of 90 missed events, got {other:?}"),
    }
    assert_eq!(events.missed(), 90);
    assert!(events.try_next().is_none());
    assert!(!client.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_a_dropped_event_fails_with_events_missed() {
    let (_srv, client) = connect().await;
    let mut events = client.subscribe(EventFilter::all().capacity(10));
    within(10, client.execute_raw("burst-100", Value::Null))
        .await
        .unwrap();
    let err = within(10, events.wait_for("BLOCK_JOB_COMPLETED"))
        .await
        .unwrap_err();
    assert!(err.is_events_missed(), "{err:?}");
    assert!(
        matches!(&err, qmpkit::Error::EventsMissed { event, count: 90 } if event == "BLOCK_JOB_COMPLETED"),
        "{err:?}"
    );
    // The connection is fine: the caller goes on to re-query the state.
    within(10, client.execute_raw("query-jobs", Value::Null))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_subscriber_is_told_of_events_lost_before_it_subscribed() {
    let (_srv, client) = connect().await;
    // Nobody subscribed yet: the connection keeps the last 1,024 for the first.
    within(10, client.execute_raw("burst-5000", Value::Null))
        .await
        .unwrap();
    let mut events = client.events();
    // The lost ones came first, so their note does too.
    match within(10, events.recv()).await {
        Some(EventItem::Missed(3976)) => {}
        other => panic!("expected a note of 3,976 missed events, got {other:?}"),
    }
    assert_eq!(events.missed(), 3976);
    for i in 3976..5000 {
        let e = events.try_next().expect("a kept event");
        assert_eq!(e.data()["n"], i);
    }
    assert!(events.try_next().is_none());
    assert_eq!(events.missed(), 3976);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_ends_when_the_connection_closes() {
    let (_srv, client) = connect().await;
    let mut events = client.subscribe(EventFilter::names(["SHUTDOWN"]));
    within(10, client.execute_raw("quit", Value::Null)).await.unwrap();
    let err = within(10, events.wait_for("SHUTDOWN")).await.unwrap_err();
    assert!(err.is_disconnected(), "{err:?}");
}
