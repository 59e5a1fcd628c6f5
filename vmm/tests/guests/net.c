/*
 * Drives virtio-net: broadcasts one Ethernet frame (ethertype 0x88b5, the IEEE local
 * experimental type) and prints the payload of the first 0x88b5 frame it receives.
 */
#include "virtio.h"

#define DEV VIRTIO_MMIO_BASE
#define NET_HDR 12
#define RX_BUFS 4
#define RX_BUF(i) (0x420000UL + (u64)(i) * 0x1000)
#define TX_BUF 0x430000UL
#define SPINS 3000000UL

static struct vq rxq, txq;

static void fail(const char *why)
{
    serial_puts("FAIL: ");
    serial_puts(why);
    serial_puts("\n");
    guest_exit(1);
}

void main(void)
{
    if (virtio_begin(DEV, 1) || vq_setup(DEV, &rxq, 0, 0x404000) || vq_setup(DEV, &txq, 1, 0x408000))
        fail("init");
    virtio_ready(DEV);
    for (int i = 0; i < RX_BUFS; i++) {
        vq_desc(&rxq, i, RX_BUF(i), 2048, VRING_DESC_F_WRITE, 0);
        vq_offer(&rxq, (u16)i);
    }
    mmio_write(DEV, R_QUEUE_NOTIFY, 0);

    u32 lo = mmio_read(DEV, R_CONFIG), hi = mmio_read(DEV, R_CONFIG + 4);
    u8 mac[6] = {lo, lo >> 8, lo >> 16, lo >> 24, hi, hi >> 8};

    volatile u8 *f = (volatile u8 *)TX_BUF;
    for (int i = 0; i < NET_HDR; i++)
        f[i] = 0;
    for (int i = 0; i < 6; i++) {
        f[NET_HDR + i] = 0xff;
        f[NET_HDR + 6 + i] = mac[i];
    }
    f[NET_HDR + 12] = 0x88;
    f[NET_HDR + 13] = 0xb5;
    const char *msg = "hello from the guest over virtio-net";
    u32 len = NET_HDR + 14;
    while (*msg)
        f[len++] = (u8)*msg++;
    vq_desc(&txq, 0, TX_BUF, len, 0, 0);
    vq_submit(DEV, &txq, 0);
    if (!vq_wait(DEV, &txq))
        fail("tx not used");
    serial_puts("sent\n");

    for (int frames = 0; frames < 64; frames++) {
        u32 id = vq_wait_for(DEV, &rxq, SPINS);
        if (!id)
            fail("no frame from the host");
        id -= 1;
        u32 got = rxq.used->ring[(u16)(rxq.last_used - 1) % VQ_SIZE].len;
        volatile u8 *r = (volatile u8 *)RX_BUF(id);
        if (got > NET_HDR + 14 && r[NET_HDR + 12] == 0x88 && r[NET_HDR + 13] == 0xb5) {
            serial_puts("rx: ");
            for (u32 i = NET_HDR + 14; i < got; i++)
                serial_putc((char)r[i]);
            serial_puts("\n");
            guest_exit(0);
        }
        vq_submit(DEV, &rxq, (u16)id);
    }
    fail("no 0x88b5 frame among 64");
}
