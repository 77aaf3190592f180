//! QAPI names in Rust case.

/// Words that cannot name a field as they are.
const KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "dyn", "else", "enum", "extern", "false", "fn",
    "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return",
    "static", "struct", "trait", "true", "type", "unsafe", "use", "where", "while", "abstract", "become",
    "box", "do", "final", "gen", "macro", "override", "priv", "try", "typeof", "unsized", "virtual", "yield",
];

/// Keywords that not even `r#` makes an identifier.
const NOT_RAW: &[&str] = &["self", "Self", "super", "crate", "_"];

/// Type names that would shadow what the generated code (or its users'
/// `use ...::*`) relies on; such a QAPI type gets a `Qapi` prefix.
const RESERVED_TYPES: &[&str] = &[
    "String", "Vec", "Option", "Box", "Result", "Some", "None", "Ok", "Err", "Value", "Empty", "Command",
    "Event",
];

fn segments(name: &str) -> impl Iterator<Item = &str> {
    name.split(['-', '_', '.']).filter(|s| !s.is_empty())
}

/// `blockdev-add` → `BlockdevAdd`, `BLOCK_JOB_READY` → `BlockJobReady`,
/// `host_cdrom` → `HostCdrom`: each `-`/`_`/`.`-separated word capitalised,
/// its other letters lower case. A name that would start with a digit gets a
/// `V` in front (`QKeyCode` value `1` → `V1`).
pub fn camel(name: &str) -> String {
    let mut out = String::new();
    for seg in segments(name) {
        let mut chars = seg.chars();
        if let Some(c) = chars.next() {
            out.push(c.to_ascii_uppercase());
            out.extend(chars.map(|c| c.to_ascii_lowercase()));
        }
    }
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, 'V');
    }
    out
}

/// A QAPI type's Rust name: its own when it is already one identifier
/// (`BlockdevOptions`, `ACPIOSTInfo`), else camel-cased; `Qapi` in front of
/// Rust prelude names and the few the generated code itself uses (`Value`,
/// `Empty`, `Command`, `Event`).
pub fn type_name(name: &str) -> String {
    let ident =
        name.chars().all(|c| c.is_ascii_alphanumeric()) && name.starts_with(|c: char| c.is_ascii_uppercase());
    let base = if ident { name.to_owned() } else { camel(name) };
    if RESERVED_TYPES.contains(&base.as_str()) {
        format!("Qapi{base}")
    } else {
        base
    }
}

/// `node-name` → `node_name`, `cpuIndex` → `cpu_index`, `type` → `r#type`.
pub fn field(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if matches!(c, '-' | '.' | '_') {
            if !out.ends_with('_') {
                out.push('_');
            }
            continue;
        }
        if c.is_ascii_uppercase() && i > 0 {
            let prev = chars[i - 1];
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if (prev.is_ascii_lowercase()
                || prev.is_ascii_digit()
                || (prev.is_ascii_uppercase() && next_lower))
                && !out.ends_with('_')
            {
                out.push('_');
            }
        }
        out.push(c.to_ascii_lowercase());
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    if NOT_RAW.contains(&out.as_str()) {
        out.push('_');
    } else if KEYWORDS.contains(&out.as_str()) {
        out.insert_str(0, "r#");
    }
    out
}

/// A string as a Rust string literal.
pub fn lit(s: &str) -> String {
    format!("{s:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_case() {
        assert_eq!(camel("blockdev-add"), "BlockdevAdd");
        assert_eq!(camel("x-debug-query-block-graph"), "XDebugQueryBlockGraph");
        assert_eq!(camel("BLOCK_JOB_COMPLETED"), "BlockJobCompleted");
        assert_eq!(camel("host_cdrom"), "HostCdrom");
        assert_eq!(camel("nvme-io_uring"), "NvmeIoUring");
        assert_eq!(camel("1"), "V1");
        assert_eq!(camel("kp_0"), "Kp0");
        assert_eq!(type_name("BlockdevOptions"), "BlockdevOptions");
        assert_eq!(type_name("ACPIOSTInfo"), "ACPIOSTInfo");
        assert_eq!(type_name("String"), "QapiString");
        assert_eq!(type_name("q_obj_foo-arg"), "QObjFooArg");
        assert_eq!(field("node-name"), "node_name");
        assert_eq!(field("type"), "r#type");
        assert_eq!(field("in"), "r#in");
        assert_eq!(field("self"), "self_");
        assert_eq!(field("cpuIndex"), "cpu_index");
        assert_eq!(field("CPU"), "cpu");
        assert_eq!(field("x-perf"), "x_perf");
        assert_eq!(field("iops_rd"), "iops_rd");
        assert_eq!(field("VNCServerInfo"), "vnc_server_info");
    }
}
