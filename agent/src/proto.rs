//! Wire types between the daemon and the agent, shared by both sides so they
//! cannot drift apart. The transport is HTTP/1.1 over a stream socket (a Unix
//! socket in the jail backend, vsock in the microVM backend).
//!
//! Routes served by the agent (all bodies JSON unless noted):
//!
//! | method | path                  | request            | response                      |
//! |--------|-----------------------|--------------------|-------------------------------|
//! | GET    | `/health`             | -                  | [`Health`]                    |
//! | POST   | `/init`               | [`InitRequest`]    | [`Health`]                    |
//! | POST   | `/execute/python`     | [`PythonRequest`]  | [`PythonResponse`]            |
//! | POST   | `/execute/shell`      | [`ShellRequest`]   | [`ShellResponse`]             |
//! | GET    | `/files`              | -                  | `Vec<`[`FileEntry`]`>`        |
//! | GET    | `/files/{path}`       | -                  | raw bytes (404 if missing)    |
//! | HEAD   | `/files/{path}`       | -                  | headers only                  |
//! | GET    | `/stat/{path}`        | -                  | [`FileEntry`]                 |
//! | PUT    | `/files/{path}`       | raw bytes          | [`FileEntry`]                 |
//! | DELETE | `/files/{path}`       | -                  | 204                           |
//!
//! `{path}` is relative to the data directory (`/mnt/data`), percent-encoded
//! per segment; a leading `/mnt/data/` is accepted and stripped. Errors are a
//! non-2xx status with an [`AgentError`] body.

use serde::{Deserialize, Serialize};

/// The data directory every session reads and writes.
pub const DATA_DIR: &str = "/mnt/data";

/// Default per-execution timeout, as documented by Azure.
pub const DEFAULT_TIMEOUT_MS: u64 = 220_000;

/// Default cap on each captured output stream, in bytes.
pub const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;

/// Largest upload the agent accepts (the daemon answers 413 before this).
pub const MAX_UPLOAD_BYTES: u64 = 128 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    /// Always `"ok"` when the agent answers.
    pub status: String,
    /// Whether the persistent Python interpreter is started and idle-ready.
    pub python_ready: bool,
    /// Agent version, for the daemon's logs.
    pub version: String,
}

/// Sent once after a sandbox is handed to a session (and after every
/// snapshot restore): clocks, entropy and identity must diverge per clone.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitRequest {
    /// Wall clock of the host, milliseconds since the Unix epoch.
    #[serde(default)]
    pub unix_time_ms: Option<u64>,
    /// Fresh entropy to mix into the guest's RNG (hex).
    #[serde(default)]
    pub entropy_hex: Option<String>,
    /// Extra environment variables for later executions.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Session identifier, for the agent's logs only.
    #[serde(default)]
    pub session_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PythonRequest {
    pub code: String,
    /// Per-execution timeout; `None` means [`DEFAULT_TIMEOUT_MS`].
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Cap per output stream in bytes; `None` means [`DEFAULT_MAX_OUTPUT`].
    #[serde(default)]
    pub max_output: Option<usize>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ExecStatus {
    /// The code ran to the end.
    Success,
    /// The code raised, was killed, or the command could not start.
    Failure,
    /// The timeout elapsed; the code was interrupted.
    Timeout,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PythonResponse {
    pub status: ExecStatus,
    pub stdout: String,
    pub stderr: String,
    /// Value of the trailing expression: a JSON number/bool, a string (str
    /// values unquoted, other objects as repr), an image object
    /// `{"type":"image","format":"png","base64_data":"..."}`, or `""`.
    pub result: serde_json::Value,
    /// Further rich outputs (every figure after the first, ...).
    #[serde(default)]
    pub display: Vec<serde_json::Value>,
    pub duration_ms: u64,
    /// True when the interpreter had to be restarted (state was lost),
    /// e.g. after an out-of-memory kill or an uninterruptible timeout.
    #[serde(default)]
    pub restarted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellRequest {
    /// Run with `/bin/sh -c`.
    #[serde(default)]
    pub command: Option<String>,
    /// Run directly (argv[0] looked up in PATH); exclusive with `command`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_output: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShellResponse {
    pub status: ExecStatus,
    /// Exit code; `None` when killed by a signal or on timeout.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the data directory, `/`-separated.
    pub name: String,
    pub size: u64,
    /// RFC 3339, UTC, e.g. `2024-05-02T07:21:07.992261Z`.
    pub last_modified: String,
}

/// Error body of every non-2xx agent response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentError {
    /// Stable machine-readable code: `InvalidPath`, `FileNotFound`,
    /// `PayloadTooLarge`, `BadRequest`, `NoSpace`, `Internal`.
    pub code: String,
    pub message: String,
}
