//! Global descriptor table entries for a 64-bit flat segment model.

use kvm_bindings::kvm_segment;

/// Code segment, 64-bit, present, DPL 0 (access 0x9b, flags L=1).
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Data segment, present, writable, DPL 0 (flags DB=1, G=1).
pub const DATA_FLAGS: u16 = 0xc093;
/// 64-bit TSS, present, busy (needed only so TR is valid).
pub const TSS_FLAGS: u16 = 0x808b;

/// Selector of the code segment in [`boot_gdt`].
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment in [`boot_gdt`].
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the TSS in [`boot_gdt`].
pub const TSS_SELECTOR: u16 = 0x18;

/// Packs one descriptor from its `flags` (access byte in bits 0..8, flags nibble in 12..16),
/// base and 20-bit limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The boot GDT: null, code, data, TSS.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// The hidden part of a segment register that KVM wants, decoded from a descriptor.
pub fn segment_from_entry(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // The descriptor limit counts 4 KiB pages when G is set; KVM wants bytes.
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring0() {
        let s = segment_from_entry(gdt_entry(CODE64_FLAGS, 0, 0xfffff), CODE_SELECTOR);
        assert_eq!(
            (s.l, s.db, s.dpl, s.present, s.s, s.type_),
            (1, 0, 0, 1, 1, 0xb)
        );
        assert_eq!(s.limit, 0xffff_ffff);
    }

    #[test]
    fn descriptor_round_trips_base_and_limit() {
        let s = segment_from_entry(gdt_entry(0x008b, 0x1234_5678, 0xabcde), TSS_SELECTOR);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.g, 0);
        assert_eq!(s.type_, 0xb);
    }
}
