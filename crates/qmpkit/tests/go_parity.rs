//! The Go package's own unit tests (`qmp_test.go` and `log_test.go` of
//! Incus's `qmp` package), ported: each test here is named after the Go test
//! it ports and checks the same behaviour through this crate's API, against
//! the fake server where Go used a fake.
//!
//! Go tests its reader (`listen`) on a bare `io.Reader`; ours is not public,
//! so its cases are played by a server that writes the same bytes to a
//! connected client. Go's fake greets as QEMU 9.2.2 and answers
//! `qmp_capabilities` with `{"id": ...}` and no `return`; ours does the same.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use common::within;
use qmpkit::{Client, ConnectOptions, Error, EventFilter};
use qmpkit_fake::{FakeConn, FakeServer, Request};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The greeting of Go's fake server: QEMU 9.2.2, offering `oob`.
const GO_TEST_GREETING: &[u8] =
    b"{\"QMP\":{\"capabilities\":[\"oob\"],\"version\":{\"package\":\"v9.2.2\",\"qemu\":{\"major\":9,\"micro\":2,\"minor\":2}}}}\n";

/// What went wrong in a fake server's script, for the test to report.
type ScriptResult = Result<(), String>;

/// Plays Go's fake monitor: greets, checks that the first request is
/// `qmp_capabilities`, answers with its id and nothing else, then runs
/// `then` on the connection. The script's outcome comes back on the
/// returned channel.
async fn go_mock<F, Fut>(then: F) -> (FakeServer, mpsc::UnboundedReceiver<ScriptResult>)
where
    F: Fn(FakeConn) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ScriptResult> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let then = Arc::new(then);
    let server = FakeServer::start(move |mut conn: FakeConn| {
        let (tx, then) = (tx.clone(), then.clone());
        async move {
            let outcome = async {
                conn.send_raw(GO_TEST_GREETING).await.map_err(|e| e.to_string())?;
                let req = conn
                    .recv()
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("no capabilities request")?;
                if req.name.as_deref() != Some("qmp_capabilities") {
                    return Err(format!("expected qmp_capabilities, got {:?}", req.name));
                }
                conn.send_raw(&id_only_reply(&req))
                    .await
                    .map_err(|e| e.to_string())?;
                then(conn).await
            }
            .await;
            let _ = tx.send(outcome);
        }
    })
    .await
    .expect("start fake server");
    (server, rx)
}

/// `{"id": ID}` for a request with an id, `{}` for one without: Go's
/// fake answers with its response struct, whose members are all optional.
fn id_only_reply(req: &Request) -> Vec<u8> {
    let mut out = match &req.id {
        Some(id) => serde_json::to_vec(&json!({ "id": id })).unwrap(),
        None => b"{}".to_vec(),
    };
    out.push(b'\n');
    out
}

/// Reads requests until the client hangs up.
async fn until_hang_up(mut conn: FakeConn) -> ScriptResult {
    while conn.recv().await.map_err(|e| e.to_string())?.is_some() {}
    Ok(())
}

/// Ports `TestConnectDisconnect`: a client connects to Go's fake monitor,
/// negotiates, disconnects, and the server sees all of it go as planned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connect_disconnect() {
    let (server, mut outcome) = go_mock(until_hang_up).await;
    let client = within(10, Client::connect(server.path())).await.unwrap();
    assert_eq!(client.greeting().version.major, 9);
    assert!(client.oob_enabled());
    client.disconnect();
    within(10, client.closed()).await;
    within(10, outcome.recv()).await.unwrap().unwrap();
}

/// Ports `TestEvents`: events written by the server after the handshake
/// reach the client in order and as sent. Go's encoder writes a missing
/// `data` and `timestamp` as `null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_events() {
    let (server, mut outcome) = go_mock(|mut conn| async move {
        for name in ["STOP", "SHUTDOWN", "RESET"] {
            let line = format!("{{\"event\":\"{name}\",\"data\":null,\"timestamp\":null}}\n");
            conn.send_raw(line.as_bytes()).await.map_err(|e| e.to_string())?;
        }
        until_hang_up(conn).await
    })
    .await;
    let client = within(10, Client::connect(server.path())).await.unwrap();
    let mut events = client.events();
    for want in ["STOP", "SHUTDOWN", "RESET"] {
        let ev = within(10, events.next()).await.unwrap();
        assert_eq!(ev.name(), want);
        assert_eq!(ev.data(), &Value::Null);
        // No timestamp: the one QEMU sends when its clock failed.
        assert_eq!(ev.timestamp().seconds, -1);
    }
    client.disconnect();
    within(10, outcome.recv()).await.unwrap().unwrap();
}

/// Ports `TestListenEmptyStream`: a stream that ends without a message ends
/// the event stream, and leaves no request waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_listen_empty_stream() {
    let (server, mut outcome) = go_mock(|conn| async move {
        drop(conn);
        Ok(())
    })
    .await;
    let client = within(10, Client::connect(server.path())).await.unwrap();
    let mut events = client.events();
    assert!(
        within(10, events.next()).await.is_none(),
        "the event stream ended"
    );
    assert!(within(10, client.closed()).await.is_disconnected());
    let err = client.execute_raw("query-status", Value::Null).await.unwrap_err();
    assert!(err.is_disconnected(), "{err:?}");
    within(10, outcome.recv()).await.unwrap().unwrap();
}

/// Ports `TestListenScannerErr`: a read error, not an end of stream, is
/// handed to the request waiting for a reply. The server closes with the
/// client's request still unread, which makes the client's next read fail
/// with ECONNRESET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_listen_scanner_err() {
    let (server, mut outcome) = go_mock(|conn| async move {
        let stream = conn.into_inner();
        // Wait until the request is in our receive buffer (peeking, so that
        // it stays there), then close without reading it.
        loop {
            stream.readable().await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
                rustix::net::recv(&stream, &mut byte, rustix::net::RecvFlags::PEEK).map_err(Into::into)
            });
            match peeked {
                Ok((0, _)) => return Err("the client hung up first".into()),
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        drop(stream);
        Ok(())
    })
    .await;
    let client = within(10, Client::connect(server.path())).await.unwrap();
    let err = within(10, client.execute_raw("query-status", Value::Null))
        .await
        .unwrap_err();
    match &err {
        Error::Disconnected { reason: Some(r) } => {
            assert!(r.contains("socket error") && r.contains("reset"), "{r}")
        }
        other => panic!("expected the read error, got {other:?}"),
    }
    within(10, outcome.recv()).await.unwrap().unwrap();
}

/// Ports `TestListenInvalidJson`: bytes that are not JSON are skipped; they
/// answer no request and are no event, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_listen_invalid_json() {
    let (server, mut outcome) = go_mock(|mut conn| async move {
        let req = conn
            .recv()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no request")?;
        conn.send_raw(b"<html>\n").await.map_err(|e| e.to_string())?;
        conn.reply(&req, json!({"after": "html"}))
            .await
            .map_err(|e| e.to_string())?;
        until_hang_up(conn).await
    })
    .await;
    let client = within(10, Client::connect(server.path())).await.unwrap();
    let mut events = client.events();
    let reply = within(10, client.execute_raw("query-status", Value::Null))
        .await
        .unwrap();
    assert_eq!(reply, json!({"after": "html"}));
    client.disconnect();
    assert!(within(10, events.next()).await.is_none(), "no event came of it");
    within(10, outcome.recv()).await.unwrap().unwrap();
}

/// Ports `TestListenStreamResponse`: a response is handed to the request
/// with its id, bytes intact. Go hands over the raw line, whatever its
/// members; ours decodes it, so a response with neither `return` nor
/// `error` is the waiting caller's decode error, which quotes the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_listen_stream_response() {
    let (server, mut outcome) = go_mock(|mut conn| async move {
        let req = conn
            .recv()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no request")?;
        let id = req.id.clone().ok_or("a request without an id")?;
        let line = format!("{{\"foo\": \"bar\", \"id\": {id}}}\n");
        conn.send_raw(line.as_bytes()).await.map_err(|e| e.to_string())?;
        // The connection is fine afterwards.
        let req = conn
            .recv()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no request")?;
        conn.reply(&req, json!({})).await.map_err(|e| e.to_string())?;
        until_hang_up(conn).await
    })
    .await;
    let client = within(10, Client::connect(server.path())).await.unwrap();
    let next = client.next_id() + 1;
    let err = within(10, client.execute_raw("foo", Value::Null))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    let want = format!("{{\"foo\": \"bar\", \"id\": {next}}}");
    assert!(err.to_string().contains(&want), "{err} lacks {want}");
    within(10, client.execute_raw("after", Value::Null))
        .await
        .unwrap();
    client.disconnect();
    within(10, outcome.recv()).await.unwrap().unwrap();
}

/// Ports `TestListenEventNoListeners`: an event nobody listens for is
/// dropped, holds nothing up, and the stream still ends. (Events that come
/// before the first subscriber are kept for it: QEMU may send some right
/// after the handshake. So "nobody" here is after a subscriber has left.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_listen_event_no_listeners() {
    let (server, mut outcome) = go_mock(|mut conn| async move {
        let req = conn
            .recv()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no request")?;
        conn.send_raw(b"{\"event\":\"STOP\"}\n")
            .await
            .map_err(|e| e.to_string())?;
        conn.reply(&req, json!({})).await.map_err(|e| e.to_string())?;
        Ok(())
    })
    .await;
    let client = within(10, Client::connect(server.path())).await.unwrap();
    drop(client.events());
    // The event comes before the reply, so it has been handed out (to
    // nobody) when the call returns.
    within(10, client.execute_raw("poke", Value::Null)).await.unwrap();
    let mut late = client.events();
    within(10, client.closed()).await;
    assert!(within(10, late.next()).await.is_none(), "the STOP was dropped");
    within(10, outcome.recv()).await.unwrap().unwrap();
}

/// Ports `TestListenEventOneListener`: one listener gets the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_listen_event_one_listener() {
    let (server, mut outcome) = go_mock(|mut conn| async move {
        conn.send_raw(b"{\"event\":\"STOP\"}\n")
            .await
            .map_err(|e| e.to_string())?;
        until_hang_up(conn).await
    })
    .await;
    let client = within(10, Client::connect(server.path())).await.unwrap();
    let mut events = client.subscribe(EventFilter::all());
    assert_eq!(within(10, events.next()).await.unwrap().name(), "STOP");
    client.disconnect();
    within(10, outcome.recv()).await.unwrap().unwrap();
}

/// A fake that answers every request as QEMU's happy path does, from the
/// same greeting as Go's fake, and can be told to send STOP events.
async fn happy_go_mock(stops_per_cont: usize) -> FakeServer {
    let (server, _) = go_mock(move |mut conn| async move {
        while let Some(req) = conn.recv().await.map_err(|e| e.to_string())? {
            if req.name.as_deref() == Some("cont") {
                for _ in 0..stops_per_cont {
                    conn.send_raw(b"{\"event\":\"STOP\"}\r\n")
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            conn.reply(&req, json!({})).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    })
    .await;
    server
}

/// Ports `TestNewQmpLog`: a log is created, private to its owner, and
/// closed without error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_new_qmp_log() {
    let server = happy_go_mock(0).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("test_new_qmp_log_qmp.log");
    let client = within(10, ConnectOptions::new().traffic_log(&log).connect(server.path()))
        .await
        .unwrap();
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    client.disconnect();
    within(10, client.closed()).await;
}

/// Ports `TestQmpLogWrite`: a command and its reply are in the log. The
/// command goes out with id 26, as in Go's test, so the lines carry Go's
/// very strings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_qmp_log_write() {
    let server = happy_go_mock(0).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("test_qmp_log_write_qmp.log");
    let client = within(10, ConnectOptions::new().traffic_log(&log).connect(server.path()))
        .await
        .unwrap();
    while client.next_id() < 25 {}
    within(10, client.execute_raw("cont", Value::Null)).await.unwrap();
    let command = r#"{"execute":"cont","id":26}"#;
    let reply = r#"{"return": {}, "id": 26}"#;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&format!("] QUERY: {command}\n")), "{text}");
    assert!(text.contains(&format!("] REPLY: {reply}\n\n")), "{text}");
    client.disconnect();
    within(10, client.closed()).await;
}

/// Ports `TestQmpLogClose`: a command, its reply and ten events logged at
/// the same time all reach the log whole, and closing it loses none. Ours
/// closes the log with the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_qmp_log_close() {
    let server = happy_go_mock(10).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("test_qmp_log_close_qmp.log");
    let client = within(10, ConnectOptions::new().traffic_log(&log).connect(server.path()))
        .await
        .unwrap();
    // Commands from several tasks while the server sends the events.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.execute_raw("query-status", Value::Null).await })
        })
        .collect();
    within(10, client.execute_raw("cont", Value::Null)).await.unwrap();
    for t in tasks {
        within(10, t).await.unwrap().unwrap();
    }
    client.disconnect();
    within(10, client.closed()).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.iter().all(|l| l.starts_with('[')), "a torn line: {text}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("] Event: {\"event\":\"STOP\"}"))
            .count(),
        10,
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("] QUERY: {\"execute\":\"cont\",")),
        "{text}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("] REPLY: ")).count(),
        5,
        "{text}"
    );
}
