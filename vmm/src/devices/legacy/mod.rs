//! Legacy port-I/O devices: the 16550 serial console and the guest exit port.

pub mod exit;
pub mod serial;

pub use exit::ExitDevice;
pub use serial::SerialDevice;
