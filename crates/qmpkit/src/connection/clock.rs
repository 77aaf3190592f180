//! The clock that commands' deadlines are kept on.
//!
//! A deadline is a reading of the monotonic clock in whole nanoseconds: one
//! read of the clock per batch of requests, one addition per request, and
//! integer comparisons after that. With std's `Instant` the same work cost
//! about a hundred instructions more per command (the checked conversions of
//! a `timespec`, then a subtraction from an epoch to fit the call's atomic),
//! a visible share of a command at depth 1. tokio's timers take their own
//! `Instant`; a deadline is converted only when the connection's one timer
//! is moved, which a busy connection seldom does.

use std::time::Duration;

/// A moment on the monotonic clock, in nanoseconds. `u64::MAX` is never a
/// tick: a call stores it to mean "no deadline".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Tick(u64);

impl Tick {
    /// Now.
    pub(crate) fn now() -> Tick {
        // Through the C library, as std's `Instant` reads it (the vDSO). Not
        // rustix's own vDSO lookup: its first call probes memory in a way
        // valgrind cannot follow, which crashed programs run under valgrind.
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `t` is a valid, writable timespec for the call's duration;
        // CLOCK_MONOTONIC exists on every Linux, so the call cannot fail.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
        // The monotonic clock starts near zero at boot: neither part is
        // negative, and u64 nanoseconds last for centuries.
        Tick(
            (t.tv_sec as u64)
                .wrapping_mul(1_000_000_000)
                .wrapping_add(t.tv_nsec as u64),
        )
    }

    /// `self` plus `d`, or `None` when that cannot be represented (a budget
    /// of centuries: such a command never times out).
    pub(crate) fn after(self, d: Duration) -> Option<Tick> {
        let nanos = u64::try_from(d.as_nanos()).ok()?;
        self.0.checked_add(nanos).filter(|&t| t != u64::MAX).map(Tick)
    }

    /// The tick as stored in an atomic; see [`Tick::from_nanos`].
    pub(crate) fn nanos(self) -> u64 {
        self.0
    }

    /// A tick stored with [`Tick::nanos`]; `None` for `u64::MAX`.
    pub(crate) fn from_nanos(nanos: u64) -> Option<Tick> {
        (nanos != u64::MAX).then_some(Tick(nanos))
    }

    /// The same moment on tokio's clock, for a timer (measured from now on
    /// both clocks, so it holds whatever tokio's clock is based on).
    pub(crate) fn to_tokio(self) -> tokio::time::Instant {
        let (now, tokio_now) = (Tick::now(), tokio::time::Instant::now());
        tokio_now + Duration::from_nanos(self.0.saturating_sub(now.0))
    }
}

#[cfg(test)]
impl std::ops::AddAssign<Duration> for Tick {
    /// For tests that move time forward.
    fn add_assign(&mut self, d: Duration) {
        *self = self.after(d).expect("a tick within range");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_follow_the_monotonic_clock() {
        let std_before = std::time::Instant::now();
        let a = Tick::now();
        std::thread::sleep(Duration::from_millis(20));
        let b = Tick::now();
        let std_after = std::time::Instant::now();
        assert!(b > a);
        let elapsed = Duration::from_nanos(b.nanos() - a.nanos());
        assert!(elapsed >= Duration::from_millis(20), "{elapsed:?}");
        assert!(elapsed <= std_after - std_before, "{elapsed:?}");
    }

    #[test]
    fn additions_that_do_not_fit_give_none() {
        let t = Tick::now();
        assert_eq!(
            t.after(Duration::from_secs(2)).unwrap().nanos(),
            t.nanos() + 2_000_000_000
        );
        assert_eq!(t.after(Duration::MAX), None);
        assert_eq!(
            Tick(u64::MAX - 10).after(Duration::from_nanos(10)),
            None,
            "u64::MAX means none"
        );
        assert_eq!(
            Tick(u64::MAX - 10).after(Duration::from_nanos(9)),
            Some(Tick(u64::MAX - 1))
        );
        assert_eq!(Tick::from_nanos(u64::MAX), None);
        assert_eq!(Tick::from_nanos(t.nanos()), Some(t));
    }

    #[tokio::test]
    async fn a_tick_converts_to_the_same_moment_on_tokios_clock() {
        let now = tokio::time::Instant::now();
        let in_a_minute = Tick::now().after(Duration::from_secs(60)).unwrap().to_tokio();
        let d = in_a_minute - now;
        assert!(
            d >= Duration::from_secs(59) && d <= Duration::from_secs(61),
            "{d:?}"
        );
        // A moment already past converts to now, not to an underflow.
        let past = Tick(Tick::now().nanos() - 1_000_000).to_tokio();
        assert!(past <= tokio::time::Instant::now());
    }
}
