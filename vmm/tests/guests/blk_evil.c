/*
 * Offers malformed descriptor chains to virtio-blk and reports what the device did. Each
 * case must end with the device asking for a reset (DEVICE_NEEDS_RESET), never with the VMM
 * touching memory outside the guest or hanging. After each case the driver resets the
 * device and checks that a valid read works again.
 */
#include "virtio.h"

#define HDR ((volatile u32 *)0x410000)
#define DATA ((volatile u8 *)0x411000)
#define STATUS ((volatile u8 *)0x413000)
#define DEV VIRTIO_MMIO_BASE

static void header(u32 type, u64 sector)
{
    HDR[0] = type;
    HDR[1] = 0;
    *(volatile u64 *)(HDR + 2) = sector;
    *STATUS = 0xff;
}

static void report(const char *name)
{
    u32 status = mmio_read(DEV, R_STATUS);
    serial_puts(name);
    serial_puts(status & S_NEEDS_RESET ? "=needs_reset" : "=accepted");
    serial_puts(vq0.used->idx != vq0.last_used ? " used\n" : "\n");
}

/* Lays out a read of sector 0 into `len` bytes at `data`: header, data, status. */
static void read_chain(u64 data, u32 len)
{
    header(0, 0);
    vq_desc(&vq0, 0, (u64)HDR, 16, VRING_DESC_F_NEXT, 1);
    vq_desc(&vq0, 1, data, len, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
    vq_desc(&vq0, 2, (u64)STATUS, 1, VRING_DESC_F_WRITE, 0);
}

static int valid_read(void)
{
    read_chain((u64)DATA, 512);
    vq_submit(DEV, &vq0, 0);
    return vq_wait(DEV, &vq0) && *STATUS == 0;
}

static void recover(void)
{
    if (virtio_init(DEV, 2) || !valid_read()) {
        serial_puts("recovery failed\n");
        guest_exit(2);
    }
}

void main(void)
{
    if (virtio_init(DEV, 2))
        guest_exit(1);

    /* 1: data buffer far outside guest memory. */
    read_chain(0x7fff00000000UL, 512);
    vq_submit(DEV, &vq0, 0);
    report("out_of_range");
    recover();

    /* 2: a loop: 0 -> 1 -> 0 -> ... */
    header(0, 0);
    vq_desc(&vq0, 0, (u64)HDR, 16, VRING_DESC_F_NEXT, 1);
    vq_desc(&vq0, 1, (u64)DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0);
    vq_submit(DEV, &vq0, 0);
    report("loop");
    recover();

    /* 3: an oversized length running off the end of guest memory. */
    read_chain((u64)DATA, 0xfffff000U);
    vq_submit(DEV, &vq0, 0);
    report("oversized");
    recover();

    /* 3b: a length inside guest memory but beyond what one request may carry (32 MiB). */
    read_chain(0x1000000UL, 0x2000000U);
    vq_submit(DEV, &vq0, 0);
    report("too_big");
    recover();

    /* 4: a next index beyond the queue size. */
    header(0, 0);
    vq_desc(&vq0, 0, (u64)HDR, 16, VRING_DESC_F_NEXT, 200);
    vq_submit(DEV, &vq0, 0);
    report("bad_next");
    recover();

    /* 5: the available index jumps far past what the queue can hold. */
    read_chain((u64)DATA, 512);
    vq0.avail->idx = vq0.avail->idx + 1000;
    mmio_write(DEV, R_QUEUE_NOTIFY, 0);
    report("avail_jump");
    recover();

    /* 6: a header that is not there (a chain of one writable byte). */
    vq_desc(&vq0, 0, (u64)STATUS, 1, VRING_DESC_F_WRITE, 0);
    vq_submit(DEV, &vq0, 0);
    report("no_header");
    recover();

    serial_puts("recovered\n");
    guest_exit(0);
}
