//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and moving packets between guest
//! buffers and host memory.

use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryMmap;

use crate::devices::virtio::chain::{self, ChainError};

/// Header length on the wire.
pub const HDR_LEN: usize = 44;
/// Stream sockets, the only type supported.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload accepted from the guest in one packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// A packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes the little-endian wire form.
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes to the wire form.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Reads a whole packet (header + payload) out of a validated tx chain's readable buffers.
pub fn read_packet(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
) -> Result<(Header, Vec<u8>), ChainError> {
    let bytes = chain::read_readable(descs, mem, HDR_LEN + MAX_PAYLOAD, "readable packet buffer")?;
    if bytes.len() < HDR_LEN {
        return Err(ChainError::Missing("vsock packet header"));
    }
    let mut raw = [0u8; HDR_LEN];
    raw.copy_from_slice(&bytes[..HDR_LEN]);
    let hdr = Header::parse(&raw);
    let payload_len = (hdr.len as usize).min(bytes.len() - HDR_LEN);
    let payload = bytes[HDR_LEN..HDR_LEN + payload_len].to_vec();
    Ok((hdr, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_wire_order() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 52,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        };
        let b = h.encode();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::parse(&b), h);
    }
}
