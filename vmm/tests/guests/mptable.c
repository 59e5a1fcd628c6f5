/*
 * Finds the Intel MP table the way Linux does (arch/x86/kernel/mpparse.c: the first KiB of
 * memory, the last KiB of base memory, the BIOS area 0xf0000-0xfffff, then the EBDA the BIOS
 * data area points to; "_MP_" on a 16-byte boundary, length 1, checksum 0, spec 1.1 or 1.4),
 * checks both checksums, walks the configuration table's entries and reports them on serial,
 * one "key: value" line each; then says whether the table overlaps RAM in the zero page's
 * e820 map. Exits with status 9, or 1 when no table is found or it is malformed.
 */
#define GUEST_ZERO_PAGE_ENTRY
#include "guest.h"

#define ZP_E820_ENTRIES 0x1e8
#define ZP_E820_TABLE 0x2d0
#define E820_ENTRY_SIZE 20
#define E820_RAM 1
#define BDA_EBDA_SEGMENT 0x40e

static u32 rd32(u64 a) { return *(const volatile u32 *)a; }
static u16 rd16(u64 a) { return *(const volatile u16 *)a; }
static u64 rd64(u64 a) { return *(const volatile u64 *)a; }
static u8 rd8(u64 a)
{
    /* Hide the address from the optimizer: scanning starts at physical address 0, which C
     * would otherwise treat as a null pointer. */
    __asm__("" : "+r"(a));
    return *(const volatile u8 *)a;
}

static void line(const char *key, u64 value)
{
    serial_puts(key);
    serial_puts(": ");
    serial_hex(value);
    serial_putc('\n');
}

static __attribute__((noreturn)) void fail(const char *why)
{
    serial_puts("error: ");
    serial_puts(why);
    serial_putc('\n');
    guest_exit(1);
}

static u8 sum(u64 a, u64 len)
{
    u8 s = 0;
    for (u64 i = 0; i < len; i++)
        s += rd8(a + i);
    return s;
}

static u64 scan(u64 base, u64 len)
{
    for (u64 a = base; a + 16 <= base + len; a += 16) {
        if (rd8(a) == '_' && rd8(a + 1) == 'M' && rd8(a + 2) == 'P' && rd8(a + 3) == '_' &&
            rd8(a + 8) == 1 && sum(a, 16) == 0 && (rd8(a + 9) == 1 || rd8(a + 9) == 4))
            return a;
    }
    return 0;
}

/* Whether [start, end) overlaps an e820 RAM entry. */
static int in_e820_ram(const u8 *zp, u64 start, u64 end)
{
    u64 table = (u64)zp + ZP_E820_TABLE;
    for (int i = 0; i < zp[ZP_E820_ENTRIES]; i++) {
        u64 e = table + i * E820_ENTRY_SIZE;
        u64 addr = rd64(e), size = rd64(e + 8);
        if (rd32(e + 16) == E820_RAM && start < addr + size && addr < end)
            return 1;
    }
    return 0;
}

void main(const u8 *zp)
{
    u64 mpf = scan(0, 0x400);
    if (!mpf)
        mpf = scan(639 * 0x400, 0x400);
    if (!mpf)
        mpf = scan(0xf0000, 0x10000);
    if (!mpf) {
        u64 ebda = (u64)rd16(BDA_EBDA_SEGMENT) << 4;
        if (ebda)
            mpf = scan(ebda, 0x400);
    }
    if (!mpf)
        fail("no _MP_ floating pointer");
    line("mpf", mpf);
    line("mpf checksum", sum(mpf, 16));

    u64 mpc = rd32(mpf + 4);
    line("mpc", mpc);
    if (!mpc)
        fail("no configuration table (default configuration)");
    if (rd8(mpc) != 'P' || rd8(mpc + 1) != 'C' || rd8(mpc + 2) != 'M' || rd8(mpc + 3) != 'P')
        fail("no PCMP signature");
    u64 length = rd16(mpc + 4);
    line("mpc length", length);
    line("mpc checksum", sum(mpc, length));
    line("mpc spec", rd8(mpc + 6));
    line("lapic", rd32(mpc + 36));

    u64 entries = 0, processors = 0, enabled = 0, bsp_count = 0, bsp = 0xff, apic_ids = 0;
    u64 buses = 0, ioapics = 0, ioapic_id = 0xff, ioapic_version = 0, ioapic_addr = 0;
    u64 irq_entries = 0, isa_irq4_pin = 0xff, isa_irq0_pin = 0xff, lint0 = 0xff, lint1 = 0xff;
    u64 at = mpc + 44;
    while (at < mpc + length) {
        u8 type = rd8(at);
        entries++;
        if (type == 0) { /* processor */
            u8 id = rd8(at + 1), flags = rd8(at + 3);
            processors++;
            if (flags & 1)
                enabled++;
            if (flags & 2) {
                bsp_count++;
                bsp = id;
            }
            if (id < 64)
                apic_ids |= 1ul << id;
            at += 20;
        } else if (type == 1) { /* bus */
            if (rd8(at + 2) != 'I' || rd8(at + 3) != 'S' || rd8(at + 4) != 'A')
                fail("bus is not ISA");
            buses++;
            at += 8;
        } else if (type == 2) { /* IOAPIC */
            ioapics++;
            ioapic_id = rd8(at + 1);
            ioapic_version = rd8(at + 2);
            if (!(rd8(at + 3) & 1))
                fail("IOAPIC not enabled");
            ioapic_addr = rd32(at + 4);
            at += 8;
        } else if (type == 3) { /* I/O interrupt assignment */
            irq_entries++;
            if (rd8(at + 6) != ioapic_id)
                fail("interrupt routed to an unknown IOAPIC");
            if (rd8(at + 1) == 0 && rd8(at + 4) == 0 && rd8(at + 5) == 4)
                isa_irq4_pin = rd8(at + 7);
            if (rd8(at + 1) == 0 && rd8(at + 4) == 0 && rd8(at + 5) == 0)
                isa_irq0_pin = rd8(at + 7);
            at += 8;
        } else if (type == 4) { /* local interrupt assignment */
            if (rd8(at + 7) == 0)
                lint0 = rd8(at + 1);
            else if (rd8(at + 7) == 1)
                lint1 = rd8(at + 1);
            at += 8;
        } else {
            fail("unknown entry type");
        }
    }
    if (at != mpc + length)
        fail("last entry runs past the table's length");

    line("entries", entries);
    line("entry count", rd16(mpc + 34));
    line("processors", processors);
    line("enabled", enabled);
    line("bsp count", bsp_count);
    line("bsp", bsp);
    line("apic ids", apic_ids);
    line("buses", buses);
    line("ioapics", ioapics);
    line("ioapic id", ioapic_id);
    line("ioapic version", ioapic_version);
    line("ioapic addr", ioapic_addr);
    line("irq entries", irq_entries);
    line("isa irq 0 pin", isa_irq0_pin);
    line("isa irq 4 pin", isa_irq4_pin);
    line("lint0", lint0);
    line("lint1", lint1);
    line("in e820 ram", in_e820_ram(zp, mpf, mpf + 16) || in_e820_ram(zp, mpc, mpc + length));
    guest_exit(9);
}
