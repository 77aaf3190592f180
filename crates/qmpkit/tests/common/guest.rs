//! The test guest shared by the real-guest tests (guest.rs, guest_agent.rs):
//! its image and its serial console.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::within;

/// The guest's kernel command line: output on the serial port, kernel
/// messages only when they matter.
pub const APPEND: &str = "console=ttyS0 quiet";
/// What the guest prints on its console once it takes commands.
pub const READY: &str = "QMPKIT-GUEST-READY";
/// How long a boot may take: TCG on a busy two-core machine can take 30 s.
pub const BOOT_SECS: u64 = 180;
/// How long anything else the guest does may take.
pub const GUEST_SECS: u64 = 60;

// ------------------------------------------------------------ the guest image

pub struct GuestImage {
    /// The kernel (an uncompressed vmlinux).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// The kernel and initramfs: `QMPKIT_GUEST_KERNEL` and `QMPKIT_GUEST_INITRD`
/// when both are set, else what `scripts/build-guest-image` prints (it
/// builds the image once and is quick when its cache is warm). Built once per
/// test process; the script itself serialises concurrent builds.
pub fn guest_image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        if let (Some(kernel), Some(initrd)) = (
            std::env::var_os("QMPKIT_GUEST_KERNEL"),
            std::env::var_os("QMPKIT_GUEST_INITRD"),
        ) {
            return GuestImage {
                kernel: kernel.into(),
                initrd: initrd.into(),
            };
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-guest-image");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed (see the README's Tests section for what it needs):\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = |key: &str| -> PathBuf {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("build-guest-image printed no {key}:\n{stdout}"))
                .into()
        };
        GuestImage {
            kernel: path("QMPKIT_GUEST_KERNEL"),
            initrd: path("QMPKIT_GUEST_INITRD"),
        }
    })
}

// ------------------------------------------------------------ the console

/// The guest's serial console: lines it printed, and commands typed into it.
///
/// A task of its own reads the console all the time, not only when a test
/// waits for a line: QEMU writes the guest's serial output to the socket a
/// byte at a time, a few hundred unread bytes fill a Unix socket, and from
/// then on every byte the guest prints waits for the UART (a kernel panic's
/// report alone then takes half a minute).
pub struct Console {
    lines: mpsc::UnboundedReceiver<String>,
    writer: OwnedWriteHalf,
    /// Every line taken so far, for failure messages.
    transcript: String,
}

impl Console {
    pub async fn connect(path: &Path) -> Console {
        let stream = within(10, UnixStream::connect(path))
            .await
            .expect("connect to the guest's console");
        let (reader, writer) = stream.into_split();
        let (tx, lines) = mpsc::unbounded_channel();
        // Ends when QEMU closes the socket (or the test, the receiver).
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&raw).replace('\r', "");
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Console {
            lines,
            writer,
            transcript: String::new(),
        }
    }

    /// The last part of the transcript, for a failure message.
    pub fn tail(&self) -> &str {
        let mut start = self.transcript.len().saturating_sub(3000);
        while !self.transcript.is_char_boundary(start) {
            start += 1;
        }
        &self.transcript[start..]
    }

    /// The next line the guest prints that contains `needle`, passing over
    /// others (kernel messages, earlier answers).
    pub async fn line_with(&mut self, needle: &str, secs: u64) -> String {
        let found = tokio::time::timeout(Duration::from_secs(secs), async {
            loop {
                let line = self.lines.recv().await?; // None: QEMU is gone.
                self.transcript.push_str(&line);
                if line.contains(needle) {
                    return Some(line.trim().to_owned());
                }
            }
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => panic!("the console closed before {needle:?}; it said:\n{}", self.tail()),
            Err(_) => panic!(
                "no {needle:?} on the console within {secs} s; it said:\n{}",
                self.tail()
            ),
        }
    }

    /// Adds the lines read so far to the transcript (for a failure message).
    pub fn take_what_is_there(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.transcript.push_str(&line);
        }
    }

    /// Types one line on the console.
    pub async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to the console");
    }

    /// Runs a command and returns its answer: what follows `@NAME` on the
    /// guest's answer line.
    pub async fn ask(&mut self, command: &str) -> String {
        self.send(command).await;
        let name = command.split_whitespace().next().unwrap_or_default();
        let tag = format!("@{name}");
        let line = self.line_with(&tag, GUEST_SECS).await;
        let answer = &line[line.find(&tag).unwrap() + tag.len()..];
        answer.trim().to_owned()
    }

    /// Runs a command until its answer satisfies `done` (the guest reacts to
    /// a hotplug in its own time), and returns that answer.
    pub async fn ask_until(&mut self, command: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(GUEST_SECS);
        loop {
            let answer = self.ask(command).await;
            if done(&answer) {
                return answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "`{command}` still answers {answer:?} after {GUEST_SECS} s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
