//! Boot-time tables written into guest memory: GDT, identity-mapped page tables for a 64-bit
//! entry, and the Linux zero page with its e820 map, command line and initrd; where the
//! initrd goes.

use linux_loader::loader::bootparam::boot_params;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::bzimage::{SetupHeader, SETUP_HEADER_OFFSET};
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
    #[error(
        "the initrd is {size} bytes; guest RAM between the kernel's end ({lowest:#x}) and the \
         highest initrd address allowed ({limit:#x}) is smaller: give the VM more memory"
    )]
    InitrdTooBig { size: u64, lowest: u64, limit: u64 },
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
const PAGE_SIZE: u64 = 0x1000;
// loadflags bits a loader modifies (boot.rst).
const QUIET_FLAG: u8 = 1 << 5;
const KEEP_SEGMENTS: u8 = 1 << 6;
const CAN_USE_HEAP: u8 = 1 << 7;
// vid_mode: "normal" text mode, what a loader without a video mode request writes.
const VID_MODE_NORMAL: u16 = 0xffff;

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

/// What the zero page describes besides the RAM map.
pub struct BootInfo<'a> {
    /// Kernel command line (written at [`CMDLINE_ADDR`]).
    pub cmdline: &'a str,
    /// Guest RAM ranges `(address, size)`, for the e820 map.
    pub ram: &'a [(u64, u64)],
    /// A bzImage's setup header: the zero page starts from it, as the boot protocol says.
    /// `None` for an ELF kernel, which has none.
    pub setup_header: Option<&'a SetupHeader>,
    /// Where the initrd was loaded: `(address, size)`.
    pub initrd: Option<(u64, u64)>,
}

/// Where to load an initrd of `size` bytes: page-aligned, as high as possible with its last
/// byte below `limit`, and not below `lowest` (the end of what the kernel occupies).
pub fn place_initrd(size: u64, lowest: u64, limit: u64) -> Result<u64, BootSetupError> {
    let too_big = || BootSetupError::InitrdTooBig {
        size,
        lowest,
        limit,
    };
    let start = limit.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    let floor = lowest
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or_else(too_big)?;
    if start < floor {
        return Err(too_big());
    }
    Ok(start)
}

/// Writes the command line and the zero page: the bzImage's setup header (if any) with the
/// loader's fields filled in, the e820 map of `ram`, the initrd's place.
pub fn write_boot_params(mem: &GuestMemoryMmap, info: &BootInfo<'_>) -> Result<(), BootSetupError> {
    let bytes = info.cmdline.as_bytes();
    if bytes.contains(&0) {
        return Err(BootSetupError::CmdlineNul);
    }
    let max = match info.setup_header {
        Some(h) => (h.cmdline_size as usize).min(CMDLINE_MAX_SIZE - 1),
        None => CMDLINE_MAX_SIZE - 1,
    };
    if bytes.len() > max {
        return Err(BootSetupError::CmdlineTooLong {
            len: bytes.len(),
            max,
        });
    }
    mem.write_slice(bytes, GuestAddress(CMDLINE_ADDR))
        .and_then(|()| mem.write_obj(0u8, GuestAddress(CMDLINE_ADDR + bytes.len() as u64)))
        .map_err(|source| BootSetupError::GuestWrite {
            what: "the command line",
            source,
        })?;

    let mut params = BootParams::default();
    match info.setup_header {
        Some(h) => {
            // boot.rst, 32/64-bit protocol: zero the page, copy the image's setup header
            // (0x1f1 to its end) into it, then write the loader's fields.
            let at = SETUP_HEADER_OFFSET;
            params.as_mut_slice()[at..at + h.raw.len()].copy_from_slice(&h.raw);
            let hdr = &mut params.0.hdr;
            // No real-mode setup code runs on a 64-bit entry: it has no heap, and the
            // segment and quiet flags are for it alone.
            hdr.loadflags &= !(CAN_USE_HEAP | KEEP_SEGMENTS | QUIET_FLAG);
            hdr.heap_end_ptr = 0;
            hdr.vid_mode = VID_MODE_NORMAL;
            // cmdline_size is the kernel's to state (a "read" field): left as the image has it.
        }
        None => {
            let hdr = &mut params.0.hdr;
            hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            hdr.header = KERNEL_HDR_MAGIC;
            hdr.cmdline_size = bytes.len() as u32;
            hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    let hdr = &mut params.0.hdr;
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    if let Some((addr, size)) = info.initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
        params.0.ext_ramdisk_image = (addr >> 32) as u32;
        params.0.ext_ramdisk_size = (size >> 32) as u32;
    }

    let mut e820 = vec![(0, EBDA_START)];
    for &(start, size) in info.ram {
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

    fn info<'a>(cmdline: &'a str, ram: &'a [(u64, u64)]) -> BootInfo<'a> {
        BootInfo {
            cmdline,
            ram,
            setup_header: None,
            initrd: None,
        }
    }

    fn read_params(m: &GuestMemoryMmap) -> boot_params {
        m.read_obj::<BootParams>(GuestAddress(ZERO_PAGE_ADDR))
            .unwrap()
            .0
    }

    #[test]
    fn e820_describes_low_and_high_ram() {
        let m = mem(64 << 20);
        write_boot_params(&m, &info("console=ttyS0", &ram_ranges(64 << 20))).unwrap();
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
        write_boot_params(&m, &info("", &ram)).unwrap();
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
            write_boot_params(&m, &info(&long, &ram_ranges(8 << 20))),
            Err(BootSetupError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            write_boot_params(&m, &info("a\0b", &ram_ranges(8 << 20))),
            Err(BootSetupError::CmdlineNul)
        ));
    }

    #[test]
    fn bzimage_header_is_the_zero_pages_start() {
        let image = crate::test_guests::pack_bzimage(&[0xf4; 64], 0x2000);
        let mut image_hdr = SetupHeader::parse(&image).unwrap();
        // Flags only the real-mode setup code uses: a 64-bit entry clears them.
        image_hdr.raw[0x211 - SETUP_HEADER_OFFSET] |= QUIET_FLAG | CAN_USE_HEAP;
        let m = mem(64 << 20);
        let ram = ram_ranges(64 << 20);
        write_boot_params(
            &m,
            &BootInfo {
                cmdline: "console=ttyS0",
                ram: &ram,
                setup_header: Some(&image_hdr),
                initrd: Some((0x3f0_0000, 12345)),
            },
        )
        .unwrap();
        let p = read_params(&m);
        let hdr = p.hdr;
        let (version, xlf, init_size) = (hdr.version, hdr.xloadflags, hdr.init_size);
        assert_eq!((version, xlf, init_size), (0x020f, 1, 0x2000));
        let (cmdline_size, ptr, loader) = (hdr.cmdline_size, hdr.cmd_line_ptr, hdr.type_of_loader);
        assert_eq!(cmdline_size, 2047, "the kernel's limit stays");
        assert_eq!((ptr as u64, loader), (CMDLINE_ADDR, 0xff));
        assert_eq!(
            hdr.loadflags, 1,
            "LOADED_HIGH kept, setup-only flags cleared"
        );
        let (image, size) = (hdr.ramdisk_image, hdr.ramdisk_size);
        assert_eq!((image, size), (0x3f0_0000, 12345));
        let (ext_image, ext_size) = (p.ext_ramdisk_image, p.ext_ramdisk_size);
        assert_eq!((ext_image, ext_size), (0, 0));
        assert_eq!(p.e820_entries, 2);

        let long = "x".repeat(2048);
        let e = write_boot_params(
            &m,
            &BootInfo {
                cmdline: &long[..2048],
                ram: &ram,
                setup_header: Some(&image_hdr),
                initrd: None,
            },
        )
        .unwrap_err();
        assert!(matches!(
            e,
            BootSetupError::CmdlineTooLong {
                len: 2048,
                max: 2047
            }
        ));
    }

    #[test]
    fn initrd_goes_as_high_as_allowed() {
        assert_eq!(
            place_initrd(12345, 0x20_0000, 0x400_0000).unwrap(),
            0x3ff_c000
        );
        assert_eq!(
            place_initrd(0x1000, 0x20_0000, 0x400_0000).unwrap(),
            0x3ff_f000
        );
        // Exactly fits between the kernel's end and the limit.
        assert_eq!(
            place_initrd(0x1000, 0x3ff_f000, 0x400_0000).unwrap(),
            0x3ff_f000
        );
        // A kernel end inside a page rounds up: the initrd never shares the kernel's page.
        let e = place_initrd(0x1000, 0x3ff_f001, 0x400_0000).unwrap_err();
        assert!(e.to_string().contains("give the VM more memory"), "{e}");
        assert!(place_initrd(0x500_0000, 0x20_0000, 0x400_0000).is_err());
        // Bounds taken from a nonsense kernel header are refused, not overflowed.
        assert!(place_initrd(0x1000, u64::MAX - 10, u64::MAX).is_err());
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
