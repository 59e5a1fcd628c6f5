//! Brings up `lo` in the sandbox's fresh network namespace, its only link:
//! code can talk to itself over 127.0.0.1 but reach nothing else.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LoopbackError {
    #[error("opening a control socket")]
    Socket(#[source] io::Error),
    #[error("reading the flags of lo")]
    GetFlags(#[source] io::Error),
    #[error("setting lo up")]
    SetFlags(#[source] io::Error),
}

pub fn bring_up() -> Result<(), LoopbackError> {
    link_up("lo")
}

/// Sets link `name` up (and running) in this network namespace.
pub fn link_up(name: &str) -> Result<(), LoopbackError> {
    let mut ifr: libc::ifreq = {
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        unsafe { std::mem::zeroed() }
    };
    if name.is_empty() || name.len() >= ifr.ifr_name.len() || name.contains('\0') {
        return Err(LoopbackError::GetFlags(io::Error::from(
            io::ErrorKind::InvalidInput,
        )));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(LoopbackError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(LoopbackError::GetFlags(io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(LoopbackError::SetFlags(io::Error::last_os_error()));
    }
    Ok(())
}
