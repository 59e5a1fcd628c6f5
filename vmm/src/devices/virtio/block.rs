//! virtio-blk backed by a raw image file, read-only or read-write. Requests are served
//! synchronously; data moves straight between the file and guest memory.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::chain::{self, ChainError};
use super::VirtioDevice;

/// virtio device id of a block device.
pub const TYPE_BLOCK: u32 = 2;
const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Serial number reported for GET_ID (20 bytes, NUL-padded).
const DEVICE_ID: &[u8] = b"sessiond-virtio-blk";

/// Why the block device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening disk image {path:?}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path:?} is {size} bytes, not a whole number of 512-byte sectors")]
    Size { path: std::path::PathBuf, size: u64 },
}

/// A raw-file block device.
pub struct Block {
    file: File,
    read_only: bool,
    sectors: u64,
}

impl Block {
    /// Opens `path` (read-only when asked: the file is then opened without write access).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::options()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        if !size.is_multiple_of(SECTOR) {
            return Err(BlockError::Size {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(Block {
            file,
            read_only,
            sectors: size / SECTOR,
        })
    }

    /// Serves one validated request; returns the status byte and how many bytes were
    /// written into guest memory.
    fn execute(
        &mut self,
        kind: u32,
        sector: u64,
        data: &[Descriptor],
        mem: &GuestMemoryMmap,
    ) -> (u8, u32) {
        let len: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let in_bounds = sector
            .checked_mul(SECTOR)
            .and_then(|start| start.checked_add(len))
            .is_some_and(|end| end <= self.sectors * SECTOR);
        match kind {
            T_IN | T_OUT => {
                let writing = kind == T_OUT;
                if !in_bounds
                    || !len.is_multiple_of(SECTOR)
                    || data.iter().any(|d| d.is_write_only() == writing)
                {
                    return (S_IOERR, 0);
                }
                if writing && self.read_only {
                    return (S_IOERR, 0);
                }
                if self.file.seek(SeekFrom::Start(sector * SECTOR)).is_err() {
                    return (S_IOERR, 0);
                }
                for d in data {
                    let r = if writing {
                        mem.write_all_volatile_to(d.addr(), &mut self.file, d.len() as usize)
                    } else {
                        mem.read_exact_volatile_from(d.addr(), &mut self.file, d.len() as usize)
                    };
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "virtio-blk I/O failed");
                        return (S_IOERR, 0);
                    }
                }
                (S_OK, if writing { 0 } else { len as u32 })
            }
            T_FLUSH => match (self.read_only, self.file.sync_data()) {
                (true, _) | (false, Ok(())) => (S_OK, 0),
                (false, Err(_)) => (S_IOERR, 0),
            },
            T_GET_ID => {
                let Some(d) = data.first().filter(|d| d.is_write_only()) else {
                    return (S_IOERR, 0);
                };
                let mut id = [0u8; 20];
                id[..DEVICE_ID.len()].copy_from_slice(DEVICE_ID);
                let n = (d.len() as usize).min(id.len());
                match mem.write_slice(&id[..n], d.addr()) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_BLK_F_FLUSH | if self.read_only { VIRTIO_BLK_F_RO } else { 0 }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Only `capacity` (u64 sectors at offset 0) is provided; the rest reads as zero.
        let cap = self.sectors.to_le_bytes();
        super::read_config_bytes(&cap, offset, data);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, ChainError> {
        let queue = &mut queues[0];
        let mut used = false;
        while let Some((index, descs)) = chain::pop(queue, mem)? {
            // Header (readable, 16 bytes) first, status (writable, 1 byte) last, data between.
            let (Some(hdr), Some(status)) = (descs.first(), descs.last()) else {
                return Err(ChainError::Missing("descriptors"));
            };
            if descs.len() < 2 || hdr.is_write_only() || hdr.len() < 16 {
                return Err(ChainError::Missing("readable 16-byte request header"));
            }
            if !status.is_write_only() || status.len() < 1 {
                return Err(ChainError::Missing("writable status byte"));
            }
            let kind: u32 = mem
                .read_obj(hdr.addr())
                .map_err(|_| ChainError::Missing("header"))?;
            let sector: u64 = mem
                .read_obj(vm_memory::GuestAddress(hdr.addr().0 + 8))
                .map_err(|_| ChainError::Missing("header"))?;
            let (code, written) = self.execute(kind, sector, &descs[1..descs.len() - 1], mem);
            // The status descriptor was range-checked with the chain.
            mem.write_obj(code, status.addr())
                .map_err(|_| ChainError::Missing("writable status byte"))?;
            queue
                .add_used(mem, index, written + 1)
                .map_err(|e| ChainError::UsedRing(format!("{e:?}")))?;
            used = true;
        }
        Ok(used)
    }
}
