/*
 * An interrupt-driven vsock echo server: the guest never polls a ring while idle. It routes
 * its virtio-vsock device's IOAPIC pin (GSI 5, virtio-mmio slot 0) to VEC_VSOCK and sleeps
 * in `sti; hlt`; the interrupt handler reads and acknowledges InterruptStatus, and the main
 * loop then looks at the used rings. It
 *  1. prints "listening" and waits for the host to connect to port 1234;
 *  2. echoes every data packet back on that connection until the host closes it (RST);
 *  3. prints "transport reset" whenever the device posts that event (after a restore);
 *  4. reports, through interrupt-driven serial output (THR-empty interrupts on IRQ 4, one
 *     per byte), how many messages it echoed and how many interrupts it took, and exits 0.
 * Any fault, unexpected vector or protocol error ends the guest with a nonzero status.
 */
#include "vsock.h"
#include "irq.h"

#define VEC_SERIAL 0x24
#define VEC_VSOCK 0x30
#define SERIAL_PIN 4
#define VSOCK_PIN 5
#define PORT 1234

#define RX_BUFS 4
#define TX_BUF 0x430000UL
#define EV_BUF 0x438000UL
#define BUF_ALLOC 16384

/* The host reads this to know the guest reached its idle loop: 1 while it waits there. */
#define IDLE ((volatile u64 *)0x300010)

static struct vq rxq, txq, evq;
static u64 cid;
static u32 fwd_cnt;

static volatile u64 vsock_irqs, serial_irqs, wakeups;
static volatile u32 isr_seen;
static volatile int thr_empty;

static void fail(const char *why)
{
    serial_puts("FAIL: ");
    serial_puts(why);
    serial_puts("\n");
    guest_exit(1);
}

static void irq_handler(u8 vector)
{
    if (vector == VEC_VSOCK) {
        u32 isr = mmio_read(DEV, R_INTERRUPT_STATUS);
        mmio_write(DEV, R_INTERRUPT_ACK, isr);
        isr_seen |= isr;
        vsock_irqs++;
    } else if (vector == VEC_SERIAL) {
        /* Reading IIR acknowledges the UART's interrupt; 0x2 = transmitter empty. */
        if ((inb(COM1 + 2) & 0x0f) == 0x02)
            thr_empty = 1;
        serial_irqs++;
    } else {
        serial_puts("unexpected vector ");
        serial_hex(vector);
        serial_puts("\n");
        guest_exit(2);
    }
}

/* Sleeps until `q` has a used buffer; returns its descriptor id. */
static u32 wait_used(struct vq *q)
{
    while (q->used->idx == q->last_used) {
        irq_wait();
        wakeups++;
    }
    u32 id = q->used->ring[q->last_used % VQ_SIZE].id;
    q->last_used++;
    return id;
}

static void send(u16 op, u32 dst_port, volatile const char *data, u32 len)
{
    u32 n = vsock_packet(TX_BUF, cid, PORT, dst_port, op, 0, BUF_ALLOC, fwd_cnt, data, len);
    vq_desc(&txq, 0, TX_BUF, n, 0, 0);
    vq_submit(DEV, &txq, 0);
    wait_used(&txq);
}

/* Writes `s` one byte per THR-empty interrupt. */
static void serial_irq_puts(const char *s)
{
    thr_empty = 0;
    outb(COM1 + 1, 0x02); /* IER: THR empty; the empty THR raises it at once */
    for (; *s; s++) {
        while (!thr_empty)
            irq_wait();
        thr_empty = 0;
        outb(COM1, (u8)*s);
    }
    while (!thr_empty)
        irq_wait();
    outb(COM1 + 1, 0);
}

static char *append(char *p, const char *s)
{
    while (*s)
        *p++ = *s++;
    return p;
}

static char *append_dec(char *p, u64 v)
{
    char tmp[21];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

void main(void)
{
    irq_init();
    if (vsock_start(&rxq, &txq, &evq, RX_BUFS, &cid))
        fail("vsock init");
    vq_desc(&evq, 0, EV_BUF, 8, VRING_DESC_F_WRITE, 0);
    vq_submit(DEV, &evq, 0);
    ioapic_route(VSOCK_PIN, VEC_VSOCK);
    ioapic_route(SERIAL_PIN, VEC_SERIAL);
    serial_puts("listening\n");

    u32 host_port = 0;
    u64 echoed = 0;
    for (;;) {
        while (rxq.used->idx == rxq.last_used && evq.used->idx == evq.last_used) {
            *IDLE = 1;
            irq_wait();
            *IDLE = 0;
            wakeups++;
        }
        if (evq.used->idx != evq.last_used) {
            evq.last_used++;
            if (*(volatile u32 *)EV_BUF == 0) /* VIRTIO_VSOCK_EVENT_TRANSPORT_RESET */
                serial_puts("transport reset\n");
            host_port = 0; /* the device dropped every connection */
            vq_submit(DEV, &evq, 0);
            continue;
        }
        u32 id = wait_used(&rxq);
        volatile struct hdr *h = (volatile struct hdr *)RX_BUF(id);
        volatile char *payload = (volatile char *)(RX_BUF(id) + sizeof(struct hdr));
        int closed = 0;
        switch (h->op) {
        case OP_REQUEST:
            if (h->dst_port != PORT || host_port)
                fail("unexpected connection request");
            host_port = h->src_port;
            fwd_cnt = 0; /* credit counters are per connection */
            send(OP_RESPONSE, host_port, 0, 0);
            break;
        case OP_RW:
            if (h->src_port != host_port)
                fail("data for an unknown connection");
            fwd_cnt += h->len;
            send(OP_RW, host_port, payload, h->len);
            echoed++;
            break;
        case OP_CREDIT_REQUEST:
            send(OP_CREDIT_UPDATE, h->src_port, 0, 0);
            break;
        case OP_RST:
        case OP_SHUTDOWN:
            closed = host_port != 0;
            break;
        default:
            break;
        }
        vq_submit(DEV, &rxq, (u16)id);
        if (closed)
            break;
    }

    char line[128];
    char *p = append(line, "echoed=");
    p = append_dec(p, echoed);
    p = append(p, " vsock_irqs=");
    p = append_dec(p, vsock_irqs);
    p = append(p, " wakeups=");
    p = append_dec(p, wakeups);
    p = append(p, " isr=");
    p = append_dec(p, isr_seen);
    p = append(p, "\n");
    *p = 0;
    u64 before = serial_irqs;
    serial_irq_puts(line);
    serial_puts("serial_irqs=");
    serial_dec(serial_irqs - before);
    serial_puts("\n");
    guest_exit(0);
}
