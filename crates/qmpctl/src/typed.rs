//! `key=value` arguments typed from QEMU's schema.
//!
//! The schema comes from `qmpkit::qapi::meta::SHAPE` (QEMU's own type
//! names, members, optionality, enum values, union tags and branches), not
//! from the live `query-qmp-schema`, whose type names are masked numbers
//! that mean nothing to a person.
//!
//! Syntax of one argument:
//! - `key=value`: the value takes the argument's type: a string stays a
//!   string (`data=1234` sends `"1234"`), an integer or number is parsed
//!   (sizes accept K/M/G/T), a boolean is `true/false/on/off/yes/no`, an
//!   enum value is checked against its values.
//! - `a.b=value`: nested objects, through unions (the discriminator's value
//!   picks the branch's members) and alternates; `a.0=x a.1=y` builds a list.
//! - `key:=JSON`: the value is JSON, passed verbatim.
//!
//! A command this build does not know (a newer QEMU) gets the untyped
//! reading: JSON when the value parses as JSON, else a string.

use std::sync::OnceLock;

use serde_json::{Map, Number, Value};

use crate::exit::usage;

/// The parsed shape: QEMU's name of every command, event and type to its description.
fn shape() -> &'static Map<String, Value> {
    static SHAPE: OnceLock<Map<String, Value>> = OnceLock::new();
    SHAPE.get_or_init(|| serde_json::from_str(qmpkit::qapi::meta::SHAPE).unwrap_or_default())
}

/// One `key=value` before typing: a leaf keeps its text, a branch its children in order.
#[derive(Debug, Clone)]
enum Node {
    Leaf { raw: String, verbatim: bool },
    Tree(Vec<(String, Node)>),
}

impl Node {
    fn child(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Tree(kids) => kids.iter().find(|(k, _)| k == key).map(|(_, n)| n),
            Node::Leaf { .. } => None,
        }
    }
}

/// Splits `key=value` / `key:=json` into its key path, raw value and whether it is verbatim JSON.
fn split_pair(pair: &str) -> anyhow::Result<(Vec<&str>, &str, bool)> {
    let Some((key, raw)) = pair.split_once('=') else {
        return Err(usage(format!(
            "argument {pair:?} is not key=value (or key:=JSON, or give the arguments as one JSON object)"
        )));
    };
    let (key, verbatim) = match key.strip_suffix(':') {
        Some(k) => (k, true),
        None => (key, false),
    };
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(usage(format!("argument {pair:?} has an empty name")));
    }
    Ok((key.split('.').collect(), raw, verbatim))
}

fn build_tree<'a>(pairs: impl IntoIterator<Item = &'a str>, lenient: bool) -> anyhow::Result<Node> {
    let mut root = Node::Tree(Vec::new());
    for pair in pairs {
        let (path, raw, verbatim) = match split_pair(pair) {
            Ok(p) => p,
            Err(_) if lenient => continue,
            Err(e) => return Err(e),
        };
        let mut node = &mut root;
        for (i, part) in path.iter().enumerate() {
            let Node::Tree(kids) = node else {
                if lenient {
                    break;
                }
                return Err(usage(format!(
                    "argument {:?}: {} is set both as a value and as an object",
                    path.join("."),
                    path[..i].join(".")
                )));
            };
            let last = i + 1 == path.len();
            let at = match kids.iter().position(|(k, _)| k == part) {
                Some(_) if last && !lenient => {
                    return Err(usage(format!("argument {:?} is given twice", path.join("."))))
                }
                Some(at) => at,
                None => {
                    let fresh = if last {
                        Node::Leaf {
                            raw: raw.to_owned(),
                            verbatim,
                        }
                    } else {
                        Node::Tree(Vec::new())
                    };
                    kids.push(((*part).to_owned(), fresh));
                    kids.len() - 1
                }
            };
            node = &mut kids[at].1;
        }
    }
    Ok(root)
}

/// The untyped reading: JSON when it parses, else a string.
fn loose(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
}

fn untyped(node: &Node) -> anyhow::Result<Value> {
    Ok(match node {
        Node::Leaf { raw, verbatim: true } => verbatim_json(raw, "")?,
        Node::Leaf { raw, .. } => loose(raw),
        Node::Tree(kids) => {
            let mut m = Map::new();
            for (k, n) in kids {
                m.insert(k.clone(), untyped(n)?);
            }
            Value::Object(m)
        }
    })
}

fn verbatim_json(raw: &str, path: &str) -> anyhow::Result<Value> {
    serde_json::from_str(raw).map_err(|e| usage(format!("{path}:={raw}: not JSON ({e})")))
}

/// Parses `key=value` pairs without a schema (JSON values when they parse,
/// `a.b=c` nests, `key:=JSON` verbatim).
pub fn untyped_pairs<'a>(pairs: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Value> {
    untyped(&build_tree(pairs, false)?)
}

/// The arguments of `command` from `key=value` pairs, typed by the schema.
pub fn command_arguments<'a>(
    command: &str,
    pairs: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<Value> {
    let tree = build_tree(pairs, false)?;
    match shape().get(command) {
        Some(def) if def["kind"] == "command" && !def["args"].is_null() => {
            if def["extra-args"] == true {
                convert_object(&tree, &def["args"], "", true)
            } else {
                convert(&tree, &def["args"], "")
            }
        }
        _ => untyped(&tree),
    }
}

/// One transaction action (`TYPE key=value...`) as `{"type": TYPE, "data": {...}}`.
pub fn transaction_action(words: &[String]) -> anyhow::Result<Value> {
    let Some((kind, pairs)) = words.split_first() else {
        return Err(usage("an empty transaction action"));
    };
    let data = build_tree(pairs.iter().map(String::as_str), false)?;
    let tree = Node::Tree(vec![
        (
            "type".into(),
            Node::Leaf {
                raw: kind.clone(),
                verbatim: false,
            },
        ),
        ("data".into(), data),
    ]);
    convert(&tree, &Value::String("TransactionAction".into()), "")
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn is_builtin(name: &str) -> bool {
    matches!(
        name,
        "str"
            | "int"
            | "int8"
            | "int16"
            | "int32"
            | "int64"
            | "uint8"
            | "uint16"
            | "uint32"
            | "uint64"
            | "size"
            | "number"
            | "bool"
            | "null"
            | "any"
            | "QType"
    )
}

/// A type reference as text: `str`, `BlockdevDriver`, `[TransactionAction]`.
pub fn type_text(ty: &Value) -> String {
    match ty {
        Value::String(s) => s.clone(),
        Value::Array(a) => format!("[{}]", a.first().map(type_text).unwrap_or_default()),
        _ => "object".into(),
    }
}

/// Converts one node to the type `ty` (a name, `[name]`, or an inline `{members}`).
fn convert(node: &Node, ty: &Value, path: &str) -> anyhow::Result<Value> {
    if let Node::Leaf { raw, verbatim: true } = node {
        return verbatim_json(raw, path);
    }
    match ty {
        Value::Array(elem) => {
            let elem = elem.first().cloned().unwrap_or(Value::String("any".into()));
            match node {
                Node::Leaf { raw, .. } => match serde_json::from_str::<Value>(raw) {
                    Ok(v @ Value::Array(_)) => Ok(v),
                    _ => Err(usage(format!(
                        "{path} is a list of {}: give {path}.0=... {path}.1=..., or {path}:=[...]",
                        type_text(&elem)
                    ))),
                },
                Node::Tree(kids) => {
                    let mut items: Vec<(usize, &Node)> = Vec::new();
                    for (k, n) in kids {
                        let i: usize = k.parse().map_err(|_| {
                            usage(format!(
                                "{path} is a list: {} is not an index (0, 1, ...)",
                                join(path, k)
                            ))
                        })?;
                        items.push((i, n));
                    }
                    items.sort_by_key(|(i, _)| *i);
                    let mut out = Vec::new();
                    for (want, (i, n)) in items.into_iter().enumerate() {
                        if i != want {
                            return Err(usage(format!("{path}: list index {want} is missing")));
                        }
                        out.push(convert(n, &elem, &join(path, &i.to_string()))?);
                    }
                    Ok(Value::Array(out))
                }
            }
        }
        Value::Object(_) => convert_object(node, ty, path, false),
        Value::String(name) if is_builtin(name) => match node {
            Node::Leaf { raw, .. } => scalar(raw, name, path),
            Node::Tree(_) if name == "any" => untyped(node),
            Node::Tree(_) => Err(usage(format!("{path} is {}, not an object", a_type(name)))),
        },
        Value::String(name) => {
            let Some(def) = shape().get(name.as_str()) else {
                return untyped(node);
            };
            match def["kind"].as_str() {
                Some("enum") => match node {
                    Node::Leaf { raw, .. } => enum_value(raw, name, def, path),
                    Node::Tree(_) => Err(usage(format!("{path} is one of {name}'s values, not an object"))),
                },
                Some("alternate") => convert_alternate(node, name, def, path),
                _ => convert_object(node, def, path, false),
            }
        }
        _ => untyped(node),
    }
}

fn a_type(name: &str) -> String {
    match name {
        "str" => "a string".into(),
        "bool" => "a boolean (true/false, on/off, yes/no)".into(),
        "number" => "a number".into(),
        "size" => "a size (bytes, or with K/M/G/T)".into(),
        "null" => "null".into(),
        n if n.contains("int") => format!("an integer ({n})"),
        n => n.to_owned(),
    }
}

fn scalar(raw: &str, name: &str, path: &str) -> anyhow::Result<Value> {
    let wrong = || usage(format!("{path} must be {}, not {raw:?}", a_type(name)));
    let int = |min: i128, max: i128| -> anyhow::Result<Value> {
        let n: i128 = raw.trim().parse().map_err(|_| wrong())?;
        if n < min || n > max {
            return Err(usage(format!(
                "{path}={raw} is out of range for {name} ({min}..={max})"
            )));
        }
        Ok(if n < 0 {
            Value::Number(Number::from(n as i64))
        } else {
            Value::Number(Number::from(n as u64))
        })
    };
    match name {
        "str" | "QType" => Ok(match serde_json::from_str::<Value>(raw) {
            // A double-quoted word of the shell is a JSON string.
            Ok(v @ Value::String(_)) if raw.starts_with('"') => v,
            _ => Value::String(raw.to_owned()),
        }),
        "int" | "int64" => int(i64::MIN.into(), i64::MAX.into()),
        "int8" => int(i8::MIN.into(), i8::MAX.into()),
        "int16" => int(i16::MIN.into(), i16::MAX.into()),
        "int32" => int(i32::MIN.into(), i32::MAX.into()),
        "uint8" => int(0, u8::MAX.into()),
        "uint16" => int(0, u16::MAX.into()),
        "uint32" => int(0, u32::MAX.into()),
        "uint64" => int(0, u64::MAX.into()),
        "size" => match int(0, u64::MAX.into()) {
            Ok(v) => Ok(v),
            Err(_) => crate::out::parse_size(raw).map(Value::from).map_err(|_| wrong()),
        },
        "number" => raw
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .ok_or_else(wrong),
        "bool" => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "on" | "yes" => Ok(Value::Bool(true)),
            "false" | "off" | "no" => Ok(Value::Bool(false)),
            _ => Err(wrong()),
        },
        "null" if raw.trim() == "null" => Ok(Value::Null),
        "null" => Err(wrong()),
        _ => Ok(loose(raw)),
    }
}

fn enum_values(def: &Value) -> Vec<&str> {
    def["values"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().or_else(|| v["name"].as_str()))
        .collect()
}

fn enum_value(raw: &str, name: &str, def: &Value, path: &str) -> anyhow::Result<Value> {
    let raw = match serde_json::from_str::<Value>(raw) {
        Ok(Value::String(s)) if raw.starts_with('"') => s,
        _ => raw.to_owned(),
    };
    let values = enum_values(def);
    if values.contains(&raw.as_str()) {
        return Ok(Value::String(raw));
    }
    let close = crate::subcommands::exec::suggest(&raw, values.iter().copied());
    let hint = if close.is_empty() {
        if values.len() <= 12 {
            format!("; one of: {}", values.join(", "))
        } else {
            format!("; `help {name}` lists its {} values", values.len())
        }
    } else {
        format!("; did you mean {}?", close.join(" or "))
    };
    Err(usage(format!("{path}: {raw:?} is not a {name} value{hint}")))
}

fn convert_alternate(node: &Node, name: &str, def: &Value, path: &str) -> anyhow::Result<Value> {
    let branches: Vec<&Value> = def["members"].as_array().into_iter().flatten().collect();
    match node {
        Node::Tree(_) => {
            let object = branches.iter().find(|b| {
                b.as_str()
                    .and_then(|n| shape().get(n))
                    .is_some_and(|d| d["kind"] == "object")
            });
            match object {
                Some(b) => convert(node, b, path),
                None => Err(usage(format!("{path} ({name}) cannot be an object"))),
            }
        }
        Node::Leaf { raw, .. } => {
            // Strings last: `null`, `true` or an enum value mean those first.
            let mut order: Vec<&&Value> = branches.iter().filter(|b| b.as_str() != Some("str")).collect();
            order.extend(branches.iter().filter(|b| b.as_str() == Some("str")));
            for b in order {
                let fits = match b.as_str() {
                    Some(n) if is_builtin(n) => scalar(raw, n, path).ok(),
                    Some(n) => match shape().get(n) {
                        Some(d) if d["kind"] == "enum" => enum_value(raw, n, d, path).ok(),
                        _ => None,
                    },
                    None => None,
                };
                if let Some(v) = fits {
                    return Ok(v);
                }
            }
            let kinds: Vec<String> = branches.iter().map(|b| type_text(b)).collect();
            Err(usage(format!(
                "{path}={raw}: not any of {} ({name})",
                kinds.join(", ")
            )))
        }
    }
}

/// A member of an object type.
pub struct Member<'a> {
    /// The member's name.
    pub name: &'a str,
    /// False when it must be given.
    pub optional: bool,
    /// Its type (a name, `[name]`).
    pub ty: &'a Value,
}

fn members_of(def: &Value) -> impl Iterator<Item = Member<'_>> {
    def["members"].as_array().into_iter().flatten().filter_map(|m| {
        Some(Member {
            name: m["name"].as_str()?,
            optional: m["optional"] == true,
            ty: &m["type"],
        })
    })
}

/// The members of an object (inline or named) as they apply to `given`: a
/// union's branch members join when the discriminator's value is given.
/// Also returns the discriminator's name when its value is not given.
fn applicable<'a>(def: &'a Value, given: Option<&Node>) -> (Vec<Member<'a>>, Option<(&'a str, &'a Value)>) {
    let def = match def {
        Value::String(n) => match shape().get(n.as_str()) {
            Some(d) => d,
            None => return (Vec::new(), None),
        },
        d => d,
    };
    let mut members: Vec<Member<'a>> = members_of(def).collect();
    let Some(tag) = def["tag"].as_str() else {
        return (members, None);
    };
    let value = given.and_then(|g| g.child(tag)).and_then(|n| match n {
        Node::Leaf { raw, verbatim } => Some(if *verbatim {
            loose(raw).as_str().unwrap_or_default().to_owned()
        } else {
            raw.trim_matches('"').to_owned()
        }),
        Node::Tree(_) => None,
    });
    let Some(value) = value else {
        return (members, Some((tag, def)));
    };
    let branch = def["variants"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["case"] == value.as_str());
    if let Some(branch) = branch {
        let (more, open) = applicable(&branch["type"], given);
        members.extend(more);
        return (members, open);
    }
    (members, None)
}

fn all_optional_object(ty: &Value) -> bool {
    let Some(def) = ty.as_str().and_then(|n| shape().get(n)) else {
        return false;
    };
    def["kind"] == "object" && def["tag"].is_null() && members_of(def).all(|m| m.optional)
}

fn convert_object(node: &Node, def: &Value, path: &str, extra_args: bool) -> anyhow::Result<Value> {
    let kids = match node {
        Node::Tree(kids) => kids,
        Node::Leaf { raw, .. } => {
            return match serde_json::from_str::<Value>(raw) {
                Ok(v @ Value::Object(_)) => Ok(v),
                _ => Err(usage(format!(
                    "{path} is an object: give {path}.KEY=... or {path}:={{...}}"
                ))),
            };
        }
    };
    let (members, _) = applicable(def, Some(node));
    let mut out = Map::new();
    for (key, child) in kids {
        let at = join(path, key);
        match members.iter().find(|m| m.name == key) {
            Some(m) => {
                out.insert(key.clone(), convert(child, m.ty, &at)?);
            }
            None if extra_args => {
                out.insert(key.clone(), untyped(child)?);
            }
            None => {
                let names: Vec<&str> = members.iter().map(|m| m.name).collect();
                let close = crate::subcommands::exec::suggest(key, names.iter().copied());
                let hint = if close.is_empty() {
                    format!("; it takes: {}", names.join(", "))
                } else {
                    format!("; did you mean {}?", close.join(" or "))
                };
                return Err(usage(format!("unknown argument {at:?}{hint}")));
            }
        }
    }
    // A required member whose members are all optional (a union branch's
    // `data` wrapper, say) may be left out: it is sent empty.
    for m in &members {
        if !m.optional && !out.contains_key(m.name) && all_optional_object(m.ty) {
            out.insert(m.name.to_owned(), Value::Object(Map::new()));
        }
    }
    Ok(Value::Object(out))
}

/// Resolves the type at a dotted key path below a command's arguments.
fn type_at<'a>(command: &str, given: &Node, path: &[&str]) -> Option<&'a Value> {
    let def = shape().get(command)?;
    let mut ty: &Value = &def["args"];
    let mut node = Some(given);
    for part in path {
        ty = object_branch(ty);
        if let Value::Array(elem) = ty {
            part.parse::<usize>().ok()?;
            ty = elem.first()?;
        } else {
            let (members, _) = applicable(ty, node);
            ty = members.into_iter().find(|m| m.name == *part)?.ty;
        }
        node = node.and_then(|n| n.child(part));
    }
    Some(object_branch(ty))
}

/// An alternate's object branch (what nested keys go into), else the type itself.
fn object_branch(ty: &Value) -> &Value {
    if let Some(def) = ty.as_str().and_then(|n| shape().get(n)) {
        if def["kind"] == "alternate" {
            if let Some(b) = def["members"].as_array().into_iter().flatten().find(|b| {
                b.as_str()
                    .and_then(|n| shape().get(n))
                    .is_some_and(|d| d["kind"] == "object")
            }) {
                return b;
            }
        }
    }
    ty
}

fn is_object(ty: &Value) -> bool {
    match ty {
        Value::Object(_) => true,
        Value::String(n) => shape().get(n.as_str()).is_some_and(|d| d["kind"] == "object"),
        _ => false,
    }
}

/// Completions for the word `partial` after `command` and the words before it.
pub fn complete(command: &str, before: &[&str], partial: &str) -> Vec<String> {
    let given = build_tree(before.iter().copied(), true).unwrap_or(Node::Tree(Vec::new()));
    if let Some((key, value)) = partial.split_once('=') {
        let key = key.trim_end_matches(':');
        let path: Vec<&str> = key.split('.').collect();
        let Some(ty) = type_at(command, &given, &path) else {
            return Vec::new();
        };
        let values: Vec<String> = match ty.as_str().and_then(|n| shape().get(n)) {
            Some(def) if def["kind"] == "enum" => enum_values(def).into_iter().map(str::to_owned).collect(),
            Some(def) if def["kind"] == "alternate" => def["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| shape().get(b.as_str()?))
                .filter(|d| d["kind"] == "enum")
                .flat_map(|d| enum_values(d).into_iter().map(str::to_owned))
                .collect(),
            _ if ty == "bool" => vec!["true".into(), "false".into()],
            _ => Vec::new(),
        };
        return values
            .into_iter()
            .filter(|v| v.starts_with(value))
            .map(|v| format!("{key}={v} "))
            .collect();
    }
    let (prefix, word) = match partial.rsplit_once('.') {
        Some((p, w)) => (Some(p), w),
        None => (None, partial),
    };
    let path: Vec<&str> = prefix.map(|p| p.split('.').collect()).unwrap_or_default();
    let Some(ty) = type_at(command, &given, &path) else {
        return Vec::new();
    };
    let here = path.iter().try_fold(&given, |n, p| n.child(p));
    let (members, _) = applicable(ty, here);
    members
        .iter()
        .filter(|m| m.name.starts_with(word) && here.and_then(|n| n.child(m.name)).is_none())
        .map(|m| {
            let full = match prefix {
                Some(p) => format!("{p}.{}", m.name),
                None => m.name.to_owned(),
            };
            // Objects (and alternates with an object branch) are filled key by key.
            if is_object(object_branch(m.ty)) {
                format!("{full}.")
            } else {
                format!("{full}=")
            }
        })
        .collect()
}

/// True when this build knows the command.
pub fn knows_command(command: &str) -> bool {
    shape().get(command).is_some_and(|d| d["kind"] == "command")
}

/// `help NAME [key=value...]`: a command's (or a type's) members with their
/// types, optionality and enum values; a union's branch joins when its
/// discriminator is given.
pub fn describe(name: &str, given: &[&str]) -> anyhow::Result<String> {
    let Some(def) = shape().get(name) else {
        return Err(usage(format!(
            "no command or type named {name:?} in QEMU's schema"
        )));
    };
    let given = build_tree(given.iter().copied(), true).unwrap_or(Node::Tree(Vec::new()));
    let mut out = String::new();
    let ty: &Value = match def["kind"].as_str() {
        Some("command") => {
            let ret = match &def["returns"] {
                Value::Null => "nothing".to_owned(),
                r => type_text(r),
            };
            out.push_str(&format!("{name}: returns {ret}\n"));
            if def["args"].is_null() {
                out.push_str("  takes no arguments\n");
                return Ok(out);
            }
            if let Some(t) = def["args"].as_str() {
                out.push_str(&format!("arguments ({t}):\n"));
            } else {
                out.push_str("arguments:\n");
            }
            &def["args"]
        }
        Some("enum") => {
            out.push_str(&format!("{name}: one of\n  {}\n", enum_values(def).join(", ")));
            return Ok(out);
        }
        Some("alternate") => {
            let kinds: Vec<String> = def["members"]
                .as_array()
                .into_iter()
                .flatten()
                .map(type_text)
                .collect();
            out.push_str(&format!("{name}: any of {}\n", kinds.join(", ")));
            return Ok(out);
        }
        Some("event") => {
            out.push_str(&format!("event {name}\n"));
            if def["data"].is_null() {
                return Ok(out);
            }
            &def["data"]
        }
        _ => {
            out.push_str(&format!("{name}:\n"));
            def
        }
    };
    let (members, open) = applicable(ty, Some(&given));
    let width = members.iter().map(|m| m.name.len() + 1).max().unwrap_or(0);
    for m in &members {
        let opt = if m.optional { "?" } else { "" };
        let mut line = format!("  {:<width$}  {}", format!("{}{opt}", m.name), type_text(m.ty));
        if let Some(d) = m.ty.as_str().and_then(|n| shape().get(n)) {
            if d["kind"] == "enum" {
                let values = enum_values(d);
                if values.len() <= 16 {
                    line.push_str(&format!("  one of: {}", values.join(", ")));
                } else {
                    line.push_str(&format!(
                        "  ({} values: `help {}`)",
                        values.len(),
                        type_text(m.ty)
                    ));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if let Some((tag, _)) = open {
        out.push_str(&format!(
            "  ({tag} selects more arguments: `help {name} {tag}=VALUE`)\n"
        ));
    }
    out.push_str("  (? = optional; `help TYPE` describes a type)\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(cmd: &str, pairs: &[&str]) -> anyhow::Result<Value> {
        command_arguments(cmd, pairs.iter().copied())
    }

    #[test]
    fn strings_integers_booleans_enums_follow_the_schema() {
        assert_eq!(
            args("object-add", &["qom-type=secret", "id=s1", "data=1234"]).unwrap(),
            json!({"qom-type": "secret", "id": "s1", "data": "1234"})
        );
        assert_eq!(
            args("chardev-add", &["id=7", "backend.type=null"]).unwrap(),
            json!({"id": "7", "backend": {"type": "null", "data": {}}})
        );
        assert_eq!(
            args("block_resize", &["node-name=d0", "size=1024"]).unwrap(),
            json!({"node-name": "d0", "size": 1024})
        );
        assert_eq!(
            args(
                "blockdev-add",
                &[
                    "driver=qcow2",
                    "node-name=1",
                    "read-only=on",
                    "file.driver=file",
                    "file.filename=/x"
                ]
            )
            .unwrap(),
            json!({"driver": "qcow2", "node-name": "1", "read-only": true, "file": {"driver": "file", "filename": "/x"}})
        );
        // A plain string for an alternate of object and string (a node name).
        assert_eq!(
            args("blockdev-add", &["driver=qcow2", "node-name=a", "file=f0"]).unwrap()["file"],
            json!("f0")
        );
        let e = args("blockdev-add", &["driver=qcow3"]).unwrap_err().to_string();
        assert!(e.contains("did you mean qcow2"), "{e}");
        let e = args("block_resize", &["size=big"]).unwrap_err().to_string();
        assert!(e.contains("size must be an integer (int)"), "{e}");
        let e = args("blockdev-add", &["driver=qcow2", "lazy-refcount=on"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean lazy-refcounts"), "{e}");
    }

    #[test]
    fn lists_verbatim_json_and_unknown_commands() {
        let v = args("transaction", &["actions.0.type=abort", "actions.1.type=abort"]).unwrap();
        assert_eq!(
            v,
            json!({"actions": [{"type": "abort", "data": {}}, {"type": "abort", "data": {}}]})
        );
        let v = args("object-add", &["qom-type=secret", "id=s", r#"data:="x""#]).unwrap();
        assert_eq!(v["data"], "x");
        let v = args("no-such-command-in-10", &["a=1", "b.c=x"]).unwrap();
        assert_eq!(v, json!({"a": 1, "b": {"c": "x"}}));
        let v = args("device_add", &["driver=usb-tablet", "id=7", "port=1"]).unwrap();
        assert_eq!(v, json!({"driver": "usb-tablet", "id": "7", "port": 1}));
        assert!(args("transaction", &["actions.1.type=abort"]).is_err());
    }

    #[test]
    fn completion_and_help_use_real_type_names() {
        assert_eq!(
            complete("blockdev-add", &[], "driver=qco"),
            ["driver=qcow ", "driver=qcow2 "]
        );
        assert!(complete("blockdev-add", &["driver=qcow2"], "lazy").contains(&"lazy-refcounts=".to_owned()));
        assert!(complete("blockdev-add", &["driver=qcow2"], "file.dr").contains(&"file.driver=".to_owned()));
        let h = describe("blockdev-add", &[]).unwrap();
        assert!(h.contains("driver") && h.contains("BlockdevDriver"), "{h}");
        assert!(!h.contains("(320)"), "{h}");
        let h = describe("blockdev-add", &["driver=qcow2"]).unwrap();
        assert!(h.contains("lazy-refcounts?") && h.contains("bool"), "{h}");
    }

    #[test]
    fn transaction_actions_take_their_branch_types() {
        let words: Vec<String> = [
            "blockdev-snapshot-sync",
            "device=d0",
            "snapshot-file=/x",
            "format=qcow2",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            transaction_action(&words).unwrap(),
            json!({"type": "blockdev-snapshot-sync", "data": {"device": "d0", "snapshot-file": "/x", "format": "qcow2"}})
        );
    }
}
