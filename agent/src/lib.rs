//! sessiond-agent: runs inside every sandbox and serves Python, shell and
//! file operations to the daemon over HTTP/1.1.
pub mod args;
pub mod files;
pub mod init;
pub mod output;
pub mod procs;
pub mod proto;
pub mod python;
pub mod server;
pub mod shell;
