//! Linux tap devices: opening (creating) one with a virtio-net header, one
//! file descriptor per queue pair, probing and setting offloads.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::chain::VNET_HDR_LEN;
use crate::config::{TapOffloads, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// `struct ifreq` with the members we use.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    /// ifr_flags / ifr_mtu (the union's first member).
    value: libc::c_int,
    _pad: [u8; 20],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            value: 0,
            _pad: [0; 20],
        };
        for (d, s) in r.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        r
    }
}

/// Errors opening the tap (reported at startup).
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is invalid (1 to 15 bytes, no '/' or whitespace)")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("tap {0} is in use")]
    InUse(String),
    #[error("tap {0} does not exist and cannot be created without CAP_NET_ADMIN")]
    CannotCreate(String),
    #[error(
        "tap {name}: exists with other flags (a tun device, or multi_queue {mq_wanted} wanted)"
    )]
    Incompatible { name: String, mq_wanted: bool },
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// An open tap: one non-blocking fd per queue pair.
pub struct Tap {
    pub name: String,
    pub fds: Vec<File>,
    /// Offloads the tap accepts.
    pub offloads: TapOffloads,
    /// We created the device (it did not exist before).
    pub created: bool,
}

fn ioctl_err(name: &str, what: &'static str) -> TapError {
    TapError::Ioctl {
        name: name.to_string(),
        what,
        source: io::Error::last_os_error(),
    }
}

fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

impl Tap {
    /// Open (creating if needed) tap `name` with `queues` queue pairs.
    pub fn open(name: &str, queues: u16) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name
                .bytes()
                .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(TapError::BadName(name.to_string()));
        }
        let existed = interface_exists(name);
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut fds = Vec::new();
        for _ in 0..queues {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            let mut req = IfReq::new(name);
            req.value = libc::c_int::from(flags);
            // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is laid out as.
            if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
                let e = io::Error::last_os_error();
                return Err(match e.raw_os_error() {
                    Some(libc::EBUSY) => TapError::InUse(name.to_string()),
                    Some(libc::EPERM) if !existed => TapError::CannotCreate(name.to_string()),
                    Some(libc::EINVAL) if existed => TapError::Incompatible {
                        name: name.to_string(),
                        mq_wanted: queues > 1,
                    },
                    _ => TapError::Ioctl {
                        name: name.to_string(),
                        what: "TUNSETIFF",
                        source: e,
                    },
                });
            }
            let hdr = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int.
            if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
                return Err(ioctl_err(name, "TUNSETVNETHDRSZ"));
            }
            fds.push(f);
        }
        let offloads = probe_offloads(fds[0].as_raw_fd());
        set_offload(fds[0].as_raw_fd(), 0).map_err(|source| TapError::Ioctl {
            name: name.to_string(),
            what: "TUNSETOFFLOAD",
            source,
        })?;
        let tap = Tap {
            name: name.to_string(),
            fds,
            offloads,
            created: !existed,
        };
        if tap.created {
            tap.set_up().map_err(|source| TapError::Ioctl {
                name: name.to_string(),
                what: "bring up (SIOCSIFFLAGS)",
                source,
            })?;
        }
        Ok(tap)
    }

    /// Set IFF_UP.
    pub fn set_up(&self) -> io::Result<()> {
        with_inet_socket(|s| {
            let mut req = IfReq::new(&self.name);
            // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS take a `struct ifreq`.
            unsafe {
                if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) < 0 {
                    return Err(io::Error::last_os_error());
                }
                req.value |= libc::IFF_UP;
                if libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        })
    }

    /// Set the interface MTU.
    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        with_inet_socket(|s| {
            let mut req = IfReq::new(&self.name);
            req.value = libc::c_int::from(mtu);
            // SAFETY: SIOCSIFMTU takes a `struct ifreq`.
            if unsafe { libc::ioctl(s, libc::SIOCSIFMTU, &mut req) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }

    /// Apply `TUNSETOFFLOAD` flags (device-wide).
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        set_offload(self.fds[0].as_raw_fd(), flags)
    }
}

fn with_inet_socket<T>(f: impl FnOnce(RawFd) -> io::Result<T>) -> io::Result<T> {
    // SAFETY: plain socket creation; the fd is owned by the File below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh descriptor nobody else owns.
    let s = unsafe { File::from_raw_fd(s) };
    f(s.as_raw_fd())
}

fn set_offload(fd: RawFd, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes an unsigned int by value.
    if unsafe { libc::ioctl(fd, TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn probe_offloads(fd: RawFd) -> TapOffloads {
    let tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
    let tso_ok = set_offload(fd, tso).is_ok();
    let ufo_ok = set_offload(fd, TUN_F_CSUM | TUN_F_UFO).is_ok();
    TapOffloads {
        tso: tso_ok,
        ufo: ufo_ok,
    }
}
