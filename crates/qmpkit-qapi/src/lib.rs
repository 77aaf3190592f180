//! Every command and event of QEMU 10's QMP as Rust types, generated from
//! QEMU's own QAPI schema (`qapi/*.json`) by `qapi-gen`.
//!
//! | module | what |
//! | --- | --- |
//! | [`commands`] | one struct per command: its arguments, implementing [`Command`] |
//! | [`events`] | one struct per event's data, and [`events::Event`]: any event, typed |
//! | [`types`] | QAPI's enums, structs, unions and alternates |
//! | [`meta`] | each definition's QEMU version, features and build condition, as data |
//!
//! ```
//! use qmpkit_qapi::{commands, types, Command};
//! use serde_json::json;
//!
//! // A command's arguments are a struct (or, for `'data': 'T'`, a newtype of T).
//! let resize = commands::BlockResize { device: None, node_name: Some("disk0".into()), size: 1 << 30 };
//! assert_eq!(commands::BlockResize::NAME, "block_resize");
//! assert_eq!(serde_json::to_value(&resize).unwrap(), json!({"node-name": "disk0", "size": 1073741824}));
//!
//! // A union is its common members with the branch chosen by the discriminator.
//! let add = commands::BlockdevAdd(types::BlockdevOptions {
//!     node_name: Some("null0".into()),
//!     ..types::BlockdevOptionsBranch::NullCo(types::BlockdevOptionsNull::default()).into()
//! });
//! assert_eq!(serde_json::to_value(&add).unwrap(), json!({"driver": "null-co", "node-name": "null0"}));
//!
//! // Events decode from their name and data.
//! let ev = qmpkit_qapi::events::Event::decode("STOP", &serde_json::Value::Null).unwrap();
//! assert_eq!(ev, qmpkit_qapi::events::Event::Stop);
//! ```
//!
//! # How QAPI maps to Rust
//!
//! - **Names.** Types keep QEMU's names (`BlockdevOptions`); commands and
//!   events are camel-cased (`blockdev-add` → `BlockdevAdd`, `BLOCK_JOB_READY`
//!   → `BlockJobReady`); members become snake_case fields renamed to QEMU's
//!   spelling (`node-name` → `node_name`; keywords are raw: `r#type`); enum
//!   values are camel-cased variants (`host_cdrom` → `HostCdrom`; a leading
//!   digit gets a `V`: `V1`). A QAPI type whose name is a Rust prelude name gets
//!   a `Qapi` prefix (`String` → `QapiString`).
//! - **Enums** are fieldless enums serialised as QEMU's strings; each has
//!   `as_str`, `FromStr` and `ALL`.
//! - **Optional members** are `Option<T>`, left out of the JSON when `None`.
//!   Where JSON `null` is a value of the member's type (`any`, or an
//!   alternate with a `null` branch), `Some(null)` is sent and kept as such.
//! - **Structs** carry their base's members first, as plain fields. Their
//!   `Deserialize` is generated rather than derived (same behaviour for JSON
//!   objects: unknown members ignored, absent optional members `None`; only
//!   objects are accepted), which halves the code the compiler checks.
//! - **Unions** (flat, with a discriminator) are a struct of the common
//!   members with the branch flattened in (`BlockdevOptions { node_name, ..,
//!   branch: BlockdevOptionsBranch::Qcow2(..) }`), or, when the discriminator
//!   is the only common member, directly the branch enum
//!   (`TransactionAction::BlockdevSnapshotSync(..)`). The branch enum is
//!   internally tagged by the discriminator; values without a branch type are
//!   unit variants.
//! - **Alternates** are untagged enums, one variant per branch (a `null`
//!   branch is a unit variant, serialised as `null`).
//! - **Commands** whose `'data'` names a type (boxed or not) are newtypes of
//!   that type; commands without arguments are unit structs. Those QEMU lets
//!   take more arguments than the schema lists (`device_add`) have an `extra`
//!   map. [`Command::Returns`] is the schema's `'returns'`, or [`Empty`].
//! - **`any`** is `serde_json::Value`; `size` and `uint64` are `u64`,
//!   `number` is `f64`.
//! - **Recursion**: a member whose type contains the owner again is boxed.
//! - **Features and versions**: `deprecated` items carry `#[deprecated]`;
//!   every item's `since`, features and condition are in its docs and in
//!   [`meta`].
//!
//! # Build conditions
//!
//! QEMU compiles parts of its schema only for some targets or configure
//! options (`'if': 'TARGET_S390X'`, `'if': 'CONFIG_VNC'`). This crate is
//! generated for **qemu-system-x86_64 as Debian builds it**: each condition
//! was decided for that build (its live `query-qmp-schema` is the truth), and
//! what it compiles out is left out here (listed in [`meta::OMITTED`]). What
//! is kept under a condition says so in its docs and in [`meta`].
//!
//! Enums are exhaustive as QEMU 10 has them: a value from a newer QEMU fails
//! to decode rather than being guessed at.

#![warn(missing_docs)]
// The generated code names QEMU's deprecated items itself (in derives and
// in `events::Event`); users still get the warnings for their own uses.
#![allow(deprecated)]
// QEMU's unions have branches of very different sizes; boxing them all
// would make every value clumsier to build for a few bytes.
#![allow(clippy::large_enum_variant)]

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub mod commands;
pub mod events;
pub mod meta;
pub mod types;

/// A QMP command with typed arguments and a typed reply.
///
/// The struct's fields are the command's arguments (serialised as a JSON
/// object; a unit struct or `()` means none). Every command of the schema
/// has one in [`commands`]; a command of your own can implement it too:
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize)]
/// struct QueryStatus;
///
/// #[derive(Deserialize)]
/// struct StatusInfo { status: String, running: bool }
///
/// impl qmpkit_qapi::Command for QueryStatus {
///     const NAME: &'static str = "query-status";
///     type Returns = StatusInfo;
/// }
/// ```
pub trait Command: Serialize {
    /// QEMU's name for the command.
    const NAME: &'static str;
    /// What a successful reply's `return` member decodes into ([`Empty`] for `{}`).
    type Returns: DeserializeOwned;
}

/// The data of one QMP event, decoded from its `data` member: every
/// event of [`events`] that carries data has one. [`events::Event`] is
/// the enum of them all.
///
/// ```
/// use qmpkit_qapi::{events::DeviceDeleted, EventData};
///
/// assert_eq!(DeviceDeleted::NAME, "DEVICE_DELETED");
/// let data: DeviceDeleted = serde_json::from_value(serde_json::json!({"path": "/machine/peripheral/nic0", "device": "nic0"})).unwrap();
/// assert_eq!(data.device.as_deref(), Some("nic0"));
/// ```
pub trait EventData: DeserializeOwned {
    /// QEMU's name for the event.
    const NAME: &'static str;
}

/// The `{}` that commands without a result return.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Empty {}

/// A string that is not a value of a QAPI enum (from its `FromStr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownValue {
    /// The enum's Rust name.
    pub type_name: &'static str,
    /// The string.
    pub value: String,
}

impl UnknownValue {
    /// `value` is not one of `type_name`'s.
    pub fn new(type_name: &'static str, value: &str) -> Self {
        UnknownValue {
            type_name,
            value: value.to_owned(),
        }
    }
}

impl std::fmt::Display for UnknownValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} is not a value of {}", self.value, self.type_name)
    }
}

impl std::error::Error for UnknownValue {}

/// Serialize and Deserialize for a generated enum, as its string (through
/// `as_str` and `FromStr`).
#[doc(hidden)]
#[macro_export]
macro_rules! qapi_enum {
    ($name:ident) => {
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::de::enum_value(d)
            }
        }
    };
}

/// Helpers the generated code calls.
#[doc(hidden)]
pub mod de {
    use std::marker::PhantomData;
    use std::str::FromStr;

    use serde::de::Visitor;
    use serde::{Deserialize, Deserializer};

    /// For optional members that can be JSON `null` (`any`, or an alternate
    /// with a `null` branch): an explicit `null` is `Some`, not an absent
    /// member (`None`).
    pub fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
        T::deserialize(d).map(Some)
    }

    /// A member name, borrowed from the input when it can be.
    pub enum Key<'de> {
        /// Borrowed.
        Borrowed(&'de str),
        /// Copied.
        Owned(String),
    }

    impl Key<'_> {
        /// The name.
        pub fn as_str(&self) -> &str {
            match self {
                Key::Borrowed(s) => s,
                Key::Owned(s) => s,
            }
        }
    }

    impl<'de> Deserialize<'de> for Key<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct K;
            impl<'de> Visitor<'de> for K {
                type Value = Key<'de>;

                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a member name")
                }

                fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                    Ok(Key::Borrowed(s))
                }

                fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                    Ok(Key::Owned(s.to_owned()))
                }

                fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Key<'de>, E> {
                    Ok(Key::Owned(s))
                }
            }
            d.deserialize_str(K)
        }
    }

    /// A generated enum from its string.
    pub fn enum_value<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr<Err = crate::UnknownValue>,
    {
        struct V<T>(PhantomData<T>);
        impl<T: FromStr<Err = crate::UnknownValue>> Visitor<'_> for V<T> {
            type Value = T;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V(PhantomData))
    }

    /// An event's data.
    pub fn data<'a, T: Deserialize<'a>>(data: &'a serde_json::Value) -> Result<T, serde_json::Error> {
        T::deserialize(data)
    }

    /// An event without data: its `data` is absent (`null`) or `{}`.
    pub fn no_data(data: &serde_json::Value) -> Result<(), serde_json::Error> {
        match data {
            serde_json::Value::Null => Ok(()),
            serde_json::Value::Object(m) if m.is_empty() => Ok(()),
            other => Err(serde::de::Error::custom(format_args!(
                "this event has no data, but got {other}"
            ))),
        }
    }
}
