//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI (Linux with
//! `acpi=off` or no ACPI tables, as here) learns its CPUs, its IOAPIC and how ISA interrupts
//! reach it. Without it Linux sees one CPU and drives interrupts through the 8259 PIC.
//!
//! The table is built as bytes (layouts from the MP spec, chapter 4) and written at
//! [`MPTABLE_START`]: the floating pointer structure "_MP_" first, the configuration table
//! "PCMP" right after it. Linux finds it by scanning the last KiB of base memory in 16-byte
//! steps (`arch/x86/kernel/mpparse.c`); the e820 map leaves that KiB out of RAM.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{MPTABLE_MAX_SIZE, MPTABLE_START};

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error(
        "an MP table for {count} vCPUs does not fit in its {MPTABLE_MAX_SIZE} bytes (at most \
         {max} vCPUs)"
    )]
    TooManyVcpus { count: u8, max: u8 },
    #[error("an MP table needs at least one vCPU")]
    NoVcpus,
    #[error("writing the MP table into guest memory")]
    GuestWrite(#[source] vm_memory::GuestMemoryError),
}

/// Where KVM's IOAPIC and LAPICs sit (their architectural defaults).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's IOAPIC reports version 0x11; its LAPICs 0x14.
const IOAPIC_VERSION: u8 = 0x11;
const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC pins KVM's default GSI routing wires up (GSI n on pin n).
pub const IOAPIC_PINS: u8 = 24;

const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_SIZE: usize = 20;
/// Bus, IOAPIC, I/O interrupt and local interrupt entries are all 8 bytes.
const SHORT_ENTRY_SIZE: usize = 8;

// Entry types.
const PROCESSOR: u8 = 0;
const BUS: u8 = 1;
const IOAPIC: u8 = 2;
const IO_INTERRUPT: u8 = 3;
const LOCAL_INTERRUPT: u8 = 4;
// Interrupt types.
const INT: u8 = 0;
const NMI: u8 = 1;
const EXT_INT: u8 = 3;
// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6, and FPU | APIC in the feature flags, as Firecracker reports: Linux reads the
/// real values from CPUID; these only have to be plausible.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const IOAPIC_ENABLED: u8 = 1;
const ISA_BUS_ID: u8 = 0;
/// Destination LAPIC id meaning "every LAPIC".
const ALL_LAPICS: u8 = 0xff;

/// Bytes the whole table takes for `vcpus` processors.
pub const fn table_size(vcpus: u8) -> usize {
    FLOATING_POINTER_SIZE
        + HEADER_SIZE
        + PROCESSOR_SIZE * vcpus as usize
        // bus, IOAPIC, one I/O interrupt per pin, LINT0 and LINT1
        + SHORT_ENTRY_SIZE * (2 + IOAPIC_PINS as usize + 2)
}

/// Most vCPUs whose table fits in [`MPTABLE_MAX_SIZE`].
pub const MAX_VCPUS: u8 = {
    let fixed = table_size(0);
    ((MPTABLE_MAX_SIZE as usize - fixed) / PROCESSOR_SIZE) as u8
};

// Every vCPU count the config accepts gets a table.
const _: () = assert!(crate::config::MAX_VCPUS <= MAX_VCPUS);

/// Two's complement of the byte sum: the checksum byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The table for `vcpus` vCPUs (APIC ids 0..vcpus, vCPU 0 the bootstrap processor) and one
/// IOAPIC (id `vcpus`) at `base`.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 {
        return Err(MptableError::NoVcpus);
    }
    if vcpus > MAX_VCPUS {
        return Err(MptableError::TooManyVcpus {
            count: vcpus,
            max: MAX_VCPUS,
        });
    }
    let ioapic_id = vcpus;

    let mut entries = Vec::new();
    for id in 0..vcpus {
        entries.push(PROCESSOR);
        entries.push(id);
        entries.push(LAPIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    // KVM's default routing (kvm_setup_default_irq_routing) delivers GSI n on IOAPIC pin n,
    // the PIT included (IRQ 0 on pin 0). Flags 0: polarity and trigger conform to the bus
    // (ISA: active high, edge).
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[IO_INTERRUPT, INT, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
    }
    // The LAPICs' LINT0 is the 8259's virtual wire (on the BSP), LINT1 takes NMIs (on all), as
    // vCPU setup programs them.
    entries.extend_from_slice(&[LOCAL_INTERRUPT, EXT_INT, 0, 0, ISA_BUS_ID, 0, 0, 0]);
    entries.extend_from_slice(&[LOCAL_INTERRUPT, NMI, 0, 0, ISA_BUS_ID, 0, ALL_LAPICS, 1]);
    let entry_count = u16::from(vcpus) + 2 + u16::from(IOAPIC_PINS) + 2;

    let config_addr = base + FLOATING_POINTER_SIZE as u64;
    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_SIZE + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"SESSIOND"); // OEM id
    header.extend_from_slice(b"MICROVM     "); // product id
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // no extended table; reserved
    debug_assert_eq!(header.len(), HEADER_SIZE);

    let mut pointer = Vec::with_capacity(FLOATING_POINTER_SIZE);
    pointer.extend_from_slice(b"_MP_");
    pointer.extend_from_slice(&(config_addr as u32).to_le_bytes());
    pointer.push(1); // length in 16-byte units
    pointer.push(4); // spec revision 1.4
    pointer.push(0); // checksum, below
                     // Feature byte 1 zero: a configuration table is present (no default configuration);
                     // byte 2 bit 7 clear: no IMCR, virtual wire mode.
    pointer.extend_from_slice(&[0; 5]);
    pointer[10] = checksum(&pointer);

    let mut table = pointer;
    let config_start = table.len();
    table.extend_from_slice(&header);
    table.extend_from_slice(&entries);
    table[config_start + 7] = checksum(&table[config_start..]);
    debug_assert_eq!(table.len(), table_size(vcpus));
    Ok(table)
}

/// Writes the MP table for `vcpus` vCPUs at [`MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let table = build(vcpus, MPTABLE_START)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(MptableError::GuestWrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    fn u16_at(t: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(t[at..at + 2].try_into().unwrap())
    }

    fn u32_at(t: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(t[at..at + 4].try_into().unwrap())
    }

    /// The configuration table's entries, as (type, bytes), walked the way Linux does.
    fn entries(t: &[u8]) -> Vec<(u8, &[u8])> {
        let config = &t[FLOATING_POINTER_SIZE..];
        let length = usize::from(u16_at(config, 4));
        let mut at = HEADER_SIZE;
        let mut out = Vec::new();
        while at < length {
            let size = match config[at] {
                PROCESSOR => PROCESSOR_SIZE,
                BUS | IOAPIC | IO_INTERRUPT | LOCAL_INTERRUPT => SHORT_ENTRY_SIZE,
                other => panic!("unknown entry type {other}"),
            };
            out.push((config[at], &config[at..at + size]));
            at += size;
        }
        assert_eq!(at, length, "entries end exactly at the table's length");
        out
    }

    #[test]
    fn floating_pointer_and_config_table_checksums_are_correct() {
        for vcpus in [1, 2, 4, crate::config::MAX_VCPUS, MAX_VCPUS] {
            let t = build(vcpus, MPTABLE_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert!(sums_to_zero(&t[..16]), "{vcpus}: floating pointer checksum");
            assert_eq!(t[8], 1, "length in paragraphs");
            assert_eq!(t[9], 4, "spec 1.4");
            let config_addr = u32_at(&t, 4) as u64;
            assert_eq!(config_addr, MPTABLE_START + 16);
            let config = &t[16..];
            assert_eq!(&config[..4], b"PCMP");
            let length = usize::from(u16_at(config, 4));
            assert_eq!(length, config.len());
            assert!(sums_to_zero(&config[..length]), "{vcpus}: PCMP checksum");
            assert_eq!(u32_at(config, 36), LAPIC_ADDR);
            assert!(t.len() as u64 <= MPTABLE_MAX_SIZE);
        }
    }

    #[test]
    fn entries_describe_cpus_ioapic_and_isa_interrupts() {
        let t = build(4, MPTABLE_START).unwrap();
        let e = entries(&t);
        assert_eq!(
            usize::from(u16_at(&t[16..], 34)),
            e.len(),
            "header entry count"
        );
        let cpus: Vec<_> = e.iter().filter(|(k, _)| *k == PROCESSOR).collect();
        assert_eq!(cpus.len(), 4);
        for (i, (_, c)) in cpus.iter().enumerate() {
            assert_eq!(c[1], i as u8, "APIC id = vCPU id");
            let flags = if i == 0 { 3 } else { 1 };
            assert_eq!(c[3], flags, "enabled, BSP on vCPU 0 only");
        }
        let buses: Vec<_> = e.iter().filter(|(k, _)| *k == BUS).collect();
        assert_eq!(buses.len(), 1);
        assert_eq!(&buses[0].1[2..8], b"ISA   ");
        let ioapics: Vec<_> = e.iter().filter(|(k, _)| *k == IOAPIC).collect();
        assert_eq!(ioapics.len(), 1);
        let io = ioapics[0].1;
        assert_eq!((io[1], io[2], io[3]), (4, 0x11, 1), "id, version, enabled");
        assert_eq!(u32_at(io, 4), IOAPIC_ADDR);
        let irqs: Vec<_> = e.iter().filter(|(k, _)| *k == IO_INTERRUPT).collect();
        assert_eq!(irqs.len(), 24);
        for (n, (_, i)) in irqs.iter().enumerate() {
            // INT, conforming flags, ISA bus IRQ n -> IOAPIC 4 pin n
            assert_eq!(i[1..], [INT, 0, 0, 0, n as u8, 4, n as u8]);
        }
        let lints: Vec<_> = e.iter().filter(|(k, _)| *k == LOCAL_INTERRUPT).collect();
        assert_eq!(lints.len(), 2);
        assert_eq!((lints[0].1[1], lints[0].1[7]), (EXT_INT, 0), "LINT0 ExtINT");
        assert_eq!((lints[1].1[1], lints[1].1[7]), (NMI, 1), "LINT1 NMI");
    }

    #[test]
    fn too_many_vcpus_are_refused() {
        assert_eq!(MAX_VCPUS, 37, "1 KiB holds 37 processor entries");
        assert!(build(MAX_VCPUS, MPTABLE_START).is_ok());
        let e = build(MAX_VCPUS + 1, MPTABLE_START).unwrap_err();
        assert!(matches!(
            e,
            MptableError::TooManyVcpus { count: 38, max: 37 }
        ));
        assert!(e.to_string().contains("at most 37 vCPUs"), "{e}");
        assert!(matches!(
            build(0, MPTABLE_START),
            Err(MptableError::NoVcpus)
        ));
    }

    #[test]
    fn written_table_is_found_where_linux_scans() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write(&mem, 2).unwrap();
        // Linux scans the last KiB of base memory (639 KiB) in 16-byte steps.
        let mut kib = [0u8; 0x400];
        mem.read_slice(&mut kib, GuestAddress(639 * 0x400)).unwrap();
        let found: Vec<_> = (0..0x400)
            .step_by(16)
            .filter(|&at| &kib[at..at + 4] == b"_MP_" && sums_to_zero(&kib[at..at + 16]))
            .collect();
        assert_eq!(found, vec![(MPTABLE_START - 639 * 0x400) as usize]);
        // Memory too small for the table's place: an error, not a panic.
        let tiny = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9_0000)]).unwrap();
        assert!(matches!(write(&tiny, 1), Err(MptableError::GuestWrite(_))));
    }

    #[test]
    fn table_lies_outside_e820_ram() {
        use crate::arch::x86_64::boot::{write_boot_params, BootInfo};
        use crate::arch::x86_64::layout::{ram_ranges, ZERO_PAGE_ADDR};
        let size = 64 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let ram = ram_ranges(size);
        let info = BootInfo {
            cmdline: "",
            ram: &ram,
            setup_header: None,
            initrd: None,
        };
        write_boot_params(&mem, &info).unwrap();
        let mut zp = [0u8; 0x1000];
        mem.read_slice(&mut zp, GuestAddress(ZERO_PAGE_ADDR))
            .unwrap();
        // e820_entries at 0x1e8, the table at 0x2d0: {addr u64, size u64, type u32}.
        let end = MPTABLE_START + MPTABLE_MAX_SIZE;
        for i in 0..usize::from(zp[0x1e8]) {
            let e = &zp[0x2d0 + 20 * i..];
            let addr = u64::from_le_bytes(e[..8].try_into().unwrap());
            let size = u64::from_le_bytes(e[8..16].try_into().unwrap());
            assert!(
                addr + size <= MPTABLE_START || addr >= end,
                "e820 entry {addr:#x}+{size:#x} covers the MP table"
            );
        }
    }
}
