//! Without the `traffic-log` feature there is no traffic log: this type has
//! no values, so the connection's `Option<TrafficLog>` is always `None` and
//! the calls below are never made.

use std::path::Path;

pub(crate) enum TrafficLog {}

impl TrafficLog {
    pub(crate) fn open(_path: &Path) -> Option<TrafficLog> {
        None
    }

    pub(crate) fn query(&self, _request: &[u8]) {
        match *self {}
    }

    pub(crate) fn reply(&self, _reply: &[u8]) {
        match *self {}
    }

    pub(crate) fn event(&self, _name: &str, _event: &[u8]) {
        match *self {}
    }
}
