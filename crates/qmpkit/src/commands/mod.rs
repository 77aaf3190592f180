//! Typed operations, grouped by domain. Each is a method on [`crate::Client`]
//! (and so on [`crate::monitor::Monitor`], which derefs to it).

pub mod block;
pub mod chardev;
pub mod cpu;
pub mod devices;
pub mod fds;
pub mod jobs;
pub mod memory;
pub mod migration;
pub mod misc;
pub mod nbd;
pub mod vm;
