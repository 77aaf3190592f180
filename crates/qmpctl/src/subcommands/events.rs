//! `events`: print events as they happen.

use std::fmt::Write;
use std::process::ExitCode;

use qmpkit::{Event, EventFilter, EventItem, Timestamp};
use serde_json::{json, Value};

use crate::cli::EventsArgs;
use crate::conn::Ctx;
use crate::exit::{usage, ConnectFailure, Deadline};
use crate::outln;
use crate::subcommands::exec::suggest;

/// An event as one readable line: time, name, data.
pub fn human_line(e: &Event) -> String {
    let time = human_time(e.timestamp());
    if e.data().is_null() {
        format!("{time} {}", e.name())
    } else {
        format!("{time} {} {}", e.name(), e.data())
    }
}

/// An event's time for people: RFC 3339 in UTC when it has one, else the
/// numbers QEMU sent (a line must print whatever the server chose).
pub fn human_time(ts: Timestamp) -> String {
    if let Some(t) = ts.to_system_time() {
        // humantime refuses years past 9999 with a formatting error, which
        // `to_string` would turn into a panic: write it and check instead.
        let mut s = String::new();
        if write!(s, "{}", humantime::format_rfc3339_micros(t)).is_ok() {
            return s;
        }
    }
    match (ts.seconds, ts.microseconds) {
        // QEMU's mark for a failed host clock.
        (-1, -1) => "(no time)".into(),
        (s, us) if s >= 0 && (0..1_000_000).contains(&us) => format!("@{s}.{us:06}"),
        (s, us) => format!("(seconds {s}, microseconds {us})"),
    }
}

/// An event as QEMU sent it, as one JSON object.
pub fn json_value(e: &Event) -> Value {
    let ts = e.timestamp();
    let mut v = json!({
        "event": e.name(),
        "timestamp": {"seconds": ts.seconds, "microseconds": ts.microseconds},
    });
    if !e.data().is_null() {
        v["data"] = e.data().clone();
    }
    v
}

/// Runs `events`. It ends after `--count` events, the `--until` event or
/// `--timeout` (an error when the events asked for did not all arrive, a
/// success for an open-ended stream); when QEMU goes away, it succeeds only
/// if QEMU said SHUTDOWN first (a `quit`, a power-off), and fails when it
/// vanished without one (killed, crashed).
pub async fn run(ctx: &Ctx, args: EventsArgs) -> anyhow::Result<ExitCode> {
    // Subscribe before anything else so that nothing is missed. SHUTDOWN is
    // always watched: it tells a clean end from a vanished QEMU.
    let filter = if args.filter.is_empty() {
        EventFilter::all()
    } else {
        let mut names = args.filter.clone();
        names.extend(args.until.clone());
        names.push(SHUTDOWN.to_owned());
        EventFilter::names(names)
    };
    let mut stream = ctx.client.subscribe(filter);
    check_event_names(ctx, args.filter.iter().chain(&args.until)).await?;

    let mut seen = 0u64;
    if args.count == Some(0) {
        return Ok(ExitCode::SUCCESS);
    }
    let bounded = args.count.is_some() || args.until.is_some();
    let deadline = ctx.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut shut_down = false;
    loop {
        let item = match deadline {
            None => stream.recv().await,
            Some(at) => match tokio::time::timeout_at(at, stream.recv()).await {
                Ok(item) => item,
                Err(_) if bounded => {
                    let t = humantime::format_duration(ctx.timeout.unwrap_or_default());
                    return Err(anyhow::Error::new(Deadline(format!(
                        "events: {seen} events within {t} (--timeout), not the ones asked for"
                    ))));
                }
                // An open-ended stream for as long as asked: done.
                Err(_) => return Ok(ExitCode::SUCCESS),
            },
        };
        let Some(item) = item else { break };
        let event = match item {
            EventItem::Event(e) => e,
            EventItem::Missed(n) => {
                eprintln!("qmpctl: {n} events were missed (the output is read too slowly)");
                continue;
            }
        };
        shut_down |= event.name() == SHUTDOWN;
        let is_last = args.until.as_deref() == Some(event.name());
        let wanted = is_last || args.filter.is_empty() || args.filter.iter().any(|f| f == event.name());
        if wanted {
            if ctx.json {
                outln!("{}", json_value(&event))?;
            } else {
                outln!("{}", human_line(&event))?;
            }
            seen += 1;
        }
        if is_last || args.count.is_some_and(|c| seen >= c) {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let reason = ctx.client.closed().await;
    if bounded {
        return Err(anyhow::Error::new(reason).context(ConnectFailure(format!(
            "the connection closed after {seen} events, before the ones asked for"
        ))));
    }
    if !shut_down {
        return Err(anyhow::Error::new(reason).context(ConnectFailure(format!(
            "QEMU went away without a SHUTDOWN event (killed or crashed?) after {seen} events"
        ))));
    }
    Ok(ExitCode::SUCCESS)
}

/// The event QEMU sends before it exits on purpose.
const SHUTDOWN: &str = "SHUTDOWN";

/// Refuses event names the server does not know, suggesting close ones.
async fn check_event_names<'a>(ctx: &Ctx, names: impl Iterator<Item = &'a String>) -> anyhow::Result<()> {
    let names: Vec<&String> = names.collect();
    if names.is_empty() {
        return Ok(());
    }
    let schema = ctx.client.schema().await?;
    let known = schema.event_names();
    for name in names {
        if !known.contains(&name.as_str()) {
            let hint = match suggest(name, known.iter().copied()).as_slice() {
                [] => String::new(),
                s => format!("; did you mean {}?", s.join(" or ")),
            };
            return Err(usage(format!("QEMU has no event named {name:?}{hint}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seconds: i64, microseconds: i64) -> String {
        let ts = Timestamp {
            seconds,
            microseconds,
        };
        human_line(&Event::new("STOP", Value::Null, ts))
    }

    #[test]
    fn times_in_rfc3339_while_they_fit() {
        assert_eq!(line(0, 0), "1970-01-01T00:00:00.000000Z STOP");
        assert_eq!(line(1_700_000_000, 123_456), "2023-11-14T22:13:20.123456Z STOP");
        assert_eq!(line(253_402_300_799, 999_999), "9999-12-31T23:59:59.999999Z STOP");
    }

    #[test]
    fn times_past_year_9999_or_odd_print_as_qemu_sent_them() {
        // Year 10000 and later: RFC 3339 has no room for them (the
        // formatter used to fail, and the line panicked).
        assert_eq!(line(253_402_300_800, 0), "@253402300800.000000 STOP");
        assert_eq!(line(i64::MAX, 999_999), "@9223372036854775807.999999 STOP");
        assert_eq!(
            line(i64::MAX, i64::MAX),
            "(seconds 9223372036854775807, microseconds 9223372036854775807) STOP"
        );
        assert_eq!(
            line(253_402_300_799, 1_000_000),
            "(seconds 253402300799, microseconds 1000000) STOP"
        );
        assert_eq!(line(-1, -1), "(no time) STOP");
        assert_eq!(line(-1, 0), "(seconds -1, microseconds 0) STOP");
        assert_eq!(
            line(i64::MIN, i64::MIN),
            format!("(seconds {}, microseconds {}) STOP", i64::MIN, i64::MIN)
        );
        assert_eq!(line(0, -5), "(seconds 0, microseconds -5) STOP");
    }
}
