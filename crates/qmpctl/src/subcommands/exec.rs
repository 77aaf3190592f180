//! `exec`: any QMP command by name, and the argument syntax shared with the
//! shell: a JSON object, or `key=value` pairs.

use std::io::Read;
use std::process::ExitCode;

use serde_json::Value;

use crate::cli::ExecArgs;
use crate::conn::Ctx;
use crate::exit::usage;
use crate::out;

/// Runs `exec NAME [ARGS]` and prints QEMU's `return` value.
pub async fn run(ctx: &Ctx, args: ExecArgs) -> anyhow::Result<ExitCode> {
    let arguments = match args.args.as_slice() {
        [] => Value::Null,
        [one] if one == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| anyhow::Error::new(e).context("cannot read JSON arguments from stdin"))?;
            if text.trim().is_empty() {
                Value::Null
            } else {
                parse_json_args(&text, "stdin")?
            }
        }
        [one] if one.trim_start().starts_with('{') || one.trim_start().starts_with('[') => {
            parse_json_args(one, "the command line")?
        }
        pairs => crate::typed::command_arguments(&args.name, pairs.iter().map(String::as_str))?,
    };
    let reply = ctx
        .within(&args.name, call_checked(&ctx.client, &args.name, &arguments))
        .await?;
    out::json(&reply, ctx.json)?;
    Ok(ExitCode::SUCCESS)
}

/// Parses a JSON object of arguments; a mistake is reported with its line
/// and column and a caret under it.
pub fn parse_json_args(text: &str, origin: &str) -> anyhow::Result<Value> {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(other) => Err(usage(format!(
            "the arguments must be a JSON object ({{\"name\": value, ...}}), not {} (from {origin})",
            kind(&other)
        ))),
        Err(e) => {
            let (line, col) = (e.line(), e.column());
            let mut msg = format!("invalid JSON arguments (from {origin}): {e}");
            if let Some(source_line) = text.lines().nth(line.saturating_sub(1)) {
                let caret_at = source_line
                    .char_indices()
                    .take_while(|(i, _)| *i < col.saturating_sub(1))
                    .count();
                msg.push_str(&format!("\n{source_line}\n{}^", " ".repeat(caret_at)));
            }
            Err(usage(msg))
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses `key=value` pairs into a JSON object without a schema: a value
/// that is valid JSON is taken as JSON, anything else as a string; `a.b=c`
/// nests; `key:=JSON` is verbatim. Commands use
/// [`crate::typed::command_arguments`] instead, which follows the schema.
pub fn parse_pairs<'a>(pairs: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Value> {
    crate::typed::untyped_pairs(pairs)
}

/// Runs a command by name; when QEMU says there is no such command, the
/// error names the closest commands of the server's schema.
pub async fn call_checked(client: &qmpkit::Client, name: &str, args: &Value) -> anyhow::Result<Value> {
    match client.call::<Value, Value>(name, args).await {
        Ok(v) => Ok(v),
        Err(e) if e.class() == Some(&qmpkit::ErrorClass::CommandNotFound) => {
            let names = match client.schema().await {
                Ok(schema) => schema.command_names().into_iter().map(str::to_owned).collect(),
                Err(_) => Vec::new(),
            };
            let hint = match suggest(name, names.iter().map(String::as_str)).as_slice() {
                [] => "; `qmpctl exec query-commands` lists them".to_owned(),
                [one] => format!("; did you mean {one}?"),
                many => format!("; did you mean one of {}?", many.join(", ")),
            };
            Err(anyhow::Error::new(e)
                .context(crate::exit::UsageError(format!("unknown command {name:?}{hint}"))))
        }
        Err(e) => Err(e.into()),
    }
}

/// Up to three candidates close to `word`: by spelling (fewest edits
/// first, then the same length, then the same beginning), or containing it.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut scored: Vec<(usize, usize, f64, &str)> = candidates
        .into_iter()
        .filter_map(|c| {
            let edits = strsim::damerau_levenshtein(word, c);
            let similar = strsim::jaro_winkler(word, c);
            let contains = word.len() >= 3 && c.contains(word);
            let close = edits <= (word.len() / 4).max(1) || similar >= 0.9 || contains;
            close.then_some((edits, word.len().abs_diff(c.len()), similar, c))
        })
        .collect();
    scored.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.total_cmp(&a.2)));
    scored.into_iter().take(3).map(|(.., c)| c.to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pairs_nest_and_take_json_values() {
        let v = parse_pairs([
            "driver=qcow2",
            "file.driver=file",
            "file.filename=/tmp/a b",
            "read-only=true",
            "size=10",
        ])
        .unwrap();
        assert_eq!(
            v,
            json!({"driver": "qcow2", "file": {"driver": "file", "filename": "/tmp/a b"}, "read-only": true, "size": 10})
        );
        assert!(parse_pairs(["novalue"]).is_err());
        assert!(parse_pairs(["a=1", "a.b=2"]).is_err());
    }

    #[test]
    fn json_errors_point_at_the_mistake() {
        let e = parse_json_args("{\"device\" \"x\"}", "test")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1 column 11"), "{e}");
        assert!(e.ends_with("\n{\"device\" \"x\"}\n          ^"), "{e}");
        let e = parse_json_args("[1]", "test").unwrap_err().to_string();
        assert!(e.contains("not an array"), "{e}");
    }

    #[test]
    fn suggestions_by_spelling_and_by_part() {
        let names = ["query-status", "query-cpus-fast", "stop", "cont", "query-block"];
        assert_eq!(suggest("query-stauts", names)[0], "query-status");
        assert_eq!(suggest("status", names)[0], "query-status");
        assert!(suggest("zzzzzz", names).is_empty());
    }
}
