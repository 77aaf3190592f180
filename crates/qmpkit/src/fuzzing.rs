//! Entry points for coverage-guided fuzzing (`fuzz/` in the repository),
//! behind the `fuzzing` feature. Not part of the API: each function feeds
//! arbitrary bytes to one internal layer and panics if a property that
//! layer promises does not hold, which is what a fuzzer looks for.

use crate::wire::message::{classify, Message, Outcome};
use crate::wire::splitter::{Fragment, Frame, Splitter};

/// A well-formed reply that must come through after any input.
const MARKER: &[u8] = b"\r\n{\"return\": {\"fuzz\": true}, \"id\": 18446744073709551615}\r\n";

/// Splits `data` as it arrives in pieces of the sizes `cuts` gives (cycled),
/// under a small size limit, and checks that every frame lies within the
/// buffer, that every message is one object, that nothing is left open
/// once the stream ends with a line break, and that a well-formed reply
/// sent after any input is the last frame, whole. The same stream through a
/// splitter that scans byte by byte only must give the same frames: the
/// block scan (64 bytes at a time) is an optimisation, never a difference.
pub fn split(data: &[u8], cuts: &[u8], limit: usize) {
    let mut stream = data.to_vec();
    stream.extend_from_slice(MARKER);
    let blocks = frames_of(Splitter::new(limit), &stream, cuts);
    let bytewise = frames_of(Splitter::bytewise(limit), &stream, cuts);
    assert!(blocks == bytewise, "the block scan and the byte loop disagree");
    assert!(
        matches!(blocks.last(), Some(Seen::Message(m)) if m == MARKER.trim_ascii()),
        "the well-formed reply after the input was lost"
    );
}

/// What a splitter handed over, to compare two splitters' output.
#[derive(PartialEq)]
enum Seen {
    Message(Vec<u8>),
    TooLarge(Fragment),
    Corrupt(Fragment),
    Garbage(usize),
}

/// Every frame `s` makes of `stream` arriving in pieces of the sizes `cuts`
/// gives, each checked on the way.
fn frames_of(mut s: Splitter, stream: &[u8], cuts: &[u8]) -> Vec<Seen> {
    let mut pieces = cuts.iter().map(|&c| usize::from(c).max(1)).cycle();
    let mut rest = stream;
    let mut frames = Vec::new();
    while !rest.is_empty() {
        let n = pieces.next().unwrap_or(rest.len()).min(rest.len());
        let spare = s.spare();
        let n = n.min(spare.len());
        spare[..n].copy_from_slice(&rest[..n]);
        s.filled(n);
        rest = &rest[n..];
        while let Some(frame) = s.next_frame() {
            frames.push(match frame {
                Frame::Message(range) => {
                    let bytes = s.bytes(range);
                    assert!(
                        bytes.first() == Some(&b'{') && bytes.last() == Some(&b'}'),
                        "not one object"
                    );
                    Seen::Message(bytes.to_vec())
                }
                Frame::TooLarge(f) => {
                    assert!(f.head.len() <= f.size && f.tail.len() <= f.size);
                    Seen::TooLarge(f)
                }
                Frame::Corrupt(f) => {
                    assert!(f.head.len() <= f.size && f.tail.len() <= f.size);
                    Seen::Corrupt(f)
                }
                Frame::Garbage(n) => {
                    assert!(n > 0, "empty garbage");
                    Seen::Garbage(n)
                }
            });
        }
    }
    assert!(!s.has_partial(), "a message is still open after the stream ended");
    frames
}

/// Classifies `data` as one message and checks that what it says is
/// consistent: a plain reply's value lies inside the message.
pub fn classify_message(data: &[u8]) {
    if let Message::Reply {
        outcome: Outcome::Plain(range),
        ..
    } = classify(data)
    {
        assert!(range.start < range.end && range.end <= data.len());
    }
}

#[cfg(test)]
mod tests {
    /// The fuzz targets' properties on seeded random streams built from the
    /// bytes that matter to a JSON splitter, so that CI checks them without
    /// a fuzzer. (Crashes a fuzzer finds become cases in the unit tests of
    /// the module concerned.)
    #[test]
    fn fuzz_properties_hold_on_seeded_random_streams() {
        const ALPHABET: &[u8] = b"{}{}\"\"\\\n\r [],:xid0123456789\x00\xff";
        const PIECES: &[&[u8]] = &[
            b"{\"return\": {}, \"id\": 1}\r\n",
            b"{\"id\": 2, \"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\r\n",
            b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n",
            b"{\n    \"return\": {\n        \"a\": \"}{\"\n    },\n    \"id\": 3\n}\n",
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..20_000 {
            let mut data = Vec::new();
            for _ in 0..rng.usize(0..6) {
                if rng.bool() {
                    data.extend_from_slice(PIECES[rng.usize(..PIECES.len())]);
                } else {
                    data.extend((0..rng.usize(1..12)).map(|_| ALPHABET[rng.usize(..ALPHABET.len())]));
                }
            }
            let cuts: Vec<u8> = (0..rng.usize(1..5)).map(|_| rng.u8(1..40)).collect();
            super::split(&data, &cuts, 1024);
            super::classify_message(&data);
        }
    }
}
