//! Passing open files to QEMU: named fds (`getfd`) and fd sets (`add-fd`).
//!
//! The file travels as SCM_RIGHTS with the command itself. These methods
//! take the file by value (anything that converts into an [`OwnedFd`], such
//! as a [`std::fs::File`] or a [`std::os::unix::net::UnixStream`]): QEMU gets
//! its own copy, and the client closes the one it was given once the
//! command is sent, or when the call fails before that. To keep using the
//! file, pass a duplicate (`file.try_clone()?`).
//!
//! ```no_run
//! # async fn f(client: qmpkit::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let disk = std::fs::File::open("/var/lib/vm1/disk.img")?;
//! let info = client.send_file_with_fdset("disk0", disk, true).await?;
//! // QEMU can now open "/dev/fdset/<id>", e.g. as a blockdev's filename.
//! println!("/dev/fdset/{}", info.fdset_id);
//! client.remove_fd_from_fdset("disk0").await?;
//! # Ok(()) }
//! ```

use std::os::fd::OwnedFd;

use qmpkit_qapi::commands as c;
use serde::Deserialize;

use crate::client::{CallOptions, Client};
use crate::error::{Error, ErrorClass, QmpError, Result};

/// Where `add-fd` put a file: its fd set and QEMU's fd number for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct AddFdInfo {
    /// The fd set's id (open it as `/dev/fdset/ID`).
    #[serde(rename = "fdset-id")]
    pub fdset_id: i64,
    /// QEMU's fd number.
    pub fd: i64,
}

/// An fd set (an entry of `query-fdsets`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct FdsetInfo {
    /// The fd set's id.
    #[serde(rename = "fdset-id")]
    pub fdset_id: i64,
    /// The files in the set.
    #[serde(default)]
    pub fds: Vec<FdsetFdInfo>,
}

/// A file in an fd set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct FdsetFdInfo {
    /// QEMU's fd number.
    pub fd: i64,
    /// The free-form text given when it was added
    /// ([`Client::send_file_with_fdset`] writes `rdonly:NAME` or `rdwr:NAME`).
    #[serde(default)]
    pub opaque: Option<String>,
}

impl FdsetFdInfo {
    /// The name [`Client::send_file_with_fdset`] gave the file: the opaque
    /// text after its `rdonly:`/`rdwr:` prefix (the whole text without one).
    pub fn name(&self) -> Option<&str> {
        let opaque = self.opaque.as_deref()?;
        Some(opaque.split_once(':').map_or(opaque, |(_, name)| name))
    }
}

impl Client {
    /// Gives QEMU an open file under a name (`getfd`), for commands that
    /// take an fd name (`chardev-change`, `netdev_add` with `fd=`, ...).
    /// A name already in use is replaced, and QEMU closes the old file.
    /// The file is moved in; see the [module docs](self).
    #[doc(alias = "SendFile")]
    #[doc(alias = "getfd")]
    pub async fn send_file(&self, name: &str, file: impl Into<OwnedFd>) -> Result<()> {
        let options = CallOptions::new().fds([file.into()]);
        let getfd = c::Getfd { fdname: name.into() };
        self.run_with(&getfd, options).await.map(drop)
    }

    /// Closes the file QEMU holds under this name (`closefd`). An unknown
    /// name is a not-found error ([`Error::is_not_found`]).
    #[doc(alias = "CloseFile")]
    #[doc(alias = "closefd")]
    pub async fn close_file(&self, name: &str) -> Result<()> {
        self.run(&c::Closefd { fdname: name.into() }).await.map(drop)
    }

    /// Puts an open file into a new fd set (`add-fd`), labelled
    /// `rdonly:NAME` or `rdwr:NAME`, and returns where it went. QEMU opens
    /// it through `/dev/fdset/ID` with the access mode asked for. The file
    /// is moved in; see the [module docs](self).
    #[doc(alias = "SendFileWithFDSet")]
    #[doc(alias = "add-fd")]
    pub async fn send_file_with_fdset(
        &self,
        name: &str,
        file: impl Into<OwnedFd>,
        readonly: bool,
    ) -> Result<AddFdInfo> {
        let mode = if readonly { "rdonly" } else { "rdwr" };
        let options = CallOptions::new().fds([file.into()]);
        let add = c::AddFd {
            fdset_id: None,
            opaque: Some(format!("{mode}:{name}")),
        };
        self.run_as(&add, options).await
    }

    /// The fd sets and their files (`query-fdsets`).
    #[doc(alias = "query-fdsets")]
    pub async fn query_fdsets(&self) -> Result<Vec<FdsetInfo>> {
        self.run_as(&c::QueryFdsets, CallOptions::new()).await
    }

    /// Removes the files named `name` by [`Client::send_file_with_fdset`]
    /// from their fd sets (`query-fdsets`, then `remove-fd` for each). QEMU
    /// closes a file once nothing uses it, and drops an fd set once it is
    /// empty and unused.
    ///
    /// When no fd set holds a file of that name, the result is a
    /// `DeviceNotFound` error for `remove-fd` ([`Error::is_not_found`]).
    #[doc(alias = "RemoveFDFromFDSet")]
    #[doc(alias = "remove-fd")]
    pub async fn remove_fd_from_fdset(&self, name: &str) -> Result<()> {
        let sets = self.query_fdsets().await?;
        let mut found = false;
        for set in &sets {
            for fd in set.fds.iter().filter(|fd| fd.name() == Some(name)) {
                let remove = c::RemoveFd {
                    fdset_id: set.fdset_id,
                    fd: Some(fd.fd),
                };
                self.run(&remove).await?;
                found = true;
            }
        }
        if found {
            Ok(())
        } else {
            Err(Error::Qmp(QmpError {
                command: "remove-fd".into(),
                class: ErrorClass::DeviceNotFound,
                desc: format!("no fd set holds a file named {name:?}"),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_opaque_text() {
        let fd = |o: Option<&str>| FdsetFdInfo {
            fd: 3,
            opaque: o.map(str::to_owned),
        };
        assert_eq!(fd(Some("rdonly:disk0")).name(), Some("disk0"));
        assert_eq!(fd(Some("rdwr:a:b")).name(), Some("a:b"));
        assert_eq!(fd(Some("plain")).name(), Some("plain"));
        assert_eq!(fd(None).name(), None);
    }
}
