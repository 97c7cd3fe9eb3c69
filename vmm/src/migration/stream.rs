//! Migration connections: `unix:PATH` or `tcp:HOST:PORT`, the listening
//! side for the destination, and passing the guest memory fd over a Unix
//! socket for same-host moves.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::MigrationError;

/// Where to connect or listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    /// A Unix socket path.
    Unix(PathBuf),
    /// host:port.
    Tcp(String),
}

impl std::str::FromStr for MigrationUrl {
    type Err = MigrationError;

    fn from_str(url: &str) -> Result<Self, MigrationError> {
        let bad = |why: &str| MigrationError::Url {
            url: url.into(),
            why: why.into(),
        };
        if let Some(p) = url.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(bad("empty socket path"));
            }
            Ok(Self::Unix(p.into()))
        } else if let Some(a) = url.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    Ok(Self::Tcp(a.into()))
                }
                _ => Err(bad("expected tcp:HOST:PORT")),
            }
        } else {
            Err(bad("expected unix:PATH or tcp:HOST:PORT"))
        }
    }
}

/// A connected stream.
pub enum Stream {
    /// Unix socket.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |err| MigrationError::Os { what, err }
}

impl Stream {
    /// Connects to `url`.
    pub fn connect(url: &MigrationUrl) -> Result<Self, MigrationError> {
        Ok(match url {
            MigrationUrl::Unix(p) => {
                let s = UnixStream::connect(p).map_err(os("connect"))?;
                big_send_buffer(&s);
                Self::Unix(s)
            }
            MigrationUrl::Tcp(a) => {
                let s = TcpStream::connect(a).map_err(os("connect"))?;
                let _ = s.set_nodelay(true);
                Self::Tcp(s)
            }
        })
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> Result<Self, MigrationError> {
        Ok(match self {
            Self::Unix(s) => Self::Unix(s.try_clone().map_err(os("dup"))?),
            Self::Tcp(s) => Self::Tcp(s.try_clone().map_err(os("dup"))?),
        })
    }

    /// Breaks the connection both ways (a cancel).
    pub fn shutdown(&self) {
        let _ = match self {
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Sends `fd` (same-host migration: the guest memory).
    pub fn send_fd(&self, fd: RawFd) -> Result<(), MigrationError> {
        match self {
            Self::Unix(s) => s
                .send_with_fd([0u8].as_slice(), fd)
                .map(|_| ())
                .map_err(|e| MigrationError::Os {
                    what: "sending the memory fd",
                    err: std::io::Error::from_raw_os_error(e.errno()),
                }),
            Self::Tcp(_) => Err(MigrationError::Incompatible(
                "local migration needs a unix: URL".into(),
            )),
        }
    }

    /// Receives a file descriptor sent with [`Self::send_fd`].
    pub fn recv_fd(&self) -> Result<std::fs::File, MigrationError> {
        let Self::Unix(s) = self else {
            return Err(MigrationError::Incompatible(
                "local migration needs a unix: URL".into(),
            ));
        };
        let mut b = [0u8; 1];
        let (_, fd) = s.recv_with_fd(&mut b[..]).map_err(|e| MigrationError::Os {
            what: "receiving the memory fd",
            err: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        fd.ok_or_else(|| MigrationError::Incompatible("the source sent no memory fd".into()))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Unix(s) => s.flush(),
            Self::Tcp(s) => s.flush(),
        }
    }
}

/// Bytes a Unix socket may hold unsent: a Unix stream socket's default
/// (`net.core.wmem_default`, about 200 KiB) makes the sender wait for the
/// receiver several times per MiB, which on a small host means a pair of
/// context switches each time. The kernel caps it at `net.core.wmem_max`.
const UNIX_SEND_BUFFER: libc::c_int = 4 << 20;

/// Asks for [`UNIX_SEND_BUFFER`]; a smaller cap only costs speed.
fn big_send_buffer(s: &UnixStream) {
    let size = UNIX_SEND_BUFFER;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A destination's listening socket, bound before `PUT /migration/receive`
/// answers so the source can connect at once.
pub enum ListenSocket {
    /// Unix (the path is removed when done).
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(TcpListener),
}

impl ListenSocket {
    /// Binds `url`.
    pub fn bind(url: &MigrationUrl) -> Result<Self, MigrationError> {
        Ok(match url {
            MigrationUrl::Unix(p) => {
                // A socket file nobody listens on (left by a destination that
                // was killed) is stale: replace it. A live one is an error.
                if p.exists() && UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                Self::Unix(UnixListener::bind(p).map_err(os("bind"))?, p.clone())
            }
            MigrationUrl::Tcp(a) => Self::Tcp(TcpListener::bind(a).map_err(os("bind"))?),
        })
    }

    /// Waits for the source.
    pub fn accept(&self) -> Result<Stream, MigrationError> {
        Ok(match self {
            Self::Unix(l, _) => Stream::Unix(l.accept().map_err(os("accept"))?.0),
            Self::Tcp(l) => {
                let s = l.accept().map_err(os("accept"))?.0;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
        })
    }

    /// The raw fd (to wake a blocked accept on cancel).
    pub fn raw_fd(&self) -> RawFd {
        match self {
            Self::Unix(l, _) => l.as_raw_fd(),
            Self::Tcp(l) => l.as_raw_fd(),
        }
    }
}

impl Drop for ListenSocket {
    fn drop(&mut self) {
        if let Self::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<MigrationUrl>().unwrap(),
            MigrationUrl::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            "tcp:10.0.0.2:6000".parse::<MigrationUrl>().unwrap(),
            MigrationUrl::Tcp("10.0.0.2:6000".into())
        );
        for bad in ["unix:", "tcp:host", "tcp::1", "http://x", "tcp:h:99999"] {
            assert!(bad.parse::<MigrationUrl>().is_err(), "{bad}");
        }
    }
}
