//! Diagnostics through `tracing` when the `tracing` feature is on, and
//! nothing at all (not even the dependency) when it is off.
//!
//! The library logs only through these macros, which take `tracing`'s
//! syntax unchanged (`target:`, fields, `%`/`?` sigils, a format string).
//! Without the feature they expand to nothing, so their arguments are not
//! evaluated: nothing here may have a side effect the library needs.

// Which of them a build uses depends on its features (`error!` only the Monitor's).
#![allow(unused_macros, unused_imports)]

#[cfg(feature = "tracing")]
macro_rules! trace { ($($t:tt)*) => { ::tracing::trace!($($t)*) } }
#[cfg(feature = "tracing")]
macro_rules! debug { ($($t:tt)*) => { ::tracing::debug!($($t)*) } }
#[cfg(feature = "tracing")]
macro_rules! warning { ($($t:tt)*) => { ::tracing::warn!($($t)*) } }
#[cfg(feature = "tracing")]
macro_rules! error { ($($t:tt)*) => { ::tracing::error!($($t)*) } }
/// True when debug-level events of this crate would be recorded.
#[cfg(feature = "tracing")]
macro_rules! debug_enabled {
    () => {
        ::tracing::enabled!(::tracing::Level::DEBUG)
    };
}
/// True when the guest agent's trace-level events would be recorded.
#[cfg(feature = "tracing")]
macro_rules! agent_trace_enabled {
    () => { ::tracing::enabled!(target: "qmp::agent", ::tracing::Level::TRACE) };
}

#[cfg(not(feature = "tracing"))]
macro_rules! trace {
    ($($t:tt)*) => {
        ()
    };
}
#[cfg(not(feature = "tracing"))]
macro_rules! debug {
    ($($t:tt)*) => {
        ()
    };
}
#[cfg(not(feature = "tracing"))]
macro_rules! warning {
    ($($t:tt)*) => {
        ()
    };
}
#[cfg(not(feature = "tracing"))]
macro_rules! error {
    ($($t:tt)*) => {
        ()
    };
}
#[cfg(not(feature = "tracing"))]
macro_rules! debug_enabled {
    () => {
        false
    };
}
#[cfg(not(feature = "tracing"))]
macro_rules! agent_trace_enabled {
    () => {
        false
    };
}

pub(crate) use {agent_trace_enabled, debug, debug_enabled, error, trace, warning};

/// Runs `fut` inside a debug span naming the connection's address, when
/// tracing is on.
#[cfg(feature = "tracing")]
pub(crate) fn in_connect_span<F: std::future::Future>(
    address: &crate::Address,
    fut: F,
) -> impl std::future::Future<Output = F::Output> {
    use tracing::Instrument;
    fut.instrument(tracing::debug_span!("qmp_connect", %address))
}

/// Without tracing there is no span: the future runs as it is.
#[cfg(not(feature = "tracing"))]
pub(crate) fn in_connect_span<F: std::future::Future>(_address: &crate::Address, fut: F) -> F {
    fut
}
