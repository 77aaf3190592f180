//! The generated QAPI types (`qmpkit::qapi`) against a live QEMU 10: its
//! `query-qmp-schema` checked against what was generated, and typed commands,
//! transactions and events run on a real VM.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};

use common::{vm, within};
use qmpkit::qapi::{commands, meta};
use serde_json::Value;

/// The live schema, by entity name.
struct Live {
    entities: BTreeMap<String, Value>,
}

impl Live {
    fn get(&self, name: &str) -> &Value {
        self.entities
            .get(name)
            .unwrap_or_else(|| panic!("live schema has no entity {name:?}"))
    }

    fn meta_type(&self, name: &str) -> &str {
        self.get(name)["meta-type"].as_str().unwrap()
    }

    /// The members of an object type: name → (optional, type).
    fn members(&self, name: &str) -> BTreeMap<String, (bool, String)> {
        self.get(name)["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap().to_owned(),
                    (m.get("default").is_some(), m["type"].as_str().unwrap().to_owned()),
                )
            })
            .collect()
    }

    /// The JSON type a live type's values have.
    fn json_kind(&self, name: &str) -> String {
        let e = self.get(name);
        match e["meta-type"].as_str().unwrap() {
            "builtin" => e["json-type"].as_str().unwrap().to_owned(),
            "enum" => "string".into(),
            "object" => "object".into(),
            "array" => "array".into(),
            "alternate" => "alternate".into(),
            other => other.to_owned(),
        }
    }
}

/// Compares the generated shape with the live schema, collecting mismatches.
struct Check<'a> {
    live: &'a Live,
    shape: &'a BTreeMap<String, Value>,
    seen: HashSet<(String, String)>,
    visited_types: BTreeSet<String>,
    problems: Vec<String>,
}

/// The JSON type of a built-in QAPI type's values.
fn builtin_json(name: &str) -> Option<&'static str> {
    Some(match name {
        "str" => "string",
        "number" => "number",
        "int" | "int8" | "int16" | "int32" | "int64" | "uint8" | "uint16" | "uint32" | "uint64" | "size" => {
            "int"
        }
        "bool" => "boolean",
        "null" => "null",
        "any" => "value",
        _ => return None,
    })
}

impl Check<'_> {
    fn problem(&mut self, at: &str, what: String) {
        self.problems.push(format!("{at}: {what}"));
    }

    fn gen_kind(&self, ty: &Value) -> String {
        match ty {
            Value::Array(_) => "array".into(),
            Value::String(n) => match builtin_json(n) {
                Some(j) => j.into(),
                None => match self.shape[n.as_str()]["kind"].as_str().unwrap() {
                    "enum" => "string".into(),
                    k => k.into(),
                },
            },
            _ => unreachable!(),
        }
    }

    /// A generated type reference against a live type name.
    fn ty(&mut self, at: &str, gen: &Value, live: &str) {
        if let Value::Array(elem) = gen {
            if self.live.meta_type(live) != "array" {
                return self.problem(
                    at,
                    format!("generated an array, live is {}", self.live.meta_type(live)),
                );
            }
            let le = self.live.get(live)["element-type"].as_str().unwrap().to_owned();
            return self.ty(&format!("{at}[]"), &elem[0], &le);
        }
        let name = gen.as_str().unwrap();
        if let Some(json) = builtin_json(name) {
            let lk = self.live.json_kind(live);
            if lk != json {
                self.problem(at, format!("generated {name} ({json}), live is {lk}"));
            }
            return;
        }
        if !self.seen.insert((name.to_owned(), live.to_owned())) {
            return;
        }
        self.visited_types.insert(name.to_owned());
        let Some(def) = self.shape.get(name).cloned() else {
            return self.problem(at, format!("type {name} is not in the generated shape"));
        };
        let lmeta = self.live.meta_type(live).to_owned();
        match def["kind"].as_str().unwrap() {
            "enum" => {
                if lmeta != "enum" {
                    return self.problem(at, format!("generated enum {name}, live is {lmeta}"));
                }
                let gen: BTreeSet<&str> = def["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                let lv = self.live.get(live)["values"].clone();
                let live_values: BTreeSet<&str> = lv
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                for v in gen.difference(&live_values) {
                    self.problem(at, format!("enum {name}: value {v:?} is generated but not live"));
                }
                for v in live_values.difference(&gen) {
                    self.problem(at, format!("enum {name}: live value {v:?} is not generated"));
                }
            }
            "object" => {
                if lmeta != "object" {
                    return self.problem(at, format!("generated object {name}, live is {lmeta}"));
                }
                self.object(&format!("{at} ({name})"), &def, live);
            }
            "alternate" => {
                if lmeta != "alternate" {
                    return self.problem(at, format!("generated alternate {name}, live is {lmeta}"));
                }
                let live_branches: Vec<String> = self.live.get(live)["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["type"].as_str().unwrap().to_owned())
                    .collect();
                let gen_branches = def["members"].as_array().unwrap().clone();
                if live_branches.len() != gen_branches.len() {
                    self.problem(
                        at,
                        format!(
                            "alternate {name}: {} branches generated, {} live",
                            gen_branches.len(),
                            live_branches.len()
                        ),
                    );
                }
                for g in &gen_branches {
                    let gk = self.gen_kind(g);
                    let matching = live_branches.iter().find(|l| {
                        let lk = self.live.json_kind(l);
                        lk == gk || (gk == "int" && lk == "number")
                    });
                    match matching {
                        Some(l) => {
                            let l = l.clone();
                            self.ty(&format!("{at} ({name} as {gk})"), g, &l)
                        }
                        None => {
                            self.problem(at, format!("alternate {name}: no live branch of JSON type {gk}"))
                        }
                    }
                }
            }
            k => self.problem(at, format!("{name} is a {k}, not a type")),
        }
    }

    /// A generated object (`members`, maybe `tag` and `variants`) against a live object type.
    fn object(&mut self, at: &str, def: &Value, live: &str) {
        let live_members = self.live.members(live);
        let gen_members = def["members"].as_array().unwrap().clone();
        let mut gen_names = BTreeSet::new();
        for m in &gen_members {
            let name = m["name"].as_str().unwrap();
            gen_names.insert(name.to_owned());
            let optional = m["optional"].as_bool().unwrap();
            match live_members.get(name) {
                None => self.problem(at, format!("member {name:?} is generated but not live")),
                Some((lopt, lty)) => {
                    if *lopt != optional {
                        self.problem(
                            at,
                            format!("member {name:?}: generated optional={optional}, live optional={lopt}"),
                        );
                    }
                    let lty = lty.clone();
                    self.ty(&format!("{at}.{name}"), &m["type"], &lty);
                }
            }
        }
        for name in live_members.keys() {
            if !gen_names.contains(name) {
                self.problem(at, format!("live member {name:?} is not generated"));
            }
        }
        let le = self.live.get(live).clone();
        match (def.get("tag"), le.get("tag")) {
            (None, None) => {}
            (Some(g), Some(l)) if g == l => {
                let gen_variants: BTreeMap<String, Value> = def["variants"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| (v["case"].as_str().unwrap().to_owned(), v["type"].clone()))
                    .collect();
                let live_variants: BTreeMap<String, String> = le["variants"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| {
                        (
                            v["case"].as_str().unwrap().to_owned(),
                            v["type"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect();
                for (case, gty) in &gen_variants {
                    match live_variants.get(case) {
                        None => self.problem(at, format!("branch {case:?} is generated but not live")),
                        Some(lty) => {
                            let gname = gty.as_str().unwrap();
                            let gdef = self.shape[gname].clone();
                            self.visited_types.insert(gname.to_owned());
                            self.object(&format!("{at}[{case}] ({gname})"), &gdef, lty);
                        }
                    }
                }
                for (case, lty) in &live_variants {
                    // A discriminator value without a branch type is a branch
                    // without members, both here and live.
                    if !gen_variants.contains_key(case) && !self.live.members(lty).is_empty() {
                        self.problem(at, format!("live branch {case:?} has members, none generated"));
                    }
                }
            }
            (g, l) => self.problem(at, format!("tag: generated {g:?}, live {l:?}")),
        }
    }

    /// A command's or event's generated data (`null`, a type name, or inline
    /// members) against a live object type (or none).
    fn data(&mut self, at: &str, gen: &Value, live: Option<&str>) {
        match (gen, live) {
            (Value::Null, None) => {}
            (Value::Null, Some(l)) => {
                if !self.live.members(l).is_empty() {
                    self.problem(at, "generated without data, live has members".into());
                }
            }
            (_, None) => self.problem(at, "generated with data, live has none".into()),
            (Value::String(_), Some(l)) => self.ty(at, gen, l),
            (Value::Object(_), Some(l)) => self.object(at, gen, l),
            _ => unreachable!(),
        }
    }
}

/// Every mismatch between the generated code (its shape) and the live schema.
fn compare(live_schema: &Value) -> (Vec<String>, usize, usize) {
    let live = Live {
        entities: live_schema
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
            .collect(),
    };
    let shape: BTreeMap<String, Value> = serde_json::from_str(meta::SHAPE).unwrap();
    let mut c = Check {
        live: &live,
        shape: &shape,
        seen: HashSet::new(),
        visited_types: BTreeSet::new(),
        problems: Vec::new(),
    };
    let live_of = |kind: &str| -> BTreeMap<String, Value> {
        live.entities
            .iter()
            .filter(|(_, e)| e["meta-type"] == kind)
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect()
    };
    let (live_commands, live_events) = (live_of("command"), live_of("event"));
    let features = |v: &Value| -> BTreeSet<String> {
        v.get("features")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|f| f.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    for item in meta::COMMANDS {
        let at = format!("command {}", item.name);
        let Some(l) = live_commands.get(item.name) else {
            c.problem(&at, "generated but not live".into());
            continue;
        };
        let def = shape[item.name].clone();
        c.data(&format!("{at} arguments"), &def["args"], l["arg-type"].as_str());
        let lret = l["ret-type"].as_str().unwrap();
        if def["returns"].is_null() {
            if live.meta_type(lret) != "object" || !live.members(lret).is_empty() {
                c.problem(&at, "generated returning {}, live returns something else".into());
            }
        } else {
            c.ty(&format!("{at} returns"), &def["returns"], lret);
        }
        let gf: BTreeSet<String> = item.features.iter().map(|s| s.to_string()).collect();
        if gf != features(l) {
            c.problem(&at, format!("features: generated {gf:?}, live {:?}", features(l)));
        }
    }
    for item in meta::EVENTS {
        let at = format!("event {}", item.name);
        let Some(l) = live_events.get(item.name) else {
            c.problem(&at, "generated but not live".into());
            continue;
        };
        let def = shape[item.name].clone();
        c.data(&format!("{at} data"), &def["data"], l["arg-type"].as_str());
        let gf: BTreeSet<String> = item.features.iter().map(|s| s.to_string()).collect();
        if gf != features(l) {
            c.problem(&at, format!("features: generated {gf:?}, live {:?}", features(l)));
        }
    }
    for name in live_commands.keys() {
        if meta::command(name).is_none() {
            c.problem(&format!("command {name}"), "live but not generated".into());
        }
    }
    for name in live_events.keys() {
        if meta::event(name).is_none() {
            c.problem(&format!("event {name}"), "live but not generated".into());
        }
    }
    let unreachable = meta::TYPES
        .iter()
        .filter(|t| !c.visited_types.contains(t.name))
        .count();
    (c.problems, c.visited_types.len(), unreachable)
}

/// Where `got` differs from `want`, by JSON path. Numbers compare by value
/// (a `number` member QEMU sent as `1` comes back as `1.0`).
fn differences(at: &str, got: &Value, want: &Value) -> Vec<String> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_code_matches_the_live_schema() {
    let vm = vm().await;
    let schema = within(30, vm.client().execute_raw("query-qmp-schema", Value::Null))
        .await
        .unwrap();
    let (problems, checked, unreachable) = compare(&schema);
    eprintln!(
        "{} commands, {} events and {checked} types checked against the live schema; \
         {unreachable} generated types are used by no command or event, so QEMU does not show them",
        meta::COMMANDS.len(),
        meta::EVENTS.len()
    );
    assert!(
        problems.is_empty(),
        "{} mismatches between the generated code and QEMU's live schema:\n{}",
        problems.len(),
        problems.join("\n")
    );

    // The check itself finds what it looks for: the same schema, altered.
    let mut altered = schema.clone();
    let entities = altered.as_array_mut().unwrap();
    let find = |entities: &[Value], name: &str| entities.iter().position(|e| e["name"] == name).unwrap();
    entities.remove(find(entities, "query-status"));
    let stop = find(entities, "STOP");
    entities[stop]["name"] = "NEW_EVENT".into();
    // blockdev-del's one argument, node-name: made optional, then renamed.
    let del = find(entities, "blockdev-del");
    let args = entities[del]["arg-type"].as_str().unwrap().to_owned();
    let args = find(entities, &args);
    entities[args]["members"][0]["default"] = Value::Null;
    entities[args]["members"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "extra", "type": "int"}));
    let problems = compare(&altered).0.join("\n");
    for expected in [
        "command query-status: generated but not live",
        "event STOP: generated but not live",
        "event NEW_EVENT: live but not generated",
        "command blockdev-del arguments: member \"node-name\": generated optional=false, live optional=true",
        "command blockdev-del arguments: live member \"extra\" is not generated",
    ] {
        assert!(
            problems.contains(expected),
            "{expected:?} not found in:\n{problems}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_schema_decodes_into_its_typed_form() {
    let vm = vm().await;
    let c = vm.client();
    let typed = within(30, c.execute(&commands::QueryQmpSchema)).await.unwrap();
    let raw = within(30, c.execute_raw("query-qmp-schema", Value::Null))
        .await
        .unwrap();
    let diffs = differences("", &serde_json::to_value(&typed).unwrap(), &raw);
    assert!(
        diffs.is_empty(),
        "typed query-qmp-schema lost or changed:\n{}",
        diffs.join("\n")
    );
}
