//! From a validated config to a microVM whose vCPUs are ready to run (paused), in one
//! readable sequence; and the device wiring shared with snapshot restore.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot::{self, BootInfo, BootSetupError};
use crate::arch::x86_64::bzimage::ENTRY_64_OFFSET;
use crate::arch::x86_64::layout::{
    ram_ranges, virtio_slot, HIMEM_START, MMIO_HOLE_START, VIRTIO_MMIO_SIZE,
};
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::config::{Initrd, KernelFormat, MachineSpec};
use crate::devices::bus::{Bus, BusError, SharedDevice};
use crate::devices::legacy::exit::EXIT_PORT;
use crate::devices::legacy::serial::{SerialError, SerialOut, SerialSnapshot, COM1_IRQ, COM1_PORT};
use crate::devices::legacy::{ExitDevice, SerialDevice};
use crate::devices::virtio::mmio::{MmioSnapshot, MmioTransport};
use crate::devices::virtio::VirtioDevice;
use crate::microvm::{Devices, MicroVm, MicroVmError, VcpuHandle, VirtioDeviceConfig, VirtioSlot};
use crate::seccomp::{SeccompError, ThreadKind};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{readable_msrs, Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Why a microVM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("loading the kernel: {0}")]
    Kernel(linux_loader::loader::Error),
    #[error("placing the initrd")]
    InitrdPlace(#[source] BootSetupError),
    #[error("reading the initrd into guest memory")]
    InitrdRead(#[source] vm_memory::GuestMemoryError),
    #[error("writing boot tables")]
    Boot(#[from] BootSetupError),
    #[error("writing the MP table")]
    Mptable(#[from] MptableError),
    #[error("creating the VM")]
    Vm(#[from] VmError),
    #[error("vCPU")]
    Vcpu(#[from] VcpuError),
    #[error("creating the serial device")]
    Serial(#[from] SerialError),
    #[error("creating an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("placing a device on a bus")]
    Bus(#[from] BusError),
    #[error("spawning a device event thread")]
    EventThread(#[source] std::io::Error),
    #[error("confining a device thread")]
    Seccomp(#[source] SeccompError),
    #[error("restoring a virtio transport: {0}")]
    VirtioState(String),
    #[error("starting the vCPUs")]
    Start(#[from] MicroVmError),
}

/// Loads the kernel (and initrd) into `mem` and writes the boot tables; returns the 64-bit
/// entry point.
fn load_kernel(
    mem: &vm_memory::GuestMemoryMmap,
    mem_size: u64,
    kernel: &mut std::fs::File,
    format: &KernelFormat,
    initrd: Option<Initrd>,
    cmdline: &str,
) -> Result<u64, BuildError> {
    let himem = Some(GuestAddress(HIMEM_START));
    let (entry, kernel_end, header) = match format {
        KernelFormat::Elf => {
            let l = Elf::load(mem, None, kernel, himem).map_err(BuildError::Kernel)?;
            (l.kernel_load.0, l.kernel_end, None)
        }
        KernelFormat::BzImage(h) => {
            // At the header's code32_start (1 MiB); the 64-bit entry is 0x200 into it.
            let l = BzImage::load(mem, None, kernel, himem).map_err(BuildError::Kernel)?;
            // The kernel decompresses into [pref_address, + init_size) unless it relocates.
            let end = l.kernel_end.max(h.init_end());
            (l.kernel_load.0 + ENTRY_64_OFFSET, end, Some(h))
        }
    };
    let initrd = match initrd {
        None => None,
        Some(Initrd { mut file, size }) => {
            let mut limit = mem_size.min(MMIO_HOLE_START);
            if let Some(h) = header {
                limit = limit.min(u64::from(h.initrd_addr_max) + 1);
            }
            let addr =
                boot::place_initrd(size, kernel_end, limit).map_err(BuildError::InitrdPlace)?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
                .map_err(BuildError::InitrdRead)?;
            Some((addr, size))
        }
    };
    boot::write_gdt(mem)?;
    boot::write_page_tables(mem)?;
    boot::write_boot_params(
        mem,
        &BootInfo {
            cmdline,
            ram: &ram_ranges(mem_size),
            setup_header: header,
            initrd,
        },
    )?;
    Ok(entry)
}

/// Builds and boots a microVM from `spec`: memory, kernel, boot tables, VM, devices, vCPUs.
/// The VM comes back paused, so the caller can look at memory first; call `resume()`.
pub fn build(spec: MachineSpec) -> Result<MicroVm, BuildError> {
    let MachineSpec {
        vcpu_count,
        mem_size,
        mut kernel,
        kernel_format,
        initrd,
        cmdline,
        serial,
        blocks,
        vsock,
        nets,
        seccomp,
    } = spec;
    let mem = memory::anonymous(mem_size)?;
    let entry = load_kernel(
        &mem,
        mem_size,
        &mut kernel,
        &kernel_format,
        initrd,
        &cmdline,
    )?;
    mptable::write(&mem, vcpu_count)?;

    let vm = Vm::new(mem)?;
    let (pio, serial) = legacy_devices(&vm, serial, None)?;
    let mut virtio: Vec<(VirtioDeviceConfig, Box<dyn VirtioDevice>)> = Vec::new();
    for (cfg, dev) in blocks {
        virtio.push((VirtioDeviceConfig::Block(cfg), Box::new(dev)));
    }
    if let Some((cfg, dev)) = vsock {
        virtio.push((VirtioDeviceConfig::Vsock(cfg), Box::new(dev)));
    }
    for (cfg, dev) in nets {
        virtio.push((VirtioDeviceConfig::Net(cfg), Box::new(dev)));
    }
    let (mmio, devices) = virtio_devices(&vm, virtio, None, seccomp)?;
    let cpuid = vm.supported_cpuid()?;
    let mut vcpus = Vec::new();
    for id in 0..vcpu_count {
        let vcpu = Vcpu::new(&vm, id, pio.clone(), mmio.clone(), Arc::new(Vec::new()))?;
        vcpu.configure_boot(cpuid.clone(), entry)?;
        vcpus.push(vcpu);
    }
    let msr_list = Arc::new(readable_msrs(&vcpus[0], &vm.msr_index_list()?));
    start(vm, vcpus, devices.with_serial(serial), msr_list, seccomp)
}

/// Virtio devices and their event threads, before the serial device joins them.
pub(crate) struct VirtioSet {
    slots: Vec<VirtioSlot>,
    event_threads: Vec<std::thread::JoinHandle<()>>,
    stop_events: Arc<AtomicBool>,
    pause_events: Arc<AtomicBool>,
}

impl VirtioSet {
    pub(crate) fn with_serial(self, serial: Arc<Mutex<SerialDevice>>) -> Devices {
        Devices {
            serial,
            virtio: self.slots,
            event_threads: self.event_threads,
            stop_events: self.stop_events,
            pause_events: self.pause_events,
        }
    }
}

/// Runs a device's host side: waits on its epoll set and lets it work under the transport's
/// lock, except while `paused` (checked under that lock, see `Devices::pause`). Ends when
/// `stop` is set or the VM is gone.
fn event_loop(
    transport: std::sync::Weak<Mutex<MmioTransport>>,
    epoll: Arc<Epoll>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    seccomp: bool,
    ready: std::sync::mpsc::Sender<Result<(), SeccompError>>,
) {
    if seccomp {
        if let Err(e) = crate::seccomp::install(ThreadKind::DeviceEvents) {
            let _ = ready.send(Err(e));
            return;
        }
    }
    let _ = ready.send(Ok(()));
    let mut events = [EpollEvent::default(); 16];
    while !stop.load(Ordering::Acquire) {
        if paused.load(Ordering::Acquire) {
            // Not polling while paused: host data waits in the sockets. `MicroVm::resume`
            // unparks this thread; the timeout only bounds how late a stop is seen.
            std::thread::park_timeout(std::time::Duration::from_millis(50));
            continue;
        }
        let ready = epoll.wait(50, &mut events).unwrap_or(0);
        let Some(t) = transport.upgrade() else {
            break;
        };
        let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
        let progressed = !paused.load(Ordering::Acquire) && t.backend_event();
        drop(t);
        if ready > 0 && !progressed {
            // Readable sockets the guest cannot take data from yet (no credit or rx buffers):
            // back off instead of spinning on level-triggered readiness.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Puts each virtio device behind an MMIO transport in its slot of the MMIO hole, with an
/// irqfd for its IRQ; `states` restores the transports' registers and queues.
pub(crate) fn virtio_devices(
    vm: &Vm,
    devices: Vec<(VirtioDeviceConfig, Box<dyn VirtioDevice>)>,
    states: Option<&[MmioSnapshot]>,
    seccomp: bool,
) -> Result<(Arc<Bus>, VirtioSet), BuildError> {
    let mut bus = Bus::default();
    let mut slots = Vec::new();
    let mut event_threads = Vec::new();
    let stop_events = Arc::new(AtomicBool::new(false));
    // The VM starts paused; `MicroVm::resume` lets the devices' host sides run.
    let pause_events = Arc::new(AtomicBool::new(true));
    for (i, (config, device)) in devices.into_iter().enumerate() {
        let (base, gsi) = virtio_slot(i);
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&irq, gsi)?;
        let mut transport = MmioTransport::new(device, vm.memory().clone(), irq);
        if let Some(state) = states.and_then(|s| s.get(i)) {
            transport.restore(state).map_err(BuildError::VirtioState)?;
        }
        let epoll = transport.backend_epoll();
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(base, VIRTIO_MMIO_SIZE, transport.clone() as SharedDevice)?;
        if let Some(epoll) = epoll {
            let (weak, stop) = (Arc::downgrade(&transport), stop_events.clone());
            let paused = pause_events.clone();
            let (ready_tx, ready_rx) = channel();
            let thread = std::thread::Builder::new()
                .name(format!("virtio{i}-events"))
                .spawn(move || event_loop(weak, epoll, stop, paused, seccomp, ready_tx))
                .map_err(BuildError::EventThread)?;
            event_threads.push(thread);
            // The thread must be confined before the guest can reach its device.
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(BuildError::Seccomp(e)),
                Err(_) => {
                    return Err(BuildError::EventThread(
                        std::io::ErrorKind::BrokenPipe.into(),
                    ))
                }
            }
        }
        slots.push(VirtioSlot { config, transport });
    }
    let set = VirtioSet {
        slots,
        event_threads,
        stop_events,
        pause_events,
    };
    Ok((Arc::new(bus), set))
}

/// Port I/O devices: COM1 (IRQ 4 through an irqfd) and the exit port.
pub(crate) fn legacy_devices(
    vm: &Vm,
    out: SerialOut,
    state: Option<&SerialSnapshot>,
) -> Result<(Arc<Bus>, Arc<Mutex<SerialDevice>>), BuildError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&irq, COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(match state {
        Some(s) => SerialDevice::restore(irq, out, s)?,
        None => SerialDevice::new(irq, out),
    }));
    let mut pio = Bus::default();
    pio.insert(u64::from(COM1_PORT), 8, serial.clone() as SharedDevice)?;
    pio.insert(
        u64::from(EXIT_PORT),
        4,
        Arc::new(Mutex::new(ExitDevice)) as SharedDevice,
    )?;
    Ok((Arc::new(pio), serial))
}

/// Spawns one thread per vCPU and returns the microVM with all of them paused.
pub(crate) fn start(
    vm: Vm,
    vcpus: Vec<Vcpu>,
    devices: Devices,
    msr_list: Arc<Vec<u32>>,
    seccomp: bool,
) -> Result<MicroVm, BuildError> {
    let (events_tx, events_rx) = channel();
    let mut handles = Vec::new();
    for mut vcpu in vcpus {
        vcpu.set_msr_list(msr_list.clone());
        vcpu.set_seccomp(seccomp);
        let (tx, rx) = channel();
        let id = vcpu.id();
        // Queue the pause before the thread exists, so no guest instruction runs before the
        // owner resumes.
        let _ = tx.send(crate::vstate::vcpu::VcpuCommand::Pause);
        let thread = vcpu.spawn(rx, events_tx.clone())?;
        handles.push(VcpuHandle {
            id,
            commands: tx,
            thread: Some(thread),
            exited: false,
        });
    }
    Ok(MicroVm::new(vm, handles, events_rx, devices, msr_list)?)
}
