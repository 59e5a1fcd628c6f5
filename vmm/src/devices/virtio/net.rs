//! virtio-net backed by a tap device (by name). Frames pass through unchanged, with the
//! 12-byte virtio-net header that the tap is told to expect (`IFF_VNET_HDR`), and no
//! offloads are negotiated. Transmit happens on the vCPU thread that notified; receive is
//! driven by the device's event thread (tap readable) and by the guest posting buffers.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::Epoll;

use super::chain::{self, ChainError};
use super::VirtioDevice;

/// virtio device id of a network card.
pub const TYPE_NET: u32 = 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `struct virtio_net_hdr_v1`: always 12 bytes with VERSION_1.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame plus header moved in one buffer (no TSO/UFO negotiated).
const MAX_FRAME: usize = NET_HDR_LEN + 65_550;
const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// Why the tap could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    #[error("opening /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("attaching tap {name:?} ({what})")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("MAC address {0:?} is not six colon-separated hex bytes")]
    Mac(String),
    #[error("setting up the net event loop")]
    Epoll(#[source] std::io::Error),
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetError> {
    let parts: Vec<&str> = text.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(NetError::Mac(text.to_owned()));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(NetError::Mac(text.to_owned()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| NetError::Mac(text.to_owned()))?;
    }
    Ok(mac)
}

fn open_tap(name: &str) -> Result<File, NetError> {
    if name.is_empty() || name.len() > 15 || name.contains('\0') {
        return Err(NetError::Name(name.to_owned()));
    }
    let tun = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(NetError::OpenTun)?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let ioctl_err = |what| {
        move |source| NetError::Ioctl {
            name: name.to_owned(),
            what,
            source,
        }
    };
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes, laid out by IfReq);
    // `req` lives across the call and `tun` is an open /dev/net/tun fd.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(ioctl_err("TUNSETIFF")(std::io::Error::last_os_error()));
    }
    let hdr_len: libc::c_int = NET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid for the call.
    let r = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            TUNSETVNETHDRSZ,
            &hdr_len as *const libc::c_int,
        )
    };
    if r < 0 {
        return Err(ioctl_err("TUNSETVNETHDRSZ")(std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value (no offloads); no memory is passed.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) };
    if r < 0 {
        return Err(ioctl_err("TUNSETOFFLOAD")(std::io::Error::last_os_error()));
    }
    Ok(tun)
}

/// Creates tap `name` (as [`Net::new`] would attach it) as a persistent device owned by
/// `uid`/`gid`, so that a VMM running as that uid without CAP_NET_ADMIN can attach to it
/// later. Needs CAP_NET_ADMIN; a jail calls it in the VM's network namespace before it
/// drops privileges.
pub fn create_persistent_tap(name: &str, uid: u32, gid: u32) -> Result<(), NetError> {
    let tun = open_tap(name)?;
    for (what, request, value) in [
        ("TUNSETOWNER", TUNSETOWNER, libc::c_ulong::from(uid)),
        ("TUNSETGROUP", TUNSETGROUP, libc::c_ulong::from(gid)),
        ("TUNSETPERSIST", TUNSETPERSIST, 1),
    ] {
        // SAFETY: these ioctls take their argument by value; no memory is passed.
        if unsafe { libc::ioctl(tun.as_raw_fd(), request, value) } < 0 {
            return Err(NetError::Ioctl {
                name: name.to_owned(),
                what,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// A tap-backed network card.
pub struct Net {
    tap: File,
    mac: [u8; 6],
    epoll: Arc<Epoll>,
    /// A frame read from the tap that found no guest buffer yet.
    pending: Option<Vec<u8>>,
}

impl Net {
    /// Attaches to (or creates) the tap called `name`.
    pub fn new(name: &str, mac: [u8; 6]) -> Result<Self, NetError> {
        let tap = open_tap(name)?;
        let epoll = super::epoll_on_input(tap.as_raw_fd()).map_err(NetError::Epoll)?;
        Ok(Net {
            tap,
            mac,
            epoll: Arc::new(epoll),
            pending: None,
        })
    }

    /// Uses an already open tap fd (for a jailed VMM handed its fds).
    ///
    /// # Safety
    /// `fd` must be an open tap fd configured with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a
    /// 12-byte vnet header, owned by nobody else.
    pub unsafe fn from_raw_fd(fd: i32, mac: [u8; 6]) -> Result<Self, NetError> {
        // SAFETY: the caller hands over ownership of an open fd.
        let tap = unsafe { File::from_raw_fd(fd) };
        let epoll = super::epoll_on_input(fd).map_err(NetError::Epoll)?;
        Ok(Net {
            tap,
            mac,
            epoll: Arc::new(epoll),
            pending: None,
        })
    }

    fn transmit(&mut self, txq: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, ChainError> {
        let mut used = false;
        while let Some((index, descs)) = chain::pop(txq, mem)? {
            let frame = chain::read_readable(&descs, mem, MAX_FRAME, "readable frame buffer")?;
            if frame.len() < NET_HDR_LEN {
                return Err(ChainError::Missing("virtio-net header"));
            }
            // A full or downed tap drops the frame, as a real link would.
            if let Err(e) = self.tap.write(&frame) {
                tracing::debug!(error = %e, "tap write dropped a frame");
            }
            txq.add_used(mem, index, 0)
                .map_err(|e| ChainError::UsedRing(format!("{e:?}")))?;
            used = true;
        }
        Ok(used)
    }

    fn receive(&mut self, rxq: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, ChainError> {
        let mut used = false;
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => {
                    let mut buf = vec![0u8; MAX_FRAME];
                    match self.tap.read(&mut buf) {
                        Ok(n) if n >= NET_HDR_LEN => {
                            buf.truncate(n);
                            buf
                        }
                        Ok(_) => continue,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
            };
            let Some((index, descs)) = chain::pop(rxq, mem)? else {
                self.pending = Some(frame);
                break;
            };
            let room = chain::writable_capacity(&descs)?;
            if room < frame.len() {
                // Without mergeable buffers the guest must post buffers that fit a frame;
                // one that does not is dropped rather than truncated.
                rxq.add_used(mem, index, 0)
                    .map_err(|e| ChainError::UsedRing(format!("{e:?}")))?;
                used = true;
                continue;
            }
            chain::write_writable(&descs, mem, &frame)?;
            rxq.add_used(mem, index, frame.len() as u32)
                .map_err(|e| ChainError::UsedRing(format!("{e:?}")))?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], then status (u16, bit 0 = link up).
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6] = 1;
        super::read_config_bytes(&cfg, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, ChainError> {
        if index == TXQ {
            self.transmit(&mut queues[TXQ], mem)
        } else {
            self.receive(&mut queues[RXQ], mem)
        }
    }

    fn process_backend(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, ChainError> {
        self.receive(&mut queues[RXQ], mem)
    }

    fn backend_epoll(&self) -> Option<Arc<Epoll>> {
        Some(self.epoll.clone())
    }

    fn reset(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_are_parsed_strictly() {
        assert_eq!(
            parse_mac("02:00:00:ab:cd:ef").unwrap(),
            [2, 0, 0, 0xab, 0xcd, 0xef]
        );
        assert!(parse_mac("02:00:00:ab:cd").is_err());
        assert!(parse_mac("02:00:00:ab:cd:efg").is_err());
        assert!(parse_mac("zz:00:00:ab:cd:ef").is_err());
    }

    #[test]
    fn bad_tap_names_are_refused_before_any_syscall() {
        assert!(matches!(Net::new("", [0; 6]), Err(NetError::Name(_))));
        assert!(matches!(
            Net::new("a-name-longer-than-15", [0; 6]),
            Err(NetError::Name(_))
        ));
    }
}
