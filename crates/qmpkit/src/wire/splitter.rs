//! Splits QEMU's output into JSON objects.
//!
//! QMP output is a stream of JSON objects. QEMU ends each with CRLF, but with
//! `pretty=on` one object spans many lines, and nothing in the protocol
//! promises a newline at all, so the stream is split by brace depth (honouring
//! strings and escapes), never by lines. The scan is resumable: bytes already
//! scanned are never scanned again, so a large message arriving in many small
//! reads costs linear time.
//!
//! A message larger than the limit is skipped rather than buffered; its first
//! and last bytes are kept so that the reader can still tell which command it
//! answered (QEMU writes `"id"` first in error replies and last in successful
//! ones).

use memchr::memchr2;

/// The least free space offered to a read.
const MIN_READ: usize = 16 * 1024;

/// The size of a buffer made from nothing.
const FIRST_BUFFER: usize = 64 * 1024;

/// How many bytes of an oversized message's head and tail are kept.
const SKIP_KEEP: usize = 256;

/// How far a string is scanned byte by byte before `memchr2` takes over.
const LONG_STRING: usize = 32;

/// The bytes that change the scanner's state outside strings.
const STRUCTURAL: [bool; 256] = {
    let mut table = [false; 256];
    table[b'"' as usize] = true;
    table[b'{' as usize] = true;
    table[b'}' as usize] = true;
    table
};

/// One unit of output found in the stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A complete top-level JSON object (as bytes; it may still be invalid JSON).
    Message(std::ops::Range<usize>),
    /// A message that exceeded the size limit and was skipped.
    TooLarge(Oversized),
    /// Bytes outside any object that are neither whitespace nor an object.
    Garbage(usize),
}

/// What is known of a message that was too large to keep.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Oversized {
    /// The size of the whole message.
    pub size: usize,
    /// Its first bytes.
    pub head: Vec<u8>,
    /// Its last bytes.
    pub tail: Vec<u8>,
}

impl Oversized {
    /// The numeric `"id"` of the message, if one is visible in its head or tail.
    pub fn id(&self) -> Option<u64> {
        find_numeric_id(&self.tail).or_else(|| find_numeric_id(&self.head))
    }

    /// True when the visible head says this is an event rather than a reply.
    pub fn looks_like_event(&self) -> bool {
        memchr::memmem::find(&self.head, b"\"event\"").is_some()
            && memchr::memmem::find(&self.head, b"\"return\"").is_none()
    }
}

fn find_numeric_id(bytes: &[u8]) -> Option<u64> {
    let at = memchr::memmem::rfind(bytes, b"\"id\"")?;
    let rest = &bytes[at + 4..];
    let rest = rest.trim_ascii_start().strip_prefix(b":")?;
    let rest = rest.trim_ascii_start();
    let end = rest
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// A resumable JSON object splitter over a growable buffer.
pub(crate) struct Splitter {
    buf: Vec<u8>,
    /// Start of the message being scanned (or of unscanned bytes at depth 0).
    start: usize,
    /// Next byte to scan.
    pos: usize,
    /// Bytes in `buf` that hold data.
    end: usize,
    depth: u32,
    in_str: bool,
    escaped: bool,
    limit: usize,
    /// The least free space offered to a read, and the size of a buffer
    /// made from nothing.
    min_read: usize,
    first_buffer: usize,
    skip: Option<Skipping>,
}

struct Skipping {
    size: usize,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Splitter {
    /// A splitter that refuses messages larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Splitter {
            buf: Vec::new(),
            start: 0,
            pos: 0,
            end: 0,
            depth: 0,
            in_str: false,
            escaped: false,
            limit: limit.max(4 * SKIP_KEEP),
            min_read: MIN_READ,
            first_buffer: FIRST_BUFFER,
            skip: None,
        }
    }

    /// A splitter for a few small messages (the handshake): its buffer starts
    /// at 2 KiB, so that thousands of concurrent connects do not each touch
    /// 64 KiB of memory. It grows like any other when a message needs it.
    pub fn small(limit: usize) -> Self {
        Splitter {
            min_read: 1024,
            first_buffer: 2048,
            ..Splitter::new(limit)
        }
    }

    /// Free space to read into. Call [`Splitter::filled`] with how much was read.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 && (self.start == self.end || self.start >= self.buf.len() / 2) {
            // Move the unfinished message to the front instead of growing.
            self.buf.copy_within(self.start..self.end, 0);
            self.pos -= self.start;
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < self.min_read {
            let grown = (self.buf.len() * 2).min(self.limit.saturating_add(128 * 1024));
            let grown = grown.max(self.end + self.min_read).max(self.first_buffer);
            self.buf.resize(grown, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`Splitter::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// Appends bytes (for callers that do not read into [`Splitter::spare`]).
    #[cfg(test)]
    pub fn push(&mut self, data: &[u8]) {
        let mut data = data;
        while !data.is_empty() {
            let spare = self.spare();
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            self.filled(n);
            data = &data[n..];
        }
    }

    /// The bytes of a frame returned by [`Splitter::next_frame`], valid until
    /// the next call to `spare`.
    pub fn bytes(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// True when nothing is buffered: no message, no part of one.
    pub fn is_drained(&self) -> bool {
        self.start == self.end && self.depth == 0 && self.skip.is_none()
    }

    /// Takes a buffer to read into; only while drained (it replaces an empty one).
    pub fn adopt(&mut self, buf: Vec<u8>) {
        debug_assert!(self.is_drained());
        self.buf = buf;
        self.min_read = MIN_READ;
        self.first_buffer = FIRST_BUFFER;
        self.start = 0;
        self.pos = 0;
        self.end = 0;
    }

    /// Gives the buffer up; only while drained.
    pub fn release(&mut self) -> Vec<u8> {
        debug_assert!(self.is_drained());
        self.start = 0;
        self.pos = 0;
        self.end = 0;
        std::mem::take(&mut self.buf)
    }

    /// True when part of a message is buffered.
    pub fn has_partial(&self) -> bool {
        self.depth > 0 || self.skip.is_some()
    }

    /// The next complete frame, if the buffered bytes hold one.
    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if self.skip.is_some() {
                return self.skip_message();
            }
            if self.depth == 0 {
                // Between messages: skip whitespace, report anything else but '{'.
                let ws = self.buf[self.pos..self.end]
                    .iter()
                    .take_while(|b| b.is_ascii_whitespace())
                    .count();
                self.pos += ws;
                self.start = self.pos;
                if self.pos == self.end {
                    return None;
                }
                if self.buf[self.pos] != b'{' {
                    let junk = self.buf[self.pos..self.end]
                        .iter()
                        .take_while(|&&b| b != b'{' && !b.is_ascii_whitespace())
                        .count();
                    self.pos += junk;
                    self.start = self.pos;
                    return Some(Frame::Garbage(junk));
                }
            }
            // Inside an object: jump between the bytes that matter.
            let closed = self.scan();
            if let Some(stop) = closed {
                let range = self.start..stop;
                self.pos = stop;
                self.start = stop;
                if range.len() > self.limit {
                    // Arrived whole in one read, but too large all the same.
                    let bytes = &self.buf[range.clone()];
                    return Some(Frame::TooLarge(Oversized {
                        size: bytes.len(),
                        head: bytes[..SKIP_KEEP].to_vec(),
                        tail: bytes[bytes.len() - SKIP_KEEP..].to_vec(),
                    }));
                }
                return Some(Frame::Message(range));
            }
            if self.pos - self.start > self.limit {
                let head = self.buf[self.start..self.start + SKIP_KEEP].to_vec();
                let size = self.pos - self.start;
                let tail_from = self.pos.saturating_sub(SKIP_KEEP).max(self.start);
                self.skip = Some(Skipping {
                    size,
                    head,
                    tail: self.buf[tail_from..self.pos].to_vec(),
                });
                self.start = self.pos;
                continue;
            }
            return None;
        }
    }

    /// Scans from `pos` to `end`; returns the end of the object if it closed.
    ///
    /// Tight loops skip the bytes that cannot change the state, which for
    /// QEMU's typical replies (short keys and values) costs less than
    /// starting a vector search at every quote; a string still open after
    /// [`LONG_STRING`] bytes (console data in base64, schema text) is crossed
    /// with `memchr2`.
    fn scan(&mut self) -> Option<usize> {
        let end = self.end;
        let buf = &self.buf[..end];
        let (mut pos, mut depth) = (self.pos, self.depth);
        let (mut in_str, mut escaped) = (self.in_str, self.escaped);
        let mut closed = None;
        while pos < end {
            if escaped {
                escaped = false;
                pos += 1;
                continue;
            }
            if in_str {
                let stop = end.min(pos + LONG_STRING);
                let near = buf[pos..stop].iter().position(|&b| b == b'"' || b == b'\\');
                match near.or_else(|| memchr2(b'"', b'\\', &buf[stop..]).map(|i| i + stop - pos)) {
                    Some(i) => pos += i,
                    None => {
                        pos = end;
                        break;
                    }
                }
                // A quote ends the string; a backslash escapes the next byte.
                escaped = buf[pos] == b'\\';
                in_str = escaped;
                pos += 1;
                continue;
            }
            match buf[pos..].iter().position(|&b| STRUCTURAL[usize::from(b)]) {
                Some(i) => pos += i,
                None => {
                    pos = end;
                    break;
                }
            }
            let b = buf[pos];
            pos += 1;
            match b {
                b'"' => in_str = true,
                b'{' => depth += 1,
                _ => {
                    depth -= 1;
                    if depth == 0 {
                        closed = Some(pos);
                        break;
                    }
                }
            }
        }
        self.pos = pos;
        self.depth = depth;
        self.in_str = in_str;
        self.escaped = escaped;
        closed
    }

    /// Discards an oversized message, keeping its head and tail.
    fn skip_message(&mut self) -> Option<Frame> {
        let from = self.pos;
        let closed = self.scan();
        let stop = closed.unwrap_or(self.pos);
        let skip = self.skip.as_mut().expect("skipping");
        skip.size += stop - from;
        let seen = &self.buf[from..stop];
        if seen.len() >= SKIP_KEEP {
            skip.tail.clear();
            skip.tail.extend_from_slice(&seen[seen.len() - SKIP_KEEP..]);
        } else {
            skip.tail.extend_from_slice(seen);
            let excess = skip.tail.len().saturating_sub(SKIP_KEEP);
            skip.tail.drain(..excess);
        }
        self.start = stop;
        closed.map(|_| {
            let s = self.skip.take().expect("skipping");
            Frame::TooLarge(Oversized {
                size: s.size,
                head: s.head,
                tail: s.tail,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: &mut Splitter) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(f) = s.next_frame() {
            match f {
                Frame::Message(r) => out.push(String::from_utf8(s.bytes(r).to_vec()).unwrap()),
                Frame::Garbage(n) => out.push(format!("garbage:{n}")),
                Frame::TooLarge(o) => out.push(format!("too-large:{}:{:?}", o.size, o.id())),
            }
        }
        out
    }

    #[test]
    fn crlf_separated_and_unseparated_objects() {
        let mut s = Splitter::new(1 << 20);
        s.push(b"{\"a\": 1}\r\n{\"b\": {\"c\": 2}}{\"d\": 3}");
        assert_eq!(all(&mut s), ["{\"a\": 1}", "{\"b\": {\"c\": 2}}", "{\"d\": 3}"]);
        assert!(!s.has_partial());
    }

    #[test]
    fn pretty_printed_multi_line_object() {
        let mut s = Splitter::new(1 << 20);
        s.push(b"{\n    \"return\": {\n        \"status\": \"running\"\n    },\n    \"id\": 1\n}\n");
        let got = all(&mut s);
        assert_eq!(got.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
        assert_eq!(v["return"]["status"], "running");
    }

    #[test]
    fn strings_with_braces_and_escaped_quotes() {
        let mut s = Splitter::new(1 << 20);
        let msg = br#"{"return": "a } \" { \\", "id": 7}"#;
        s.push(msg);
        assert_eq!(all(&mut s), [String::from_utf8(msg.to_vec()).unwrap()]);
    }

    #[test]
    fn every_byte_boundary() {
        let stream =
            b"{\"event\": \"STOP\", \"data\": {\"x\": \"}\\\"{\"}}\r\n{\"return\": {}, \"id\": 2}\r\n";
        for cut in 0..stream.len() {
            let mut s = Splitter::new(1 << 20);
            let mut got = Vec::new();
            s.push(&stream[..cut]);
            got.extend(all(&mut s));
            s.push(&stream[cut..]);
            got.extend(all(&mut s));
            assert_eq!(got.len(), 2, "cut at {cut}: {got:?}");
        }
        // And one byte at a time.
        let mut s = Splitter::new(1 << 20);
        let mut got = Vec::new();
        for b in stream {
            s.push(&[*b]);
            got.extend(all(&mut s));
        }
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn long_strings_with_escapes_split_anywhere_match_serde_json() {
        // Strings longer than the scan's jump-ahead threshold, with braces,
        // quotes and backslashes placed before, at and after it.
        let mut text = String::new();
        for i in 0..200 {
            text.push(char::from(b'a' + (i % 26) as u8));
            if i % 37 == 0 {
                text.push_str("\"}{\\");
            }
        }
        let messages: Vec<serde_json::Value> = (0..6)
            .map(|n| {
                let cut = &text[..text.len() * (n + 1) / 6];
                serde_json::json!({"return": {"data": cut, "nested": {"s": cut}}, "id": n})
            })
            .collect();
        let stream: Vec<u8> = messages
            .iter()
            .flat_map(|m| {
                let mut b = serde_json::to_vec(m).unwrap();
                b.extend_from_slice(b"\r\n");
                b
            })
            .collect();
        for chunk in [1, 2, 3, 7, 31, 32, 33, 100, 4096] {
            let mut s = Splitter::new(1 << 20);
            let mut got = Vec::new();
            for part in stream.chunks(chunk) {
                s.push(part);
                got.extend(all(&mut s));
            }
            let parsed: Vec<serde_json::Value> =
                got.iter().map(|m| serde_json::from_str(m).unwrap()).collect();
            assert_eq!(parsed, messages, "chunks of {chunk}");
            assert!(!s.has_partial());
        }
    }

    #[test]
    fn garbage_between_objects_is_reported_and_skipped() {
        let mut s = Splitter::new(1 << 20);
        s.push(b"hello {\"a\": 1} \x01\x02 {\"b\": 2}");
        assert_eq!(
            all(&mut s),
            ["garbage:5", "{\"a\": 1}", "garbage:2", "{\"b\": 2}"]
        );
    }

    #[test]
    fn oversized_message_is_skipped_with_its_id_and_the_stream_recovers() {
        let mut s = Splitter::new(1000);
        let big = "x".repeat(5000);
        let msg = format!("{{\"return\": \"{big}\", \"id\": 42}}\r\n{{\"return\": {{}}, \"id\": 43}}");
        // Feed in small pieces so the limit is crossed mid-message.
        let mut got = Vec::new();
        for chunk in msg.as_bytes().chunks(300) {
            s.push(chunk);
            got.extend(all(&mut s));
        }
        assert_eq!(got, ["too-large:5024:Some(42)", "{\"return\": {}, \"id\": 43}"]);
        // The same, arriving in one piece.
        let mut s = Splitter::new(1000);
        s.push(msg.as_bytes());
        assert_eq!(
            all(&mut s),
            ["too-large:5024:Some(42)", "{\"return\": {}, \"id\": 43}"]
        );
    }

    #[test]
    fn oversized_error_reply_keeps_id_from_head() {
        let o = Oversized {
            size: 10,
            head: br#"{"id": 9, "error": {"class": "GenericError", "desc": "xxxx"#.to_vec(),
            tail: br#"xxxxx"}}"#.to_vec(),
        };
        assert_eq!(o.id(), Some(9));
        assert!(!o.looks_like_event());
    }

    #[test]
    fn buffer_is_reused_not_grown_for_many_small_messages() {
        let mut s = Splitter::new(1 << 20);
        for i in 0..100_000 {
            s.push(format!("{{\"return\": {{}}, \"id\": {i}}}\r\n").as_bytes());
            assert_eq!(all(&mut s).len(), 1);
        }
        assert!(s.buf.len() <= 128 * 1024, "buffer grew to {}", s.buf.len());
    }
}
