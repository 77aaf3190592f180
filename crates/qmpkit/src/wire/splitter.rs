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
//!
//! # Recovering from a corrupt stream
//!
//! A brace count alone never recovers from one corrupt message: after a lone
//! `{` or an unterminated string it would wait forever for a close that never
//! comes. QEMU's output gives a way back. A raw newline cannot occur inside a
//! JSON string (QEMU escapes it), and QEMU starts every top-level message at
//! the beginning of a line, also with `pretty=on`, where nested members are
//! indented. So a line that starts with `{` while a message is still open
//! means that message was cut short: it is reported as [`Frame::Corrupt`]
//! and the new line starts the next message. A corrupt message followed by
//! no newline at all is given up once it passes the size limit.

use memchr::memchr3;

/// The least free space offered to a read.
const MIN_READ: usize = 16 * 1024;

/// The size of a buffer made from nothing.
const FIRST_BUFFER: usize = 64 * 1024;

/// How many bytes of an oversized message's head and tail are kept.
const SKIP_KEEP: usize = 256;

/// How far a string is scanned byte by byte before `memchr2` takes over.
const LONG_STRING: usize = 32;

/// The bytes that change the scanner's state outside strings (a newline
/// matters because of what may follow it; see the module docs).
const STRUCTURAL: [u8; 4] = [b'"', b'{', b'}', b'\n'];

/// The bytes that change the scanner's state inside a string.
const IN_STRING: [u8; 3] = [b'"', b'\\', b'\n'];

const LOW_BITS: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Where the first byte of `bytes` that is one of `set` lies.
///
/// Eight bytes at a time in a plain register: for each wanted byte the
/// word is XORed with it, and the classic zero-byte test flags the bytes
/// that became zero. That test can also flag a byte above a real zero
/// (through the borrow), never one below the first, so the lowest flag of
/// all the wanted bytes is the first match. Fewer instructions than a
/// byte-by-byte search over QEMU's short tokens, without the start-up
/// cost of a vector search.
#[inline(always)]
fn first_of<const N: usize>(bytes: &[u8], set: [u8; N]) -> Option<usize> {
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let mut flags = 0;
        for wanted in set {
            let zeroed = word ^ (LOW_BITS * u64::from(wanted));
            flags |= zeroed.wrapping_sub(LOW_BITS) & !zeroed & HIGH_BITS;
        }
        if flags != 0 {
            return Some(at + (flags.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|b| set.contains(b))
        .map(|i| at + i)
}

/// The bytes a block scan looks at once (see [`Splitter::scan`]).
const BLOCK: usize = 64;

/// Where the bytes that matter to the scanner lie in one block without
/// backslashes: bit `i` of each mask is set when byte `i` is that byte.
#[derive(Default)]
struct Masks {
    quote: u64,
    open: u64,
    close: u64,
    newline: u64,
}

impl Masks {
    /// The masks of the `len` bytes from bit `shift` of a block, moved down
    /// to bit 0 and cut to `len` bits: the bytes around them (stale ones
    /// past the data, or the previous message's) must stop nothing.
    #[inline(always)]
    fn window(self, shift: usize, len: usize) -> Masks {
        debug_assert!(0 < len && shift + len <= BLOCK);
        let valid = u64::MAX >> (BLOCK - len);
        let cut = |mask: u64| (mask >> shift) & valid;
        Masks {
            quote: cut(self.quote),
            open: cut(self.open),
            close: cut(self.close),
            newline: cut(self.newline),
        }
    }
}

/// The masks of a block, sixteen bytes per SSE2 compare: a handful of
/// instructions for a block in which QEMU's short tokens put a dozen stops.
/// None when a backslash lies anywhere in the block (escapes are the byte
/// loop's), which is found first, with one mask for all 64 bytes, so that a
/// block with one costs little. A short block's backslash may lie past its
/// bytes: the byte loop takes it all the same, slower but no different.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn masks(block: &[u8; BLOCK]) -> Option<Masks> {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        _mm_setzero_si128,
    };
    // SAFETY: SSE2 is part of every x86_64 target, and each load reads 16
    // bytes inside `block` (unaligned loads allow any address).
    #[allow(unused_unsafe)]
    unsafe {
        let mut chunks = [_mm_setzero_si128(); BLOCK / 16];
        for (bytes, chunk) in chunks.iter_mut().zip(block.chunks_exact(16)) {
            *bytes = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
        }
        let backslash = _mm_set1_epi8(b'\\' as i8);
        let any = chunks.iter().fold(_mm_setzero_si128(), |any, &bytes| {
            _mm_or_si128(any, _mm_cmpeq_epi8(bytes, backslash))
        });
        if _mm_movemask_epi8(any) != 0 {
            return None;
        }
        let mut m = Masks::default();
        let wanted = [b'"', b'{', b'}', b'\n'].map(|b| _mm_set1_epi8(b as i8));
        for (i, &bytes) in chunks.iter().enumerate() {
            let bits =
                wanted.map(|w| u64::from(_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, w)) as u16) << (16 * i));
            m.quote |= bits[0];
            m.open |= bits[1];
            m.close |= bits[2];
            m.newline |= bits[3];
        }
        Some(m)
    }
}

/// Elsewhere there is no block scan: the byte loop does it all.
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn masks(_block: &[u8; BLOCK]) -> Option<Masks> {
    None
}

/// Bit `i` is the parity of the bits `0..=i` of `x`: for a quote mask, the
/// bytes from an opening quote up to (not including) its closing one.
#[inline(always)]
fn prefix_xor(mut x: u64) -> u64 {
    x ^= x << 1;
    x ^= x << 2;
    x ^= x << 4;
    x ^= x << 8;
    x ^= x << 16;
    x ^= x << 32;
    x
}

/// The state the scan carries from byte to byte.
#[derive(Clone, Copy)]
struct ScanState {
    depth: u32,
    in_str: bool,
    line_start: bool,
}

/// What one block did to the scan.
enum BlockStep {
    /// The object closed or was cut short, at this offset in the block.
    Done(Scan),
    /// Neither: the state after the block's last byte.
    Through(ScanState),
}

/// The byte loop of [`Splitter::scan`] over the first `len` bytes of one
/// block without backslashes, from its masks (no bit set at `len` or above):
/// strings are where the quotes' running parity is odd, braces outside them
/// change the depth, and a `{` right after a newline cuts the object short
/// wherever it is (as the byte loop does). `at` is the block's offset in
/// the buffer.
#[inline(always)]
fn block_step(m: &Masks, at: usize, len: usize, st: ScanState) -> BlockStep {
    let cut = ((m.newline << 1) | u64::from(st.line_start)) & m.open;
    let inside = prefix_xor(m.quote) ^ if st.in_str { !0 } else { 0 };
    let opens = m.open & !inside;
    let mut stops = cut | opens | (m.close & !inside);
    let mut depth = st.depth;
    while stops != 0 {
        let i = stops.trailing_zeros();
        let bit = 1u64 << i;
        stops &= !bit;
        if cut & bit != 0 {
            return BlockStep::Done(Scan::Cut(at + i as usize));
        }
        if opens & bit != 0 {
            depth += 1;
        } else {
            depth -= 1;
            if depth == 0 {
                return BlockStep::Done(Scan::Closed(at + i as usize + 1));
            }
        }
    }
    // The state after byte `len - 1`, the last one scanned: a short block
    // (the tail of the buffered bytes) ends before bit 63.
    let last = len - 1;
    BlockStep::Through(ScanState {
        depth,
        in_str: (inside >> last) & 1 != 0,
        line_start: (m.newline >> last) & 1 != 0,
    })
}

/// One unit of output found in the stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A complete top-level JSON object (as bytes; it may still be invalid JSON).
    Message(std::ops::Range<usize>),
    /// A message that exceeded the size limit and was skipped.
    TooLarge(Fragment),
    /// A message cut short: a new message began (a line starting with `{`)
    /// before it closed. Its bytes are dropped.
    Corrupt(Fragment),
    /// Bytes outside any object that are neither whitespace nor an object.
    Garbage(usize),
}

/// What is kept of a message that is not handed over whole: its size, and
/// its first and last bytes, which may tell which command it answered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Fragment {
    /// The size of the whole message (or of what arrived of it).
    pub size: usize,
    /// Its first bytes.
    pub head: Vec<u8>,
    /// Its last bytes.
    pub tail: Vec<u8>,
}

impl Fragment {
    fn of(bytes: &[u8]) -> Self {
        Fragment {
            size: bytes.len(),
            head: bytes[..bytes.len().min(SKIP_KEEP)].to_vec(),
            tail: bytes[bytes.len().saturating_sub(SKIP_KEEP)..].to_vec(),
        }
    }

    /// The id of the reply, where QEMU puts it: first in an error reply
    /// (`{"id": N, ...`), last in a success reply (`..., "id": N}`). Only
    /// those places count: an `"id"` anywhere else may belong to the data.
    pub fn id(&self) -> Option<u64> {
        super::trailing_id(&self.tail).or_else(|| super::leading_id(&self.head))
    }

    /// True when the visible head says this is an event rather than a reply.
    pub fn looks_like_event(&self) -> bool {
        memchr::memmem::find(&self.head, b"\"event\"").is_some()
            && memchr::memmem::find(&self.head, b"\"return\"").is_none()
    }
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
    /// The last byte scanned inside a message was a newline: a `{` next
    /// starts a new message (see the module docs).
    line_start: bool,
    limit: usize,
    /// The least free space offered to a read, and the size of a buffer
    /// made from nothing.
    min_read: usize,
    first_buffer: usize,
    /// Boxed: rare, and the splitter lives in every connection's task.
    skip: Option<Box<Fragment>>,
    /// Whether [`Splitter::scan`] may take whole blocks at once (always,
    /// but for the tests that compare it with the byte loop alone).
    blocks: bool,
}

/// Where a scan stopped.
enum Scan {
    /// The object closed; the index after its last byte.
    Closed(usize),
    /// A line starting with `{` began at this index while the object was open.
    Cut(usize),
    /// The buffered bytes end inside the object.
    Open,
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
            line_start: false,
            limit: limit.max(4 * SKIP_KEEP),
            min_read: MIN_READ,
            first_buffer: FIRST_BUFFER,
            skip: None,
            blocks: true,
        }
    }

    /// A splitter that scans byte by byte only, never a block at once: the
    /// reference the block scan is fuzzed against.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn bytewise(limit: usize) -> Self {
        Splitter {
            blocks: false,
            ..Splitter::new(limit)
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

    /// Appends bytes (for callers that do not read into [`Splitter::spare`],
    /// such as the guest agent, which must look at each byte first).
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
            match self.scan() {
                Scan::Closed(stop) => {
                    let range = self.start..stop;
                    self.start = stop;
                    if range.len() > self.limit {
                        // Arrived whole in one read, but too large all the same.
                        return Some(Frame::TooLarge(Fragment::of(&self.buf[range])));
                    }
                    return Some(Frame::Message(range));
                }
                Scan::Cut(at) => {
                    let cut = Fragment::of(&self.buf[self.start..at]);
                    self.start = at;
                    return Some(Frame::Corrupt(cut));
                }
                Scan::Open => {}
            }
            if self.pos - self.start > self.limit {
                self.skip = Some(Box::new(Fragment::of(&self.buf[self.start..self.pos])));
                self.start = self.pos;
                continue;
            }
            return None;
        }
    }

    /// Forgets the open object's state, so that scanning starts afresh at `at`.
    fn restart_at(&mut self, at: usize) {
        self.pos = at;
        self.depth = 0;
        self.in_str = false;
        self.escaped = false;
        self.line_start = false;
    }

    /// Scans from `pos` to `end` for the end of the open object, or for a
    /// line starting with `{` that cuts it short.
    ///
    /// Blocks of [`BLOCK`] bytes without backslashes, the last one of the
    /// buffered bytes however short, are taken at once from their masks
    /// (see [`block_step`]). The byte loop takes the rest: tight loops skip
    /// the bytes that cannot change the state, which for QEMU's typical
    /// replies (short keys and values) costs less than starting a vector
    /// search at every quote; a string still open after [`LONG_STRING`]
    /// bytes (console data in base64, schema text) is crossed with `memchr3`.
    fn scan(&mut self) -> Scan {
        let end = self.end;
        // The whole buffer, past the data too: a short block at the end of
        // the data is loaded from here and its masks cut to the data.
        let whole = &self.buf[..];
        let buf = &whole[..end];
        let (mut pos, mut depth) = (self.pos, self.depth);
        let (mut in_str, mut escaped) = (self.in_str, self.escaped);
        let mut line_start = self.line_start;
        // No block scan before this offset (a block there held a backslash).
        let mut bytewise_until = if self.blocks { pos } else { usize::MAX };
        // A whole block lay inside one string: the byte loop, which crosses
        // long strings with memchr, finishes that string.
        let mut long_string = false;
        let outcome = loop {
            if !escaped && pos >= bytewise_until && pos < end && !(in_str && long_string) {
                let len = (end - pos).min(BLOCK);
                let loaded = if len == BLOCK {
                    masks(buf[pos..pos + BLOCK].try_into().expect("a block"))
                } else {
                    // Fewer than a block's bytes left (the last part of
                    // nearly every message): they are still a block's work,
                    // where the byte loop would stop at every quote. The
                    // block loaded is the one at `pos` when the buffer
                    // reaches that far (the bytes past `end` are stale but
                    // initialised), else the buffer's last one, which ends
                    // at or after `end`; either way the masks are moved and
                    // cut to the bytes `pos..end`. (A buffer shorter than a
                    // block, which only tests make, has no block to load:
                    // the byte loop takes it.)
                    let from = pos.min(whole.len().saturating_sub(BLOCK));
                    whole
                        .get(from..from + BLOCK)
                        .and_then(|b| masks(b.try_into().expect("a block")))
                        .map(|m| m.window(pos - from, len))
                };
                if let Some(m) = loaded {
                    let st = ScanState {
                        depth,
                        in_str,
                        line_start,
                    };
                    match block_step(&m, pos, len, st) {
                        BlockStep::Done(outcome) => break outcome,
                        BlockStep::Through(st) => {
                            (depth, in_str, line_start) = (st.depth, st.in_str, st.line_start);
                            long_string = in_str && m.quote == 0;
                            pos += len;
                            continue;
                        }
                    }
                }
                // A backslash (in the block, or past a short one) or no block
                // scan here: the byte loop takes this block.
                bytewise_until = pos + BLOCK;
            }
            if pos == end {
                break Scan::Open;
            }
            if line_start {
                line_start = false;
                if buf[pos] == b'{' {
                    break Scan::Cut(pos);
                }
            }
            if escaped {
                escaped = false;
                line_start = buf[pos] == b'\n';
                pos += 1;
                continue;
            }
            if in_str {
                let stop = end.min(pos + LONG_STRING);
                let near = first_of(&buf[pos..stop], IN_STRING);
                match near.or_else(|| memchr3(b'"', b'\\', b'\n', &buf[stop..]).map(|i| i + stop - pos)) {
                    Some(i) => pos += i,
                    None => {
                        pos = end;
                        continue;
                    }
                }
                // A quote ends the string; a backslash escapes the next byte;
                // a raw newline is not JSON, but may be where the stream
                // starts over.
                match buf[pos] {
                    b'"' => in_str = false,
                    b'\\' => escaped = true,
                    _ => line_start = true,
                }
                pos += 1;
                continue;
            }
            match first_of(&buf[pos..], STRUCTURAL) {
                Some(i) => pos += i,
                None => {
                    pos = end;
                    continue;
                }
            }
            let b = buf[pos];
            pos += 1;
            match b {
                b'"' => in_str = true,
                b'{' => depth += 1,
                b'\n' => line_start = true,
                _ => {
                    depth -= 1;
                    if depth == 0 {
                        break Scan::Closed(pos);
                    }
                }
            }
        };
        match outcome {
            Scan::Open => {
                self.pos = pos;
                self.depth = depth;
                self.in_str = in_str;
                self.escaped = escaped;
                self.line_start = line_start;
            }
            Scan::Closed(at) | Scan::Cut(at) => self.restart_at(at),
        }
        outcome
    }

    /// Discards an oversized message, keeping its head and tail. It ends
    /// where the object closes, or where a new message cuts it short.
    fn skip_message(&mut self) -> Option<Frame> {
        let from = self.pos;
        let outcome = self.scan();
        let stop = match outcome {
            Scan::Closed(at) | Scan::Cut(at) => at,
            Scan::Open => self.pos,
        };
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
        match outcome {
            Scan::Open => None,
            _ => self.skip.take().map(|f| Frame::TooLarge(*f)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_of_finds_the_first_wanted_byte_wherever_it_lies() {
        let mut rng = fastrand::Rng::with_seed(16);
        // Bytes next to the wanted ones (and zero, and the high ones) are
        // where a wrong borrow would show.
        let alphabet = [
            b'"', b'{', b'}', b'\n', b'\\', b'!', b'#', b'z', b'|', b'~', 0, 1, 0x80, 0xff, b'a',
        ];
        for _ in 0..20_000 {
            let len = rng.usize(0..40);
            let bytes: Vec<u8> = (0..len).map(|_| alphabet[rng.usize(..alphabet.len())]).collect();
            assert_eq!(
                first_of(&bytes, STRUCTURAL),
                bytes.iter().position(|b| STRUCTURAL.contains(b)),
                "{bytes:?}"
            );
            assert_eq!(
                first_of(&bytes, IN_STRING),
                bytes.iter().position(|b| IN_STRING.contains(b)),
                "{bytes:?}"
            );
        }
    }

    fn all(s: &mut Splitter) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(f) = s.next_frame() {
            match f {
                Frame::Message(r) => out.push(String::from_utf8(s.bytes(r).to_vec()).unwrap()),
                Frame::Garbage(n) => out.push(format!("garbage:{n}")),
                Frame::TooLarge(o) => out.push(format!("too-large:{}:{:?}", o.size, o.id())),
                Frame::Corrupt(c) => out.push(format!("corrupt:{}:{:?}", c.size, c.id())),
            }
        }
        out
    }

    /// What a splitter holds between reads: where it stands and the state
    /// the next read's scan starts from.
    fn scan_state(s: &Splitter) -> String {
        format!(
            "start {} pos {} end {} depth {} in_str {} escaped {} line_start {} skipping {}",
            s.start,
            s.pos,
            s.end,
            s.depth,
            s.in_str,
            s.escaped,
            s.line_start,
            s.skip.is_some()
        )
    }

    /// Feeds `stream` cut at `cuts` (ascending, the last at its end) to a
    /// splitter that takes blocks and to one that scans byte by byte, and
    /// checks that both find the same frames and hold the same state after
    /// every read, so that a block scan stopping inside a message leaves
    /// the next read what the byte loop would. The buffer starts full of
    /// bytes that would change the scan (as a pooled buffer holds an
    /// earlier connection's messages), which a block reaching past the data
    /// must ignore (no backslashes: one there would only send the block to
    /// the byte loop, leaving the block untested); a `tiny` one instead
    /// grows from one byte and is filled to its end by each push, so that
    /// blocks meet the end of the buffer (and buffers shorter than a block).
    fn same_as_bytewise(stream: &[u8], cuts: &[usize], limit: usize, tiny: bool) {
        let describe = |s: &Splitter, f: Frame| match f {
            Frame::Message(r) => format!("message {:?}", String::from_utf8_lossy(s.bytes(r))),
            other => format!("{other:?}"),
        };
        let run = |blocks: bool| {
            let mut s = Splitter::new(limit);
            s.blocks = blocks;
            if tiny {
                (s.min_read, s.first_buffer) = (1, 1);
            } else {
                s.adopt(b"{\n{\"}".repeat(FIRST_BUFFER / 5));
            }
            let mut out = Vec::new();
            let mut from = 0;
            for &cut in cuts {
                s.push(&stream[from..cut]);
                from = cut;
                while let Some(f) = s.next_frame() {
                    out.push(describe(&s, f));
                }
                out.push(scan_state(&s));
            }
            out.push(format!("partial {}", s.has_partial()));
            out
        };
        assert_eq!(
            run(true),
            run(false),
            "{:?} cut at {cuts:?}, tiny buffer {tiny}",
            String::from_utf8_lossy(stream)
        );
    }

    /// Whatever the stream and however it arrives, taking whole blocks at
    /// once finds the same frames as the byte loop alone.
    #[test]
    fn the_block_scan_finds_what_the_byte_loop_finds() {
        let long = format!("\"{}\"", "x".repeat(150));
        let long_escaped = format!("\"{}\\\"{}\"", "y".repeat(70), "z".repeat(90));
        let pieces: Vec<&[u8]> = vec![
            b"{",
            b"}",
            b"\"",
            b"\\",
            b"\\\"",
            b"\n",
            b"\r\n",
            b"\n{",
            b"\n}",
            b" ",
            b"ab",
            b": 1, ",
            b"\xff\xc3",
            b"\"k\": ",
            b"\"{\\n}\"",
            long.as_bytes(),
            long_escaped.as_bytes(),
            b"{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 42}, \"event\": \"STOP\"}\r\n",
            b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"X\", \"data\": {\"a\": \"}{\\\\\", \"b\": [{}]}}\r\n",
            b"{\n    \"return\": {\n        \"status\": \"running\"\n    },\n    \"id\": 1\n}\n",
            b"{\"return\": {}, \"id\": 7}\r\n",
        ];
        let mut rng = fastrand::Rng::with_seed(64);
        for round in 0..3000 {
            let mut stream = Vec::new();
            while stream.len() < rng.usize(1..1500) {
                // Mostly whole messages, so that the blocks see real ones.
                let piece = if rng.u8(..4) == 0 {
                    pieces[rng.usize(..pieces.len())]
                } else {
                    pieces[rng.usize(pieces.len() - 4..pieces.len())]
                };
                stream.extend_from_slice(piece);
            }
            let limit = if round % 5 == 0 { 1024 } else { 1 << 20 };
            let mut cuts: Vec<usize> = (0..rng.usize(0..6)).map(|_| rng.usize(..=stream.len())).collect();
            cuts.push(stream.len());
            cuts.sort_unstable();
            same_as_bytewise(&stream, &cuts, limit, round % 3 == 0);
        }
    }

    /// The last bytes of a message, fewer than a block, are where nearly
    /// every message ends: a string of every length from 0 to 140 bytes
    /// moves each of these messages' closing brace, string ends, escapes,
    /// newlines and cut points through every offset of its last block, and
    /// each stream is cut at every byte, so that a read also ends at every
    /// offset (inside a string, right after a newline or a `{`, ...).
    #[test]
    fn tails_of_every_length_match_the_byte_loop() {
        let templates: &[&str] = &[
            // A reply: the closing braces and the id in the tail.
            "{\"return\": {\"status\": \"PAD\", \"running\": false}, \"id\": 12345}\r\n",
            // An escaped quote and an escaped backslash (the byte loop's).
            "{\"a\": \"PAD\\\"}\", \"b\": \"\\\\\", \"c\": {}}\r\n",
            // Braces inside strings, and messages back to back.
            "{\"a\": \"}PAD{\"}{\"b\": \"{\"}{\"c\": {\"d\": \"}}\"}}\n",
            // A message cut short inside a string, then one cut short
            // outside strings (x's standing for members), then a whole one.
            "{\"return\": \"PAD\r\n{\"a\": 1, PAD\n{\"return\": {}, \"id\": 2}\r\n",
            // Pretty-printed: newlines inside the object that cut nothing.
            "{\n    \"return\": {\n        \"s\": \"PAD\"\n    },\n    \"id\": 1\n}\n",
            // A raw newline inside a string, then a `{`: a cut even there.
            "{\"a\": \"PAD\n{\", \"b\": 1}\n{\"c\": \"\n\"}\n",
            // Garbage, whitespace and an empty object between messages.
            "{}  xyz {\"a\": [PAD]} \r\n{\"b\": {}}",
        ];
        for template in templates {
            for pad in 0..=140 {
                let stream = template.replace("PAD", &"x".repeat(pad));
                let stream = stream.as_bytes();
                same_as_bytewise(stream, &[stream.len()], 1 << 20, false);
                for cut in 0..=stream.len() {
                    same_as_bytewise(stream, &[cut, stream.len()], 1 << 20, false);
                }
                same_as_bytewise(stream, &[stream.len()], 1 << 20, true);
            }
        }
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
        let o = Fragment {
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

    /// Feeds `stream` cut at every byte boundary (and one byte at a time)
    /// and checks that each way gives `want` (garbage reported in pieces
    /// counts as one run).
    fn splits_everywhere_to(stream: &[u8], limit: usize, want: &[&str]) {
        fn merged(frames: Vec<String>) -> Vec<String> {
            let mut out: Vec<String> = Vec::new();
            for f in frames {
                let n = |s: &str| s.strip_prefix("garbage:").and_then(|n| n.parse::<usize>().ok());
                match (out.last().and_then(|l| n(l)), n(&f)) {
                    (Some(a), Some(b)) => *out.last_mut().unwrap() = format!("garbage:{}", a + b),
                    _ => out.push(f),
                }
            }
            out
        }
        for cut in 0..=stream.len() {
            let mut s = Splitter::new(limit);
            let mut got = Vec::new();
            s.push(&stream[..cut]);
            got.extend(all(&mut s));
            s.push(&stream[cut..]);
            got.extend(all(&mut s));
            assert_eq!(merged(got), want, "cut at {cut}");
        }
        let mut s = Splitter::new(limit);
        let mut got = Vec::new();
        for b in stream {
            s.push(&[*b]);
            got.extend(all(&mut s));
        }
        assert_eq!(merged(got), want, "one byte at a time");
    }

    #[test]
    fn a_line_starting_with_a_brace_ends_a_corrupt_message() {
        let next = "{\"return\": {}, \"id\": 2}";
        for (corrupt, want_first) in [
            // An object that never closes, after garbage.
            ("x{y", vec!["garbage:1", "corrupt:4:None"]),
            // An unterminated string, after garbage.
            ("junk{\"", vec!["garbage:4", "corrupt:4:None"]),
            // A reply cut inside its value.
            ("{\"return\": \"abc", vec!["corrupt:17:None"]),
            // A lone quote, then a brace.
            ("\"{", vec!["garbage:1", "corrupt:3:None"]),
            // An error reply cut short keeps its id, which QEMU writes first.
            (
                "{\"id\": 7, \"error\": {\"class\": \"Gen",
                vec!["corrupt:35:Some(7)"],
            ),
            // A backslash right before the newline.
            ("{\"return\": \"a\\", vec!["corrupt:16:None"]),
        ] {
            let stream = format!("{corrupt}\r\n{next}\r\n{next}\r\n");
            let mut want = want_first.clone();
            want.extend([next, next]);
            splits_everywhere_to(stream.as_bytes(), 1 << 20, &want);
        }
    }

    #[test]
    fn pretty_printed_messages_are_never_cut() {
        let pretty = "{\n    \"return\": [\n        {\n            \"a\": {\n                \"b\": \"{\"\n            }\n        }\n    ],\n    \"id\": 1\n}\n";
        let stream = format!("{pretty}{pretty}");
        let one = pretty.trim_end();
        splits_everywhere_to(stream.as_bytes(), 1 << 20, &[one, one]);
    }

    #[test]
    fn a_corrupt_message_without_newlines_is_given_up_at_the_limit() {
        // No newline ever comes while the object is open: it grows past the
        // limit, is skipped, and the next line that starts with `{` ends it.
        let mut stream = String::from("{\"return\": \"");
        stream.push_str(&"z".repeat(3000));
        stream.push_str("\r\n{\"return\": {}, \"id\": 9}\r\n");
        let mut s = Splitter::new(1000);
        let mut got = Vec::new();
        for chunk in stream.as_bytes().chunks(100) {
            s.push(chunk);
            got.extend(all(&mut s));
        }
        assert_eq!(got, ["too-large:3014:None", "{\"return\": {}, \"id\": 9}"]);
        assert!(!s.has_partial());
    }

    #[test]
    fn ids_are_read_only_where_qemu_puts_them() {
        let f = |bytes: &[u8]| Fragment::of(bytes).id();
        assert_eq!(f(br#"{"return": {"id": 5}, "id": 6}"#), Some(6));
        assert_eq!(f(br#"{"id": 6, "error": {"class": "#), Some(6));
        // An id inside the data is not the reply's.
        assert_eq!(f(br#"{"return": {"id": 5"#), None);
        assert_eq!(f(br#"{"return": [{"id": 5}]"#), None);
    }
}
