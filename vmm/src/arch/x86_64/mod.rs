//! x86_64 machine: guest physical layout, boot-time tables and vCPU register setup.

pub mod boot;
pub mod bzimage;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
