//! Generates Rust types from QEMU's QAPI schema (`qapi/*.json`).
//!
//! [`parse`] reads the schema language, [`schema`] checks the definitions
//! and applies a build profile to their `'if'` conditions ([`cond`]), and
//! [`gen`] writes the Rust (how each construct maps is in its docs).

pub mod cond;
pub mod gen;
pub mod names;
pub mod parse;
pub mod schema;

#[cfg(test)]
mod tests;
