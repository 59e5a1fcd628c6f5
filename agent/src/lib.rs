//! sessiond-agent: runs inside every sandbox and serves Python, shell and
//! file operations to the daemon over HTTP/1.1.
pub mod proto;
