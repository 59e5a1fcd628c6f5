/*
 * Freestanding helpers for the VMM's test guests. The guests run in 64-bit kernel mode with
 * the boot page tables identity-mapping low memory; on software-assisted KVM every
 * instruction here is emulated, so keep loops short and avoid int3, popcnt, cmpxchg16b, x87
 * and SSE (the build flags forbid the last two).
 */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define COM1 0x3f8
#define EXIT_PORT 0x501

/* Host <-> guest mailboxes in guest RAM, away from the kernel image and boot tables. */
#define MAILBOX ((volatile u64 *)0x300000)  /* host writes input here */
#define PROGRESS ((volatile u64 *)0x300008) /* guest reports its loop counter here */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void serial_putc(char c)
{
    /* Wait for THR empty (line status bit 5), as a real driver would. */
    while (!(inb(COM1 + 5) & 0x20))
        ;
    outb(COM1, (u8)c);
}

static void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

static void serial_hex(u64 v)
{
    serial_puts("0x");
    for (int shift = 60; shift >= 0; shift -= 4)
        serial_putc("0123456789abcdef"[(v >> shift) & 0xf]);
}

static __attribute__((unused)) void serial_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    serial_puts(&buf[i]);
}

static __attribute__((noreturn)) void guest_exit(u32 status)
{
    outl(EXIT_PORT, status);
    for (;;)
        __asm__ volatile("hlt");
}

#ifdef GUEST_ZERO_PAGE_ENTRY
/*
 * Entry for guests that read the Linux zero page and can be packaged both as an ELF (entered
 * at _start, 1 MiB) and as a bzImage (entered at the 64-bit entry, 0x200 bytes into the
 * protected-mode part loaded at 1 MiB): _start jumps over 0x200 bytes of hlt to the common
 * entry, which passes the zero page (rsi, per the 64-bit boot protocol) to main.
 */
void main(const u8 *zero_page);

__attribute__((section(".text.start"), naked, noreturn)) void _start(void)
{
    __asm__ volatile("jmp entry64\n"
                     ".fill 0x200 - (. - _start), 1, 0xf4\n"
                     "entry64:\n"
                     "mov %rsi, %rdi\n"
                     "call main\n"
                     "1: hlt\n"
                     "jmp 1b");
}
#else
void main(void);

__attribute__((section(".text.start"), naked, noreturn)) void _start(void)
{
    __asm__ volatile("call main\n1: hlt\njmp 1b");
}
#endif

#endif
