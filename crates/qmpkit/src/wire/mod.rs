//! The wire format: the greeting, requests, replies and events, and the splitter
//! that finds them in the byte stream. Nothing here does I/O.

pub(crate) mod message;
pub(crate) mod splitter;

use std::borrow::Cow;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// QEMU's version, from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
pub struct Version {
    /// Major version (QEMU 10.0.2: 10).
    pub major: u32,
    /// Minor version (QEMU 10.0.2: 0).
    pub minor: u32,
    /// Micro version (QEMU 10.0.2: 2).
    pub micro: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The greeting QEMU sends when a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Greeting {
    /// QEMU's version.
    pub version: Version,
    /// The distribution's package string (for example `Debian 1:10.0.2+ds-2`).
    pub package: String,
    /// Capabilities the server offers (for example `oob`).
    pub capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct GreetingWire {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: GreetingVersion,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct GreetingVersion {
    qemu: Version,
    #[serde(default)]
    package: String,
}

impl Greeting {
    /// Parses a greeting message.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, String> {
        let g: GreetingWire = serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "expected a QMP greeting, got {} ({e})",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            )
        })?;
        Ok(Greeting {
            version: g.qmp.version.qemu,
            package: g.qmp.version.package,
            capabilities: g.qmp.capabilities,
        })
    }

    /// True when the server offers out-of-band execution.
    pub fn offers_oob(&self) -> bool {
        self.capabilities.iter().any(|c| c == "oob")
    }
}

/// QEMU's event timestamp. Both fields are -1 when the host clock failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// The timestamp as a [`std::time::SystemTime`]; `None` when the clock
    /// failed (a negative field) or the time is too far out to represent.
    pub fn to_system_time(self) -> Option<std::time::SystemTime> {
        // The server chooses both numbers: checked arithmetic, so that an
        // absurd value gives None instead of a panic.
        let seconds = u64::try_from(self.seconds).ok()?;
        let microseconds = u64::try_from(self.microseconds).ok()?;
        std::time::UNIX_EPOCH
            .checked_add(std::time::Duration::from_secs(seconds))?
            .checked_add(std::time::Duration::from_micros(microseconds))
    }
}

/// The `error` member of a reply.
#[derive(Debug, Deserialize)]
pub(crate) struct ErrorBody {
    pub class: String,
    pub desc: String,
}

/// Any message from the server, borrowed from the read buffer.
///
/// One pass of serde over the message finds what kind it is; reply payloads
/// stay unparsed ([`RawValue`]) until the caller decodes them into its own type.
#[derive(Deserialize)]
pub(crate) struct Incoming<'a> {
    #[serde(rename = "QMP", borrow, default)]
    pub greeting: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub id: Option<&'a RawValue>,
    #[serde(rename = "return", borrow, default)]
    pub ret: Option<&'a RawValue>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
    #[serde(borrow, default)]
    pub event: Option<Cow<'a, str>>,
    #[serde(default)]
    pub data: Option<serde_json::Value>,
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
}

impl Incoming<'_> {
    /// The id as this client assigns them (an unsigned integer), if it is one.
    pub fn numeric_id(&self) -> Option<u64> {
        self.id.and_then(|id| id.get().trim().parse().ok())
    }
}

/// A plain success reply, found without parsing the message.
///
/// QEMU writes every success reply as `{"return": VALUE, "id": ID}`, the id
/// last. When a message starts with a `return` member and ends with a numeric
/// `id` member, it is such a reply: the caller can decode VALUE straight from
/// its bytes, the only pass over them. Anything else (errors, events, another
/// member order, a non-numeric id) gives `None` and goes through the full
/// parse.
///
/// The tail is unambiguous because the splitter hands over exactly one
/// top-level object: the final `}` closes it, so a number directly before it,
/// keyed `"id"` and preceded by a comma, is a member of the top-level object.
/// What lies between the `return` key and that comma is VALUE, if the
/// message is what it looks like; if it is not one JSON value (say, another
/// member follows it), decoding it fails, and the decoder falls back to the
/// whole message.
pub(crate) fn success_reply(message: &[u8]) -> Option<SuccessReply> {
    let head = message.trim_ascii_start().strip_prefix(b"{")?;
    let head = head.trim_ascii_start().strip_prefix(b"\"return\"")?;
    let value_text = head.trim_ascii_start().strip_prefix(b":")?;
    let value_start = message.len() - value_text.len();
    let (id, before) = split_trailing_id(message)?;
    let value_end = before.trim_ascii_end().strip_suffix(b",")?.len();
    if value_end <= value_start {
        return None;
    }
    Some(SuccessReply {
        id,
        value: value_start..value_end,
    })
}

/// Splits `..., "id": N}` into N and what comes before `"id"`.
fn split_trailing_id(message: &[u8]) -> Option<(u64, &[u8])> {
    let body = message.trim_ascii_end().strip_suffix(b"}")?.trim_ascii_end();
    let digits_at = body.iter().rposition(|b| !b.is_ascii_digit())? + 1;
    let id = parse_id(&body[digits_at..])?;
    let before = body[..digits_at].trim_ascii_end().strip_suffix(b":")?;
    let before = before.trim_ascii_end().strip_suffix(b"\"id\"")?;
    Some((id, before))
}

/// A JSON number as this client writes ids: no sign, no leading zeros, at
/// most 20 digits.
fn parse_id(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    // Summed here rather than through `str::parse`, which checks the
    // bytes twice (UTF-8, then digits); overflow (21+ digits' worth) is None.
    digits.iter().try_fold(0u64, |n, &b| {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The numeric id at the end of a top-level object (`..., "id": N}`), as QEMU
/// writes success replies, without parsing the rest.
pub(crate) fn trailing_id(message: &[u8]) -> Option<u64> {
    let (id, before) = split_trailing_id(message)?;
    before.trim_ascii_end().ends_with(b",").then_some(id)
}

/// The numeric id at the start of a top-level object (`{"id": N, ...`), as
/// QEMU writes error replies, without parsing the rest.
pub(crate) fn leading_id(message: &[u8]) -> Option<u64> {
    let rest = message.trim_ascii_start().strip_prefix(b"{")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"id\"")?;
    let rest = rest.trim_ascii_start().strip_prefix(b":")?.trim_ascii_start();
    let len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let after = rest[len..].trim_ascii_start();
    if !(after.starts_with(b",") || after.starts_with(b"}")) {
        return None;
    }
    parse_id(&rest[..len])
}

/// Where [`success_reply`] found a reply's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SuccessReply {
    pub id: u64,
    /// The bytes of the `return` value (possibly with whitespace around it).
    pub value: std::ops::Range<usize>,
}

/// Parses one JSON message: its UTF-8 checked once, then parsed from `str`.
/// `serde_json::from_slice` checks every string on its own, which costs
/// about a tenth of a small message's handling.
pub(crate) fn parse_message<'a, T: Deserialize<'a>>(message: &'a [u8]) -> serde_json::Result<T> {
    let text = std::str::from_utf8(message).map_err(serde::de::Error::custom)?;
    serde_json::from_str(text)
}

/// An event's name as read from the wire.
#[derive(Debug, Clone)]
pub(crate) enum EventName<'a> {
    /// One of the schema's event names (every event QEMU sends): kept as a
    /// static string, so that an event costs no allocation for its name.
    Known(&'static str),
    /// Any other name.
    Other(Cow<'a, str>),
}

impl<'a> EventName<'a> {
    pub fn as_str(&self) -> &str {
        match self {
            EventName::Known(name) => name,
            EventName::Other(name) => name,
        }
    }

    /// The name, static when the schema knows it.
    pub fn of(name: Cow<'a, str>) -> Self {
        match known_event_name(name.as_bytes()) {
            Some(known) => EventName::Known(known),
            None => EventName::Other(name),
        }
    }

    /// The name in these bytes, if they are UTF-8. A known name needs no
    /// UTF-8 check: the table holds it as a `str` already.
    fn from_bytes(name: &'a [u8]) -> Option<Self> {
        match known_event_name(name) {
            Some(known) => Some(EventName::Known(known)),
            None => std::str::from_utf8(name)
                .ok()
                .map(|name| EventName::Other(Cow::Borrowed(name))),
        }
    }
}

/// Names compare as text, whichever way each was kept.
impl PartialEq for EventName<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for EventName<'_> {}

/// The schema's spelling of an event name, if it is one of its events.
#[inline]
pub(crate) fn known_event_name(name: &[u8]) -> Option<&'static str> {
    static NAMES: LazyLock<NameTable> =
        LazyLock::new(|| NameTable::new(qmpkit_qapi::meta::EVENTS.iter().map(|event| event.name)));
    NAMES.get(name)
}

/// A set of names, open addressing over a hash of a name's length and
/// three of its bytes: about a third of what a general hash map's lookup
/// costs, for a lookup made once per event. The table is kept at most an
/// eighth full, so that a lookup rarely looks at a second slot.
struct NameTable {
    slots: Vec<Option<&'static str>>,
}

impl NameTable {
    fn new(names: impl ExactSizeIterator<Item = &'static str>) -> Self {
        let size = (names.len() * 8).next_power_of_two().max(64);
        let mut table = NameTable {
            slots: vec![None; size],
        };
        for name in names {
            if table.get(name.as_bytes()).is_none() {
                let mut at = table.slot_of(name.as_bytes());
                while table.slots[at].is_some() {
                    at = (at + 1) & (size - 1);
                }
                table.slots[at] = Some(name);
            }
        }
        table
    }

    #[inline]
    fn slot_of(&self, name: &[u8]) -> usize {
        let key = match name {
            [] => 0,
            [first, .., last] | [first @ last] => {
                (name.len() as u64) << 24
                    | u64::from(*first) << 16
                    | u64::from(name[name.len() / 2]) << 8
                    | u64::from(*last)
            }
        };
        // Fibonacci hashing: the top bits of the product mix every byte in.
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - self.slots.len().trailing_zeros())) as usize
    }

    #[inline]
    fn get(&self, name: &[u8]) -> Option<&'static str> {
        let mut at = self.slot_of(name);
        loop {
            let known = self.slots[at]?;
            if known.as_bytes() == name {
                return Some(known);
            }
            at = (at + 1) & (self.slots.len() - 1);
        }
    }
}

/// An event in QEMU's own layout, split without the general parse.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct QuickEvent<'a> {
    pub name: EventName<'a>,
    pub timestamp: Timestamp,
    /// The `data` member's JSON text, if there is one (not yet validated).
    pub data: Option<&'a str>,
}

/// Splits an event written the way QEMU writes every event:
/// `{"timestamp": {"seconds": S, "microseconds": U}, "event": "NAME"}`,
/// optionally followed by `, "data": VALUE` before the closing brace. The
/// general parse builds a struct with every member a message may have and
/// costs about half of an event's handling; this reads the fixed parts in
/// place. Anything else (another order, escapes in the name, other members)
/// gives `None` and takes the general parse. The data's JSON is validated
/// when it is parsed into a value, which also fails on anything after it.
pub(crate) fn quick_event(message: &[u8]) -> Option<QuickEvent<'_>> {
    exact_event(message).or_else(|| spaced_event(message))
}

/// [`quick_event`] for an event spaced exactly as QEMU spaces it, which is
/// every event QEMU sends: the fixed parts are compared whole instead of
/// token by token, and only the data is checked for UTF-8, since everything
/// else it accepts is ASCII. `None` for anything else, including what
/// [`spaced_event`] would still take (other spacing, numbers of more than
/// 18 digits): the two agree wherever this one gives an event.
fn exact_event(message: &[u8]) -> Option<QuickEvent<'_>> {
    let rest = message
        .trim_ascii()
        .strip_prefix(b"{\"timestamp\": {\"seconds\": ")?;
    let (seconds, rest) = leading_integer(rest)?;
    let rest = rest.strip_prefix(b", \"microseconds\": ")?;
    let (microseconds, rest) = leading_integer(rest)?;
    let rest = rest.strip_prefix(b"}, \"event\": \"")?;
    let name_len = rest
        .iter()
        .position(|&b| !NAME_BYTES[usize::from(b)])
        .filter(|&len| len > 0)?;
    let (name, rest) = rest.split_at(name_len);
    let data = if rest == b"\"}" {
        None
    } else {
        let text = rest.strip_prefix(b"\", \"data\":")?.strip_suffix(b"}")?;
        Some(std::str::from_utf8(text.trim_ascii_end()).ok()?)
    };
    Some(QuickEvent {
        name: EventName::from_bytes(name)?,
        timestamp: Timestamp {
            seconds,
            microseconds,
        },
        data,
    })
}

/// The bytes [`quick_event`] takes in a name: ASCII letters, digits and
/// `_`. A table, because a name is read a byte at a time.
static NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'_';
        b += 1;
    }
    table
};

/// An optional `-` and 1 to 18 digits (which cannot overflow), and what
/// follows them. Leading zeros are taken, as `str::parse` takes them.
#[inline]
fn leading_integer(text: &[u8]) -> Option<(i64, &[u8])> {
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    // One pass that reads and adds up the digits.
    let mut value = 0i64;
    let mut len = 0;
    for &b in digits {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            break;
        }
        len += 1;
        if len > 18 {
            return None;
        }
        value = value * 10 + i64::from(digit);
    }
    if len == 0 {
        return None;
    }
    Some((if negative { -value } else { value }, &digits[len..]))
}

/// [`quick_event`] for any spacing between the tokens.
fn spaced_event(message: &[u8]) -> Option<QuickEvent<'_>> {
    // Replies and errors are turned away before the UTF-8 check.
    let head = message.trim_ascii_start().strip_prefix(b"{")?;
    if !head.trim_ascii_start().starts_with(b"\"timestamp\"") {
        return None;
    }
    let text = std::str::from_utf8(message).ok()?.trim_ascii();
    let mut c = Cursor(text);
    c.token("{")?;
    c.token("\"timestamp\"")?;
    c.token(":")?;
    c.token("{")?;
    c.token("\"seconds\"")?;
    c.token(":")?;
    let seconds = c.integer()?;
    c.token(",")?;
    c.token("\"microseconds\"")?;
    c.token(":")?;
    let microseconds = c.integer()?;
    c.token("}")?;
    c.token(",")?;
    c.token("\"event\"")?;
    c.token(":")?;
    c.token("\"")?;
    let name_len = c.0.find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))?;
    let name = &c.0[..name_len];
    c.0 = &c.0[name_len..];
    c.token("\"")?;
    if name.is_empty() {
        return None;
    }
    let data = if c.token("}").is_some() {
        None
    } else {
        c.token(",")?;
        c.token("\"data\"")?;
        c.token(":")?;
        Some(c.0.strip_suffix('}')?.trim_ascii_end())
    };
    if data.is_none() && !c.0.is_empty() {
        return None;
    }
    Some(QuickEvent {
        name: EventName::of(Cow::Borrowed(name)),
        timestamp: Timestamp {
            seconds,
            microseconds,
        },
        data,
    })
}

/// Reads fixed tokens off the front of a message, skipping whitespace.
struct Cursor<'a>(&'a str);

impl Cursor<'_> {
    fn token(&mut self, token: &str) -> Option<()> {
        self.0 = self.0.trim_ascii_start().strip_prefix(token)?;
        Some(())
    }

    fn integer(&mut self) -> Option<i64> {
        let rest = self.0.trim_ascii_start();
        let digits = rest.strip_prefix('-').unwrap_or(rest);
        let len = rest.len() - digits.len() + digits.bytes().take_while(u8::is_ascii_digit).count();
        let (number, after) = rest.split_at(len);
        self.0 = after;
        number.parse().ok()
    }
}

/// The `return` member of a whole reply, decoded in the same pass that
/// checks the rest of the message.
#[derive(Deserialize)]
pub(crate) struct ReturnOf<R> {
    #[serde(rename = "return")]
    pub value: R,
}

/// A command's name, and whether JSON needs it escaped.
///
/// Every name QEMU has is letters, digits, `-` and `_`: nothing to escape,
/// so it is copied as it is (serde's string escaping was a tenth of a
/// request's encoding). For a typed command the check is made once, at
/// compile time (`const { CommandName::new(C::NAME) }`): checking the bytes
/// on every call cost some 150 instructions, as much as the rest of the
/// request's encoding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CommandName<'a> {
    text: &'a str,
    plain: bool,
}

impl<'a> CommandName<'a> {
    /// Checks `text` (at compile time when called in a `const` block).
    pub(crate) const fn new(text: &'a str) -> Self {
        let bytes = text.as_bytes();
        let mut i = 0;
        let mut plain = true;
        while i < bytes.len() {
            let b = bytes[i];
            if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                plain = false;
                break;
            }
            i += 1;
        }
        CommandName { text, plain }
    }
}

/// Serialises a request: `{"execute": NAME, "arguments": ARGS, "id": ID}`.
///
/// Arguments that serialise to nothing (unit, `None`) or to an empty object
/// are left out, as QEMU expects for commands without arguments.
pub(crate) fn encode_request<A: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    name: CommandName<'_>,
    args: &A,
    id: u64,
    oob: bool,
) -> Result<(), serde_json::Error> {
    out.extend_from_slice(if oob { b"{\"exec-oob\":" } else { b"{\"execute\":" });
    if name.plain {
        out.push(b'"');
        out.extend_from_slice(name.text.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, name.text)?;
    }
    let mark = out.len();
    out.extend_from_slice(b",\"arguments\":");
    let args_at = out.len();
    serde_json::to_writer(&mut *out, args)?;
    let written = &out[args_at..];
    if written == b"null" || written == b"{}" {
        out.truncate(mark);
    } else if written.first() != Some(&b'{') {
        out.truncate(mark);
        return Err(serde::ser::Error::custom(
            "command arguments must serialise to a JSON object",
        ));
    }
    out.extend_from_slice(b",\"id\":");
    // itoa rather than `write!`: the formatting machinery is a visible share
    // of a small command's cost.
    out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    out.extend_from_slice(b"}\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_read_as_this_client_writes_them() {
        assert_eq!(parse_id(b"0"), Some(0));
        assert_eq!(parse_id(b"12345"), Some(12345));
        assert_eq!(parse_id(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"18446744073709551616",
            b"99999999999999999999",
            b"007",
            b"1a",
            b"-1",
            b"1 ",
        ] {
            assert_eq!(parse_id(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn command_names_are_copied_or_escaped() {
        let encode = |name| {
            let mut out = Vec::new();
            encode_request(&mut out, CommandName::new(name), &(), 3, false).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            encode("query-status"),
            "{\"execute\":\"query-status\",\"id\":3}\n"
        );
        assert_eq!(encode("x_y-1"), "{\"execute\":\"x_y-1\",\"id\":3}\n");
        // Anything else goes through JSON's escaping.
        assert_eq!(encode("a\"b\\c"), "{\"execute\":\"a\\\"b\\\\c\",\"id\":3}\n");
        assert_eq!(encode("é\n"), "{\"execute\":\"é\\n\",\"id\":3}\n");
        // The check made at compile time, as typed commands use it, agrees.
        const PLAIN: CommandName<'static> = CommandName::new("query-status");
        const ESCAPED: CommandName<'static> = CommandName::new("a b");
        const { assert!(PLAIN.plain && !ESCAPED.plain) };
    }

    #[test]
    fn timestamps_a_system_time_cannot_hold_give_none() {
        let ts = |seconds, microseconds| Timestamp {
            seconds,
            microseconds,
        };
        let epoch = std::time::UNIX_EPOCH;
        assert_eq!(
            ts(1, 2).to_system_time(),
            Some(epoch + std::time::Duration::new(1, 2_000))
        );
        assert_eq!(ts(-1, -1).to_system_time(), None);
        assert_eq!(ts(0, -1).to_system_time(), None);
        // Values a server may send that no SystemTime holds: none of them
        // may panic (they used to, adding past the end of SystemTime).
        assert_eq!(ts(i64::MAX, i64::MAX).to_system_time(), None);
        assert_eq!(ts(i64::MAX, 1_000_000).to_system_time(), None);
        assert_eq!(ts(i64::MAX - 5, 6_000_000).to_system_time(), None);
        // Microseconds beyond one second still count, as plain addition.
        assert_eq!(
            ts(1, 2_500_000).to_system_time(),
            Some(epoch + std::time::Duration::from_millis(3_500))
        );
        for (s, u) in [(i64::MAX, 0), (i64::MIN, 0), (0, i64::MAX), (i64::MIN, i64::MIN)] {
            let _ = ts(s, u).to_system_time();
        }
    }

    #[test]
    fn success_replies_are_found_without_parsing() {
        let value_of = |msg: &'static [u8]| {
            let r = success_reply(msg).unwrap();
            (r.id, std::str::from_utf8(&msg[r.value]).unwrap().trim())
        };
        assert_eq!(value_of(br#"{"return": {}, "id": 7}"#), (7, "{}"));
        assert_eq!(
            value_of(b"  {\"return\":{\"a\":[1,{\"id\":3}]} , \"id\" :  18446744073709551615 }\r\n"),
            (u64::MAX, r#"{"a":[1,{"id":3}]}"#)
        );
        assert_eq!(value_of(br#"{"return":"x","id":0}"#), (0, r#""x""#));
        // Shaped like one but with more members: found, and the value's
        // bytes are not one JSON value, which the decoder notices.
        assert_eq!(
            value_of(br#"{"return": 1, "x": 2, "id": 3}"#),
            (3, r#"1, "x": 2"#)
        );
        // Not plain success replies: full parse.
        for msg in [
            &br#"{"id": 7, "return": {}}"#[..],
            br#"{"error": {"class": "GenericError", "desc": "x"}, "id": 7}"#,
            br#"{"return": {"id": 7}}"#,
            br#"{"return": {}, "id": "seven"}"#,
            br#"{"return": {}, "id": 07}"#,
            br#"{"return": {}, "id": 184467440737095516150}"#,
            br#"{"return": {}, "xid": 7}"#,
            br#"{"return": {}, "x\"id": 7}"#,
            br#"{"return": 7}"#,
            br#"{"return", "id": 7}"#,
            br#"{"return":, "id": 7}"#,
            br#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#,
            b"{}",
            b"",
        ] {
            assert_eq!(success_reply(msg), None, "{}", String::from_utf8_lossy(msg));
        }
    }

    #[test]
    fn events_in_qemus_layout_are_split_in_place() {
        let e =
            quick_event(br#"{"timestamp": {"seconds": 1700000000, "microseconds": 42}, "event": "STOP"}"#)
                .unwrap();
        assert_eq!(
            (
                e.name.as_str(),
                e.timestamp.seconds,
                e.timestamp.microseconds,
                e.data
            ),
            ("STOP", 1700000000, 42, None)
        );
        let e = quick_event(
            b" {\"timestamp\":{\"seconds\":-1,\"microseconds\":-1},\"event\":\"BLOCK_JOB_READY\",\"data\":{\"device\":\"j}\",\"len\":5}}\r\n",
        )
        .unwrap();
        assert_eq!((e.name.as_str(), e.timestamp.seconds), ("BLOCK_JOB_READY", -1));
        assert_eq!(e.data, Some(r#"{"device":"j}","len":5}"#));
        // Anything else takes the general parse.
        for msg in [
            &br#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#[..],
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "ST\u004fP"}"#,
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": ""}"#,
            br#"{"timestamp": {"seconds": 1.5, "microseconds": 2}, "event": "STOP"}"#,
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP", "extra": 1}"#,
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"} x"#,
            br#"{"return": {}, "id": 1}"#,
            b"\xff",
        ] {
            assert!(quick_event(msg).is_none(), "{}", String::from_utf8_lossy(msg));
        }
    }

    /// Where the exact-layout reader gives an event, the token-by-token
    /// one gives the same; QEMU's own layout always takes the exact one.
    #[test]
    fn the_exact_layout_reader_agrees_with_the_spaced_one() {
        let qemu: &[&[u8]] = &[
            br#"{"timestamp": {"seconds": 1700000000, "microseconds": 42}, "event": "STOP"}"#,
            b"{\"timestamp\": {\"seconds\": -1, \"microseconds\": -1}, \"event\": \"RESUME\"}\r\n",
            br#"{"timestamp": {"seconds": 0, "microseconds": 0}, "event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/nic0", "device": "nic0"}}"#,
            "{\"timestamp\": {\"seconds\": 5, \"microseconds\": 6}, \"event\": \"X\", \"data\": {\"s\": \"caf\\u00e9 caf\u{e9} }\"}}".as_bytes(),
            br#"{"timestamp": {"seconds": 007, "microseconds": -0}, "event": "E9_x", "data": {}}"#,
            br#"{"timestamp": {"seconds": 123456789012345678, "microseconds": 1}, "event": "A", "data": [1, 2]  }"#,
        ];
        for msg in qemu {
            let exact = exact_event(msg);
            assert!(exact.is_some(), "{}", String::from_utf8_lossy(msg));
            assert_eq!(exact, spaced_event(msg), "{}", String::from_utf8_lossy(msg));
        }
        let e = exact_event(qemu[3]).unwrap();
        assert_eq!(e.data, Some(r#" {"s": "caf\u00e9 café }"}"#));
        let e = exact_event(qemu[4]).unwrap();
        assert_eq!(
            (e.timestamp.seconds, e.timestamp.microseconds, e.data),
            (7, 0, Some(" {}"))
        );
        // Not for the exact reader; the spaced one decides (and takes some).
        let other: &[&[u8]] = &[
            br#"{"timestamp":{"seconds":1,"microseconds":2},"event":"STOP"}"#,
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP" }"#,
            br#"{ "timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP","data":{}}"#,
            b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\":\t\"STOP\"}",
            br#"{"timestamp": {"seconds": 1234567890123456789, "microseconds": 2}, "event": "STOP"}"#,
            br#"{"timestamp": {"seconds": 99999999999999999999, "microseconds": 2}, "event": "STOP"}"#,
            // Not events the quick path takes at all.
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "ST\u004fP"}"#,
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "AGENT-STARTED"}"#,
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": ""}"#,
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP", "extra": 1}"#,
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}, "data": 1}"#,
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"} x"#,
            br#"{"timestamp": {"seconds": -, "microseconds": 2}, "event": "STOP"}"#,
            br#"{"timestamp": {"seconds": +1, "microseconds": 2}, "event": "STOP"}"#,
            br#"{"timestamp": {"seconds": 1.5, "microseconds": 2}, "event": "STOP"}"#,
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"ST\u{e9}P\"}".as_bytes(),
            b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"X\", \"data\": \"\xff\"}",
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP", "data": 1"#,
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"#,
            br#"{"timestamp": {"seconds": 1, "#,
            br#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#,
            br#"{"return": {}, "id": 1}"#,
            b"",
        ];
        for msg in other {
            assert_eq!(exact_event(msg), None, "{}", String::from_utf8_lossy(msg));
        }
        assert!(spaced_event(other[0]).is_some() && spaced_event(other[5]).is_some());
        assert_eq!(quick_event(other[0]), spaced_event(other[0]));
        // Every cut and every one-byte change of QEMU's layout: the exact
        // reader either turns it away or agrees with the spaced one.
        let mut rng = fastrand::Rng::with_seed(16);
        let alphabet = b" \t\r\n{}[]\":,-_09aZ\\\xc3\xa9\xff";
        for msg in qemu {
            for cut in 0..msg.len() {
                let cut = &msg[..cut];
                if let Some(e) = exact_event(cut) {
                    assert_eq!(Some(e), spaced_event(cut), "{}", String::from_utf8_lossy(cut));
                }
            }
            for _ in 0..3000 {
                let mut m = msg.to_vec();
                let at = rng.usize(..m.len());
                match rng.u8(..3) {
                    0 => m[at] = alphabet[rng.usize(..alphabet.len())],
                    1 => m.insert(at, alphabet[rng.usize(..alphabet.len())]),
                    _ => drop(m.remove(at)),
                }
                if let Some(e) = exact_event(&m) {
                    assert_eq!(Some(e), spaced_event(&m), "{}", String::from_utf8_lossy(&m));
                }
            }
        }
    }

    #[test]
    fn name_bytes_are_letters_digits_and_underscores() {
        for b in 0..=255u8 {
            assert_eq!(
                NAME_BYTES[usize::from(b)],
                b.is_ascii_alphanumeric() || b == b'_',
                "{b}"
            );
        }
        assert_eq!(leading_integer(b"-0x"), Some((0, &b"x"[..])));
        assert_eq!(
            leading_integer(b"999999999999999999}"),
            Some((999_999_999_999_999_999, &b"}"[..]))
        );
        assert_eq!(
            leading_integer(b"-999999999999999999"),
            Some((-999_999_999_999_999_999, &b""[..]))
        );
        for none in [&b"1234567890123456789"[..], b"-", b"", b"+1", b"-x", b" 1"] {
            assert_eq!(leading_integer(none), None);
        }
    }

    #[test]
    fn the_schemas_event_names_are_kept_static() {
        assert_eq!(known_event_name(b"STOP"), Some("STOP"));
        assert_eq!(known_event_name(b"DEVICE_DELETED"), Some("DEVICE_DELETED"));
        for unknown in [&b"stop"[..], b"STO", b"STOPP", b"AGENT-STARTED", b"", b"ST\xffP"] {
            assert_eq!(known_event_name(unknown), None);
        }
        // Every one of the schema's names is found, as itself.
        for event in qmpkit_qapi::meta::EVENTS {
            assert_eq!(known_event_name(event.name.as_bytes()), Some(event.name));
        }
        // Names with the same length and the same three bytes share a slot
        // and are told apart by probing.
        let crowded = NameTable::new(["AQYB", "AZYB", "ARYB", "A", "AB", "AQYB"].into_iter());
        for name in ["AQYB", "AZYB", "ARYB", "A", "AB"] {
            assert_eq!(crowded.get(name.as_bytes()), Some(name));
        }
        for name in ["ASYB", "B", "", "ABB", "AQY"] {
            assert_eq!(crowded.get(name.as_bytes()), None);
        }
        assert!(matches!(
            EventName::from_bytes(b"STOP"),
            Some(EventName::Known("STOP"))
        ));
        assert!(matches!(
            EventName::from_bytes(b"MY_EVENT"),
            Some(EventName::Other(Cow::Borrowed("MY_EVENT")))
        ));
        assert_eq!(EventName::from_bytes(b"MY_\xc3"), None);
        assert!(matches!(
            EventName::of(Cow::Owned("RESUME".into())),
            EventName::Known("RESUME")
        ));
        assert_eq!(
            EventName::of(Cow::Borrowed("X")),
            EventName::Other(Cow::Owned("X".into()))
        );
        let e =
            quick_event(br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "NEW_ONE"}"#).unwrap();
        assert_eq!(e.name.as_str(), "NEW_ONE");
    }

    #[test]
    fn a_whole_reply_decodes_its_return_member() {
        let r: ReturnOf<serde_json::Value> =
            serde_json::from_slice(br#"{"return": {"running": true}, "id": 3}"#).unwrap();
        assert_eq!(r.value["running"], true);
    }

    #[test]
    fn greeting_from_qemu_10() {
        let g = Greeting::parse(br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#).unwrap();
        assert_eq!(
            g.version,
            Version {
                major: 10,
                minor: 0,
                micro: 2
            }
        );
        assert!(g.offers_oob());
        assert!(g.package.starts_with("Debian"));
        assert!(Greeting::parse(b"{\"return\": {}}").is_err());
    }

    #[test]
    fn requests_leave_out_empty_arguments() {
        let mut out = Vec::new();
        encode_request(&mut out, CommandName::new("query-status"), &(), 7, false).unwrap();
        assert_eq!(out, b"{\"execute\":\"query-status\",\"id\":7}\n");
        out.clear();
        encode_request(
            &mut out,
            CommandName::new("stop"),
            &serde_json::json!({}),
            8,
            true,
        )
        .unwrap();
        assert_eq!(out, b"{\"exec-oob\":\"stop\",\"id\":8}\n");
        out.clear();
        encode_request(
            &mut out,
            CommandName::new("x"),
            &serde_json::json!({"a": 1}),
            9,
            false,
        )
        .unwrap();
        assert_eq!(out, b"{\"execute\":\"x\",\"arguments\":{\"a\":1},\"id\":9}\n");
        assert!(encode_request(&mut Vec::new(), CommandName::new("x"), &[1, 2], 1, false).is_err());
    }

    #[test]
    fn incoming_kinds() {
        let r: Incoming = serde_json::from_str(r#"{"return": {"a": [1]}, "id": 12}"#).unwrap();
        assert_eq!(r.numeric_id(), Some(12));
        assert_eq!(r.ret.unwrap().get(), r#"{"a": [1]}"#);
        let e: Incoming =
            serde_json::from_str(r#"{"id": 3, "error": {"class": "GenericError", "desc": "d"}}"#).unwrap();
        assert_eq!(e.error.unwrap().class, "GenericError");
        let ev: Incoming =
            serde_json::from_str(r#"{"timestamp": {"seconds": -1, "microseconds": -1}, "event": "STOP"}"#)
                .unwrap();
        assert_eq!(ev.event.as_deref(), Some("STOP"));
        assert_eq!(ev.timestamp.unwrap().to_system_time(), None);
        let odd: Incoming = serde_json::from_str(r#"{"return": {}, "id": "user-id", "extra": [1]}"#).unwrap();
        assert_eq!(odd.numeric_id(), None);
    }
}
