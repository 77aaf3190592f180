//! Devices, character devices and network cards.

use qmpkit::commands::chardev::ChardevBackend;
use qmpkit::commands::devices::{DeviceSpec, NetdevSpec};
use serde_json::{json, Value};

use super::{done, emit};
use crate::cli::*;
use crate::conn::Ctx;
use crate::ops::{self, UNPLUG_WAIT};
use crate::out::Table;
use qmpkit::qapi::commands::QueryChardev;

pub async fn device(ctx: &Ctx, command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Add { driver, id, props } => {
            let props = crate::subcommands::exec::parse_pairs(props.iter().map(String::as_str))?;
            let mut spec = DeviceSpec::new(&driver).id(&id);
            for (k, v) in props.as_object().into_iter().flatten() {
                spec = spec.prop(k, v.clone());
            }
            ctx.within("device add", async { Ok(ctx.client.add_device(&spec).await?) })
                .await?;
            done(ctx, json!({"id": id}), &format!("added {driver} {id}"))
        }
        DeviceCommand::Remove { id } => {
            let budget = ctx.timeout.unwrap_or(UNPLUG_WAIT);
            ctx.client.remove_device_and_wait(&id, budget).await?;
            done(ctx, json!({"id": id}), &format!("removed {id}"))
        }
        DeviceCommand::List => {
            let list = ctx.within("device list", ops::qom_devices(&ctx.client)).await?;
            let v: Value = list
                .iter()
                .map(|(id, ty)| json!({"id": id, "type": ty}))
                .collect();
            emit(ctx, &v, || {
                let mut t = Table::new(&["ID", "TYPE"]);
                for (id, ty) in &list {
                    t.row(vec![id.clone(), ty.clone()]);
                }
                t.print("no devices with an id")
            })
        }
    }
}

pub async fn chardev(ctx: &Ctx, command: ChardevCommand) -> anyhow::Result<()> {
    match command {
        ChardevCommand::Add { id, backend, options } => {
            // Typed as chardev-add's backend.data for this backend type.
            let pairs: Vec<String> = [format!("id={id}"), format!("backend.type={backend}")]
                .into_iter()
                .chain(options.iter().map(|o| format!("backend.data.{o}")))
                .collect();
            let typed = crate::typed::command_arguments("chardev-add", pairs.iter().map(String::as_str))?;
            let data = match &typed["backend"]["data"] {
                Value::Object(m) => m.clone(),
                _ => serde_json::Map::new(),
            };
            let spec = ChardevBackend::new(&backend, data);
            let added = ctx
                .within("chardev add", async {
                    Ok(ctx.client.add_char_device(&id, &spec).await?)
                })
                .await?;
            let pty = added
                .pty
                .as_deref()
                .map(|p| format!(" on {p}"))
                .unwrap_or_default();
            done(
                ctx,
                json!({"id": id, "pty": added.pty}),
                &format!("added chardev {id} ({backend}){pty}"),
            )
        }
        ChardevCommand::Remove { id } => {
            ctx.within("chardev remove", async {
                Ok(ctx.client.remove_char_device(&id).await?)
            })
            .await?;
            done(ctx, json!({"id": id}), &format!("removed chardev {id}"))
        }
        ChardevCommand::List => {
            let (v, chardevs) = ctx.query(&QueryChardev).await?;
            emit(ctx, &v, || {
                let mut t = Table::new(&["ID", "OPEN", "BACKEND"]);
                for c in &chardevs {
                    t.row(vec![
                        c.label.clone(),
                        c.frontend_open.to_string(),
                        c.filename.clone(),
                    ]);
                }
                t.print("no chardevs")
            })
        }
    }
}

pub async fn nic(ctx: &Ctx, command: NicCommand) -> anyhow::Result<()> {
    match command {
        NicCommand::Add {
            id,
            model,
            netdev,
            mac,
            bus,
            link_down,
        } => {
            let mut dev = DeviceSpec::new(&model).id(&id);
            if let Some(mac) = &mac {
                dev = dev.prop("mac", mac.as_str());
            }
            if let Some(bus) = &bus {
                dev = dev.bus(bus);
            }
            let backend = NetdevSpec::new(&netdev, &id);
            ctx.within("nic add", async {
                Ok(ctx.client.add_nic(&backend, &dev, !link_down).await?)
            })
            .await?;
            done(
                ctx,
                json!({"id": id}),
                &format!("added {model} {id} on a {netdev} backend"),
            )
        }
        NicCommand::Remove { id } => {
            let budget = ctx.timeout.unwrap_or(UNPLUG_WAIT);
            ctx.client.remove_nic_and_wait(&id, Some(&id), budget).await?;
            done(ctx, json!({"id": id}), &format!("removed {id} and its backend"))
        }
        NicCommand::Link { id, state } => {
            let up = state == "up";
            ctx.within("nic link", async { Ok(ctx.client.set_nic_link(&id, up).await?) })
                .await?;
            done(ctx, json!({"id": id, "up": up}), &format!("{id}: link {state}"))
        }
    }
}
