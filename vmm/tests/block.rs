//! virtio-blk on the real /dev/kvm: a tiny guest driver reads and writes a raw image through
//! a virtqueue (checked on the host), read-only disks refuse writes, and malformed descriptor
//! chains make the device ask for a reset instead of crashing the VMM.

mod common;

use std::path::Path;
use std::time::Duration;

use vmm::config::BlockConfig;
use vmm::{GuestStop, VmConfig};

const DISK_SECTORS: usize = 128;

fn disk_image(path: &Path) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    let bytes: Vec<u8> = (0..DISK_SECTORS * 512)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn run(guest: &str, test: &str, read_only: bool) -> (String, Vec<u8>, Vec<u8>) {
    let dir = common::scratch(test);
    let kernel = common::build_guest(guest, &dir);
    let disk = dir.join("disk.img");
    let before = disk_image(&disk);
    let log = dir.join("serial.log");
    let cfg = VmConfig {
        serial_path: Some(log.clone()),
        block_devices: vec![BlockConfig {
            path: disk.clone(),
            read_only,
        }],
        ..VmConfig::new(kernel, 64)
    };
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    vm.resume().unwrap();
    let stop = vm.wait(Duration::from_secs(60));
    let out = common::read_log(&log);
    assert_eq!(stop.unwrap(), GuestStop::Exit(0), "serial: {out}");
    (out, before, std::fs::read(&disk).unwrap())
}

fn field(out: &str, name: &str) -> u64 {
    let start = out
        .find(&format!("{name}=0x"))
        .unwrap_or_else(|| panic!("{name} missing: {out}"));
    let hex = &out[start + name.len() + 3..][..16];
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn guest_reads_and_writes_a_disk() {
    if !common::kvm_available("guest_reads_and_writes_a_disk") {
        return;
    }
    let (out, before, after) = run("blk", "blk-rw", false);
    assert_eq!(field(&out, "capacity"), DISK_SECTORS as u64);
    assert_eq!(field(&out, "read_status"), 0);
    assert_eq!(field(&out, "read_hash"), fnv1a(&before[..4096]));
    assert_eq!(field(&out, "write_status"), 0);
    assert_eq!(field(&out, "flush_status"), 0);
    assert_eq!(
        field(&out, "beyond_end_status"),
        1,
        "I/O error past the end"
    );
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(&after[8 * 512..16 * 512], &pattern[..]);
    assert_eq!(&after[..8 * 512], &before[..8 * 512]);
    assert_eq!(&after[16 * 512..], &before[16 * 512..]);
}

#[test]
fn read_only_disk_refuses_writes() {
    if !common::kvm_available("read_only_disk_refuses_writes") {
        return;
    }
    let (out, before, after) = run("blk", "blk-ro", true);
    assert_eq!(field(&out, "read_hash"), fnv1a(&before[..4096]));
    assert_eq!(
        field(&out, "write_status"),
        1,
        "write to a read-only disk: I/O error"
    );
    assert_eq!(after, before);
}

#[test]
fn malformed_descriptor_chains_reset_the_device_not_the_vmm() {
    if !common::kvm_available("malformed_descriptor_chains_reset_the_device_not_the_vmm") {
        return;
    }
    let (out, before, after) = run("blk_evil", "blk-evil", false);
    for case in [
        "out_of_range",
        "loop",
        "oversized",
        "too_big",
        "bad_next",
        "avail_jump",
        "no_header",
    ] {
        assert!(
            out.contains(&format!("{case}=needs_reset\n")),
            "case {case}: {out}"
        );
    }
    assert!(out.ends_with("recovered\n"), "{out}");
    assert_eq!(after, before);
}
