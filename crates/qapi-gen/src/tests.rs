//! The generator on small schemas, one construct at a time.

use crate::cond::Profile;
use crate::gen::{generate, Options};
use crate::schema::Schema;

struct Out {
    files: Vec<(String, String)>,
}

impl Out {
    fn file(&self, name: &str) -> &str {
        &self.files.iter().find(|(n, _)| n == name).expect("generated").1
    }

    /// The lines of `file` from the one containing `start` up to the next
    /// blank line: one item.
    fn item(&self, file: &str, start: &str) -> String {
        let text = self.file(file);
        let at = text
            .find(start)
            .unwrap_or_else(|| panic!("no {start:?} in {file}:\n{text}"));
        let begin = text[..at].rfind("\n\n").map(|i| i + 2).unwrap_or(0);
        let end = text[at..].find("\n\n").map(|i| at + i).unwrap_or(text.len());
        text[begin..end].to_owned()
    }

    fn types(&self, start: &str) -> String {
        self.item("src/types.rs", start)
    }
}

fn gen_with(src: &str, profile: &Profile) -> Out {
    let schema = Schema::from_str(src, "test", profile).unwrap();
    Out {
        files: generate(&schema, &Options::default()).unwrap(),
    }
}

fn gen(src: &str) -> Out {
    gen_with(src, &Profile::new([("YES", true), ("NO", false)]))
}

fn has(text: &str, lines: &[&str]) {
    for l in lines {
        assert!(text.lines().any(|x| x.trim() == *l), "no line {l:?} in:\n{text}");
    }
}

fn lacks(text: &str, frag: &str) {
    assert!(!text.contains(frag), "{frag:?} in:\n{text}");
}

#[test]
fn struct_with_base_types_arrays_and_any() {
    let out = gen("##\n# @Base:\n# Since: 1.0\n##\n{ 'struct': 'Base', 'data': { 'node-name': 'str' } }\n\
         { 'struct': 'Thing', 'base': 'Base', 'data': { 'size': 'size', 'n': 'int8', 'u': 'uint32', \
           'ratio': 'number', 'on': 'bool', '*blob': 'any', 'tags': ['str'], '*kids': ['Base'], 'type': 'str' } }");
    let t = out.types("pub struct Thing {");
    has(
        &t,
        &[
            "#[derive(Debug, Clone, PartialEq, Serialize)]",
            "#[serde(rename = \"node-name\")]",
            "pub node_name: String,",
            "pub size: u64,",
            "pub n: i8,",
            "pub u: u32,",
            "pub ratio: f64,",
            "pub on: bool,",
            "#[serde(default, deserialize_with = \"crate::de::present\", skip_serializing_if = \"Option::is_none\")]",
            "pub blob: Option<serde_json::Value>,",
            "pub tags: Vec<String>,",
            "pub kids: Option<Vec<Base>>,",
            "pub r#type: String,",
        ],
    );
    // The base's member comes first.
    assert!(t.find("node_name").unwrap() < t.find("pub size").unwrap());
    assert!(t.contains("#object-QMP-test.Thing)"), "{t}");
    let b = out.types("pub struct Base {");
    has(&b, &["/// Since QEMU 1.0."]);
}

#[test]
fn structs_deserialize_by_member_name() {
    let out = gen("{ 'alternate': 'Alt', 'data': { 's': 'str', 'n': 'null' } }\n\
         { 'struct': 'S', 'data': { 'node-name': 'str', '*size': 'int', '*tls': 'Alt', '*x': 'any' } }\n\
         { 'struct': 'E', 'data': {} }");
    let text = out.file("src/types.rs");
    has(
        text,
        &[
            "impl<'de> Deserialize<'de> for S {",
            "let mut f0 = None;",
            "while let Some(k) = m.next_key::<crate::de::Key<'de>>()? {",
            // Required: the value itself; optional: `null` is absent...
            "\"node-name\" => f0 = Some(m.next_value()?),",
            "\"size\" => f1 = m.next_value()?,",
            // ...unless null is a value of the type.
            "\"tls\" => f2 = Some(m.next_value()?),",
            "\"x\" => f3 = Some(m.next_value()?),",
            "_ => drop(m.next_value::<serde::de::IgnoredAny>()?),",
            "node_name: f0.ok_or_else(|| serde::de::Error::missing_field(\"node-name\"))?,",
            "size: f1,",
            "d.deserialize_map(V)",
            // A struct without members takes any object.
            "impl<'de> Deserialize<'de> for E {",
            "while m.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}",
        ],
    );
}

#[test]
fn all_optional_structs_are_default() {
    let out = gen("{ 'struct': 'Opts', 'data': { '*a': 'int', '*b': 'str' } }");
    has(
        &out.types("pub struct Opts {"),
        &["#[derive(Debug, Clone, Default, PartialEq, Serialize)]"],
    );
}

#[test]
fn enums() {
    let out = gen("{ 'enum': 'Mode', 'data': [ 'read-only', 'host_cdrom', '1', \
         { 'name': 'old', 'features': [ 'deprecated' ] } ] }");
    let e = out.types("pub enum Mode {");
    has(
        &e,
        &[
            "#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]",
            "/// `read-only`.",
            "ReadOnly,",
            "HostCdrom,",
            "V1,",
            "#[deprecated(note = \"QEMU deprecates this value\")]",
            "Old,",
        ],
    );
    let imp = out.types("impl Mode {");
    has(
        &imp,
        &["pub const ALL: &'static [Mode] = &[Mode::ReadOnly, Mode::HostCdrom, Mode::V1, Mode::Old];"],
    );
    // The strings both ways; serde goes through them.
    has(
        out.file("src/types.rs"),
        &[
            "pub const fn as_str(self) -> &'static str {",
            "impl std::str::FromStr for Mode {",
            "Mode::HostCdrom => \"host_cdrom\",",
            "\"host_cdrom\" => Ok(Mode::HostCdrom),",
            "\"1\" => Ok(Mode::V1),",
            "_ => Err(crate::UnknownValue::new(\"Mode\", s)),",
            "crate::qapi_enum!(Mode);",
        ],
    );
}

#[test]
fn flat_union_with_common_members() {
    let out = gen("{ 'enum': 'Driver', 'data': [ 'file', 'null-co', 'raw' ] }\n\
         { 'struct': 'FileOpts', 'data': { 'filename': 'str' } }\n\
         { 'struct': 'RawOpts', 'data': { '*offset': 'int' } }\n\
         { 'union': 'Opts', 'base': { 'driver': 'Driver', '*node-name': 'str' }, 'discriminator': 'driver', \
           'data': { 'file': 'FileOpts', 'raw': 'RawOpts' } }");
    let u = out.types("pub struct Opts {");
    has(
        &u,
        &[
            "pub node_name: Option<String>,",
            "#[serde(flatten)]",
            "pub branch: OptsBranch,",
        ],
    );
    lacks(&u, "pub driver");
    let b = out.types("pub enum OptsBranch {");
    has(
        &b,
        &[
            "#[serde(tag = \"driver\")]",
            "#[serde(rename = \"file\")]",
            "File(FileOpts),",
            "#[serde(rename = \"null-co\")]",
            "NullCo,",
            "Raw(RawOpts),",
        ],
    );
    // Every common member is optional: the branch alone makes one.
    has(
        &out.types("impl From<OptsBranch> for Opts {"),
        &["node_name: None,", "branch,"],
    );
}

#[test]
fn flat_union_whose_only_common_member_is_the_tag_is_the_enum() {
    let out = gen("{ 'enum': 'Kind', 'data': [ 'a', 'b' ] }\n\
         { 'struct': 'AWrap', 'data': { 'data': 'int' } }\n\
         { 'struct': 'KindBase', 'data': { 'type': 'Kind' } }\n\
         { 'union': 'Action', 'base': 'KindBase', 'discriminator': 'type', 'data': { 'a': 'AWrap' } }");
    let u = out.types("pub enum Action {");
    has(&u, &["#[serde(tag = \"type\")]", "A(AWrap),", "B,"]);
    lacks(out.file("src/types.rs"), "ActionBranch");
}

#[test]
fn alternates_and_nulls() {
    let out = gen("{ 'struct': 'Def', 'data': { 'x': 'int' } }\n\
         { 'alternate': 'Ref', 'data': { 'definition': 'Def', 'reference': 'str', 'list': ['int'] } }\n\
         { 'alternate': 'StrOrNull', 'data': { 's': 'str', 'n': 'null' } }\n\
         { 'struct': 'Params', 'data': { '*tls': 'StrOrNull' } }");
    has(
        &out.types("pub enum Ref {"),
        &[
            "#[serde(untagged)]",
            "Definition(Def),",
            "Reference(String),",
            "List(Vec<i64>),",
        ],
    );
    has(&out.types("pub enum StrOrNull {"), &["S(String),", "N,"]);
    // An explicit null is the null branch, not an absent member.
    has(
        &out.types("pub struct Params {"),
        &[
            "#[serde(default, deserialize_with = \"crate::de::present\", skip_serializing_if = \"Option::is_none\")]",
            "pub tls: Option<StrOrNull>,",
        ],
    );
}

#[test]
fn recursion_is_boxed_once() {
    let out = gen("{ 'enum': 'D', 'data': [ 'f', 'q' ] }\n\
         { 'struct': 'Q', 'data': { 'file': 'Ref', '*backing': 'Ref' } }\n\
         { 'union': 'Opts', 'base': { 'driver': 'D' }, 'discriminator': 'driver', 'data': { 'q': 'Q' } }\n\
         { 'alternate': 'Ref', 'data': { 'definition': 'Opts', 'reference': 'str' } }\n\
         { 'struct': 'Info', 'data': { '*backing-image': 'Info', 'kids': ['Info'] } }");
    has(&out.types("pub enum Ref {"), &["Definition(Box<Opts>),"]);
    has(
        &out.types("pub struct Q {"),
        &["pub file: Ref,", "pub backing: Option<Ref>,"],
    );
    has(
        &out.types("pub struct Info {"),
        &["pub backing_image: Option<Box<Info>>,", "pub kids: Vec<Info>,"],
    );
}

#[test]
fn commands() {
    let out = gen("{ 'struct': 'Info', 'data': { 'a': 'int' } }\n\
         { 'struct': 'Args', 'data': { 'a': 'int' } }\n\
         ##\n# @stop:\n#\n# Since: 0.14\n##\n{ 'command': 'stop' }\n\
         { 'command': 'query-info', 'returns': ['Info'], 'allow-preconfig': true }\n\
         { 'command': 'block_resize', 'data': { '*node-name': 'str', 'size': 'int' } }\n\
         { 'command': 'boxed-cmd', 'data': 'Args', 'boxed': true, 'returns': 'any' }\n\
         { 'command': 'named-cmd', 'data': 'Args', 'returns': 'str' }\n\
         { 'command': 'device_add', 'data': { 'driver': 'str' }, 'gen': false }");
    let c = |s: &str| out.item("src/commands.rs", s);
    let stop = c("pub struct Stop;");
    has(
        &stop,
        &[
            "/// QMP command `stop`; QEMU answers with nothing (`{}`).",
            "/// Since QEMU 0.14.",
            "#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]",
        ],
    );
    assert!(stop.contains("#command-QMP-test.stop)"), "{stop}");
    has(
        &c("impl crate::Command for Stop {"),
        &[
            "const NAME: &'static str = \"stop\";",
            "type Returns = crate::Empty;",
        ],
    );
    has(
        &c("pub struct QueryInfo;"),
        &["/// QMP command `query-info`; QEMU answers with a list of [`Info`](types::Info)."],
    );
    has(
        &c("impl crate::Command for QueryInfo {"),
        &["type Returns = Vec<types::Info>;"],
    );
    has(
        &c("pub struct BlockResize {"),
        &["pub node_name: Option<String>,", "pub size: i64,"],
    );
    has(
        &c("impl crate::Command for BlockResize {"),
        &["const NAME: &'static str = \"block_resize\";"],
    );
    has(
        &c("pub struct BoxedCmd("),
        &["#[serde(transparent)]", "pub struct BoxedCmd(pub types::Args);"],
    );
    has(
        &c("impl crate::Command for BoxedCmd {"),
        &["type Returns = serde_json::Value;"],
    );
    has(
        &c("pub struct NamedCmd("),
        &["pub struct NamedCmd(pub types::Args);"],
    );
    has(
        &c("impl crate::Command for NamedCmd {"),
        &["type Returns = String;"],
    );
    has(
        &c("pub struct DeviceAdd {"),
        &[
            "pub driver: String,",
            "#[serde(flatten)]",
            "pub extra: serde_json::Map<String, serde_json::Value>,",
        ],
    );
}

#[test]
fn events() {
    let out = gen("{ 'struct': 'Info', 'data': { 'a': 'int' } }\n\
         { 'event': 'STOP' }\n\
         { 'event': 'BLOCK_JOB_READY', 'data': { 'device': 'str', '*speed': 'int' } }\n\
         { 'event': 'STATUS_REPORT', 'data': 'Info' }");
    let e = |s: &str| out.item("src/events.rs", s);
    has(
        &e("pub struct BlockJobReady {"),
        &[
            "/// Data of the QMP event `BLOCK_JOB_READY`.",
            "pub device: String,",
            "pub speed: Option<i64>,",
        ],
    );
    has(
        &e("pub type StatusReport"),
        &["pub type StatusReport = types::Info;"],
    );
    has(
        &e("pub enum Event {"),
        &[
            "Stop,",
            "BlockJobReady(BlockJobReady),",
            "StatusReport(StatusReport),",
            "Other {",
            "name: String,",
            "data: serde_json::Value,",
        ],
    );
    has(
        out.file("src/events.rs"),
        &[
            "\"BLOCK_JOB_READY\" => Event::BlockJobReady(crate::de::data(data)?),",
            "crate::de::no_data(data)?;",
            "Event::Stop => \"STOP\",",
            "Event::BlockJobReady(d) => serde_json::to_value(d),",
            "Event::Stop => Ok(serde_json::Value::Null),",
        ],
    );
}

#[test]
fn features_and_versions_become_attributes_docs_and_data() {
    let out = gen("##\n# @old-cmd:\n#\n# @arg: an argument (since 2.5)\n#\n# Features:\n#\n# @deprecated: gone\n#\n\
         # Since: 1.0\n##\n\
         { 'command': 'old-cmd', 'data': { '*arg': { 'type': 'int', 'features': [ 'deprecated', 'unstable' ] } }, \
           'features': [ 'deprecated' ] }\n\
         { 'struct': 'X', 'data': { 'a': 'int' }, 'features': [ 'unstable' ] }");
    let c = out.item("src/commands.rs", "pub struct OldCmd {");
    has(
        &c,
        &[
            "#[deprecated(note = \"QEMU deprecates this command\")]",
            "/// Since QEMU 1.0. Features: `deprecated`.",
            "/// `arg` (optional; since QEMU 2.5; features: `deprecated`, `unstable`).",
            "#[deprecated(note = \"QEMU deprecates this member\")]",
        ],
    );
    has(&out.types("pub struct X {"), &["/// Features: `unstable`."]);
    lacks(&out.types("pub struct X {"), "#[deprecated");
    let t = out.file("src/meta/tables.rs");
    has(
        t,
        &[
            "Item { name: \"old-cmd\", rust: \"OldCmd\", module: \"test\", since: Some(\"1.0\"), features: &[\"deprecated\"], condition: None },",
            "MemberInfo { owner: \"old-cmd\", name: \"arg\", since: Some(\"2.5\"), features: &[\"deprecated\", \"unstable\"], condition: None },",
            "Item { name: \"X\", rust: \"X\", module: \"test\", since: None, features: &[\"unstable\"], condition: None },",
        ],
    );
}

#[test]
fn conditionals_follow_the_profile() {
    let out = gen("{ 'enum': 'E', 'data': [ 'a', { 'name': 'vnc', 'if': 'YES' }, { 'name': 's390', 'if': 'NO' } ] }\n\
         { 'struct': 'S', 'data': { 'x': { 'type': 'int', 'if': { 'not': 'YES' } }, 'y': 'E' }, 'if': 'YES' }\n\
         { 'command': 'query-s390', 'if': { 'all': [ 'YES', 'NO' ] } }\n\
         { 'event': 'S390_THING', 'if': 'NO' }");
    let e = out.types("pub enum E {");
    has(
        &e,
        &[
            "Vnc,",
            "/// `vnc` (compiled in only where `YES` holds (it does in the build the profile describes)).",
        ],
    );
    lacks(&e, "S390");
    let s = out.types("pub struct S {");
    lacks(&s, "pub x");
    has(&s, &["pub y: E,"]);
    lacks(out.file("src/commands.rs"), "QueryS390");
    lacks(out.file("src/events.rs"), "S390");
    has(
        out.file("src/meta/tables.rs"),
        &[
            "Omitted { kind: \"command\", name: \"query-s390\", condition: \"all(YES, NO)\" },",
            "Omitted { kind: \"event\", name: \"S390_THING\", condition: \"NO\" },",
            "Item { name: \"S\", rust: \"S\", module: \"test\", since: None, features: &[], condition: Some(\"YES\") },",
        ],
    );
    // A symbol the profile does not decide stops the generator.
    assert!(Schema::from_str("{ 'command': 'x', 'if': 'MAYBE' }", "t", &Profile::new([])).is_err());
}

#[test]
fn shape_describes_what_was_generated() {
    let out = gen("{ 'enum': 'D', 'data': [ 'a' ] }\n\
         { 'struct': 'A', 'data': { '*x': ['int'] } }\n\
         { 'union': 'U', 'base': { 'd': 'D' }, 'discriminator': 'd', 'data': { 'a': 'A' } }\n\
         { 'command': 'c', 'data': { 'u': 'U' }, 'returns': ['A'] }\n\
         { 'event': 'E' }");
    let shape = out.file("shape.json");
    for l in [
        "  \"D\": {\"kind\": \"enum\", \"values\": [\"a\"]},",
        "  \"A\": {\"kind\": \"object\", \"members\": [{\"name\": \"x\", \"optional\": true, \"type\": [\"int\"]}]},",
        "  \"U\": {\"kind\": \"object\", \"members\": [{\"name\": \"d\", \"optional\": false, \"type\": \"D\"}], \"tag\": \"d\", \"variants\": [{\"case\": \"a\", \"type\": \"A\"}]},",
        "  \"c\": {\"kind\": \"command\", \"args\": {\"members\": [{\"name\": \"u\", \"optional\": false, \"type\": \"U\"}]}, \"returns\": [\"A\"], \"extra-args\": false},",
        "  \"E\": {\"kind\": \"event\", \"data\": null}",
    ] {
        assert!(shape.lines().any(|x| x == l), "no {l} in\n{shape}");
    }
}

#[test]
fn name_clashes_are_errors() {
    let src = "{ 'enum': 'E', 'data': [ 'a-b', 'a_b' ] }";
    let schema = Schema::from_str(src, "t", &Profile::default()).unwrap();
    assert!(generate(&schema, &Options::default()).is_err());
    let src = "{ 'struct': 'S', 'data': { 'a-b': 'int', 'a_b': 'int' } }";
    let schema = Schema::from_str(src, "t", &Profile::default()).unwrap();
    assert!(generate(&schema, &Options::default()).is_err());
}

#[test]
fn a_prelude_name_gets_a_prefix() {
    let out =
        gen("{ 'struct': 'String', 'data': { 'str': 'str' } }\n{ 'struct': 'W', 'data': { 's': 'String' } }");
    has(&out.types("pub struct QapiString {"), &["pub str: String,"]);
    has(&out.types("pub struct W {"), &["pub s: QapiString,"]);
}

#[test]
fn includes_pragmas_and_modules() {
    let dir = std::env::temp_dir().join(format!("qapi-gen-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(
        dir.join("top.json"),
        "{ 'pragma': { 'doc-required': true } }\n\
         { 'include': 'sub/common.json' }\n\
         { 'include': 'sub/common.json' }\n\
         { 'command': 'use-it', 'data': { 'x': 'Shared' } }\n",
    )
    .unwrap();
    // Includes are relative to the including file; a second include of the
    // same file has no effect.
    std::fs::write(
        dir.join("sub/common.json"),
        "{ 'include': 'leaf.json' }\n{ 'struct': 'Shared', 'data': { 'l': 'Leaf' } }\n",
    )
    .unwrap();
    std::fs::write(dir.join("sub/leaf.json"), "{ 'enum': 'Leaf', 'data': [ 'x' ] }\n").unwrap();
    let schema = Schema::load(&dir.join("top.json"), &Profile::default()).unwrap();
    let names: Vec<_> = schema
        .defs
        .iter()
        .map(|d| (d.name.as_str(), d.module.as_str()))
        .collect();
    assert_eq!(names, [("Leaf", "leaf"), ("Shared", "common"), ("use-it", "top")]);
    let out = generate(&schema, &Options::default()).unwrap();
    let types = &out.iter().find(|(n, _)| n == "src/types.rs").unwrap().1;
    assert!(types.contains("#object-QMP-common.Shared)"), "{types}");
    std::fs::remove_dir_all(&dir).unwrap();
}
