//! The server's own description of its commands (`query-qmp-schema`), fetched
//! once per connection. Used to choose between command forms that differ
//! across QEMU versions, and by tools for completion.

use std::collections::HashMap;

use serde::Deserialize;

pub(crate) mod check;

/// The commands, events and argument names a QMP server supports.
#[derive(Debug, Default)]
pub struct Schema {
    commands: HashMap<String, CommandInfo>,
    events: Vec<String>,
    objects: HashMap<String, Vec<Member>>,
}

#[derive(Debug)]
struct CommandInfo {
    arg_type: String,
    allow_oob: bool,
}

/// One member (argument or field) of an object type.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Member {
    /// The member's name.
    pub name: String,
    /// The member's type name (masked, as QEMU reports it).
    pub type_name: String,
    optional: bool,
}

impl Member {
    /// True when the member may be left out.
    pub fn optional(&self) -> bool {
        self.optional
    }

    fn from_json(m: &serde_json::Value) -> Option<Member> {
        Some(Member {
            name: m.get("name")?.as_str()?.to_owned(),
            type_name: m.get("type")?.as_str()?.to_owned(),
            // QEMU marks optional members with `"default": null`.
            optional: m.get("default").is_some(),
        })
    }
}

#[derive(Deserialize)]
struct SchemaInfo {
    name: String,
    #[serde(rename = "meta-type")]
    meta_type: String,
    #[serde(rename = "arg-type", default)]
    arg_type: Option<String>,
    #[serde(rename = "allow-oob", default)]
    allow_oob: bool,
    #[serde(default)]
    members: Option<Vec<serde_json::Value>>,
}

impl Schema {
    /// Builds a schema from the reply to `query-qmp-schema`.
    pub fn from_reply(entries: &serde_json::Value) -> Self {
        let infos: Vec<SchemaInfo> = match serde_json::from_value(entries.clone()) {
            Ok(i) => i,
            Err(_) => return Schema::default(),
        };
        let mut schema = Schema::default();
        for info in infos {
            match info.meta_type.as_str() {
                "command" => {
                    schema.commands.insert(
                        info.name,
                        CommandInfo {
                            arg_type: info.arg_type.unwrap_or_default(),
                            allow_oob: info.allow_oob,
                        },
                    );
                }
                "event" => schema.events.push(info.name),
                "object" => {
                    // Only plain members (name + type) matter here.
                    let members = info
                        .members
                        .unwrap_or_default()
                        .iter()
                        .filter_map(Member::from_json)
                        .collect();
                    schema.objects.insert(info.name, members);
                }
                _ => {}
            }
        }
        schema
    }

    /// How many commands the server has (0 when its reply was not a schema).
    pub fn command_count(&self) -> usize {
        self.commands.len()
    }

    /// True when the server has this command.
    pub fn has_command(&self, name: &str) -> bool {
        self.commands.contains_key(name)
    }

    /// True when the command may be sent with `exec-oob`.
    pub fn allows_oob(&self, name: &str) -> bool {
        self.commands.get(name).is_some_and(|c| c.allow_oob)
    }

    /// Every command name, sorted.
    pub fn command_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.commands.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Every event name, sorted.
    pub fn event_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.events.iter().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The top-level arguments of a command (empty for none; `None` when the
    /// command does not exist).
    pub fn arguments(&self, command: &str) -> Option<&[Member]> {
        let info = self.commands.get(command)?;
        Some(self.objects.get(&info.arg_type).map(Vec::as_slice).unwrap_or(&[]))
    }

    /// True when the command takes an argument of this name.
    pub fn has_argument(&self, command: &str, argument: &str) -> bool {
        self.arguments(command)
            .is_some_and(|args| args.iter().any(|m| m.name == argument))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn commands_and_their_arguments() {
        let s = Schema::from_reply(&json!([
            {"name": "migrate", "meta-type": "command", "arg-type": "10", "ret-type": "0"},
            {"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "11", "allow-oob": false},
            {"name": "10", "meta-type": "object", "members": [
                {"name": "uri", "type": "str", "default": null},
                {"name": "channels", "type": "[12]", "default": null},
                {"name": "detach", "type": "bool"}]},
            {"name": "STOP", "meta-type": "event", "arg-type": "0"},
            {"name": "str", "meta-type": "builtin", "json-type": "string"}
        ]));
        assert!(s.has_command("migrate") && !s.has_command("nope"));
        assert!(s.has_argument("migrate", "channels"));
        assert!(!s.has_argument("migrate", "blk"));
        let args = s.arguments("migrate").unwrap();
        assert!(args[0].optional() && !args[2].optional());
        assert_eq!(s.arguments("query-status").unwrap().len(), 0);
        assert_eq!(s.event_names(), ["STOP"]);
        assert_eq!(s.command_names(), ["migrate", "query-status"]);
    }
}
