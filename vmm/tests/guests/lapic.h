/*
 * The local APIC as the test guests use it (xAPIC, MMIO at its reset address): registers,
 * accessors, and sending an IPI through the ICR.
 */
#ifndef LAPIC_H
#define LAPIC_H

#include "guest.h"

#define LAPIC_BASE 0xfee00000UL

#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0

#define SVR_APIC_ENABLE 0x100
#define ICR_PENDING (1u << 12)
#define ICR_INIT_ASSERT 0xc500 /* INIT, level-triggered, assert */
#define ICR_INIT_DEASSERT 0x8500
#define ICR_STARTUP 0x0600

static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

/* Sends `icr` to `apic_id` and waits until the LAPIC has delivered it. */
static __attribute__((unused)) void send_ipi(u32 apic_id, u32 icr)
{
    lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
    lapic_write(LAPIC_ICR_LOW, icr);
    while (lapic_read(LAPIC_ICR_LOW) & ICR_PENDING)
        ;
}

#endif
