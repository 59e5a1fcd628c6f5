//! Pausing a vCPU right after the VMM handled one of its port reads. KVM finishes such an
//! access (the value into the guest's register, RIP past the instruction) only when it next
//! enters KVM_RUN; a vCPU parked before that would be saved on the instruction, and a clone
//! restored from that state would execute it a second time. The test holds the vCPU inside
//! the device's read handler until the pause is queued, so the pause lands exactly there.

mod common;

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm::devices::bus::{Bus, BusAction, BusDevice, SharedDevice};
use vmm::vstate::vcpu::{Vcpu, VcpuCommand, VcpuEvent};

const GATE_PORT: u16 = 0x510;
const VALUE: u8 = 0x5a;

/// A port whose read tells the test it started, then waits for the test's go.
struct Gate {
    reading: Sender<()>,
    go: Receiver<()>,
}

impl BusDevice for Gate {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let _ = self.reading.send(());
        let _ = self.go.recv_timeout(Duration::from_secs(30));
        data.fill(VALUE);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) -> BusAction {
        BusAction::Continue
    }
}

#[test]
fn a_vcpu_paused_after_a_port_read_is_saved_past_it() {
    if !common::kvm_available("a_vcpu_paused_after_a_port_read_is_saved_past_it") {
        return;
    }
    let dir = common::scratch("pause-after-read");
    let kernel = common::build_guest("port_read", &dir);
    let (vm, entry) = common::hand_built_vm(&kernel);
    let (reading_tx, reading) = channel();
    let (go, go_rx) = channel();
    let mut pio = common::exit_port_bus();
    let gate: SharedDevice = Arc::new(Mutex::new(Gate {
        reading: reading_tx,
        go: go_rx,
    }));
    pio.insert(u64::from(GATE_PORT), 1, gate).unwrap();
    let vcpu = Vcpu::new(
        &vm,
        0,
        Arc::new(pio),
        Arc::new(Bus::default()),
        Arc::new(Vec::new()),
    )
    .unwrap();
    vcpu.configure_boot(vm.supported_cpuid().unwrap(), entry)
        .unwrap();

    let (commands, commands_rx) = channel();
    let (events_tx, events) = channel();
    let thread = vcpu.spawn(commands_rx, events_tx).unwrap();
    reading
        .recv_timeout(Duration::from_secs(30))
        .expect("the guest reads the port");
    // The pause is queued while the read is being handled; the vCPU sees it next.
    commands.send(VcpuCommand::Pause).unwrap();
    go.send(()).unwrap();
    let next = |events: &Receiver<(u8, VcpuEvent)>| {
        events
            .recv_timeout(Duration::from_secs(30))
            .expect("the vCPU answers")
            .1
    };
    assert!(matches!(next(&events), VcpuEvent::Paused));
    commands.send(VcpuCommand::Save).unwrap();
    let VcpuEvent::Saved(saved) = next(&events) else {
        panic!("no saved state")
    };
    let saved = (*saved).unwrap();
    // `in al, dx` is one byte (0xec): the saved vCPU is past it, with the value in AL.
    let opcode: u8 = vm.memory().read_obj(GuestAddress(saved.regs.rip)).unwrap();
    assert_ne!(
        opcode, 0xec,
        "saved on the port read at {:#x}",
        saved.regs.rip
    );
    assert_eq!(saved.regs.rax & 0xff, u64::from(VALUE));
    // The guest, resumed, goes on from there and exits with the value it read once.
    commands.send(VcpuCommand::Resume).unwrap();
    assert!(matches!(next(&events), VcpuEvent::Resumed));
    match next(&events) {
        VcpuEvent::Stopped(Ok(stop)) => assert_eq!(stop, vmm::GuestStop::Exit(VALUE.into())),
        _ => panic!("the guest did not exit"),
    }
    common::stop_vcpu(&commands, thread);
}
