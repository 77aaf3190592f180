//! Where a QMP server is: a Unix socket path or a TCP address.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::Error;

/// Where to reach a QMP server (or where to wait for one, see
/// [`Listener`](crate::Listener)): a Unix socket path or a TCP address.
///
/// Parsed from text ([`str::parse`] or [`Address::parse`]) by its syntax
/// alone, never by looking at the file system:
///
/// | text | means |
/// | --- | --- |
/// | `unix:PATH` | the Unix socket `PATH` (any path, even one with a `:`) |
/// | `tcp:HOST:PORT` | TCP; an invalid host or port is an error |
/// | anything containing `/` | a Unix socket path (`./vm:1`, `/run/vm1/qmp.sock`) |
/// | `HOST:PORT` | TCP, when `PORT` is a number from 1 to 65535 and `HOST` is an IPv4 address, an IPv6 address in brackets (`[::1]:4444`), or a host name (letters, digits, `-`, `.`, `_`) |
/// | anything else | a Unix socket path relative to the current directory (`qmp.sock`) |
///
/// So `localhost:4444` is TCP and `qmp.sock` a path; write `unix:vm:1` or
/// `./vm:1` for a file whose name looks like `HOST:PORT`.
///
/// ```
/// use qmpkit::Address;
/// let tcp: Address = "127.0.0.1:4444".parse()?;
/// assert_eq!(tcp, Address::Tcp("127.0.0.1:4444".into()));
/// let ipv6: Address = "tcp:[::1]:4444".parse()?;
/// assert_eq!(ipv6.to_string(), "tcp:[::1]:4444");
/// let path: Address = "/run/vm1/qmp.sock".parse()?;
/// assert_eq!(path, Address::Unix("/run/vm1/qmp.sock".into()));
/// assert_eq!("unix:vm:1".parse::<Address>()?, Address::Unix("vm:1".into()));
/// assert!("tcp:nohost".parse::<Address>().is_err());
/// # Ok::<(), qmpkit::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Address {
    /// A Unix socket path. Only a Unix socket can pass file descriptors.
    Unix(PathBuf),
    /// A TCP address as `HOST:PORT`, an IPv6 host in brackets. The host
    /// name is resolved when connecting.
    Tcp(String),
}

impl Address {
    /// Parses an address as the table above describes.
    pub fn parse(text: &str) -> Result<Address, Error> {
        let invalid = |reason: &str| Error::InvalidAddress {
            address: text.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid("unix: needs a socket path after it"));
            }
            return Ok(Address::Unix(path.into()));
        }
        if let Some(rest) = text.strip_prefix("tcp:") {
            return match split_host_port(rest) {
                Ok(_) => Ok(Address::Tcp(rest.to_owned())),
                Err(reason) => Err(invalid(reason)),
            };
        }
        if text.is_empty() {
            return Err(invalid("empty address"));
        }
        if !text.contains('/') && split_host_port(text).is_ok() {
            return Ok(Address::Tcp(text.to_owned()));
        }
        Ok(Address::Unix(text.into()))
    }

    /// A Unix socket path.
    pub fn unix(path: impl Into<PathBuf>) -> Address {
        Address::Unix(path.into())
    }

    /// A TCP address from a host (name, IPv4 or IPv6 address, brackets
    /// optional) and a port.
    pub fn tcp(host: &str, port: u16) -> Address {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<Ipv6Addr>().is_ok() {
            Address::Tcp(format!("[{bare}]:{port}"))
        } else {
            Address::Tcp(format!("{host}:{port}"))
        }
    }

    /// The Unix socket path, if this is one.
    pub fn as_path(&self) -> Option<&Path> {
        match self {
            Address::Unix(p) => Some(p),
            Address::Tcp(_) => None,
        }
    }

    /// True for an address whose connections can carry file descriptors.
    pub fn passes_fds(&self) -> bool {
        matches!(self, Address::Unix(_))
    }

    /// The kind of address in words, for messages: `"Unix socket"` or `"TCP"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Address::Unix(_) => "Unix socket",
            Address::Tcp(_) => "TCP",
        }
    }
}

/// Splits `HOST:PORT` and checks both, as [`Address::parse`] describes.
/// Returns the host without brackets.
pub(crate) fn split_host_port(text: &str) -> Result<(&str, u16), &'static str> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or("a TCP address needs a port: HOST:PORT")?;
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => return Err("the port must be a number from 1 to 65535"),
    };
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or("an IPv6 address needs its closing bracket: [ADDR]:PORT")?;
        inner
            .parse::<Ipv6Addr>()
            .map_err(|_| "not an IPv6 address in the brackets")?;
        return Ok((inner, port));
    }
    if host.is_empty() {
        return Err("a TCP address needs a host: HOST:PORT");
    }
    if host.contains(':') {
        return Err("an IPv6 address needs brackets: [ADDR]:PORT");
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok((host, port));
    }
    let name_ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !host.starts_with(['-', '.']);
    if !name_ok {
        return Err("not a host name (letters, digits, '-', '.', '_') or IP address");
    }
    Ok((host, port))
}

impl FromStr for Address {
    type Err = Error;

    fn from_str(text: &str) -> Result<Address, Error> {
        Address::parse(text)
    }
}

impl fmt::Display for Address {
    /// `unix:PATH` or `tcp:HOST:PORT`: text that parses back to the same address.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl From<PathBuf> for Address {
    fn from(path: PathBuf) -> Address {
        Address::Unix(path)
    }
}

impl From<&Path> for Address {
    fn from(path: &Path) -> Address {
        Address::Unix(path.to_owned())
    }
}

impl From<&PathBuf> for Address {
    fn from(path: &PathBuf) -> Address {
        Address::Unix(path.clone())
    }
}

impl From<SocketAddr> for Address {
    fn from(addr: SocketAddr) -> Address {
        Address::Tcp(addr.to_string())
    }
}

impl From<&Address> for Address {
    fn from(addr: &Address) -> Address {
        addr.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Address {
        Address::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn tcp_forms() {
        for s in [
            "127.0.0.1:4444",
            "localhost:1",
            "vm-1.example.org:65535",
            "[::1]:4444",
            "[fe80::1]:22",
        ] {
            assert_eq!(parse(s), Address::Tcp(s.into()), "{s}");
            assert_eq!(parse(&format!("tcp:{s}")), Address::Tcp(s.into()), "{s}");
            assert_eq!(parse(s).to_string(), format!("tcp:{s}"));
        }
        assert_eq!(Address::tcp("::1", 7), Address::Tcp("[::1]:7".into()));
        assert_eq!(Address::tcp("[::1]", 7), Address::Tcp("[::1]:7".into()));
        assert_eq!(Address::tcp("h", 7), Address::Tcp("h:7".into()));
        assert_eq!(
            Address::from("127.0.0.1:9".parse::<SocketAddr>().unwrap()),
            Address::Tcp("127.0.0.1:9".into())
        );
    }

    #[test]
    fn path_forms() {
        for s in [
            "/run/vm1/qmp.sock",
            "qmp.sock",
            "./vm:1",
            "dir/host:22",
            "host:0",
            "host:65536",
            "host:+1",
            "::1:4444",
            "a b:1",
            "host:",
            ":4444",
        ] {
            assert_eq!(parse(s), Address::Unix(s.into()), "{s}");
        }
        assert_eq!(parse("unix:vm:1"), Address::Unix("vm:1".into()));
        assert_eq!(parse("unix:/a/b").to_string(), "unix:/a/b");
        assert_eq!(parse("unix:/a/b").as_path(), Some(Path::new("/a/b")));
    }

    #[test]
    fn invalid_forms() {
        for s in [
            "",
            "unix:",
            "tcp:",
            "tcp:host",
            "tcp:host:0",
            "tcp:[::1:4",
            "tcp:::1:4",
            "tcp:a b:1",
            "tcp:[nope]:1",
        ] {
            let e = Address::parse(s).unwrap_err();
            assert!(matches!(e, Error::InvalidAddress { .. }), "{s}: {e:?}");
            assert!(e.to_string().contains(&format!("{s:?}")), "{e}");
        }
    }
}
