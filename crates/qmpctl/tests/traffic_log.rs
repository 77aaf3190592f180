//! `--log` writes Incus's `qmp` package's format, whose timestamps are local time
//! with its offset, as Go's `time.Now().Format(time.RFC3339)` prints them.
//! The zone comes from `TZ`, set here on the child process alone. A fake
//! server answers, so no QEMU is needed.

mod support;

use qmpkit_fake::FakeServer;
use support::*;

/// The log of one `qmpctl --log FILE status` run with `TZ` set to `tz`.
async fn log_under(tz: &str) -> String {
    let srv = FakeServer::instant().await.expect("start fake server");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("qemu.qmp.log");
    ctl_env(
        srv.path(),
        &["--log", log.to_str().unwrap(), "status"],
        &[("TZ", tz)],
    )
    .await
    .ok();
    std::fs::read_to_string(&log).unwrap()
}

/// The timestamp of each line that has one, checked to be second-precise
/// RFC 3339; the offset part is returned.
fn offsets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let stamp = line
            .strip_prefix('[')
            .and_then(|l| l.split_once("] "))
            .map(|(s, _)| s)
            .unwrap_or_else(|| panic!("not a log line: {line:?}"));
        let (civil, offset) = stamp.split_at(19);
        let shape: String = civil
            .chars()
            .map(|c| if c.is_ascii_digit() { '9' } else { c })
            .collect();
        assert_eq!(shape, "9999-99-99T99:99:99", "{line:?}");
        out.push(offset.to_owned());
    }
    assert!(!out.is_empty(), "nothing logged: {text:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_times_carry_the_local_offset() {
    // POSIX rules, so no time zone database is needed: +05:30 and -03:00
    // all year, and UTC, which Go writes as Z.
    for (tz, want) in [
        ("<+0530>-5:30", "+05:30"),
        ("<-03>3", "-03:00"),
        ("UTC0", "Z"),
        ("", "Z"),
    ] {
        let text = log_under(tz).await;
        for offset in offsets(&text) {
            assert_eq!(offset, want, "TZ={tz:?}: {text}");
        }
        assert!(text.contains("] QUERY: {\"execute\":\"query-status\""), "{text}");
        assert!(text.contains("\n\n"), "an empty line after each reply: {text}");
    }
}
