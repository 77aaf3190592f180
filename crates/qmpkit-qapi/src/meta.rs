//! The schema's facts as data: each command's, event's and type's QEMU
//! version, feature flags and build condition; the same for members and enum
//! values that have their own; and what this build compiles out.
//!
//! ```
//! use qmpkit_qapi::meta;
//!
//! let add = meta::command("blockdev-add").unwrap();
//! assert_eq!(add.rust, "BlockdevAdd");
//! assert!(meta::command("query-status").unwrap().since.is_some());
//! ```

mod tables;

pub use tables::{BUILD, COMMANDS, EVENTS, MEMBERS, OMITTED, QEMU_VERSION, TYPES};

/// What the generated types accept, as JSON: for each definition (by QEMU's
/// name) its kind and members (with optionality and type), a union's tag and
/// branches, an alternate's branch types, a command's arguments and return
/// type, an event's data. Much like `query-qmp-schema`, but with QEMU's type
/// names: the tests check the generated code against a live QEMU with it.
pub const SHAPE: &str = include_str!("../shape.json");

/// A command, event or type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// QEMU's name.
    pub name: &'static str,
    /// The Rust type's name (in [`crate::commands`], [`crate::events`] or [`crate::types`]).
    pub rust: &'static str,
    /// The schema file (QEMU's module) that defines it, without `.json`.
    pub module: &'static str,
    /// The QEMU version that added it, when its docs say.
    pub since: Option<&'static str>,
    /// Its feature flags (`deprecated`, `unstable`, ...).
    pub features: &'static [&'static str],
    /// The condition QEMU compiles it under, if any (it holds for [`BUILD`]).
    pub condition: Option<&'static str>,
}

impl Item {
    /// True when QEMU deprecates it.
    pub fn deprecated(&self) -> bool {
        self.features.contains(&"deprecated")
    }

    /// True when QEMU calls it unstable.
    pub fn unstable(&self) -> bool {
        self.features.contains(&"unstable")
    }
}

/// A member or enum value with a version, features or a condition of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberInfo {
    /// The type, command or event it belongs to (QEMU's name).
    pub owner: &'static str,
    /// The member's or value's name.
    pub name: &'static str,
    /// The QEMU version that added it, when the docs say.
    pub since: Option<&'static str>,
    /// Its feature flags.
    pub features: &'static [&'static str],
    /// The condition QEMU compiles it under, if any.
    pub condition: Option<&'static str>,
}

/// A definition this build does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Omitted {
    /// `command`, `event`, `struct`, `union`, `enum` or `alternate`.
    pub kind: &'static str,
    /// QEMU's name.
    pub name: &'static str,
    /// The condition that does not hold.
    pub condition: &'static str,
}

fn find(table: &'static [Item], name: &str) -> Option<&'static Item> {
    table
        .binary_search_by(|i| i.name.cmp(name))
        .ok()
        .map(|i| &table[i])
}

/// The command named `name`.
pub fn command(name: &str) -> Option<&'static Item> {
    find(COMMANDS, name)
}

/// The event named `name`.
pub fn event(name: &str) -> Option<&'static Item> {
    find(EVENTS, name)
}

/// The type named `name` (QEMU's name).
pub fn type_(name: &str) -> Option<&'static Item> {
    find(TYPES, name)
}

/// The member or value `name` of `owner`, if it has facts of its own.
pub fn member(owner: &str, name: &str) -> Option<&'static MemberInfo> {
    MEMBERS
        .binary_search_by(|m| (m.owner, m.name).cmp(&(owner, name)))
        .ok()
        .map(|i| &MEMBERS[i])
}
