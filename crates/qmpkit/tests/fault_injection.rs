//! A seeded mutation fuzz test: many short conversations with a hostile
//! server (`qmpkit_fake::hostile`) that corrupts, truncates, drops,
//! duplicates, reorders, delays and splits QEMU-shaped replies, and injects
//! garbage and malformed events. After each run it checks what the library
//! promises, whatever the server sent:
//!
//! - no panic, anywhere (a panic hook counts them, tasks included);
//! - every call ends by its deadline plus a margin;
//! - no caller gets another caller's reply;
//! - once the server behaves, every call succeeds again (or, if the server
//!   hung up, every call says the connection is closed);
//! - no file descriptor is left open, and memory goes back to where it was.
//!
//! The seed set is fixed, so a failure reproduces. `QMPKIT_FUZZ_RUNS=N` runs
//! N seeds instead of the default; `QMPKIT_FUZZ_SEED=S` starts from seed S.
//! This is the only test in this binary, so that counting `/proc/self/fd`
//! is not disturbed by other tests.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use qmpkit::{CallOptions, Client, ConnectOptions, Error};
use qmpkit_fake::hostile::{Faults, Hostile};
use qmpkit_fake::FakeServer;
use serde_json::Value;

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts the bytes allocated and not yet freed, so that the test can
/// check that memory goes back to where it started.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What may stay allocated after all runs: statics initialised once (the
/// default connection settings, tracing's registrations), not per run.
const MEMORY_SLACK: usize = 64 * 1024;

/// The budget of each call in the hostile phase.
const BUDGET: Duration = Duration::from_millis(250);
/// How late a call may end past its budget: the connection's timer and the
/// scheduler on a loaded two-core machine, with room to spare.
const MARGIN: Duration = Duration::from_secs(2);
/// Calls per run, and how many tasks make them.
const CALLS: usize = 48;
const TASKS: usize = 6;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// What each open descriptor is, for the message when one leaked.
fn describe_fds() -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| format!("{:?} -> {:?}", e.file_name(), std::fs::read_link(e.path()).ok()))
        .collect()
}

fn pipe_fd() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

/// One call in the hostile phase, checked against what the server did.
async fn hostile_call(
    client: &Client,
    name: String,
    with_fd: bool,
) -> (String, Result<Value, Error>, Duration) {
    let mut opts = CallOptions::new().timeout(BUDGET);
    if with_fd {
        opts = opts.fds([pipe_fd()]);
    }
    let started = Instant::now();
    let result = tokio::time::timeout(BUDGET + MARGIN, client.call_with::<_, Value>(&name, &(), opts))
        .await
        .unwrap_or_else(|_| panic!("{name}: the call did not end within its budget and the margin"));
    (name, result, started.elapsed())
}

async fn run(seed: u64) {
    let oob = seed % 2 == 0;
    let hostile = Hostile::new(seed, oob, Faults::moderate());
    let script = hostile.clone();
    let server = FakeServer::start(move |conn| script.clone().serve(conn))
        .await
        .unwrap();
    let client = ConnectOptions::new()
        .max_message_size(64 * 1024)
        .connect(server.path())
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: connect: {e}"));
    assert_eq!(client.oob_enabled(), oob);
    let mut events = client.events();

    // The hostile phase: calls from several tasks at once.
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in (t..CALLS).step_by(TASKS) {
                    let name = if i % 7 == 3 {
                        format!("err-{seed}-{i}")
                    } else {
                        format!("c-{seed}-{i}")
                    };
                    out.push(hostile_call(&client, name, i % 5 == 1).await);
                }
                out
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.extend(task.await.unwrap());
    }
    let report = hostile.report();
    // A tampered reply can take others with it (a reply swallowed by the
    // object a corrupt one left open is lost too), so transport errors are
    // expected in any run with tampering, and in no other.
    let tampering = !report.tampered.is_empty() || report.hung_up;
    for (name, result, _) in &results {
        let tampered = report.tampered.contains(name);
        match result {
            Ok(v) => {
                assert!(
                    !name.starts_with("err-") || tampered,
                    "seed {seed}: {name} succeeded: {v}"
                );
                // Its own reply, or a tampered one (whose id the server may
                // have changed to this caller's): never another caller's
                // intact reply.
                let from = v["name"].as_str().unwrap_or_default();
                assert!(
                    from == name || tampered || report.tampered.contains(from),
                    "seed {seed}: {name} got another caller's reply: {v}"
                );
            }
            Err(Error::Qmp(q)) => assert!(name.starts_with("err-") || tampered, "seed {seed}: {name}: {q}"),
            Err(Error::Disconnected { .. }) => assert!(report.hung_up, "seed {seed}: {name}: disconnected"),
            Err(
                Error::Timeout { .. }
                | Error::ReplyLost { .. }
                | Error::Decode { .. }
                | Error::MessageTooLarge { .. },
            ) => assert!(
                tampering,
                "seed {seed}: {name} failed in a run without tampering: {result:?}"
            ),
            Err(other) => panic!("seed {seed}: {name}: unexpected error {other:?}"),
        }
    }

    // The calm phase: the server behaves, and so must the connection.
    hostile.calm();
    if report.hung_up {
        let err = tokio::time::timeout(MARGIN, client.closed()).await;
        assert!(
            err.is_ok(),
            "seed {seed}: the server hung up but the client looks connected"
        );
        let after = client.call::<_, Value>("after", &()).await;
        assert!(
            matches!(after, Err(Error::Disconnected { .. })),
            "seed {seed}: {after:?}"
        );
    } else {
        for i in 0..4 {
            let name = format!("calm-{seed}-{i}");
            let mut opts = CallOptions::new().timeout(Duration::from_secs(5));
            if i == 1 {
                opts = opts.fds([pipe_fd()]);
            }
            let got: Value =
                tokio::time::timeout(Duration::from_secs(10), client.call_with(&name, &(), opts))
                    .await
                    .unwrap_or_else(|_| panic!("seed {seed}: {name} hung"))
                    .unwrap_or_else(|e| panic!("seed {seed}: {name} failed once the server behaved: {e}"));
            assert_eq!(got["name"], name.as_str(), "seed {seed}");
        }
        assert!(!client.is_closed(), "seed {seed}");
    }
    // Events kept coming through whatever happened (nothing to check but
    // that reading them does not hang or panic).
    while events.try_next().is_some() {}
    client.disconnect();
    let _ = tokio::time::timeout(MARGIN, client.closed()).await;
}

#[test]
fn hostile_servers_never_wedge_the_client() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let runs: u64 = std::env::var("QMPKIT_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96);
    let first: u64 = std::env::var("QMPKIT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // The heap is counted before the runtime exists: what it allocates
    // goes with it.
    let memory_before = LIVE_BYTES.load(Ordering::SeqCst);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Descriptors are counted once the runtime exists: it has its own, and
    // with tokio's signal feature (on in a workspace build) a process-wide
    // socket pair that lives as long as the process.
    let fds_before = open_fds();
    let described_before = describe_fds();
    rt.block_on(async {
        // A few runs at a time: they are mostly waiting.
        let seeds: Vec<u64> = (first..first + runs).collect();
        for batch in seeds.chunks(4) {
            let handles: Vec<_> = batch.iter().map(|&seed| tokio::spawn(run(seed))).collect();
            for (seed, h) in batch.iter().zip(handles) {
                if let Err(e) = h.await {
                    std::panic::resume_unwind(e.into_panic_or(seed));
                }
            }
        }
    });
    // Every socket and passed fd is closed once the runs are over.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds() != fds_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        open_fds(),
        fds_before,
        "file descriptors leaked: before {described_before:#?}, after {:#?}",
        describe_fds()
    );
    // Wait for the runtime's threads to end, so that everything its tasks
    // held is freed before the heap is counted.
    rt.shutdown_timeout(Duration::from_secs(10));
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
    let memory_after = LIVE_BYTES.load(Ordering::SeqCst);
    eprintln!("live heap: {memory_before} bytes before the runs, {memory_after} after");
    assert!(
        memory_after <= memory_before + MEMORY_SLACK,
        "memory not given back: {memory_before} bytes live before the runs, {memory_after} after"
    );
}

trait IntoPanic {
    fn into_panic_or(self, seed: &u64) -> Box<dyn std::any::Any + Send>;
}

impl IntoPanic for tokio::task::JoinError {
    fn into_panic_or(self, seed: &u64) -> Box<dyn std::any::Any + Send> {
        if self.is_panic() {
            self.into_panic()
        } else {
            Box::new(format!("seed {seed}: the run was cancelled"))
        }
    }
}
