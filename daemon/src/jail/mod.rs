//! The jail backend: each sandbox is a process tree in fresh namespaces.
pub mod init;
