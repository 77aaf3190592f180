//! Launches a throwaway QEMU, connects, prints its status and the events
//! that a stop/cont/reset produce.
//!
//! Run: `cargo run -p qmp --example hello`

use std::time::Duration;

use qmpkit::launch::QemuBuilder;
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vm = QemuBuilder::new().spawn().await?;
    let client = vm.client();
    let g = client.greeting();
    println!(
        "connected to QEMU {} ({}), oob: {}",
        g.version,
        g.package,
        client.oob_enabled()
    );

    let mut events = client.events();
    let status: Value = client.execute_raw("query-status", Value::Null).await?;
    println!("status: {}", status["status"]);

    for command in ["cont", "stop", "system_reset"] {
        client.execute_raw(command, Value::Null).await?;
        println!("ran {command}");
    }
    // Three commands, three events: RESUME, STOP, RESET.
    for _ in 0..3 {
        match tokio::time::timeout(Duration::from_secs(5), events.next()).await? {
            Some(event) => println!("event: {event}"),
            None => break,
        }
    }
    let status: Value = client.execute_raw("query-status", Value::Null).await?;
    println!("status: {}", status["status"]);
    Ok(())
}
