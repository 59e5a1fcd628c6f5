//! Snapshots: guest memory to one file (sparse), everything else to a versioned, checksummed
//! state file; restore maps the memory file copy-on-write so many clones share its pages and
//! restore time does not depend on the guest's size.
//!
//! State file layout (little-endian):
//! `magic "SESSDVMS" | version u32 | payload length u64 | crc32 of payload u32 | payload (JSON)`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::builder::{self, BuildError};
use crate::devices::legacy::serial::{SerialOut, SerialSnapshot};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::MmioSnapshot;
use crate::devices::virtio::net::{parse_mac, Net, NetError};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::VirtioDevice;
use crate::microvm::{MicroVm, MicroVmError, VirtioDeviceConfig};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuState};
use crate::vstate::vm::{Vm, VmError, VmState};

/// First bytes of every state file.
pub const STATE_MAGIC: [u8; 8] = *b"SESSDVMS";
/// The state format this build writes and the only one it reads (2: the memory file ends
/// with a trailer naming its snapshot).
pub const STATE_VERSION: u32 = 2;
/// The memory file is guest RAM followed by this trailer page: `MEM_MAGIC`, then the
/// snapshot id (16 bytes) that the state file records too, so a state file is never paired
/// with another snapshot's memory (a copy mixed up, or a crash between the two renames).
pub const MEM_TRAILER_LEN: u64 = 4096;
/// First bytes of the memory file's trailer.
pub const MEM_MAGIC: [u8; 8] = *b"SESSDVMM";
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// Why a snapshot could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM must be paused to snapshot it")]
    NotPaused,
    #[error("saving vCPU state")]
    Vcpus(#[source] MicroVmError),
    #[error("reading VM state")]
    Vm(#[from] VmError),
    #[error("vCPU state")]
    Vcpu(#[from] VcpuError),
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("{what} {path:?}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is not a sessiond VM state file (bad magic)")]
    BadMagic(PathBuf),
    #[error(
        "{path:?} has state format version {found}; this build reads only version {STATE_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path:?} is truncated: header says {expected} payload bytes, {actual} present")]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path:?} is corrupted: checksum {actual:#010x}, header says {expected:#010x}")]
    Checksum {
        path: PathBuf,
        expected: u32,
        actual: u32,
    },
    #[error("decoding the state in {path:?}")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{0:?} is not the memory of this snapshot (its trailer names another snapshot, or it \
         has none): the state and memory files must come from the same snapshot() call"
    )]
    MemoryMismatch(PathBuf),
    #[error("drawing a snapshot id from the kernel's random source")]
    Random(#[source] std::io::Error),
    #[error("this VM shell was made from another snapshot than {0:?}")]
    ShellFile(PathBuf),
    #[error("the state has {0} vCPUs; at least one is needed")]
    NoVcpus(usize),
    #[error("reopening a disk")]
    Block(#[from] BlockError),
    #[error("recreating the vsock device")]
    Vsock(#[from] VsockError),
    #[error("reattaching a tap")]
    Net(#[from] NetError),
    #[error("rebuilding the VM")]
    Build(#[from] BuildError),
}

/// Everything but guest memory.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MicroVmState {
    /// Random id shared with the memory file's trailer.
    pub snapshot_id: [u8; 16],
    /// Guest RAM size; the memory file is this long plus its trailer.
    pub mem_size: u64,
    /// MSRs saved per vCPU (kept so a clone can be snapshotted again).
    pub msr_list: Vec<u32>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub virtio: Vec<VirtioSnapshot>,
}

/// A virtio device: how to rebuild it and its transport's registers and queues.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioSnapshot {
    pub config: VirtioDeviceConfig,
    pub transport: MmioSnapshot,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Encodes `state` with its header.
pub fn encode_state(state: &MicroVmState) -> Vec<u8> {
    let payload = serde_json::to_vec(state).expect("VM state always serializes");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Checks the header, length and checksum of a state file's bytes, then decodes it.
pub fn decode_state(bytes: &[u8], path: &Path) -> Result<MicroVmState, SnapshotError> {
    if bytes.len() < 8 || bytes[..8] != STATE_MAGIC {
        return Err(SnapshotError::BadMagic(path.to_path_buf()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            expected: HEADER_LEN as u64,
            actual: bytes.len() as u64,
        });
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&bytes[r]);
        u64::from_le_bytes(b)
    };
    let version = word(8..12) as u32;
    if version != STATE_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let len = word(12..20);
    let expected_crc = word(20..24) as u32;
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            expected: len,
            actual: payload.len() as u64,
        });
    }
    let actual = crc32fast::hash(payload);
    if actual != expected_crc {
        return Err(SnapshotError::Checksum {
            path: path.to_path_buf(),
            expected: expected_crc,
            actual,
        });
    }
    serde_json::from_slice(payload).map_err(|source| SnapshotError::Decode {
        path: path.to_path_buf(),
        source,
    })
}

impl MicroVm {
    /// Writes guest memory to `mem_path` and the rest of the VM to `state_path`. The VM must
    /// be paused; it stays paused.
    pub fn snapshot(&mut self, mem_path: &Path, state_path: &Path) -> Result<(), SnapshotError> {
        if !self.is_paused() {
            return Err(SnapshotError::NotPaused);
        }
        let vcpus = self.save_vcpus().map_err(SnapshotError::Vcpus)?;
        let snapshot_id = random_id()?;
        let mem_size = memory::size(self.memory());
        let state = MicroVmState {
            snapshot_id,
            mem_size,
            msr_list: self.msr_list.to_vec(),
            vm: self.vm.save_state()?,
            vcpus,
            serial: self
                .devices
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .snapshot(),
            virtio: self
                .devices
                .virtio
                .iter()
                .map(|slot| VirtioSnapshot {
                    config: slot.config.clone(),
                    transport: slot
                        .transport
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .snapshot(),
                })
                .collect(),
        };
        // Both files are written under temporary names and renamed into place. Never
        // rewritten in place: clones (this VM among them, if it is one) map the memory file
        // MAP_PRIVATE, and truncating it under them would drop their pages (SIGBUS).
        let mem_tmp = temp_name(mem_path, &snapshot_id);
        let mut mem_file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&mem_tmp)
            .map_err(io("creating", &mem_tmp))?;
        let written = memory::dump(self.memory(), &mut mem_file)
            .map_err(SnapshotError::from)
            .and_then(|()| {
                let mut trailer = [0u8; 24];
                trailer[..8].copy_from_slice(&MEM_MAGIC);
                trailer[8..].copy_from_slice(&snapshot_id);
                mem_file
                    .set_len(mem_size + MEM_TRAILER_LEN)
                    .and_then(|()| mem_file.write_all_at(&trailer, mem_size))
                    .and_then(|()| mem_file.sync_all())
                    .map_err(io("writing the trailer of", &mem_tmp))
            })
            .and_then(|()| {
                let state_tmp = temp_name(state_path, &snapshot_id);
                let mut f = File::create(&state_tmp).map_err(io("creating", &state_tmp))?;
                f.write_all(&encode_state(&state))
                    .and_then(|()| f.sync_all())
                    .map_err(io("writing", &state_tmp))?;
                std::fs::rename(&mem_tmp, mem_path).map_err(io("renaming into", mem_path))?;
                std::fs::rename(&state_tmp, state_path).map_err(io("renaming into", state_path))
            });
        if written.is_err() {
            let _ = std::fs::remove_file(&mem_tmp);
            let _ = std::fs::remove_file(temp_name(state_path, &snapshot_id));
        }
        written
    }
}

/// 16 bytes from the kernel's random source.
fn random_id() -> Result<[u8; 16], SnapshotError> {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most `id.len()` bytes into the buffer it is given, which
    // is ours and that long.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        return Err(SnapshotError::Random(std::io::Error::last_os_error()));
    }
    Ok(id)
}

/// `<path>.<id>.tmp`, beside the file it will replace (a rename stays on one filesystem);
/// unique per snapshot, so neither a leftover from a crash nor a concurrent snapshot to the
/// same path gets in the way.
fn temp_name(path: &Path, snapshot_id: &[u8; 16]) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    for b in &snapshot_id[..8] {
        name.push(format!("{b:02x}"));
    }
    name.push(".tmp");
    PathBuf::from(name)
}

/// What to restore and where the clone's console goes.
pub struct RestoreSpec<'a> {
    pub state_path: &'a Path,
    pub mem_path: &'a Path,
    pub serial: SerialOut,
    /// Host socket for the clone's vsock device (each clone needs its own); None reuses the
    /// snapshot's path.
    pub vsock_uds_path: Option<&'a Path>,
    /// Confine the VMM's threads with seccomp (see [`crate::seccomp`]; kills the process on
    /// a violation, so only for a process running one VM).
    pub seccomp: bool,
}

/// A restore prepared ahead from one snapshot: the state file read and checked, the memory
/// file mapped MAP_PRIVATE as guest RAM and registered as KVM memory slots, irqchip and PIT
/// created. That is all of a restore that does not depend on the clone's own parameters
/// (console, vsock socket), including the only part whose cost grows with guest size (KVM
/// sizes per-slot metadata such as shadow-MMU reverse maps when a slot is registered). A
/// pool keeps shells ready so a clone costs the same for any guest size.
pub struct VmShell {
    vm: Vm,
    state: MicroVmState,
    /// (device, inode) of the state and memory files, so a shell is only used with its own
    /// snapshot.
    files: [(u64, u64); 2],
}

impl VmShell {
    /// Prepares a restore of the snapshot in `state_path` and `mem_path`.
    pub fn new(state_path: &Path, mem_path: &Path) -> Result<VmShell, SnapshotError> {
        // The state file first: a bad one is refused before any KVM work.
        let mut state_file = File::open(state_path).map_err(io("opening", state_path))?;
        let mut bytes = Vec::new();
        state_file
            .read_to_end(&mut bytes)
            .map_err(io("reading", state_path))?;
        let state = decode_state(&bytes, state_path)?;
        if state.vcpus.is_empty() {
            return Err(SnapshotError::NoVcpus(0));
        }
        let mem_file = File::open(mem_path).map_err(io("opening", mem_path))?;
        check_trailer(&mem_file, mem_path, &state)?;
        let mem = memory::from_file(&mem_file, state.mem_size)?;
        // Identities of the files actually read and mapped, not of whatever the paths
        // name later.
        let files = [
            file_id(&state_file, state_path)?,
            file_id(&mem_file, mem_path)?,
        ];
        Ok(VmShell {
            vm: Vm::new(mem)?,
            state,
            files,
        })
    }
}

/// The memory file must be exactly guest RAM plus the trailer, and the trailer must name the
/// state's snapshot.
fn check_trailer(file: &File, path: &Path, state: &MicroVmState) -> Result<(), SnapshotError> {
    let len = file
        .metadata()
        .map_err(io("reading the size of", path))?
        .len();
    let expected = state.mem_size + MEM_TRAILER_LEN;
    if len != expected {
        return Err(SnapshotError::Memory(MemoryError::FileSize {
            expected,
            actual: len,
        }));
    }
    let mut trailer = [0u8; 24];
    file.read_exact_at(&mut trailer, state.mem_size)
        .map_err(io("reading the trailer of", path))?;
    if trailer[..8] != MEM_MAGIC || trailer[8..] != state.snapshot_id {
        return Err(SnapshotError::MemoryMismatch(path.to_path_buf()));
    }
    Ok(())
}

fn file_id(file: &File, path: &Path) -> Result<(u64, u64), SnapshotError> {
    let meta = file
        .metadata()
        .map_err(io("reading the metadata of", path))?;
    Ok((meta.dev(), meta.ino()))
}

/// Rebuilds a microVM from a snapshot, paused exactly where the original was. Guest memory is
/// the memory file mapped MAP_PRIVATE: nothing is read up front, and pages the clone never
/// writes stay shared with every other clone through the page cache.
pub fn restore(spec: RestoreSpec<'_>) -> Result<MicroVm, SnapshotError> {
    let shell = VmShell::new(spec.state_path, spec.mem_path)?;
    restore_state_into(shell, spec)
}

/// [`restore`] into a shell made beforehand with [`VmShell::new`] from the same snapshot
/// files; the shell is consumed whether or not the restore succeeds.
pub fn restore_into(shell: VmShell, spec: RestoreSpec<'_>) -> Result<MicroVm, SnapshotError> {
    for (i, path) in [spec.state_path, spec.mem_path].into_iter().enumerate() {
        let file = File::open(path).map_err(io("opening", path))?;
        if file_id(&file, path)? != shell.files[i] {
            return Err(SnapshotError::ShellFile(path.to_path_buf()));
        }
    }
    restore_state_into(shell, spec)
}

fn restore_state_into(shell: VmShell, spec: RestoreSpec<'_>) -> Result<MicroVm, SnapshotError> {
    let VmShell { vm, state, .. } = shell;
    vm.restore_state(&state.vm)?;
    let (pio, serial) = builder::legacy_devices(&vm, spec.serial, Some(&state.serial))?;
    let mut virtio = Vec::new();
    for v in &state.virtio {
        let mut config = v.config.clone();
        let device: Box<dyn VirtioDevice> = match &mut config {
            VirtioDeviceConfig::Block(b) => Box::new(Block::open(&b.path, b.read_only)?),
            VirtioDeviceConfig::Vsock(vs) => {
                if let Some(path) = spec.vsock_uds_path {
                    vs.uds_path = path.to_path_buf();
                }
                let mut dev = Vsock::new(vs.guest_cid, &vs.uds_path)?;
                dev.after_restore();
                Box::new(dev)
            }
            VirtioDeviceConfig::Net(n) => Box::new(Net::new(&n.tap_name, parse_mac(&n.mac)?)?),
        };
        virtio.push((config, device));
    }
    let transports: Vec<MmioSnapshot> = state.virtio.iter().map(|v| v.transport.clone()).collect();
    let (mmio, devices) = builder::virtio_devices(&vm, virtio, Some(&transports), spec.seccomp)?;
    let msr_list = Arc::new(state.msr_list);
    let mut vcpus = Vec::new();
    for vs in &state.vcpus {
        let vcpu = Vcpu::new(&vm, vs.id, pio.clone(), mmio.clone(), msr_list.clone())?;
        vcpu.restore_state(vs)?;
        vcpus.push(vcpu);
    }
    Ok(builder::start(
        vm,
        vcpus,
        devices.with_serial(serial),
        msr_list,
        spec.seccomp,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_errors_are_specific() {
        let p = Path::new("/snap/state");
        assert!(matches!(
            decode_state(b"nope", p),
            Err(SnapshotError::BadMagic(_))
        ));
        let mut bytes = STATE_MAGIC.to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&2u64.to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(b"{}").to_le_bytes());
        bytes.extend_from_slice(b"{}");
        let Err(e) = decode_state(&bytes, p) else {
            panic!("version 1 accepted")
        };
        assert_eq!(
            e.to_string(),
            "\"/snap/state\" has state format version 1; this build reads only version 2"
        );
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        bytes[HEADER_LEN] = b'[';
        assert!(matches!(
            decode_state(&bytes, p),
            Err(SnapshotError::Checksum { .. })
        ));
        bytes.pop();
        assert!(matches!(
            decode_state(&bytes, p),
            Err(SnapshotError::Truncated { .. })
        ));
    }
}
