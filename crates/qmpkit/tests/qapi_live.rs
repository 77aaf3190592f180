//! The generated QAPI types (`qmpkit::qapi`) against a live QEMU 10: its
//! `query-qmp-schema` checked against what was generated, and typed commands,
//! transactions and events run on a real VM.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::time::Duration;

use common::event_audit::differences;
use common::{qemu_img_create, vm, vm_with, within};
use qmpkit::qapi::events::Event as Typed;
use qmpkit::qapi::types::{self as t, BlockdevOptionsBranch as Driver};
use qmpkit::qapi::{commands as c, meta};
use qmpkit::{Client, Command, EventStream};
use serde_json::Value;

const MIB: u64 = 1 << 20;

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
    let typed = within(30, c.execute(&c::QueryQmpSchema)).await.unwrap();
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

// ------------------------------------------------------------ typed commands

/// Runs a generated command; a failure names it.
async fn run<C: Command>(client: &Client, cmd: &C) -> C::Returns {
    match within(60, client.execute(cmd)).await {
        Ok(r) => r,
        Err(e) => panic!("{}: {e}", C::NAME),
    }
}

/// Runs a generated command that must fail; returns QEMU's error text.
async fn fails<C: Command>(client: &Client, cmd: &C) -> String {
    match within(60, client.execute(cmd)).await {
        Ok(_) => panic!("{} succeeded", C::NAME),
        Err(e) => e.to_string(),
    }
}

/// Waits for the next event named `name`, typed.
async fn next_event(events: &mut EventStream, name: &str) -> Typed {
    let ev = within(60, events.wait_for(name)).await.unwrap();
    Typed::decode(ev.name(), ev.data()).unwrap()
}

/// Every event that arrived on `events`: it must decode into its typed
/// variant (not `Other`), and its typed form must give back QEMU's data
/// unchanged. Returns the names seen.
fn check_events(events: &mut EventStream, collected: &mut Vec<qmpkit::Event>) -> BTreeSet<String> {
    while let Some(ev) = events.try_next() {
        collected.push(ev);
    }
    let mut names = BTreeSet::new();
    for ev in collected.iter() {
        let typed = Typed::decode(ev.name(), ev.data())
            .unwrap_or_else(|e| panic!("{} does not decode: {e}\n{}", ev.name(), ev.data()));
        assert!(
            !matches!(typed, Typed::Other { .. }),
            "{} is not typed",
            ev.name()
        );
        assert_eq!(typed.name(), ev.name());
        let back = typed.data().unwrap();
        let diffs = differences("data", &back, ev.data());
        assert!(
            diffs.is_empty(),
            "{} changed on the round trip:\n{}",
            ev.name(),
            diffs.join("\n")
        );
        names.insert(ev.name().to_owned());
    }
    names
}

/// An event stream that also keeps what `wait_for` skipped, for `check_events`.
struct Recorder {
    all: EventStream,
    seen: Vec<qmpkit::Event>,
}

impl Recorder {
    fn new(client: &Client) -> Self {
        Recorder {
            all: client.events(),
            seen: Vec::new(),
        }
    }

    fn finish(mut self, expected: &[&str]) {
        let names = check_events(&mut self.all, &mut self.seen);
        for e in expected {
            assert!(names.contains(*e), "no {e} event; saw {names:?}");
        }
        eprintln!("events decoded and round-tripped: {names:?}");
    }
}

fn file_node(path: &Path) -> t::BlockdevRef {
    t::BlockdevRef::Definition(Box::new(
        Driver::File(t::BlockdevOptionsFile {
            filename: path.to_str().unwrap().into(),
            pr_manager: None,
            locking: None,
            aio: None,
            aio_max_batch: None,
            drop_cache: None,
            x_check_cache_dropped: None,
        })
        .into(),
    ))
}

fn qcow2_node(name: &str, path: &Path, backing: Option<t::BlockdevRefOrNull>) -> c::BlockdevAdd {
    c::BlockdevAdd(t::BlockdevOptions {
        node_name: Some(name.into()),
        ..Driver::Qcow2(t::BlockdevOptionsQcow2 {
            file: file_node(path),
            backing,
            lazy_refcounts: None,
            pass_discard_request: None,
            pass_discard_snapshot: None,
            pass_discard_other: None,
            discard_no_unref: None,
            overlap_check: None,
            cache_size: None,
            l2_cache_size: None,
            l2_cache_entry_size: None,
            refcount_cache_size: None,
            cache_clean_interval: None,
            encrypt: None,
            data_file: None,
        })
        .into()
    })
}

fn image(dir: &Path, name: &str, size: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    qemu_img_create(&p, "qcow2", size, None);
    p
}

async fn nodes(client: &Client) -> Vec<t::BlockDeviceInfo> {
    run(client, &c::QueryNamedBlockNodes { flat: Some(true) }).await
}

async fn node(client: &Client, name: &str) -> Option<t::BlockDeviceInfo> {
    nodes(client)
        .await
        .into_iter()
        .find(|n| n.node_name.as_deref() == Some(name))
}

fn device_add(driver: &str, id: &str, bus: Option<&str>, props: Value) -> c::DeviceAdd {
    c::DeviceAdd {
        driver: driver.into(),
        bus: bus.map(Into::into),
        id: Some(id.into()),
        extra: match props {
            Value::Object(m) => m,
            _ => Default::default(),
        },
    }
}

async fn peripherals(client: &Client) -> Vec<String> {
    run(
        client,
        &c::QomList {
            path: "/machine/peripheral".into(),
        },
    )
    .await
    .into_iter()
    .map(|p| p.name)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_cpu_memory_qom_and_device_commands() {
    let mut vm = vm_with(|b| b.scratch_devices()).await;
    let q = vm.client().clone();
    let rec = Recorder::new(&q);
    let mut events = q.events();

    // Machine and run state.
    assert_eq!(run(&q, &c::QueryStatus).await.status, t::RunState::Prelaunch);
    run(&q, &c::Cont).await;
    next_event(&mut events, "RESUME").await;
    assert_eq!(run(&q, &c::QueryStatus).await.status, t::RunState::Running);
    run(&q, &c::Stop).await;
    next_event(&mut events, "STOP").await;
    let st = run(&q, &c::QueryStatus).await;
    assert!(!st.running && st.status == t::RunState::Paused, "{st:?}");
    run(&q, &c::SystemReset).await;
    match next_event(&mut events, "RESET").await {
        Typed::Reset(r) => assert_eq!(r.reason, t::ShutdownCause::HostQmpSystemReset),
        other => panic!("{other:?}"),
    }
    let machines = run(&q, &c::QueryMachines { compat_props: None }).await;
    assert!(
        machines.iter().any(|m| m.alias.as_deref() == Some("q35")),
        "no q35 alias"
    );
    run(&q, &c::QueryCurrentMachine).await;
    let kvm = run(&q, &c::QueryKvm).await;
    assert!(kvm.present || !kvm.enabled);
    assert_eq!(run(&q, &c::QueryVersion).await.qemu.major, 10);
    assert_eq!(run(&q, &c::QueryName).await.name, None);
    assert_eq!(run(&q, &c::QueryUuid).await.uuid.len(), 36);
    assert_eq!(run(&q, &c::QueryTarget).await.arch, t::SysEmuTarget::X8664);

    // CPUs.
    let cpus = run(&q, &c::QueryCpusFast).await;
    assert_eq!(cpus.len(), 1);
    assert_eq!(cpus[0].branch, t::CpuInfoFastBranch::X8664);
    let slots = run(&q, &c::QueryHotpluggableCpus).await;
    assert_eq!(slots.len(), 2, "maxcpus=2: {slots:?}");
    assert_eq!(slots.iter().filter(|s| s.qom_path.is_none()).count(), 1);
    let defs = run(&q, &c::QueryCpuDefinitions).await;
    assert!(defs.iter().any(|d| d.name == "qemu64"));
    let expanded = run(
        &q,
        &c::QueryCpuModelExpansion {
            r#type: t::CpuModelExpansionType::Full,
            model: t::CpuModelInfo {
                name: "qemu64".into(),
                props: None,
            },
        },
    )
    .await;
    assert!(
        expanded
            .model
            .props
            .as_ref()
            .is_some_and(|p| p.get("sse2").is_some()),
        "{expanded:?}"
    );

    // Memory: a RAM backend and a DIMM on it.
    let before = run(&q, &c::QueryMemorySizeSummary).await;
    assert_eq!(before.base_memory, 128 * MIB);
    run(
        &q,
        &c::ObjectAdd(t::ObjectOptions {
            id: "mem1".into(),
            branch: t::ObjectOptionsBranch::MemoryBackendRam(t::MemoryBackendProperties {
                dump: None,
                host_nodes: None,
                merge: None,
                policy: None,
                prealloc: None,
                prealloc_threads: None,
                prealloc_context: None,
                share: None,
                reserve: None,
                size: 128 * MIB,
                x_use_canonical_path_for_ramblock_id: None,
            }),
        }),
    )
    .await;
    let memdevs = run(&q, &c::QueryMemdev).await;
    assert!(memdevs
        .iter()
        .any(|m| m.id.as_deref() == Some("mem1") && m.size == 128 * MIB));
    run(
        &q,
        &device_add("pc-dimm", "dimm1", None, serde_json::json!({"memdev": "mem1"})),
    )
    .await;
    let devs = run(&q, &c::QueryMemoryDevices).await;
    match devs.as_slice() {
        [t::MemoryDeviceInfo::Dimm(d)] => {
            assert_eq!(d.data.id.as_deref(), Some("dimm1"));
            assert_eq!(d.data.size as u64, 128 * MIB);
            assert_eq!(d.data.memdev, "/objects/mem1");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        run(&q, &c::QueryMemorySizeSummary).await.plugged_memory,
        Some(128 * MIB)
    );
    let balloon = run(&q, &c::QueryBalloon).await;
    // The balloon sees all of the guest's RAM: the base and the DIMM.
    assert_eq!(balloon.actual as u64, 256 * MIB);

    // QOM.
    assert!(peripherals(&q).await.contains(&"dimm1".to_owned()));
    let size = run(
        &q,
        &c::QomGet {
            path: "/machine/peripheral/dimm1".into(),
            property: "size".into(),
        },
    )
    .await;
    assert_eq!(size, serde_json::json!(128 * MIB));
    let poll = |value: Value| c::QomSet {
        path: "/machine/peripheral/balloon0".into(),
        property: "guest-stats-polling-interval".into(),
        value,
    };
    run(&q, &poll(serde_json::json!(2))).await;
    let got = run(
        &q,
        &c::QomGet {
            path: "/machine/peripheral/balloon0".into(),
            property: "guest-stats-polling-interval".into(),
        },
    )
    .await;
    assert_eq!(got, serde_json::json!(2));
    let dimms = run(
        &q,
        &c::QomListTypes {
            implements: Some("pc-dimm".into()),
            r#abstract: Some(false),
        },
    )
    .await;
    assert!(dimms.iter().any(|t| t.name == "nvdimm"), "{dimms:?}");
    let props = run(
        &q,
        &c::QomListProperties {
            typename: "memory-backend-ram".into(),
        },
    )
    .await;
    assert!(props.iter().any(|p| p.name == "size"));
    let props = run(
        &q,
        &c::DeviceListProperties {
            typename: "usb-kbd".into(),
        },
    )
    .await;
    assert!(props.iter().any(|p| p.name == "port"));

    // An I/O thread object, added and deleted.
    run(
        &q,
        &c::ObjectAdd(t::ObjectOptions {
            id: "io1".into(),
            branch: t::ObjectOptionsBranch::Iothread(t::IothreadProperties::default()),
        }),
    )
    .await;
    assert!(run(&q, &c::QueryIothreads).await.iter().any(|i| i.id == "io1"));
    run(&q, &c::ObjectDel { id: "io1".into() }).await;
    assert!(!run(&q, &c::QueryIothreads).await.iter().any(|i| i.id == "io1"));

    // A USB keyboard, plugged and unplugged (USB needs no guest to unplug).
    run(&q, &device_add("usb-kbd", "kbd1", Some("usb0.0"), Value::Null)).await;
    assert!(peripherals(&q).await.contains(&"kbd1".to_owned()));
    run(&q, &c::DeviceDel { id: "kbd1".into() }).await;
    match next_event(&mut events, "DEVICE_DELETED").await {
        Typed::DeviceDeleted(d) if d.device.as_deref() == Some("kbd1") => {}
        Typed::DeviceDeleted(d) => assert_eq!(d.device, None, "{d:?}"),
        other => panic!("{other:?}"),
    }
    common::eventually(10, || async {
        (!peripherals(&q).await.contains(&"kbd1".to_owned())).then_some(())
    })
    .await;

    // Miscellany.
    let info = run(
        &q,
        &c::HumanMonitorCommand {
            command_line: "info version".into(),
            cpu_index: None,
        },
    )
    .await;
    assert!(info.starts_with("10."), "{info}");
    let cmds = run(&q, &c::QueryCommands).await;
    assert!(cmds.iter().any(|c| c.name == "blockdev-add"));
    let shot = vm.dir().join("shot.png");
    run(
        &q,
        &c::Screendump {
            filename: shot.to_str().unwrap().into(),
            device: None,
            head: None,
            format: Some(t::ImageFormat::Png),
        },
    )
    .await;
    assert!(std::fs::read(&shot).unwrap().starts_with(b"\x89PNG"));
    let trace = run(
        &q,
        &c::TraceEventGetState {
            name: "qmp_job_*".into(),
        },
    )
    .await;
    assert!(!trace.is_empty() && trace.iter().all(|e| e.state == t::TraceEventState::Disabled));

    // Power button, then quit: QEMU says SHUTDOWN and goes.
    run(&q, &c::Cont).await;
    run(&q, &c::SystemPowerdown).await;
    next_event(&mut events, "POWERDOWN").await;
    let _ = within(20, q.execute(&c::Quit)).await;
    next_event(&mut events, "SHUTDOWN").await;
    assert!(vm.wait_exit(Duration::from_secs(20)).await.is_some());
    rec.finish(&[
        "RESUME",
        "STOP",
        "RESET",
        "DEVICE_DELETED",
        "POWERDOWN",
        "SHUTDOWN",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_bitmap_job_and_nbd_commands() {
    let vm = vm_with(|b| b.scratch_devices()).await;
    let q = vm.client().clone();
    let dir = vm.dir().to_owned();
    let rec = Recorder::new(&q);
    let mut events = q.events();

    // A qcow2 disk on a SCSI controller.
    let disk = image(&dir, "disk0.qcow2", "64M");
    run(&q, &qcow2_node("disk0", &disk, None)).await;
    let n = node(&q, "disk0").await.expect("disk0 is in the graph");
    assert_eq!((n.drv.as_str(), n.image.virtual_size as u64), ("qcow2", 64 * MIB));
    run(
        &q,
        &device_add(
            "scsi-hd",
            "sd0",
            Some("scsi0.0"),
            serde_json::json!({"drive": "disk0"}),
        ),
    )
    .await;
    let blocks = run(&q, &c::QueryBlock).await;
    let sd0 = blocks
        .iter()
        .find(|b| b.qdev.as_deref() == Some("sd0"))
        .expect("sd0 in query-block");
    assert_eq!(sd0.inserted.as_ref().unwrap().node_name.as_deref(), Some("disk0"));

    // Throttling, resizing, a write threshold, statistics.
    #[allow(deprecated)] // `device` is deprecated in favour of `id`
    let throttle = t::BlockIOThrottle {
        device: None,
        id: Some("sd0".into()),
        bps: 4_000_000,
        bps_rd: 0,
        bps_wr: 0,
        iops: 0,
        iops_rd: 0,
        iops_wr: 1000,
        bps_max: None,
        bps_rd_max: None,
        bps_wr_max: None,
        iops_max: None,
        iops_rd_max: None,
        iops_wr_max: None,
        bps_max_length: None,
        bps_rd_max_length: None,
        bps_wr_max_length: None,
        iops_max_length: None,
        iops_rd_max_length: None,
        iops_wr_max_length: None,
        iops_size: None,
        group: None,
    };
    run(&q, &c::BlockSetIoThrottle(throttle)).await;
    // Throttling is the device's (its block backend's): query-block shows it.
    let blocks = run(&q, &c::QueryBlock).await;
    let sd0 = blocks.iter().find(|b| b.qdev.as_deref() == Some("sd0")).unwrap();
    let inserted = sd0.inserted.as_ref().unwrap();
    assert_eq!((inserted.bps, inserted.iops_wr), (4_000_000, 1000));
    run(
        &q,
        &c::BlockResize {
            device: None,
            node_name: Some("disk0".into()),
            size: 128 * MIB as i64,
        },
    )
    .await;
    assert_eq!(
        node(&q, "disk0").await.unwrap().image.virtual_size as u64,
        128 * MIB
    );
    run(
        &q,
        &c::BlockSetWriteThreshold {
            node_name: "disk0".into(),
            write_threshold: 100 * MIB,
        },
    )
    .await;
    assert_eq!(node(&q, "disk0").await.unwrap().write_threshold as u64, 100 * MIB);
    let stats = run(
        &q,
        &c::QueryBlockstats {
            query_nodes: Some(true),
        },
    )
    .await;
    assert!(stats.iter().any(|s| s.node_name.as_deref() == Some("disk0")));

    // Dirty bitmaps.
    let bitmap = |name: &str| t::BlockDirtyBitmap {
        node: "disk0".into(),
        name: name.into(),
    };
    for (name, disabled) in [("bm0", false), ("bm1", true)] {
        run(
            &q,
            &c::BlockDirtyBitmapAdd(t::BlockDirtyBitmapAdd {
                node: "disk0".into(),
                name: name.into(),
                granularity: Some(65536),
                persistent: None,
                disabled: Some(disabled),
            }),
        )
        .await;
    }
    let recording = |n: &t::BlockDeviceInfo, name: &str| {
        n.dirty_bitmaps
            .iter()
            .flatten()
            .find(|b| b.name.as_deref() == Some(name))
            .map(|b| (b.recording, b.granularity))
    };
    let n = node(&q, "disk0").await.unwrap();
    assert_eq!(recording(&n, "bm0"), Some((true, 65536)));
    assert_eq!(recording(&n, "bm1"), Some((false, 65536)));
    run(&q, &c::BlockDirtyBitmapDisable(bitmap("bm0"))).await;
    assert_eq!(
        recording(&node(&q, "disk0").await.unwrap(), "bm0"),
        Some((false, 65536))
    );
    run(&q, &c::BlockDirtyBitmapEnable(bitmap("bm0"))).await;
    assert_eq!(
        recording(&node(&q, "disk0").await.unwrap(), "bm0"),
        Some((true, 65536))
    );
    run(&q, &c::BlockDirtyBitmapClear(bitmap("bm0"))).await;
    run(
        &q,
        &c::BlockDirtyBitmapMerge(t::BlockDirtyBitmapMerge {
            node: "disk0".into(),
            target: "bm1".into(),
            bitmaps: vec![t::BlockDirtyBitmapOrStr::Local("bm0".into())],
        }),
    )
    .await;
    let sha = run(&q, &c::XDebugBlockDirtyBitmapSha256(bitmap("bm1"))).await;
    assert_eq!(sha.sha256.len(), 64);
    run(&q, &c::BlockDirtyBitmapRemove(bitmap("bm1"))).await;
    assert_eq!(recording(&node(&q, "disk0").await.unwrap(), "bm1"), None);

    // A backup job, waited for by its events, then dismissed.
    let target = image(&dir, "backup.qcow2", "128M");
    run(&q, &qcow2_node("backup0", &target, None)).await;
    run(
        &q,
        &c::BlockdevBackup(t::BlockdevBackup {
            job_id: Some("bk".into()),
            device: "disk0".into(),
            sync: t::MirrorSyncMode::Full,
            speed: None,
            bitmap: None,
            bitmap_mode: None,
            compress: None,
            on_source_error: None,
            on_target_error: None,
            auto_finalize: None,
            auto_dismiss: Some(false),
            filter_node_name: None,
            discard_source: None,
            x_perf: None,
            target: "backup0".into(),
        }),
    )
    .await;
    loop {
        match next_event(&mut events, "JOB_STATUS_CHANGE").await {
            Typed::JobStatusChange(j) if j.id == "bk" && j.status == t::JobStatus::Concluded => break,
            Typed::JobStatusChange(_) => {}
            other => panic!("{other:?}"),
        }
    }
    let jobs = run(&q, &c::QueryJobs).await;
    let bk = jobs.iter().find(|j| j.id == "bk").expect("bk in query-jobs");
    assert_eq!(
        (bk.r#type, bk.status, bk.error.as_deref()),
        (t::JobType::Backup, t::JobStatus::Concluded, None)
    );
    run(&q, &c::JobDismiss { id: "bk".into() }).await;
    assert!(run(&q, &c::QueryJobs).await.iter().all(|j| j.id != "bk"));

    // A mirror job between two nodes of their own, completed once ready.
    let m0 = image(&dir, "m0.qcow2", "16M");
    let m1 = image(&dir, "m1.qcow2", "16M");
    run(&q, &qcow2_node("m0", &m0, None)).await;
    run(&q, &qcow2_node("m1", &m1, None)).await;
    run(
        &q,
        &c::BlockdevMirror {
            job_id: Some("mir".into()),
            device: "m0".into(),
            target: "m1".into(),
            replaces: None,
            sync: t::MirrorSyncMode::Full,
            speed: None,
            granularity: None,
            buf_size: None,
            on_source_error: None,
            on_target_error: None,
            filter_node_name: None,
            copy_mode: None,
            auto_finalize: None,
            auto_dismiss: None,
        },
    )
    .await;
    match next_event(&mut events, "BLOCK_JOB_READY").await {
        Typed::BlockJobReady(r) => assert_eq!((r.device.as_str(), r.r#type), ("mir", t::JobType::Mirror)),
        other => panic!("{other:?}"),
    }
    let bj = run(&q, &c::QueryBlockJobs).await;
    assert!(bj.iter().any(|j| j.device == "mir" && j.ready), "{bj:?}");
    run(&q, &c::BlockJobComplete { device: "mir".into() }).await;
    loop {
        match next_event(&mut events, "BLOCK_JOB_COMPLETED").await {
            Typed::BlockJobCompleted(done) if done.device == "mir" => break assert_eq!(done.error, None),
            Typed::BlockJobCompleted(_) => {}
            other => panic!("{other:?}"),
        }
    }

    // blockdev-create makes an image file, as a job.
    let created = dir.join("created.raw");
    std::fs::File::create(&created).unwrap();
    run(
        &q,
        &c::BlockdevCreate {
            job_id: "cr".into(),
            options: t::BlockdevCreateOptions::File(t::BlockdevCreateOptionsFile {
                filename: created.to_str().unwrap().into(),
                size: 8 * MIB,
                preallocation: None,
                nocow: None,
                extent_size_hint: None,
            }),
        },
    )
    .await;
    loop {
        match next_event(&mut events, "JOB_STATUS_CHANGE").await {
            Typed::JobStatusChange(j) if j.id == "cr" && j.status == t::JobStatus::Concluded => break,
            _ => {}
        }
    }
    run(&q, &c::JobDismiss { id: "cr".into() }).await;
    assert_eq!(std::fs::metadata(&created).unwrap().len(), 8 * MIB);

    // NBD: the disk exported over a Unix socket, read by qemu-img, removed.
    let sock = dir.join("nbd.sock");
    run(
        &q,
        &c::NbdServerStart(t::NbdServerOptionsLegacy {
            handshake_max_seconds: None,
            tls_creds: None,
            tls_authz: None,
            max_connections: None,
            addr: t::SocketAddressLegacy::Unix(t::UnixSocketAddressWrapper {
                data: t::UnixSocketAddress {
                    path: sock.to_str().unwrap().into(),
                    r#abstract: None,
                    tight: None,
                },
            }),
        }),
    )
    .await;
    run(
        &q,
        &c::BlockExportAdd(t::BlockExportOptions {
            id: "exp0".into(),
            fixed_iothread: None,
            iothread: None,
            node_name: "disk0".into(),
            writable: Some(false),
            writethrough: None,
            allow_inactive: None,
            branch: t::BlockExportOptionsBranch::Nbd(t::BlockExportOptionsNbd {
                name: Some("disk0".into()),
                description: None,
                bitmaps: None,
                allocation_depth: None,
            }),
        }),
    )
    .await;
    let exports = run(&q, &c::QueryBlockExports).await;
    assert!(exports
        .iter()
        .any(|e| e.id == "exp0" && e.r#type == t::BlockExportType::Nbd && e.node_name == "disk0"));
    let url = format!("nbd+unix:///disk0?socket={}", sock.display());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("qemu-img")
            .args(["info", "--output=json", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], serde_json::json!(128 * MIB));
    run(
        &q,
        &c::BlockExportDel {
            id: "exp0".into(),
            mode: None,
        },
    )
    .await;
    match next_event(&mut events, "BLOCK_EXPORT_DELETED").await {
        Typed::BlockExportDeleted(d) => assert_eq!(d.id, "exp0"),
        other => panic!("{other:?}"),
    }
    assert!(run(&q, &c::QueryBlockExports).await.is_empty());
    run(&q, &c::NbdServerStop).await;

    // A backup that waits to be finalised.
    run(
        &q,
        &c::BlockdevBackup(t::BlockdevBackup {
            job_id: Some("bk2".into()),
            device: "disk0".into(),
            sync: t::MirrorSyncMode::Full,
            speed: None,
            bitmap: None,
            bitmap_mode: None,
            compress: None,
            on_source_error: None,
            on_target_error: None,
            auto_finalize: Some(false),
            auto_dismiss: None,
            filter_node_name: None,
            discard_source: None,
            x_perf: None,
            target: "backup0".into(),
        }),
    )
    .await;
    match next_event(&mut events, "BLOCK_JOB_PENDING").await {
        Typed::BlockJobPending(p) => assert_eq!((p.id.as_str(), p.r#type), ("bk2", t::JobType::Backup)),
        other => panic!("{other:?}"),
    }
    let pending = run(&q, &c::QueryJobs).await;
    assert!(
        pending
            .iter()
            .any(|j| j.id == "bk2" && j.status == t::JobStatus::Pending),
        "{pending:?}"
    );
    run(&q, &c::JobFinalize { id: "bk2".into() }).await;
    // (Earlier jobs' events may still be queued: skip to this job's.)
    loop {
        match next_event(&mut events, "BLOCK_JOB_COMPLETED").await {
            Typed::BlockJobCompleted(done) if done.device == "bk2" => break,
            Typed::BlockJobCompleted(_) => {}
            other => panic!("{other:?}"),
        }
    }

    // A mirror abandoned once ready (cancel with force).
    let m2 = image(&dir, "m2.qcow2", "16M");
    run(&q, &qcow2_node("m2", &m2, None)).await;
    run(
        &q,
        &c::BlockdevMirror {
            job_id: Some("mir2".into()),
            device: "m1".into(),
            target: "m2".into(),
            replaces: None,
            sync: t::MirrorSyncMode::Full,
            speed: None,
            granularity: None,
            buf_size: None,
            on_source_error: None,
            on_target_error: None,
            filter_node_name: None,
            copy_mode: None,
            auto_finalize: None,
            auto_dismiss: None,
        },
    )
    .await;
    next_event(&mut events, "BLOCK_JOB_READY").await;
    run(
        &q,
        &c::BlockJobCancel {
            device: "mir2".into(),
            force: Some(true),
        },
    )
    .await;
    match next_event(&mut events, "BLOCK_JOB_CANCELLED").await {
        Typed::BlockJobCancelled(x) => {
            assert_eq!((x.device.as_str(), x.r#type), ("mir2", t::JobType::Mirror))
        }
        other => panic!("{other:?}"),
    }

    // A CD drive without a medium: its tray opens and closes on command.
    run(&q, &device_add("scsi-cd", "cd0", Some("scsi0.0"), Value::Null)).await;
    let tray = |blocks: Vec<t::BlockInfo>| {
        blocks
            .into_iter()
            .find(|b| b.qdev.as_deref() == Some("cd0"))
            .and_then(|b| b.tray_open)
    };
    assert_eq!(tray(run(&q, &c::QueryBlock).await), Some(false));
    let id = Some("cd0".to_owned());
    run(
        &q,
        &c::BlockdevOpenTray {
            id: id.clone(),
            ..Default::default()
        },
    )
    .await;
    match next_event(&mut events, "DEVICE_TRAY_MOVED").await {
        Typed::DeviceTrayMoved(m) => assert_eq!((m.id.as_str(), m.tray_open), ("cd0", true)),
        other => panic!("{other:?}"),
    }
    assert_eq!(tray(run(&q, &c::QueryBlock).await), Some(true));
    run(
        &q,
        &c::BlockdevCloseTray {
            id,
            ..Default::default()
        },
    )
    .await;
    match next_event(&mut events, "DEVICE_TRAY_MOVED").await {
        Typed::DeviceTrayMoved(m) => assert!(!m.tray_open),
        other => panic!("{other:?}"),
    }
    assert_eq!(tray(run(&q, &c::QueryBlock).await), Some(false));

    // Removing nodes.
    run(
        &q,
        &c::BlockdevDel {
            node_name: "backup0".into(),
        },
    )
    .await;
    assert!(node(&q, "backup0").await.is_none());
    let err = fails(
        &q,
        &c::BlockdevDel {
            node_name: "disk0".into(),
        },
    )
    .await;
    assert!(err.contains("in use"), "{err}");
    rec.finish(&[
        "JOB_STATUS_CHANGE",
        "BLOCK_JOB_COMPLETED",
        "BLOCK_JOB_READY",
        "BLOCK_JOB_PENDING",
        "BLOCK_JOB_CANCELLED",
        "BLOCK_EXPORT_DELETED",
        "DEVICE_TRAY_MOVED",
    ]);
}

/// The overlay node's backing node, from the debug block graph.
fn backing_of(graph: &t::XDbgBlockGraph, name: &str) -> Option<String> {
    let id = graph.nodes.iter().find(|n| n.name == name)?.id;
    let edge = graph
        .edges
        .iter()
        .find(|e| e.parent == id && e.name == "backing")?;
    graph
        .nodes
        .iter()
        .find(|n| n.id == edge.child)
        .map(|n| n.name.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_snapshots_two_disks_at_once() {
    let vm = vm_with(|b| b.scratch_devices()).await;
    let q = vm.client().clone();
    let dir = vm.dir().to_owned();
    let rec = Recorder::new(&q);
    // Two disks in use by SCSI devices (an overlay that blockdev-snapshot-sync
    // makes is kept by the node's users; a node nobody uses keeps none).
    for disk in ["a", "b"] {
        let path = image(&dir, &format!("{disk}.qcow2"), "32M");
        run(&q, &qcow2_node(disk, &path, None)).await;
        let drive = serde_json::json!({ "drive": disk });
        run(
            &q,
            &device_add("scsi-hd", &format!("sd-{disk}"), Some("scsi0.0"), drive),
        )
        .await;
    }

    // blockdev-snapshot-sync: QEMU creates both overlays, in one transaction.
    let sync = |node: &str| {
        t::TransactionAction::BlockdevSnapshotSync(t::BlockdevSnapshotSyncWrapper {
            data: t::BlockdevSnapshotSync {
                device: None,
                node_name: Some(node.into()),
                snapshot_file: dir.join(format!("{node}-snap.qcow2")).to_str().unwrap().into(),
                snapshot_node_name: Some(format!("{node}-snap")),
                format: Some("qcow2".into()),
                mode: Some(t::NewImageMode::AbsolutePaths),
            },
        })
    };
    run(
        &q,
        &c::Transaction {
            actions: vec![sync("a"), sync("b")],
            properties: Some(t::TransactionProperties {
                completion_mode: Some(t::ActionCompletionMode::Individual),
            }),
        },
    )
    .await;
    let graph = run(&q, &c::XDebugQueryBlockGraph).await;
    for disk in ["a", "b"] {
        assert_eq!(
            backing_of(&graph, &format!("{disk}-snap")).as_deref(),
            Some(disk),
            "{graph:?}"
        );
        let snap = node(&q, &format!("{disk}-snap")).await.expect("overlay node");
        let backing = dir.join(format!("{disk}.qcow2"));
        assert_eq!(snap.backing_file.as_deref(), backing.to_str());
    }

    // One action failing fails the whole transaction: neither overlay appears.
    let err = fails(
        &q,
        &c::Transaction {
            actions: vec![sync("a-snap"), sync("no-such-node")],
            properties: None,
        },
    )
    .await;
    assert!(err.contains("no-such-node"), "{err}");
    assert!(node(&q, "a-snap-snap").await.is_none());
    let blocks = run(&q, &c::QueryBlock).await;
    let sd_a = blocks.iter().find(|b| b.qdev.as_deref() == Some("sd-a")).unwrap();
    assert_eq!(
        sd_a.inserted.as_ref().unwrap().node_name.as_deref(),
        Some("a-snap")
    );

    // blockdev-snapshot: overlays the caller made, attached atomically.
    let mut actions = Vec::new();
    for disk in ["a-snap", "b-snap"] {
        let path = image(&dir, &format!("{disk}-2.qcow2"), "32M");
        run(
            &q,
            &qcow2_node(&format!("{disk}-2"), &path, Some(t::BlockdevRefOrNull::Null)),
        )
        .await;
        actions.push(t::TransactionAction::BlockdevSnapshot(
            t::BlockdevSnapshotWrapper {
                data: t::BlockdevSnapshot {
                    node: disk.into(),
                    overlay: format!("{disk}-2"),
                },
            },
        ));
    }
    run(
        &q,
        &c::Transaction {
            actions,
            properties: None,
        },
    )
    .await;
    let graph = run(&q, &c::XDebugQueryBlockGraph).await;
    assert_eq!(backing_of(&graph, "a-snap-2").as_deref(), Some("a-snap"));
    assert_eq!(backing_of(&graph, "b-snap-2").as_deref(), Some("b-snap"));
    // And the devices now write to the newest overlays.
    let blocks = run(&q, &c::QueryBlock).await;
    for (dev, top) in [("sd-a", "a-snap-2"), ("sd-b", "b-snap-2")] {
        let b = blocks.iter().find(|b| b.qdev.as_deref() == Some(dev)).unwrap();
        assert_eq!(b.inserted.as_ref().unwrap().node_name.as_deref(), Some(top));
    }
    rec.finish(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chardev_netdev_and_migration_commands() {
    let vm = vm().await;
    let q = vm.client().clone();
    let dir = vm.dir().to_owned();
    let rec = Recorder::new(&q);
    let mut events = q.events();

    // A ring-buffer chardev: written, read back, removed.
    let ret = run(
        &q,
        &c::ChardevAdd {
            id: "rb0".into(),
            backend: t::ChardevBackend::Ringbuf(t::ChardevRingbufWrapper {
                data: t::ChardevRingbuf {
                    logfile: None,
                    logappend: None,
                    size: Some(1024),
                },
            }),
        },
    )
    .await;
    assert_eq!(ret.pty, None);
    let chardevs = run(&q, &c::QueryChardev).await;
    assert!(chardevs.iter().any(|c| c.label == "rb0"), "{chardevs:?}");
    run(
        &q,
        &c::RingbufWrite {
            device: "rb0".into(),
            data: "hello".into(),
            format: Some(t::DataFormat::Utf8),
        },
    )
    .await;
    let read = run(
        &q,
        &c::RingbufRead {
            device: "rb0".into(),
            size: 100,
            format: None,
        },
    )
    .await;
    assert_eq!(read, "hello");
    run(&q, &c::ChardevRemove { id: "rb0".into() }).await;
    assert!(run(&q, &c::QueryChardev).await.iter().all(|c| c.label != "rb0"));
    let backends = run(&q, &c::QueryChardevBackends).await;
    assert!(backends.iter().any(|b| b.name == "ringbuf"));

    // A hub port netdev.
    run(
        &q,
        &c::NetdevAdd(t::Netdev {
            id: "hp0".into(),
            branch: t::NetdevBranch::Hubport(t::NetdevHubPortOptions {
                hubid: 0,
                netdev: None,
            }),
        }),
    )
    .await;
    let hmp = |line: &str| c::HumanMonitorCommand {
        command_line: line.into(),
        cpu_index: None,
    };
    assert!(run(&q, &hmp("info network")).await.contains("hp0"));
    run(&q, &c::NetdevDel { id: "hp0".into() }).await;
    assert!(!run(&q, &hmp("info network")).await.contains("hp0"));

    // Migration to a file, with MIGRATION events on.
    assert_eq!(run(&q, &c::QueryMigrate).await.status, None);
    run(
        &q,
        &c::MigrateSetCapabilities {
            capabilities: vec![t::MigrationCapabilityStatus {
                capability: t::MigrationCapability::Events,
                state: true,
            }],
        },
    )
    .await;
    let caps = run(&q, &c::QueryMigrateCapabilities).await;
    assert!(caps
        .iter()
        .any(|c| c.capability == t::MigrationCapability::Events && c.state));
    run(
        &q,
        &c::MigrateSetParameters(t::MigrateSetParameters {
            max_bandwidth: Some(1 << 30),
            downtime_limit: Some(500),
            ..Default::default()
        }),
    )
    .await;
    let params = run(&q, &c::QueryMigrateParameters).await;
    assert_eq!(
        (params.max_bandwidth, params.downtime_limit),
        (Some(1 << 30), Some(500))
    );
    let file = dir.join("vm.mig");
    run(
        &q,
        &c::Migrate {
            uri: Some(format!("file:{}", file.display())),
            channels: None,
            detach: None,
            resume: None,
        },
    )
    .await;
    loop {
        match next_event(&mut events, "MIGRATION").await {
            Typed::Migration(m) if m.status == t::MigrationStatus::Completed => break,
            Typed::Migration(m) => assert_ne!(m.status, t::MigrationStatus::Failed),
            other => panic!("{other:?}"),
        }
    }
    let info = run(&q, &c::QueryMigrate).await;
    assert_eq!(info.status, Some(t::MigrationStatus::Completed));
    assert!(info.ram.is_some_and(|r| r.total > 0));
    assert!(std::fs::metadata(&file).unwrap().len() > 0);
    rec.finish(&["MIGRATION"]);
}
