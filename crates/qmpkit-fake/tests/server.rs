//! Talks to the fake server with plain Unix sockets.

use std::io::{IoSlice, Read, Seek, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use qmpkit_fake::{FakeConn, FakeServer, Request, GREETING};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

async fn next_json<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut tokio::io::Lines<R>) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("reply in time")
        .unwrap()
        .expect("not EOF");
    serde_json::from_str(&line).unwrap()
}

#[tokio::test]
async fn instant_handshake_and_pipelining() {
    let server = FakeServer::instant().await.unwrap();
    let stream = UnixStream::connect(server.path()).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut raw = BufReader::new(rd);
    let mut greeting = Vec::new();
    raw.read_until(b'\n', &mut greeting).await.unwrap();
    assert_eq!(greeting, GREETING);
    let mut lines = raw.lines();

    // Before negotiation, commands are refused like QEMU does.
    wr.write_all(br#"{"execute":"query-status","id":0}"#)
        .await
        .unwrap();
    assert_eq!(next_json(&mut lines).await["error"]["class"], "CommandNotFound");

    // No trailing newline at all.
    wr.write_all(br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)
        .await
        .unwrap();
    assert_eq!(next_json(&mut lines).await, json!({"return": {}}));
    assert_eq!(server.connections(), 1);

    // Several requests in one write, mixed separators, one oob.
    wr.write_all(b"{\"execute\":\"query-status\",\"id\":1}{\"execute\":\"stop\",\"id\":\"two\"}\r\n{\"exec-oob\":\"cont\",\"id\":{\"n\":3}}\n")
        .await
        .unwrap();
    let status = json!({"status": "running", "singlestep": false, "running": true});
    assert_eq!(next_json(&mut lines).await, json!({"return": status, "id": 1}));
    assert_eq!(next_json(&mut lines).await, json!({"return": {}, "id": "two"}));
    assert_eq!(next_json(&mut lines).await, json!({"return": {}, "id": {"n": 3}}));

    // One request split across many writes.
    for b in br#"{"execute":"query-status","id":"}{"}"#.chunks(3) {
        wr.write_all(b).await.unwrap();
        wr.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(next_json(&mut lines).await, json!({"return": status, "id": "}{"}));

    // Malformed input gets errors, and the connection keeps working.
    wr.write_all(b"{\"id\":5} {\"execute\": bad}\r\n{\"execute\":\"x\",\"id\":6}")
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut lines).await["error"]["desc"],
        "QMP input lacks member 'execute'"
    );
    assert_eq!(next_json(&mut lines).await["error"]["class"], "GenericError");
    assert_eq!(next_json(&mut lines).await, json!({"return": {}, "id": 6}));

    drop(server);
    let end = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
    assert!(
        matches!(end, Ok(Ok(None)) | Ok(Err(_))),
        "connection closed after drop: {end:?}"
    );
}

#[tokio::test]
async fn events_and_scripted_replies() {
    let server = FakeServer::start(|mut conn: FakeConn| async move {
        conn.handshake().await.unwrap();
        let req = conn.recv().await.unwrap().unwrap();
        conn.event("STOP", json!({})).await.unwrap();
        conn.reply_error(&req, "GenericError", "nope").await.unwrap();
        conn.send_raw(b"{\"return\": {}}").await.unwrap();
    })
    .await
    .unwrap();
    let stream = UnixStream::connect(server.path()).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    assert!(next_json(&mut lines).await.get("QMP").is_some());
    wr.write_all(br#"{"execute":"qmp_capabilities","id":"c"} {"execute":"stop","id":1}"#)
        .await
        .unwrap();
    assert_eq!(next_json(&mut lines).await, json!({"return": {}, "id": "c"}));
    let ev = next_json(&mut lines).await;
    assert_eq!(ev["event"], "STOP");
    assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    assert!(ev["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    let want = json!({"error": {"class": "GenericError", "desc": "nope"}, "id": 1});
    assert_eq!(next_json(&mut lines).await, want);
    // The raw send had no newline; the script ended, so the line ends at EOF.
    assert_eq!(next_json(&mut lines).await, json!({"return": {}}));
}

#[tokio::test]
async fn fds_arrive_with_their_request() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Request>();
    let server = FakeServer::start(move |mut conn: FakeConn| {
        let tx = tx.clone();
        async move {
            conn.handshake().await.unwrap();
            while let Some(req) = conn.recv().await.unwrap() {
                conn.reply(&req, json!({})).await.unwrap();
                tx.send(req).unwrap();
            }
        }
    })
    .await
    .unwrap();

    let mut file = tempfile::tempfile().unwrap();
    file.write_all(b"hello fd").unwrap();

    let stream = UnixStream::connect(server.path()).await.unwrap();
    let mut lines = BufReader::new(stream).lines();
    assert!(next_json(&mut lines).await.get("QMP").is_some());
    lines
        .get_mut()
        .get_mut()
        .write_all(br#"{"execute":"qmp_capabilities"}"#)
        .await
        .unwrap();
    assert_eq!(next_json(&mut lines).await, json!({"return": {}}));

    // A plain request first: one recvmsg may return it together with the
    // next sendmsg's data, and the fds still belong to the later request.
    lines
        .get_mut()
        .get_mut()
        .write_all(br#"{"execute":"before","id":6}"#)
        .await
        .unwrap();
    let stream = lines.get_ref().get_ref();
    let msg = br#"{"execute":"getfd","arguments":{"fdname":"f"},"id":7}"#;
    let fds = [file.as_fd()];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    assert!(cmsg.push(SendAncillaryMessage::ScmRights(&fds)));
    stream.writable().await.unwrap();
    let sent = stream
        .try_io(tokio::io::Interest::WRITABLE, || {
            Ok(sendmsg(
                stream,
                &[IoSlice::new(msg)],
                &mut cmsg,
                SendFlags::empty(),
            )?)
        })
        .unwrap();
    assert_eq!(sent, msg.len());

    assert_eq!(next_json(&mut lines).await, json!({"return": {}, "id": 6}));
    assert_eq!(next_json(&mut lines).await, json!({"return": {}, "id": 7}));
    let before = rx.recv().await.unwrap();
    assert_eq!(before.name.as_deref(), Some("before"));
    assert!(before.fds.is_empty());
    let getfd = rx.recv().await.unwrap();
    assert_eq!(getfd.name.as_deref(), Some("getfd"));
    assert_eq!(getfd.arguments().unwrap()["fdname"], "f");
    assert_eq!(getfd.raw, &msg[..]);
    assert_eq!(getfd.fds.len(), 1);
    let mut received = std::fs::File::from(getfd.fds.into_iter().next().unwrap());
    received.rewind().unwrap();
    let mut text = String::new();
    received.read_to_string(&mut text).unwrap();
    assert_eq!(text, "hello fd");
}
