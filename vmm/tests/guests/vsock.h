/*
 * What the vsock test guests share: the virtio-vsock packet header, its operations, and bringing
 * the device up with its three queues and receive buffers at fixed guest addresses.
 */
#ifndef VSOCK_H
#define VSOCK_H

#include "virtio.h"

#define DEV VIRTIO_MMIO_BASE
#define RX_BUF(i) (0x420000UL + (u64)(i) * 0x2000)

struct hdr {
    u64 src_cid;
    u64 dst_cid;
    u32 src_port;
    u32 dst_port;
    u32 len;
    u16 type;
    u16 op;
    u32 flags;
    u32 buf_alloc;
    u32 fwd_cnt;
} __attribute__((packed));

enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };

/*
 * Writes a stream packet to the host (CID 2) at `buf`: header, then `len` bytes of `data`.
 * Returns the packet's length, for the tx descriptor.
 */
static u32 vsock_packet(u64 buf, u64 cid, u32 src_port, u32 dst_port, u16 op, u32 flags,
                        u32 buf_alloc, u32 fwd_cnt, volatile const char *data, u32 len)
{
    volatile struct hdr *h = (volatile struct hdr *)buf;
    h->src_cid = cid;
    h->dst_cid = 2;
    h->src_port = src_port;
    h->dst_port = dst_port;
    h->len = len;
    h->type = 1;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = buf_alloc;
    h->fwd_cnt = fwd_cnt;
    volatile char *p = (volatile char *)(buf + sizeof(struct hdr));
    for (u32 i = 0; i < len; i++)
        p[i] = data[i];
    return sizeof(struct hdr) + len;
}

/*
 * Sets up the rx, tx and event queues, reads the guest's CID into `*cid` and offers `rx_bufs`
 * receive buffers (a header plus 4 KiB each) at RX_BUF(i). Returns nonzero if the device
 * refused, so each guest reports that its own way.
 */
static int vsock_start(struct vq *rxq, struct vq *txq, struct vq *evq, int rx_bufs, u64 *cid)
{
    if (virtio_begin(DEV, 19) || vq_setup(DEV, rxq, 0, 0x404000) || vq_setup(DEV, txq, 1, 0x408000) ||
        vq_setup(DEV, evq, 2, 0x40c000))
        return 1;
    virtio_ready(DEV);
    *cid = mmio_read(DEV, R_CONFIG) | ((u64)mmio_read(DEV, R_CONFIG + 4) << 32);
    for (int i = 0; i < rx_bufs; i++) {
        vq_desc(rxq, i, RX_BUF(i), sizeof(struct hdr) + 4096, VRING_DESC_F_WRITE, 0);
        vq_offer(rxq, (u16)i);
    }
    mmio_write(DEV, R_QUEUE_NOTIFY, 0);
    return 0;
}

#endif
