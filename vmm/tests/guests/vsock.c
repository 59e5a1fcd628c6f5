/*
 * Drives virtio-vsock through the host's Unix-socket muxer, polling (no interrupts):
 *  1. connects to host port 5000, sends "ping from guest", prints the reply, shuts down;
 *  2. prints "listening", accepts a host connection to port 1234, echoes what it receives
 *     prefixed with "echo:", and waits for the host to close.
 */
#include "vsock.h"

#define RX_BUFS 4
#define TX_BUF 0x430000UL
#define EV_BUF 0x438000UL
#define BUF_ALLOC 16384
#define SPINS 3000000UL

static struct vq rxq, txq, evq;
static u64 cid;
static u32 fwd_cnt; /* bytes received on the current connection */

static void fail(const char *why)
{
    serial_puts("FAIL: ");
    serial_puts(why);
    serial_puts("\n");
    guest_exit(1);
}

static void send(u16 op, u32 src_port, u32 dst_port, const char *data, u32 len)
{
    u32 flags = op == OP_SHUTDOWN ? 3 : 0;
    u32 n = vsock_packet(TX_BUF, cid, src_port, dst_port, op, flags, BUF_ALLOC, fwd_cnt, data, len);
    vq_desc(&txq, 0, TX_BUF, n, 0, 0);
    vq_submit(DEV, &txq, 0);
    if (!vq_wait(DEV, &txq))
        fail("tx not used");
}

/* Waits for a packet; copies its header and payload (NUL-terminated) and re-posts the buffer. */
static void recv(struct hdr *out, char *payload, u32 max)
{
    u32 id = vq_wait_for(DEV, &rxq, SPINS);
    if (!id) {
        serial_puts("used idx ");
        serial_hex(rxq.used->idx);
        serial_puts(" last ");
        serial_hex(rxq.last_used);
        serial_puts(" avail ");
        serial_hex(rxq.avail->idx);
        serial_puts("\n");
        fail("no packet from the host");
    }
    id -= 1;
    volatile struct hdr *h = (volatile struct hdr *)RX_BUF(id);
    *out = *(struct hdr *)h;
    volatile char *p = (volatile char *)(RX_BUF(id) + sizeof(struct hdr));
    u32 n = out->len < max - 1 ? out->len : max - 1;
    for (u32 i = 0; i < n; i++)
        payload[i] = p[i];
    payload[n] = 0;
    if (out->op == OP_RW)
        fwd_cnt += out->len;
    vq_submit(DEV, &rxq, (u16)id);
}

void main(void)
{
    if (vsock_start(&rxq, &txq, &evq, RX_BUFS, &cid))
        fail("init");
    vq_desc(&evq, 0, EV_BUF, 8, VRING_DESC_F_WRITE, 0);
    vq_submit(DEV, &evq, 0);
    serial_puts("cid=");
    serial_hex(cid);
    serial_puts("\n");

    struct hdr h;
    char buf[128];

    /* 1: guest -> host port 5000. */
    send(OP_REQUEST, 1025, 5000, 0, 0);
    recv(&h, buf, sizeof(buf));
    if (h.op != OP_RESPONSE || h.src_port != 5000 || h.dst_port != 1025)
        fail("no RESPONSE for port 5000");
    send(OP_RW, 1025, 5000, "ping from guest", 15);
    recv(&h, buf, sizeof(buf));
    if (h.op != OP_RW)
        fail("expected data from host port 5000");
    serial_puts("got: ");
    serial_puts(buf);
    serial_puts("\n");
    send(OP_SHUTDOWN, 1025, 5000, 0, 0);
    recv(&h, buf, sizeof(buf));
    if (h.op != OP_RST)
        fail("expected RST after shutdown");

    /* 2: host -> guest port 1234 through CONNECT. */
    serial_puts("listening\n");
    recv(&h, buf, sizeof(buf));
    if (h.op != OP_REQUEST || h.dst_port != 1234)
        fail("expected a REQUEST for port 1234");
    u32 host_port = h.src_port;
    fwd_cnt = 0; /* credit counters are per connection */
    send(OP_RESPONSE, 1234, host_port, 0, 0);
    recv(&h, buf, sizeof(buf));
    if (h.op != OP_RW)
        fail("expected data on port 1234");
    char reply[140] = "echo:";
    u32 n = 5;
    for (u32 i = 0; buf[i] && n < sizeof(reply); i++)
        reply[n++] = buf[i];
    send(OP_RW, 1234, host_port, reply, n);
    recv(&h, buf, sizeof(buf));
    if (h.op != OP_RST)
        fail("expected RST when the host closed");
    serial_puts("closed\n");
    guest_exit(0);
}
