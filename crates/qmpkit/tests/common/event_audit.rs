//! Every event a test's QEMU sends must decode into its generated type and
//! give back QEMU's data unchanged (issue #13). [`super::vm_with`] gives each
//! QEMU a traffic log; when the test ends, [`check`] reads the events in it.
//!
//! The traffic log is read rather than a subscription taken, because the
//! first subscription also receives the events from the handshake on: an
//! audit that subscribed first would take them from the test. (The log
//! leaves out `VSERPORT_CHANGE`, as Incus's does; `guest_agent.rs` checks
//! those on its own stream.)
//!
//! The names of the kinds audited are recorded as empty files under
//! `CARGO_TARGET_TMPDIR/event-audit/` for a summary across suites.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use qmpkit::qapi::events::Event as Typed;
use serde_json::Value;

/// A fresh path for one QEMU's traffic log.
pub fn log_path() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("event-audit-logs");
    std::fs::create_dir_all(&dir).expect("create the event audit's directory");
    dir.join(format!(
        "{}-{}.log",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Checks every `Event:` line of a traffic log; panics listing each event
/// that does not decode, decodes only as an unknown event, or changes on
/// the way back to JSON.
pub fn check(log: &str) {
    let mut problems = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for line in log.lines() {
        let Some((_, json)) = line.split_once("] Event: ") else {
            continue;
        };
        let message: Value = match serde_json::from_str(json) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("not JSON ({e}): {json}"));
                continue;
            }
        };
        let name = message["event"].as_str().unwrap_or_default().to_owned();
        let data = message.get("data").cloned().unwrap_or(Value::Null);
        problems.extend(problems_of(&name, &data));
        names.insert(name);
    }
    record(&names);
    assert!(
        problems.is_empty(),
        "events that do not survive their typed form:\n{}",
        problems.join("\n")
    );
}

/// What is wrong with one event's typed form (nothing, for a good one).
pub fn problems_of(name: &str, data: &Value) -> Vec<String> {
    let typed = match Typed::decode(name, data) {
        Ok(t) => t,
        Err(e) => return vec![format!("{name} does not decode: {e}; data {data}")],
    };
    if matches!(typed, Typed::Other { .. }) {
        return vec![format!("{name} has no generated type")];
    }
    if typed.name() != name {
        return vec![format!("{name} decoded as {}", typed.name())];
    }
    match typed.data() {
        Ok(back) => differences(&format!("{name}.data"), &back, data),
        Err(e) => vec![format!("{name} does not encode: {e}")],
    }
}

/// Where `got` differs from `want`, by JSON path. Numbers compare by value
/// (a `number` member QEMU sent as `1` comes back as `1.0`).
pub fn differences(at: &str, got: &Value, want: &Value) -> Vec<String> {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            let mut out = Vec::new();
            for (k, wv) in w {
                match g.get(k) {
                    Some(gv) => out.extend(differences(&format!("{at}.{k}"), gv, wv)),
                    None => out.push(format!("{at}.{k}: lost (was {wv})")),
                }
            }
            for (k, gv) in g {
                if !w.contains_key(k) {
                    out.push(format!("{at}.{k}: added ({gv})"));
                }
            }
            out
        }
        (Value::Array(g), Value::Array(w)) if g.len() == w.len() => g
            .iter()
            .zip(w)
            .enumerate()
            .flat_map(|(i, (g, w))| differences(&format!("{at}[{i}]"), g, w))
            .collect(),
        (Value::Number(g), Value::Number(w)) if g.as_f64() == w.as_f64() => Vec::new(),
        _ if got == want => Vec::new(),
        _ => vec![format!("{at}: {got} instead of {want}")],
    }
}

/// Notes the kinds audited, one empty file per name (safe across processes).
fn record(names: &std::collections::BTreeSet<String>) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("event-audit");
    if std::fs::create_dir_all(&dir).is_ok() {
        for name in names {
            let _ = std::fs::File::create(dir.join(name));
        }
    }
}
