//! Typed events on a real QEMU 10: subscriptions by event type, waits that
//! decode, and `Event::typed` for matching on every QEMU 10 event.

mod common;

use common::{vm_with, within};
use qmpkit::monitor::{Monitor, MonitorOptions};
use qmpkit::qapi::events::{self as ev, Event as Typed};
use qmpkit::qapi::types::{RunState, ShutdownCause};
use qmpkit::{EventFilter, EventItem};
use serde_json::json;

#[tokio::test]
async fn a_subscription_by_type_gets_decoded_data() {
    let vm = vm_with(|b| b.scratch_devices()).await;
    let client = vm.client();
    let mut deleted = client.subscribe(EventFilter::of::<ev::DeviceDeleted>());
    let mut runstate = client.subscribe(EventFilter::names(["STOP"]).and::<ev::Reset>());

    client
        .execute_raw(
            "device_add",
            json!({"driver": "usb-kbd", "id": "kbd0", "bus": "usb0.0"}),
        )
        .await
        .unwrap();
    client.remove_device("kbd0").await.unwrap();
    let gone = within(30, deleted.wait_for_data::<ev::DeviceDeleted>())
        .await
        .unwrap();
    assert_eq!(gone.device.as_deref(), Some("kbd0"));
    assert_eq!(gone.path, "/machine/peripheral/kbd0");

    client.execute_raw("cont", json!({})).await.unwrap();
    client.execute_raw("system_reset", json!({})).await.unwrap();
    client.execute_raw("stop", json!({})).await.unwrap();
    // Only what was asked for, in QEMU's order, each typed.
    let mut typed = Vec::new();
    while typed.len() < 2 {
        match within(30, runstate.recv()).await.unwrap() {
            EventItem::Event(e) => typed.push(e.typed().unwrap()),
            EventItem::Missed(n) => panic!("missed {n}"),
        }
    }
    assert_eq!(
        typed,
        [
            Typed::Reset(ev::Reset {
                guest: false,
                reason: ShutdownCause::HostQmpSystemReset
            }),
            Typed::Stop
        ]
    );
    assert!(runstate.try_next().is_none());
    assert_eq!(
        client
            .execute(&qmpkit::qapi::commands::QueryStatus)
            .await
            .unwrap()
            .status,
        RunState::Paused
    );
}

/// A Monitor's handler sees QEMU's events typed, and its own events
/// (which no QEMU schema has) as `Other`.
#[tokio::test]
async fn a_monitors_handler_matches_typed_events() {
    let vm = vm_with(|b| b.extra_qmp_socket("mon")).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let options = MonitorOptions::new().event_handler(move |_mon, event| {
        let _ = tx.send(event.typed());
    });
    let mon = within(10, Monitor::connect(vm.socket("mon"), options))
        .await
        .unwrap();
    mon.execute_raw("cont", json!({})).await.unwrap();
    mon.execute_raw("quit", json!({})).await.unwrap();
    let mut seen = Vec::new();
    while let Some(t) = within(30, rx.recv()).await {
        let t = t.unwrap();
        let done = matches!(t, Typed::Shutdown(_));
        seen.push(t);
        if done {
            break;
        }
    }
    assert_eq!(seen[0], Typed::Resume, "{seen:?}");
    assert_eq!(
        seen.last().unwrap(),
        &Typed::Shutdown(ev::Shutdown {
            guest: false,
            reason: ShutdownCause::HostQmpQuit
        })
    );
    // A name this QEMU's schema lacks decodes as Other, data intact.
    let own = qmpkit::Event::new("AGENT-STARTED", json!({"x": 1}), Default::default());
    assert_eq!(
        own.typed().unwrap(),
        Typed::Other {
            name: "AGENT-STARTED".into(),
            data: json!({"x": 1})
        }
    );
    // Data that does not fit a known event is an error, not Other.
    let bad = qmpkit::Event::new("DEVICE_DELETED", json!({"device": 5}), Default::default());
    assert!(bad.typed().is_err());
    assert!(bad.data_of::<ev::DeviceDeleted>().unwrap().is_err());
    assert!(bad.data_of::<ev::Reset>().is_none());
}

/// The audit every QEMU of the suites goes through on drop (tests/common/event_audit.rs)
/// catches what it is there to catch.
#[test]
fn a_changed_or_unknown_event_is_reported() {
    // A good one, with a number QEMU wrote as an integer.
    assert!(common::event_audit::problems_of(
        "RTC_CHANGE",
        &serde_json::json!({"offset": 5, "qom-path": "/machine/rtc"})
    )
    .is_empty());
    // A member the generated type does not keep is reported as lost.
    let lost = common::event_audit::problems_of(
        "RTC_CHANGE",
        &serde_json::json!({"offset": 5, "qom-path": "/machine/rtc", "extra": 1}),
    );
    assert!(lost.iter().any(|p| p.contains("lost")), "{lost:?}");
    // Data on an event that has none does not decode.
    assert!(!common::event_audit::problems_of("STOP", &serde_json::json!({"extra": 1})).is_empty());
    // A required member missing does not decode.
    assert!(!common::event_audit::problems_of(
        "RESET",
        &serde_json::json!({"reason": "host-qmp-system-reset"})
    )
    .is_empty());
    // A name this QEMU does not have is reported.
    assert!(!common::event_audit::problems_of("NO_SUCH_EVENT", &serde_json::Value::Null).is_empty());
}
