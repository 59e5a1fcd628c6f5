//! What the daemon tells `sessiond jail-init` (JSON on its stdin), and the
//! file descriptors the two agree on.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The listening socket of the agent, in jail-init and in the agent.
pub const LISTEN_FD: i32 = 3;
/// Write end of the setup-status pipe: jail-init writes an error message on
/// failure; the pipe closes (close-on-exec) when the agent starts.
pub const STATUS_FD: i32 = 4;

/// Everything jail-init needs to build one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    pub sandbox_id: String,
    /// Read-only lower layer of the overlay.
    pub rootfs: PathBuf,
    /// Host path of the agent, bound read-only into the sandbox.
    pub agent_binary: PathBuf,
    /// Empty host directory on which the sandbox's tmpfs is mounted inside
    /// jail-init's private mount namespace; the host never sees that mount.
    pub staging_dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// `cgroup.procs` files of the sandbox's leaves, joined before unsharing.
    pub cgroup_procs: Vec<PathBuf>,
    /// Size of the tmpfs holding the overlay's upper layer and /mnt/data.
    pub disk_bytes: u64,
    /// Complete environment of the agent, in order, keys unique.
    pub env: Vec<(String, String)>,
}
