//! The human monitor (HMP) as text, and transactions.

use std::io::Read as _;

use qmpkit::qapi::commands::{HumanMonitorCommand, Transaction};
use qmpkit::qapi::types::TransactionAction;
use serde_json::{json, Value};

use super::done;
use crate::cli::{HmpArgs, TransactionArgs};
use crate::conn::Ctx;
use crate::exit::usage;

/// Runs a human monitor command line and returns its text.
pub async fn hmp(ctx: &Ctx, command_line: &str, cpu_index: Option<i64>) -> anyhow::Result<String> {
    let command = HumanMonitorCommand {
        command_line: command_line.to_owned(),
        cpu_index,
    };
    ctx.within("human-monitor-command", async {
        Ok(ctx.client.execute(&command).await?)
    })
    .await
}

/// `qmpctl hmp`: the text as text (a JSON string with `--json`).
pub async fn run(ctx: &Ctx, a: HmpArgs) -> anyhow::Result<()> {
    let text = hmp(ctx, &a.command.join(" "), a.cpu).await?;
    if ctx.json {
        crate::outln!("{}", json!({"output": text.replace("\r\n", "\n")}))?;
    } else {
        crate::shell::print_text(&text)?;
    }
    Ok(())
}

/// Runs actions (each `{"type": ..., "data": {...}}`) as one transaction.
/// The actions are checked against the schema's types before anything is sent.
pub async fn run_transaction(ctx: &Ctx, actions: Vec<Value>) -> anyhow::Result<()> {
    if actions.is_empty() {
        return Err(usage("a transaction needs at least one action"));
    }
    let mut typed = Vec::with_capacity(actions.len());
    for (i, a) in actions.into_iter().enumerate() {
        let shown = a.to_string();
        let action: TransactionAction = serde_json::from_value(a)
            .map_err(|e| usage(format!("transaction action {}: {e}: {shown}", i + 1)))?;
        typed.push(action);
    }
    let command = Transaction {
        actions: typed,
        properties: None,
    };
    ctx.within("transaction", async { Ok(ctx.client.execute(&command).await?) })
        .await?;
    Ok(())
}

/// `qmpctl transaction`: actions from `-a TYPE key=value...` or one JSON array.
pub async fn transaction(ctx: &Ctx, a: TransactionArgs) -> anyhow::Result<()> {
    let actions = match &a.list {
        Some(text) => {
            let text = if text == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .map_err(|e| anyhow::Error::new(e).context("cannot read the actions from stdin"))?;
                s
            } else {
                text.clone()
            };
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Array(list)) => list,
                Ok(Value::Object(mut m)) if m.get("actions").is_some_and(Value::is_array) => {
                    match m.remove("actions") {
                        Some(Value::Array(list)) => list,
                        _ => Vec::new(),
                    }
                }
                Ok(_) => {
                    return Err(usage(
                        "the actions must be a JSON array of {\"type\": ..., \"data\": {...}}",
                    ))
                }
                Err(e) => return Err(usage(format!("invalid JSON actions: {e}"))),
            }
        }
        None => a
            .actions
            .iter()
            .map(|text| crate::shell::split_words(text).and_then(|w| crate::typed::transaction_action(&w)))
            .collect::<anyhow::Result<Vec<Value>>>()?,
    };
    let n = actions.len();
    let kinds: Vec<String> = actions.iter().map(|a| crate::out::cell(&a["type"])).collect();
    run_transaction(ctx, actions).await?;
    done(
        ctx,
        json!({"actions": n}),
        &format!("transaction of {n} actions done ({})", kinds.join(", ")),
    )
}
