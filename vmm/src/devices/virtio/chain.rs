//! Validation of the descriptor chains a guest offers. Nothing a guest writes into a
//! virtqueue is trusted: every descriptor must lie inside guest memory, chains must end
//! (no loops, bounded length), and the total length is bounded.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

/// Longest chain accepted (Linux never builds longer ones for the devices emulated here).
pub const MAX_CHAIN_LEN: usize = 256;
/// Largest total payload of one chain.
pub const MAX_CHAIN_BYTES: u64 = 16 << 20;

/// How a chain broke the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor {index} ({addr:#x}+{len:#x}) is outside guest memory")]
    OutOfRange { index: usize, addr: u64, len: u32 },
    #[error("the chain does not end: a loop, a bad next index or an unreadable descriptor")]
    Unterminated,
    #[error("the chain is longer than {MAX_CHAIN_LEN} descriptors")]
    TooLong,
    #[error("the chain carries {0} bytes, more than {MAX_CHAIN_BYTES}")]
    TooBig(u64),
    #[error("the available ring is invalid: {0}")]
    AvailRing(String),
    #[error("writing the used ring: {0}")]
    UsedRing(String),
    #[error("the request has no {0}")]
    Missing(&'static str),
}

/// Takes the next chain the driver made available on `queue` and validates it: returns its head
/// index (what the used ring answers with) and its descriptors, or None when the driver has
/// offered nothing new.
pub fn pop(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<Option<(u16, Vec<Descriptor>)>, ChainError> {
    let next = queue
        .iter(mem)
        .map_err(|e| ChainError::AvailRing(format!("{e:?}")))?
        .next();
    let Some(head) = next else {
        return Ok(None);
    };
    let index = head.head_index();
    Ok(Some((index, validate(head, mem)?)))
}

/// Concatenates the driver-readable buffers of a validated chain, refusing more than `max`
/// bytes in all; `what` names the buffer in the error when guest memory cannot be read.
pub fn read_readable(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    max: usize,
    what: &'static str,
) -> Result<Vec<u8>, ChainError> {
    let mut bytes = Vec::new();
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        let len = d.len() as usize;
        if bytes.len() + len > max {
            return Err(ChainError::TooBig((bytes.len() + len) as u64));
        }
        let start = bytes.len();
        bytes.resize(start + len, 0);
        mem.read_slice(&mut bytes[start..], d.addr())
            .map_err(|_| ChainError::Missing(what))?;
    }
    Ok(bytes)
}

/// Total room in a validated chain of receive buffers, which must all be device-writable.
pub fn writable_capacity(descs: &[Descriptor]) -> Result<usize, ChainError> {
    if descs.iter().any(|d| !d.is_write_only()) {
        return Err(ChainError::Missing("device-writable rx buffer"));
    }
    Ok(descs.iter().map(|d| d.len() as usize).sum())
}

/// Writes `bytes` across a validated chain's buffers in order; the caller checked the room
/// with [`writable_capacity`].
pub fn write_writable(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    bytes: &[u8],
) -> Result<(), ChainError> {
    let mut rest = bytes;
    for d in descs {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(d.len() as usize);
        mem.write_slice(&rest[..n], d.addr())
            .map_err(|_| ChainError::Missing("device-writable rx buffer"))?;
        rest = &rest[n..];
    }
    Ok(())
}

/// Walks a chain and checks every descriptor; returns the descriptors in order.
pub fn validate(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<Vec<Descriptor>, ChainError> {
    let mut descs = Vec::new();
    let mut total = 0u64;
    // virtio-queue stops iterating on a loop (its TTL), an out-of-range next index or an
    // unreadable descriptor; the only way to tell that apart from a proper end is that the
    // last descriptor still says "next".
    for desc in chain {
        if descs.len() == MAX_CHAIN_LEN {
            return Err(ChainError::TooLong);
        }
        let index = descs.len();
        if !GuestMemoryBackend::check_range(mem, desc.addr(), desc.len() as usize) {
            return Err(ChainError::OutOfRange {
                index,
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        total += u64::from(desc.len());
        if total > MAX_CHAIN_BYTES {
            return Err(ChainError::TooBig(total));
        }
        descs.push(desc);
    }
    match descs.last() {
        Some(last) if !last.has_next() => Ok(descs),
        _ => Err(ChainError::Unterminated),
    }
}
