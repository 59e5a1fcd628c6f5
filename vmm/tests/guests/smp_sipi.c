/*
 * The BSP copies a real-mode stub to TRAMPOLINE, sends one INIT and one SIPI to APIC id 1
 * and exits 0. The test leaves vCPU 1 out of KVM_RUN meanwhile, as a paused VM does, so both
 * IPIs are still pending in its LAPIC when it is saved. The stub, once an AP runs it, counts
 * its start at TRAMPOLINE + AP_STARTS_OFFSET and halts.
 */
#include "lapic.h"

#define TRAMPOLINE 0x6000
/* In the trampoline's page: real mode reaches only its own 64 KiB segment. */
#define AP_STARTS_OFFSET 0x800
#define XSTR(x) STR(x)
#define STR(x) #x

#define ICR_STARTUP 0x0600

/* Real mode, CS = TRAMPOLINE >> 4 (base TRAMPOLINE): count this start, then halt. */
__asm__(".text\n"
        ".globl sipi_stub_start, sipi_stub_end\n"
        ".code16\n"
        "sipi_stub_start:\n"
        "cli\n"
        "mov %cs, %ax\n"
        "mov %ax, %ds\n"
        "lock incl " XSTR(AP_STARTS_OFFSET) "\n"
        "1: hlt\n"
        "jmp 1b\n"
        "sipi_stub_end:\n"
        ".code64\n");

extern const u8 sipi_stub_start[], sipi_stub_end[];

void main(void)
{
    /* Volatile copy: gcc would otherwise turn the loop into a memcpy call it cannot link. */
    volatile u8 *dst = (volatile u8 *)TRAMPOLINE;
    for (const u8 *p = sipi_stub_start; p < sipi_stub_end; p++)
        *dst++ = *p;
    lapic_write(LAPIC_SVR, 0x1ff);
    send_ipi(1, ICR_INIT_ASSERT);
    send_ipi(1, ICR_STARTUP | (TRAMPOLINE >> 12));
    guest_exit(0);
}
