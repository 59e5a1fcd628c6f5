/*
 * Proves timer interrupts wake a halted vCPU. The guest sleeps in `sti; hlt` throughout:
 *  0. the PIT (channel 0, rate generator, 2 ms) with IOAPIC pins 0 and 2 both routed, to
 *     show which pin its IRQ 0 arrives on (KVM's default GSI routing: pin 0), PIT_TICKS ticks;
 *  1. the local APIC timer in periodic mode, one tick every 2 ms, until TICKS ticks;
 *  2. if CPUID offers it, the TSC-deadline timer (what Linux uses), re-armed 2 ms ahead
 *     (measured in TSC cycles during phase 1) on every tick, until TICKS more.
 * PROGRESS holds the ticks so far, for a host that snapshots it mid-run. At the end it
 * reports on serial and exits 0.
 */
#include "irq.h"

#define VEC_PIT_PIN0 0x50
#define VEC_PIT_PIN2 0x52
#define PIT_TICKS 5
/* The PIT counts at 1.193182 MHz: 2386 counts are 2 ms. */
#define PIT_COUNT 2386
#define VEC_PERIODIC 0x40
#define VEC_DEADLINE 0x41
#define TICKS 20
/* 2 ms per tick: KVM's APIC bus runs at 1 GHz and the timer divides it by 16. */
#define TIMER_COUNT 125000
#define LVT_TIMER_TSC_DEADLINE (2u << 17)
#define MSR_TSC_DEADLINE 0x6e0

static volatile u64 pit_pin0, pit_pin2, periodic, deadline, others;
static volatile u64 first_tsc, last_tsc;
static u64 tsc_per_tick;

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static int has_tsc_deadline(void)
{
    u32 a = 1, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    return (c >> 24) & 1;
}

static void irq_handler(u8 vector)
{
    if (vector == VEC_PIT_PIN0) {
        pit_pin0++;
    } else if (vector == VEC_PIT_PIN2) {
        pit_pin2++;
    } else if (vector == VEC_PERIODIC) {
        periodic++;
        if (periodic == 1)
            first_tsc = rdtsc();
        last_tsc = rdtsc();
    } else if (vector == VEC_DEADLINE) {
        deadline++;
        if (deadline < TICKS)
            wrmsr(MSR_TSC_DEADLINE, rdtsc() + tsc_per_tick);
    } else {
        others++;
    }
    *PROGRESS = periodic + deadline;
}

static void report(const char *name, u64 v)
{
    serial_puts(name);
    serial_dec(v);
}

void main(void)
{
    irq_init();
    serial_puts("timer armed\n");
    u64 wakeups = 0;
    ioapic_route(0, VEC_PIT_PIN0);
    ioapic_route(2, VEC_PIT_PIN2);
    outb(0x43, 0x34); /* channel 0, low then high byte, mode 2 (rate generator) */
    outb(0x40, PIT_COUNT & 0xff);
    outb(0x40, PIT_COUNT >> 8);
    while (pit_pin0 + pit_pin2 < PIT_TICKS) {
        irq_wait();
        wakeups++;
    }
    ioapic_write(0x10, LVT_MASKED); /* redirection entries share the LVT mask bit */
    ioapic_write(0x14, LVT_MASKED);
    outb(0x43, 0x30); /* mode 0: one last count, then the PIT stays quiet */
    outb(0x40, 0xff);
    outb(0x40, 0xff);

    lapic_timer_start(VEC_PERIODIC, TIMER_COUNT);
    while (periodic < TICKS) {
        irq_wait();
        wakeups++;
    }
    lapic_timer_stop();
    tsc_per_tick = (last_tsc - first_tsc) / (TICKS - 1);

    int tsc_deadline = has_tsc_deadline();
    if (tsc_deadline) {
        lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_TSC_DEADLINE | VEC_DEADLINE);
        wrmsr(MSR_TSC_DEADLINE, rdtsc() + tsc_per_tick);
        while (deadline < TICKS) {
            irq_wait();
            wakeups++;
        }
        lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
    }
    report("pit_pin0=", pit_pin0);
    report(" pit_pin2=", pit_pin2);
    report(" periodic=", periodic);
    report(" deadline=", deadline);
    report(" tsc_deadline=", (u64)tsc_deadline);
    report(" wakeups=", wakeups);
    report(" others=", others);
    serial_puts("\n");
    guest_exit(0);
}
