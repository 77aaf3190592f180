//! The traffic log: a transcript of commands, replies and events in the Go
//! package's format, for operators who read and grep Incus's `qemu.qmp.log`.
//!
//! Each line is `[TIME] QUERY: request`, `[TIME] REPLY: reply` followed by an
//! empty line, or `[TIME] Event: event`, exactly as Go writes them: TIME is
//! RFC 3339 to the second in the local time zone (`Z` when its offset is
//! zero), the request is the bytes written to QEMU less their line end (key
//! order and all), and replies and events are QEMU's lines as read.
//! `VSERPORT_CHANGE` events are left out, as in Go; which commands are left
//! out is the connection's setting (see `ConnectOptions::log_excluded`).
//!
//! Two deliberate differences from Go: secrets are blanked out of requests
//! before they are written (Go logs them), and error replies are logged too
//! (Go logs only successful ones). Logging never fails a command: a log that
//! cannot be opened means no log, and a write error is ignored (a caller
//! might otherwise retry a command that did run). The file is created with
//! mode 0600, as Go creates it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{LazyLock, Mutex};

use jiff::tz::TimeZone;

/// What replaces a secret in the log (a JSON string, so the line stays JSON).
const REDACTED: &[u8] = b"\"<redacted>\"";

/// Events Go leaves out of the log: the agent's serial port opening and
/// closing, which a guest may do often.
const UNLOGGED_EVENTS: &[&str] = &["VSERPORT_CHANGE"];

/// The local time zone, read once per process as Go reads `time.Local`: from
/// `TZ` if set (empty meaning UTC), else `/etc/localtime`; UTC when neither
/// can be used, as in Go.
static LOCAL: LazyLock<TimeZone> = LazyLock::new(|| TimeZone::try_system().unwrap_or(TimeZone::UTC));

pub(crate) struct TrafficLog {
    file: Mutex<File>,
}

impl TrafficLog {
    /// Opens (appends to) the log; `None`, with a warning, when it cannot be
    /// opened, for example because its directory does not exist.
    pub(crate) fn open(path: &Path) -> Option<TrafficLog> {
        match OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
        {
            Ok(file) => Some(TrafficLog {
                file: Mutex::new(file),
            }),
            Err(e) => {
                crate::diag::warning!(path = %path.display(), error = %e, "QMP traffic log disabled");
                None
            }
        }
    }

    /// Logs a request as it was written to the socket.
    pub(crate) fn query(&self, request: &[u8]) {
        let request = request.trim_ascii_end();
        match redacted(request) {
            Some(text) => self.line("QUERY", &text, b"\n"),
            None => self.line("QUERY", request, b"\n"),
        }
    }

    /// Logs a reply as it was read, then an empty line, as Go does.
    pub(crate) fn reply(&self, reply: &[u8]) {
        self.line("REPLY", reply.trim_ascii(), b"\n\n");
    }

    /// Logs an event as it was read, unless Go leaves its kind out.
    pub(crate) fn event(&self, name: &str, event: &[u8]) {
        if !UNLOGGED_EVENTS.contains(&name) {
            self.line("Event", event.trim_ascii(), b"\n");
        }
    }

    fn line(&self, kind: &str, body: &[u8], end: &[u8]) {
        let mut line = Vec::with_capacity(body.len() + 48);
        line.push(b'[');
        stamp(&mut line, jiff::Timestamp::now(), &LOCAL);
        line.extend_from_slice(b"] ");
        line.extend_from_slice(kind.as_bytes());
        line.extend_from_slice(b": ");
        line.extend_from_slice(body);
        line.extend_from_slice(end);
        if let Ok(mut f) = self.file.lock() {
            // Best effort by design: see the module docs.
            let _ = f.write_all(&line);
        }
    }
}

/// Appends `now` as Go's `time.RFC3339` layout prints it in zone `tz`:
/// `2006-01-02T15:04:05+07:00`, with `Z` for a zero offset and the offset
/// cut to whole minutes (toward zero).
fn stamp(out: &mut Vec<u8>, now: jiff::Timestamp, tz: &TimeZone) {
    let offset = tz.to_offset(now);
    let t = offset.to_datetime(now);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let seconds = offset.seconds();
    if seconds == 0 {
        out.push(b'Z');
        return;
    }
    let minutes = seconds / 60;
    let sign = if minutes < 0 { '-' } else { '+' };
    let minutes = minutes.abs();
    let _ = write!(out, "{sign}{:02}:{:02}", minutes / 60, minutes % 60);
}

/// The request with its secrets blanked out, or `None` when it has none
/// (then it is logged as it is): the `data` of a `secret` object, and every
/// member whose name mentions a password, a passphrase or `key-secret-data`.
/// Everything else is kept byte for byte, so the line is still the request
/// as written. A request that cannot be scanned is withheld whole rather
/// than risk a secret.
pub(crate) fn redacted(request: &[u8]) -> Option<Vec<u8>> {
    // Most requests mention nothing of the kind: no scan, no copy. A
    // backslash could spell a member name in escapes, so it is scanned too.
    if !contains_ignore_case(request, b"pass")
        && !contains_ignore_case(request, b"secret")
        && !request.contains(&b'\\')
    {
        return None;
    }
    let Some(spans) = Scan::secrets(request) else {
        return Some(b"\"<withheld: not a JSON object>\"".to_vec());
    };
    if spans.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(request.len());
    let mut at = 0;
    for span in spans {
        out.extend_from_slice(&request[at..span.start]);
        out.extend_from_slice(REDACTED);
        at = span.end;
    }
    out.extend_from_slice(&request[at..]);
    Some(out)
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// A member name whose value is a secret wherever it appears.
fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("password") || name == "passphrase" || name == "key-secret-data"
}

/// Where a value sits, as far as the secret rules care.
#[derive(Clone, Copy, PartialEq, Eq)]
enum At {
    Root,
    Arguments,
    Elsewhere,
}

/// Nesting deeper than this is not a QMP request: give up rather than
/// recurse without bound.
const MAX_DEPTH: usize = 128;

/// A scan of a request for the byte ranges of its secret values. It checks
/// only what it needs to find them; the request was written by our own
/// encoder, so it is valid JSON.
struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
    depth: usize,
    spans: Vec<Range<usize>>,
    execute: Option<String>,
    qom_type: Option<String>,
    data: Option<Range<usize>>,
}

impl Scan<'_> {
    /// The ranges to blank out, in order and not overlapping; `None` when
    /// the request is not a JSON object.
    fn secrets(bytes: &[u8]) -> Option<Vec<Range<usize>>> {
        let mut scan = Scan {
            bytes,
            at: 0,
            depth: 0,
            spans: Vec::new(),
            execute: None,
            qom_type: None,
            data: None,
        };
        scan.space();
        if scan.peek()? != b'{' {
            return None;
        }
        scan.value(At::Root)?;
        scan.space();
        if scan.at != bytes.len() {
            return None;
        }
        let secret_object = scan.execute.as_deref() == Some("object-add")
            && scan.qom_type.as_deref().is_some_and(|t| t.starts_with("secret"));
        if let (true, Some(data)) = (secret_object, scan.data.take()) {
            scan.spans.push(data);
        }
        // An outer secret swallows any inner one.
        scan.spans.sort_by_key(|s| (s.start, std::cmp::Reverse(s.end)));
        let mut spans: Vec<Range<usize>> = Vec::with_capacity(scan.spans.len());
        for s in scan.spans {
            if spans.last().is_none_or(|last| s.start >= last.end) {
                spans.push(s);
            }
        }
        Some(spans)
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn space(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.space();
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn value(&mut self, at: At) -> Option<()> {
        self.space();
        match self.peek()? {
            b'{' => self.nested(|s| s.object(at)),
            b'[' => self.nested(Scan::array),
            b'"' => self.string(),
            _ => {
                let start = self.at;
                while self
                    .peek()
                    .is_some_and(|b| !matches!(b, b',' | b']' | b'}') && !b.is_ascii_whitespace())
                {
                    self.at += 1;
                }
                (self.at > start).then_some(())
            }
        }
    }

    fn nested(&mut self, f: impl FnOnce(&mut Self) -> Option<()>) -> Option<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        let out = f(self);
        self.depth -= 1;
        out
    }

    fn string(&mut self) -> Option<()> {
        self.at += 1;
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(());
                }
                b'\\' => self.at += 2,
                _ => self.at += 1,
            }
        }
    }

    /// The string value that ends at the current position and began at `start`, decoded.
    fn text(&self, start: usize) -> Option<String> {
        serde_json::from_slice(&self.bytes[start..self.at]).ok()
    }

    fn object(&mut self, at: At) -> Option<()> {
        self.at += 1;
        self.space();
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            self.space();
            let key_start = self.at;
            if self.peek()? != b'"' {
                return None;
            }
            self.string()?;
            let key = self.text(key_start)?;
            self.eat(b':')?;
            self.space();
            let start = self.at;
            if is_secret_name(&key) {
                self.value(At::Elsewhere)?;
                self.spans.push(start..self.at);
            } else {
                let inner = match (at, key.as_str()) {
                    (At::Root, "arguments") => At::Arguments,
                    _ => At::Elsewhere,
                };
                self.value(inner)?;
                match (at, key.as_str()) {
                    (At::Root, "execute") => self.execute = self.text(start),
                    (At::Arguments, "qom-type") => self.qom_type = self.text(start),
                    (At::Arguments, "data") => self.data = Some(start..self.at),
                    _ => {}
                }
            }
            self.space();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn array(&mut self) -> Option<()> {
        self.at += 1;
        self.space();
        if self.peek()? == b']' {
            self.at += 1;
            return Some(());
        }
        loop {
            self.value(At::Elsewhere)?;
            self.space();
            match self.peek()? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::tz::Offset;
    use std::os::unix::fs::PermissionsExt;

    fn redact(request: &str) -> String {
        String::from_utf8(redacted(request.as_bytes()).unwrap_or_else(|| request.as_bytes().to_vec()))
            .unwrap()
    }

    #[test]
    fn secrets_are_blanked_in_place_and_the_rest_kept_byte_for_byte() {
        // The data of a secret object, wherever execute and qom-type sit.
        assert_eq!(
            redact(
                r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"hunter2","format":"raw"},"id":3}"#
            ),
            r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"<redacted>","format":"raw"},"id":3}"#
        );
        assert_eq!(
            redact(r#"{"arguments":{"data":"aGk=","qom-type":"secret_keyring"},"execute":"object-add"}"#),
            r#"{"arguments":{"data":"<redacted>","qom-type":"secret_keyring"},"execute":"object-add"}"#
        );
        // Not a secret object: its data stays.
        let plain =
            r#"{"execute":"object-add","arguments":{"qom-type":"memory-backend-ram","data":1},"id":4}"#;
        assert_eq!(redact(plain), plain);
        // Password-like members at any depth, any case, any value; an escaped name too.
        assert_eq!(
            redact(
                r#"{"execute":"x","arguments":{"list":[{"Password":{"a":[1,2]}},{"new-password" : "pw"}],"passphrase":"p","key-secret-data":"k","pass\u0077ord":1}}"#
            ),
            r#"{"execute":"x","arguments":{"list":[{"Password":"<redacted>"},{"new-password" : "<redacted>"}],"passphrase":"<redacted>","key-secret-data":"<redacted>","pass\u0077ord":"<redacted>"}}"#
        );
        // Nested secrets inside a secret: one blank.
        assert_eq!(
            redact(r#"{"password":{"password":"x"},"id":1}"#),
            r#"{"password":"<redacted>","id":1}"#
        );
        // Nothing to hide: no copy at all.
        assert!(redacted(br#"{"execute":"query-status","id":7}"#).is_none());
        assert!(redacted(br#"{"execute":"x","arguments":{"passive":true},"id":7}"#).is_none());
        // Not JSON, and mentioning a password: withheld.
        assert_eq!(
            redact(r#"{"password": "pw""#),
            r#""<withheld: not a JSON object>""#
        );
        let deep = format!("{}\"password\"{}", "[".repeat(1000), "]".repeat(1000));
        assert_eq!(redact(&deep), r#""<withheld: not a JSON object>""#);
    }

    #[test]
    fn stamps_are_go_rfc3339_in_the_zone() {
        let t = jiff::Timestamp::from_second(1_764_669_600).unwrap(); // 2025-12-02T10:00:00Z
        let fmt = |tz: TimeZone| {
            let mut out = Vec::new();
            stamp(&mut out, t, &tz);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(fmt(TimeZone::UTC), "2025-12-02T10:00:00Z");
        assert_eq!(
            fmt(TimeZone::fixed(Offset::from_seconds(5 * 3600 + 1800).unwrap())),
            "2025-12-02T15:30:00+05:30"
        );
        assert_eq!(
            fmt(TimeZone::fixed(Offset::constant(-3))),
            "2025-12-02T07:00:00-03:00"
        );
        // Go prints whole minutes, cut toward zero, and keeps the sign it had.
        assert_eq!(
            fmt(TimeZone::fixed(Offset::from_seconds(-(3600 + 59)).unwrap())),
            "2025-12-02T08:59:01-01:00"
        );
        assert_eq!(
            fmt(TimeZone::fixed(Offset::from_seconds(-30).unwrap())),
            "2025-12-02T09:59:30+00:00"
        );
    }

    #[test]
    fn lines_are_in_go_format_and_the_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.log");
        let log = TrafficLog::open(&path).unwrap();
        log.query(b"{\"execute\":\"cont\",\"id\":26}\n");
        log.reply(b"{\"return\": {}, \"id\": 26}\r\n");
        log.event("STOP", b"{\"event\": \"STOP\"}\r\n");
        log.event("VSERPORT_CHANGE", b"{\"event\": \"VSERPORT_CHANGE\"}\r\n");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines.len(), 5, "{text:?}");
        let body = |line: &str| line.split_once("] ").map(|(_, b)| b.to_owned()).unwrap();
        assert_eq!(body(lines[0]), r#"QUERY: {"execute":"cont","id":26}"#);
        assert_eq!(body(lines[1]), r#"REPLY: {"return": {}, "id": 26}"#);
        assert_eq!(lines[2], "", "an empty line after a reply");
        assert_eq!(body(lines[3]), r#"Event: {"event": "STOP"}"#);
        assert_eq!(lines[4], "", "the file ends with the event's line");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(TrafficLog::open(&dir.path().join("missing/qmp.log")).is_none());
    }
}
