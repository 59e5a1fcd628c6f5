//! Boot-time tables written into guest memory: GDT, identity-mapped page tables for a 64-bit
//! entry, and the Linux zero page with its e820 map and command line.

use linux_loader::loader::bootparam::boot_params;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::boot_gdt;
use super::layout::*;

/// Why the boot tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BootSetupError {
    #[error("writing {what} into guest memory")]
    GuestWrite {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("the guest has {0} RAM ranges, more than the e820 map holds")]
    TooManyRanges(usize),
}

/// `boot_params` with the `ByteValued` marker vm-memory needs to copy it.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct BootParams(boot_params);

// SAFETY: boot_params is a plain-old-data, packed C struct (integers and arrays of them), so
// every byte pattern is a valid value and it has no padding the compiler could exploit.
unsafe impl ByteValued for BootParams {}

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

fn write<T: ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    val: T,
    addr: u64,
) -> Result<(), BootSetupError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| BootSetupError::GuestWrite { what, source })
}

/// Writes the GDT and an empty IDT.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootSetupError> {
    for (i, entry) in boot_gdt().iter().enumerate() {
        write(mem, "the GDT", *entry, GDT_ADDR + 8 * i as u64)?;
    }
    write(mem, "the IDT", 0u64, IDT_ADDR)
}

/// Identity-maps the first [`IDENTITY_MAP_GIB`] GiB with 2 MiB pages, so a guest entered in
/// long mode can touch all low RAM and the MMIO hole with physical addresses.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootSetupError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    write(mem, "the PML4", PDPTE_ADDR | PRESENT_RW, PML4_ADDR)?;
    for gib in 0..IDENTITY_MAP_GIB {
        let pde = PDE_ADDR + gib * 0x1000;
        write(mem, "the PDPTE", pde | PRESENT_RW, PDPTE_ADDR + gib * 8)?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            write(mem, "a PDE", addr | PRESENT_RW | HUGE, pde + i * 8)?;
        }
    }
    Ok(())
}

/// Writes the command line and the zero page (setup header + e820 map of `ram`).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    ram: &[(u64, u64)],
) -> Result<(), BootSetupError> {
    let bytes = cmdline.as_bytes();
    if bytes.contains(&0) {
        return Err(BootSetupError::CmdlineNul);
    }
    if bytes.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootSetupError::CmdlineTooLong {
            len: bytes.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    mem.write_slice(bytes, GuestAddress(CMDLINE_ADDR))
        .and_then(|()| mem.write_obj(0u8, GuestAddress(CMDLINE_ADDR + bytes.len() as u64)))
        .map_err(|source| BootSetupError::GuestWrite {
            what: "the command line",
            source,
        })?;

    let mut params = BootParams::default();
    let hdr = &mut params.0.hdr;
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = bytes.len() as u32;
    hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;

    let mut e820 = vec![(0, EBDA_START)];
    for &(start, size) in ram {
        // Low memory below 1 MiB is described by the first entry; the rest starts at HIMEM.
        let (start, end) = (start.max(HIMEM_START), start + size);
        if end > start {
            e820.push((start, end - start));
        }
    }
    if e820.len() > params.0.e820_table.len() {
        return Err(BootSetupError::TooManyRanges(e820.len()));
    }
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.0.e820_table[i].addr = *addr;
        params.0.e820_table[i].size = *size;
        params.0.e820_table[i].r#type = E820_RAM;
    }
    params.0.e820_entries = e820.len() as u8;
    write(mem, "the zero page", params, ZERO_PAGE_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    fn read_params(m: &GuestMemoryMmap) -> boot_params {
        m.read_obj::<BootParams>(GuestAddress(ZERO_PAGE_ADDR))
            .unwrap()
            .0
    }

    #[test]
    fn e820_describes_low_and_high_ram() {
        let m = mem(64 << 20);
        write_boot_params(&m, "console=ttyS0", &ram_ranges(64 << 20)).unwrap();
        let p = read_params(&m);
        assert_eq!(p.e820_entries, 2);
        let t = p.e820_table;
        assert_eq!((t[0].addr, t[0].size), (0, EBDA_START));
        assert_eq!(
            (t[1].addr, t[1].size),
            (HIMEM_START, (64 << 20) - HIMEM_START)
        );
        let hdr = p.hdr;
        assert_eq!(hdr.cmd_line_ptr as u64, CMDLINE_ADDR);
        let size = hdr.cmdline_size;
        assert_eq!(size, 13);
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn e820_skips_the_mmio_hole() {
        // Only the layout is checked here: no 4 GiB allocation in a unit test.
        let m = mem(64 << 20);
        let ram = ram_ranges(5 << 30);
        write_boot_params(&m, "", &ram).unwrap();
        let p = read_params(&m);
        assert_eq!(p.e820_entries, 3);
        let t = p.e820_table;
        assert_eq!(
            (t[1].addr, t[1].size),
            (HIMEM_START, MMIO_HOLE_START - HIMEM_START)
        );
        assert_eq!(
            (t[2].addr, t[2].size),
            (1 << 32, (5 << 30) - MMIO_HOLE_START)
        );
    }

    #[test]
    fn overlong_or_nul_cmdline_is_refused() {
        let m = mem(8 << 20);
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_boot_params(&m, &long, &ram_ranges(8 << 20)),
            Err(BootSetupError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            write_boot_params(&m, "a\0b", &ram_ranges(8 << 20)),
            Err(BootSetupError::CmdlineNul)
        ));
    }

    #[test]
    fn page_tables_identity_map_2mib_pages() {
        let m = mem(8 << 20);
        write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPTE_ADDR | 3);
        let pde: u64 = m.read_obj(GuestAddress(PDE_ADDR + 8 * 3)).unwrap();
        assert_eq!(pde, (3 << 21) | 0x83);
        let pde_hole: u64 = m
            .read_obj(GuestAddress(PDE_ADDR + 3 * 0x1000 + 8 * 0x80))
            .unwrap();
        assert_eq!(pde_hole, 0xd000_0000 | 0x83);
    }
}
