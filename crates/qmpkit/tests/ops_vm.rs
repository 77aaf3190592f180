//! The VM, CPU, memory, fd-passing and miscellaneous operations, each run
//! against a real QEMU and checked by asking QEMU back.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{eventually, vm, vm_with, within};
use qmpkit::commands::devices::{DeviceSpec, ObjectSpec};
use qmpkit::commands::misc::DumpFormat;
use qmpkit::commands::vm::{Actions, RebootAction, RunState, ShutdownAction, TransactionAction};
use qmpkit::{Error, ErrorClass, EventFilter, KnownEvent};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- vm.rs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_start_and_pause_follow_the_run_state() {
    let vm = vm().await;
    let c = vm.client();
    let mut events = c.subscribe(EventFilter::names(["RESUME", "STOP"]));
    within(20, async {
        assert_eq!(c.status().await.unwrap(), RunState::Prelaunch);
        c.start().await.unwrap();
        assert_eq!(events.next().await.unwrap().name(), "RESUME");
        assert_eq!(c.status().await.unwrap(), RunState::Running);
        c.pause().await.unwrap();
        assert_eq!(events.next().await.unwrap().name(), "STOP");
        assert_eq!(c.status().await.unwrap(), RunState::Paused);
        c.start().await.unwrap();
        assert_eq!(c.status().await.unwrap(), RunState::Running);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_and_powerdown_send_their_events() {
    let vm = vm().await;
    let c = vm.client();
    let mut events = c.subscribe(EventFilter::names(["RESET", "POWERDOWN"]));
    within(20, async {
        c.start().await.unwrap();
        c.reset().await.unwrap();
        let ev = events.next().await.unwrap();
        assert_eq!(
            ev.known(),
            KnownEvent::Reset {
                guest: false,
                reason: "host-qmp-system-reset".into()
            }
        );
        c.powerdown().await.unwrap();
        assert_eq!(events.next().await.unwrap().name(), "POWERDOWN");
        // Without a guest OS nobody answers the power button: QEMU runs on.
        assert_eq!(c.status().await.unwrap(), RunState::Running);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_action_turns_a_reset_into_a_paused_shutdown() {
    let vm = vm().await;
    let c = vm.client();
    let mut events = c.subscribe(EventFilter::names(["RESET", "SHUTDOWN"]));
    within(20, async {
        c.start().await.unwrap();
        c.set_action(&Actions {
            reboot: Some(RebootAction::Shutdown),
            shutdown: Some(ShutdownAction::Pause),
            ..Actions::default()
        })
        .await
        .unwrap();
        c.reset().await.unwrap();
        // A reset is now a shutdown, and the shutdown pauses instead of exiting.
        let ev = events.next().await.unwrap();
        assert_eq!(
            ev.known(),
            KnownEvent::Shutdown {
                guest: false,
                reason: "host-qmp-system-reset".into()
            }
        );
        eventually(10, || async {
            (c.status().await.unwrap() == RunState::Shutdown).then_some(())
        })
        .await;
        // An empty set of actions changes nothing and is accepted.
        c.set_action(&Actions::default()).await.unwrap();
        assert!(!c.is_closed());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_returns_ok_then_the_connection_closes_and_qemu_exits() {
    let mut vm = vm().await;
    let c = vm.client().clone();
    within(20, async {
        c.quit().await.unwrap();
        assert!(c.closed().await.is_disconnected());
        // A second quit has no QEMU to talk to.
        assert!(c.quit().await.unwrap_err().is_disconnected());
        assert!(c.status().await.unwrap_err().is_disconnected());
    })
    .await;
    let status = vm.wait_exit(Duration::from_secs(10)).await;
    assert!(status.expect("QEMU exits after quit").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_definition_names_the_machine_type_behind_the_alias() {
    let vm = vm().await; // started with `-machine q35`
    let c = vm.client();
    within(20, async {
        let name = c.machine_definition().await.unwrap();
        let machines: Vec<Value> = c.call("query-machines", &()).await.unwrap();
        let q35 = machines.iter().find(|m| m["alias"] == "q35").expect("q35 alias");
        assert_eq!(name, q35["name"].as_str().unwrap());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_transaction_applies_all_actions_or_none() {
    let vm = vm().await;
    let c = vm.client();
    within(20, async {
        c.call::<_, Value>(
            "blockdev-add",
            &json!({"driver": "null-co", "node-name": "n0", "size": 1 << 20}),
        )
        .await
        .unwrap();
        let bitmap = |name: &str| {
            TransactionAction::new("block-dirty-bitmap-add", json!({"node": "n0", "name": name})).unwrap()
        };
        let bitmaps = || async {
            let nodes: Vec<Value> = c.call("query-named-block-nodes", &()).await.unwrap();
            let node = nodes.iter().find(|n| n["node-name"] == "n0").unwrap();
            let mut names: Vec<String> = node["dirty-bitmaps"]
                .as_array()
                .map(|a| a.iter().map(|b| b["name"].as_str().unwrap().to_owned()).collect())
                .unwrap_or_default();
            names.sort();
            names
        };
        c.run_transaction(&[bitmap("a"), bitmap("b")]).await.unwrap();
        assert_eq!(bitmaps().await, ["a", "b"]);

        // The second action names a node that does not exist: neither applies.
        let bad =
            TransactionAction::new("block-dirty-bitmap-add", json!({"node": "nope", "name": "d"})).unwrap();
        let err = c.run_transaction(&[bitmap("c"), bad]).await.unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
        assert_eq!(bitmaps().await, ["a", "b"]);
    })
    .await;
}

/// The generated actions convert into [`TransactionAction`]s: bitmaps on
/// two nodes, all or none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_transaction_takes_the_generated_actions() {
    use qmpkit::qapi::types as t;
    let vm = vm().await;
    let c = vm.client();
    within(20, async {
        for node in ["n0", "n1"] {
            c.call::<_, Value>(
                "blockdev-add",
                &json!({"driver": "null-co", "node-name": node, "size": 1 << 20}),
            )
            .await
            .unwrap();
        }
        let bitmap = |node: &str, name: &str| -> TransactionAction {
            t::TransactionAction::BlockDirtyBitmapAdd(t::BlockDirtyBitmapAddWrapper {
                data: t::BlockDirtyBitmapAdd {
                    node: node.into(),
                    name: name.into(),
                    granularity: Some(1 << 16),
                    persistent: None,
                    disabled: Some(true),
                },
            })
            .into()
        };
        // Name, granularity and recording state of every bitmap of `node`.
        let bitmaps = |node: &'static str| async move {
            let nodes: Vec<Value> = c.call("query-named-block-nodes", &()).await.unwrap();
            let node = nodes.iter().find(|n| n["node-name"] == node).unwrap();
            let mut found: Vec<(String, u64, bool)> = node["dirty-bitmaps"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|b| {
                            (
                                b["name"].as_str().unwrap().to_owned(),
                                b["granularity"].as_u64().unwrap(),
                                b["recording"].as_bool().unwrap(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            found.sort();
            found
        };
        c.run_transaction(&[bitmap("n0", "a"), bitmap("n1", "a")])
            .await
            .unwrap();
        for node in ["n0", "n1"] {
            assert_eq!(bitmaps(node).await, [("a".to_owned(), 1 << 16, false)]);
        }

        // The second action names a node that does not exist: neither applies.
        let err = c
            .run_transaction(&[bitmap("n0", "b"), bitmap("nope", "b")])
            .await
            .unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
        assert_eq!(bitmaps("n0").await.len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_run_json_and_next_id_are_the_core_calls() {
    let vm = vm().await;
    let c = vm.client();
    within(20, async {
        // Run
        let st: Value = c.call("query-status", &()).await.unwrap();
        assert_eq!(st["status"], "prelaunch");
        // RunJSON
        let st = c
            .execute_json(r#"{"execute": "query-status", "id": "mine"}"#)
            .await
            .unwrap();
        assert_eq!(st["running"], false);
        assert!(matches!(
            c.execute_json("not json").await.unwrap_err(),
            Error::InvalidRequest(_)
        ));
        // IncreaseID
        let a = c.next_id();
        let b = c.next_id();
        assert!(b > a);
    })
    .await;
}

// ---------------------------------------------------------------- cpu.rs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_hotplug_fills_the_free_slot() {
    let vm = vm_with(|b| b.args(["-smp", "1,maxcpus=2"])).await;
    let c = vm.client();
    within(30, async {
        assert_eq!(c.query_cpus().await.unwrap().len(), 1);
        let slots = c.query_hotpluggable_cpus().await.unwrap();
        assert_eq!(slots.len(), 2);
        let free = slots.iter().find(|s| s.qom_path.is_none()).expect("a free slot");
        assert_eq!(free.vcpus_count, 1);

        c.add_device(&free.device("cpu1")).await.unwrap();

        let cpus = c.query_cpus().await.unwrap();
        assert_eq!(cpus.len(), 2);
        let new = cpus
            .iter()
            .find(|cpu| cpu.qom_path == "/machine/peripheral/cpu1")
            .expect("the hotplugged vCPU");
        assert_eq!(new.props, free.props);
        assert!(c
            .query_hotpluggable_cpus()
            .await
            .unwrap()
            .iter()
            .all(|s| s.qom_path.is_some()));

        // The same slot cannot take a second vCPU.
        let err = c.add_device(&free.device("cpu2")).await.unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
        assert_eq!(c.query_cpus().await.unwrap().len(), 2);

        // vCPU threads: one per vCPU, each a thread of the QEMU process.
        let tids = c.vcpu_thread_ids().await.unwrap();
        assert_eq!(tids.len(), 2);
        assert_ne!(tids[0], tids[1]);
        for tid in tids {
            let task = format!("/proc/{}/task/{tid}", vm.pid());
            assert!(std::path::Path::new(&task).exists(), "{task}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_model_expands_and_unknown_models_are_not_found() {
    let vm = vm().await;
    let c = vm.client();
    within(20, async {
        let model = c.query_cpu_model("qemu64").await.unwrap();
        assert_eq!(model.name, "qemu64");
        // qemu64 has long mode and cmov, and no AVX-512.
        assert_eq!(model.props["lm"], true);
        assert_eq!(model.props["cmov"], true);
        assert_eq!(model.props["avx512f"], false);

        let err = c.query_cpu_model("no-such-cpu").await.unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
    })
    .await;
}

// ---------------------------------------------------------------- memory.rs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balloon_reports_its_size_and_checks_the_target() {
    let vm = vm_with(|b| b.args(["-device", "virtio-balloon-pci,id=balloon0"])).await;
    let c = vm.client();
    within(20, async {
        let ram = c.memory_size_bytes().await.unwrap();
        assert_eq!(ram, 128 * MIB);
        // The balloon is empty: the guest has all of its memory.
        assert_eq!(c.memory_balloon_size_bytes().await.unwrap(), ram as i64);

        c.set_memory_balloon_size_bytes(64 * MIB as i64).await.unwrap();
        // Without a guest balloon driver nothing inflates: QEMU still
        // reports the full size.
        assert_eq!(c.memory_balloon_size_bytes().await.unwrap(), ram as i64);

        let err = c.set_memory_balloon_size_bytes(0).await.unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
    })
    .await;

    let plain = common::vm().await;
    let c = plain.client();
    within(20, async {
        let err = c.memory_balloon_size_bytes().await.unwrap_err();
        assert_eq!(err.class(), Some(&ErrorClass::DeviceNotActive), "{err:?}");
        let err = c
            .set_memory_balloon_size_bytes(64 * MIB as i64)
            .await
            .unwrap_err();
        assert_eq!(err.class(), Some(&ErrorClass::DeviceNotActive), "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimm_hotplug_shows_in_memdev_and_dimm_devices() {
    let vm = vm_with(|b| b.memory("128M,slots=2,maxmem=1G")).await;
    let c = vm.client();
    within(30, async {
        let config = c.memory_configuration().await.unwrap();
        assert_eq!(
            (config.current, config.max, config.slots),
            (128 * MIB, 1024 * MIB, 2)
        );
        let backends: Vec<String> = c.memdev().await.unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(backends, ["pc.ram"]);
        assert!(c.dimm_devices().await.unwrap().is_empty());

        c.add_object(&ObjectSpec::new("memory-backend-ram", "mem1").prop("size", 256 * MIB))
            .await
            .unwrap();
        c.add_device(&DeviceSpec::new("pc-dimm").id("dimm1").prop("memdev", "mem1"))
            .await
            .unwrap();

        let dimms = c.dimm_devices().await.unwrap();
        assert_eq!(dimms.len(), 1);
        let d = &dimms[0];
        assert_eq!(
            (d.id.as_str(), d.memdev.as_str(), d.size),
            ("dimm1", "/objects/mem1", 256 * MIB)
        );
        assert!(d.hotplugged && d.hotpluggable);
        assert!(
            d.addr >= 4 << 30,
            "hotplugged memory sits above 4 GiB: {:#x}",
            d.addr
        );
        let devices = c.memory_devices().await.unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].kind, "dimm");

        let mem1 = c
            .memdev()
            .await
            .unwrap()
            .into_iter()
            .find(|m| m.id == "mem1")
            .expect("mem1");
        assert_eq!(mem1.size, 256 * MIB);
        // The base memory is unchanged; the DIMM is plugged memory.
        assert_eq!(c.memory_size_bytes().await.unwrap(), 128 * MIB);

        // The backend is in use by the DIMM.
        let err = c.remove_object("mem1").await.unwrap_err();
        assert!(err.is_in_use(), "{err:?}");
        assert!(c.memdev().await.unwrap().iter().any(|m| m.id == "mem1"));
        // And a DIMM over a missing backend is refused.
        let err = c
            .add_device(&DeviceSpec::new("pc-dimm").id("dimm2").prop("memdev", "nope"))
            .await
            .unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
        assert_eq!(c.dimm_devices().await.unwrap().len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_configuration_without_maxmem_has_no_slots() {
    let vm = vm_with(|b| b.memory("192M")).await;
    let c = vm.client();
    within(20, async {
        let config = c.memory_configuration().await.unwrap();
        assert_eq!(
            (config.current, config.max, config.slots),
            (192 * MIB, 192 * MIB, 0)
        );
        assert_eq!(c.memory_size_bytes().await.unwrap(), 192 * MIB);
    })
    .await;
}

// ---------------------------------------------------------------- fds.rs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fdset_files_show_their_names_and_removal_clears_them() {
    let vm = vm().await;
    let c = vm.client();
    let path = vm.dir().join("disk.img");
    std::fs::write(&path, b"data").unwrap();
    within(20, async {
        let ro = c
            .send_file_with_fdset("disk0", std::fs::File::open(&path).unwrap(), true)
            .await
            .unwrap();
        let rw_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let rw = c.send_file_with_fdset("disk1", rw_file, false).await.unwrap();
        assert_ne!(ro.fdset_id, rw.fdset_id);

        let sets = c.query_fdsets().await.unwrap();
        let opaque_of = |info: qmpkit::commands::fds::AddFdInfo| {
            let set = sets.iter().find(|s| s.fdset_id == info.fdset_id).expect("fd set");
            let fd = set.fds.iter().find(|f| f.fd == info.fd).expect("fd");
            fd.opaque.clone().unwrap()
        };
        assert_eq!(opaque_of(ro), "rdonly:disk0");
        assert_eq!(opaque_of(rw), "rdwr:disk1");

        c.remove_fd_from_fdset("disk0").await.unwrap();
        let sets = c.query_fdsets().await.unwrap();
        let names: Vec<&str> = sets
            .iter()
            .flat_map(|s| &s.fds)
            .filter_map(|f| f.name())
            .collect();
        assert_eq!(names, ["disk1"]);

        let err = c.remove_fd_from_fdset("disk0").await.unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        assert_eq!(c.query_fdsets().await.unwrap().len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_fds_can_be_closed_once() {
    let vm = vm().await;
    let c = vm.client();
    within(20, async {
        let (ours, theirs) = UnixStream::pair().unwrap();
        c.send_file("f1", theirs).await.unwrap();
        c.close_file("f1").await.unwrap();
        // QEMU really held the only other end, and closed it.
        let mut ours = ours;
        let read = tokio::task::spawn_blocking(move || ours.read(&mut [0u8; 8]).unwrap());
        assert_eq!(read.await.unwrap(), 0);

        let err = c.close_file("f1").await.unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        // QEMU refuses fd names that start with a digit.
        let (_a, b) = UnixStream::pair().unwrap();
        let err = c.send_file("1bad", b).await.unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
    })
    .await;
}

/// 200 sends of one socket, then `closefd`: if the client kept any copy of
/// the fds it sent, the other end of the socket would never see EOF.
/// (Counting `/proc/self/fd` would be disturbed by the other tests of this
/// binary, which run in parallel; EOF is exact.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_file_leaks_no_descriptors() {
    let vm = vm().await;
    let c = vm.client();
    let (mut reader, writer) = UnixStream::pair().unwrap();
    within(60, async {
        for _ in 0..200 {
            // Each getfd under the same name replaces (and closes) the last.
            c.send_file("leak", writer.try_clone().unwrap()).await.unwrap();
        }
        drop(writer);
        c.close_file("leak").await.unwrap();
        let n = tokio::task::spawn_blocking(move || reader.read(&mut [0u8; 8]).unwrap());
        assert_eq!(n.await.unwrap(), 0, "every copy of the socket is closed");
    })
    .await;
}

// ---------------------------------------------------------------- misc.rs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screendump_writes_a_png() {
    let vm = vm_with(|b| b.args(["-device", "VGA"])).await;
    let c = vm.client();
    let path = vm.dir().join("screen.png");
    within(30, async {
        c.screendump(&path).await.unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{:?}",
            &bytes[..8.min(bytes.len())]
        );
        assert_eq!(&bytes[12..16], b"IHDR");

        let err = c.screendump(vm.dir().join("no/such/dir.png")).await.unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
    })
    .await;

    // Without a display device there is nothing to dump.
    let headless = common::vm().await;
    let path = headless.dir().join("screen.png");
    within(20, async {
        let err = headless.client().screendump(&path).await.unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
    })
    .await;
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_guest_memory_covers_the_ram() {
    let vm = vm().await;
    let c = vm.client();
    let elf = vm.dir().join("mem.elf");
    let kdump = vm.dir().join("mem.kdump");
    within(60, async {
        c.dump_guest_memory(&elf, DumpFormat::Elf).await.unwrap();
        let meta = std::fs::metadata(&elf).unwrap();
        assert!(meta.len() >= c.memory_size_bytes().await.unwrap());
        let mut magic = [0u8; 4];
        std::fs::File::open(&elf).unwrap().read_exact(&mut magic).unwrap();
        assert_eq!(&magic, b"\x7fELF");

        c.dump_guest_memory(&kdump, DumpFormat::KdumpZlib).await.unwrap();
        assert!(std::fs::metadata(&kdump).unwrap().len() > 0);

        let err = c
            .dump_guest_memory(vm.dir().join("no/such/dir"), DumpFormat::Elf)
            .await
            .unwrap_err();
        assert!(err.is_qmp(), "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_type_checks_agree_with_qemus_type_list() {
    let vm = vm().await;
    let c = vm.client();
    within(20, async {
        let types: Vec<Value> = c
            .call(
                "qom-list-types",
                &json!({"implements": "device", "abstract": false}),
            )
            .await
            .unwrap();
        let has = |t: &str| types.iter().any(|x| x["name"] == t);

        assert_eq!(c.query_9p_device().await.is_ok(), has("virtio-9p-pci"));
        assert_eq!(
            c.query_virtio_sound_device().await.is_ok(),
            has("virtio-sound-pci")
        );
        c.query_device_type("virtio-net-pci").await.unwrap();
        let err = c.query_device_type("no-such-device").await.unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spice_is_reported_off_and_sev_is_a_typed_answer() {
    let vm = vm().await;
    let c = vm.client();
    within(20, async {
        // No `-spice` on the command line: no SPICE server runs.
        match c.query_spice().await {
            Ok(info) => assert!(!info.enabled),
            // A QEMU built without SPICE has no such command.
            Err(e) => assert!(e.is_not_found(), "{e:?}"),
        }
        // Without a SEV-capable host and KVM, QEMU refuses with its own error.
        let kvm: Value = c.call("query-kvm", &()).await.unwrap();
        let sev_host = std::fs::read_to_string("/sys/module/kvm_amd/parameters/sev")
            .is_ok_and(|s| matches!(s.trim(), "1" | "Y"));
        match c.sev_capabilities().await {
            Ok(caps) => {
                assert!(sev_host && kvm["enabled"] == true);
                assert!(caps.cbit_pos > 0 && !caps.pdh.is_empty());
            }
            Err(e) => {
                assert!(matches!(e, Error::Qmp(_)), "{e:?}");
                assert!(!(sev_host && kvm["enabled"] == true), "{e:?}");
            }
        }
    })
    .await;
}
