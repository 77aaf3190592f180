//! What a message from the server is: a reply (to which id, with what
//! outcome), an event, or something else. Decided here, next to the parsers,
//! so that the connection only routes.
//!
//! Nothing a server sends makes this fail: a message that is not what it
//! should be is still classified, as a malformed reply when an id of ours can
//! be found in it (so that its caller learns of it at once) and as
//! unrecognised otherwise.

use std::borrow::Cow;
use std::ops::Range;

use serde_json::value::RawValue;
use serde_json::Value;

use super::{
    leading_id, parse_message, quick_event, success_reply, trailing_id, ErrorBody, EventName, Incoming,
    Timestamp,
};

/// One message from the server, classified.
pub(crate) enum Message<'a> {
    /// A reply to a request with this (numeric) id.
    Reply { id: u64, outcome: Outcome<'a> },
    /// A reply whose id this client never writes (not an unsigned integer).
    ForeignReply { id: Cow<'a, str> },
    /// An error reply without an id: QEMU could not read the request far
    /// enough to find one (for example invalid JSON).
    IdlessError(ErrorBody),
    /// An event.
    Event {
        name: EventName<'a>,
        data: Value,
        timestamp: Timestamp,
    },
    /// A greeting, which only belongs at the start.
    Greeting,
    /// Neither reply, event nor greeting, and no id of ours to be found.
    Unrecognised { why: String },
}

/// How a reply ended.
pub(crate) enum Outcome<'a> {
    /// A plain `{"return": VALUE, "id": N}`, recognised without parsing:
    /// where VALUE lies in the message.
    Plain(Range<usize>),
    /// The `return` value of a reply that took the full parse.
    Return(&'a RawValue),
    /// `{"id": N}` and nothing else: success with nothing returned, which
    /// is how Incus's Go package `qmp` takes it.
    Empty,
    /// QEMU's error reply.
    Error(ErrorBody),
    /// The message carries this id but is not a valid reply.
    Malformed(serde_json::Error),
}

/// Classifies one message (the bytes of one top-level object).
pub(crate) fn classify(bytes: &[u8]) -> Message<'_> {
    if let Some(reply) = success_reply(bytes) {
        return Message::Reply {
            id: reply.id,
            outcome: Outcome::Plain(reply.value),
        };
    }
    if let Some(event) = quick_event(bytes) {
        let data = match event.data {
            None => Some(Value::Null),
            // Fails on anything that is not exactly one JSON value, such as
            // further members after `data`: the general parse decides.
            Some(text) => serde_json::from_str(text).ok(),
        };
        if let Some(data) = data {
            return Message::Event {
                name: event.name,
                data,
                timestamp: event.timestamp,
            };
        }
    }
    match parse_message::<Incoming>(bytes) {
        Ok(msg) => classify_parsed(bytes, msg),
        Err(e) => classify_unparseable(bytes, e),
    }
}

/// The timestamp QEMU sends when its clock failed, used for events without one.
const NO_TIMESTAMP: Timestamp = Timestamp {
    seconds: -1,
    microseconds: -1,
};

fn classify_parsed<'a>(bytes: &'a [u8], msg: Incoming<'a>) -> Message<'a> {
    if let Some(name) = msg.event {
        return Message::Event {
            name: EventName::of(name),
            data: msg.data.unwrap_or(Value::Null),
            timestamp: msg.timestamp.unwrap_or(NO_TIMESTAMP),
        };
    }
    let id = match msg.id {
        None => None,
        Some(raw) => match msg.numeric_id() {
            Some(id) => Some(id),
            None => {
                return Message::ForeignReply {
                    id: Cow::Borrowed(raw.get()),
                }
            }
        },
    };
    // An error wins over a return value, as in Incus's Go package `qmp`.
    let outcome = match (msg.error, msg.ret) {
        (Some(error), _) => Outcome::Error(error),
        (None, Some(ret)) => Outcome::Return(ret),
        (None, None) => {
            if msg.greeting.is_some() {
                return Message::Greeting;
            }
            let Some(id) = id else {
                return Message::Unrecognised {
                    why: "neither a reply nor an event".into(),
                };
            };
            let members = parse_message::<serde_json::Map<String, Value>>(bytes).map_or(0, |m| m.len());
            let outcome = if members == 1 {
                Outcome::Empty
            } else {
                Outcome::Malformed(serde::de::Error::custom(
                    "a reply needs a \"return\" or an \"error\" member",
                ))
            };
            return Message::Reply { id, outcome };
        }
    };
    match (id, outcome) {
        (Some(id), outcome) => Message::Reply { id, outcome },
        (None, Outcome::Error(error)) => Message::IdlessError(error),
        (None, _) => Message::Unrecognised {
            why: "a return value without an id".into(),
        },
    }
}

/// A message serde could not read as a reply or event: find out what it
/// was meant to be, and whose it is.
fn classify_unparseable(bytes: &[u8], error: serde_json::Error) -> Message<'_> {
    let id = match parse_message::<Value>(bytes) {
        Ok(Value::Object(mut members)) => {
            if let Some(Value::String(name)) = members.remove("event") {
                // An event with a malformed timestamp is still the event.
                let timestamp = members
                    .remove("timestamp")
                    .and_then(|t| serde_json::from_value(t).ok())
                    .unwrap_or(NO_TIMESTAMP);
                return Message::Event {
                    name: EventName::of(Cow::Owned(name)),
                    data: members.remove("data").unwrap_or(Value::Null),
                    timestamp,
                };
            }
            members.get("id").and_then(Value::as_u64)
        }
        Ok(_) => None,
        // Not JSON: trust an id only where QEMU writes it.
        Err(_) => trailing_id(bytes).or_else(|| leading_id(bytes)),
    };
    match id {
        Some(id) => Message::Reply {
            id,
            outcome: Outcome::Malformed(error),
        },
        None => Message::Unrecognised {
            why: error.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(bytes: &[u8]) -> String {
        match classify(bytes) {
            Message::Reply { id, outcome } => match outcome {
                Outcome::Plain(r) => format!("plain {id} {}", String::from_utf8_lossy(&bytes[r]).trim()),
                Outcome::Return(v) => format!("return {id} {}", v.get()),
                Outcome::Empty => format!("empty {id}"),
                Outcome::Error(e) => format!("error {id} {} {}", e.class, e.desc),
                Outcome::Malformed(_) => format!("malformed {id}"),
            },
            Message::ForeignReply { id } => format!("foreign {id}"),
            Message::IdlessError(e) => format!("idless {}", e.class),
            Message::Event { name, timestamp, .. } => {
                format!("event {} {}", name.as_str(), timestamp.seconds)
            }
            Message::Greeting => "greeting".into(),
            Message::Unrecognised { .. } => "unrecognised".into(),
        }
    }

    #[test]
    fn replies_events_and_the_rest() {
        for (msg, want) in [
            (r#"{"return": {}, "id": 1}"#, "plain 1 {}"),
            (r#"{"id": 2, "return": [1]}"#, "return 2 [1]"),
            (
                r#"{"id": 3, "error": {"class": "GenericError", "desc": "no"}}"#,
                "error 3 GenericError no",
            ),
            (
                r#"{"error": {"class": "GenericError", "desc": "x"}, "return": {}, "id": 4}"#,
                "error 4 GenericError x",
            ),
            (r#"{"id": 5}"#, "empty 5"),
            (r#"{"return": {}, "id": "user"}"#, "foreign \"user\""),
            (r#"{"return": {}, "id": -1}"#, "foreign -1"),
            (
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#,
                "idless GenericError",
            ),
            (
                r#"{"event": "STOP", "timestamp": {"seconds": 3, "microseconds": 0}}"#,
                "event STOP 3",
            ),
            (r#"{"event": "STOP"}"#, "event STOP -1"),
            (r#"{"QMP": {"version": {}}}"#, "greeting"),
            (r#"{"return": {}}"#, "unrecognised"),
            (r#"{"hello": 1}"#, "unrecognised"),
            (r#"{}"#, "unrecognised"),
        ] {
            assert_eq!(kind(msg.as_bytes()), want, "{msg}");
        }
    }

    #[test]
    fn malformed_replies_are_still_attributed_to_their_id() {
        for (msg, want) in [
            // An error that is a string, a numeric class, no description.
            (r#"{"id": 6, "error": "broken"}"#, "malformed 6"),
            (r#"{"error": {"class": 7, "desc": "x"}, "id": 6}"#, "malformed 6"),
            (r#"{"id": 6, "error": {"class": "GenericError"}}"#, "malformed 6"),
            // The id first, then a value that is not JSON.
            (r#"{"id": 6, "return": {"a": nope}}"#, "malformed 6"),
            // The id last, after a value that is not JSON: shaped like a
            // plain reply, so the caller's decode finds the fault at once.
            (r#"{"return": [1, 2,], "id": 6}"#, "plain 6 [1, 2,]"),
            // Not JSON, and the id not where QEMU puts it: not trusted.
            (r#"{"return": [1, 2,], "id": 6, "x": 1}"#, "unrecognised"),
            // An id with other members but no outcome.
            (r#"{"id": 6, "extra": true}"#, "malformed 6"),
            // No id anywhere QEMU puts one.
            (r#"{"return": {"id": 6, "x": nope}}"#, "unrecognised"),
            // An event with a malformed timestamp is still an event.
            (r#"{"event": "RESUME", "timestamp": "soon"}"#, "event RESUME -1"),
        ] {
            assert_eq!(kind(msg.as_bytes()), want, "{msg}");
        }
        assert_eq!(kind(b"{\"id\": 6, \"return\": \"\xff\"}"), "malformed 6");
    }
}
