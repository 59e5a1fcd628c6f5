/*
 * A vsock echo server on port 1234 for the benchmark: every data packet is sent back
 * unchanged. The packet is echoed in place (header rewritten inside the rx buffer, which is
 * then offered on the tx queue), so no guest loop copies payload bytes.
 */
#include "vsock.h"

#define RX_BUFS 8
#define CTRL_BUF 0x440000UL
#define BUF_ALLOC (RX_BUFS * 4096)

static struct vq rxq, txq, evq;
static u64 cid;
static u32 fwd_cnt;

/* Sends the packet at `buf` (header already filled) and waits until the device took it. */
static void tx(u64 buf, u32 len)
{
    vq_desc(&txq, 0, buf, len, 0, 0);
    vq_submit(DEV, &txq, 0);
    vq_wait(DEV, &txq);
}

static void reply(volatile struct hdr *h, u16 op, u32 len, u64 buf)
{
    u32 port = h->src_port;
    h->src_port = h->dst_port;
    h->dst_port = port;
    h->src_cid = cid;
    h->dst_cid = 2;
    h->op = op;
    h->len = len;
    h->flags = 0;
    h->buf_alloc = BUF_ALLOC;
    h->fwd_cnt = fwd_cnt;
    tx(buf, sizeof(struct hdr) + len);
}

void main(void)
{
    if (vsock_start(&rxq, &txq, &evq, RX_BUFS, &cid))
        guest_exit(1);
    serial_puts("ready\n");
    for (;;) {
        u32 id = vq_wait_for(DEV, &rxq, ~0UL);
        if (!id)
            continue;
        id -= 1;
        u64 buf = RX_BUF(id);
        volatile struct hdr *h = (volatile struct hdr *)buf;
        volatile struct hdr *c = (volatile struct hdr *)CTRL_BUF;
        switch (h->op) {
        case OP_REQUEST:
            fwd_cnt = 0;
            *c = *h;
            reply(c, OP_RESPONSE, 0, CTRL_BUF);
            break;
        case OP_RW:
            fwd_cnt += h->len;
            reply(h, OP_RW, h->len, buf);
            break;
        case OP_CREDIT_REQUEST:
            *c = *h;
            reply(c, OP_CREDIT_UPDATE, 0, CTRL_BUF);
            break;
        default:
            break;
        }
        vq_submit(DEV, &rxq, (u16)id);
    }
}
