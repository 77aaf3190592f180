//! One test per way a server once wedged the client (issue #11): a corrupt
//! message, lost replies with and without `oob` and with fds, too many fds,
//! malformed replies. The fuzz test (`fault_injection.rs`) covers the same
//! ground at random; these pin each case down.

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use common::within;
use qmpkit::{CallOptions, Client, ConnectOptions, Error, MAX_FDS_PER_CALL};
use qmpkit_fake::{FakeConn, FakeServer, Request};
use serde_json::{json, Value};

async fn server<F, Fut>(script: F) -> FakeServer
where
    F: Fn(FakeConn) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    FakeServer::start(script).await.expect("start fake server")
}

/// The greeting without the `oob` capability.
async fn handshake_without_oob(conn: &mut FakeConn) {
    let greeting = String::from_utf8_lossy(qmpkit_fake::GREETING).replace("[\"oob\"]", "[]");
    conn.send_raw(greeting.as_bytes()).await.unwrap();
    let caps = conn.recv().await.unwrap().unwrap();
    conn.reply(&caps, json!({})).await.unwrap();
}

fn id_of(req: &Request) -> String {
    req.id.as_ref().map(Value::to_string).unwrap_or_default()
}

fn dev_null() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

/// Answers with the request's name and how many fds came with it.
async fn echo(conn: &mut FakeConn, req: &Request) -> std::io::Result<()> {
    let name = req.name.clone().unwrap_or_default();
    conn.reply(req, json!({"name": name, "fds": req.fds.len()})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_corrupt_message_does_not_silence_the_connection() {
    for corrupt in ["x{y", "junk{\"", "{\"return\": \"abc", "\"{"] {
        for limit in [qmpkit::DEFAULT_MAX_MESSAGE_SIZE, 64 * 1024] {
            // The first request's reply is destroyed: the server sends the
            // corrupt bytes instead, then answers everything else.
            let srv = server(move |mut conn| async move {
                conn.handshake().await.unwrap();
                let victim = conn.recv().await.unwrap().unwrap();
                assert_eq!(victim.name.as_deref(), Some("victim"));
                conn.send_raw(format!("{corrupt}\r\n").as_bytes()).await.unwrap();
                conn.event("VICTIM_READ", Value::Null).await.unwrap();
                while let Ok(Some(req)) = conn.recv().await {
                    if echo(&mut conn, &req).await.is_err() {
                        return;
                    }
                }
            })
            .await;
            let client = ConnectOptions::new()
                .max_message_size(limit)
                .connect(srv.path())
                .await
                .unwrap();
            let mut events = client.events();
            let victim = {
                let client = client.clone();
                tokio::spawn(async move { client.call::<_, Value>("victim", &()).await })
            };
            // The victim is written first (QEMU answers in order): the
            // server says when it has read it.
            within(5, events.next()).await.unwrap();
            let later: Vec<Value> = within(10, async {
                let calls = (0..200).map(|i| {
                    let client = client.clone();
                    async move { client.call::<_, Value>(&format!("later-{i}"), &()).await }
                });
                futures_join_all(calls).await
            })
            .await
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{corrupt:?}: a later call failed: {e}")))
            .collect();
            for (i, v) in later.iter().enumerate() {
                assert_eq!(v["name"], format!("later-{i}"), "{corrupt:?}");
            }
            // The victim's reply was destroyed: it fails alone, at once
            // (the first later reply proves it lost), not after 30 s.
            let err = within(5, victim).await.unwrap().unwrap_err();
            assert!(
                matches!(err, Error::ReplyLost { ref command } if command == "victim"),
                "{corrupt:?}: {err:?}"
            );
            assert!(!client.is_closed());
        }
    }
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_oob_eight_lost_replies_do_not_block_later_commands() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            let name = req.name.clone().unwrap_or_default();
            if name.starts_with("lost-") {
                continue; // QEMU ran it; its reply never arrives
            }
            if echo(&mut conn, &req).await.is_err() {
                return;
            }
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    assert!(client.oob_enabled());
    let short = || CallOptions::new().timeout(Duration::from_millis(200));
    let lost = futures_join_all((0..8).map(|i| {
        let client = client.clone();
        async move {
            client
                .call_with::<_, Value>(&format!("lost-{i}"), &(), short())
                .await
        }
    }))
    .await;
    assert!(
        lost.iter().all(|r| matches!(r, Err(Error::Timeout { .. }))),
        "{lost:?}"
    );
    // QEMU's queue looks full of commands nobody waits for: a probe finds
    // out they were answered (or lost) and frees it.
    let after: Value = within(10, client.call("after", &())).await.unwrap();
    assert_eq!(after["name"], "after");
    for i in 0..20 {
        let v: Value = within(10, client.call(&format!("more-{i}"), &())).await.unwrap();
        assert_eq!(v["name"], format!("more-{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_to_an_fd_command_holds_back_nothing() {
    let srv = server(|mut conn| async move {
        handshake_without_oob(&mut conn).await;
        while let Ok(Some(req)) = conn.recv().await {
            if req.name.as_deref() == Some("getfd-lost") {
                continue;
            }
            if echo(&mut conn, &req).await.is_err() {
                return;
            }
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let opts = CallOptions::new()
        .timeout(Duration::from_millis(200))
        .fds([dev_null()]);
    let err = client
        .call_with::<_, Value>("getfd-lost", &(), opts)
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    // The next fd command may not go before the lost one is known answered;
    // plain commands are not held, and a probe settles it if none comes.
    let (fd_call, plain) = within(10, async {
        tokio::join!(
            client.call_with::<_, Value>("getfd-2", &(), CallOptions::new().fds([dev_null()])),
            client.call::<_, Value>("plain", &())
        )
    })
    .await;
    let fd_call = fd_call.unwrap();
    assert_eq!(
        (fd_call["name"].as_str(), fd_call["fds"].as_u64()),
        (Some("getfd-2"), Some(1))
    );
    assert_eq!(plain.unwrap()["name"], "plain");
    // Only fd commands behind an abandoned one: the probe releases them.
    let opts = CallOptions::new()
        .timeout(Duration::from_millis(200))
        .fds([dev_null()]);
    assert!(client
        .call_with::<_, Value>("getfd-lost", &(), opts)
        .await
        .unwrap_err()
        .is_timeout());
    let again: Value = within(
        10,
        client.call_with("getfd-3", &(), CallOptions::new().fds([dev_null()])),
    )
    .await
    .unwrap();
    assert_eq!(again["fds"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_lost_replies_leave_the_connection_working() {
    let srv = server(|mut conn| async move {
        handshake_without_oob(&mut conn).await;
        while let Ok(Some(req)) = conn.recv().await {
            if req.name.as_deref() == Some("lost") {
                continue;
            }
            if echo(&mut conn, &req).await.is_err() {
                return;
            }
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    // More than the client remembers of commands nobody waits for.
    let lost = futures_join_all((0..3000).map(|_| {
        let client = client.clone();
        async move {
            client
                .call_with::<_, Value>(
                    "lost",
                    &(),
                    CallOptions::new().timeout(Duration::from_millis(300)),
                )
                .await
        }
    }))
    .await;
    assert!(lost.iter().all(|r| matches!(r, Err(Error::Timeout { .. }))));
    let v: Value = within(10, client.call("after", &())).await.unwrap();
    assert_eq!(v["name"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_fds_than_one_message_carries_are_refused_alone() {
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            if echo(&mut conn, &req).await.is_err() {
                return;
            }
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    let too_many = CallOptions::new().fds((0..MAX_FDS_PER_CALL + 1).map(|_| dev_null()));
    let (refused, bystander) = within(10, async {
        tokio::join!(
            client.call_with::<_, Value>("add-fd", &(), too_many),
            client.call::<_, Value>("bystander", &())
        )
    })
    .await;
    let err = refused.unwrap_err();
    assert!(
        matches!(err, Error::TooManyFds { count: 254, max: 253 }),
        "{err:?}"
    );
    assert_eq!(bystander.unwrap()["name"], "bystander");
    assert!(!client.is_closed());
    // The most one message carries still goes through.
    let most = CallOptions::new().fds((0..MAX_FDS_PER_CALL).map(|_| dev_null()));
    let v: Value = within(10, client.call_with("add-fd", &(), most)).await.unwrap();
    assert_eq!(v["fds"], MAX_FDS_PER_CALL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_replies_end_their_call_at_once() {
    // Each request's name picks the reply; ID stands for its id.
    const REPLIES: &[(&str, &str)] = &[
        ("error-is-a-string", r#"{"id": ID, "error": "it broke"}"#),
        (
            "numeric-class",
            r#"{"id": ID, "error": {"class": 42, "desc": "x"}}"#,
        ),
        ("no-desc", r#"{"error": {"class": "GenericError"}, "id": ID}"#),
        ("id-before-invalid-return", r#"{"id": ID, "return": {"a": tru}}"#),
        ("neither-return-nor-error", r#"{"id": ID, "status": "fine"}"#),
        ("return-that-is-not-json", r#"{"return": [1,,2], "id": ID}"#),
    ];
    let srv = server(|mut conn| async move {
        conn.handshake().await.unwrap();
        while let Ok(Some(req)) = conn.recv().await {
            let name = req.name.clone().unwrap_or_default();
            let text = match REPLIES.iter().find(|(n, _)| *n == name) {
                Some((_, reply)) => reply.replace("ID", &id_of(&req)),
                None if name == "bare-id" => format!("{{\"id\": {}}}", id_of(&req)),
                None => json!({"return": {"name": name}, "id": req.id}).to_string(),
            };
            if conn.send_raw(format!("{text}\r\n").as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let client = Client::connect(srv.path()).await.unwrap();
    for (name, reply) in REPLIES {
        // The default budget is 30 s: ending within 5 means at once.
        let err = within(5, client.call::<_, Value>(name, &())).await.unwrap_err();
        match &err {
            Error::Decode {
                command,
                reply: quoted,
                ..
            } => {
                assert_eq!(command, name);
                let shown = reply.split("ID").next().unwrap();
                assert!(quoted.contains(shown), "{name}: the error quotes {quoted:?}");
            }
            other => panic!("{name}: expected a decode error, got {other:?}"),
        }
        assert!(err.to_string().contains(name), "{err}");
        // The connection goes on.
        let ok: Value = within(5, client.call("next", &())).await.unwrap();
        assert_eq!(ok["name"], "next");
    }
    // A bare {"id": N} is success with nothing returned, as in Incus's Go package `qmp`.
    let empty: qmpkit::Empty = within(5, client.call("bare-id", &())).await.unwrap();
    assert_eq!(empty, qmpkit::Empty {});
}
