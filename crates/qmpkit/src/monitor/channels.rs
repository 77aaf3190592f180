//! Per-device event channels: a caller waiting for one device's events (a
//! block job's completion, say) gets them on a channel of its own.

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
#[non_exhaustive]
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

/// The receiving end of a device's event channel
/// ([`Monitor::create_event_channel`](super::Monitor::create_event_channel)).
/// Dropping it closes the channel: later pushes report
/// [`Delivery::ReaderGone`].
#[derive(Debug)]
pub struct DeviceEvents(mpsc::Receiver<Event>);

impl DeviceEvents {
    /// The next event; `None` once the channel was cleaned up (or the
    /// monitor ended) and every queued event was read. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Event> {
        self.0.recv().await
    }

    /// The next event if one is queued now, without waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.0.try_recv().ok()
    }

    /// Blocking version of [`DeviceEvents::recv`], for synchronous code.
    /// Must not be called from inside an async runtime.
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.0.blocking_recv()
    }
}

/// The registered channels of one monitor, by device name: a short list
/// (one per block job in progress), smaller in every monitor than a map.
#[derive(Default)]
pub(crate) struct Channels {
    list: Mutex<List>,
}

type List = Vec<(String, mpsc::Sender<Event>)>;

fn position(list: &List, device: &str) -> Option<usize> {
    list.iter().position(|(name, _)| name == device)
}

impl Channels {
    fn lock(&self) -> std::sync::MutexGuard<'_, List> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn create(&self, device: &str) -> Result<DeviceEvents> {
        if device.is_empty() {
            return Err(Error::InvalidRequest(
                "an event channel needs a device name".into(),
            ));
        }
        let mut list = self.lock();
        let found = position(&list, device);
        // A channel whose reader is gone is as good as none.
        if found.is_some_and(|i| !list[i].1.is_closed()) {
            return Err(Error::InvalidRequest(format!(
                "an event channel for device {device:?} already exists"
            )));
        }
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        match found {
            Some(i) => list[i].1 = tx,
            None => list.push((device.to_owned(), tx)),
        }
        Ok(DeviceEvents(rx))
    }

    pub(crate) fn cleanup(&self, device: &str) -> bool {
        let mut list = self.lock();
        match position(&list, device) {
            Some(i) => {
                list.swap_remove(i);
                true
            }
            None => false,
        }
    }

    pub(crate) fn push(&self, device: &str, event: Event) -> Delivery {
        let mut list = self.lock();
        let Some(i) = position(&list, device) else {
            return Delivery::NoChannel;
        };
        match list[i].1.try_send(event) {
            Ok(()) => Delivery::Delivered,
            Err(mpsc::error::TrySendError::Full(_)) => Delivery::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                list.swap_remove(i);
                Delivery::ReaderGone
            }
        }
    }

    /// Ends every channel (their receivers return `None` once drained).
    pub(crate) fn close_all(&self) {
        self.lock().clear();
    }
}
