//! Splitting a byte stream into top-level JSON values, the way QMP servers do.

/// Splits a byte stream into top-level JSON values by tracking bracket depth,
/// honouring strings and escapes.
///
/// Newlines are irrelevant: values may be separated by whitespace, by nothing
/// at all, or arrive split across any number of [`push`](Self::push) calls.
/// Scanning resumes where it stopped, so each byte is examined once.
///
/// Top-level bytes that cannot start an object or array are still returned,
/// so that callers can report them as errors: a stray `}`/`]` is returned
/// alone, a string is returned when it closes, and any other run of bytes
/// (`foo`, `42`) is returned when whitespace or a bracket or quote follows it.
#[derive(Debug, Default)]
pub struct JsonSplitter {
    buf: Vec<u8>,
    /// Bytes before this index have been returned or skipped.
    consumed: usize,
    /// Next byte to scan.
    pos: usize,
    /// Start of the value being scanned, if any.
    start: Option<usize>,
    depth: usize,
    in_str: bool,
    escape: bool,
    scalar: bool,
}

impl JsonSplitter {
    /// Creates an empty splitter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.pos -= self.consumed;
            if let Some(start) = &mut self.start {
                *start -= self.consumed;
            }
            self.consumed = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes pushed but not yet returned by [`next`](Self::next) (a partial
    /// value, or whitespace).
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.consumed..]
    }

    /// Returns the exact bytes of the next complete top-level value, or `None`
    /// if more input is needed.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Vec<u8>> {
        while self.pos < self.buf.len() {
            let i = self.pos;
            let b = self.buf[i];
            self.pos += 1;
            let Some(start) = self.start else {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => self.consumed = self.pos,
                    b'{' | b'[' => {
                        self.start = Some(i);
                        self.depth = 1;
                    }
                    b'"' => {
                        self.start = Some(i);
                        self.in_str = true;
                    }
                    b'}' | b']' => return Some(self.take(i, self.pos)),
                    _ => {
                        self.start = Some(i);
                        self.scalar = true;
                    }
                }
                continue;
            };
            if self.in_str {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_str = false;
                    if self.depth == 0 {
                        return Some(self.take(start, self.pos));
                    }
                }
            } else if self.scalar {
                if matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'[' | b'}' | b']' | b'"') {
                    self.pos = i; // rescan the delimiter at top level
                    self.scalar = false;
                    return Some(self.take(start, i));
                }
            } else {
                match b {
                    b'"' => self.in_str = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            return Some(self.take(start, self.pos));
                        }
                    }
                    _ => {}
                }
            }
        }
        None
    }

    fn take(&mut self, from: usize, to: usize) -> Vec<u8> {
        self.start = None;
        self.consumed = to;
        self.buf[from..to].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::JsonSplitter;

    fn split_all(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = JsonSplitter::new();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c);
            while let Some(v) = s.next() {
                out.push(String::from_utf8(v).unwrap());
            }
        }
        out
    }

    const TRICKY: &str = r#"{"execute":"x","arguments":{"s":"}{\"\\","t":["]",{}]},"id":"\"}"}"#;

    #[test]
    fn crlf_separated() {
        let input = b"{\"a\":1}\r\n{\"b\":{\"c\":2}}\r\n  \n{}\r\n";
        assert_eq!(split_all(&[input]), ["{\"a\":1}", "{\"b\":{\"c\":2}}", "{}"]);
    }

    #[test]
    fn no_separator() {
        let input = b"{\"a\":1}{\"b\":[1,2]}[3]{}";
        assert_eq!(split_all(&[input]), ["{\"a\":1}", "{\"b\":[1,2]}", "[3]", "{}"]);
    }

    #[test]
    fn strings_with_braces_and_escapes() {
        let input = format!("{TRICKY}\n{TRICKY}");
        assert_eq!(split_all(&[input.as_bytes()]), [TRICKY, TRICKY]);
        let v: serde_json::Value = serde_json::from_str(TRICKY).unwrap();
        assert_eq!(v["arguments"]["s"], "}{\"\\");
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let input = format!("{TRICKY}\r\n{{\"b\":2}}{TRICKY}");
        let bytes = input.as_bytes();
        let want = [TRICKY, "{\"b\":2}", TRICKY];
        for cut in 0..=bytes.len() {
            assert_eq!(split_all(&[&bytes[..cut], &bytes[cut..]]), want, "cut at {cut}");
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(split_all(&singles), want);
    }

    #[test]
    fn partial_value_stays_pending() {
        let mut s = JsonSplitter::new();
        s.push(b"{\"a\":1} {\"b\":");
        assert_eq!(s.next().unwrap(), b"{\"a\":1}");
        assert_eq!(s.next(), None);
        assert_eq!(s.pending(), b"{\"b\":"); // leading whitespace already skipped
        s.push(b"2}");
        assert_eq!(s.next().unwrap(), b"{\"b\":2}");
        assert_eq!(s.pending(), b"");
    }

    #[test]
    fn top_level_garbage_is_returned() {
        let input = b"foo {\"a\":1}} \"str\" 42\n";
        assert_eq!(split_all(&[input]), ["foo", "{\"a\":1}", "}", "\"str\"", "42"]);
    }
}
