//! The virtio-mmio transport (virtio 1.2, 4.2.2, version 2 register layout): feature
//! negotiation, queue setup, notifications and interrupts. Queue notifications are handled
//! synchronously on the vCPU thread that wrote the notify register.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, VirtioDevice, INT_CONFIG, INT_USED_RING, VIRTIO_F_VERSION_1};
use crate::devices::bus::{BusAction, BusDevice};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5345_5353; // "SESS"
const CONFIG_SPACE: u64 = 0x100;

/// Register offsets of the virtio-mmio transport (virtio 1.2, 4.2.2).
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// The transport's registers and queues, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmioSnapshot {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

/// One virtqueue's position and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// A virtio device behind an MMIO window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: EventFd,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    queues: Vec<Queue>,
}

fn new_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        // Device-declared sizes are powers of two up to 32768, which Queue::new accepts.
        .map(|&max| Queue::new(max).expect("device queue sizes are valid"))
        .collect()
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd KVM injects the device's interrupt from.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: EventFd) -> Self {
        let queues = new_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            irq,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            queues,
        }
    }

    /// The registers and queues to save.
    pub fn snapshot(&self) -> MmioSnapshot {
        MmioSnapshot {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueSnapshot {
                        max_size: s.max_size,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                    }
                })
                .collect(),
        }
    }

    /// Loads saved registers; the saved queues must match the device's.
    pub fn restore(&mut self, s: &MmioSnapshot) -> Result<(), String> {
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "the snapshot has {} queues, the device {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::new();
        for q in &s.queues {
            let state = QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: false,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            queues.push(Queue::try_from(state).map_err(|e| format!("queue state: {e:?}"))?);
        }
        self.queues = queues;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        if self.interrupt_status != 0 {
            // The interrupt may have been raised just before the pause and not yet reached
            // the irqchip when it was saved (KVM injects irqfd signals for IOAPIC routes
            // later, from a worker). Raising it again is harmless: the driver reads the
            // status register before acting, and acks what it finds.
            let _ = self.irq.write(1);
        }
        Ok(())
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let configurable = self.status & status::FEATURES_OK != 0
            && self.status & (status::DRIVER_OK | status::FAILED | status::DEVICE_NEEDS_RESET) == 0;
        if !configurable {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(error = %e, "cannot inject virtio interrupt");
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.queues = new_queues(self.device.as_ref());
        self.device.reset();
    }

    fn needs_reset(&mut self, why: &dyn std::fmt::Display) {
        tracing::warn!(
            device = self.device.device_type(),
            reason = %why,
            "guest broke the virtqueue rules; device needs reset"
        );
        self.status |= status::DEVICE_NEEDS_RESET;
        self.raise(INT_CONFIG);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & status::FEATURES_OK != 0 {
            // Modern devices only, and nothing the device did not offer.
            let acked = self.acked_features;
            if acked & VIRTIO_F_VERSION_1 == 0 || acked & !self.offered_features() != 0 {
                value &= !status::FEATURES_OK;
            }
        }
        // The driver cannot clear DEVICE_NEEDS_RESET except by resetting.
        self.status = value | (self.status & status::DEVICE_NEEDS_RESET);
    }

    fn live(&self) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0
            && self.queues.iter().all(|q| q.ready())
    }

    /// Lets the device do host-side work (called by its event thread). Returns whether the
    /// guest got anything.
    pub fn backend_event(&mut self) -> bool {
        if !self.live() {
            return false;
        }
        match self.device.process_backend(&mut self.queues, &self.mem) {
            Ok(true) => {
                self.raise(INT_USED_RING);
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.needs_reset(&e);
                false
            }
        }
    }

    /// The device's host-side epoll set, if it has one.
    pub fn backend_epoll(&self) -> Option<std::sync::Arc<vmm_sys_util::epoll::Epoll>> {
        self.device.backend_epoll()
    }

    fn notify(&mut self, index: u32) {
        if index as usize >= self.queues.len() || !self.live() {
            return;
        }
        match self
            .device
            .process_queue(index as usize, &mut self.queues, &self.mem)
        {
            Ok(true) => self.raise(INT_USED_RING),
            Ok(false) => {}
            Err(e) => self.needs_reset(&e),
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            // Features are frozen once FEATURES_OK is set.
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.acked_features = low(self.acked_features),
                    1 => self.acked_features = high(self.acked_features),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // Queue::set_size ignores sizes that are not powers of two up to max.
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY => {
                let mem = self.mem.clone();
                let mut invalid = false;
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                    // is_valid checks the ring addresses against guest memory (and readiness).
                    if v == 1 && !q.is_valid(&mem) {
                        q.set_ready(false);
                        invalid = true;
                    }
                }
                if invalid {
                    self.needs_reset(&"queue enabled with invalid size or ring addresses");
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => {
                if let Some(q) = self.selected_queue() {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !4 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.set_status(v),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            // The spec allows only aligned 32-bit register accesses.
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if offset >= CONFIG_SPACE || data.len() != 4 || !offset.is_multiple_of(4) {
            return BusAction::Continue;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
        BusAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ChainError;

    struct Dummy;
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn process_queue(
            &mut self,
            _: usize,
            _: &mut [Queue],
            _: &GuestMemoryMmap,
        ) -> Result<bool, ChainError> {
            Err(ChainError::Unterminated)
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> MmioTransport {
        let mem = crate::vstate::memory::anonymous(4 << 20).unwrap();
        MmioTransport::new(
            Box::new(Dummy),
            mem,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
    }

    /// A transport whose driver accepted VIRTIO_F_VERSION_1 and then set up queue 0 (size 8,
    /// rings at 0x10000/0x11000/0x12000, descriptor table address high word `desc_high`) and
    /// asked for it to be made ready.
    fn transport_with_queue(desc_high: u32) -> MmioTransport {
        let mut t = transport();
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        wr(&mut t, reg::QUEUE_NUM, 8);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0x10000);
        wr(&mut t, reg::QUEUE_DESC_HIGH, desc_high);
        wr(&mut t, reg::QUEUE_AVAIL_LOW, 0x11000);
        wr(&mut t, reg::QUEUE_USED_LOW, 0x12000);
        wr(&mut t, reg::QUEUE_READY, 1);
        t
    }

    #[test]
    fn identifies_and_negotiates_features() {
        let mut t = transport();
        assert_eq!(rd(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // Without VERSION_1 acked, FEATURES_OK does not stick.
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 1 << 3);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert_eq!(rd(&mut t, CONFIG_SPACE + 5), 0x0505_0505);
    }

    #[test]
    fn broken_queue_sets_needs_reset_until_reset() {
        let mut t = transport_with_queue(0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        wr(&mut t, reg::STATUS, s);
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(rd(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
        let snap = t.snapshot();
        assert_eq!(snap.queues[0].size, 8);
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        // A restored transport with an interrupt pending raises it again (it may not have
        // reached the irqchip before the snapshot); one without does not.
        let mut restored = transport();
        restored.restore(&snap).unwrap();
        assert_eq!(restored.snapshot(), snap);
        assert_eq!(restored.irq.read().unwrap(), 1);
        let mut quiet = transport();
        let mut idle = snap.clone();
        idle.interrupt_status = 0;
        quiet.restore(&idle).unwrap();
        assert!(
            quiet.irq.read().is_err(),
            "no interrupt without a pending status"
        );
        t.restore(&snap).unwrap();
        assert_eq!(t.snapshot(), snap);
    }

    #[test]
    fn queue_with_rings_outside_memory_is_refused() {
        let mut t = transport_with_queue(0x10);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }
}
