//! Interrupt-driven guests on the real /dev/kvm. The guests build an IDT, mask the PICs,
//! enable their local APIC, route device pins through the IOAPIC and wait in `sti; hlt`, as
//! Linux does; they make progress only when an interrupt wakes them:
//! - the PIT (IOAPIC pin 0) and the local APIC timer, periodic and TSC-deadline, wake a
//!   halted vCPU tick after tick at their programmed pace, also in clones restored mid-run;
//! - virtio-vsock used-ring interrupts (irqfd -> IOAPIC pin 5) drive an echo server, and
//!   the serial port's THR-empty interrupt (IRQ 4) paces its report;
//! - a guest snapshotted while halted with interrupts enabled is restored as a clone that
//!   wakes on the device's TRANSPORT_RESET event and on host input, so the IOAPIC routing,
//!   the enabled LAPIC and the halted vCPU state survive a restore.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::persist::RestoreSpec;
use vmm::{GuestStop, MicroVm, VmConfig};

/// Where irq_timer.c counts the ticks it took.
const PROGRESS: u64 = 0x30_0008;
/// Where irq_vsock.c says it is idle (1 while it waits in its main loop).
const IDLE: u64 = 0x30_0010;
/// irq_timer.c: ticks it waits for, and the timer period it programs.
const TICKS: u64 = 20;
const TICK: Duration = Duration::from_millis(2);
/// PIT ticks irq_timer.c waits for before the LAPIC phases.
const PIT_TICKS: u64 = 5;
const KVM_MP_STATE_HALTED: u64 = 3;
const RFLAGS_IF: u64 = 1 << 9;

fn config(kernel: &Path, serial: &Path, vsock: Option<&Path>) -> VmConfig {
    VmConfig {
        serial_path: Some(serial.to_path_buf()),
        vsock: vsock.map(|p| vmm::config::VsockConfig {
            guest_cid: 3,
            uds_path: p.to_path_buf(),
        }),
        ..VmConfig::new(kernel, 64)
    }
}

fn restore(state: &Path, mem: &Path, serial: &Path, vsock: Option<&Path>) -> MicroVm {
    vmm::restore(RestoreSpec {
        state_path: state,
        mem_path: mem,
        serial: Box::new(std::fs::File::create(serial).unwrap()),
        vsock_uds_path: vsock,
        seccomp: true,
    })
    .unwrap()
}

/// The `key=value` words of the guest's report line that starts with `first`.
fn report(log: &str, first: &str) -> HashMap<String, u64> {
    let line = log
        .lines()
        .find(|l| l.starts_with(first))
        .unwrap_or_else(|| panic!("no {first:?} line in serial: {log}"));
    line.split_whitespace()
        .map(|w| {
            let (k, v) = w.split_once('=').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

/// vCPU 0's mp_state and rflags in a snapshot's state file: a 24-byte header (magic,
/// version, length, crc32), then JSON in which KVM structs are byte arrays.
fn saved_vcpu0(state: &Path) -> (u64, u64) {
    let file = std::fs::read(state).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&file[24..]).unwrap();
    let bytes = |v: &serde_json::Value| -> Vec<u8> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect()
    };
    let vcpu = &json["vcpus"][0];
    let mp_state = bytes(&vcpu["mp_state"]);
    let regs = bytes(&vcpu["regs"]);
    // kvm_regs: 16 general registers, rip, rflags.
    let rflags = u64::from_le_bytes(regs[17 * 8..18 * 8].try_into().unwrap());
    (u64::from(mp_state[0]), rflags)
}

/// Waits until irq_vsock.c sits in its idle loop, where only an interrupt gets it further.
fn wait_idle(vm: &MicroVm) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.memory().read_obj::<u64>(GuestAddress(IDLE)).unwrap() != 1 {
        assert!(Instant::now() < deadline, "guest never went idle");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Connects to guest port 1234 through the vsock muxer, sends `messages` one at a time, each
/// once the guest is idle (so it must be woken), checks each comes back, then closes the
/// connection.
fn echo_session(vm: &MicroVm, uds: &Path, messages: usize) {
    wait_idle(vm);
    let (mut s, mut reader) = common::vsock_connect(uds, 1234);
    for i in 0..messages {
        let msg = format!("message {i} woke the guest");
        wait_idle(vm);
        s.write_all(msg.as_bytes()).unwrap();
        let mut echo = vec![0u8; msg.len()];
        reader.read_exact(&mut echo).unwrap();
        assert_eq!(String::from_utf8_lossy(&echo), msg);
    }
}

/// Waits for irq_vsock.c to end after an echo session and checks its report: it echoed
/// `messages`, took at least one vsock interrupt for the connection request and one for
/// each message (each reached an idle guest), saw only used-ring interrupts, and printed its
/// report line one THR-empty interrupt per byte (plus the one raised when it enabled the
/// interrupt).
fn check_vsock_report(vm: &mut MicroVm, log: &Path, messages: u64) {
    let stop = vm.wait(Duration::from_secs(60));
    let out = common::read_log(log);
    assert_eq!(stop.unwrap(), GuestStop::Exit(0), "serial: {out}");
    eprintln!("{out}");
    let r = report(&out, "echoed=");
    assert_eq!(r["echoed"], messages, "{out}");
    assert!(r["vsock_irqs"] > messages, "{out}");
    assert!(r["wakeups"] > messages, "{out}");
    assert_eq!(r["isr"], 1, "only VIRTIO_MMIO_INT_VRING: {out}");
    let line_len = out
        .lines()
        .find(|l| l.starts_with("echoed="))
        .unwrap()
        .len()
        + 1;
    let serial = report(&out, "serial_irqs=");
    assert_eq!(serial["serial_irqs"], line_len as u64 + 1, "{out}");
}

/// Checks irq_timer.c's report: every tick of both timers was taken and nothing else.
fn check_timer_report(out: &str) -> HashMap<String, u64> {
    eprintln!("{out}");
    let r = report(out, "pit_pin0=");
    // KVM's default GSI routing wires the PIT's IRQ 0 to IOAPIC pin 0 (not pin 2, where an
    // ACPI interrupt source override would put it): what a guest's MP table must say.
    assert_eq!(r["pit_pin0"], PIT_TICKS, "{out}");
    assert_eq!(r["pit_pin2"], 0, "{out}");
    assert_eq!(r["periodic"], TICKS, "{out}");
    if r["tsc_deadline"] == 1 {
        assert_eq!(r["deadline"], TICKS, "{out}");
    } else {
        eprintln!("this CPU has no TSC-deadline timer; only the periodic timer ran");
    }
    assert_eq!(r["others"], 0, "{out}");
    r
}

#[test]
fn timers_wake_a_halted_vcpu_at_their_pace() {
    if !common::kvm_available("timers_wake_a_halted_vcpu_at_their_pace") {
        return;
    }
    let dir = common::scratch("irq-timer");
    let kernel = common::build_guest("irq_timer", &dir);
    let log = dir.join("serial.log");
    let mut vm = vmm::build(config(&kernel, &log, None).validate().unwrap()).unwrap();
    let started = Instant::now();
    vm.resume().unwrap();
    let stop = vm.wait(Duration::from_secs(30));
    let elapsed = started.elapsed();
    let out = common::read_log(&log);
    assert_eq!(stop.unwrap(), GuestStop::Exit(0), "serial: {out}");
    let r = check_timer_report(&out);
    let ticks = r["pit_pin0"] + r["periodic"] + r["deadline"];
    // Each wakeup of the halted vCPU was a tick (KVM coalesces ticks it could not deliver).
    assert!(r["wakeups"] >= 1 && r["wakeups"] <= ticks, "{out}");
    // The ticks came at the programmed pace, not at once.
    let phases = 1 + r["tsc_deadline"] as u32;
    assert!(
        elapsed >= TICK * (TICKS as u32 - 1) * phases,
        "{ticks} ticks of {TICK:?} took only {elapsed:?}"
    );
}

#[test]
fn timers_keep_ticking_in_a_restored_clone() {
    if !common::kvm_available("timers_keep_ticking_in_a_restored_clone") {
        return;
    }
    let dir = common::scratch("irq-timer-snap");
    let kernel = common::build_guest("irq_timer", &dir);
    // Mid-way through the periodic phase, then through the TSC-deadline phase.
    for at in [TICKS / 4, TICKS + TICKS / 4] {
        let log = dir.join(format!("original-{at}.log"));
        let mut vm = vmm::build(config(&kernel, &log, None).validate().unwrap()).unwrap();
        vm.resume().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let progress = |vm: &MicroVm| vm.memory().read_obj::<u64>(GuestAddress(PROGRESS)).unwrap();
        while progress(&vm) < at {
            let out = common::read_log(&log);
            if out.contains("tsc_deadline=0") {
                eprintln!("no TSC-deadline phase to snapshot: {out}");
                return;
            }
            assert!(Instant::now() < deadline, "guest made no progress: {out}");
            std::thread::sleep(Duration::from_micros(200));
        }
        vm.pause().unwrap();
        let ticks = progress(&vm);
        assert!(ticks < 2 * TICKS, "snapshot after the last tick");
        let (mem, state) = (dir.join("mem"), dir.join("state"));
        vm.snapshot(&mem, &state).unwrap();
        drop(vm);

        let clone_log = dir.join(format!("clone-{at}.log"));
        let mut clone = restore(&state, &mem, &clone_log, None);
        clone.resume().unwrap();
        let stop = clone.wait(Duration::from_secs(30));
        let out = common::read_log(&clone_log);
        assert_eq!(
            stop.unwrap(),
            GuestStop::Exit(0),
            "clone of tick {ticks}: {out}"
        );
        check_timer_report(&out);
    }
}

#[test]
fn device_interrupts_drive_a_halted_vsock_echo_server() {
    if !common::kvm_available("device_interrupts_drive_a_halted_vsock_echo_server") {
        return;
    }
    let dir = common::scratch("irq-vsock");
    let kernel = common::build_guest("irq_vsock", &dir);
    let log = dir.join("serial.log");
    let uds = dir.join("vsock.sock");
    let mut vm = vmm::build(config(&kernel, &log, Some(&uds)).validate().unwrap()).unwrap();
    vm.resume().unwrap();
    common::wait_for_line(&log, "listening\n");
    echo_session(&vm, &uds, 5);
    check_vsock_report(&mut vm, &log, 5);
}

#[test]
fn guest_halted_for_interrupts_wakes_after_restore() {
    if !common::kvm_available("guest_halted_for_interrupts_wakes_after_restore") {
        return;
    }
    let dir = common::scratch("irq-snap");
    let kernel = common::build_guest("irq_vsock", &dir);
    let log = dir.join("original.log");
    let uds = dir.join("original.sock");
    let mut vm = vmm::build(config(&kernel, &log, Some(&uds)).validate().unwrap()).unwrap();
    vm.resume().unwrap();
    common::wait_for_line(&log, "listening\n");
    wait_idle(&vm);
    let (mem, state) = (dir.join("mem"), dir.join("state"));
    // A few instructions after it says it is idle, the guest is in hlt; snapshot until the
    // state shows it there (a busy host may delay those instructions).
    let mut attempts = 0;
    loop {
        std::thread::sleep(Duration::from_millis(10));
        vm.pause().unwrap();
        vm.snapshot(&mem, &state).unwrap();
        let (mp_state, rflags) = saved_vcpu0(&state);
        if mp_state == KVM_MP_STATE_HALTED {
            assert_ne!(
                rflags & RFLAGS_IF,
                0,
                "halted with interrupts off: {rflags:#x}"
            );
            break;
        }
        attempts += 1;
        assert!(
            attempts < 50,
            "the guest never halted (mp_state {mp_state})"
        );
        vm.resume().unwrap();
    }
    drop(vm);

    let clone_log = dir.join("clone.log");
    let clone_uds = dir.join("clone.sock");
    let mut clone = restore(&state, &mem, &clone_log, Some(&clone_uds));
    clone.resume().unwrap();
    // Nothing but an interrupt can wake it: the device's TRANSPORT_RESET event first.
    common::wait_for_line(&clone_log, "transport reset\n");
    echo_session(&clone, &clone_uds, 3);
    check_vsock_report(&mut clone, &clone_log, 3);
}
