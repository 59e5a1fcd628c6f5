//! Per-sandbox uid slots: no two live sandboxes share a uid, so they cannot
//! signal, ptrace or read each other's files even if every other barrier
//! failed. Slots are handed out round-robin so a freed uid is reused last.

use std::collections::BTreeSet;

#[derive(Debug)]
pub struct UidSlots {
    capacity: u32,
    next: u32,
    used: BTreeSet<u32>,
}

impl UidSlots {
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            next: 0,
            used: BTreeSet::new(),
        }
    }

    /// A free slot, or `None` when all are taken.
    pub fn alloc(&mut self) -> Option<u32> {
        if self.used.len() as u64 >= u64::from(self.capacity) {
            return None;
        }
        let mut slot = self.next;
        while self.used.contains(&slot) {
            slot = (slot + 1) % self.capacity;
        }
        self.used.insert(slot);
        self.next = (slot + 1) % self.capacity;
        Some(slot)
    }

    pub fn free(&mut self, slot: u32) {
        self.used.remove(&slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_unique_until_freed_and_reused_last() {
        let mut s = UidSlots::new(3);
        assert_eq!(s.alloc(), Some(0));
        assert_eq!(s.alloc(), Some(1));
        assert_eq!(s.alloc(), Some(2));
        assert_eq!(s.alloc(), None);
        s.free(1);
        assert_eq!(s.alloc(), Some(1));
        s.free(0);
        s.free(2);
        assert_eq!(s.alloc(), Some(2));
        assert_eq!(s.alloc(), Some(0));
    }
}
