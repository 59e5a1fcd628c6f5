//! virtio devices over the MMIO transport (virtio 1.x, split virtqueues).

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod vsock;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

pub use chain::ChainError;

/// Feature bit: the device conforms to virtio 1.x (the only mode supported).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// Copies the window `offset..offset + data.len()` of a device's configuration space `config`
/// into `data`; bytes past the end of `config` (or an unrepresentable offset) read as zero, so a
/// driver probing beyond the fields a device provides sees zeros rather than an error.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}

/// An epoll set watching `fd` for input: what a device's event thread waits on for its host
/// side (a tap, a listening socket).
pub fn epoll_on_input(fd: std::os::fd::RawFd) -> std::io::Result<vmm_sys_util::epoll::Epoll> {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let epoll = Epoll::new()?;
    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))?;
    Ok(epoll)
}

/// A device behind a virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// virtio device id (2 = block, 19 = vsock, 1 = net).
    fn device_type(&self) -> u32;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Maximum size of each queue; the number of queues is the length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Handles a driver notification for queue `index` (all queues are passed: a device may
    /// answer on another queue). Returns whether any buffer was used (so the driver should be
    /// interrupted). An error means the driver broke the virtqueue rules; the transport then
    /// marks the device as needing a reset.
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, ChainError>;
    /// Handles work from the device's host side (sockets), called from the device's event
    /// thread when [`VirtioDevice::backend_epoll`] reports readiness.
    fn process_backend(
        &mut self,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<bool, ChainError> {
        Ok(false)
    }
    /// An epoll set whose readiness means [`VirtioDevice::process_backend`] has work; devices
    /// without a host side return None and get no event thread.
    fn backend_epoll(&self) -> Option<std::sync::Arc<vmm_sys_util::epoll::Epoll>> {
        None
    }
    /// Returns the device to its initial state after a driver reset.
    fn reset(&mut self) {}
}
