//! KVM state: guest memory, the VM (irqchip, PIT, memory slots) and vCPUs. Nearly all of the
//! crate's unsafe code lives here, next to the ioctls that need it.

pub mod memory;
pub mod vcpu;
pub mod vm;
