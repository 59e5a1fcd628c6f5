//! The MP table as a guest finds it: the `mptable` guest scans for "_MP_" where Linux does,
//! checks both checksums, walks the entries and reports what it found; checked for 1, 2 and
//! 4 vCPUs, booted as an ELF and as a bzImage.

mod common;

use std::path::Path;
use std::time::Duration;

use vmm::{GuestStop, VmConfig};

fn run(dir: &Path, kernel: &Path, vcpus: u8) -> common::Report {
    let log = dir.join(format!(
        "serial-{vcpus}-{}.log",
        kernel.extension().unwrap().to_string_lossy()
    ));
    let cfg = VmConfig {
        vcpu_count: vcpus,
        serial_path: Some(log.clone()),
        ..VmConfig::new(kernel, 32)
    };
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    vm.resume().unwrap();
    let stop = vm.wait(Duration::from_secs(60)).unwrap();
    let out = common::read_log(&log);
    assert_eq!(stop, GuestStop::Exit(9), "serial:\n{out}");
    common::Report(out)
}

#[test]
fn guest_finds_cpus_ioapic_and_isa_routing_in_the_mp_table() {
    if !common::kvm_available("guest_finds_cpus_ioapic_and_isa_routing_in_the_mp_table") {
        return;
    }
    let dir = common::scratch("mptable");
    let bzimage = vmm::test_guests::build_bzimage("mptable", &dir).unwrap();
    let elf = dir.join("mptable.elf");
    for (kernel, vcpus) in [(&elf, 1u8), (&elf, 2), (&elf, 4), (&bzimage, 2)] {
        let r = run(&dir, kernel, vcpus);
        let what = format!("{} with {vcpus} vCPUs", kernel.display());
        // In the last KiB of base memory, where Linux looks, and left out of e820 RAM.
        let mpf = r.num("mpf");
        assert!((0x9fc00..0xa0000).contains(&mpf), "{what}: mpf {mpf:#x}");
        assert_eq!(
            r.num("in e820 ram"),
            0,
            "{what}: the table is not usable RAM"
        );
        assert_eq!(r.num("mpf checksum"), 0, "{what}");
        assert_eq!(r.num("mpc checksum"), 0, "{what}");
        assert_eq!(r.num("mpc spec"), 4, "{what}: MP spec 1.4");
        assert_eq!(r.num("lapic"), 0xfee0_0000, "{what}");
        assert_eq!(r.num("entries"), r.num("entry count"), "{what}");

        let n = u64::from(vcpus);
        assert_eq!(r.num("processors"), n, "{what}: one processor per vCPU");
        assert_eq!(r.num("enabled"), n, "{what}");
        assert_eq!(r.num("bsp count"), 1, "{what}");
        assert_eq!(r.num("bsp"), 0, "{what}: vCPU 0 boots");
        assert_eq!(r.num("apic ids"), (1 << n) - 1, "{what}: APIC ids 0..{n}");

        assert_eq!(r.num("buses"), 1, "{what}: ISA");
        assert_eq!(r.num("ioapics"), 1, "{what}");
        assert_eq!(r.num("ioapic id"), n, "{what}: after the LAPIC ids");
        assert_eq!(r.num("ioapic version"), 0x11, "{what}");
        assert_eq!(r.num("ioapic addr"), 0xfec0_0000, "{what}");
        assert_eq!(r.num("irq entries"), 24, "{what}: IOAPIC pins 0..=23");
        assert_eq!(r.num("isa irq 0 pin"), 0, "{what}: the PIT on pin 0");
        assert_eq!(r.num("isa irq 4 pin"), 4, "{what}: COM1 on pin 4");
        assert_eq!(r.num("lint0"), 3, "{what}: LINT0 ExtINT");
        assert_eq!(r.num("lint1"), 1, "{what}: LINT1 NMI");
    }
}
