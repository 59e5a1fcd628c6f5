//! Guest RAM: anonymous for a fresh boot, a private (copy-on-write) file mapping for a restore,
//! and a sparse dump for snapshots.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};

use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::arch::x86_64::layout::ram_ranges;

/// Why guest memory could not be set up or saved.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("mapping {size} bytes of guest memory")]
    Map {
        size: u64,
        #[source]
        source: MmapRegionError,
    },
    #[error("guest memory regions overlap or are empty")]
    Regions,
    #[error("the memory file holds {actual} bytes but the guest has {expected} (truncated or wrong file?)")]
    FileSize { expected: u64, actual: u64 },
    #[error("reading the memory file's size")]
    FileMetadata(#[source] std::io::Error),
    #[error("duplicating the memory file descriptor")]
    CloneFd(#[source] std::io::Error),
    #[error("writing the memory file")]
    Dump(#[source] std::io::Error),
}

fn collect(regions: Vec<GuestRegionMmap>) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Regions)
}

/// Fresh, zero-filled guest RAM of `size` bytes, laid out around the MMIO hole.
pub fn anonymous(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Map { size: len, source })?;
        regions
            .push(GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or(MemoryError::Regions)?);
    }
    collect(regions)
}

/// Guest RAM backed by the first `size` bytes of `file` (a snapshot's memory file) mapped MAP_PRIVATE: pages are read
/// from the page cache on first touch and shared by every clone until one writes, so mapping
/// costs the same whatever the guest's size.
pub fn from_file(file: &File, size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let actual = file.metadata().map_err(MemoryError::FileMetadata)?.len();
    if actual < size {
        return Err(MemoryError::FileSize {
            expected: size,
            actual,
        });
    }
    let mut regions = Vec::new();
    let mut offset = 0;
    for (start, len) in ram_ranges(size) {
        let fd = file.try_clone().map_err(MemoryError::CloneFd)?;
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Map { size: len, source })?;
        regions
            .push(GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or(MemoryError::Regions)?);
        offset += len;
    }
    collect(regions)
}

/// Total guest RAM in bytes.
pub fn size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Host virtual address ranges `(address, length)` of every region, in guest order.
pub fn host_ranges(mem: &GuestMemoryMmap) -> Vec<(usize, usize)> {
    mem.iter()
        .map(|r| (r.as_ptr() as usize, r.size()))
        .collect()
}

/// Writes all guest RAM to `file`, regions back to back, leaving all-zero pages as holes so a
/// mostly empty guest makes a small, sparse file. The vCPUs must be paused.
pub fn dump(mem: &GuestMemoryMmap, file: &mut File) -> Result<(), MemoryError> {
    let total = size(mem);
    file.set_len(0).map_err(MemoryError::Dump)?;
    // Opened once; without it (no /proc) every page is read, which is only slower.
    let pagemap = File::open("/proc/self/pagemap").ok();
    let mut offset = 0u64;
    for region in mem.iter() {
        // SAFETY: the mapping is `region.size()` bytes long and lives as long as `mem`; the
        // vCPUs and the devices' host sides are paused, so nothing writes to it while this
        // shared view exists.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.size()) };
        // Anonymous RAM the guest never touched has no pages at all: asking the kernel which
        // pages exist saves faulting in (and comparing) every zero page, which dominates
        // the cost of snapshotting a large, mostly idle guest. A file-backed region (a
        // restored clone) can hold data in pages it has not touched, so it is read whole.
        let anonymous = region.file_offset().is_none();
        for (start, chunk) in bytes.chunks(PAGES_PER_CHUNK * PAGE).enumerate() {
            let base = start * PAGES_PER_CHUNK;
            let populated = match (&pagemap, anonymous) {
                (Some(pm), true) => populated_pages(pm, chunk),
                _ => None,
            };
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                if populated.as_ref().is_some_and(|p| !p[i]) || page.iter().all(|b| *b == 0) {
                    continue;
                }
                file.seek(SeekFrom::Start(offset + ((base + i) * PAGE) as u64))
                    .map_err(MemoryError::Dump)?;
                file.write_all(page).map_err(MemoryError::Dump)?;
            }
        }
        offset += region.size() as u64;
    }
    file.set_len(total).map_err(MemoryError::Dump)?;
    file.sync_data().map_err(MemoryError::Dump)
}

const PAGE: usize = 4096;
const PAGES_PER_CHUNK: usize = 16384;

/// For each page of `range`, whether it is present in RAM or swapped out (else it was never
/// touched and reads as zero), from /proc/self/pagemap (one 64-bit entry per page: bit 63
/// present, bit 62 swapped). None if the kernel would not say.
fn populated_pages(pagemap: &File, range: &[u8]) -> Option<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    let pages = range.len().div_ceil(PAGE);
    let mut entries = vec![0u8; pages * 8];
    let at = (range.as_ptr() as u64 / PAGE as u64) * 8;
    pagemap.read_exact_at(&mut entries, at).ok()?;
    Some(
        entries
            .chunks_exact(8)
            .map(|e| {
                let v = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
                v & (3 << 62) != 0
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn scratch_file(name: &str) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("vmm-mem-{name}-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (path, f)
    }

    #[test]
    fn dump_then_map_private_round_trips_and_is_copy_on_write() {
        let mem = anonymous(8 << 20).unwrap();
        mem.write_obj(0xdead_beef_u64, GuestAddress(0x12345))
            .unwrap();
        mem.write_obj(7u8, GuestAddress((8 << 20) - 1)).unwrap();
        let (path, mut f) = scratch_file("test");
        dump(&mem, &mut f).unwrap();
        let a = from_file(&f, 8 << 20).unwrap();
        let b = from_file(&f, 8 << 20).unwrap();
        assert_eq!(
            a.read_obj::<u64>(GuestAddress(0x12345)).unwrap(),
            0xdead_beef
        );
        assert_eq!(a.read_obj::<u8>(GuestAddress((8 << 20) - 1)).unwrap(), 7);
        a.write_obj(1u64, GuestAddress(0x12345)).unwrap();
        assert_eq!(
            b.read_obj::<u64>(GuestAddress(0x12345)).unwrap(),
            0xdead_beef
        );
        assert!(matches!(
            from_file(&f, 16 << 20),
            Err(MemoryError::FileSize { .. })
        ));

        // A clone snapshotted again keeps the data it never touched (its pages are only in
        // the file, not in its page tables), as well as what it wrote.
        let (again, mut g) = scratch_file("again");
        dump(&a, &mut g).unwrap();
        let c = from_file(&g, 8 << 20).unwrap();
        assert_eq!(c.read_obj::<u64>(GuestAddress(0x12345)).unwrap(), 1);
        assert_eq!(c.read_obj::<u8>(GuestAddress((8 << 20) - 1)).unwrap(), 7);
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(again).unwrap();
    }

    #[test]
    fn dump_finds_every_written_page_of_a_large_sparse_guest() {
        let mem = anonymous(256 << 20).unwrap();
        let spots = [0u64, 4096 * 7, 64 << 20, (128 << 20) + 8, (256 << 20) - 8];
        for (i, at) in spots.iter().enumerate() {
            mem.write_obj(i as u64 + 1, GuestAddress(*at)).unwrap();
        }
        // Read, never written: present as the shared zero page, still zero in the dump.
        let _: u64 = mem.read_obj(GuestAddress(32 << 20)).unwrap();
        let (path, mut f) = scratch_file("sparse");
        dump(&mem, &mut f).unwrap();
        let back = from_file(&f, 256 << 20).unwrap();
        for (i, at) in spots.iter().enumerate() {
            assert_eq!(
                back.read_obj::<u64>(GuestAddress(*at)).unwrap(),
                i as u64 + 1
            );
        }
        use std::os::unix::fs::MetadataExt;
        let on_disk = f.metadata().unwrap().blocks() * 512;
        assert!(on_disk <= 64 * 4096, "sparse file uses {on_disk} bytes");
        std::fs::remove_file(path).unwrap();
    }
}
