//! The KVM VM: memory slots, in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT, and the
//! VM-wide state saved in a snapshot.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::KVM_TSS_ADDR;

/// Which VM-level KVM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("opening /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR")]
    SetTss(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION (slot {slot})")]
    MemorySlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_SUPPORTED_CPUID")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_MSR_INDEX_LIST")]
    MsrList(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_IRQCHIP")]
    GetIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_IRQCHIP")]
    SetIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_PIT2")]
    GetPit(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_PIT2")]
    SetPit(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_CLOCK")]
    GetClock(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_CLOCK")]
    SetClock(#[source] kvm_ioctls::Error),
    #[error("KVM_IRQFD (gsi {gsi})")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// VM-wide device state: the two PICs, the IOAPIC, the PIT and the kvmclock.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// A KVM VM with its guest memory registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemoryMmap,
}

impl Vm {
    /// Creates the VM, its irqchip and PIT, and registers every memory region as a slot.
    pub fn new(memory: GuestMemoryMmap) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(VmError::SetTss)?;
        for (slot, region) in memory.iter().enumerate() {
            let slot = slot as u32;
            let mem_region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the host range is a live mapping owned by `memory`, which this Vm keeps
            // alive for as long as the VM fd (and so the slot) exists; slots do not overlap
            // because vm-memory refused overlapping regions.
            unsafe { fd.set_user_memory_region(mem_region) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        // Slots first: with an irqchip present, the first KVM_SET_USER_MEMORY_REGION costs
        // about 6 ms on the shadow-paging hosts measured (0.2 ms without), and restore
        // latency is dominated by it.
        fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        Ok(Vm { kvm, fd, memory })
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The /dev/kvm handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The CPUID KVM supports on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::Cpuid)
    }

    /// Every MSR index KVM says it can save.
    pub fn msr_index_list(&self) -> Result<Vec<u32>, VmError> {
        Ok(self
            .kvm
            .get_msr_index_list()
            .map_err(VmError::MsrList)?
            .as_slice()
            .to_vec())
    }

    /// Routes `gsi` to the irqchip whenever `evt` is written.
    pub fn register_irqfd(
        &self,
        evt: &vmm_sys_util::eventfd::EventFd,
        gsi: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Reads the irqchip, PIT and clock. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut c).map(|()| c)
        };
        let mut clock = self.fd.get_clock().map_err(VmError::GetClock)?;
        // Restore sets the clock to exactly the saved value; no flag may ask KVM to adjust it.
        clock.flags = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER).map_err(VmError::GetIrqchip)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE).map_err(VmError::GetIrqchip)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC).map_err(VmError::GetIrqchip)?,
            pit: self.fd.get_pit2().map_err(VmError::GetPit)?,
            clock,
        })
    }

    /// Writes back what [`Vm::save_state`] read.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd.set_pit2(&state.pit).map_err(VmError::SetPit)?;
        let mut clock = state.clock;
        clock.flags = 0;
        self.fd.set_clock(&clock).map_err(VmError::SetClock)?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(chip).map_err(VmError::SetIrqchip)?;
        }
        Ok(())
    }
}
