//! Boots tiny guests on the real /dev/kvm: serial output, exit status, and a clear error
//! for an instruction KVM cannot run.

mod common;

use std::time::{Duration, Instant};

use vmm::capability::KvmKind;
use vmm::microvm::MicroVmError;
use vmm::vstate::vcpu::VcpuError;
use vmm::{GuestStop, VmConfig};

fn config(kernel: &std::path::Path, serial: &std::path::Path) -> VmConfig {
    VmConfig::from_json(&format!(
        r#"{{"vcpu_count": 1, "mem_size_mib": 64, "kernel_path": {:?}, "cmdline": "console=ttyS0", "serial_path": {:?}}}"#,
        kernel, serial
    ))
    .unwrap()
}

#[test]
fn guest_prints_on_serial_and_exits_with_its_status() {
    if !common::kvm_available("guest_prints_on_serial_and_exits_with_its_status") {
        return;
    }
    let dir = common::scratch("hello");
    let kernel = common::build_guest("hello", &dir);
    let log = dir.join("serial.log");
    let mut vm = vmm::build(config(&kernel, &log).validate().unwrap()).unwrap();
    vm.resume().unwrap();
    let stop = vm.wait(Duration::from_secs(20)).unwrap();
    assert_eq!(stop, GuestStop::Exit(42));
    assert_eq!(common::read_log(&log), "hello from the guest\n");
}

#[test]
fn unsupported_instruction_is_reported_not_hung() {
    if !common::kvm_available("unsupported_instruction_is_reported_not_hung") {
        return;
    }
    let dir = common::scratch("bad");
    let kernel = common::build_guest("bad_instruction", &dir);
    let log = dir.join("serial.log");
    let mut vm = vmm::build(config(&kernel, &log).validate().unwrap()).unwrap();
    vm.resume().unwrap();
    let started = Instant::now();
    let outcome = vm.wait(Duration::from_secs(20));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(common::read_log(&log), "before\n");
    match (vmm::detect().kind, outcome) {
        (
            KvmKind::SoftwareAssisted,
            Err(MicroVmError::Vcpu {
                source: e @ VcpuError::Internal { suberror: 1, .. },
                ..
            }),
        ) => {
            let msg = e.to_string();
            assert!(msg.contains("KVM_EXIT_INTERNAL_ERROR"), "{msg}");
            assert!(msg.contains("emulation failure"), "{msg}");
        }
        (KvmKind::Hardware, Ok(GuestStop::Shutdown)) => {}
        (kind, other) => panic!("unexpected outcome on {kind:?} KVM: {other:?}"),
    }
}

#[test]
fn standalone_run_from_a_config_file() {
    if !common::kvm_available("standalone_run_from_a_config_file") {
        return;
    }
    let dir = common::scratch("standalone");
    let kernel = common::build_guest("hello", &dir);
    let log = dir.join("serial.log");
    let cfg_path = dir.join("vm.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string(&config(&kernel, &log)).unwrap(),
    )
    .unwrap();
    let stop = vmm::standalone::run(&cfg_path).unwrap();
    assert_eq!(vmm::standalone::exit_code(stop), 42);
    assert_eq!(common::read_log(&log), "hello from the guest\n");

    std::fs::write(&cfg_path, r#"{"mem_size_mib": 64, "kernel": "x"}"#).unwrap();
    let e = vmm::standalone::run(&cfg_path).unwrap_err();
    let mut chain = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        chain += &format!(": {s}");
        src = s.source();
    }
    assert!(
        chain.contains("vm.json") && chain.contains("unknown field `kernel`"),
        "{chain}"
    );
}

#[test]
fn a_second_vcpu_waits_for_startup_and_is_stopped_cleanly() {
    if !common::kvm_available("a_second_vcpu_waits_for_startup_and_is_stopped_cleanly") {
        return;
    }
    let dir = common::scratch("smp");
    let kernel = common::build_guest("hello", &dir);
    let log = dir.join("serial.log");
    let mut cfg = config(&kernel, &log);
    cfg.vcpu_count = 2;
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    vm.resume().unwrap();
    // vCPU 1 sits in the in-kernel LAPIC's wait-for-SIPI; vCPU 0 runs the guest.
    assert_eq!(
        vm.wait(Duration::from_secs(20)).unwrap(),
        GuestStop::Exit(42)
    );
    assert_eq!(common::read_log(&log), "hello from the guest\n");
}
