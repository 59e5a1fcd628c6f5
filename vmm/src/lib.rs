//! Minimal KVM virtual machine monitor for sessiond microVMs.
//!
//! Layout follows Firecracker: `arch` (x86_64 layout, boot tables, registers), `vstate` (VM,
//! vCPUs, memory: the KVM ioctls), `devices` (buses and emulated devices), `builder` (config
//! to running VM), `persist` (snapshots), `capability` (what this host's KVM can do).
//! See `README.md` for what exists and what does not yet.

pub mod arch;
pub mod builder;
pub mod capability;
pub mod config;
pub mod devices;
pub mod microvm;
pub mod persist;
pub mod seccomp;
pub mod standalone;
pub mod test_guests;
pub mod vstate;

pub use builder::{build, BuildError};
pub use capability::{detect, KvmCapability};
pub use config::{ConfigError, MachineSpec, VmConfig};
pub use microvm::{MicroVm, MicroVmError};
pub use persist::{restore, restore_into, RestoreSpec, SnapshotError, VmShell};
pub use vstate::vcpu::GuestStop;
