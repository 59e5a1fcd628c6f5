//! A built microVM: its KVM VM, devices and vCPU threads, and the controls the owner uses
//! (resume, pause, wait for the guest to stop). Dropping it stops and joins every vCPU thread.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::Killable;

use crate::devices::legacy::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::vstate::vcpu::{kick_signal, GuestStop, VcpuCommand, VcpuError, VcpuEvent, VcpuState};
use crate::vstate::vm::Vm;

/// What went wrong driving a running microVM.
#[derive(Debug, thiserror::Error)]
pub enum MicroVmError {
    #[error("vCPU {id} failed")]
    Vcpu {
        id: u8,
        #[source]
        source: VcpuError,
    },
    #[error("the guest already stopped ({0:?})")]
    GuestStopped(GuestStop),
    #[error("vCPU {0} did not answer within {1:?}")]
    Unresponsive(u8, Duration),
    #[error("timed out after {0:?} waiting for the guest to stop")]
    WaitTimeout(Duration),
    #[error("the VM is not paused")]
    NotPaused,
}

/// How long a vCPU thread may take to acknowledge a command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct VcpuHandle {
    pub id: u8,
    pub commands: Sender<VcpuCommand>,
    pub thread: Option<JoinHandle<()>>,
    pub exited: bool,
}

/// What a virtio device was built from, saved in snapshots so a restore can rebuild it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum VirtioDeviceConfig {
    Block(crate::config::BlockConfig),
    Vsock(crate::config::VsockConfig),
    Net(crate::config::NetConfig),
}

/// One virtio-mmio device in a VM.
pub(crate) struct VirtioSlot {
    pub config: VirtioDeviceConfig,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Devices the VMM keeps handles to (for snapshots and flushing).
pub(crate) struct Devices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub virtio: Vec<VirtioSlot>,
    /// Event threads of devices with a host side (vsock, net), the flag that ends them and
    /// the one that holds them while the VM is paused.
    pub event_threads: Vec<JoinHandle<()>>,
    pub stop_events: Arc<std::sync::atomic::AtomicBool>,
    pub pause_events: Arc<std::sync::atomic::AtomicBool>,
}

impl Devices {
    /// Stops the devices' host sides from touching guest memory or raising interrupts, so
    /// a paused VM stays still (a snapshot's memory must match its device state). The
    /// event threads check the flag under each transport's lock, so once every lock has
    /// been taken here no host-side work is in flight.
    fn pause(&self) {
        self.pause_events
            .store(true, std::sync::atomic::Ordering::Release);
        for slot in &self.virtio {
            drop(slot.transport.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
}

/// A microVM whose vCPU threads exist. Built paused: call [`MicroVm::resume`] to run it.
pub struct MicroVm {
    pub(crate) vm: Vm,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) events: Receiver<(u8, VcpuEvent)>,
    pub(crate) devices: Devices,
    pub(crate) msr_list: Arc<Vec<u32>>,
    paused: bool,
    stop: Option<Result<GuestStop, (u8, VcpuError)>>,
}

impl MicroVm {
    pub(crate) fn new(
        vm: Vm,
        vcpus: Vec<VcpuHandle>,
        events: Receiver<(u8, VcpuEvent)>,
        devices: Devices,
        msr_list: Arc<Vec<u32>>,
    ) -> Result<Self, MicroVmError> {
        let mut this = MicroVm {
            vm,
            vcpus,
            events,
            devices,
            msr_list,
            paused: false,
            stop: None,
        };
        this.pause()?;
        Ok(this)
    }

    /// Guest RAM, for the host to read results or feed input (safe while running: it is
    /// shared memory, as with any device).
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.vm.memory()
    }

    /// Whether the vCPUs are parked.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    fn record(&mut self, id: u8, event: VcpuEvent) -> Option<VcpuEvent> {
        match event {
            VcpuEvent::Stopped(outcome) => {
                if let Some(v) = self.vcpus.iter_mut().find(|v| v.id == id) {
                    v.exited = true;
                }
                if self.stop.is_none() {
                    self.stop = Some(outcome.map_err(|e| (id, e)));
                }
                None
            }
            other => Some(other),
        }
    }

    fn stopped_error(&self) -> Option<MicroVmError> {
        match &self.stop {
            Some(Ok(s)) => Some(MicroVmError::GuestStopped(*s)),
            Some(Err((id, e))) => Some(MicroVmError::Vcpu {
                id: *id,
                source: VcpuError::UnexpectedExit(e.to_string()),
            }),
            None => None,
        }
    }

    /// Sends `cmd` to every live vCPU and waits until each answers with an event `want`
    /// accepts, kicking those that have not answered out of KVM_RUN every millisecond.
    fn broadcast(
        &mut self,
        cmd: VcpuCommand,
        want: fn(&VcpuEvent) -> bool,
    ) -> Result<Vec<(u8, VcpuEvent)>, MicroVmError> {
        let mut pending: Vec<u8> = Vec::new();
        for v in self.vcpus.iter().filter(|v| !v.exited) {
            if v.commands.send(cmd).is_ok() {
                pending.push(v.id);
            }
        }
        let mut answers = Vec::new();
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while !pending.is_empty() {
            if cmd == VcpuCommand::Pause {
                for v in self.vcpus.iter().filter(|v| pending.contains(&v.id)) {
                    if let Some(t) = &v.thread {
                        let _ = t.kill(kick_signal());
                    }
                }
            }
            match self.events.recv_timeout(Duration::from_millis(1)) {
                Ok((id, event)) => {
                    if let Some(event) = self.record(id, event) {
                        if want(&event) {
                            pending.retain(|p| *p != id);
                            answers.push((id, event));
                        }
                    } else {
                        pending.retain(|p| *p != id);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() > deadline {
                return Err(MicroVmError::Unresponsive(pending[0], COMMAND_TIMEOUT));
            }
        }
        Ok(answers)
    }

    /// Parks every vCPU outside KVM_RUN and holds the devices' host sides (vsock, net event
    /// threads) until [`MicroVm::resume`].
    pub fn pause(&mut self) -> Result<(), MicroVmError> {
        if self.paused {
            return Ok(());
        }
        self.broadcast(VcpuCommand::Pause, |e| matches!(e, VcpuEvent::Paused))?;
        self.devices.pause();
        if let Some(e) = self.stopped_error() {
            return Err(e);
        }
        self.paused = true;
        Ok(())
    }

    /// Lets every vCPU run again.
    pub fn resume(&mut self) -> Result<(), MicroVmError> {
        if !self.paused {
            return Ok(());
        }
        self.devices
            .pause_events
            .store(false, std::sync::atomic::Ordering::Release);
        for t in &self.devices.event_threads {
            t.thread().unpark();
        }
        self.broadcast(VcpuCommand::Resume, |e| matches!(e, VcpuEvent::Resumed))?;
        self.paused = false;
        Ok(())
    }

    /// The state of every vCPU, by id. The VM must be paused.
    pub(crate) fn save_vcpus(&mut self) -> Result<Vec<VcpuState>, MicroVmError> {
        if !self.paused {
            return Err(MicroVmError::NotPaused);
        }
        let answers = self.broadcast(VcpuCommand::Save, |e| matches!(e, VcpuEvent::Saved(_)))?;
        let mut states = Vec::new();
        for (id, event) in answers {
            if let VcpuEvent::Saved(state) = event {
                states.push((*state).map_err(|source| MicroVmError::Vcpu { id, source })?);
            }
        }
        states.sort_by_key(|s| s.id);
        Ok(states)
    }

    /// Waits for the guest to stop (exit port, shutdown) or fail, up to `timeout`.
    /// Returns the exit status it chose; a vCPU failure (for example an instruction this
    /// KVM cannot emulate) is an error carrying KVM's report.
    pub fn wait(&mut self, timeout: Duration) -> Result<GuestStop, MicroVmError> {
        let deadline = Instant::now() + timeout;
        while self.stop.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((id, event)) => {
                    self.record(id, event);
                }
                Err(RecvTimeoutError::Timeout) => return Err(MicroVmError::WaitTimeout(timeout)),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.shutdown_vcpus();
        self.devices
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
        match self.stop.take() {
            Some(Ok(stop)) => {
                self.stop = Some(Ok(stop));
                Ok(stop)
            }
            Some(Err((id, source))) => {
                self.stop = Some(Err((id, VcpuError::UnexpectedExit(source.to_string()))));
                Err(MicroVmError::Vcpu { id, source })
            }
            None => Err(MicroVmError::WaitTimeout(timeout)),
        }
    }

    fn shutdown_vcpus(&mut self) {
        for v in &self.vcpus {
            let _ = v.commands.send(VcpuCommand::Stop);
        }
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                // Repeat the kick until the thread leaves: one signal can land just before it
                // enters KVM_RUN.
                while !t.is_finished() {
                    let _ = t.kill(kick_signal());
                    std::thread::sleep(Duration::from_micros(200));
                }
                let _ = t.join();
            }
            v.exited = true;
        }
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.shutdown_vcpus();
        self.devices
            .stop_events
            .store(true, std::sync::atomic::Ordering::Release);
        for t in &self.devices.event_threads {
            t.thread().unpark();
        }
        for t in self.devices.event_threads.drain(..) {
            let _ = t.join();
        }
    }
}
