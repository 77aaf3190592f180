//! `events`: print events as they happen.

use std::process::ExitCode;

use qmpkit::{Event, EventFilter, EventItem};
use serde_json::{json, Value};

use crate::cli::EventsArgs;
use crate::conn::Ctx;
use crate::exec::suggest;
use crate::exit::{usage, ConnectFailure};
use crate::outln;

/// An event as one readable line: time, name, data.
pub fn human_line(e: &Event) -> String {
    let time = e
        .timestamp()
        .to_system_time()
        .map(|t| humantime::format_rfc3339_micros(t).to_string())
        .unwrap_or_else(|| "(no time)".into());
    if e.data().is_null() {
        format!("{time} {}", e.name())
    } else {
        format!("{time} {} {}", e.name(), e.data())
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

/// Runs `events`.
pub async fn run(ctx: &Ctx, args: EventsArgs) -> anyhow::Result<ExitCode> {
    // Subscribe before anything else so that nothing is missed.
    let filter = if args.filter.is_empty() {
        EventFilter::all()
    } else {
        let mut names = args.filter.clone();
        if let Some(u) = &args.until {
            names.push(u.clone());
        }
        EventFilter::names(names)
    };
    let mut stream = ctx.client.subscribe(filter);
    check_event_names(ctx, args.filter.iter().chain(&args.until)).await?;

    let mut seen = 0u64;
    if args.count == Some(0) {
        return Ok(ExitCode::SUCCESS);
    }
    while let Some(item) = stream.recv().await {
        let event = match item {
            EventItem::Event(e) => e,
            EventItem::Missed(n) => {
                eprintln!("qmpctl: {n} events were missed (the output is read too slowly)");
                continue;
            }
        };
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
    // The connection closed: fine for an open-ended stream, not when the
    // caller asked for more.
    if args.count.is_some() || args.until.is_some() {
        let reason = ctx.client.closed().await;
        return Err(anyhow::Error::new(reason).context(ConnectFailure(format!(
            "the connection closed after {seen} events, before the ones asked for"
        ))));
    }
    Ok(ExitCode::SUCCESS)
}

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
