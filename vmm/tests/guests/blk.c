/*
 * Drives the first virtio-blk device: prints its capacity, reads sectors 0..7 and prints an
 * FNV-1a hash of them, writes a pattern to sectors 8..15, flushes, and prints each request's
 * status byte. The host checks the hash and the written sectors on the image file.
 */
#include "virtio.h"

#define HDR ((volatile u32 *)0x410000)
#define DATA ((volatile u8 *)0x411000)
#define STATUS ((volatile u8 *)0x413000)
#define DEV VIRTIO_MMIO_BASE

static u8 request(u32 type, u64 sector, u32 len, int device_writes)
{
    HDR[0] = type;
    HDR[1] = 0;
    *(volatile u64 *)(HDR + 2) = sector;
    *STATUS = 0xff;
    vq_desc(&vq0, 0, (u64)HDR, 16, VRING_DESC_F_NEXT, 1);
    if (len) {
        vq_desc(&vq0, 1, (u64)DATA, len, VRING_DESC_F_NEXT | (device_writes ? VRING_DESC_F_WRITE : 0), 2);
        vq_desc(&vq0, 2, (u64)STATUS, 1, VRING_DESC_F_WRITE, 0);
    } else {
        vq_desc(&vq0, 0, (u64)HDR, 16, VRING_DESC_F_NEXT, 2);
        vq_desc(&vq0, 2, (u64)STATUS, 1, VRING_DESC_F_WRITE, 0);
    }
    vq_submit(DEV, &vq0, 0);
    if (!vq_wait(DEV, &vq0))
        return 0xee;
    return *STATUS;
}

void main(void)
{
    int err = virtio_init(DEV, 2);
    if (err)
        guest_exit(100 + err);
    u64 capacity = mmio_read(DEV, R_CONFIG) | ((u64)mmio_read(DEV, R_CONFIG + 4) << 32);
    serial_puts("capacity=");
    serial_hex(capacity);
    serial_puts("\n");

    u8 st = request(0 /* IN */, 0, 4096, 1);
    u64 h = 0xcbf29ce484222325UL;
    for (int i = 0; i < 4096; i++)
        h = (h ^ DATA[i]) * 0x100000001b3UL;
    serial_puts("read_status=");
    serial_hex(st);
    serial_puts(" read_hash=");
    serial_hex(h);
    serial_puts("\n");

    for (int i = 0; i < 4096; i++)
        DATA[i] = (u8)(i * 7 + 3);
    st = request(1 /* OUT */, 8, 4096, 0);
    serial_puts("write_status=");
    serial_hex(st);
    serial_puts("\n");

    st = request(4 /* FLUSH */, 0, 0, 0);
    serial_puts("flush_status=");
    serial_hex(st);
    serial_puts("\n");

    /* Past the end of the disk: an I/O error, not a crash. */
    st = request(0, capacity, 512, 1);
    serial_puts("beyond_end_status=");
    serial_hex(st);
    serial_puts("\n");
    guest_exit(0);
}
