//! The handshake: read the greeting, negotiate capabilities.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::transport::Transport;
use crate::error::{Error, Result};
use crate::wire::splitter::{Frame, Splitter};
use crate::wire::{Greeting, Incoming};

/// A connection that has completed the handshake.
pub(crate) struct Handshaken {
    pub stream: Transport,
    /// Holds whatever arrived after the capabilities reply (events, possibly).
    pub splitter: Splitter,
    pub greeting: Greeting,
    pub oob: bool,
    /// Events that came before the capabilities reply, to hand on in order.
    pub early_events: Vec<Vec<u8>>,
}

/// Reads the greeting and negotiates capabilities (with `oob` when offered
/// and wanted). The caller bounds the time.
pub(crate) async fn run(mut stream: Transport, want_oob: bool, max_message: usize) -> Result<Handshaken> {
    let mut splitter = Splitter::small(max_message);
    let greeting_bytes = next_message(&mut stream, &mut splitter, "greeting").await?;
    let greeting = Greeting::parse(&greeting_bytes).map_err(Error::Handshake)?;
    let oob = want_oob && greeting.offers_oob();
    let request: &[u8] = if oob {
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}\n"
    } else {
        b"{\"execute\":\"qmp_capabilities\"}\n"
    };
    stream.write_all(request).await?;
    // A caller's stream (TLS, say) may hold the bytes back until flushed.
    stream.flush().await?;
    // QEMU sends no event before this reply, but a server may: keep them.
    let mut early_events = Vec::new();
    loop {
        let reply = next_message(&mut stream, &mut splitter, "capabilities reply").await?;
        let parsed: Incoming = serde_json::from_slice(&reply).map_err(|e| {
            Error::Handshake(format!(
                "unparseable capabilities reply: {e}: {}",
                String::from_utf8_lossy(&reply)
            ))
        })?;
        if parsed.event.is_some() {
            drop(parsed);
            early_events.push(reply);
            continue;
        }
        if let Some(err) = parsed.error {
            return Err(Error::Handshake(format!(
                "qmp_capabilities failed: {} ({})",
                err.desc, err.class
            )));
        }
        // Go takes any answer without an error as success, `return` or not
        // (its own tests' fake server sends none); a second greeting is no answer.
        if parsed.greeting.is_some() {
            return Err(Error::Handshake(format!(
                "unexpected reply to qmp_capabilities: {}",
                String::from_utf8_lossy(&reply)
            )));
        }
        break;
    }
    Ok(Handshaken {
        stream,
        splitter,
        greeting,
        oob,
        early_events,
    })
}

/// Reads until one whole message is buffered and returns it.
async fn next_message(stream: &mut Transport, splitter: &mut Splitter, what: &str) -> Result<Vec<u8>> {
    loop {
        match splitter.next_frame() {
            Some(Frame::Message(range)) => return Ok(splitter.bytes(range).to_vec()),
            // Before the greeting, nothing is lost by skipping bytes; a
            // corrupt capabilities reply ends in a timeout, as silence would.
            Some(Frame::Garbage(_) | Frame::Corrupt(_)) => continue,
            Some(Frame::TooLarge(o)) => {
                return Err(Error::Handshake(format!(
                    "{what} of {} bytes is larger than the message size limit",
                    o.size
                )))
            }
            None => {}
        }
        let n = stream.read(splitter.spare()).await?;
        if n == 0 {
            return Err(Error::Handshake(format!(
                "the server closed the connection before sending its {what}"
            )));
        }
        splitter.filled(n);
    }
}
