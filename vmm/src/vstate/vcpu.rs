//! vCPUs: setup, state save/restore, and the run loop that dispatches port I/O and MMIO
//! exits to the buses. Each vCPU runs on its own thread and obeys commands (pause, save,
//! resume, stop) sent over a channel; a real-time signal kicks it out of KVM_RUN.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::regs::{self, RegsSetupError};
use crate::devices::bus::{Bus, BusAction};
use crate::vstate::vm::Vm;

/// What went wrong with a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU")]
    Create(#[source] kvm_ioctls::Error),
    #[error("setting up boot registers")]
    Setup(#[from] RegsSetupError),
    #[error("KVM_RUN")]
    Run(#[source] kvm_ioctls::Error),
    #[error(
        "KVM could not run the guest: KVM_EXIT_INTERNAL_ERROR suberror {suberror} \
         ({}) at rip {rip:#x}, data {data:x?}",
        internal_error_name(*.suberror)
    )]
    Internal {
        suberror: u32,
        rip: u64,
        data: Vec<u64>,
    },
    #[error("KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x}")]
    FailEntry { reason: u64 },
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    #[error("{what} while saving vCPU state")]
    Save {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{what} while restoring vCPU state")]
    Restore {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {set} of {wanted} MSRs (first refused: {refused:#x})")]
    MsrRefused {
        set: usize,
        wanted: usize,
        refused: u32,
    },
    #[error("saved state holds too many CPUID entries or MSRs")]
    FamTooBig,
    #[error("saved vCPU state is malformed: {0}")]
    BadState(&'static str),
    #[error("confining the vCPU thread")]
    Seccomp(#[source] crate::seccomp::SeccompError),
    #[error("the vCPU thread is gone")]
    ThreadGone,
    #[error("spawning the vCPU thread")]
    Spawn(#[source] std::io::Error),
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "emulation failure: an instruction KVM's emulator does not implement",
        2 => "simultaneous exception",
        3 => "delivery event",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

/// Why the guest stopped running on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStop {
    /// It wrote this status to the exit port.
    Exit(u32),
    /// Triple fault or a KVM system event (shutdown/reset).
    Shutdown,
}

/// x87/SSE state (`kvm_fpu` has no serde support of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> Result<kvm_fpu, VcpuError> {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        if self.fpr.len() != f.fpr.len() || self.xmm.len() != f.xmm.len() {
            return Err(VcpuError::BadState("FPU register count"));
        }
        f.fpr.copy_from_slice(&self.fpr);
        f.xmm.copy_from_slice(&self.xmm);
        Ok(f)
    }
}

/// Everything KVM holds for one vCPU, as saved in a snapshot.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
}

/// One vCPU and the buses its exits go to.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    /// MSRs KVM can both read and report; what a snapshot saves.
    msr_list: Arc<Vec<u32>>,
    has_xsave: bool,
    has_xcrs: bool,
    /// Install the vCPU seccomp filter when the thread starts.
    seccomp: bool,
}

/// What one KVM_RUN ended in.
enum Emulation {
    Handled,
    Interrupted,
    Stopped(GuestStop),
}

impl Vcpu {
    /// Creates vCPU `id` of `vm`.
    pub fn new(
        vm: &Vm,
        id: u8,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        msr_list: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(VcpuError::Create)?;
        Ok(Vcpu {
            id,
            fd,
            pio,
            mmio,
            msr_list,
            has_xsave: vm.kvm().check_extension(Cap::Xsave),
            has_xcrs: vm.kvm().check_extension(Cap::Xcrs),
            seccomp: false,
        })
    }

    /// This vCPU's id.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Whether the thread confines itself with [`crate::seccomp`] before running the guest.
    pub fn set_seccomp(&mut self, on: bool) {
        self.seccomp = on;
    }

    /// Sets which MSRs [`Vcpu::save_state`] saves.
    pub fn set_msr_list(&mut self, list: Arc<Vec<u32>>) {
        self.msr_list = list;
    }

    /// Puts the vCPU in 64-bit mode at `entry` with the boot tables the builder wrote.
    pub fn configure_boot(&self, cpuid: CpuId, entry: u64) -> Result<(), VcpuError> {
        regs::setup_cpuid(&self.fd, cpuid, self.id)?;
        regs::set_msrs(&self.fd, &regs::boot_msrs())?;
        regs::setup_regs(&self.fd, entry)?;
        regs::setup_sregs(&self.fd)?;
        regs::setup_fpu(&self.fd)?;
        regs::setup_lint(&self.fd)?;
        Ok(())
    }

    /// Reads the vCPU's complete state. It must not be running.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let save = |what| move |source| VcpuError::Save { what, source };
        // KVM_GET_MP_STATE first: it makes KVM take an INIT or SIPI still pending in the
        // in-kernel LAPIC (kvm_apic_accept_events), which resets the registers (INIT) or
        // sets CS:IP (SIPI). An AP paused while the BSP starts it has them pending; read
        // before, the registers were the ones from before the IPIs while the MP state said
        // "running", and the restored AP ran from the wrong place (Firecracker orders its
        // save the same way). tests/smp.rs: pending_sipi_is_in_the_saved_registers.
        let mp_state = self.fd.get_mp_state().map_err(save("KVM_GET_MP_STATE"))?;
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(save("KVM_GET_CPUID2"))?;
        let mut msrs = Msrs::from_entries(
            &self
                .msr_list
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|_| VcpuError::FamTooBig)?;
        let n = self.fd.get_msrs(&mut msrs).map_err(save("KVM_GET_MSRS"))?;
        if n != self.msr_list.len() {
            return Err(VcpuError::MsrRefused {
                set: n,
                wanted: self.msr_list.len(),
                refused: self.msr_list[n],
            });
        }
        Ok(VcpuState {
            id: self.id,
            cpuid: cpuid.as_slice().to_vec(),
            regs: self.fd.get_regs().map_err(save("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(save("KVM_GET_SREGS"))?,
            fpu: FpuState::from(&self.fd.get_fpu().map_err(save("KVM_GET_FPU"))?),
            xsave: if self.has_xsave {
                Some(self.fd.get_xsave().map_err(save("KVM_GET_XSAVE"))?)
            } else {
                None
            },
            xcrs: if self.has_xcrs {
                Some(self.fd.get_xcrs().map_err(save("KVM_GET_XCRS"))?)
            } else {
                None
            },
            debugregs: self
                .fd
                .get_debug_regs()
                .map_err(save("KVM_GET_DEBUGREGS"))?,
            lapic: self.fd.get_lapic().map_err(save("KVM_GET_LAPIC"))?,
            msrs: msrs.as_slice().to_vec(),
            mp_state,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(save("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Loads `state`, in the order KVM needs (CPUID first, MSRs after the LAPIC, events last).
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        let restore = |what| move |source| VcpuError::Restore { what, source };
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::FamTooBig)?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(restore("KVM_SET_CPUID2"))?;
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(restore("KVM_SET_MP_STATE"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(restore("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(restore("KVM_SET_SREGS"))?;
        self.fd
            .set_fpu(&state.fpu.to_kvm()?)
            .map_err(restore("KVM_SET_FPU"))?;
        if let (Some(xsave), true) = (&state.xsave, self.has_xsave) {
            // SAFETY: `xsave` is a legacy 4 KiB `kvm_xsave` read by KVM_GET_XSAVE; KVM_SET_XSAVE
            // reads exactly that size, and no XSAVE2 extension is enabled on this VM.
            unsafe { self.fd.set_xsave(xsave) }.map_err(restore("KVM_SET_XSAVE"))?;
        }
        if let (Some(xcrs), true) = (&state.xcrs, self.has_xcrs) {
            self.fd.set_xcrs(xcrs).map_err(restore("KVM_SET_XCRS"))?;
        }
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(restore("KVM_SET_DEBUGREGS"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(restore("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&state.msrs).map_err(|_| VcpuError::FamTooBig)?;
        let set = self.fd.set_msrs(&msrs).map_err(restore("KVM_SET_MSRS"))?;
        if set != state.msrs.len() {
            return Err(VcpuError::MsrRefused {
                set,
                wanted: state.msrs.len(),
                refused: state.msrs[set].index,
            });
        }
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(restore("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    fn run_once(&mut self) -> Result<Emulation, VcpuError> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(Emulation::Interrupted)
            }
            Err(e) => return Err(VcpuError::Run(e)),
        };
        let action = match exit {
            VcpuExit::IoOut(port, data) => self
                .pio
                .write(u64::from(port), data)
                .unwrap_or(BusAction::Continue),
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) {
                    // Floating bus: what real hardware returns for an absent device.
                    data.fill(0xff);
                }
                BusAction::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.mmio.write(addr, data).unwrap_or(BusAction::Continue)
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio.read(addr, data) {
                    data.fill(0);
                }
                BusAction::Continue
            }
            VcpuExit::Shutdown | VcpuExit::SystemEvent(..) => {
                return Ok(Emulation::Stopped(GuestStop::Shutdown))
            }
            VcpuExit::Hlt => return Ok(Emulation::Handled),
            VcpuExit::InternalError => return Err(self.internal_error()),
            VcpuExit::FailEntry(reason, _) => return Err(VcpuError::FailEntry { reason }),
            other => return Err(VcpuError::UnexpectedExit(format!("{other:?}"))),
        };
        Ok(match action {
            BusAction::Continue => Emulation::Handled,
            BusAction::GuestExit(status) => Emulation::Stopped(GuestStop::Exit(status)),
        })
    }

    fn internal_error(&mut self) -> VcpuError {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM_RUN just returned KVM_EXIT_INTERNAL_ERROR, for which `internal` is the
        // member of the exit union that KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
        VcpuError::Internal {
            suberror: internal.suberror,
            rip,
            data: internal.data[..n].to_vec(),
        }
    }

    /// Lets KVM finish an exit the VMM has already handled, without running guest code.
    /// KVM completes a port or MMIO access (IN data into the register, RIP past the
    /// instruction) only on the next KVM_RUN; a vCPU parked before that would be saved on
    /// the instruction, and a clone would execute it again. With `immediate_exit` set,
    /// KVM_RUN completes the access and returns EINTR before entering the guest (what
    /// Firecracker does before saving a vCPU). A string access may need more exits to finish:
    /// those are handled like any other, a few at most.
    fn complete_pending_exit(&mut self) -> Result<Emulation, VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let mut outcome = Ok(Emulation::Interrupted);
        for _ in 0..16 {
            outcome = self.run_once();
            if !matches!(outcome, Ok(Emulation::Handled)) {
                break;
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        outcome
    }

    /// Starts the vCPU thread. It runs the guest until told otherwise on `commands` and
    /// reports on `events`.
    pub fn spawn(
        self,
        commands: Receiver<VcpuCommand>,
        events: Sender<(u8, VcpuEvent)>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        install_kick_handler();
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || self.thread_main(&commands, &events))
            .map_err(VcpuError::Spawn)
    }

    fn thread_main(mut self, commands: &Receiver<VcpuCommand>, events: &Sender<(u8, VcpuEvent)>) {
        let id = self.id;
        let send = |e| {
            let _ = events.send((id, e));
        };
        if self.seccomp {
            if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                send(VcpuEvent::Stopped(Err(VcpuError::Seccomp(e))));
                return;
            }
        }
        loop {
            if let Ok(cmd) = commands.try_recv() {
                match self.obey(cmd, commands, events) {
                    Flow::Run => {}
                    Flow::Stop => return,
                    Flow::Ended(result) => {
                        send(VcpuEvent::Stopped(result));
                        return;
                    }
                }
            }
            match self.run_once() {
                Ok(Emulation::Handled | Emulation::Interrupted) => {}
                Ok(Emulation::Stopped(stop)) => {
                    send(VcpuEvent::Stopped(Ok(stop)));
                    return;
                }
                Err(e) => {
                    send(VcpuEvent::Stopped(Err(e)));
                    return;
                }
            }
        }
    }

    /// Handles one command; a pause parks here until resume or stop.
    fn obey(
        &mut self,
        cmd: VcpuCommand,
        commands: &Receiver<VcpuCommand>,
        events: &Sender<(u8, VcpuEvent)>,
    ) -> Flow {
        let id = self.id;
        let send = |e| {
            let _ = events.send((id, e));
        };
        match cmd {
            VcpuCommand::Stop => return Flow::Stop,
            VcpuCommand::Resume | VcpuCommand::Save => return Flow::Run,
            VcpuCommand::Pause => match self.complete_pending_exit() {
                Ok(Emulation::Stopped(stop)) => return Flow::Ended(Ok(stop)),
                Err(e) => return Flow::Ended(Err(e)),
                Ok(_) => send(VcpuEvent::Paused),
            },
        }
        loop {
            match commands.recv() {
                Ok(VcpuCommand::Pause) => send(VcpuEvent::Paused),
                Ok(VcpuCommand::Save) => send(VcpuEvent::Saved(Box::new(self.save_state()))),
                Ok(VcpuCommand::Resume) => {
                    send(VcpuEvent::Resumed);
                    return Flow::Run;
                }
                Ok(VcpuCommand::Stop) | Err(_) => return Flow::Stop,
            }
        }
    }
}

enum Flow {
    Run,
    Stop,
    /// The guest stopped (or could not run) while the vCPU was being parked.
    Ended(Result<GuestStop, VcpuError>),
}

/// Orders for a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Leave KVM_RUN and park.
    Pause,
    /// Report the complete vCPU state (only while paused).
    Save,
    /// Continue running the guest.
    Resume,
    /// End the thread.
    Stop,
}

/// Reports from a vCPU thread.
pub enum VcpuEvent {
    Paused,
    Resumed,
    Saved(Box<Result<VcpuState, VcpuError>>),
    /// The thread ended: the guest stopped, or running it failed.
    Stopped(Result<GuestStop, VcpuError>),
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivering the signal is what makes KVM_RUN return EINTR.
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            tracing::error!(error = %e, "cannot install the vCPU kick signal handler");
        }
    });
}

/// Lists the MSRs among `candidates` that this vCPU can read, one ioctl per MSR, so a
/// snapshot saves every MSR KVM really supports here (the advertised list can include MSRs
/// this host class refuses).
pub fn readable_msrs(vcpu: &Vcpu, candidates: &[u32]) -> Vec<u32> {
    candidates
        .iter()
        .copied()
        .filter(|&index| {
            let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }]) else {
                return false;
            };
            matches!(vcpu.fd.get_msrs(&mut msrs), Ok(1))
        })
        .collect()
}
