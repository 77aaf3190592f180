//! The traffic log: a best-effort transcript of commands, replies and events.
//!
//! Lines look like the Go package's: `[2026-11-25T13:00:00Z] QUERY: {...}`,
//! `REPLY:` and `Event:`. Logging never fails a command: a missing directory
//! means no log, and a write error is ignored (a caller might otherwise retry a
//! command that did run). The file is created with mode 0600 and secrets are
//! redacted before they are written.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::Value;

/// What replaces a secret in the log.
const REDACTED: &str = "<redacted>";

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
                tracing::warn!(path = %path.display(), error = %e, "QMP traffic log disabled");
                None
            }
        }
    }

    pub(crate) fn query(&self, request: &[u8]) {
        let text = match serde_json::from_slice::<Value>(request) {
            Ok(mut v) => {
                redact(&mut v);
                v.to_string()
            }
            Err(_) => String::from_utf8_lossy(request).trim_end().to_owned(),
        };
        self.line("QUERY", text.as_bytes());
    }

    pub(crate) fn reply(&self, reply: &[u8]) {
        self.line("REPLY", reply);
    }

    pub(crate) fn event(&self, event: &[u8]) {
        self.line("Event", event);
    }

    fn line(&self, kind: &str, body: &[u8]) {
        let body = body.trim_ascii();
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now());
        let mut line = Vec::with_capacity(body.len() + 40);
        let _ = write!(line, "[{stamp}] {kind}: ");
        line.extend_from_slice(body);
        line.push(b'\n');
        if let Ok(mut f) = self.file.lock() {
            // Best effort by design: see the module docs.
            let _ = f.write_all(&line);
        }
    }
}

/// Removes secret material from a request before it is logged: the `data` of
/// a `secret` object, and every member whose name mentions a password or key.
pub(crate) fn redact(request: &mut Value) {
    let is_secret_object = request.get("execute").and_then(Value::as_str) == Some("object-add")
        && request
            .pointer("/arguments/qom-type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.starts_with("secret"));
    if is_secret_object {
        if let Some(data) = request.pointer_mut("/arguments/data") {
            *data = Value::from(REDACTED);
        }
    }
    redact_fields(request);
}

fn redact_fields(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                if k.contains("password") || k == "passphrase" || k == "key-secret-data" {
                    *val = Value::from(REDACTED);
                } else {
                    redact_fields(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_fields),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secrets_are_redacted() {
        let mut v = json!({"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s0", "data": "hunter2"}});
        redact(&mut v);
        assert_eq!(v["arguments"]["data"], REDACTED);
        assert_eq!(v["arguments"]["id"], "s0");
        let mut v = json!({"execute": "change-vnc-password", "arguments": {"password": "pw"}});
        redact(&mut v);
        assert_eq!(v["arguments"]["password"], REDACTED);
        let mut v = json!({"execute": "x", "arguments": {"list": [{"Password": "pw"}]}});
        redact(&mut v);
        assert_eq!(v["arguments"]["list"][0]["Password"], REDACTED);
    }

    #[test]
    fn log_is_private_and_missing_directory_means_no_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.log");
        let log = TrafficLog::open(&path).unwrap();
        log.query(
            br#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s","data":"hunter2"},"id":1}"#,
        );
        log.reply(b"{\"return\": {}, \"id\": 1}\r\n");
        log.event(b"{\"event\": \"STOP\"}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with('[') && lines[0].contains("] QUERY: {"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].ends_with("REPLY: {\"return\": {}, \"id\": 1}"),
            "{}",
            lines[1]
        );
        assert!(lines[2].contains("] Event: {\"event\""));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(TrafficLog::open(&dir.path().join("missing/qmp.log")).is_none());
    }
}
