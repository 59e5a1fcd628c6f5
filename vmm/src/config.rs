//! The VM configuration a caller writes (JSON, unknown fields refused) and its validation into
//! the runtime [`MachineSpec`] the builder consumes. Validation happens once, here, and names
//! the offending field.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::bzimage::{self, BzImageError, SetupHeader};
use crate::arch::x86_64::layout::{
    virtio_cmdline, CMDLINE_MAX_SIZE, HIMEM_START, MAX_VIRTIO_DEVICES, MMIO_HOLE_START,
};
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
    /// Kernel: an ELF executable with a 64-bit entry point (vmlinux or a tiny test guest), or
    /// a bzImage (boot protocol 2.12+ with the 64-bit entry, `XLF_KERNEL_64`). The format is
    /// read from the file.
    pub kernel_path: PathBuf,
    /// An initrd / initramfs, loaded page-aligned at the top of RAM below the MMIO hole (and
    /// below the bzImage's `initrd_addr_max`); the zero page says where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
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

impl VmConfig {
    /// One vCPU, `mem_size_mib` of RAM, `kernel_path`, and nothing else: no command line,
    /// console or devices, seccomp on (the defaults a JSON config gets for absent fields).
    pub fn new(kernel_path: impl Into<PathBuf>, mem_size_mib: u64) -> VmConfig {
        VmConfig {
            vcpu_count: one(),
            mem_size_mib,
            kernel_path: kernel_path.into(),
            initrd_path: None,
            cmdline: String::new(),
            serial_path: None,
            block_devices: Vec::new(),
            vsock: None,
            net_devices: Vec::new(),
            seccomp: yes(),
        }
    }
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
    #[error(
        "kernel_path {0:?} is neither an ELF file (\\x7fELF at 0) nor a bzImage (\"HdrS\" at \
         0x202)"
    )]
    KernelFormat(PathBuf),
    #[error("kernel_path {path:?} is a bzImage this VMM cannot boot")]
    BzImage {
        path: PathBuf,
        #[source]
        source: BzImageError,
    },
    #[error(
        "kernel_path {path:?} needs guest RAM up to {needed:#x} to decompress and start \
         (pref_address + init_size); mem_size_mib gives {have:#x} below the MMIO hole"
    )]
    KernelNeedsMemory {
        path: PathBuf,
        needed: u64,
        have: u64,
    },
    #[error(
        "cmdline is {len} bytes with the virtio device announcements; kernel_path {path:?} \
         accepts at most {max} (its setup header's cmdline_size)"
    )]
    CmdlineTooLongForKernel { path: PathBuf, len: usize, max: u32 },
    #[error("initrd_path {path:?} cannot be opened")]
    InitrdOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "initrd_path {path:?} is {size} bytes; at most {room} fit in guest RAM above the \
         kernel and below {limit:#x}: give the VM more memory"
    )]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        room: u64,
        limit: u64,
    },
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

/// What kind of kernel image `kernel_path` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF executable, entered at its entry point.
    Elf,
    /// A bzImage, entered at its protected-mode part's load address + 0x200.
    BzImage(SetupHeader),
}

/// An initrd file, open, and its size.
pub struct Initrd {
    pub file: File,
    pub size: u64,
}

/// A validated configuration with its files open.
pub struct MachineSpec {
    pub vcpu_count: u8,
    pub mem_size: u64,
    pub kernel: File,
    pub kernel_format: KernelFormat,
    pub initrd: Option<Initrd>,
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
        let kernel_format = kernel_format(&self.kernel_path, &mut kernel)?;
        let mem_size = self.mem_size_mib << 20;
        // RAM below the MMIO hole: where the kernel and the initrd must fit.
        let low_ram_top = mem_size.min(MMIO_HOLE_START);
        // Lowest address an initrd may take, and the highest its end may reach.
        let (mut initrd_lowest, mut initrd_limit) = (HIMEM_START, low_ram_top);
        if let KernelFormat::BzImage(h) = &kernel_format {
            if h.init_end() > low_ram_top {
                return Err(ConfigError::KernelNeedsMemory {
                    path: self.kernel_path.clone(),
                    needed: h.init_end(),
                    have: low_ram_top,
                });
            }
            if cmdline.len() > h.cmdline_size as usize {
                return Err(ConfigError::CmdlineTooLongForKernel {
                    path: self.kernel_path.clone(),
                    len: cmdline.len(),
                    max: h.cmdline_size,
                });
            }
            initrd_lowest = h.init_end();
            initrd_limit = initrd_limit.min(u64::from(h.initrd_addr_max) + 1);
        }
        let initrd = match &self.initrd_path {
            None => None,
            Some(path) => {
                let open_err = |source| ConfigError::InitrdOpen {
                    path: path.clone(),
                    source,
                };
                let file = File::open(path).map_err(open_err)?;
                let size = file.metadata().map_err(open_err)?.len();
                // The same placement the builder does, which checks again against the
                // kernel's real end once it is loaded.
                if crate::arch::x86_64::boot::place_initrd(size, initrd_lowest, initrd_limit)
                    .is_err()
                {
                    let room = (initrd_limit & !0xfff).saturating_sub(
                        initrd_lowest
                            .checked_next_multiple_of(0x1000)
                            .unwrap_or(u64::MAX),
                    );
                    return Err(ConfigError::InitrdTooBig {
                        path: path.clone(),
                        size,
                        room,
                        limit: initrd_limit,
                    });
                }
                Some(Initrd { file, size })
            }
        };
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
            mem_size,
            kernel,
            kernel_format,
            initrd,
            cmdline,
            serial,
            blocks,
        })
    }
}

/// Tells an ELF kernel from a bzImage by their magic numbers, and checks a bzImage's header.
fn kernel_format(path: &Path, file: &mut File) -> Result<KernelFormat, ConfigError> {
    let mut head = Vec::with_capacity(bzimage::HEAD_LEN);
    file.take(bzimage::HEAD_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|source| ConfigError::KernelOpen {
            path: path.to_owned(),
            source,
        })?;
    if head.starts_with(b"\x7fELF") {
        Ok(KernelFormat::Elf)
    } else if bzimage::has_header_magic(&head) {
        SetupHeader::parse(&head)
            .map(KernelFormat::BzImage)
            .map_err(|source| ConfigError::BzImage {
                path: path.to_owned(),
                source,
            })
    } else {
        Err(ConfigError::KernelFormat(path.to_owned()))
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
        let base = VmConfig::new(k.clone(), 64);
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

    /// The message of `e` and of each of its sources, joined with ": ".
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut src = e.source();
        while let Some(c) = src {
            s += &format!(": {c}");
            src = c.source();
        }
        s
    }

    fn config(kernel: &Path) -> VmConfig {
        VmConfig::new(kernel, 64)
    }

    fn validate_err(cfg: &VmConfig) -> (ConfigError, String) {
        let e = cfg.validate().err().expect("config refused");
        let text = chain(&e);
        (e, text)
    }

    #[test]
    fn kernel_format_is_read_from_the_file() {
        use crate::arch::x86_64::bzimage::offset;
        let dir = std::env::temp_dir().join(format!("vmm-cfg-{}-fmt", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = crate::test_guests::pack_bzimage(&[0xf4; 512], 0x1000);
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };

        let good = write("good.bzImage", &image);
        let spec = config(&good).validate().unwrap();
        match &spec.kernel_format {
            KernelFormat::BzImage(h) => assert_eq!(h.version, 0x020f),
            other => panic!("{other:?}"),
        }

        let text = write("notes.txt", b"this is not a kernel, it is a text file\n");
        let (e, msg) = validate_err(&config(&text));
        assert!(matches!(e, ConfigError::KernelFormat(_)));
        assert!(
            msg.contains("notes.txt") && msg.contains("neither an ELF"),
            "{msg}"
        );
        let empty = write("empty", b"");
        assert!(matches!(
            validate_err(&config(&empty)).0,
            ConfigError::KernelFormat(_)
        ));

        let mut no64 = image.clone();
        no64[offset::XLOADFLAGS] = 0;
        let no64 = write("no64.bzImage", &no64);
        let (e, msg) = validate_err(&config(&no64));
        assert!(matches!(
            e,
            ConfigError::BzImage {
                source: BzImageError::No64BitEntry(0),
                ..
            }
        ));
        assert!(
            msg.contains("no64.bzImage") && msg.contains("XLF_KERNEL_64"),
            "{msg}"
        );

        let mut old = image.clone();
        old[offset::VERSION..offset::VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        let old = write("old.bzImage", &old);
        let (_, msg) = validate_err(&config(&old));
        assert!(
            msg.contains("old.bzImage") && msg.contains("boot protocol is 2.06"),
            "{msg}"
        );

        // A kernel that needs more RAM than the VM has (pref_address 1 MiB + init_size).
        let big = write(
            "big.bzImage",
            &crate::test_guests::pack_bzimage(&[0xf4; 512], 80 << 20),
        );
        let (e, msg) = validate_err(&config(&big));
        assert!(matches!(e, ConfigError::KernelNeedsMemory { .. }), "{msg}");

        // The setup header's cmdline_size is the kernel's limit.
        let mut small_cmdline = image.clone();
        small_cmdline[offset::CMDLINE_SIZE..offset::CMDLINE_SIZE + 4]
            .copy_from_slice(&16u32.to_le_bytes());
        let small_cmdline = write("cmdline16.bzImage", &small_cmdline);
        let mut cfg = config(&small_cmdline);
        cfg.cmdline = "console=ttyS0 quiet".into();
        assert!(matches!(
            validate_err(&cfg).0,
            ConfigError::CmdlineTooLongForKernel {
                len: 19,
                max: 16,
                ..
            }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn initrd_must_exist_and_fit() {
        let dir = std::env::temp_dir().join(format!("vmm-cfg-{}-initrd", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("guest.bzImage");
        std::fs::write(&k, crate::test_guests::pack_bzimage(&[0xf4; 512], 0x1000)).unwrap();
        let mut cfg = config(&k);

        cfg.initrd_path = Some(dir.join("missing.cpio"));
        let (e, msg) = validate_err(&cfg);
        assert!(matches!(e, ConfigError::InitrdOpen { .. }));
        assert!(
            msg.contains("missing.cpio") && msg.contains("No such file"),
            "{msg}"
        );

        // 64 MiB of RAM cannot hold a 64 MiB initrd above the kernel.
        let big = dir.join("big.cpio");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        cfg.initrd_path = Some(big.clone());
        let (e, msg) = validate_err(&cfg);
        assert!(matches!(e, ConfigError::InitrdTooBig { size, .. } if size == 64 << 20));
        assert!(
            msg.contains("big.cpio") && msg.contains("more memory"),
            "{msg}"
        );
        // ... and the same file fits a bigger VM.
        cfg.mem_size_mib = 128;
        let spec = cfg.validate().unwrap();
        assert_eq!(spec.initrd.map(|i| i.size), Some(64 << 20));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
