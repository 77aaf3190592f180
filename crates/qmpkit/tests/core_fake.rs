//! The protocol core against a scripted fake server, for what QEMU will not
//! do on demand: odd framing, out-of-order replies, garbage, oversized
//! messages, silence.

mod common;

use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::within;
use qmpkit::{CallOptions, Client, ConnectOptions, Error};
use qmpkit_fake::{FakeConn, FakeServer};
use serde_json::{json, Value};

async fn server<F, Fut>(script: F) -> FakeServer
where
    F: Fn(FakeConn) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    FakeServer::start(script).await.expect("start fake server")
}

/// Answers every request with its own name, so a caller can tell whose reply it got.
async fn echo_names(mut conn: FakeConn) {
    while let Ok(Some(req)) = conn.recv().await {
        let name = req.name.clone().unwrap_or_default();
        if conn.reply(&req, json!({ "name": name })).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_the_same_write_as_the_handshake_reply_are_kept() {
    let srv = server(|mut conn| async move {
        conn.greet().await.unwrap();
        let _caps = conn.recv().await.unwrap().unwrap();
        conn.send_raw(
            b"{\"return\": {}}\r\n{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n\
              {\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 3, \"microseconds\": 4}}\r\n",
        )
        .await
        .unwrap();
        echo_names(conn).await;
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    // Subscribing after connect returned still sees them.
    let mut events = client.events();
    let a = within(5, events.next()).await.unwrap();
    let b = within(5, events.next()).await.unwrap();
    assert_eq!((a.name(), b.name()), ("STOP", "RESUME"));
    assert_eq!(a.timestamp().seconds, 1);
    assert_eq!(b.timestamp().microseconds, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_out_of_order_reach_their_own_callers() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        let mut reqs = Vec::new();
        for _ in 0..3 {
            reqs.push(conn.recv().await.unwrap().unwrap());
        }
        for req in reqs.iter().rev() {
            let name = req.name.clone().unwrap();
            conn.reply(req, json!({ "name": name })).await.unwrap();
        }
        echo_names(conn).await;
    })
    .await;
    // QEMU answers in-band commands in order; a server that does not must say so.
    let client = ConnectOptions::new()
        .replies_in_order(false)
        .connect(srv.path())
        .await
        .unwrap();
    let (a, b, c) = within(5, async {
        tokio::join!(
            client.execute_raw("cmd-a", Value::Null),
            client.execute_raw("cmd-b", Value::Null),
            client.execute_raw("cmd-c", Value::Null)
        )
    })
    .await;
    assert_eq!(a.unwrap()["name"], "cmd-a");
    assert_eq!(b.unwrap()["name"], "cmd-b");
    assert_eq!(c.unwrap()["name"], "cmd-c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_split_byte_by_byte_and_pretty_printed() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            let name = req.name.clone().unwrap();
            let reply = json!({"return": {"name": name, "nested": {"s": "a } { \" b"}}, "id": req.id});
            let text = if name == "pretty" {
                serde_json::to_string_pretty(&reply).unwrap() + "\n"
            } else {
                reply.to_string() + "\r\n"
            };
            let event = b"{\"event\": \"X\", \"data\": {\"k\": \"}\"}, \"timestamp\": {\"seconds\": 0, \"microseconds\": 0}}";
            for b in event.iter().chain(text.as_bytes()) {
                if conn.send_raw(&[*b]).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let mut events = client.events();
    for name in ["plain", "pretty", "plain"] {
        let r = within(10, client.execute_raw(name, Value::Null)).await.unwrap();
        assert_eq!(r["name"], name);
        assert_eq!(r["nested"]["s"], "a } { \" b");
    }
    for _ in 0..3 {
        let e = within(5, events.next()).await.unwrap();
        assert_eq!(e.data()["k"], "}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idless_error_reaches_the_only_command_in_flight() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        let _req = conn.recv().await.unwrap().unwrap();
        conn.send_raw(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, invalid keyword\"}}\r\n")
            .await
            .unwrap();
        echo_names(conn).await;
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let err = within(5, client.execute_raw("first", Value::Null))
        .await
        .unwrap_err();
    match &err {
        Error::Qmp(e) => {
            assert_eq!(e.class.as_str(), "GenericError");
            assert!(e.desc.contains("parse error"));
            assert_eq!(e.command, "first");
        }
        other => panic!("expected a QMP error, got {other:?}"),
    }
    // The connection is fine afterwards.
    assert_eq!(
        client.execute_raw("second", Value::Null).await.unwrap()["name"],
        "second"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_idless_error_hangs_nobody() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        let a = conn.recv().await.unwrap().unwrap();
        let b = conn.recv().await.unwrap().unwrap();
        // With OOB negotiated and two in flight, nobody can tell whose it is.
        conn.send_raw(
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input must be a JSON object\"}}\r\n",
        )
        .await
        .unwrap();
        conn.reply(&b, json!({"name": b.name})).await.unwrap();
        conn.reply(&a, json!({"name": a.name})).await.unwrap();
        echo_names(conn).await;
    })
    .await;
    let client = ConnectOptions::new()
        .replies_in_order(false)
        .connect(srv.path())
        .await
        .unwrap();
    assert!(client.oob_enabled());
    let (a, b) = within(5, async {
        tokio::join!(
            client.execute_raw("a", Value::Null),
            client.execute_raw("b", Value::Null)
        )
    })
    .await;
    assert_eq!(a.unwrap()["name"], "a");
    assert_eq!(b.unwrap()["name"], "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_unparseable_messages_are_skipped() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            conn.send_raw(b"garbage\x01\x02 ]] {\"return\": tru}\r\n{\"neither\": 1}\r\n")
                .await
                .unwrap();
            conn.reply(&req, json!({"ok": true})).await.unwrap();
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    for _ in 0..3 {
        let r = within(5, client.execute_raw("x", Value::Null)).await.unwrap();
        assert_eq!(r["ok"], true);
    }
    assert!(!client.is_closed());
}

/// A reply shaped like QEMU's (`return` first, numeric `id` last) goes to its
/// caller without being parsed first; if it is not valid JSON inside, that
/// caller gets a decode error at once (not a timeout) and nothing else is hurt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_reply_fails_its_own_command_with_a_decode_error() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        let mut first = true;
        while let Ok(Some(req)) = conn.recv().await {
            if std::mem::take(&mut first) {
                let id = req.id.clone().unwrap();
                conn.send_raw(format!("{{\"return\": {{\"a\": tru}}, \"id\": {id}}}\r\n").as_bytes())
                    .await
                    .unwrap();
            } else {
                conn.reply(&req, json!({"ok": true})).await.unwrap();
            }
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let err = within(5, client.execute_raw("x", Value::Null)).await.unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    assert!(err.to_string().contains("reply to x:"), "{err}");
    let r = within(5, client.execute_raw("y", Value::Null)).await.unwrap();
    assert_eq!(r["ok"], true);
    assert!(!client.is_closed());
}

/// A reply that starts like a plain one and ends with a numeric id, but has
/// other members between (valid JSON, though QEMU never writes it): the
/// typed decode, which reads the `return` value alone, must not fail on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_members_between_return_and_id_still_decode() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            let id = req.id.clone().unwrap();
            let reply = match req.name.as_deref().unwrap_or("") {
                "query-status" => format!(
                    "{{\"return\": {{\"status\": \"paused\", \"running\": false, \"singlestep\": false}}, \"x\": [1, {{\"id\": 2}}], \"id\": {id}}}\r\n"
                ),
                _ => format!("{{\"return\": 7 , \"y\": \"}}\", \"id\": {id}}}\r\n"),
            };
            conn.send_raw(reply.as_bytes()).await.unwrap();
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let status = within(5, client.status()).await.unwrap();
    assert_eq!(status, qmpkit::commands::vm::RunState::Paused);
    let n: u64 = within(5, client.call("n", &())).await.unwrap();
    assert_eq!(n, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_reply_fails_its_command_only() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            let ret = if req.name.as_deref() == Some("big") {
                json!("x".repeat(1 << 20))
            } else {
                json!({"ok": true})
            };
            conn.reply(&req, ret).await.unwrap();
        }
    })
    .await;
    let client = ConnectOptions::new()
        .max_message_size(64 * 1024)
        .connect(srv.path())
        .await
        .unwrap();
    let (big, small) = within(10, async {
        tokio::join!(
            client.execute_raw("big", Value::Null),
            client.execute_raw("small", Value::Null)
        )
    })
    .await;
    match big.unwrap_err() {
        Error::MessageTooLarge { size, limit } => {
            assert!(size > 1 << 20, "{size}");
            assert_eq!(limit, 64 * 1024);
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    assert_eq!(small.unwrap()["ok"], true);
    assert_eq!(
        client.execute_raw("after", Value::Null).await.unwrap()["ok"],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_greets_times_out_the_handshake() {
    let srv = server(|conn| async move {
        // Hold the connection open without a word, like QEMU with another client.
        let _stream = conn.into_inner();
        std::future::pending::<()>().await;
    })
    .await;
    let err = within(
        5,
        ConnectOptions::new()
            .handshake_timeout(Duration::from_millis(200))
            .connect(srv.path()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::HandshakeTimeout { .. }), "{err:?}");
    assert!(err.to_string().contains("another client"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_reading_gives_timeouts_not_a_dead_connection() {
    let release = Arc::new(tokio::sync::Notify::new());
    let release2 = release.clone();
    let received = Arc::new(AtomicUsize::new(0));
    let received2 = received.clone();
    let srv = server(move |mut conn| {
        let release = release2.clone();
        let received = received2.clone();
        async move {
            conn.handshake().await.unwrap();
            release.notified().await;
            while let Ok(Some(req)) = conn.recv().await {
                received.fetch_add(1, Ordering::SeqCst);
                let name = req.name.clone();
                conn.reply(&req, json!({ "name": name })).await.unwrap();
            }
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    // Far larger than the socket buffers: the write cannot finish.
    let huge = json!({ "blob": "y".repeat(8 << 20) });
    let opts = || CallOptions::new().timeout(Duration::from_millis(300));
    let err = within(5, client.call_with::<_, Value>("huge", &huge, opts()))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    // A command queued behind the stalled write times out too, and is never sent.
    let err = within(5, client.call_with::<_, Value>("queued", &json!({}), opts()))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(!client.is_closed(), "slow is not dead");
    // Once the server reads again, the half-written command completes and later ones work.
    release.notify_one();
    let r = within(10, client.execute_raw("after", Value::Null))
        .await
        .unwrap();
    assert_eq!(r["name"], "after");
    // "huge" reached the server (it was partly written), "queued" never did.
    assert_eq!(received.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_reply_arriving_late_is_dropped_by_id() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        let slow = conn.recv().await.unwrap().unwrap();
        let next = conn.recv().await.unwrap().unwrap();
        conn.reply(&slow, json!({"name": "slow"})).await.unwrap();
        conn.reply(&next, json!({"name": "next"})).await.unwrap();
        echo_names(conn).await;
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let err = client
        .call_with::<_, Value>(
            "slow",
            &(),
            CallOptions::new().timeout(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { command, budget } if command == "slow" && *budget == Duration::from_millis(100))
    );
    let r = within(5, client.execute_raw("next", Value::Null)).await.unwrap();
    assert_eq!(
        r["name"], "next",
        "a later command must never get an earlier command's reply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_oob_at_most_eight_in_band_commands_are_outstanding() {
    let max_seen = Arc::new(AtomicUsize::new(0));
    let max2 = max_seen.clone();
    let srv = server(move |mut conn| {
        let max_seen = max2.clone();
        async move {
            conn.handshake().await.unwrap();
            let mut outstanding = Vec::new();
            loop {
                // Take every request that arrives within a short window, then
                // answer one: the client must never have more than 8 out.
                match tokio::time::timeout(Duration::from_millis(50), conn.recv()).await {
                    Ok(Ok(Some(req))) => {
                        outstanding.push(req);
                        max_seen.fetch_max(outstanding.len(), Ordering::SeqCst);
                    }
                    Ok(_) => return,
                    Err(_) if outstanding.is_empty() => {}
                    Err(_) => {
                        let req = outstanding.remove(0);
                        let name = req.name.clone();
                        conn.reply(&req, json!({ "name": name })).await.unwrap();
                    }
                }
            }
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { c.execute_raw(&format!("c{i}"), Value::Null).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let r = within(30, call).await.unwrap().unwrap();
        assert_eq!(r["name"], format!("c{i}"));
    }
    assert_eq!(max_seen.load(Ordering::SeqCst), 8);
}

fn file_with(content: &str) -> OwnedFd {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(content.as_bytes()).unwrap();
    f.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fd_travels_with_its_own_command() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            // Report what arrived with this very request.
            let contents: Vec<String> = req
                .fds
                .into_iter()
                .map(|fd| {
                    let mut f = std::fs::File::from(fd);
                    f.rewind().unwrap();
                    let mut s = String::new();
                    f.read_to_string(&mut s).unwrap();
                    s
                })
                .collect();
            let ret = json!({ "name": req.name, "fds": contents });
            let reply = json!({"return": ret, "id": req.id});
            conn.send(&reply).await.unwrap();
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let calls: Vec<_> = (0..30)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                let opts = if i % 3 == 0 {
                    CallOptions::new()
                } else {
                    CallOptions::new().fds([file_with(&format!("file-{i}"))])
                };
                (
                    i,
                    c.call_with::<_, Value>(&format!("cmd{i}"), &json!({}), opts)
                        .await,
                )
            })
        })
        .collect();
    for call in calls {
        let (i, r) = within(10, call).await.unwrap();
        let r = r.unwrap();
        assert_eq!(r["name"], format!("cmd{i}"));
        let expected: Vec<String> = if i % 3 == 0 {
            vec![]
        } else {
            vec![format!("file-{i}")]
        };
        assert_eq!(r["fds"], json!(expected), "command {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_fails_everything_in_flight_at_once() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        for _ in 0..4 {
            conn.recv().await.unwrap().unwrap();
        }
        // Die with four commands unanswered.
        drop(conn);
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let mut events = client.events();
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { c.execute_raw(&format!("c{i}"), Value::Null).await })
        })
        .collect();
    for call in calls {
        let err = within(5, call).await.unwrap().unwrap_err();
        assert!(err.is_disconnected(), "{err:?}");
    }
    let reason = within(5, client.closed()).await;
    assert!(reason.to_string().contains("closed the connection"), "{reason}");
    assert!(client.is_closed());
    // Later calls fail at once; event streams end.
    let err = client.execute_raw("later", Value::Null).await.unwrap_err();
    assert!(err.is_disconnected());
    // The typed operations too (they send when called, and carry the refusal).
    let err = client.status().await.unwrap_err();
    assert!(err.is_disconnected(), "{err:?}");
    assert!(within(5, events.next()).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_disconnect_and_invalid_requests() {
    let srv = FakeServer::instant().await.unwrap();
    let client = Client::connect(srv.path()).await.unwrap();
    // Invalid raw requests are refused before anything is sent.
    for bad in [
        "not json",
        "[1, 2]",
        "{\"arguments\": {}}",
        "{\"execute\": \"x\", \"bogus\": 1}",
    ] {
        let err = client.execute_json(bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidRequest(_)), "{bad}: {err:?}");
    }
    let err = client.call::<_, Value>("x", &[1, 2, 3]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
    // A valid one, with a user id that is replaced by the client's own.
    let r = client
        .execute_json(r#"{"execute": "query-status", "id": "mine"}"#)
        .await
        .unwrap();
    assert_eq!(r["status"], "running");
    client.disconnect();
    let reason = within(5, client.closed()).await;
    assert!(reason.to_string().contains("disconnect requested"), "{reason}");
    assert!(client
        .execute_raw("query-status", Value::Null)
        .await
        .unwrap_err()
        .is_disconnected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.sock");
    let err = Client::connect(&missing).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.sock"), "{err}");
    // A regular file, not a socket.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = Client::connect(&file).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    // A server that closes at once.
    let srv = server(|conn| async move { drop(conn) }).await;
    let err = Client::connect(srv.path()).await.unwrap_err();
    assert!(matches!(err, Error::Handshake(_)), "{err:?}");
    // A server that greets with nonsense.
    let srv = server(|mut conn| async move {
        conn.send_raw(b"{\"hello\": 1}\r\n").await.unwrap();
        let _ = conn.recv().await;
    })
    .await;
    let err = Client::connect(srv.path()).await.unwrap_err();
    assert!(err.to_string().contains("greeting"), "{err}");
    // A server that refuses capabilities.
    let srv = server(|mut conn| async move {
        conn.greet().await.unwrap();
        let req = conn.recv().await.unwrap().unwrap();
        conn.reply_error(&req, "GenericError", "no").await.unwrap();
        let _ = conn.recv().await;
    })
    .await;
    let err = Client::connect(srv.path()).await.unwrap_err();
    assert!(err.to_string().contains("qmp_capabilities failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_never_stalls_replies() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            for _ in 0..100 {
                conn.event("TICK", Value::Null).await.unwrap();
            }
            conn.reply(&req, json!({"ok": true})).await.unwrap();
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    // Never read: its queue of 10 fills at once.
    let mut stuck = client.subscribe(qmpkit::EventFilter::all().capacity(10));
    for _ in 0..20 {
        within(5, client.execute_raw("x", Value::Null)).await.unwrap();
    }
    let mut got = 0;
    let mut missed = 0;
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(100), stuck.recv()).await {
        match item {
            qmpkit::EventItem::Event(_) => got += 1,
            qmpkit::EventItem::Missed(n) => missed += n,
        }
    }
    assert_eq!(got, 10);
    assert_eq!(stuck.missed(), 2000 - 10);
    assert!(missed <= 2000 - 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_never_delays_connects_to_others() {
    let frozen = server(|conn| async move {
        let _s = conn.into_inner();
        std::future::pending::<()>().await
    })
    .await;
    let healthy = FakeServer::instant().await.unwrap();
    let stuck = tokio::spawn({
        let path = frozen.path().to_owned();
        async move {
            ConnectOptions::new()
                .handshake_timeout(Duration::from_secs(30))
                .connect(path)
                .await
        }
    });
    // While that connect waits, fifty others complete and work.
    for _ in 0..50 {
        let c = within(5, Client::connect(healthy.path())).await.unwrap();
        assert_eq!(
            c.execute_raw("query-status", Value::Null).await.unwrap()["status"],
            "running"
        );
    }
    assert!(
        !stuck.is_finished(),
        "the frozen server's connect is still waiting"
    );
    stuck.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_server_sent_before_closing_is_delivered_even_if_a_write_fails() {
    for _ in 0..20 {
        let srv = server(|mut conn| async move {
            conn.handshake().await.unwrap();
            let _req = conn.recv().await.unwrap().unwrap();
            conn.event("SHUTDOWN", json!({"guest": false, "reason": "host-qmp-quit"}))
                .await
                .unwrap();
            // Close both directions at once, as QEMU does when it exits.
            drop(conn);
        })
        .await;
        let client = Client::connect(srv.path()).await.unwrap();
        let mut events = client.events();
        let first = client.execute_raw("quit", Value::Null).await;
        assert!(first.unwrap_err().is_disconnected());
        // Writing now may fail with EPIPE before the end of stream is read.
        let later = client.execute_raw("query-status", Value::Null).await;
        assert!(later.unwrap_err().is_disconnected());
        let e = within(5, events.next())
            .await
            .expect("the SHUTDOWN sent before closing");
        assert_eq!(e.name(), "SHUTDOWN");
        assert_eq!(client.shutdown_event().unwrap().data()["reason"], "host-qmp-quit");
    }
}

/// The write that fails because QEMU has exited comes before tokio has seen
/// what QEMU sent last: the drain that follows must read the socket itself
/// (tokio's readiness would still say "empty"), or the SHUTDOWN is lost.
/// One-thread runtime and a server on its own thread, so that the test
/// decides when the connection's task runs.
#[tokio::test]
async fn a_failed_write_still_drains_what_tokio_has_not_seen_yet() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (got_quit, wait_got_quit) = std::sync::mpsc::channel();
    let (go, wait_go) = std::sync::mpsc::channel::<()>();
    let (closed, wait_closed) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let (mut out, _) = listener.accept().unwrap();
        let mut lines = BufReader::new(out.try_clone().unwrap());
        let mut line = String::new();
        out.write_all(br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}"#)
            .unwrap();
        out.write_all(b"\r\n").unwrap();
        lines.read_line(&mut line).unwrap();
        out.write_all(b"{\"return\": {}}\r\n").unwrap();
        line.clear();
        lines.read_line(&mut line).unwrap();
        got_quit.send(()).unwrap();
        wait_go.recv().unwrap();
        out.write_all(b"{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n")
            .unwrap();
        drop(lines);
        drop(out);
        closed.send(()).unwrap();
    });
    let client = Client::connect(&path).await.unwrap();
    let mut events = client.events();
    let quit = {
        let client = client.clone();
        tokio::spawn(async move { client.execute_raw("quit", Value::Null).await })
    };
    // Let the connection write "quit"; nothing arrives while we wait.
    while wait_got_quit.try_recv().is_err() {
        tokio::task::yield_now().await;
    }
    // QEMU answers with its last event and exits while this thread (and so
    // the connection's task) is held here: tokio learns of it only later.
    go.send(()).unwrap();
    wait_closed.recv().unwrap();
    let later = client.execute_raw("query-status", Value::Null).await;
    assert!(later.unwrap_err().is_disconnected());
    assert!(within(5, quit).await.unwrap().unwrap_err().is_disconnected());
    let e = within(5, events.next())
        .await
        .expect("the SHUTDOWN sent before closing");
    assert_eq!(e.name(), "SHUTDOWN");
    server.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_flood_never_starves_commands() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        let (mut rd, mut wr) = conn.into_inner().into_split();
        // Events as fast as the socket takes them, forever.
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let burst = b"{\"event\": \"TICK\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\r\n"
                .repeat(1000);
            while wr.write_all(&burst).await.is_ok() {}
        });
        // Requests are read but never answered: the test only checks that
        // they are written, which the flood must not prevent.
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 4096];
        let mut seen = Vec::new();
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                return;
            }
            seen.extend_from_slice(&buf[..n]);
            if memchr_count(&seen) >= 3 {
                // Three requests arrived in spite of the flood.
                SAW_THREE.store(true, Ordering::SeqCst);
            }
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let _events = client.subscribe(qmpkit::EventFilter::all().capacity(16));
    for _ in 0..3 {
        let err = within(
            10,
            client.call_with::<_, Value>(
                "x",
                &json!({}),
                CallOptions::new().timeout(Duration::from_millis(200)),
            ),
        )
        .await
        .unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
    }
    common::eventually(10, || async { SAW_THREE.load(Ordering::SeqCst).then_some(()) }).await;
}

static SAW_THREE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn memchr_count(bytes: &[u8]) -> usize {
    bytes.windows(9).filter(|w| *w == b"\"execute\"").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_before_the_capabilities_reply_are_kept_in_order() {
    let srv = server(|mut conn| async move {
        conn.greet().await.unwrap();
        let caps = conn.recv().await.unwrap().unwrap();
        conn.event("FIRST", Value::Null).await.unwrap();
        conn.reply(&caps, json!({})).await.unwrap();
        conn.event("SECOND", Value::Null).await.unwrap();
        echo_names(conn).await;
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let mut events = client.events();
    assert_eq!(within(5, events.next()).await.unwrap().name(), "FIRST");
    assert_eq!(within(5, events.next()).await.unwrap().name(), "SECOND");
    assert_eq!(client.execute_raw("x", Value::Null).await.unwrap()["name"], "x");
}

/// Events in QEMU's layout take a fast path; every other valid shape must
/// arrive the same, with its name, data and timestamp intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_any_valid_layout_arrive_intact() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        let req = conn.recv().await.unwrap().unwrap();
        let ts = r#""timestamp": {"seconds": 7, "microseconds": 8}"#;
        for raw in [
            // QEMU's own layout, with and without data, compact or not.
            format!(r#"{{{ts}, "event": "A", "data": {{"x": "}}{{", "n": [1, 2]}}}}"#),
            format!(r#"{{{ts}, "event": "B"}}"#),
            r#"{"timestamp":{"seconds":7,"microseconds":8},"event":"C","data":null}"#.to_owned(),
            // Other orders and extra members: the general parse.
            format!(r#"{{"event": "D", "data": {{"x": 1}}, {ts}}}"#),
            format!(r#"{{{ts}, "event": "E", "data": {{"x": 1}}, "extra": true}}"#),
            format!(r#"{{{ts}, "event": "F\u0047"}}"#),
            format!("{{\n  {ts},\n  \"event\": \"H\",\n  \"data\": 5\n}}"),
        ] {
            conn.send_raw(format!("{raw}\r\n").as_bytes()).await.unwrap();
        }
        conn.reply(&req, json!({})).await.unwrap();
        while let Ok(Some(_)) = conn.recv().await {}
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let mut events = client.events();
    client.execute_raw("go", Value::Null).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..7 {
        let e = within(5, events.next()).await.unwrap();
        assert_eq!(
            (e.timestamp().seconds, e.timestamp().microseconds),
            (7, 8),
            "{}",
            e.name()
        );
        got.push((e.name().to_owned(), e.data().clone()));
    }
    assert_eq!(
        got,
        [
            ("A".to_owned(), json!({"x": "}{", "n": [1, 2]})),
            ("B".to_owned(), Value::Null),
            ("C".to_owned(), Value::Null),
            ("D".to_owned(), json!({"x": 1})),
            ("E".to_owned(), json!({"x": 1})),
            ("FG".to_owned(), Value::Null),
            ("H".to_owned(), json!(5)),
        ]
    );
}

/// The connection keeps one timer for all its deadlines; a short budget
/// issued after long ones still ends on time, each caller gets its own
/// budget back, and the long ones keep waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_deadlines_behind_long_ones_end_on_time_and_alone() {
    // The server never answers "slow".
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            if req.name.as_deref() != Some("slow") {
                conn.reply(&req, json!({})).await.unwrap();
            }
        }
    })
    .await;
    // The server answers "fast" and never "slow", which QEMU (answering in
    // order) would not do: it has to say so.
    let client = ConnectOptions::new()
        .command_timeout(Duration::from_secs(60))
        .replies_in_order(false)
        .connect(srv.path())
        .await
        .unwrap();
    let long = {
        let client = client.clone();
        tokio::spawn(async move { client.execute_raw("slow", Value::Null).await })
    };
    // Make sure the long one reached the connection first.
    within(5, client.execute_raw("fast", Value::Null)).await.unwrap();
    let started = std::time::Instant::now();
    let budgets = [300u64, 100, 200];
    let short = budgets.map(|ms| {
        let client = client.clone();
        tokio::spawn(async move {
            let opts = CallOptions::new().timeout(Duration::from_millis(ms));
            let err = client
                .call_with::<_, Value>("slow", &json!({}), opts)
                .await
                .unwrap_err();
            (ms, err)
        })
    });
    for task in short {
        let (ms, err) = within(10, task).await.unwrap();
        match err {
            Error::Timeout { command, budget } => {
                assert_eq!(command, "slow");
                assert_eq!(budget, Duration::from_millis(ms));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "no caller gave up early"
    );
    assert!(
        !long.is_finished(),
        "the 60 s command was timed out with the short ones"
    );
    within(5, client.execute_raw("fast", Value::Null)).await.unwrap();
    client.disconnect();
    assert!(matches!(
        within(5, long).await.unwrap(),
        Err(Error::Disconnected { .. })
    ));
}

/// Hundreds of requests reaching the connection at once use up tokio's
/// per-poll budget before the deadline timer is first polled; the timer must
/// still be armed, and every one of them must time out.
#[tokio::test]
async fn a_burst_that_exhausts_the_poll_budget_still_times_out() {
    // The server reads everything and answers nothing.
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(_)) = conn.recv().await {}
    })
    .await;
    let client = ConnectOptions::new()
        .command_timeout(Duration::from_millis(200))
        .connect(srv.path())
        .await
        .unwrap();
    // On this one-thread runtime all 400 callers queue their request before
    // the connection's task runs again.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..400 {
        let client = client.clone();
        calls.spawn(async move { client.execute_raw("slow", Value::Null).await });
    }
    let mut timed_out = 0;
    while let Some(result) = within(10, calls.join_next()).await {
        match result.unwrap() {
            Err(Error::Timeout { .. }) => timed_out += 1,
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    assert_eq!(timed_out, 400);
    assert!(!client.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_are_set_per_command_name_and_per_call() {
    // The server answers everything but "slow", which it never answers.
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            if req.name.as_deref() != Some("slow") {
                let name = req.name.clone();
                conn.reply(&req, json!({ "name": name })).await.unwrap();
            }
        }
    })
    .await;
    let client = ConnectOptions::new()
        .command_timeout(Duration::from_secs(30))
        .timeout_for("slow", Duration::from_millis(150))
        .connect(srv.path())
        .await
        .unwrap();
    match within(5, client.execute_raw("slow", Value::Null)).await {
        Err(Error::Timeout { command, budget }) => {
            assert_eq!(command, "slow");
            assert_eq!(budget, Duration::from_millis(150), "the per-name budget applies");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    // A per-call budget overrides the per-name one.
    let opts = CallOptions::new().timeout(Duration::from_millis(50));
    match within(5, client.call_with::<_, Value>("slow", &json!({}), opts)).await {
        Err(Error::Timeout { budget, .. }) => assert_eq!(budget, Duration::from_millis(50)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Other commands are unaffected, and the connection is up.
    assert_eq!(
        client.execute_raw("fast", Value::Null).await.unwrap()["name"],
        "fast"
    );
    assert!(!client.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traffic_log_that_cannot_be_written_never_fails_a_command() {
    let srv = FakeServer::instant().await.unwrap();
    // Every write to /dev/full fails with ENOSPC, as on a full disk.
    let client = ConnectOptions::new()
        .traffic_log("/dev/full")
        .connect(srv.path())
        .await
        .unwrap();
    for _ in 0..10 {
        let r = client.execute_raw("query-status", Value::Null).await.unwrap();
        assert_eq!(r["status"], "running");
    }
}

/// Go leaves the agent port's VSERPORT_CHANGE events out of its log (a guest
/// opens and closes the port often); QEMU sends them only for a guest, so the
/// fake sends one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traffic_log_leaves_out_vserport_change_as_go_does() {
    let srv = server(|mut conn: FakeConn| async move {
        if conn.handshake().await.is_err() {
            return;
        }
        while let Ok(Some(req)) = conn.recv().await {
            let r = conn
                .event("VSERPORT_CHANGE", json!({"id": "channel0", "open": true}))
                .await;
            let r = r.and(conn.event("STOP", Value::Null).await);
            if r.and(conn.reply(&req, json!({})).await).is_err() {
                return;
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("qmp.log");
    let client = ConnectOptions::new()
        .traffic_log(&log)
        .connect(srv.path())
        .await
        .unwrap();
    let mut events = client.events();
    client.execute_raw("poke", Value::Null).await.unwrap();
    assert_eq!(within(10, events.next()).await.unwrap().name(), "VSERPORT_CHANGE");
    client.disconnect();
    within(10, client.closed()).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("] Event: {\"event\": \"STOP\""), "{text}");
    assert!(!text.contains("VSERPORT_CHANGE"), "{text}");
}

/// Callers cancelled at every moment (before their request is written,
/// while it is in flight, as its reply arrives) on two worker threads: the
/// others still get their own replies, nobody hangs, and the connection
/// works afterwards. Races the caller's end of a call against the task's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_cancelled_at_random_moments_leave_the_rest_answered() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        echo_names(conn).await;
    })
    .await;
    let client = ConnectOptions::new().connect(srv.path()).await.unwrap();
    // A fixed pseudo-random sequence, so that a failure repeats.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut tasks = Vec::new();
    for i in 0..600u64 {
        let client = client.clone();
        // A third never cancel, a third cancel as soon as they have sent,
        // a third after up to 400 µs.
        let cancel_after = match i % 3 {
            0 => None,
            1 => Some(Duration::ZERO),
            _ => Some(Duration::from_micros(next() % 400)),
        };
        tasks.push(tokio::spawn(async move {
            let name = format!("cmd-{i}");
            let call = client.execute_raw(&name, Value::Null);
            let got = match cancel_after {
                None => Some(call.await),
                Some(after) => tokio::time::timeout(after, call).await.ok(),
            };
            (i, name, got)
        }));
    }
    let (mut answered, mut cancelled) = (0, 0);
    for task in tasks {
        let (i, name, got) = within(20, task).await.unwrap();
        match got {
            Some(reply) => {
                assert_eq!(
                    reply.unwrap()["name"],
                    name.as_str(),
                    "call {i} got another's reply"
                );
                answered += 1;
            }
            None => {
                assert_ne!(i % 3, 0, "call {i} had no deadline");
                cancelled += 1;
            }
        }
    }
    assert!(
        answered >= 200 && cancelled >= 200,
        "{answered} answered, {cancelled} cancelled"
    );
    // What the cancellations left behind holds nothing up.
    for i in 0..20 {
        let name = format!("after-{i}");
        let reply = within(5, client.execute_raw(&name, Value::Null)).await.unwrap();
        assert_eq!(reply["name"], name.as_str());
    }
    assert!(!client.is_closed());
}
