//! The freestanding test guests in `tests/guests/`, compiled with gcc: shared by this crate's
//! tests and benchmark and by the daemon's tests of the jailed VMM, so every caller builds
//! them the same way.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a guest could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GuestBuildError {
    #[error("running gcc (needed to build the test guests)")]
    Spawn(#[source] std::io::Error),
    #[error("gcc failed to build guest {0}")]
    Failed(String),
}

/// Directory holding the guests' C sources.
pub fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests")
}

/// Compiles `tests/guests/<name>.c` into `<out_dir>/<name>.elf`: a freestanding ELF entered
/// at 1 MiB in 64-bit mode.
pub fn build(name: &str, out_dir: &Path) -> Result<PathBuf, GuestBuildError> {
    let src = source_dir();
    let out = out_dir.join(format!("{name}.elf"));
    let mut gcc = Command::new("gcc");
    gcc.args([
        "-ffreestanding",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-fno-pie",
        "-mgeneral-regs-only",
        "-mno-sse",
        "-mno-red-zone",
        "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables",
        // No endbr64: KVM's instruction emulator may not know it.
        "-fcf-protection=none",
        "-O2",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=4096",
        "-Wl,--no-warn-rwx-segments",
    ])
    .arg(format!("-Wl,-T,{}", src.join("guest.ld").display()));
    compile(gcc, name, out)
}

/// Runs `gcc` (flags already given) on `tests/guests/<name>.c`, writing `out`.
fn compile(mut gcc: Command, name: &str, out: PathBuf) -> Result<PathBuf, GuestBuildError> {
    let status = gcc
        .arg(source_dir().join(format!("{name}.c")))
        .arg("-o")
        .arg(&out)
        .status()
        .map_err(GuestBuildError::Spawn)?;
    if !status.success() {
        return Err(GuestBuildError::Failed(name.to_owned()));
    }
    Ok(out)
}

/// Builds `tests/guests/<name>.c` (see [`build`]) and packages it as `<out_dir>/<name>.bzImage`
/// with [`pack_bzimage`]. The guest must use guest.h's zero-page entry
/// (`GUEST_ZERO_PAGE_ENTRY`), whose code 0x200 bytes into the image is the 64-bit entry.
pub fn build_bzimage(name: &str, out_dir: &Path) -> Result<PathBuf, GuestBuildError> {
    let elf = build(name, out_dir)?;
    let flat = out_dir.join(format!("{name}.bin"));
    // The flat binary starts at the lowest loaded address: the linker script puts _start,
    // at 1 MiB, first.
    let status = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&flat)
        .status()
        .map_err(GuestBuildError::Spawn)?;
    if !status.success() {
        return Err(GuestBuildError::Failed(format!("{name} (objcopy)")));
    }
    let elf_bytes = std::fs::read(&elf).map_err(GuestBuildError::Spawn)?;
    let code = std::fs::read(&flat).map_err(GuestBuildError::Spawn)?;
    // init_size covers .bss too, which the flat binary leaves out.
    let span = elf_load_end(&elf_bytes)
        .ok_or_else(|| GuestBuildError::Failed(format!("{name} (no loadable segment)")))?
        .saturating_sub(GUEST_LOAD_ADDR);
    let init_size = u32::try_from(span.max(code.len() as u64))
        .map_err(|_| GuestBuildError::Failed(format!("{name} (image too large)")))?;
    let out = out_dir.join(format!("{name}.bzImage"));
    std::fs::write(&out, pack_bzimage(&code, init_size)).map_err(GuestBuildError::Spawn)?;
    Ok(out)
}

/// Where the test guests are linked (guest.ld) and where a bzImage's protected-mode part is
/// loaded (`code32_start`).
pub const GUEST_LOAD_ADDR: u64 = 0x10_0000;

/// The end of the highest `PT_LOAD` segment of a 64-bit little-endian ELF file.
fn elf_load_end(elf: &[u8]) -> Option<u64> {
    const PT_LOAD: u32 = 1;
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    // e_phoff, e_phentsize, e_phnum; in each header p_type at +0, p_paddr at +0x18, p_memsz
    // at +0x28.
    let (phoff, phentsize, phnum) = (u64_at(0x20)? as usize, u16_at(0x36)?, u16_at(0x38)?);
    let mut end = None;
    for i in 0..usize::from(phnum) {
        let ph = phoff + i * usize::from(phentsize);
        if u32_at(ph)? == PT_LOAD {
            end = end.max(Some(u64_at(ph + 0x18)? + u64_at(ph + 0x28)?));
        }
    }
    end
}

/// Wraps `code` (a flat binary whose byte 0x200 is a 64-bit entry point, loaded at 1 MiB) in
/// a bzImage that boot.rst's loaders accept: a boot sector, a setup header (protocol 2.15,
/// `LOADED_HIGH`, `XLF_KERNEL_64`) and real-mode setup sectors holding only a halt loop, then
/// `code` as the protected-mode part. `init_size` is the memory the guest uses from 1 MiB.
pub fn pack_bzimage(code: &[u8], init_size: u32) -> Vec<u8> {
    use crate::arch::x86_64::bzimage::{
        offset as at, BOOT_FLAG_MAGIC, HDRS_MAGIC, LOADED_HIGH, XLF_KERNEL_64,
    };
    // 4 setup sectors after the boot sector (the traditional minimum): setup is 5 * 512 bytes.
    const SETUP_SECTS: u8 = 4;
    // The header runs to the end of kernel_info_offset (protocol 2.15).
    const HEADER_END: usize = 0x268;
    let setup_len = (usize::from(SETUP_SECTS) + 1) * 512;
    let mut image = vec![0u8; setup_len];
    let mut put = |offset: usize, bytes: &[u8]| {
        image[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(at::SETUP_SECTS, &[SETUP_SECTS]);
    put(at::SYSSIZE, &(code.len().div_ceil(16) as u32).to_le_bytes());
    put(at::BOOT_FLAG, &BOOT_FLAG_MAGIC.to_le_bytes());
    // `jmp short` over the header, to the real-mode entry: "cli; hlt; jmp back to hlt" (we
    // never enter in real mode; a loader that does gets a halted CPU, not garbage).
    put(at::JUMP, &[0xeb, (HEADER_END - at::HEADER) as u8]);
    put(HEADER_END, &[0xfa, 0xf4, 0xeb, 0xfd]);
    put(at::HEADER, &HDRS_MAGIC.to_le_bytes());
    put(at::VERSION, &0x020fu16.to_le_bytes());
    put(at::LOADFLAGS, &[LOADED_HIGH]);
    put(at::CODE32_START, &(GUEST_LOAD_ADDR as u32).to_le_bytes());
    put(at::INITRD_ADDR_MAX, &0x7fff_ffffu32.to_le_bytes());
    put(at::KERNEL_ALIGNMENT, &0x20_0000u32.to_le_bytes());
    // Not relocatable: the guest is linked at 1 MiB.
    put(at::RELOCATABLE_KERNEL, &[0]);
    put(at::XLOADFLAGS, &XLF_KERNEL_64.to_le_bytes());
    put(at::CMDLINE_SIZE, &2047u32.to_le_bytes());
    put(at::PREF_ADDRESS, &GUEST_LOAD_ADDR.to_le_bytes());
    put(at::INIT_SIZE, &init_size.to_le_bytes());
    image.extend_from_slice(code);
    image
}

/// Compiles `tests/guests/<name>.c` with the host's C library, statically linked, into
/// `<out_dir>/<name>`: a Linux user program for an initramfs (`/init`).
pub fn build_static_program(name: &str, out_dir: &Path) -> Result<PathBuf, GuestBuildError> {
    let mut gcc = Command::new("gcc");
    gcc.args(["-static", "-Os", "-Wall", "-Werror"]);
    compile(gcc, name, out_dir.join(name))
}

/// One file in an initramfs.
pub enum CpioEntry<'a> {
    Dir(&'a str),
    /// A regular file with its permission bits.
    File(&'a str, u32, &'a [u8]),
    /// A character device node (major, minor).
    CharDev(&'a str, u32, u32),
}

/// An uncompressed cpio archive in the "newc" format the kernel unpacks as an initramfs
/// (Documentation/driver-api/early-userspace/buffer-format.rst): per entry a 110-byte ASCII
/// header of 8-digit hex fields, the NUL-terminated name and the data, each padded to 4
/// bytes; "TRAILER!!!" ends it.
pub fn cpio_newc(entries: &[CpioEntry<'_>]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    const S_IFDIR: u32 = 0o040000;
    const S_IFREG: u32 = 0o100000;
    const S_IFCHR: u32 = 0o020000;
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match *e {
            CpioEntry::Dir(name) => entry(&mut out, ino, name, S_IFDIR | 0o755, (0, 0), &[]),
            CpioEntry::File(name, perm, data) => {
                entry(&mut out, ino, name, S_IFREG | perm, (0, 0), data)
            }
            CpioEntry::CharDev(name, major, minor) => {
                entry(&mut out, ino, name, S_IFCHR | 0o600, (major, minor), &[])
            }
        }
    }
    entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let a = cpio_newc(&[CpioEntry::File("init", 0o755, b"abc")]);
        assert_eq!(&a[..6], b"070701");
        // mode field (second), then filesize (seventh), namesize (twelfth).
        assert_eq!(&a[14..22], b"000081ed");
        assert_eq!(&a[54..62], b"00000003");
        assert_eq!(&a[94..102], b"00000005");
        // 110-byte header + "init\0" = 115, padded to 116; data, padded to 120.
        assert_eq!(&a[110..115], b"init\0");
        assert_eq!(&a[116..119], b"abc");
        assert_eq!(&a[120..126], b"070701");
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(a.len() % 4, 0);
    }
}
