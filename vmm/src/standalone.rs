//! Running one microVM from a JSON config file with no API server (Firecracker's no-api
//! mode): what a `sessiond vmm --config <file>` entry point calls.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::builder::BuildError;
use crate::config::{ConfigError, VmConfig};
use crate::microvm::MicroVmError;
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
    #[error("running the VM")]
    Run(#[from] MicroVmError),
}

/// Boots the VM described by the JSON file at `path` and runs it until the guest stops.
pub fn run(path: &Path) -> Result<GuestStop, StandaloneError> {
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
    let mut vm = crate::builder::build(spec)?;
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
