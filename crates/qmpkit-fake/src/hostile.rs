//! A hostile QMP server: it answers like QEMU, then corrupts, truncates,
//! drops, duplicates, reorders, delays and splits what it sends, following
//! a plan drawn from a seed, so that a failure found once is found again.
//!
//! It serves one connection per [`Hostile::serve`]. Until [`Hostile::calm`]
//! is called every message may be mutated; after it, the server first ends
//! the current line (so a client that recovers at line starts can) and then
//! answers every request cleanly. [`Hostile::report`] tells which replies
//! were tampered with, so that a test can tell a client's mistake from the
//! server's doing.
//!
//! Replies: a request named `err-...` gets a `GenericError`, any other a
//! `{"return": {"name": NAME}}`, so the caller can check that the reply is
//! its own.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{encode_event, encode_reply, FakeConn, Request};

/// How often each fault happens, as a share of the messages sent (0 to 1).
#[derive(Debug, Clone)]
pub struct Faults {
    /// Bytes of the message replaced by random ones (braces, quotes,
    /// backslashes, newlines and anything else).
    pub corrupt: f64,
    /// The message cut short at a random point (then a line end).
    pub truncate: f64,
    /// The message never sent.
    pub drop: f64,
    /// The message sent twice.
    pub duplicate: f64,
    /// The reply held back and sent after the next one.
    pub reorder: f64,
    /// The message sent after a pause of up to [`Faults::max_delay`].
    pub delay: f64,
    /// Random bytes sent before the message.
    pub garbage: f64,
    /// The message written in several small writes.
    pub split: f64,
    /// An event (sometimes malformed) sent before the message.
    pub event: f64,
    /// The reply made larger than 64 KiB (a client may refuse it).
    pub oversized: f64,
    /// The connection closed instead of answering.
    pub hang_up: f64,
    /// The longest pause of a delayed message.
    pub max_delay: Duration,
}

impl Faults {
    /// Every fault now and then: about one message in three is touched.
    pub fn moderate() -> Faults {
        Faults {
            corrupt: 0.06,
            truncate: 0.04,
            drop: 0.04,
            duplicate: 0.03,
            reorder: 0.03,
            delay: 0.05,
            garbage: 0.04,
            split: 0.05,
            event: 0.06,
            oversized: 0.01,
            hang_up: 0.003,
            max_delay: Duration::from_millis(30),
        }
    }
}

/// What the server did to the conversation.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Names of requests whose reply was tampered with in any way.
    pub tampered: HashSet<String>,
    /// Requests received.
    pub requests: usize,
    /// Whether the server hung up.
    pub hung_up: bool,
}

/// A hostile server's script and what it did. Cheap to clone: clones
/// share the plan's state and the report.
#[derive(Clone)]
pub struct Hostile {
    seed: u64,
    oob: bool,
    faults: Faults,
    calm: Arc<AtomicBool>,
    report: Arc<Mutex<Report>>,
}

impl Hostile {
    /// A server whose faults follow `seed`; it offers `oob` when asked to.
    pub fn new(seed: u64, oob: bool, faults: Faults) -> Hostile {
        Hostile {
            seed,
            oob,
            faults,
            calm: Arc::new(AtomicBool::new(false)),
            report: Arc::new(Mutex::new(Report::default())),
        }
    }

    /// From now on, answer every request cleanly.
    pub fn calm(&self) {
        self.calm.store(true, Ordering::SeqCst);
    }

    /// What the server did so far.
    pub fn report(&self) -> Report {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn tampered(&self, name: &str) {
        let mut report = self.report.lock().unwrap_or_else(|e| e.into_inner());
        report.tampered.insert(name.to_owned());
    }

    /// Serves one connection: a clean handshake, then hostile answers.
    pub async fn serve(self, mut conn: FakeConn) {
        let mut rng = fastrand::Rng::with_seed(self.seed);
        let greeting = if self.oob {
            crate::GREETING.to_vec()
        } else {
            String::from_utf8_lossy(crate::GREETING)
                .replace("[\"oob\"]", "[]")
                .into_bytes()
        };
        if conn.send_raw(&greeting).await.is_err() {
            return;
        }
        let Ok(Some(caps)) = conn.recv().await else { return };
        if conn.reply(&caps, json!({})).await.is_err() {
            return;
        }
        let mut held: VecDeque<Vec<u8>> = VecDeque::new();
        let mut calmed = false;
        while let Ok(Some(req)) = conn.recv().await {
            self.report.lock().unwrap_or_else(|e| e.into_inner()).requests += 1;
            let name = req.name.clone().unwrap_or_default();
            let reply = reply_to(&req, &name);
            if self.calm.load(Ordering::SeqCst) {
                if !calmed {
                    calmed = true;
                    // End whatever line a mutation left open.
                    if conn.send_raw(b"\r\n").await.is_err() {
                        return;
                    }
                }
                while let Some(old) = held.pop_front() {
                    if conn.send_raw(&old).await.is_err() {
                        return;
                    }
                }
                if conn.send_raw(&reply).await.is_err() {
                    return;
                }
                continue;
            }
            match self.mutate(&mut rng, &name, reply, &mut held) {
                Some(plan) => {
                    if plan.run(&mut conn, &mut rng).await.is_err() {
                        return;
                    }
                }
                None => {
                    self.report.lock().unwrap_or_else(|e| e.into_inner()).hung_up = true;
                    return;
                }
            }
        }
    }

    /// Decides what to send for one reply; `None` to hang up.
    fn mutate(
        &self,
        rng: &mut fastrand::Rng,
        name: &str,
        reply: Vec<u8>,
        held: &mut VecDeque<Vec<u8>>,
    ) -> Option<Plan> {
        let f = &self.faults;
        if rng.f64() < f.hang_up {
            return None;
        }
        let mut plan = Plan::default();
        if rng.f64() < f.event {
            plan.writes.push(random_event(rng));
        }
        let mut touched = false;
        if rng.f64() < f.garbage {
            // Garbage can open an object that swallows the reply.
            plan.writes.push(garbage(rng));
            touched = true;
        }
        let mut message = reply;
        if rng.f64() < f.oversized {
            message = oversized_reply(name, &message);
            touched = true;
        }
        if rng.f64() < f.corrupt {
            corrupt(rng, &mut message);
            touched = true;
        }
        if rng.f64() < f.truncate {
            let keep = rng.usize(..message.len().max(1));
            message.truncate(keep);
            message.extend_from_slice(b"\r\n");
            touched = true;
        }
        if rng.f64() < f.duplicate {
            plan.writes.push(message.clone());
        }
        if rng.f64() < f.reorder {
            held.push_back(message);
            touched = true;
        } else if rng.f64() < f.drop {
            touched = true;
        } else {
            plan.writes.push(message);
            // What was held back goes after this reply.
            plan.writes.extend(held.drain(..));
        }
        if touched {
            self.tampered(name);
        }
        if rng.f64() < f.delay {
            plan.delay = Some(f.max_delay.mul_f64(rng.f64()));
        }
        plan.split = rng.f64() < f.split;
        Some(plan)
    }
}

/// What to write for one request.
#[derive(Default)]
struct Plan {
    writes: Vec<Vec<u8>>,
    delay: Option<Duration>,
    split: bool,
}

impl Plan {
    async fn run(self, conn: &mut FakeConn, rng: &mut fastrand::Rng) -> std::io::Result<()> {
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        for bytes in self.writes {
            if self.split && bytes.len() > 2 {
                let mut rest = &bytes[..];
                while !rest.is_empty() {
                    let n = rng.usize(1..=rest.len().min(16));
                    conn.send_raw(&rest[..n]).await?;
                    rest = &rest[n..];
                    tokio::task::yield_now().await;
                }
            } else {
                conn.send_raw(&bytes).await?;
            }
        }
        Ok(())
    }
}

/// QEMU's answer to `req`, as QEMU writes it.
fn reply_to(req: &Request, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if name.starts_with("err-") {
        // QEMU writes the id first in error replies.
        out.extend_from_slice(b"{\"id\": ");
        crate::write_json(&mut out, req.id.as_ref().unwrap_or(&Value::Null));
        out.extend_from_slice(b", \"error\": ");
        crate::write_json(
            &mut out,
            &json!({"class": "GenericError", "desc": format!("{name} failed")}),
        );
        out.extend_from_slice(b"}\r\n");
    } else {
        encode_reply(&mut out, "return", &json!({ "name": name }), req.id.as_ref());
    }
    out
}

/// The same reply with 70 KiB of padding in its return value.
fn oversized_reply(name: &str, reply: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(reply);
    let padding = "p".repeat(70 * 1024);
    text.replacen(
        &format!("\"name\": \"{name}\""),
        &format!("\"name\": \"{name}\", \"pad\": \"{padding}\""),
        1,
    )
    .into_bytes()
}

/// Bytes that matter to a JSON splitter, and some that do not.
const NASTY: &[u8] = b"{}\"\\\n\r[]:, x0\x00\xff";

fn corrupt(rng: &mut fastrand::Rng, message: &mut [u8]) {
    for _ in 0..rng.usize(1..=3) {
        let at = rng.usize(..message.len());
        message[at] = if rng.bool() {
            NASTY[rng.usize(..NASTY.len())]
        } else {
            rng.u8(..)
        };
    }
}

fn garbage(rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut out: Vec<u8> = (0..rng.usize(1..24))
        .map(|_| NASTY[rng.usize(..NASTY.len())])
        .collect();
    if rng.bool() {
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn random_event(rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut out = Vec::new();
    match rng.u8(..4) {
        0 => encode_event(&mut out, "STOP", &Value::Null),
        1 => encode_event(&mut out, "BLOCK_JOB_COMPLETED", &json!({"device": "j", "len": 1, "offset": 1})),
        2 => out.extend_from_slice(b"{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 9223372036854775807, \"microseconds\": 9223372036854775807}}\r\n"),
        _ => out.extend_from_slice(b"{\"event\": 7, \"data\": [}\r\n"),
    }
    out
}
