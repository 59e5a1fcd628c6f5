//! Running one microVM from a JSON config file with no API server (Firecracker's no-api
//! mode): what a `sessiond vmm --config <file>` entry point calls; or from a snapshot
//! ([`RestoreConfig`]), what the daemon's jailed VMM calls to restore one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::builder::BuildError;
use crate::config::{ConfigError, VmConfig};
use crate::microvm::{MicroVm, MicroVmError};
use crate::persist::{RestoreSpec, SnapshotError};
use crate::vstate::vcpu::GuestStop;

/// Why a standalone run ended without the guest stopping by itself.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("reading the VM config {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid VM config {path:?}")]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("building the VM")]
    Build(#[from] BuildError),
    #[error("opening the serial log {path:?}")]
    Serial {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("restoring the VM")]
    Restore(#[from] SnapshotError),
    #[error("running the VM")]
    Run(#[from] MicroVmError),
}

/// Boots the VM described by the JSON file at `path` and runs it until the guest stops.
pub fn run(path: &Path) -> Result<GuestStop, StandaloneError> {
    run_notify(path, || {})
}

/// [`run`], calling `ready` once the VM is built (files opened, sockets bound) and just
/// before its vCPUs start: a supervisor learns that setup succeeded.
pub fn run_notify(path: &Path, ready: impl FnOnce()) -> Result<GuestStop, StandaloneError> {
    let text = std::fs::read_to_string(path).map_err(|source| StandaloneError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let config_err = |source| StandaloneError::Config {
        path: path.to_path_buf(),
        source,
    };
    let spec = VmConfig::from_json(&text)
        .map_err(config_err)?
        .validate()
        .map_err(config_err)?;
    run_until_stopped(crate::builder::build(spec)?, ready)
}

/// A snapshot to restore and run (JSON, unknown fields refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    pub state_path: PathBuf,
    pub mem_path: PathBuf,
    /// Where the serial console's output goes (created or appended). Absent: discarded.
    #[serde(default)]
    pub serial_path: Option<PathBuf>,
    /// The clone's vsock socket (each clone needs its own); absent: the snapshot's.
    #[serde(default)]
    pub vsock_uds_path: Option<PathBuf>,
}

/// Restores the snapshot, calls `ready` once it is rebuilt (paused), then runs it until the
/// guest stops. Seccomp is on, as for [`run`].
pub fn restore_notify(
    cfg: &RestoreConfig,
    ready: impl FnOnce(),
) -> Result<GuestStop, StandaloneError> {
    let serial = crate::devices::legacy::serial::open_output(cfg.serial_path.as_deref()).map_err(
        |source| StandaloneError::Serial {
            path: cfg.serial_path.clone().unwrap_or_default(),
            source,
        },
    )?;
    let vm = crate::persist::restore(RestoreSpec {
        state_path: &cfg.state_path,
        mem_path: &cfg.mem_path,
        serial,
        vsock_uds_path: cfg.vsock_uds_path.as_deref(),
        seccomp: true,
    })?;
    run_until_stopped(vm, ready)
}

fn run_until_stopped(mut vm: MicroVm, ready: impl FnOnce()) -> Result<GuestStop, StandaloneError> {
    ready();
    vm.resume()?;
    loop {
        match vm.wait(Duration::from_secs(3600)) {
            Err(MicroVmError::WaitTimeout(_)) => continue,
            other => return Ok(other?),
        }
    }
}

/// The process exit code for a guest stop: the guest's status (low 8 bits) for the exit
/// port, 128 for a shutdown or triple fault.
pub fn exit_code(stop: GuestStop) -> u8 {
    match stop {
        GuestStop::Exit(status) => (status & 0xff) as u8,
        GuestStop::Shutdown => 128,
    }
}
