//! Initial vCPU state for a 64-bit entry: general registers, segment and control registers,
//! FPU, boot MSRs, LAPIC LINT pins and CPUID.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use super::gdt::{boot_gdt, segment_from_entry, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use super::layout::*;

/// Which vCPU setup ioctl failed.
#[derive(Debug, thiserror::Error)]
pub enum RegsSetupError {
    #[error("KVM_SET_REGS")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_SREGS")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("building the MSR list")]
    MsrList,
    #[error("KVM_SET_MSRS")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS accepted {set} of {wanted} boot MSRs (first refused: {refused:#x})")]
    MsrRefused {
        set: usize,
        wanted: usize,
        refused: u32,
    },
    #[error("KVM_GET_LAPIC")]
    GetLapic(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_LAPIC")]
    SetLapic(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2")]
    SetCpuid(#[source] kvm_ioctls::Error),
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_AM: u64 = 1 << 18;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// General registers at entry: `rip` at the kernel entry, `rsi` at the zero page (Linux 64-bit
/// boot protocol), interrupts off.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsSetupError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(RegsSetupError::SetRegs)
}

/// Long mode with paging on: flat segments from the boot GDT, CR3 at the identity map.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = boot_gdt();
    let code = segment_from_entry(gdt[1], CODE_SELECTOR);
    let data = segment_from_entry(gdt[2], DATA_SELECTOR);
    let tss = segment_from_entry(gdt[3], TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_AM;
    sregs.cr0 |= X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA;
    sregs
}

/// Applies [`long_mode_sregs`] to the vCPU.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsSetupError> {
    let sregs = vcpu.get_sregs().map_err(RegsSetupError::GetSregs)?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(RegsSetupError::SetSregs)
}

/// x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsSetupError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsSetupError::SetFpu)
}

/// MSRs a Linux guest expects zeroed (syscall entry points) plus fast strings on.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets `entries` and fails naming the first MSR KVM refused.
pub fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), RegsSetupError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| RegsSetupError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(RegsSetupError::SetMsrs)?;
    if set != entries.len() {
        return Err(RegsSetupError::MsrRefused {
            set,
            wanted: entries.len(),
            refused: entries[set].index,
        });
    }
    Ok(())
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as a BIOS leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsSetupError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(RegsSetupError::GetLapic)?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = lapic.regs[reg + i] as u8;
        }
        let val = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in val.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as std::os::raw::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(RegsSetupError::SetLapic)
}

/// The host's supported CPUID with this vCPU's APIC id patched into leaf 1.
pub fn setup_cpuid(vcpu: &VcpuFd, mut cpuid: CpuId, id: u8) -> Result<(), RegsSetupError> {
    for entry in cpuid.as_mut_slice() {
        if entry.function == 1 {
            entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << 24);
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(RegsSetupError::SetCpuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_bits_are_set() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.gdt.limit, 31);
    }
}
