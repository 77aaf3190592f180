//! `shell`: an interactive QMP shell.
//!
//! The line editor (rustyline) runs on a thread of its own and hands each
//! line to the async side, which runs it and prints the reply before the
//! next prompt. Events are printed as they arrive through rustyline's
//! external printer, which redraws the line being typed underneath them.
//! Tab completes command names and, after a command, its argument names,
//! both taken from the server's own schema.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, ExternalPrinter, Helper};
use serde_json::Value;

use crate::cli::ShellArgs;
use crate::conn::Ctx;
use crate::exit;
use crate::subcommands::exec::{call_checked, parse_json_args};

const HELP: &str = "\
Type a QMP command with its arguments, in any of these forms:
  query-status
  block_resize node-name=disk1 size=2G
  blockdev-add driver=qcow2 node-name=d1 file.driver=file file.filename=/tmp/d1.qcow2
  object-add qom-type=secret id=s1 data:=\"json string\"
  device_add {\"driver\": \"usb-tablet\", \"id\": \"tab0\"}
  {\"execute\": \"query-block\"}
key=value takes the argument's type from QEMU's schema (strings stay strings,
sizes take K/M/G/T, booleans true/false/on/off); a.b=c nests, a.0=x makes a
list; key:=JSON passes JSON verbatim.
  !info block          (or `hmp info block`): a human monitor command, as text
  transaction(         then one action per line (TYPE key=value... or JSON),
  )                    and `)` runs them all atomically
Tab completes command names, argument names and enum values.
`help NAME [key=value]` lists a command's arguments with their types.
Ctrl-D or `exit` leaves.";

/// Runs the shell: interactive on a terminal, else one command per input line.
pub async fn run(ctx: &Ctx, args: ShellArgs) -> anyhow::Result<ExitCode> {
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        return run_script(ctx, args.keep_going).await;
    }
    let schema = ctx.client.schema().await?;
    let mut commands: Vec<String> = schema.command_names().into_iter().map(str::to_owned).collect();
    commands.extend(["help".to_owned(), "exit".to_owned()]);
    let arguments: HashMap<String, Vec<String>> = commands
        .iter()
        .filter_map(|c| {
            let args = schema.arguments(c)?;
            Some((c.clone(), args.iter().map(|m| m.name.clone()).collect()))
        })
        .collect();
    let helper = ShellHelper {
        commands,
        arguments: Arc::new(arguments),
    };
    let history = args.history.or_else(default_history);

    let g = ctx.client.greeting();
    // A Unix socket by its path, as given; TCP as tcp:HOST:PORT.
    let at = match ctx.client.address() {
        Some(qmpkit::Address::Unix(path)) => path.display().to_string(),
        Some(other) => other.to_string(),
        None => "a stream".to_owned(),
    };
    crate::outln!(
        "Connected to QEMU {} at {at}. Tab completes, `help` explains, Ctrl-D leaves.",
        g.version,
    )?;
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (next_tx, next_rx) = std::sync::mpsc::channel::<Option<String>>();
    let (printer_tx, printer_rx) = std::sync::mpsc::channel::<Box<dyn ExternalPrinter + Send>>();
    let editor = std::thread::spawn(move || -> anyhow::Result<()> {
        let config = rustyline::Config::builder()
            .completion_type(rustyline::CompletionType::List)
            .auto_add_history(false)
            .build();
        let mut rl: Editor<ShellHelper, DefaultHistory> = Editor::with_config(config)?;
        rl.set_helper(Some(helper));
        if let Some(h) = &history {
            let _ = rl.load_history(h);
        }
        if let Ok(p) = rl.create_external_printer() {
            let _ = printer_tx.send(Box::new(p));
        }
        drop(printer_tx);
        let mut prompt = "qmp> ".to_owned();
        loop {
            match rl.readline(&prompt) {
                Ok(line) => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let _ = rl.add_history_entry(line.trim());
                    if let Some(h) = &history {
                        if let Some(dir) = h.parent() {
                            let _ = std::fs::create_dir_all(dir);
                        }
                        let _ = rl.save_history(h);
                    }
                    if line_tx.send(line).is_err() {
                        break;
                    }
                    match next_rx.recv() {
                        Ok(Some(next)) => prompt = next,
                        _ => break,
                    }
                }
                Err(ReadlineError::Interrupted) => continue,
                Err(ReadlineError::Eof) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    });

    // Events go through the external printer, from a thread of their own
    // (printing may wait for the editor to take the message).
    let mut events = ctx.client.events();
    let (ev_tx, ev_rx) = std::sync::mpsc::channel::<String>();
    let printer = tokio::task::spawn_blocking(move || {
        if let Ok(mut p) = printer_rx.recv() {
            while let Ok(msg) = ev_rx.recv() {
                if p.print(msg).is_err() {
                    break;
                }
            }
        }
    });
    let client = ctx.client.clone();
    let forward = tokio::spawn(async move {
        while let Some(item) = events.recv().await {
            let line = match item {
                qmpkit::EventItem::Event(e) => {
                    format!("event: {}\n", crate::subcommands::events::human_line(&e))
                }
                qmpkit::EventItem::Missed(n) => format!("({n} events missed)\n"),
            };
            if ev_tx.send(line).is_err() {
                return;
            }
        }
        let reason = client.closed().await;
        let _ = ev_tx.send(format!("connection closed: {reason}\n"));
    });

    let mut session = Session::default();
    while let Some(line) = line_rx.recv().await {
        let go_on = match session.run_line(ctx, &line).await {
            Ok(outcome) => outcome.print(ctx.json)?,
            Err(e) => {
                for (i, l) in exit::chain_lines(&e).iter().enumerate() {
                    eprintln!("{}{l}", if i == 0 { "error: " } else { "  caused by: " });
                }
                true
            }
        };
        let go_on = go_on && !ctx.client.is_closed();
        let next = go_on.then(|| session.prompt().to_owned());
        if next_tx.send(next).is_err() || !go_on {
            break;
        }
    }
    drop(next_tx);
    forward.abort();
    let _ = forward.await;
    let _ = printer.await;
    match editor.join() {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("the line editor failed"),
    }
    if ctx.client.is_closed() {
        crate::outln!("connection closed: {}", ctx.client.closed().await)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one command per line of stdin (for scripts and coprocesses: each
/// line runs as soon as it arrives). Stops at the first failing line, or
/// with `--keep-going` reports it and goes on; either way the exit status is
/// the first failure's (see `qmpctl --help`), 0 when every line succeeded.
async fn run_script(ctx: &Ctx, keep_going: bool) -> anyhow::Result<ExitCode> {
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    // A thread of its own: a blocking read of stdin must not hold up the
    // runtime, nor its shutdown.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut session = Session::default();
    let mut n = 0;
    let mut first_failure: Option<u8> = None;
    let mut failures = 0usize;
    while let Some(line) = lines.recv().await {
        let line = line.context("cannot read stdin")?;
        n += 1;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        match session.run_line(ctx, &line).await {
            Ok(outcome) => {
                if !outcome.print(ctx.json)? {
                    break;
                }
            }
            Err(e) => {
                let e = e.context(format!("line {n}: {}", line.trim()));
                if !keep_going {
                    return Err(e);
                }
                failures += 1;
                let code = exit::code_of(&e);
                first_failure.get_or_insert(code);
                exit::print_error(&e, ctx.json);
                if ctx.client.is_closed() {
                    break;
                }
            }
        }
    }
    if session.pending.is_some() {
        let e = exit::usage("the input ended inside `transaction(` (no closing `)`): nothing was sent");
        if !keep_going {
            return Err(e);
        }
        failures += 1;
        first_failure.get_or_insert(exit::USAGE);
        exit::print_error(&e, ctx.json);
    }
    match first_failure {
        Some(code) => {
            if !ctx.json {
                eprintln!("qmpctl: {failures} of the commands failed");
            }
            Ok(ExitCode::from(code))
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

/// What a shell line produced.
pub enum Outcome {
    /// QEMU's answer.
    Reply(Value),
    /// A human monitor command's text.
    Text(String),
    /// Nothing to print (help was printed, an action was queued).
    Quiet,
    /// `exit`.
    Exit,
}

impl Outcome {
    /// Prints it; false when the shell should end.
    fn print(self, json: bool) -> anyhow::Result<bool> {
        match self {
            Outcome::Reply(v) => crate::outln!("{}", pretty(&v, json))?,
            Outcome::Text(t) if json => crate::outln!("{}", Value::String(t))?,
            Outcome::Text(t) => print_text(&t)?,
            Outcome::Quiet => {}
            Outcome::Exit => return Ok(false),
        }
        Ok(true)
    }
}

/// Prints a human monitor's text as it is meant to be read: QEMU ends its
/// lines with CR LF; the terminal gets plain newlines.
pub fn print_text(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let text = text.replace("\r\n", "\n");
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.is_empty() && !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// A shell's state between lines: the actions of an open `transaction(`.
#[derive(Default)]
pub struct Session {
    pending: Option<Vec<Value>>,
}

impl Session {
    /// The prompt for the next line.
    fn prompt(&self) -> &'static str {
        if self.pending.is_some() {
            "transaction> "
        } else {
            "qmp> "
        }
    }

    /// Runs one shell line.
    pub async fn run_line(&mut self, ctx: &Ctx, line: &str) -> anyhow::Result<Outcome> {
        let line = line.trim();
        if let Some(actions) = &mut self.pending {
            if line == ")" {
                let actions = self.pending.take().unwrap_or_default();
                let n = actions.len();
                crate::subcommands::run_transaction(ctx, actions).await?;
                return Ok(Outcome::Reply(serde_json::json!({"transaction": n, "ok": true})));
            }
            let action = if line.starts_with('{') {
                parse_json_args(line, "the line")?
            } else {
                crate::typed::transaction_action(&split_words(line)?)?
            };
            actions.push(action);
            return Ok(Outcome::Quiet);
        }
        if line == "transaction(" || line == "transaction (" {
            self.pending = Some(Vec::new());
            return Ok(Outcome::Quiet);
        }
        if let Some(hmp) = line.strip_prefix('!') {
            return Ok(Outcome::Text(
                crate::subcommands::hmp(ctx, hmp.trim(), None).await?,
            ));
        }
        run_line(ctx, line).await
    }
}

fn pretty(v: &Value, compact: bool) -> String {
    if compact {
        v.to_string()
    } else {
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    }
}

/// Runs one shell line that is a command (not part of a transaction).
async fn run_line(ctx: &Ctx, line: &str) -> anyhow::Result<Outcome> {
    if line.starts_with('{') {
        return Ok(Outcome::Reply(
            ctx.within("request", async { Ok(ctx.client.execute_json(line).await?) })
                .await?,
        ));
    }
    let (name, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim();
    match name {
        "exit" | ".exit" => return Ok(Outcome::Exit),
        "help" | ".help" => {
            if rest.is_empty() {
                crate::outln!("{HELP}")?;
            } else {
                describe(ctx, rest).await?;
            }
            return Ok(Outcome::Quiet);
        }
        "hmp" if !rest.is_empty() => {
            return Ok(Outcome::Text(crate::subcommands::hmp(ctx, rest, None).await?));
        }
        _ => {}
    }
    let args = if rest.is_empty() {
        Value::Null
    } else if rest.starts_with('{') {
        parse_json_args(rest, "the line")?
    } else {
        let words = split_words(rest)?;
        crate::typed::command_arguments(name, words.iter().map(String::as_str))?
    };
    Ok(Outcome::Reply(
        ctx.within(name, call_checked(&ctx.client, name, &args)).await?,
    ))
}

/// Prints a command's (or a type's) members with their types, from the
/// schema this build knows; a command only the server knows gets its
/// argument names from the server.
async fn describe(ctx: &Ctx, rest: &str) -> anyhow::Result<()> {
    let words = split_words(rest)?;
    let Some((name, given)) = words.split_first() else {
        return Ok(());
    };
    let given: Vec<&str> = given.iter().map(String::as_str).collect();
    if let Ok(text) = crate::typed::describe(name, &given) {
        crate::outln!("{}", text.trim_end())?;
        return Ok(());
    }
    let schema = ctx.client.schema().await?;
    let Some(args) = schema.arguments(name) else {
        let s = crate::subcommands::exec::suggest(name, schema.command_names());
        return Err(exit::usage(format!(
            "unknown command {name:?}{}",
            if s.is_empty() {
                String::new()
            } else {
                format!("; did you mean {}?", s.join(", "))
            }
        )));
    };
    crate::outln!("{name} (newer than this qmpctl: argument names only)")?;
    for m in args {
        crate::outln!("  {}{}", m.name, if m.optional() { "?" } else { "" })?;
    }
    Ok(())
}

/// Splits `a=1 b="two words" c='x y'` into words. Double-quoted text keeps
/// its quotes (a JSON string); single-quoted text becomes a JSON string.
pub fn split_words(text: &str) -> anyhow::Result<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    let mut depth = 0i32;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                cur.push(c);
                let mut closed = false;
                while let Some(d) = chars.next() {
                    cur.push(d);
                    if d == '\\' {
                        if let Some(e) = chars.next() {
                            cur.push(e);
                        }
                    } else if d == '"' {
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    return Err(exit::usage(format!("unclosed \" in {text:?}")));
                }
            }
            '\'' => {
                let mut s = String::new();
                let mut closed = false;
                for d in chars.by_ref() {
                    if d == '\'' {
                        closed = true;
                        break;
                    }
                    s.push(d);
                }
                if !closed {
                    return Err(exit::usage(format!("unclosed ' in {text:?}")));
                }
                cur.push_str(&Value::String(s).to_string());
            }
            '{' | '[' => {
                depth += 1;
                cur.push(c);
            }
            '}' | ']' => {
                depth -= 1;
                cur.push(c);
            }
            c if c.is_whitespace() && depth == 0 => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    Ok(words)
}

fn default_history() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("qmpctl").join("history"))
}

/// Completion from the server's schema.
struct ShellHelper {
    commands: Vec<String>,
    arguments: Arc<HashMap<String, Vec<String>>>,
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        let start = before.rfind(char::is_whitespace).map(|i| i + 1).unwrap_or(0);
        let word = &before[start..];
        if start == 0 {
            let found = self
                .commands
                .iter()
                .filter(|c| c.starts_with(word))
                .map(|c| Pair {
                    display: c.clone(),
                    replacement: format!("{c} "),
                })
                .collect();
            return Ok((0, found));
        }
        if before.trim_start().starts_with('{') {
            return Ok((pos, Vec::new()));
        }
        let mut words = before[..start].split_whitespace();
        let command = words.next().unwrap_or_default();
        let given: Vec<&str> = words.collect();
        if crate::typed::knows_command(command) {
            let found = crate::typed::complete(command, &given, word)
                .into_iter()
                .map(|c| Pair {
                    display: c.trim_end().to_owned(),
                    replacement: c,
                })
                .collect();
            return Ok((start, found));
        }
        if word.contains('=') {
            return Ok((pos, Vec::new()));
        }
        // A command newer than this build: argument names from the server.
        let given: Vec<&str> = given
            .iter()
            .filter_map(|w| w.split_once('=').map(|(k, _)| k))
            .collect();
        let found = self
            .arguments
            .get(command)
            .into_iter()
            .flatten()
            .filter(|a| a.starts_with(word) && !given.contains(&a.as_str()))
            .map(|a| Pair {
                display: a.clone(),
                replacement: format!("{a}="),
            })
            .collect();
        Ok((start, found))
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}

impl Highlighter for ShellHelper {}

impl Validator for ShellHelper {}

impl Helper for ShellHelper {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_keep_json_and_quotes_together() {
        let w = split_words(r#"a=1 b="two words" c='x y' d={"k": [1, 2]}"#).unwrap();
        assert_eq!(w, ["a=1", "b=\"two words\"", "c=\"x y\"", "d={\"k\": [1, 2]}"]);
        assert!(split_words("a=\"open").is_err());
    }
}
