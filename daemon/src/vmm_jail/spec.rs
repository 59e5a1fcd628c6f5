//! What the daemon tells `sessiond vmm-jail-init` (JSON on its stdin). The status pipe is
//! the jail backend's ([`STATUS_FD`]): an error message on failure, closed without a word
//! once the VM is built and about to run.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::jail::spec::STATUS_FD;

/// Where the VM's configuration lies inside the chroot.
pub const CONFIG_PATH: &str = "/vm.json";
/// The host directory bound here (read-write) holds what the host exchanges with the VM:
/// the vsock socket and the serial log.
pub const IO_DIR: &str = "/io";
/// Guest images (kernel, disks) are bound under here, read-only unless a disk is writable.
pub const FILES_DIR: &str = "/vm";

/// A host file bound into the chroot at `FILES_DIR/<name>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundFile {
    pub host_path: PathBuf,
    pub name: String,
    pub writable: bool,
}

/// Everything vmm-jail-init needs to build one VM's jail.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmInitSpec {
    pub vm_id: String,
    pub uid: u32,
    pub gid: u32,
    /// `cgroup.procs` files of the VM's leaves, joined before unsharing.
    pub cgroup_procs: Vec<PathBuf>,
    /// Empty host directory on which the chroot's tmpfs is mounted inside the jail's
    /// private mount namespace; the host never sees that mount.
    pub staging_dir: PathBuf,
    /// Host directory bound at [`IO_DIR`], owned by `uid`.
    pub io_dir: PathBuf,
    pub files: Vec<BoundFile>,
    /// Tap devices to create in the VM's network namespace, owned by `uid` (they are
    /// the config's `net_devices`); `/dev/net/tun` is in the chroot only when there are.
    pub taps: Vec<String>,
    /// The VM as the VMM inside sees it (chroot paths); written to [`CONFIG_PATH`].
    pub vm: JailedVm,
}

/// How the jailed VMM gets its VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JailedVm {
    /// Booted from this config (what `sessiond vmm --config` takes).
    Boot(vmm::VmConfig),
    /// Restored from a snapshot and resumed.
    Restore(vmm::standalone::RestoreConfig),
}
