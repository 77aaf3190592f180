//! Version awareness: whether the QEMU at the other end has what a typed
//! call uses, decided before the call is sent.
//!
//! The generated commands describe QEMU 10.0.2. An older QEMU may lack a
//! command, or an argument a newer one added; a newer one may have dropped
//! a deprecated one. Sent anyway, such a call fails with QEMU's own terse
//! error (or, for an argument QEMU does not know, "Parameter 'x' is
//! unexpected"). Checked first against the server's `query-qmp-schema`, it
//! fails with [`Error::Unsupported`], which names what is missing and since
//! which QEMU it exists.
//!
//! Cost: the schema is fetched once per connection, by the first typed
//! call. After that a call whose command the server has in full costs one
//! hash lookup; only a call to a command of which the server lacks some
//! argument looks at the arguments the call sets.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};

use serde::Serialize;

use super::Schema;
use crate::error::{Error, Result};
use crate::wire::Version;

/// A generated command's arguments: the names of its top-level members
/// (for a union, its common members), and the named type they come from,
/// if any.
struct GeneratedArgs {
    names: Vec<String>,
    named_type: Option<String>,
}

/// Every generated command's arguments, from the generated shape: parsed
/// once, on the first check of the process (a few ms).
fn generated(command: &str) -> Option<&'static GeneratedArgs> {
    static ARGS: LazyLock<HashMap<String, GeneratedArgs>> = LazyLock::new(|| {
        let shape: serde_json::Value =
            serde_json::from_str(qmpkit_qapi::meta::SHAPE).expect("qmpkit-qapi's SHAPE is valid JSON");
        let members_of = |v: &serde_json::Value| -> Vec<String> {
            v.get("members")
                .and_then(|m| m.as_array())
                .map(|m| {
                    m.iter()
                        .filter_map(|m| m.get("name")?.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut args = HashMap::new();
        for (name, def) in shape.as_object().into_iter().flatten() {
            if def.get("kind").and_then(|k| k.as_str()) != Some("command") {
                continue;
            }
            let (names, named_type) = match def.get("args") {
                Some(serde_json::Value::String(ty)) => (
                    shape.get(ty).map(members_of).unwrap_or_default(),
                    Some(ty.clone()),
                ),
                Some(inline @ serde_json::Value::Object(_)) => (members_of(inline), None),
                _ => (Vec::new(), None),
            };
            args.insert(name.clone(), GeneratedArgs { names, named_type });
        }
        args
    });
    ARGS.get(command)
}

/// What a command's arguments are, as the generated types have them, or
/// `None` for a command this crate does not know.
fn generated_arguments(command: &str) -> Option<&'static [String]> {
    generated(command).map(|g| g.names.as_slice())
}

/// What the server has of one command.
#[derive(Debug)]
enum Verdict {
    /// Everything the generated type can send.
    Whole,
    /// Not the command.
    NoCommand,
    /// The command, without these arguments.
    Without(HashSet<&'static str>),
}

/// One connection's view of its server: the schema, and a verdict for
/// each generated command the server does not have in full, made once when
/// the schema arrives so that a call takes no lock.
pub(crate) struct Judged {
    schema: Arc<Schema>,
    partial: HashMap<&'static str, Verdict>,
}

/// The checks of one connection (`None` inside when the server would not
/// give its schema: no checks then).
#[derive(Default)]
pub(crate) struct Checks {
    judged: tokio::sync::OnceCell<Option<Judged>>,
}

impl Checks {
    /// The server's schema for checking, fetched with `fetch` on first use.
    /// A server that does not answer `query-qmp-schema` (a fake, a proxy)
    /// is not checked; one that cannot be reached fails the call.
    pub(crate) async fn judgement<F, Fut>(&self, fetch: F) -> Result<Option<&Judged>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Arc<Schema>>>,
    {
        let judged = self
            .judged
            .get_or_try_init(|| async {
                match fetch().await {
                    // A reply that is no schema at all (a fake server's
                    // canned answer) is as good as none.
                    Ok(schema) if schema.command_count() == 0 => {
                        crate::diag::debug!(
                            "the server's query-qmp-schema lists no commands: typed calls go unchecked"
                        );
                        Ok(None)
                    }
                    Ok(schema) => Ok(Some(Judged::new(schema))),
                    Err(Error::Qmp(e)) => {
                        crate::diag::debug!("no schema to check typed calls against: {e}");
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        Ok(judged.as_ref())
    }
}

impl Judged {
    fn new(schema: Arc<Schema>) -> Self {
        let partial = qmpkit_qapi::meta::COMMANDS
            .iter()
            .filter_map(|c| match judge(&schema, c.name) {
                Verdict::Whole => None,
                v => Some((c.name, v)),
            })
            .collect();
        Judged { schema, partial }
    }
}

impl Judged {
    /// Fails with [`Error::Unsupported`] when the server lacks command
    /// `name` or an argument that `args` sets.
    pub(crate) fn check<A: Serialize + ?Sized>(
        &self,
        name: &'static str,
        args: &A,
        server: &Version,
    ) -> Result<()> {
        let verdict = match self.partial.get(name) {
            Some(v) => v,
            // A generated command the server has in full, or one of the
            // caller's own making.
            None if self.schema.has_command(name) => return Ok(()),
            None => &Verdict::NoCommand,
        };
        match verdict {
            Verdict::Whole => Ok(()),
            Verdict::NoCommand => Err(unsupported(
                format!("command `{name}`"),
                command_since(name),
                server,
            )),
            Verdict::Without(missing) => {
                // Only now, for a server that lacks some argument: which
                // does this call set?
                let value =
                    serde_json::to_value(args).map_err(|e| Error::InvalidRequest(format!("{name}: {e}")))?;
                let Some(set) = value.as_object() else {
                    return Ok(());
                };
                match set.keys().find(|k| missing.contains(k.as_str())) {
                    None => Ok(()),
                    Some(arg) => Err(unsupported(
                        format!("argument `{arg}` of command `{name}`"),
                        argument_since(name, arg),
                        server,
                    )),
                }
            }
        }
    }
}

fn judge(schema: &Schema, name: &str) -> Verdict {
    let Some(live) = schema.arguments(name) else {
        return Verdict::NoCommand;
    };
    let Some(generated) = generated_arguments(name) else {
        return Verdict::Whole;
    };
    let missing: HashSet<&'static str> = generated
        .iter()
        .filter(|g| !live.iter().any(|m| &m.name == *g))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        Verdict::Whole
    } else {
        Verdict::Without(missing)
    }
}

fn command_since(name: &str) -> Option<&'static str> {
    qmpkit_qapi::meta::command(name).and_then(|c| c.since)
}

/// An argument's own `since`, when QEMU's schema documents one. Never its
/// command's: an argument a server lacks is newer than its command.
fn argument_since(command: &str, arg: &str) -> Option<&'static str> {
    use qmpkit_qapi::meta;
    if let Some(since) = meta::member(command, arg).and_then(|m| m.since) {
        return Some(since);
    }
    // A command of a named type: the member belongs to that type.
    generated(command)
        .and_then(|g| g.named_type.as_deref())
        .and_then(|ty| meta::member(ty, arg).and_then(|m| m.since))
}

fn unsupported(what: String, since: Option<&'static str>, server: &Version) -> Error {
    Error::Unsupported {
        what,
        since,
        server: server.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn judgement(schema: Schema) -> Judged {
        Judged::new(Arc::new(schema))
    }

    const V8_1: Version = Version {
        major: 8,
        minor: 1,
        micro: 0,
    };

    /// A schema like QEMU 8.1's for `migrate` (no `channels` yet), and no
    /// `query-stats` at all.
    fn old_schema() -> Schema {
        Schema::from_reply(&json!([
            {"name": "migrate", "meta-type": "command", "arg-type": "1", "ret-type": "0"},
            {"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "2"},
            {"name": "1", "meta-type": "object", "members": [
                {"name": "uri", "type": "str", "default": null},
                {"name": "detach", "type": "bool", "default": null},
                {"name": "resume", "type": "bool", "default": null}]},
            {"name": "0", "meta-type": "object", "members": []}
        ]))
    }

    #[test]
    fn a_command_the_server_lacks_is_named_with_its_version() {
        let checks = judgement(old_schema());
        let e = checks
            .check("query-stats", &json!({"target": "vm"}), &V8_1)
            .unwrap_err();
        let Error::Unsupported { what, since, server } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(what, "command `query-stats`");
        assert_eq!(*since, Some("7.1"));
        assert_eq!(server, "8.1.0");
        assert_eq!(
            e.to_string(),
            "this QEMU (8.1.0) has no command `query-stats`, which QEMU has had since 7.1"
        );
    }

    #[test]
    fn only_an_argument_the_call_sets_counts() {
        let checks = judgement(old_schema());
        checks
            .check("migrate", &json!({"uri": "unix:/x"}), &V8_1)
            .expect("a call without `channels` is fine on 8.1");
        let e = checks
            .check("migrate", &json!({"channels": []}), &V8_1)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("this QEMU (8.1.0) has no argument `channels` of command `migrate`"),
            "{e}"
        );
        checks
            .check("query-status", &json!(null), &V8_1)
            .expect("a command the server has in full");
    }

    #[test]
    fn an_argument_with_its_own_version_is_named_with_it() {
        // QEMU 8.2's migrate-incoming: no `exit-on-error` yet.
        let schema = Schema::from_reply(&json!([
            {"name": "migrate-incoming", "meta-type": "command", "arg-type": "1", "ret-type": "0"},
            {"name": "1", "meta-type": "object", "members": [
                {"name": "uri", "type": "str", "default": null},
                {"name": "channels", "type": "[2]", "default": null}]}
        ]));
        let v8_2 = Version {
            major: 8,
            minor: 2,
            micro: 0,
        };
        let e = judgement(schema)
            .check(
                "migrate-incoming",
                &json!({"uri": "defer", "exit-on-error": false}),
                &v8_2,
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "this QEMU (8.2.0) has no argument `exit-on-error` of command `migrate-incoming`, which QEMU has had since 9.1"
        );
    }

    #[test]
    fn every_generated_command_has_its_arguments_known() {
        // The generated layer and its shape agree: every command resolves,
        // and the ones with arguments list some.
        for item in qmpkit_qapi::meta::COMMANDS {
            let args = generated_arguments(item.name).unwrap_or_else(|| panic!("{}", item.name));
            if item.name == "blockdev-add" {
                assert!(args.iter().any(|a| a == "node-name"), "{args:?}");
            }
        }
        assert_eq!(
            generated_arguments("migrate").unwrap(),
            ["uri", "channels", "detach", "resume"]
        );
    }
}
