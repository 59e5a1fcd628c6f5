/*
 * Interrupt plumbing for the interrupt-driven test guests, set up the way an x86 kernel does:
 *  - an IDT whose 256 interrupt gates lead to one assembly stub that saves the caller-saved
 *    registers, calls irq_dispatch(vector) and returns with iretq;
 *  - the 8259 PICs masked (as Linux does once it uses the IOAPIC), so a device IRQ reaches
 *    the CPU once, through the IOAPIC, with the vector the guest chose;
 *  - the local APIC software-enabled (spurious vector register), EOI after each interrupt,
 *    and its timer;
 *  - IOAPIC redirection entries: edge, active high, fixed delivery, physical destination
 *    APIC 0.
 * The guest waits with `sti; hlt`: sti delays interrupts by one instruction, so an interrupt
 * that arrives after the guest checked for work still wakes the hlt instead of being taken
 * before it (the classic lost-wakeup race).
 * A guest including this defines irq_handler(vector) for its own vectors.
 */
#ifndef IRQ_H
#define IRQ_H

#include "lapic.h"

#define IDT_BASE 0x500000UL
#define IOAPIC_BASE 0xfec00000UL

#define LVT_TIMER_PERIODIC (1u << 17)
#define LVT_MASKED (1u << 16)

#define VEC_SPURIOUS 0xff

/* Where a fault (vector < 32) ends the guest: this plus the vector. */
#define EXIT_FAULT 0x100

static void irq_handler(u8 vector);

static void ioapic_write(u32 reg, u32 v)
{
    *(volatile u32 *)IOAPIC_BASE = reg;
    *(volatile u32 *)(IOAPIC_BASE + 0x10) = v;
}

static __attribute__((unused)) u32 ioapic_read(u32 reg)
{
    *(volatile u32 *)IOAPIC_BASE = reg;
    return *(volatile u32 *)(IOAPIC_BASE + 0x10);
}

/* Routes IOAPIC pin `pin` to `vector` on APIC 0: edge, active high, fixed, physical. */
static __attribute__((unused)) void ioapic_route(u32 pin, u8 vector)
{
    ioapic_write(0x11 + 2 * pin, 0); /* destination APIC id 0, written while still masked */
    ioapic_write(0x10 + 2 * pin, vector);
}

struct idt_gate {
    u16 offset_low;
    u16 selector;
    u8 ist;
    u8 type_attr;
    u16 offset_mid;
    u32 offset_high;
    u32 reserved;
} __attribute__((packed));

struct idt_pointer {
    u16 limit;
    u64 base;
} __attribute__((packed));

/*
 * 256 entry stubs, 16 bytes apart: push the vector, jump to the common part. The common part
 * keeps the stack 16-byte aligned for the call (the CPU pushed 5 words, the stub 1, then 9
 * registers and 8 bytes of padding), and pops the vector before iretq. Faults that push an
 * error code never return (irq_dispatch ends the guest), so one stub shape serves all.
 */
__asm__(".text\n"
        ".align 16\n"
        "irq_stubs:\n"
        ".set irq_vector, 0\n"
        ".rept 256\n"
        ".align 16\n"
        "pushq $irq_vector\n"
        "jmp irq_common\n"
        ".set irq_vector, irq_vector + 1\n"
        ".endr\n"
        "irq_common:\n"
        "push %rax\n"
        "push %rcx\n"
        "push %rdx\n"
        "push %rsi\n"
        "push %rdi\n"
        "push %r8\n"
        "push %r9\n"
        "push %r10\n"
        "push %r11\n"
        "mov 72(%rsp), %rdi\n"
        "lea 80(%rsp), %rsi\n"
        "sub $8, %rsp\n"
        "call irq_dispatch\n"
        "add $8, %rsp\n"
        "pop %r11\n"
        "pop %r10\n"
        "pop %r9\n"
        "pop %r8\n"
        "pop %rdi\n"
        "pop %rsi\n"
        "pop %rdx\n"
        "pop %rcx\n"
        "pop %rax\n"
        "add $8, %rsp\n"
        "iretq\n");

extern char irq_stubs[];

/* Every vector (exceptions and spurious included) lands here, interrupts off. */
void irq_dispatch(u64 vector, u64 *frame)
{
    if (vector < 32) {
        /* A fault: say where (frame[0] is the error code for vectors that push one). */
        serial_puts("FAULT vector ");
        serial_hex(vector);
        serial_puts(" frame ");
        serial_hex(frame[0]);
        serial_puts(" ");
        serial_hex(frame[1]);
        serial_puts(" ");
        serial_hex(frame[2]);
        serial_puts("\n");
        guest_exit(EXIT_FAULT + (u32)vector);
    }
    if (vector == VEC_SPURIOUS)
        return; /* spurious interrupts take no EOI */
    irq_handler((u8)vector);
    lapic_write(LAPIC_EOI, 0);
}

/*
 * Installs the IDT, masks the PICs and software-enables the local APIC with every priority
 * accepted. Interrupts stay off (IF=0) until the guest waits.
 */
static void irq_init(void)
{
    volatile struct idt_gate *idt = (volatile struct idt_gate *)IDT_BASE;
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    for (u64 v = 0; v < 256; v++) {
        u64 handler = (u64)irq_stubs + 16 * v;
        idt[v].offset_low = (u16)handler;
        idt[v].selector = cs;
        idt[v].ist = 0;
        idt[v].type_attr = 0x8e; /* present, DPL 0, 64-bit interrupt gate (clears IF) */
        idt[v].offset_mid = (u16)(handler >> 16);
        idt[v].offset_high = (u32)(handler >> 32);
        idt[v].reserved = 0;
    }
    struct idt_pointer ptr = {.limit = 256 * sizeof(struct idt_gate) - 1, .base = IDT_BASE};
    __asm__ volatile("lidt %0" : : "m"(ptr));

    outb(0x21, 0xff); /* master PIC: all lines masked */
    outb(0xa1, 0xff); /* slave PIC */

    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, SVR_APIC_ENABLE | VEC_SPURIOUS);
}

/* Sleeps until the next interrupt has been handled; returns with interrupts off again. */
static inline void irq_wait(void) { __asm__ volatile("sti\n\thlt\n\tcli" ::: "memory"); }

/* Starts the LAPIC timer: periodic, `vector`, one tick every `count` * 16 bus cycles. */
static __attribute__((unused)) void lapic_timer_start(u8 vector, u32 count)
{
    lapic_write(LAPIC_TIMER_DIV, 0x3); /* divide by 16 */
    lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_PERIODIC | vector);
    lapic_write(LAPIC_TIMER_INIT, count);
}

static __attribute__((unused)) void lapic_timer_stop(void)
{
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
    lapic_write(LAPIC_TIMER_INIT, 0);
}

#endif
