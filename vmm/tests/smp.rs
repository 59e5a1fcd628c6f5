//! Multiprocessor guests on the real /dev/kvm. The `smp` guest's BSP starts every other vCPU
//! the way Linux does (a real-mode trampoline below 1 MiB, INIT then two SIPIs through its
//! LAPIC's ICR); each AP climbs from real mode through protected mode to long mode on the
//! VMM's page tables and runs C code. All CPUs then take turns at one computation in strict
//! rotation, whose result comes out right only if they all ran side by side. Guests are
//! snapshotted and restored at two points: halfway through the computation, every vCPU
//! running guest code (the clone finishes it, so each vCPU's MP state, registers and LAPIC
//! survive), and between INIT and SIPI (the clone's AP, restored in wait-for-SIPI, starts).
//! Last, an AP saved with an INIT and a SIPI still pending in its LAPIC (what a pause can
//! catch) is saved with the registers the SIPI gives it, and restored it starts there.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::devices::bus::Bus;
use vmm::persist::{MicroVmState, RestoreSpec};
use vmm::vstate::vcpu::{readable_msrs, Vcpu, VcpuEvent, VcpuState};
use vmm::{GuestStop, MicroVm, VmConfig};

/// smp.c's mailboxes: the host opens a gate, reads the turn count, gives the vCPU count,
/// sees which gate the BSP waits at, and chooses the gate it holds at.
const GATE: u64 = 0x30_0000;
const PROGRESS: u64 = 0x30_0008;
const CPUS: u64 = 0x30_0010;
const AT_GATE: u64 = 0x30_0018;
const STOP_AT: u64 = 0x30_0020;
/// smp.c's gates: after INIT to APIC id 1, before its SIPIs; on the BSP's turn of round
/// ROUNDS / 2.
const GATE_BEFORE_SIPI: u64 = 1;
const GATE_HALFWAY: u64 = 2;
/// Turns each CPU takes (smp.c ROUNDS).
const ROUNDS: u64 = 8;
/// Where the guest image starts (guest.ld); the trampoline page is below it.
const IMAGE_START: u64 = 0x10_0000;
const KVM_MP_STATE_RUNNABLE: u32 = 0;
const KVM_MP_STATE_UNINITIALIZED: u32 = 1;
const KVM_MP_STATE_INIT_RECEIVED: u32 = 2;
const EFER_LMA: u64 = 1 << 10;
/// Generous: each run takes well under a second here, with guest kernel mode emulated and
/// more vCPUs than host cores, but other builds share those cores.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Boots the smp guest on `cpus` vCPUs, holding at gate `stop_at` (0: none).
fn boot(kernel: &Path, log: &Path, cpus: u8, stop_at: u64) -> MicroVm {
    let cfg = VmConfig {
        vcpu_count: cpus,
        serial_path: Some(log.to_path_buf()),
        ..VmConfig::new(kernel, 64)
    };
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    let mem = vm.memory();
    mem.write_obj(u64::from(cpus), GuestAddress(CPUS)).unwrap();
    mem.write_obj(stop_at, GuestAddress(STOP_AT)).unwrap();
    vm.resume().unwrap();
    vm
}

/// The shared word after every turn, in rotation order (smp.c `compute`).
fn expected_acc(cpus: u64) -> u64 {
    (0..ROUNDS * cpus).fold(0u64, |acc, t| {
        let (cpu, round) = (t % cpus, t / cpus);
        acc.wrapping_mul(31)
            .wrapping_add((cpu + 1) * 1000)
            .wrapping_add(round)
    })
}

/// The `key=value` words of a report line.
fn words(line: &str) -> HashMap<&str, u64> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect()
}

/// Waits for the guest to exit and checks its report: every AP checked in with its own APIC
/// id, every CPU took all its turns, kept its LAPIC task priority, and the rotation's result
/// is the one only strict turn-taking gives.
fn check_run(vm: &mut MicroVm, log: &Path, cpus: u64) {
    let stop = vm.wait(RUN_TIMEOUT);
    let out = common::read_log(log);
    let turns = vm.memory().read_obj::<u64>(GuestAddress(PROGRESS)).unwrap();
    assert!(
        matches!(stop, Ok(GuestStop::Exit(0))),
        "{stop:?} after {turns} of {} turns; serial: {out}",
        ROUNDS * cpus
    );
    eprintln!("{out}");
    let per_cpu: Vec<_> = out
        .lines()
        .filter(|l| l.starts_with("cpu="))
        .map(words)
        .collect();
    assert_eq!(per_cpu.len() as u64, cpus, "{out}");
    for (i, r) in per_cpu.iter().enumerate() {
        let i = i as u64;
        assert_eq!(r["cpu"], i, "{out}");
        // APs are started one at a time in APIC id order, so CPU k is APIC id k.
        assert_eq!(r["apic_id"], i, "{out}");
        assert_eq!(r["turns"], ROUNDS, "{out}");
        assert_eq!(r["lapic_kept"], 1, "LAPIC TPR of CPU {i} changed: {out}");
    }
    let summary = out
        .lines()
        .find(|l| l.starts_with("smp "))
        .map(words)
        .unwrap_or_else(|| panic!("no summary line: {out}"));
    assert_eq!(summary["cpus"], cpus, "{out}");
    assert_eq!(summary["arrived"], cpus - 1, "{out}");
    assert_eq!(summary["done"], cpus - 1, "{out}");
    assert_eq!(summary["id_mask"], (1 << cpus) - 1, "{out}");
    assert_eq!(summary["lapic_kept"], cpus, "{out}");
    assert_eq!(summary["acc"], expected_acc(cpus), "{out}");
}

#[test]
fn guest_starts_every_ap_and_they_compute_together() {
    if !common::kvm_available("guest_starts_every_ap_and_they_compute_together") {
        return;
    }
    let dir = common::scratch("smp-start");
    let kernel = common::build_guest("smp", &dir);
    for cpus in [2u8, 4] {
        let log = dir.join(format!("serial-{cpus}.log"));
        let started = Instant::now();
        let mut vm = boot(&kernel, &log, cpus, 0);
        check_run(&mut vm, &log, u64::from(cpus));
        eprintln!(
            "{cpus} vCPUs: started and finished in {:?}",
            started.elapsed()
        );
    }
}

/// Waits until the BSP holds `gate`, pauses the VM there and snapshots it.
fn snapshot_at(vm: &mut MicroVm, gate: u64, log: &Path, mem: &Path, state: &Path) {
    let deadline = Instant::now() + RUN_TIMEOUT;
    let read = |vm: &MicroVm, at| vm.memory().read_obj::<u64>(GuestAddress(at)).unwrap();
    while read(vm, AT_GATE) != gate {
        assert!(
            Instant::now() < deadline,
            "the guest never reached gate {gate}; serial: {}",
            common::read_log(log)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause().unwrap();
    vm.snapshot(mem, state).unwrap();
}

/// The vCPU states in a snapshot's state file: a 24-byte header (magic, version, length,
/// crc32), then JSON.
fn saved_vcpus(state: &Path) -> Vec<VcpuState> {
    let file = std::fs::read(state).unwrap();
    let saved: MicroVmState = serde_json::from_slice(&file[24..]).unwrap();
    saved.vcpus
}

/// A 32-bit LAPIC register from a saved LAPIC page.
fn lapic_reg(v: &VcpuState, at: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|b| v.lapic.regs[at + b] as u8))
}

/// Checks what the state file says of each vCPU halfway: running (no AP left in
/// wait-for-SIPI), in long mode in the guest image (past the trampoline), its own APIC id
/// and the task priority its CPU set.
fn check_saved_halfway(state: &Path, cpus: u64) {
    let vcpus = saved_vcpus(state);
    assert_eq!(vcpus.len() as u64, cpus);
    for (i, v) in vcpus.iter().enumerate() {
        assert_eq!(u64::from(v.id), i as u64);
        assert_eq!(
            v.mp_state.mp_state, KVM_MP_STATE_RUNNABLE,
            "vCPU {i} not running"
        );
        assert_ne!(v.sregs.efer & EFER_LMA, 0, "vCPU {i} not in long mode");
        assert!(v.regs.rip >= IMAGE_START, "vCPU {i} at {:#x}", v.regs.rip);
        assert_eq!(lapic_reg(v, 0x20) >> 24, i as u32, "vCPU {i}'s APIC id");
        assert_eq!(lapic_reg(v, 0x80), (i as u32 + 1) << 4, "vCPU {i}'s TPR");
    }
}

/// Checks the state file between INIT and SIPI: the BSP runs, vCPU 1 took INIT and waits
/// for SIPI, any other vCPU was never touched.
fn check_saved_before_sipi(state: &Path, cpus: u64) {
    let vcpus = saved_vcpus(state);
    assert_eq!(vcpus.len() as u64, cpus);
    let mp: Vec<u32> = vcpus.iter().map(|v| v.mp_state.mp_state).collect();
    assert_eq!(mp[0], KVM_MP_STATE_RUNNABLE, "{mp:?}");
    assert_eq!(mp[1], KVM_MP_STATE_INIT_RECEIVED, "{mp:?}");
    assert!(
        mp[2..].iter().all(|&s| s == KVM_MP_STATE_UNINITIALIZED),
        "{mp:?}"
    );
}

/// Restores the snapshot, opens `gate` in the clone and checks it finishes the run.
fn clone_finishes(dir: &Path, mem: &Path, state: &Path, gate: u64, cpus: u64) {
    let clone_log = dir.join(format!("clone-{gate}-{cpus}.log"));
    let mut clone = vmm::restore(RestoreSpec {
        state_path: state,
        mem_path: mem,
        serial: Box::new(std::fs::File::create(&clone_log).unwrap()),
        vsock_uds_path: None,
        seccomp: true,
    })
    .unwrap();
    clone.memory().write_obj(gate, GuestAddress(GATE)).unwrap();
    clone.resume().unwrap();
    check_run(&mut clone, &clone_log, cpus);
}

#[test]
fn smp_guest_snapshotted_mid_run_finishes_in_a_clone() {
    if !common::kvm_available("smp_guest_snapshotted_mid_run_finishes_in_a_clone") {
        return;
    }
    let dir = common::scratch("smp-snap");
    let kernel = common::build_guest("smp", &dir);
    for cpus in [2u8, 4] {
        let n = u64::from(cpus);
        let log = dir.join(format!("original-{cpus}.log"));
        let mut vm = boot(&kernel, &log, cpus, GATE_HALFWAY);
        let (mem, state) = (dir.join("mem"), dir.join("state"));
        snapshot_at(&mut vm, GATE_HALFWAY, &log, &mem, &state);
        // Half the turns are taken; the BSP holds the next one.
        let progress = vm.memory().read_obj::<u64>(GuestAddress(PROGRESS)).unwrap();
        assert_eq!(progress, ROUNDS / 2 * n);
        check_saved_halfway(&state, n);

        // The original goes on after its snapshot.
        vm.memory()
            .write_obj(GATE_HALFWAY, GuestAddress(GATE))
            .unwrap();
        vm.resume().unwrap();
        check_run(&mut vm, &log, n);
        drop(vm);

        clone_finishes(&dir, &mem, &state, GATE_HALFWAY, n);
    }
}

#[test]
fn ap_waiting_for_sipi_in_a_snapshot_starts_in_the_clone() {
    if !common::kvm_available("ap_waiting_for_sipi_in_a_snapshot_starts_in_the_clone") {
        return;
    }
    let dir = common::scratch("smp-sipi");
    let kernel = common::build_guest("smp", &dir);
    for cpus in [2u8, 4] {
        let n = u64::from(cpus);
        let log = dir.join(format!("original-{cpus}.log"));
        let mut vm = boot(&kernel, &log, cpus, GATE_BEFORE_SIPI);
        let (mem, state) = (dir.join("mem"), dir.join("state"));
        snapshot_at(&mut vm, GATE_BEFORE_SIPI, &log, &mem, &state);
        check_saved_before_sipi(&state, n);
        drop(vm);
        clone_finishes(&dir, &mem, &state, GATE_BEFORE_SIPI, n);
    }
}

/// smp_sipi.c's trampoline page, and where its AP counts its starts.
const SIPI_STUB: u64 = 0x6000;
const SIPI_STUB_STARTS: u64 = SIPI_STUB + 0x800;

/// Port I/O with only the exit port; no MMIO devices.
fn exit_port_buses() -> (Arc<Bus>, Arc<Bus>) {
    (Arc::new(common::exit_port_bus()), Arc::new(Bus::default()))
}

/// Runs `vcpu` on its thread until `done` says so (or the guest stops), then stops it.
fn run_until(vcpu: Vcpu, mut done: impl FnMut() -> bool) -> Option<GuestStop> {
    let (commands, rx) = channel();
    let (tx, events) = channel();
    let thread = vcpu.spawn(rx, tx).unwrap();
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut stop = None;
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        if let Ok((_, VcpuEvent::Stopped(outcome))) = events.try_recv() {
            stop = Some(outcome.unwrap());
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    common::stop_vcpu(&commands, thread);
    stop
}

/// An INIT and a SIPI that reach an AP while its thread is out of KVM_RUN (a paused VM) are
/// still pending in its LAPIC when it is saved; KVM_GET_MP_STATE makes KVM take them. The
/// saved registers must be the ones the SIPI set, and a vCPU restored from them must start
/// in the trampoline.
#[test]
fn pending_sipi_is_in_the_saved_registers() {
    if !common::kvm_available("pending_sipi_is_in_the_saved_registers") {
        return;
    }
    let dir = common::scratch("smp-pending-sipi");
    let kernel = common::build_guest("smp_sipi", &dir);
    let (vm, entry) = common::hand_built_vm(&kernel);
    let (pio, mmio) = exit_port_buses();
    let cpuid = vm.supported_cpuid().unwrap();
    let msrs = Arc::new(Vec::new());
    let bsp = Vcpu::new(&vm, 0, pio.clone(), mmio.clone(), msrs.clone()).unwrap();
    bsp.configure_boot(cpuid.clone(), entry).unwrap();
    let mut ap = Vcpu::new(&vm, 1, pio.clone(), mmio.clone(), msrs.clone()).unwrap();
    ap.configure_boot(cpuid, entry).unwrap();
    ap.set_msr_list(Arc::new(readable_msrs(&ap, &vm.msr_index_list().unwrap())));

    // Only the BSP runs: it sends INIT and SIPI to vCPU 1 and exits.
    assert_eq!(run_until(bsp, || false), Some(GuestStop::Exit(0)));
    let saved = ap.save_state().unwrap();
    let (cs, rip) = (saved.sregs.cs, saved.regs.rip);
    assert_eq!(saved.mp_state.mp_state, KVM_MP_STATE_RUNNABLE);
    assert_eq!(
        (cs.selector, cs.base, rip, saved.sregs.cr0 & 1),
        (0x600, SIPI_STUB, 0, 0),
        "vCPU 1 saved with registers from before the SIPI"
    );

    // Restored into a VM of its own, the AP runs the trampoline the BSP wrote.
    let (clone_vm, _) = common::hand_built_vm(&kernel);
    let mut page = [0u8; 0x1000];
    vm.memory()
        .read_slice(&mut page, GuestAddress(SIPI_STUB))
        .unwrap();
    clone_vm
        .memory()
        .write_slice(&page, GuestAddress(SIPI_STUB))
        .unwrap();
    let clone_ap = Vcpu::new(&clone_vm, 1, pio, mmio, msrs).unwrap();
    clone_ap.restore_state(&saved).unwrap();
    let starts = || {
        clone_vm
            .memory()
            .read_obj::<u32>(GuestAddress(SIPI_STUB_STARTS))
            .unwrap()
    };
    let stop = run_until(clone_ap, || starts() == 1);
    assert_eq!(stop, None, "the restored AP ran something else");
}
