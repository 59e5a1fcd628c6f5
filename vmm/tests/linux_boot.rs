//! The Linux boot protocol as a kernel sees it: a tiny guest packaged both as an ELF and as a
//! bzImage reads the zero page (command line, e820 map, initrd) and reports it; and a stock
//! Debian bzImage boots to its initramfs `/init` where KVM is hardware virtualization.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use vmm::capability::KvmKind;
use vmm::{GuestStop, VmConfig};

/// 64 MiB: the initrd goes at the top of it.
const MEM_MIB: u64 = 64;

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Bytes that are not all alike, so a misplaced or truncated copy changes the hash.
fn initrd_bytes(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn config(kernel: &Path, initrd: Option<&Path>, cmdline: &str, serial: &Path) -> VmConfig {
    VmConfig {
        initrd_path: initrd.map(Path::to_owned),
        cmdline: cmdline.to_owned(),
        serial_path: Some(serial.to_owned()),
        ..VmConfig::new(kernel, MEM_MIB)
    }
}

/// Boots `kernel` with `initrd` and returns the guest's report.
fn run_bootparams(
    dir: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> common::Report {
    // Serial output is appended to an existing file: one fresh log per run.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = dir.join(format!("serial-{run}.log"));
    let cfg = config(kernel, initrd, cmdline, &log);
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    vm.resume().unwrap();
    let stop = vm.wait(Duration::from_secs(30)).unwrap();
    let out = common::read_log(&log);
    assert_eq!(stop, GuestStop::Exit(7), "serial:\n{out}");
    common::Report(out)
}

/// Page-aligned, as high as RAM (below `limit`) allows.
fn expected_initrd_addr(size: u64, limit: u64) -> u64 {
    (limit - size) & !0xfff
}

#[test]
fn elf_and_bzimage_guests_see_cmdline_e820_and_initrd() {
    if !common::kvm_available("elf_and_bzimage_guests_see_cmdline_e820_and_initrd") {
        return;
    }
    let dir = common::scratch("bootparams");
    let bzimage = vmm::test_guests::build_bzimage("bootparams", &dir).unwrap();
    let elf = dir.join("bootparams.elf");
    let data = initrd_bytes(20_001);
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, &data).unwrap();

    for (kernel, version) in [(&elf, 0), (&bzimage, 0x020f)] {
        let cmdline = format!("console=ttyS0 sessiond.kernel={}", kernel.display());
        let r = run_bootparams(&dir, kernel, Some(&initrd), &cmdline);
        let what = kernel.display();
        assert_eq!(r.num("zero page"), 0x7000, "{what}: rsi at entry");
        assert_eq!(r.num("loader"), 0xff, "{what}: type_of_loader");
        // A bzImage's zero page starts from its own setup header; an ELF has none.
        assert_eq!(r.num("version"), version, "{what}: boot protocol version");
        assert_eq!(r.text("cmdline"), cmdline, "{what}");
        assert_eq!(r.num("e820 entries"), 2, "{what}: low RAM + RAM from 1 MiB");
        assert_eq!(
            r.num("initrd addr"),
            expected_initrd_addr(data.len() as u64, MEM_MIB << 20),
            "{what}"
        );
        assert_eq!(r.num("initrd size"), data.len() as u64, "{what}");
        assert_eq!(r.num("initrd fnv1a"), fnv1a(&data), "{what}");
    }

    // Without an initrd the zero page says so.
    let r = run_bootparams(&dir, &bzimage, None, "");
    assert_eq!((r.num("initrd addr"), r.num("initrd size")), (0, 0));
    assert_eq!(r.text("cmdline"), "");
}

#[test]
fn initrd_stays_below_the_kernels_initrd_addr_max() {
    if !common::kvm_available("initrd_stays_below_the_kernels_initrd_addr_max") {
        return;
    }
    let dir = common::scratch("initrd-max");
    let bzimage = vmm::test_guests::build_bzimage("bootparams", &dir).unwrap();
    // initrd_addr_max is the highest byte the initrd may occupy: cap it at 3 MiB - 1.
    const INITRD_ADDR_MAX: usize = 0x22c;
    let mut image = std::fs::read(&bzimage).unwrap();
    image[INITRD_ADDR_MAX..INITRD_ADDR_MAX + 4].copy_from_slice(&0x2f_ffffu32.to_le_bytes());
    std::fs::write(&bzimage, &image).unwrap();
    let data = initrd_bytes(5000);
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, &data).unwrap();
    let r = run_bootparams(&dir, &bzimage, Some(&initrd), "console=ttyS0");
    assert_eq!(
        r.num("initrd addr"),
        expected_initrd_addr(data.len() as u64, 0x30_0000)
    );
    assert_eq!(r.num("initrd fnv1a"), fnv1a(&data));

    // Larger than the room between the kernel and that cap: refused before anything runs.
    let too_big = dir.join("big.img");
    std::fs::write(&too_big, initrd_bytes(3 << 20)).unwrap();
    let log = dir.join("big.log");
    let e = config(&bzimage, Some(&too_big), "", &log)
        .validate()
        .err()
        .expect("refused");
    assert!(
        matches!(
            e,
            vmm::ConfigError::InitrdTooBig {
                limit: 0x30_0000,
                ..
            }
        ),
        "{e}"
    );
}

/// The kernel to boot, or `None` after printing why the test is skipped.
fn linux_kernel(test: &str) -> Option<std::path::PathBuf> {
    match std::env::var_os("SESSIOND_TEST_LINUX_KERNEL") {
        Some(k) => Some(k.into()),
        None => {
            common::skip(
                test,
                "SESSIOND_TEST_LINUX_KERNEL is unset; run \
                 `export SESSIOND_TEST_LINUX_KERNEL=$(scripts/fetch-kernel)` first",
            );
            None
        }
    }
}

/// The line a stock x86 decompressor prints, from its own early serial console, once it has
/// read `nokaslr` from the command line the zero page points to (arch/x86/boot/compressed/
/// kaslr.c). Reaching it proves the bzImage loader, the zero page and the 64-bit entry with
/// a real kernel, in a few seconds even where KVM emulates every guest kernel instruction.
const DECOMPRESSOR_LINE: &str = "KASLR disabled: 'nokaslr' on cmdline.";

#[test]
fn stock_linux_bzimage_decompressor_reads_our_command_line() {
    const TEST: &str = "stock_linux_bzimage_decompressor_reads_our_command_line";
    if !common::kvm_available(TEST) {
        return;
    }
    let Some(kernel) = linux_kernel(TEST) else {
        return;
    };
    let dir = common::scratch("linux-decompressor");
    let log = dir.join("serial.log");
    let mut cfg = config(
        &kernel,
        None,
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr",
        &log,
    );
    cfg.mem_size_mib = 256;
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    let started = Instant::now();
    vm.resume().unwrap();
    // About 3-4 s on the software-assisted development hosts; the kernel would go on for
    // minutes there, so the VM is stopped (dropped) once the line is out.
    while started.elapsed() < Duration::from_secs(20) {
        match vm.wait(Duration::from_millis(100)) {
            Err(vmm::MicroVmError::WaitTimeout(_)) => {}
            other => panic!(
                "the kernel stopped before the line: {other:?}; serial:\n{}",
                common::read_log(&log)
            ),
        }
        if common::read_log(&log).contains(DECOMPRESSOR_LINE) {
            eprintln!(
                "{TEST}: decompressor line after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return;
        }
    }
    panic!(
        "no {DECOMPRESSOR_LINE:?} within 20 s; serial:\n{}",
        common::read_log(&log)
    );
}

#[test]
fn stock_linux_bzimage_boots_to_its_initramfs_init() {
    const TEST: &str = "stock_linux_bzimage_boots_to_its_initramfs_init";
    let cap = vmm::detect();
    if cap.kind != KvmKind::Hardware {
        eprintln!(
            "skipping {TEST}: needs hardware virtualization: {}",
            cap.summary
        );
        return;
    }
    let Some(kernel) = linux_kernel(TEST) else {
        return;
    };
    let dir = common::scratch("linux");
    let init = vmm::test_guests::build_static_program("linux_init", &dir).unwrap();
    let init = std::fs::read(init).unwrap();
    use vmm::test_guests::CpioEntry::*;
    let cpio = vmm::test_guests::cpio_newc(&[
        Dir("dev"),
        CharDev("dev/console", 5, 1),
        File("init", 0o755, &init),
    ]);
    let initrd = dir.join("initramfs.cpio");
    std::fs::write(&initrd, cpio).unwrap();
    let log = dir.join("serial.log");
    let mut cfg = config(
        &kernel,
        Some(&initrd),
        "console=ttyS0 reboot=t rdinit=/init",
        &log,
    );
    cfg.mem_size_mib = 256;
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    let started = Instant::now();
    vm.resume().unwrap();
    let stop = vm.wait(Duration::from_secs(60));
    let out = common::read_log(&log);
    eprintln!(
        "{TEST}: {:?} after {:.1} s",
        stop,
        started.elapsed().as_secs_f64()
    );
    assert!(out.contains("Linux version"), "no banner; serial:\n{out}");
    assert!(
        out.contains("sessiond-linux-init: hello from user space"),
        "no marker from /init; serial:\n{out}"
    );
    assert_eq!(stop.unwrap(), GuestStop::Shutdown, "serial:\n{out}");
}
