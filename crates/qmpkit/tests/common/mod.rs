//! Shared helpers for tests that run a real QEMU.
#![allow(dead_code)]

pub mod event_audit;
pub mod guest;

use std::future::Future;
use std::time::Duration;

use std::path::PathBuf;

use qmpkit::launch::{Qemu, QemuBuilder};
use qmpkit::ConnectOptions;

/// A throwaway QEMU with the defaults (q35, 128M, paused, no devices).
pub async fn vm() -> Vm {
    vm_with(|b| b).await
}

/// A throwaway QEMU with the builder adjusted by `f`.
///
/// Every event QEMU sends it is audited when the test ends (see
/// [`event_audit`]), unless `f` sets connect options of its own.
pub async fn vm_with(f: impl FnOnce(QemuBuilder) -> QemuBuilder) -> Vm {
    let log = event_audit::log_path();
    let builder = f(QemuBuilder::new().connect_options(ConnectOptions::new().traffic_log(&log)));
    match builder.spawn().await {
        Ok(qemu) => Vm { qemu, log },
        Err(e) => panic!("cannot launch QEMU: {e}"),
    }
}

/// A QEMU of [`vm_with`]: used as the launcher's [`Qemu`], and on drop
/// checks that every event it sent decodes into its generated type and
/// back without loss.
pub struct Vm {
    qemu: Qemu,
    log: PathBuf,
}

impl Vm {
    /// The client's traffic log: every request sent, reply and event.
    pub fn traffic_log(&self) -> &std::path::Path {
        &self.log
    }
}

impl std::ops::Deref for Vm {
    type Target = Qemu;
    fn deref(&self) -> &Qemu {
        &self.qemu
    }
}

impl std::ops::DerefMut for Vm {
    fn deref_mut(&mut self) -> &mut Qemu {
        &mut self.qemu
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        // A failing test has said what matters; a second panic would abort.
        if !std::thread::panicking() {
            event_audit::check(&log);
        }
    }
}

/// Runs `fut`, failing the test if it takes longer than `secs` seconds
/// (a hang is a failure, never a stuck CI run).
pub async fn within<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {secs} s"))
}

/// Polls `check` until it returns `Some`, up to `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates a qcow2 (or raw) image with qemu-img.
pub fn qemu_img_create(path: &std::path::Path, format: &str, size: &str, backing: Option<&std::path::Path>) {
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", format]);
    if let Some(b) = backing {
        cmd.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    cmd.arg(path).arg(size);
    let out = cmd.output().expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
