//! The Unix socket: connecting to long paths, and sending file descriptors.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// The longest path `sun_path` holds, including its terminating NUL.
const SUN_PATH_MAX: usize = 108;

/// Connects to a Unix socket, also one whose path is longer than `sun_path`
/// allows: the directory is opened and the socket reached as
/// `/proc/self/fd/N/NAME`.
pub(crate) async fn connect(path: &Path) -> io::Result<UnixStream> {
    if path.as_os_str().as_bytes().len() < SUN_PATH_MAX {
        return UnixStream::connect(path).await;
    }
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => (dir, name),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "socket path has no file name",
            ))
        }
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let dirfd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let short = Path::new("/proc/self/fd")
        .join(rustix::fd::AsRawFd::as_raw_fd(&dirfd).to_string())
        .join(name);
    if short.as_os_str().as_bytes().len() >= SUN_PATH_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket file name is too long for a Unix socket address",
        ));
    }
    // The directory fd must stay open until connect returns; it is closed
    // when `dirfd` drops at the end of this function.
    UnixStream::connect(&short).await
}

/// Writes `bytes` with `fds` attached as SCM_RIGHTS, in one `sendmsg`, without
/// blocking. Returns how many bytes were written; the fds went with them (the
/// kernel holds its own references, so the caller closes its copies).
pub(crate) fn try_send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<usize> {
    stream.try_io(Interest::WRITABLE, || {
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(borrowed.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
            return Err(io::Error::other("too many file descriptors for one message"));
        }
        rustix::net::sendmsg(
            stream,
            &[io::IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(io::Error::from)
    })
}
