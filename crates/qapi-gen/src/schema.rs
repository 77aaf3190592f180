//! The schema's definitions: loading files (with their includes), checking
//! each expression's shape, reading the facts kept from doc comments, and
//! applying a build profile to the `'if'` conditions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::cond::{Cond, Profile};
use crate::parse::{parse, Expr, Value};

/// QAPI's built-in types.
pub const BUILTINS: &[&str] = &[
    "str", "number", "int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size",
    "bool", "null", "any", "QType",
];

/// The values of the built-in enum `QType`.
pub const QTYPE_VALUES: &[&str] = &["none", "qnull", "qnum", "qstring", "qdict", "qlist", "qbool"];

/// A reference to a type: `'T'` or `['T']`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeRef {
    /// One value of the type.
    Named(String),
    /// A JSON array of values of the type.
    Array(String),
}

impl TypeRef {
    fn from_value(v: &Value) -> Result<TypeRef, String> {
        match v {
            Value::Str(s) => Ok(TypeRef::Named(s.clone())),
            Value::List(l) => match l.as_slice() {
                [Value::Str(s)] => Ok(TypeRef::Array(s.clone())),
                _ => Err("an array type is a list of one type name".into()),
            },
            _ => Err("a type is a name or a list of one name".into()),
        }
    }

    /// The element type's name.
    pub fn name(&self) -> &str {
        match self {
            TypeRef::Named(n) | TypeRef::Array(n) => n,
        }
    }
}

/// What every definition, member, value and variant can carry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extras {
    /// The condition it was compiled under, if any (after the profile it held).
    pub cond: Option<Cond>,
    /// Its feature flags (those whose own condition held).
    pub features: Vec<String>,
    /// The QEMU version that added it, from the doc comment.
    pub since: Option<String>,
}

impl Extras {
    /// True with the `deprecated` feature.
    pub fn deprecated(&self) -> bool {
        self.features.iter().any(|f| f == "deprecated")
    }

    /// True with the `unstable` feature.
    pub fn unstable(&self) -> bool {
        self.features.iter().any(|f| f == "unstable")
    }
}

/// A member of an object.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The JSON name (without the `*` of optional members).
    pub name: String,
    /// True when it may be left out.
    pub optional: bool,
    /// Its type.
    pub ty: TypeRef,
    /// Condition, features, since.
    pub extras: Extras,
}

/// A value of an enum.
#[derive(Debug, Clone, PartialEq)]
pub struct EnumValue {
    /// The JSON string.
    pub name: String,
    /// Condition, features, since.
    pub extras: Extras,
}

/// A branch of a union (keyed by a discriminator value) or an alternate.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// The discriminator value, or the alternate branch's name.
    pub name: String,
    /// The branch's type (its element type when `array`).
    pub ty: String,
    /// True for an array of `ty` (alternates only).
    pub array: bool,
    /// Its condition.
    pub cond: Option<Cond>,
}

/// A command's or event's `'data'`.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// None.
    None,
    /// Members given inline.
    Members(Vec<Member>),
    /// The members of a named type (a struct, or with `'boxed'` also a union).
    Named(String),
}

/// A union's base.
#[derive(Debug, Clone, PartialEq)]
pub enum Base {
    /// A named struct.
    Named(String),
    /// Members given inline.
    Members(Vec<Member>),
}

/// What a definition defines.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `'enum'`
    Enum {
        /// Its values.
        values: Vec<EnumValue>,
    },
    /// `'struct'`
    Struct {
        /// The struct whose members come first.
        base: Option<String>,
        /// Its own members.
        members: Vec<Member>,
    },
    /// `'union'` (flat: a base with a discriminator member)
    Union {
        /// The common members.
        base: Base,
        /// The base member whose value selects the branch.
        discriminator: String,
        /// Branches, by discriminator value.
        variants: Vec<Variant>,
    },
    /// `'alternate'`: one of several types, told apart by JSON type.
    Alternate {
        /// Branches.
        variants: Vec<Variant>,
    },
    /// `'command'`
    Command {
        /// Arguments.
        data: Data,
        /// `'boxed': true`
        boxed: bool,
        /// What it returns.
        returns: Option<TypeRef>,
        /// `'gen': false`: QEMU takes more arguments than the schema lists.
        gen: bool,
        /// `'allow-oob'`
        allow_oob: bool,
        /// `'allow-preconfig'`
        allow_preconfig: bool,
        /// `'success-response'` (false: no reply)
        success_response: bool,
    },
    /// `'event'`
    Event {
        /// Its data.
        data: Data,
        /// `'boxed': true`
        boxed: bool,
    },
}

impl Kind {
    /// The schema keyword.
    pub fn keyword(&self) -> &'static str {
        match self {
            Kind::Enum { .. } => "enum",
            Kind::Struct { .. } => "struct",
            Kind::Union { .. } => "union",
            Kind::Alternate { .. } => "alternate",
            Kind::Command { .. } => "command",
            Kind::Event { .. } => "event",
        }
    }
}

/// One definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Def {
    /// Its name.
    pub name: String,
    /// The file it is in, without `.json` (QEMU's docs call it the module).
    pub module: String,
    /// What it is.
    pub kind: Kind,
    /// Condition, features, since.
    pub extras: Extras,
}

/// A definition compiled out of the profile's build.
#[derive(Debug, Clone, PartialEq)]
pub struct Omitted {
    /// Its keyword (`command`, `struct`, ...).
    pub keyword: &'static str,
    /// Its name.
    pub name: String,
    /// The condition that did not hold.
    pub cond: Cond,
}

/// A whole schema, with one profile applied.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    /// Definitions in source order (includes expanded where first included).
    pub defs: Vec<Def>,
    /// Definitions whose condition did not hold.
    pub omitted: Vec<Omitted>,
    /// Every condition symbol the schema mentions.
    pub symbols: Vec<String>,
    index: HashMap<String, usize>,
}

impl Schema {
    /// Loads `path` and the files it includes.
    pub fn load(path: &Path, profile: &Profile) -> Result<Schema, String> {
        let mut raw = Vec::new();
        let mut seen = HashSet::new();
        load_file(path, &mut raw, &mut seen)?;
        Schema::build(raw, profile)
    }

    /// Builds a schema from one file's text (tests; includes are refused).
    pub fn from_str(src: &str, module: &str, profile: &Profile) -> Result<Schema, String> {
        let exprs = parse(src).map_err(|e| format!("{module}: {e}"))?;
        let raw = exprs
            .into_iter()
            .map(|e| {
                if e.value.get("include").is_some() {
                    return Err(format!("{module}: include in a schema given as text"));
                }
                Ok((module.to_owned(), e))
            })
            .collect::<Result<_, _>>()?;
        Schema::build(raw, profile)
    }

    fn build(raw: Vec<(String, Expr)>, profile: &Profile) -> Result<Schema, String> {
        let mut schema = Schema::default();
        let mut symbols = std::collections::BTreeSet::new();
        for (module, expr) in raw {
            let at = |e: String| format!("{module}.json:{}: {e}", expr.line);
            if expr.value.get("pragma").is_some() {
                continue;
            }
            let (def, cond) = read_def(&module, &expr).map_err(at)?;
            for c in raw_conds(&def, &cond) {
                let mut a = Vec::new();
                c.atoms(&mut a);
                symbols.extend(a.into_iter().map(str::to_owned));
            }
            if let Some(c) = &cond {
                if !c.eval(profile).map_err(at)? {
                    schema.omitted.push(Omitted {
                        keyword: def.def.kind.keyword(),
                        name: def.def.name,
                        cond: c.clone(),
                    });
                    continue;
                }
            }
            let def = apply_profile(def, cond, profile).map_err(at)?;
            if BUILTINS.contains(&def.name.as_str()) || schema.index.contains_key(&def.name) {
                return Err(at(format!("'{}' is defined twice", def.name)));
            }
            schema.index.insert(def.name.clone(), schema.defs.len());
            schema.defs.push(def);
        }
        schema.symbols = symbols.into_iter().collect();
        schema.check()?;
        Ok(schema)
    }

    /// The definition named `name`.
    pub fn get(&self, name: &str) -> Option<&Def> {
        self.index.get(name).map(|&i| &self.defs[i])
    }

    /// Every member of a struct, its base's first.
    pub fn struct_members(&self, name: &str) -> Vec<Member> {
        match self.get(name).map(|d| &d.kind) {
            Some(Kind::Struct { base, members }) => {
                let mut all = base
                    .as_deref()
                    .map(|b| self.struct_members(b))
                    .unwrap_or_default();
                all.extend(members.iter().cloned());
                all
            }
            _ => Vec::new(),
        }
    }

    /// A union's common members (the discriminator among them).
    pub fn union_base_members(&self, base: &Base) -> Vec<Member> {
        match base {
            Base::Named(n) => self.struct_members(n),
            Base::Members(m) => m.clone(),
        }
    }

    /// Checks that every referenced type exists and that unions and
    /// alternates are well formed.
    fn check(&self) -> Result<(), String> {
        let ty_exists = |n: &str| BUILTINS.contains(&n) || self.get(n).is_some_and(|d| is_type(&d.kind));
        let check_members = |owner: &str, members: &[Member]| -> Result<(), String> {
            let mut names = HashSet::new();
            for m in members {
                if !ty_exists(m.ty.name()) {
                    return Err(format!(
                        "{owner}: member '{}' has unknown type '{}'",
                        m.name,
                        m.ty.name()
                    ));
                }
                if !names.insert(&m.name) {
                    return Err(format!("{owner}: member '{}' twice", m.name));
                }
            }
            Ok(())
        };
        for d in &self.defs {
            let owner = d.name.as_str();
            match &d.kind {
                Kind::Enum { .. } => {}
                Kind::Struct { base, .. } => {
                    if let Some(b) = base {
                        if !matches!(self.get(b).map(|d| &d.kind), Some(Kind::Struct { .. })) {
                            return Err(format!("{owner}: base '{b}' is not a struct"));
                        }
                    }
                    check_members(owner, &self.struct_members(owner))?;
                }
                Kind::Union {
                    base,
                    discriminator,
                    variants,
                } => {
                    if let Base::Named(b) = base {
                        if !matches!(self.get(b).map(|d| &d.kind), Some(Kind::Struct { .. })) {
                            return Err(format!("{owner}: base '{b}' is not a struct"));
                        }
                    }
                    let members = self.union_base_members(base);
                    check_members(owner, &members)?;
                    let Some(tag) = members.iter().find(|m| &m.name == discriminator) else {
                        return Err(format!("{owner}: no base member '{discriminator}'"));
                    };
                    let values = match (&tag.ty, self.get(tag.ty.name()).map(|d| &d.kind)) {
                        (TypeRef::Named(_), Some(Kind::Enum { values })) if !tag.optional => values,
                        _ => {
                            return Err(format!(
                                "{owner}: the discriminator must be a required enum member"
                            ))
                        }
                    };
                    for v in variants {
                        if v.array {
                            return Err(format!("{owner}: branch '{}' is an array", v.name));
                        }
                        if !values.iter().any(|x| x.name == v.name) {
                            return Err(format!(
                                "{owner}: branch '{}' is not a discriminator value",
                                v.name
                            ));
                        }
                        if !matches!(
                            self.get(&v.ty).map(|d| &d.kind),
                            Some(Kind::Struct { .. } | Kind::Union { .. })
                        ) {
                            return Err(format!("{owner}: branch '{}' is not an object type", v.name));
                        }
                    }
                }
                Kind::Alternate { variants } => {
                    for v in variants {
                        if !ty_exists(&v.ty) {
                            return Err(format!(
                                "{owner}: branch '{}' has unknown type '{}'",
                                v.name, v.ty
                            ));
                        }
                    }
                }
                Kind::Command { data, returns, .. } => {
                    self.check_data(owner, data, &check_members)?;
                    if let Some(r) = returns {
                        if !ty_exists(r.name()) {
                            return Err(format!("{owner}: unknown return type '{}'", r.name()));
                        }
                    }
                }
                Kind::Event { data, .. } => self.check_data(owner, data, &check_members)?,
            }
        }
        Ok(())
    }

    fn check_data(&self, owner: &str, data: &Data, check_members: &MemberCheck) -> Result<(), String> {
        match data {
            Data::None => Ok(()),
            Data::Members(m) => check_members(owner, m),
            Data::Named(n) => match self.get(n).map(|d| &d.kind) {
                Some(Kind::Struct { .. } | Kind::Union { .. }) => Ok(()),
                _ => Err(format!("{owner}: data '{n}' is not an object type")),
            },
        }
    }
}

/// A check of one owner's members.
type MemberCheck<'a> = dyn Fn(&str, &[Member]) -> Result<(), String> + 'a;

/// True for definitions of types.
pub fn is_type(kind: &Kind) -> bool {
    !matches!(kind, Kind::Command { .. } | Kind::Event { .. })
}

fn load_file(path: &Path, out: &mut Vec<(String, Expr)>, seen: &mut HashSet<PathBuf>) -> Result<(), String> {
    let canon = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !seen.insert(canon) {
        // Like QEMU: a file is read where it is first included.
        return Ok(());
    }
    let src = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let module = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("{}: not a file name", path.display()))?
        .to_owned();
    let exprs = parse(&src).map_err(|e| format!("{}: {e}", path.display()))?;
    for e in exprs {
        if let Some(inc) = e.value.get("include") {
            let inc = inc
                .as_str()
                .ok_or_else(|| format!("{}:{}: include needs a file name", path.display(), e.line))?;
            let dir = path.parent().unwrap_or(Path::new("."));
            load_file(&dir.join(inc), out, seen)?;
        } else {
            out.push((module.clone(), e));
        }
    }
    Ok(())
}

/// Every condition in a definition: its own, its features', its members'
/// and values' (and their features'), its branches'.
fn raw_conds<'a>(raw: &'a RawDef, cond: &'a Option<Cond>) -> Vec<&'a Cond> {
    let mut out: Vec<&Cond> = cond.iter().collect();
    let extras = raw.members.iter().chain(&raw.values);
    for r in extras {
        out.extend(&r.cond);
        out.extend(r.features.iter().filter_map(|(_, c)| c.as_ref()));
    }
    out.extend(raw.features.iter().filter_map(|(_, c)| c.as_ref()));
    if let Kind::Union { variants, .. } | Kind::Alternate { variants } = &raw.def.kind {
        out.extend(variants.iter().filter_map(|v| v.cond.as_ref()));
    }
    out
}

/// Facts kept from a doc comment: the definition's `Since:` and each
/// member's `(since X.Y)`. Nothing else of the prose is used.
#[derive(Debug, Default)]
struct DocFacts {
    since: Option<String>,
    member_since: BTreeMap<String, String>,
}

/// The first `N.N` or `N.N.N` at the start of `s`.
fn version_at(s: &str) -> Option<String> {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let v = s[..end].trim_end_matches('.');
    (v.contains('.') && v.split('.').all(|p| !p.is_empty())).then(|| v.to_owned())
}

fn doc_facts(doc: &[String]) -> DocFacts {
    let mut facts = DocFacts::default();
    let mut current: Option<(String, String)> = None;
    let mut in_features = false;
    let flush = |cur: &mut Option<(String, String)>, facts: &mut DocFacts| {
        if let Some((name, text)) = cur.take() {
            let lower = text.to_ascii_lowercase();
            if let Some(i) = lower.find("(since ") {
                if let Some(v) = version_at(lower[i + 7..].trim_start()) {
                    facts.member_since.insert(name, v);
                }
            }
        }
    };
    for (i, line) in doc.iter().enumerate() {
        if i == 0 {
            continue; // `@name:`
        }
        if let Some(rest) = line.strip_prefix("Since:") {
            flush(&mut current, &mut facts);
            let rest = rest.trim();
            let v = if rest.is_empty() {
                doc.get(i + 1).and_then(|l| version_at(l.trim()))
            } else {
                version_at(rest)
            };
            facts.since = facts.since.take().or(v);
            continue;
        }
        if line.starts_with("Features:") {
            flush(&mut current, &mut facts);
            in_features = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix('@') {
            flush(&mut current, &mut facts);
            if let Some((name, text)) = rest.split_once(':') {
                if !in_features && !name.contains(' ') {
                    current = Some((name.to_owned(), text.to_owned()));
                }
            }
            continue;
        }
        if line.trim().is_empty() || !line.starts_with(' ') {
            flush(&mut current, &mut facts);
            if !line.trim().is_empty() {
                in_features = false;
            }
            continue;
        }
        if let Some((_, text)) = &mut current {
            text.push(' ');
            text.push_str(line.trim());
        }
    }
    flush(&mut current, &mut facts);
    facts
}

fn str_of<'a>(v: &'a Value, what: &str) -> Result<&'a str, String> {
    v.as_str().ok_or_else(|| format!("{what} must be a string"))
}

fn bool_of(v: Option<&Value>, default: bool, what: &str) -> Result<bool, String> {
    match v {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format!("{what} must be true or false")),
    }
}

fn cond_of(v: &Value) -> Result<Option<Cond>, String> {
    v.get("if").map(Cond::from_value).transpose()
}

/// Features, each with its condition (not yet applied).
fn features_of(v: &Value) -> Result<Vec<(String, Option<Cond>)>, String> {
    match v.get("features") {
        None => Ok(Vec::new()),
        Some(Value::List(l)) => l
            .iter()
            .map(|f| match f {
                Value::Str(s) => Ok((s.clone(), None)),
                Value::Dict(_) => {
                    let name = str_of(f.get("name").ok_or("a feature needs a name")?, "a feature's name")?;
                    Ok((name.to_owned(), cond_of(f)?))
                }
                _ => Err("a feature is a string or an object".to_owned()),
            })
            .collect(),
        Some(_) => Err("'features' must be a list".into()),
    }
}

/// A definition before the profile is applied: the pieces keep their own
/// conditions in their [`Extras`] and their features unfiltered in
/// `pending` form.
struct RawExtras {
    cond: Option<Cond>,
    features: Vec<(String, Option<Cond>)>,
}

fn members_of(v: &Value, since: &BTreeMap<String, String>) -> Result<Vec<(Member, RawExtras)>, String> {
    let Value::Dict(d) = v else {
        return Err("members must be an object".into());
    };
    d.iter()
        .map(|(k, t)| {
            let (name, optional) = match k.strip_prefix('*') {
                Some(n) => (n.to_owned(), true),
                None => (k.clone(), false),
            };
            let (ty, raw) = match t {
                Value::Dict(_) => (
                    TypeRef::from_value(
                        t.get("type")
                            .ok_or_else(|| format!("member '{name}' needs a type"))?,
                    )?,
                    RawExtras {
                        cond: cond_of(t)?,
                        features: features_of(t)?,
                    },
                ),
                _ => (
                    TypeRef::from_value(t)?,
                    RawExtras {
                        cond: None,
                        features: Vec::new(),
                    },
                ),
            };
            let m = Member {
                extras: Extras {
                    since: since.get(&name).cloned(),
                    ..Extras::default()
                },
                name,
                optional,
                ty,
            };
            Ok((m, raw))
        })
        .collect()
}

/// A definition read from its expression, with every nested condition and
/// feature still undecided (kept in side tables until the profile applies).
struct RawDef {
    def: Def,
    features: Vec<(String, Option<Cond>)>,
    members: Vec<RawExtras>,
    values: Vec<RawExtras>,
}

fn read_def(module: &str, expr: &Expr) -> Result<(RawDef, Option<Cond>), String> {
    let v = &expr.value;
    let keyword = ["enum", "struct", "union", "alternate", "command", "event"]
        .into_iter()
        .find(|k| v.get(k).is_some())
        .ok_or("not a definition")?;
    let name = str_of(v.get(keyword).unwrap(), keyword)?.to_owned();
    let allowed: &[&str] = match keyword {
        "enum" => &["enum", "data", "prefix", "if", "features"],
        "struct" => &["struct", "data", "base", "if", "features"],
        "union" => &["union", "base", "discriminator", "data", "if", "features"],
        "alternate" => &["alternate", "data", "if", "features"],
        "command" => &[
            "command",
            "data",
            "returns",
            "boxed",
            "gen",
            "success-response",
            "allow-oob",
            "allow-preconfig",
            "coroutine",
            "if",
            "features",
        ],
        _ => &["event", "data", "boxed", "if", "features"],
    };
    if let Value::Dict(d) = v {
        if let Some((k, _)) = d.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            return Err(format!("{keyword} '{name}': unknown key '{k}'"));
        }
    }
    let facts = match &expr.doc {
        Some(doc)
            if doc
                .first()
                .map(|l| l.trim_end_matches(':').trim_start_matches('@'))
                == Some(&name) =>
        {
            doc_facts(doc)
        }
        _ => DocFacts::default(),
    };
    let mut member_raw = Vec::new();
    let mut value_raw = Vec::new();
    let mut take_members = |v: &Value| -> Result<Vec<Member>, String> {
        let ms = members_of(v, &facts.member_since)?;
        Ok(ms
            .into_iter()
            .map(|(m, r)| {
                member_raw.push(r);
                m
            })
            .collect())
    };
    let data = v.get("data");
    let data_of =
        |data: Option<&Value>, take: &mut dyn FnMut(&Value) -> Result<Vec<Member>, String>| match data {
            None => Ok(Data::None),
            Some(Value::Str(n)) => Ok(Data::Named(n.clone())),
            Some(d @ Value::Dict(_)) => Ok(Data::Members(take(d)?)),
            Some(_) => Err(format!(
                "{keyword} '{name}': 'data' must be a type name or members"
            )),
        };
    let kind = match keyword {
        "enum" => {
            let Some(Value::List(l)) = data else {
                return Err(format!("enum '{name}' needs a list of values"));
            };
            let values = l
                .iter()
                .map(|x| {
                    let (n, raw) = match x {
                        Value::Str(s) => (
                            s.clone(),
                            RawExtras {
                                cond: None,
                                features: Vec::new(),
                            },
                        ),
                        Value::Dict(_) => (
                            str_of(x.get("name").ok_or("an enum value needs a name")?, "name")?.to_owned(),
                            RawExtras {
                                cond: cond_of(x)?,
                                features: features_of(x)?,
                            },
                        ),
                        _ => return Err(format!("enum '{name}': bad value")),
                    };
                    value_raw.push(raw);
                    Ok(EnumValue {
                        extras: Extras {
                            since: facts.member_since.get(&n).cloned(),
                            ..Extras::default()
                        },
                        name: n,
                    })
                })
                .collect::<Result<_, String>>()?;
            Kind::Enum { values }
        }
        "struct" => Kind::Struct {
            base: v
                .get("base")
                .map(|b| str_of(b, "base").map(str::to_owned))
                .transpose()?,
            members: match data {
                Some(d) => take_members(d)?,
                None => Vec::new(),
            },
        },
        "union" => {
            let base = match v.get("base") {
                Some(Value::Str(s)) => Base::Named(s.clone()),
                Some(d @ Value::Dict(_)) => Base::Members(take_members(d)?),
                _ => return Err(format!("union '{name}' needs a base")),
            };
            let discriminator = str_of(
                v.get("discriminator").ok_or("a union needs a discriminator")?,
                "discriminator",
            )?;
            Kind::Union {
                base,
                discriminator: discriminator.to_owned(),
                variants: variants_of(data, &name)?,
            }
        }
        "alternate" => Kind::Alternate {
            variants: variants_of(data, &name)?,
        },
        "command" => Kind::Command {
            data: data_of(data, &mut take_members)?,
            boxed: bool_of(v.get("boxed"), false, "boxed")?,
            returns: v.get("returns").map(TypeRef::from_value).transpose()?,
            gen: bool_of(v.get("gen"), true, "gen")?,
            allow_oob: bool_of(v.get("allow-oob"), false, "allow-oob")?,
            allow_preconfig: bool_of(v.get("allow-preconfig"), false, "allow-preconfig")?,
            success_response: bool_of(v.get("success-response"), true, "success-response")?,
        },
        _ => Kind::Event {
            data: data_of(data, &mut take_members)?,
            boxed: bool_of(v.get("boxed"), false, "boxed")?,
        },
    };
    let cond = cond_of(v)?;
    Ok((
        RawDef {
            def: Def {
                name,
                module: module.to_owned(),
                kind,
                extras: Extras {
                    cond: None,
                    features: Vec::new(),
                    since: facts.since,
                },
            },
            features: features_of(v)?,
            members: member_raw,
            values: value_raw,
        },
        cond,
    ))
}

fn variants_of(data: Option<&Value>, owner: &str) -> Result<Vec<Variant>, String> {
    let Some(Value::Dict(d)) = data else {
        return Err(format!("'{owner}' needs its branches as an object"));
    };
    d.iter()
        .map(|(k, t)| {
            let (ty, cond) = match t {
                Value::Dict(_) => (
                    TypeRef::from_value(t.get("type").ok_or("a branch needs a type")?)?,
                    cond_of(t)?,
                ),
                _ => (TypeRef::from_value(t)?, None),
            };
            Ok(Variant {
                name: k.clone(),
                array: matches!(ty, TypeRef::Array(_)),
                ty: ty.name().to_owned(),
                cond,
            })
        })
        .collect()
}

fn features_kept(raw: Vec<(String, Option<Cond>)>, profile: &Profile) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (f, c) in raw {
        if c.map(|c| c.eval(profile)).transpose()?.unwrap_or(true) {
            out.push(f);
        }
    }
    Ok(out)
}

fn keep(cond: &Option<Cond>, profile: &Profile) -> Result<bool, String> {
    Ok(cond
        .as_ref()
        .map(|c| c.eval(profile))
        .transpose()?
        .unwrap_or(true))
}

fn apply_profile(raw: RawDef, cond: Option<Cond>, profile: &Profile) -> Result<Def, String> {
    let RawDef {
        mut def,
        features,
        members,
        values,
    } = raw;
    def.extras.cond = cond;
    def.extras.features = features_kept(features, profile)?;
    let mut members = members.into_iter();
    let filter_members =
        |ms: &mut Vec<Member>, raws: &mut dyn Iterator<Item = RawExtras>| -> Result<(), String> {
            let mut kept = Vec::new();
            for mut m in ms.drain(..) {
                let r = raws.next().expect("one raw entry per member");
                if keep(&r.cond, profile)? {
                    m.extras.cond = r.cond;
                    m.extras.features = features_kept(r.features, profile)?;
                    kept.push(m);
                }
            }
            *ms = kept;
            Ok(())
        };
    match &mut def.kind {
        Kind::Enum { values: vs } => {
            let mut kept = Vec::new();
            for (mut v, r) in vs.drain(..).zip(values) {
                if keep(&r.cond, profile)? {
                    v.extras.cond = r.cond;
                    v.extras.features = features_kept(r.features, profile)?;
                    kept.push(v);
                }
            }
            *vs = kept;
        }
        Kind::Struct { members: ms, .. }
        | Kind::Union {
            base: Base::Members(ms),
            ..
        }
        | Kind::Command {
            data: Data::Members(ms),
            ..
        }
        | Kind::Event {
            data: Data::Members(ms),
            ..
        } => filter_members(ms, &mut members)?,
        _ => {}
    }
    match &mut def.kind {
        Kind::Union { variants, .. } | Kind::Alternate { variants } => {
            let mut kept = Vec::new();
            for v in variants.drain(..) {
                if keep(&v.cond, profile)? {
                    kept.push(v);
                }
            }
            *variants = kept;
        }
        _ => {}
    }
    Ok(def)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(src: &str) -> Schema {
        Schema::from_str(src, "test", &Profile::new([("YES", true), ("NO", false)])).unwrap()
    }

    #[test]
    fn reads_since_from_docs() {
        let s = load(
            "##\n# @Foo:\n#\n# Some text.\n#\n# @a: first\n#     (since 2.1)\n# @b: second (Since 3.0)\n#\n\
             # Features:\n#\n# @deprecated: no (since 9.9)\n#\n# Since: 1.5\n##\n\
             { 'struct': 'Foo', 'data': { 'a': 'int', '*b': 'str' }, 'features': ['deprecated'] }\n\
             ##\n# @bar:\n#\n# Since:\n#     7.0.1\n##\n{ 'command': 'bar' }",
        );
        let foo = s.get("Foo").unwrap();
        assert_eq!(foo.extras.since.as_deref(), Some("1.5"));
        assert!(foo.extras.deprecated());
        let Kind::Struct { members, .. } = &foo.kind else {
            panic!()
        };
        assert_eq!(members[0].extras.since.as_deref(), Some("2.1"));
        assert_eq!(members[1].extras.since.as_deref(), Some("3.0"));
        assert!(members[1].optional && !members[0].optional);
        assert_eq!(s.get("bar").unwrap().extras.since.as_deref(), Some("7.0.1"));
    }

    #[test]
    fn conditions_drop_what_is_compiled_out() {
        let s = load(
            "{ 'enum': 'E', 'data': [ 'a', { 'name': 'b', 'if': 'NO' }, { 'name': 'c', 'if': 'YES' } ] }\n\
             { 'struct': 'S', 'data': { 'x': { 'type': 'int', 'if': 'NO' }, 'y': { 'type': 'E', 'if': 'YES', \
               'features': [ { 'name': 'unstable', 'if': 'NO' }, 'deprecated' ] } } }\n\
             { 'command': 'gone', 'if': { 'all': [ 'YES', 'NO' ] } }\n\
             { 'event': 'HERE', 'if': { 'not': 'NO' } }",
        );
        let Kind::Enum { values } = &s.get("E").unwrap().kind else {
            panic!()
        };
        assert_eq!(
            values.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(values[1].extras.cond, Some(Cond::Atom("YES".into())));
        let members = s.struct_members("S");
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].extras.features, ["deprecated"]);
        assert!(s.get("gone").is_none());
        assert_eq!(s.omitted[0].name, "gone");
        assert_eq!(s.omitted[0].cond.to_string(), "all(YES, NO)");
        assert!(s.get("HERE").is_some());
        assert_eq!(s.symbols, ["NO", "YES"]);
        assert!(Schema::from_str("{ 'command': 'x', 'if': 'MAYBE' }", "t", &Profile::default()).is_err());
    }

    #[test]
    fn checks_references() {
        let p = Profile::default();
        assert!(Schema::from_str("{ 'struct': 'S', 'data': { 'a': 'Nope' } }", "t", &p).is_err());
        assert!(Schema::from_str("{ 'struct': 'S', 'base': 'int' }", "t", &p).is_err());
        assert!(Schema::from_str(
            "{ 'enum': 'K', 'data': ['a'] }\n{ 'union': 'U', 'base': { 'k': 'K' }, 'discriminator': 'k', \
             'data': { 'b': 'K' } }",
            "t",
            &p
        )
        .is_err());
        assert!(Schema::from_str("{ 'command': 'c', 'bogus': true }", "t", &p).is_err());
        assert!(Schema::from_str("{ 'command': 'c' }\n{ 'event': 'c' }", "t", &p).is_err());
    }
}
