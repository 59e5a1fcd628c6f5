/*
 * Reads the Linux zero page the VMM wrote (rsi at entry) and reports it on serial, one
 * "key: value" line each: where the zero page is, the loader id and boot protocol version
 * from its setup header, the command line, the e820 entry count, the initrd's address and
 * size, and the FNV-1a hash of the initrd's bytes. Exits with status 7.
 */
#define GUEST_ZERO_PAGE_ENTRY
#include "guest.h"

/* Zero-page offsets (Documentation/arch/x86/zero-page.rst, boot.rst). */
#define ZP_EXT_RAMDISK_IMAGE 0x0c0
#define ZP_EXT_RAMDISK_SIZE 0x0c4
#define ZP_E820_ENTRIES 0x1e8
#define ZP_VERSION 0x206
#define ZP_TYPE_OF_LOADER 0x210
#define ZP_RAMDISK_IMAGE 0x218
#define ZP_RAMDISK_SIZE 0x21c
#define ZP_CMD_LINE_PTR 0x228

static u32 rd32(const u8 *p) { return *(const volatile u32 *)p; }
static u16 rd16(const u8 *p) { return *(const volatile u16 *)p; }

static void line(const char *key, u64 value)
{
    serial_puts(key);
    serial_puts(": ");
    serial_hex(value);
    serial_putc('\n');
}

void main(const u8 *zp)
{
    line("zero page", (u64)zp);
    line("loader", zp[ZP_TYPE_OF_LOADER]);
    line("version", rd16(zp + ZP_VERSION));

    const char *cmdline = (const char *)(u64)rd32(zp + ZP_CMD_LINE_PTR);
    serial_puts("cmdline: ");
    for (int i = 0; i < 4096 && cmdline[i]; i++)
        serial_putc(cmdline[i]);
    serial_putc('\n');

    line("e820 entries", zp[ZP_E820_ENTRIES]);

    u64 addr = rd32(zp + ZP_RAMDISK_IMAGE) | (u64)rd32(zp + ZP_EXT_RAMDISK_IMAGE) << 32;
    u64 size = rd32(zp + ZP_RAMDISK_SIZE) | (u64)rd32(zp + ZP_EXT_RAMDISK_SIZE) << 32;
    line("initrd addr", addr);
    line("initrd size", size);
    u64 hash = 0xcbf29ce484222325ul;
    for (u64 i = 0; i < size; i++) {
        hash ^= ((const volatile u8 *)addr)[i];
        hash *= 0x100000001b3ul;
    }
    line("initrd fnv1a", hash);
    guest_exit(7);
}
