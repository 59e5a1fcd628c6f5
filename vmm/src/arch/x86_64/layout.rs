//! Guest physical memory layout, shared by the builder, the boot tables and snapshots.
//!
//! Low memory follows Firecracker's choices so a Linux guest finds what it expects: the
//! GDT/IDT below 0x1000, the zero page at 0x7000, page tables at 0x9000, the command line at
//! 0x20000, the MP table in the last KiB of base memory (0x9fc00) and the kernel at 1 MiB.
//! Devices live in a 32-bit MMIO hole below 4 GiB; RAM that would overlap it continues above
//! 4 GiB.

/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (empty: tiny guests and early Linux install their own).
pub const IDT_ADDR: u64 = 0x520;
/// Linux zero page (`struct boot_params`); `rsi` points here at entry.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// First of [`IDENTITY_MAP_GIB`] page directories (one per GiB, 2 MiB pages).
pub const PDE_ADDR: u64 = 0xb000;
/// How much of the address space the boot page tables identity-map.
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: the end of usable low RAM in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// Intel MP table (floating pointer, then the configuration table): the last KiB of base
/// memory, one of the places Linux scans for "_MP_", and outside e820 RAM.
pub const MPTABLE_START: u64 = EBDA_START;
/// Room for the MP table: up to the legacy video hole at 0xa0000.
pub const MPTABLE_MAX_SIZE: u64 = 0x400;
/// First byte of high memory; kernels are loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (virtio-mmio devices, LAPIC, IOAPIC).
pub const MMIO_HOLE_START: u64 = 0xd000_0000;
/// Size of the 32-bit MMIO hole (to 4 GiB).
pub const MMIO_HOLE_SIZE: u64 = (1 << 32) - MMIO_HOLE_START;
/// Where RAM resumes above the hole.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// Address KVM uses for its TSS (three pages, inside the MMIO hole, never RAM).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Each virtio-mmio device gets one 4 KiB window starting here.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_HOLE_START;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First legacy IRQ handed to virtio devices (5..=23 are free of ISA devices we emulate).
pub const VIRTIO_FIRST_IRQ: u32 = 5;

// The fixed tables must not overlap each other; checked at compile time.
const _: () = {
    assert!(PDE_ADDR + IDENTITY_MAP_GIB * 0x1000 <= CMDLINE_ADDR);
    assert!(ZERO_PAGE_ADDR + 0x1000 <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    // The MP table lies in the e820 gap between low RAM and 1 MiB, below the video hole.
    assert!(MPTABLE_START >= EBDA_START);
    assert!(MPTABLE_START.is_multiple_of(16));
    assert!(MPTABLE_START + MPTABLE_MAX_SIZE <= 0xa0000);
};

/// Most virtio-mmio devices one VM can have (IRQs 5..=23).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// MMIO window base and IRQ of virtio device number `index`.
pub fn virtio_slot(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
        VIRTIO_FIRST_IRQ + index as u32,
    )
}

/// The kernel command-line words announcing `count` virtio-mmio devices, for guests without
/// ACPI or a device tree.
pub fn virtio_cmdline(count: usize) -> String {
    (0..count)
        .map(|i| {
            let (base, irq) = virtio_slot(i);
            format!(" virtio_mmio.device=4K@{base:#x}:{irq}")
        })
        .collect()
}

/// The guest RAM ranges `(guest address, size)` for `size` bytes of RAM, split around the
/// MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (HIGH_RAM_START, size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_devices_are_announced_on_the_cmdline() {
        assert_eq!(
            virtio_cmdline(2),
            " virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![(0, MMIO_HOLE_START), (1 << 32, (4 << 30) - MMIO_HOLE_START)]
        );
        assert_eq!(r.iter().map(|(_, s)| s).sum::<u64>(), 4 << 30);
    }
}
