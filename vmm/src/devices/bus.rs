//! Address-range buses (port I/O and MMIO) that route vCPU exits to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a device asks of the vCPU loop after a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusAction {
    /// Keep running.
    Continue,
    /// The guest asked to stop with this exit status.
    GuestExit(u32),
}

/// A device reachable through a [`Bus`]; `offset` is relative to the device's base.
pub trait BusDevice: Send {
    /// Fills `data` for a guest read.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write.
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction;
}

/// Why a device could not be placed on a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap { base: u64, len: u64 },
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Non-overlapping address ranges, each owned by one device.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// Places `device` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        let before = self.ranges.range(..end).next_back();
        if let Some((b, (l, _))) = before {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + size as u64 <= *len).then_some((offset, dev))
    }

    /// Routes a read; returns false when no device claims the address (the caller decides
    /// what an unclaimed read returns).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; `None` when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<BusAction> {
        let (offset, dev) = self.find(addr, data.len())?;
        let action = lock(dev).write(offset, data);
        Some(action)
    }
}

/// Locks a device, recovering from a poisoned lock: a device panicking on one access must not
/// take every later access down with it.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
            self.0.push((offset, data.to_vec()));
            BusAction::Continue
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlap() {
        let mut bus = Bus::default();
        let dev: SharedDevice = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert!(bus.insert(0x3f0, 9, dev.clone()).is_err());
        assert!(bus.insert(0x3ff, 1, dev.clone()).is_err());
        assert!(bus.insert(0x3f8, 0, dev.clone()).is_err());
        bus.insert(0x400, 1, dev).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fb, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x3f7, &mut b));
        // A 2-byte access at the last byte straddles the end: unclaimed.
        assert!(!bus.read(0x3ff, &mut [0u8; 2]));
        assert_eq!(bus.write(0x3f9, &[1]), Some(BusAction::Continue));
        assert_eq!(bus.write(0x500, &[1]), None);
    }
}
