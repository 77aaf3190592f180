//! Progress bars for long work, on stderr, shown only on a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar that draws itself only when stderr is a terminal and JSON
/// output was not asked for; otherwise every call does nothing.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar labelled `label`, counting bytes.
    pub fn bytes(label: &str, json: bool) -> Progress {
        let visible = !json && std::io::stderr().is_terminal();
        let target = if visible {
            ProgressDrawTarget::stderr_with_hz(10)
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(0), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_owned());
        if visible {
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        Progress { bar }
    }

    /// Sets the position and the total. The position never goes back: QEMU
    /// zeroes a migration's counters when it is cancelled, and the bar's last
    /// frame should show how far it got.
    pub fn set(&self, done: u64, total: u64) {
        if total > 0 {
            self.bar.set_length(total);
        }
        self.bar.set_position(done.max(self.bar.position()));
    }

    /// Sets the text after the bar (a state such as `active` or `ready`).
    pub fn message(&self, msg: &str) {
        self.bar.set_message(msg.to_owned());
    }

    /// Removes the bar from the screen.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_position_never_goes_back() {
        let p = Progress::bytes("migrate", true);
        p.set(10, 100);
        p.set(0, 100); // a cancelled migration's zeroed counters
        assert_eq!(p.bar.position(), 10);
        p.set(50, 200);
        assert_eq!((p.bar.position(), p.bar.length()), (50, Some(200)));
    }
}
