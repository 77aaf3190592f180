//! Per-device event channels: a caller waiting for one device's events (a
//! block job's completion, say) gets them on a channel of its own.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::event::Event;

use super::constants::EVENT_CHANNEL_CAPACITY;

/// What became of an event pushed to a device channel.
///
/// Pushing never waits: a channel holds up to
/// [`EVENT_CHANNEL_CAPACITY`] events, and an event that finds it full is
/// dropped and reported as [`Delivery::Full`] rather than blocking the pusher
/// (the monitor's event task, which also serves every other event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The event is queued on the device's channel.
    Delivered,
    /// No channel is registered for the device; the event was dropped.
    NoChannel,
    /// The channel's queue is full (nobody reads it); the event was dropped.
    Full,
    /// The channel's receiver was dropped; the channel is unregistered and the event dropped.
    ReaderGone,
}

/// The registered channels of one monitor, by device name.
#[derive(Default)]
pub(crate) struct Channels {
    map: Mutex<HashMap<String, mpsc::Sender<Event>>>,
}

impl Channels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Event>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn create(&self, device: &str) -> Result<mpsc::Receiver<Event>> {
        if device.is_empty() {
            return Err(Error::InvalidRequest(
                "an event channel needs a device name".into(),
            ));
        }
        let mut map = self.lock();
        if let Some(tx) = map.get(device) {
            // A channel whose reader is gone is as good as none.
            if !tx.is_closed() {
                return Err(Error::InvalidRequest(format!(
                    "an event channel for device {device:?} already exists"
                )));
            }
        }
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        map.insert(device.to_owned(), tx);
        Ok(rx)
    }

    pub(crate) fn cleanup(&self, device: &str) -> bool {
        self.lock().remove(device).is_some()
    }

    pub(crate) fn push(&self, device: &str, event: Event) -> Delivery {
        let mut map = self.lock();
        let Some(tx) = map.get(device) else {
            return Delivery::NoChannel;
        };
        match tx.try_send(event) {
            Ok(()) => Delivery::Delivered,
            Err(mpsc::error::TrySendError::Full(_)) => Delivery::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                map.remove(device);
                Delivery::ReaderGone
            }
        }
    }

    /// Ends every channel (their receivers return `None` once drained).
    pub(crate) fn close_all(&self) {
        self.lock().clear();
    }
}
