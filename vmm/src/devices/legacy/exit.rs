//! A one-port device that ends the VM with the status the guest writes, like QEMU's
//! `isa-debug-exit`: the guest-initiated shutdown path.

use super::super::bus::{BusAction, BusDevice};

/// The exit port.
pub const EXIT_PORT: u16 = 0x501;

/// Writes of 1, 2 or 4 bytes end the VM with that (little-endian) value as its exit status.
#[derive(Debug, Default)]
pub struct ExitDevice;

impl BusDevice for ExitDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> BusAction {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        BusAction::GuestExit(u32::from_le_bytes(bytes))
    }
}
