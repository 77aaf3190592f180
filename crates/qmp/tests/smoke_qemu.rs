//! Quick end-to-end check on a real QEMU.
use qmp::launch::QemuBuilder;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_status_and_events() {
    let vm = QemuBuilder::new().spawn().await.expect("launch QEMU");
    let c = vm.client();
    assert!(c.greeting().version.major >= 10, "{:?}", c.greeting());
    assert!(c.oob_enabled());
    let st: Value = c.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "prelaunch");
    let mut ev = c.events();
    c.execute_raw("cont", Value::Null).await.unwrap();
    assert_eq!(ev.wait_for("RESUME").await.unwrap().name(), "RESUME");
    let e = c
        .execute_raw("device_del", json!({"id": "nope"}))
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
}
