/*
 * A minimal virtio-mmio (version 2) driver for the test guests: one split virtqueue, polled
 * (no interrupts: the guests run without an IDT).
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "guest.h"

#define VIRTIO_MMIO_BASE 0xd0000000UL
#define VQ_SIZE 8

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_AVAIL_LOW 0x090
#define R_QUEUE_AVAIL_HIGH 0x094
#define R_QUEUE_USED_LOW 0x0a0
#define R_QUEUE_USED_HIGH 0x0a4
#define R_CONFIG 0x100

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct vring_avail {
    u16 flags;
    u16 idx;
    u16 ring[VQ_SIZE];
};

struct vring_used_elem {
    u32 id;
    u32 len;
};

struct vring_used {
    u16 flags;
    u16 idx;
    struct vring_used_elem ring[VQ_SIZE];
};

static inline u32 mmio_read(u64 dev, u32 reg) { return *(volatile u32 *)(dev + reg); }
static inline void mmio_write(u64 dev, u32 reg, u32 v) { *(volatile u32 *)(dev + reg) = v; }

/* One split virtqueue; its three parts live in three consecutive pages from `base`. */
struct vq {
    volatile struct vring_desc *desc;
    volatile struct vring_avail *avail;
    volatile struct vring_used *used;
    u16 last_used;
    u16 index;
};

/* Queue 0 of single-queue devices (block), rings at 0x400000. */
static struct vq vq0;

/* Resets the device and negotiates VERSION_1 only. Returns 0 on success. */
static int virtio_begin(u64 dev, u32 want_id)
{
    if (mmio_read(dev, R_MAGIC) != 0x74726976 || mmio_read(dev, R_VERSION) != 2 ||
        mmio_read(dev, R_DEVICE_ID) != want_id)
        return 1;
    mmio_write(dev, R_STATUS, 0);
    mmio_write(dev, R_STATUS, S_ACK | S_DRIVER);
    mmio_write(dev, R_DRIVER_FEATURES_SEL, 1);
    mmio_write(dev, R_DRIVER_FEATURES, 1); /* VIRTIO_F_VERSION_1 */
    mmio_write(dev, R_DRIVER_FEATURES_SEL, 0);
    mmio_write(dev, R_DRIVER_FEATURES, 0);
    mmio_write(dev, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_read(dev, R_STATUS) & S_FEATURES_OK))
        return 2;
    return 0;
}

static int vq_setup(u64 dev, struct vq *q, u16 index, u64 base)
{
    q->desc = (volatile struct vring_desc *)base;
    q->avail = (volatile struct vring_avail *)(base + 0x1000);
    q->used = (volatile struct vring_used *)(base + 0x2000);
    q->last_used = 0;
    q->index = index;
    q->avail->idx = 0;
    q->avail->flags = 0;
    q->used->idx = 0;
    mmio_write(dev, R_QUEUE_SEL, index);
    if (mmio_read(dev, R_QUEUE_NUM_MAX) < VQ_SIZE)
        return 3;
    mmio_write(dev, R_QUEUE_NUM, VQ_SIZE);
    mmio_write(dev, R_QUEUE_DESC_LOW, (u32)base);
    mmio_write(dev, R_QUEUE_DESC_HIGH, 0);
    mmio_write(dev, R_QUEUE_AVAIL_LOW, (u32)(base + 0x1000));
    mmio_write(dev, R_QUEUE_AVAIL_HIGH, 0);
    mmio_write(dev, R_QUEUE_USED_LOW, (u32)(base + 0x2000));
    mmio_write(dev, R_QUEUE_USED_HIGH, 0);
    mmio_write(dev, R_QUEUE_READY, 1);
    return 0;
}

static void virtio_ready(u64 dev)
{
    mmio_write(dev, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* Single-queue setup: queue 0 at 0x400000. */
static int virtio_init(u64 dev, u32 want_id)
{
    int err = virtio_begin(dev, want_id);
    if (err)
        return err;
    err = vq_setup(dev, &vq0, 0, 0x400000);
    if (err)
        return err;
    virtio_ready(dev);
    return 0;
}

static void vq_desc(struct vq *q, int i, u64 addr, u32 len, u16 flags, u16 next)
{
    q->desc[i].addr = addr;
    q->desc[i].len = len;
    q->desc[i].flags = flags;
    q->desc[i].next = next;
}

/* Offers the chain starting at descriptor `head` (without notifying). */
static void vq_offer(struct vq *q, u16 head)
{
    q->avail->ring[q->avail->idx % VQ_SIZE] = head;
    __asm__ volatile("" ::: "memory");
    q->avail->idx = q->avail->idx + 1;
    __asm__ volatile("" ::: "memory");
}

/* Offers the chain starting at descriptor `head` and notifies the device. */
static void vq_submit(u64 dev, struct vq *q, u16 head)
{
    vq_offer(q, head);
    mmio_write(dev, R_QUEUE_NOTIFY, q->index);
}

/*
 * Waits for the device to use a buffer, up to `spins` polls. Returns the used element's
 * descriptor id + 1, or 0 when the device asked for a reset or nothing came.
 */
static u32 vq_wait_for(u64 dev, struct vq *q, u64 spins)
{
    for (u64 i = 0; i < spins; i++) {
        if (q->used->idx != q->last_used) {
            u32 id = q->used->ring[q->last_used % VQ_SIZE].id;
            q->last_used++;
            return id + 1;
        }
        if ((i & 0xff) == 0 && (mmio_read(dev, R_STATUS) & S_NEEDS_RESET))
            return 0;
    }
    return 0;
}

/* Notification is handled synchronously by this VMM: the answer is there at once. */
static int vq_wait(u64 dev, struct vq *q) { return vq_wait_for(dev, q, 1000) != 0; }

#endif
