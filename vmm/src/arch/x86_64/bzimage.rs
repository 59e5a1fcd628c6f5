//! The bzImage setup header (Documentation/arch/x86/boot.rst), read and checked for the only
//! entry this VMM uses: the 64-bit boot protocol, long mode at the protected-mode part's load
//! address + 0x200, `rsi` at the zero page.
//!
//! We require boot protocol 2.12 or newer: `xloadflags`, whose `XLF_KERNEL_64` bit is the
//! kernel's promise that the 64-bit entry exists, was added in 2.12 (Linux 3.8); an older
//! header has other data at that offset, so nothing can tell us the entry is there.

/// Offset of the setup header in the image (and in the zero page).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// How many bytes of the image's start [`SetupHeader::parse`] needs.
pub const HEAD_LEN: usize = 0x400;
/// Offset of the 64-bit entry point in the protected-mode part.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Oldest boot protocol accepted (2.12: `xloadflags`).
pub const MIN_PROTOCOL: u16 = 0x020c;

/// Field offsets in the image (= in the zero page), from boot.rst.
pub mod offset {
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const SYSSIZE: usize = 0x1f4;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    /// End of the last field this module reads (`init_size`, protocol 2.10).
    pub const END_OF_READ_FIELDS: usize = 0x264;
}

/// "HdrS" at 0x202.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// 0xaa55 at 0x1fe.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `loadflags` bit 0: the protected-mode part is loaded at 1 MiB (a bzImage, not a zImage).
pub const LOADED_HIGH: u8 = 1 << 0;
/// `xloadflags` bit 0: the kernel has the 64-bit entry point at +0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;

/// Why a file is not a bzImage this VMM can boot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BzImageError {
    #[error("it is {0} bytes, too short for a bzImage setup header")]
    TooShort(usize),
    #[error("it has no \"HdrS\" setup-header magic at 0x202")]
    NoHeaderMagic,
    #[error("its boot sector has no 0xaa55 signature at 0x1fe")]
    NoBootFlag,
    #[error(
        "its boot protocol is {}.{:02}; 2.12 or newer is needed (xloadflags, which announces \
         the 64-bit entry point this VMM uses, appeared in 2.12 / Linux 3.8)",
        .0 >> 8,
        .0 & 0xff
    )]
    OldProtocol(u16),
    #[error("its setup header ends at {0:#x}, before the 2.12 fields (up to {end:#x})", end = offset::END_OF_READ_FIELDS)]
    ShortHeader(usize),
    #[error("it is a zImage (LOADED_HIGH clear in loadflags); only bzImages are supported")]
    NotLoadedHigh,
    #[error(
        "xloadflags {0:#x} lacks XLF_KERNEL_64: the kernel has no 64-bit entry point, and this \
         VMM starts kernels in 64-bit mode only"
    )]
    No64BitEntry(u16),
}

/// A checked setup header: the raw bytes the zero page starts from, and the fields the VMM
/// uses to place the kernel, initrd and command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupHeader {
    /// The image's bytes from 0x1f1 to the end of the header (0x202 + the byte at 0x201).
    pub raw: Vec<u8>,
    pub version: u16,
    pub xloadflags: u16,
    /// Highest address the initrd may occupy (inclusive).
    pub initrd_addr_max: u32,
    /// Longest command line the kernel accepts, without the NUL.
    pub cmdline_size: u32,
    /// Where the kernel wants to run (it decompresses there unless it relocates).
    pub pref_address: u64,
    /// Bytes the kernel needs from `pref_address` while it decompresses and initialises.
    pub init_size: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Whether `head` (an image's first bytes) carries the setup-header magic at all.
pub fn has_header_magic(head: &[u8]) -> bool {
    head.len() >= offset::HEADER + 4 && u32_at(head, offset::HEADER) == HDRS_MAGIC
}

impl SetupHeader {
    /// Reads and checks the header from the image's first [`HEAD_LEN`] bytes (or all of a
    /// shorter image).
    pub fn parse(head: &[u8]) -> Result<Self, BzImageError> {
        if head.len() < offset::JUMP + 2 {
            return Err(BzImageError::TooShort(head.len()));
        }
        if !has_header_magic(head) {
            return Err(BzImageError::NoHeaderMagic);
        }
        if u16_at(head, offset::BOOT_FLAG) != BOOT_FLAG_MAGIC {
            return Err(BzImageError::NoBootFlag);
        }
        let version = u16_at(head, offset::VERSION);
        if version < MIN_PROTOCOL {
            return Err(BzImageError::OldProtocol(version));
        }
        // The short jump at 0x200 skips the header: its target is where the header ends.
        let end = offset::HEADER + usize::from(head[offset::JUMP + 1]);
        if end < offset::END_OF_READ_FIELDS {
            return Err(BzImageError::ShortHeader(end));
        }
        if head.len() < end {
            return Err(BzImageError::TooShort(head.len()));
        }
        if head[offset::LOADFLAGS] & LOADED_HIGH == 0 {
            return Err(BzImageError::NotLoadedHigh);
        }
        let xloadflags = u16_at(head, offset::XLOADFLAGS);
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BzImageError::No64BitEntry(xloadflags));
        }
        Ok(Self {
            raw: head[SETUP_HEADER_OFFSET..end].to_vec(),
            version,
            xloadflags,
            initrd_addr_max: u32_at(head, offset::INITRD_ADDR_MAX),
            cmdline_size: u32_at(head, offset::CMDLINE_SIZE),
            pref_address: u64_at(head, offset::PREF_ADDRESS),
            init_size: u32_at(head, offset::INIT_SIZE),
        })
    }

    /// First byte above the region the kernel decompresses into when it does not relocate.
    pub fn init_end(&self) -> u64 {
        // Saturating: a nonsense pref_address then fails the "RAM must reach it" check.
        self.pref_address.saturating_add(u64::from(self.init_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_guests::pack_bzimage;

    fn image() -> Vec<u8> {
        pack_bzimage(&[0xf4; 64], 0x1000)
    }

    #[test]
    fn packed_test_image_parses() {
        let h = SetupHeader::parse(&image()).unwrap();
        assert_eq!(h.version, 0x020f);
        assert_eq!(h.xloadflags & XLF_KERNEL_64, XLF_KERNEL_64);
        assert_eq!(h.raw.len(), 0x268 - SETUP_HEADER_OFFSET);
        assert_eq!(h.init_end(), 0x10_0000 + 0x1000);
    }

    #[test]
    fn headers_we_cannot_enter_are_refused() {
        let mut old = image();
        old[offset::VERSION..offset::VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        let e = SetupHeader::parse(&old).unwrap_err();
        assert_eq!(e, BzImageError::OldProtocol(0x0206));
        assert!(e.to_string().contains("boot protocol is 2.06"), "{e}");

        let mut no64 = image();
        no64[offset::XLOADFLAGS] = 0x02;
        assert_eq!(
            SetupHeader::parse(&no64).unwrap_err(),
            BzImageError::No64BitEntry(2)
        );

        let mut zimage = image();
        zimage[offset::LOADFLAGS] = 0;
        assert_eq!(
            SetupHeader::parse(&zimage).unwrap_err(),
            BzImageError::NotLoadedHigh
        );

        let mut short = image();
        short[offset::JUMP + 1] = 0x30;
        assert_eq!(
            SetupHeader::parse(&short).unwrap_err(),
            BzImageError::ShortHeader(0x232)
        );
        assert_eq!(
            SetupHeader::parse(&image()[..0x300]).map(|h| h.version),
            Ok(0x020f)
        );
        assert_eq!(
            SetupHeader::parse(&image()[..0x100]).unwrap_err(),
            BzImageError::TooShort(0x100)
        );
    }
}
