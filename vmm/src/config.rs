//! The VM configuration a caller writes (JSON, unknown fields refused) and its validation into
//! the runtime [`MachineSpec`] the builder consumes. Validation happens once, here, and names
//! the offending field.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::{virtio_cmdline, CMDLINE_MAX_SIZE, MAX_VIRTIO_DEVICES};
use crate::devices::legacy::serial::SerialOut;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::net::{parse_mac, Net, NetError};
use crate::devices::virtio::vsock::{Vsock, VsockError};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest: the boot tables and a tiny kernel above 1 MiB need at least this.
pub const MIN_MEM_MIB: u64 = 2;
/// Largest guest accepted.
pub const MAX_MEM_MIB: u64 = 256 * 1024;

/// A microVM as the caller describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs (1..=32).
    #[serde(default = "one")]
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Kernel: an ELF executable with a 64-bit entry point (vmlinux or a tiny test guest).
    pub kernel_path: PathBuf,
    /// Kernel command line, placed at the address the zero page points to.
    #[serde(default)]
    pub cmdline: String,
    /// Where the serial console's output goes (a file, created or appended; or a FIFO).
    /// Absent: discarded.
    #[serde(default)]
    pub serial_path: Option<PathBuf>,
    /// virtio-blk disks, in the order the guest sees them.
    #[serde(default)]
    pub block_devices: Vec<BlockConfig>,
    /// A virtio-vsock device, after the block devices.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-net cards, after vsock.
    #[serde(default)]
    pub net_devices: Vec<NetConfig>,
    /// Confine every VMM thread with a seccomp filter before guest code runs (default on).
    /// A violation kills the whole process: turn it off only when embedding the VMM in a
    /// process that runs more than this VM.
    #[serde(default = "yes")]
    pub seccomp: bool,
}

fn yes() -> bool {
    true
}

/// One virtio-net card on a tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap interface to attach to (created if missing; needs CAP_NET_ADMIN).
    pub tap_name: String,
    /// The guest's MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// The vsock device: the guest's CID and the host Unix socket its connections go through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest context id (3 or more).
    pub guest_cid: u64,
    /// Host side: connect here and send `CONNECT <port>\n` to reach a guest port; guest
    /// connections to host port P go to `<uds_path>_<P>`. Must not exist yet.
    pub uds_path: PathBuf,
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// A raw image file (a whole number of 512-byte sectors).
    pub path: PathBuf,
    /// Opened without write access; guest writes fail with an I/O error.
    #[serde(default)]
    pub read_only: bool,
}

fn one() -> u8 {
    1
}

/// What is wrong with a [`VmConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("parsing the VM config")]
    Parse(#[source] serde_json::Error),
    #[error("vcpu_count is {0}; it must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u8),
    #[error("mem_size_mib is {0}; it must be between {MIN_MEM_MIB} and {MAX_MEM_MIB}")]
    MemSize(u64),
    #[error("cmdline is {0} bytes with the virtio device announcements; the limit is {max}", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("cmdline contains a NUL byte")]
    CmdlineNul,
    #[error("kernel_path {path:?} cannot be opened")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel_path {0:?} is not an ELF file (bzImage is not supported yet)")]
    KernelFormat(PathBuf),
    #[error("{0} virtio devices configured; at most {MAX_VIRTIO_DEVICES} are supported")]
    TooManyDevices(usize),
    #[error("block_devices")]
    Block(#[from] BlockError),
    #[error("vsock")]
    Vsock(#[from] VsockError),
    #[error("net_devices")]
    Net(#[from] NetError),
    #[error("serial_path {path:?} cannot be opened for writing")]
    SerialOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A validated configuration with its files open.
pub struct MachineSpec {
    pub vcpu_count: u8,
    pub mem_size: u64,
    pub kernel: File,
    pub cmdline: String,
    pub serial: SerialOut,
    /// Block devices with their images open.
    pub blocks: Vec<(BlockConfig, Block)>,
    /// The vsock device with its socket bound.
    pub vsock: Option<(VsockConfig, Vsock)>,
    /// Net cards with their taps attached.
    pub nets: Vec<(NetConfig, Net)>,
    /// Install seccomp filters on the VMM's threads.
    pub seccomp: bool,
}

impl VmConfig {
    /// Parses a JSON config.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(ConfigError::Parse)
    }

    /// Checks every field and opens the files.
    pub fn validate(&self) -> Result<MachineSpec, ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpu_count));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_size_mib) {
            return Err(ConfigError::MemSize(self.mem_size_mib));
        }
        if self.block_devices.len() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(self.block_devices.len()));
        }
        let cmdline = format!(
            "{}{}",
            self.cmdline,
            virtio_cmdline(self.block_devices.len())
        );
        if cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(cmdline.len()));
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        let mut kernel =
            File::open(&self.kernel_path).map_err(|source| ConfigError::KernelOpen {
                path: self.kernel_path.clone(),
                source,
            })?;
        let mut magic = [0u8; 4];
        if kernel.read_exact(&mut magic).is_err() || magic != *b"\x7fELF" {
            return Err(ConfigError::KernelFormat(self.kernel_path.clone()));
        }
        let serial = crate::devices::legacy::serial::open_output(self.serial_path.as_deref())
            .map_err(|source| ConfigError::SerialOpen {
                path: self.serial_path.clone().unwrap_or_default(),
                source,
            })?;
        let mut blocks = Vec::new();
        for b in &self.block_devices {
            blocks.push((b.clone(), Block::open(&b.path, b.read_only)?));
        }
        let vsock = match &self.vsock {
            Some(v) => Some((v.clone(), Vsock::new(v.guest_cid, &v.uds_path)?)),
            None => None,
        };
        let mut nets = Vec::new();
        for n in &self.net_devices {
            nets.push((n.clone(), Net::new(&n.tap_name, parse_mac(&n.mac)?)?));
        }
        Ok(MachineSpec {
            seccomp: self.seccomp,
            nets,
            vsock,
            vcpu_count: self.vcpu_count,
            mem_size: self.mem_size_mib << 20,
            kernel,
            cmdline,
            serial,
            blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_file(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-cfg-{}-{name}", std::process::id()));
        std::fs::write(&p, b"\x7fELF\x02\x01\x01").unwrap();
        p
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = VmConfig::from_json(r#"{"mem_size_mib": 64, "kernel_path": "/k", "memory": 1}"#)
            .unwrap_err();
        assert!(format!("{:#}", std::error::Error::source(&e).unwrap()).contains("memory"));
    }

    #[test]
    fn defaults_and_round_trip() {
        let c = VmConfig::from_json(r#"{"mem_size_mib": 64, "kernel_path": "/k"}"#).unwrap();
        assert_eq!(c.vcpu_count, 1);
        assert!(c.seccomp, "seccomp is on unless turned off");
        assert_eq!(c.cmdline, "");
        let back = VmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_values_are_named() {
        let k = elf_file("ok");
        let base = VmConfig {
            vcpu_count: 1,
            mem_size_mib: 64,
            kernel_path: k.clone(),
            cmdline: String::new(),
            serial_path: None,
            block_devices: vec![],
            vsock: None,
            net_devices: vec![],
            seccomp: true,
        };
        assert!(base.validate().is_ok());
        let e = VmConfig {
            vcpu_count: 0,
            ..base.clone()
        }
        .validate()
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "vcpu_count is 0; it must be between 1 and 32"
        );
        let e = VmConfig {
            mem_size_mib: 1,
            ..base.clone()
        }
        .validate()
        .err()
        .unwrap();
        assert!(matches!(e, ConfigError::MemSize(1)));
        let e = VmConfig {
            cmdline: "x".repeat(5000),
            ..base.clone()
        }
        .validate()
        .err()
        .unwrap();
        assert!(matches!(e, ConfigError::CmdlineTooLong(5000)));
        let e = VmConfig {
            kernel_path: "/nonexistent/vmlinux".into(),
            ..base.clone()
        }
        .validate()
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent/vmlinux"));
        let not_elf = std::env::temp_dir().join(format!("vmm-cfg-{}-bz", std::process::id()));
        std::fs::write(&not_elf, b"MZ\0\0").unwrap();
        let e = VmConfig {
            kernel_path: not_elf.clone(),
            ..base.clone()
        }
        .validate()
        .err()
        .unwrap();
        assert!(matches!(e, ConfigError::KernelFormat(_)));
        let e = VmConfig {
            kernel_path: k.clone(),
            block_devices: vec![BlockConfig {
                path: "/nonexistent/disk.img".into(),
                read_only: true,
            }],
            ..base.clone()
        }
        .validate()
        .err()
        .unwrap();
        assert!(matches!(e, ConfigError::Block(_)));
        std::fs::remove_file(k).unwrap();
        std::fs::remove_file(not_elf).unwrap();
    }
}
