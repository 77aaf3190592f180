//! The generated types' JSON, for the constructs whose serde attributes
//! interact: flattened unions, unit branches, nullable optional members,
//! extra arguments, events with and without data.

use qmpkit_qapi::events::Event;
use qmpkit_qapi::{commands as c, types as t, Command};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// `value` decodes into `T` and encodes back to the same JSON.
fn round_trip<T: Serialize + DeserializeOwned + std::fmt::Debug + PartialEq>(value: Value) -> T {
    let typed: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{value}: {e}"));
    assert_eq!(serde_json::to_value(&typed).unwrap(), value);
    typed
}

#[test]
fn a_union_with_common_members_and_a_unit_branch() {
    let o: t::ObjectOptions = round_trip(json!({"qom-type": "can-bus", "id": "can0"}));
    assert_eq!(o.branch, t::ObjectOptionsBranch::CanBus);
    let o: t::ObjectOptions = round_trip(json!({"qom-type": "iothread", "id": "io0", "poll-max-ns": 0}));
    match o.branch {
        t::ObjectOptionsBranch::Iothread(p) => assert_eq!(p.poll_max_ns, Some(0)),
        other => panic!("{other:?}"),
    }
    // A discriminator value QEMU does not have is refused.
    assert!(serde_json::from_value::<t::ObjectOptions>(json!({"qom-type": "nope", "id": "x"})).is_err());
}

#[test]
fn a_union_nested_through_an_alternate() {
    let add: c::BlockdevAdd = round_trip(json!({
        "driver": "qcow2", "node-name": "disk0", "read-only": true,
        "file": {"driver": "file", "filename": "/tmp/x.qcow2"},
        "backing": null
    }));
    let t::BlockdevOptionsBranch::Qcow2(q) = &add.0.branch else {
        panic!("{add:?}")
    };
    assert!(matches!(&q.file, t::BlockdevRef::Definition(_)));
    // `backing: null` is the alternate's null branch, not an absent member.
    assert_eq!(q.backing, Some(t::BlockdevRefOrNull::Null));
    let by_name: c::BlockdevAdd = round_trip(json!({"driver": "raw", "file": "proto0"}));
    let t::BlockdevOptionsBranch::Raw(r) = &by_name.0.branch else {
        panic!()
    };
    assert_eq!(r.file, t::BlockdevRef::Reference("proto0".into()));
}

#[test]
fn str_or_null_and_any() {
    let p: t::MigrateSetParameters = round_trip(json!({"tls-creds": null, "tls-hostname": "h"}));
    assert_eq!(p.tls_creds, Some(t::StrOrNull::N));
    assert_eq!(p.tls_hostname, Some(t::StrOrNull::S("h".into())));
    let absent: t::MigrateSetParameters = round_trip(json!({}));
    assert_eq!(absent.tls_creds, None);
    let set: c::QomSet = round_trip(json!({"path": "/x", "property": "p", "value": {"a": [1, "b"]}}));
    assert_eq!(set.value, json!({"a": [1, "b"]}));
}

#[test]
fn commands_without_arguments_and_with_extra_ones() {
    assert_eq!(serde_json::to_value(c::QueryStatus).unwrap(), Value::Null);
    assert_eq!(c::QueryStatus::NAME, "query-status");
    let add: c::DeviceAdd =
        round_trip(json!({"driver": "virtio-blk-pci", "id": "d0", "drive": "n0", "bootindex": 1}));
    assert_eq!(add.extra.get("bootindex"), Some(&json!(1)));
    assert_eq!(add.bus, None);
}

#[test]
fn enums_are_strings_both_ways() {
    assert_eq!(
        serde_json::to_value(t::RunState::Prelaunch).unwrap(),
        json!("prelaunch")
    );
    assert_eq!(
        "host_cdrom".parse::<t::BlockdevDriver>(),
        Ok(t::BlockdevDriver::HostCdrom)
    );
    assert_eq!(t::QKeyCode::V1.as_str(), "1");
    let err = "nope".parse::<t::RunState>().unwrap_err();
    assert_eq!(err.to_string(), "\"nope\" is not a value of RunState");
    assert!(serde_json::from_value::<t::RunState>(json!("nope")).is_err());
    assert!(serde_json::from_value::<t::RunState>(json!(1)).is_err());
    assert!(t::RunState::ALL.iter().all(|v| v.as_str().parse() == Ok(*v)));
}

#[test]
fn events_with_and_without_data() {
    assert_eq!(Event::decode("STOP", &Value::Null).unwrap(), Event::Stop);
    assert_eq!(Event::decode("STOP", &json!({})).unwrap(), Event::Stop);
    assert!(Event::decode("STOP", &json!({"x": 1})).is_err());
    let data = json!({"guest": false, "reason": "host-qmp-quit"});
    let ev = Event::decode("SHUTDOWN", &data).unwrap();
    assert_eq!(ev.name(), "SHUTDOWN");
    assert_eq!(ev.data().unwrap(), data);
    let Event::Shutdown(s) = &ev else { panic!() };
    assert_eq!(s.reason, t::ShutdownCause::HostQmpQuit);
    let other = Event::decode("FUTURE_EVENT", &json!({"a": 1})).unwrap();
    assert_eq!(other.name(), "FUTURE_EVENT");
    assert_eq!(other.data().unwrap(), json!({"a": 1}));
    assert!(Event::decode("SHUTDOWN", &json!({"guest": "no"})).is_err());
}

#[test]
fn metadata() {
    let add = qmpkit_qapi::meta::command("blockdev-add").unwrap();
    assert_eq!((add.rust, add.module), ("BlockdevAdd", "block-core"));
    assert!(qmpkit_qapi::meta::command("drive-backup").unwrap().deprecated());
    assert!(qmpkit_qapi::meta::command("x-debug-query-block-graph")
        .unwrap()
        .unstable());
    assert_eq!(qmpkit_qapi::meta::event("SHUTDOWN").unwrap().since, Some("0.12"));
    let m = qmpkit_qapi::meta::member("BlockdevOptions", "active").unwrap();
    assert_eq!(m.since, Some("10.0"));
    let rtc = qmpkit_qapi::meta::command("rtc-reset-reinjection").unwrap();
    assert_eq!(rtc.condition, Some("TARGET_I386"));
    assert!(qmpkit_qapi::meta::OMITTED
        .iter()
        .any(|o| o.condition.contains("TARGET_S390X")));
    assert!(qmpkit_qapi::meta::command("query-s390x-cpu-polarization").is_none());
    for table in [
        qmpkit_qapi::meta::COMMANDS,
        qmpkit_qapi::meta::EVENTS,
        qmpkit_qapi::meta::TYPES,
    ] {
        assert!(
            table.windows(2).all(|w| w[0].name < w[1].name),
            "sorted for lookups"
        );
    }
}

#[test]
fn struct_members_by_name() {
    // Unknown members are ignored; a missing required one is an error naming it.
    let s: t::StatusInfo =
        serde_json::from_value(json!({"running": true, "status": "running", "newer": 1})).unwrap();
    assert_eq!((s.running, s.status), (true, t::RunState::Running));
    let err = serde_json::from_value::<t::StatusInfo>(json!({"running": true})).unwrap_err();
    assert!(err.to_string().contains("missing field `status`"), "{err}");
    // From text (borrowed member names), also with escapes in a name (copied).
    let s: t::StatusInfo = serde_json::from_str(r#"{"status":"paused","running":false}"#).unwrap();
    assert_eq!(s.status, t::RunState::Paused);
    let s: t::StatusInfo = serde_json::from_str(r#"{"st\u0061tus":"paused","running":false}"#).unwrap();
    assert_eq!(s.status, t::RunState::Paused);
    // An optional member sent as null is absent.
    let b: t::BlockDirtyBitmapAdd =
        serde_json::from_value(json!({"node": "n", "name": "b", "granularity": null})).unwrap();
    assert_eq!(b.granularity, None);
    // Objects only.
    assert!(serde_json::from_value::<t::StatusInfo>(json!([true, "running"])).is_err());
    // A struct nested in an internally tagged union's branch.
    let _: t::ObjectOptions =
        round_trip(json!({"qom-type": "secret", "id": "s0", "data": "x", "format": "raw"}));
}
