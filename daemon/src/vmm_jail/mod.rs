//! Running one microVM's VMM jailed, in the order of Firecracker's jailer: a per-VM host
//! directory, a cgroup leaf, new mount, pid, net, uts, ipc and cgroup namespaces (the net
//! namespace holding only the VM's taps), a chroot holding only what the VM needs (its
//! /dev/kvm and /dev/net/tun nodes, kernel and disks, config, and an io directory shared
//! with the host), an unprivileged uid of its own with no capabilities, only its log pipes
//! open; then the VMM, which confines each of its threads with seccomp.
//! The cgroup, uid, privilege, file-system and process plumbing is the jail backend's
//! ([`crate::jail`]). See docs/architecture.md, "microVM engine".
//!
//! The daemon side (this module) prepares the host directory and the cgroup leaf, then
//! starts `sessiond vmm-jail-init` ([`init`]), which builds the jail and runs the VMM.

mod chroot;
pub mod init;
mod spec;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::jail::cell::{io_err, Cell, CellError, CellHost};
use crate::jail::SandboxLimits;
pub use spec::VmmInitSpec;
use spec::{BoundFile, JailedVm, FILES_DIR, IO_DIR};

/// First uid (and gid) given to VMMs; VM `n` runs as `base + n`. Apart from the jail
/// backend's range (200000..265536).
pub const DEFAULT_UID_BASE: u32 = 300_000;
/// At most this many jailed VMMs (and uids) at once.
pub const MAX_VMS: u32 = 65_536;
/// Directory name, under the daemon's own cgroup, holding one leaf per VM.
pub const DEFAULT_CGROUP_NAME: &str = "sessiond-vms";
/// How long vmm-jail-init may take to build the jail and the VM.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Memory the VMM itself needs besides guest RAM (its threads, device buffers, page
/// tables), on top of which the cgroup limit must leave room.
const VMM_OVERHEAD_BYTES: u64 = 32 * 1024 * 1024;
/// Names of the host-visible files in the io directory.
const SERIAL_LOG: &str = "serial.log";
const VSOCK_SOCKET: &str = "vsock.sock";

#[derive(Debug, Clone)]
pub struct VmmJailConfig {
    /// Host directory (created 0755 if missing); the jail owns `vms/` under it (0700).
    pub run_dir: PathBuf,
    /// First VM uid/gid.
    pub uid_base: u32,
    /// Binary started as `<init_binary> vmm-jail-init <id>`: the sessiond binary
    /// (`/proc/self/exe`, the default, is the running daemon).
    pub init_binary: PathBuf,
    /// Directory name of the VMs' cgroups under the daemon's own cgroup.
    pub cgroup_name: String,
}

impl VmmJailConfig {
    pub fn new(run_dir: PathBuf) -> Self {
        Self {
            run_dir,
            uid_base: DEFAULT_UID_BASE,
            init_binary: PathBuf::from("/proc/self/exe"),
            cgroup_name: DEFAULT_CGROUP_NAME.to_owned(),
        }
    }
}

/// Resources of one VMM process (guest RAM included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmLimits {
    /// Memory (guest RAM + VMM), no swap; at least guest RAM + 32 MiB.
    pub memory_bytes: u64,
    /// CPU quota in thousandths of a core; 0 means no quota.
    pub cpu_millicores: u32,
    /// Processes and threads (one per vCPU, one per device event loop, the VMM's main
    /// thread and vmm-jail-init). Must be > 0.
    pub pids_max: u32,
}

/// One VM to run jailed. Host paths; the jail binds them into the chroot.
#[derive(Debug, Clone)]
pub struct VmmSpec {
    /// `[a-z0-9-]`, 1..=63 characters, unique among live VMs.
    pub vm_id: String,
    pub limits: VmmLimits,
    /// How the VM starts: booted from a kernel, or restored from a snapshot.
    pub boot: Boot,
    /// Raw disk images. A read-only one must be readable by the VM's uid; a writable one
    /// is handed to the VM: `spawn` chowns it to the VM's uid.
    pub disks: Vec<vmm::config::BlockConfig>,
    /// virtio-net cards on taps created in the VM's own (otherwise empty) network
    /// namespace, owned by its uid; the host reaches them through that namespace
    /// (`/proc/<vmm_pid>/ns/net`).
    pub net_devices: Vec<vmm::config::NetConfig>,
    /// A vsock device with this guest CID, its host socket at [`VmmProcess::vsock_socket`].
    pub vsock_cid: Option<u64>,
    /// Keep the serial console in [`VmmProcess::serial_log`] (else it is discarded).
    pub serial_log: bool,
}

/// How a jailed VM starts. Its files must be readable by the VM's uid.
#[derive(Debug, Clone)]
pub enum Boot {
    /// Boot a kernel (ELF or bzImage, or a tiny test guest), with an optional initrd, with
    /// `vcpu_count` vCPUs and `mem_size_mib`.
    Kernel {
        path: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
        vcpu_count: u8,
        mem_size_mib: u64,
    },
    /// Restore a snapshot, paused where it was taken, and resume it. Its devices are the
    /// snapshot's and reopen their files by the paths it recorded: a snapshot of a jailed
    /// VM names its disks `/vm/disk<i>`, so give the clone the same `disks` in the same
    /// order (and its taps' names in `net_devices`); its vsock socket moves to this VM's io
    /// directory.
    Snapshot { state: PathBuf, memory: PathBuf },
}

#[derive(Debug, Error)]
pub enum VmmJailError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid VM spec: {0}")]
    Spec(String),
    #[error(transparent)]
    Cell(#[from] CellError),
}

/// Starts and destroys jailed VMMs. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct VmmJail {
    init_binary: PathBuf,
    cells: Arc<CellHost>,
}

impl VmmJail {
    /// Checks the configuration, finds the cgroup layout and removes what an earlier run
    /// of the same configuration left behind.
    pub fn new(cfg: VmmJailConfig) -> Result<Self, VmmJailError> {
        if !cfg.run_dir.is_absolute() {
            return Err(VmmJailError::Config(format!(
                "run_dir {} must be absolute",
                cfg.run_dir.display()
            )));
        }
        if cfg.uid_base == 0 || cfg.uid_base.checked_add(MAX_VMS).is_none() {
            return Err(VmmJailError::Config(format!(
                "uid_base {} must be > 0 and leave room for {MAX_VMS} uids",
                cfg.uid_base
            )));
        }
        let cells = CellHost::new(
            &cfg.cgroup_name,
            cfg.run_dir.join("vms"),
            cfg.uid_base,
            MAX_VMS,
        )?;
        Ok(Self {
            init_binary: cfg.init_binary,
            cells: Arc::new(cells),
        })
    }

    /// Starts a jailed VMM. Returns once the VM is built (files opened, vsock socket
    /// bound) and its vCPUs are about to run.
    pub async fn spawn(&self, spec: VmmSpec) -> Result<VmmProcess, VmmJailError> {
        validate_spec(&spec)?;
        let mut cell = self.cells.create(&spec.vm_id)?;
        match self.start(&mut cell, &spec).await {
            Ok(()) => {
                tracing::info!(vm = %spec.vm_id, uid = cell.uid(), "jailed VMM started");
                Ok(VmmProcess { cell })
            }
            Err(e) => {
                if let Err(cleanup) = cell.teardown().await {
                    tracing::warn!(vm = %spec.vm_id, error = %cleanup, "cleanup after a failed spawn");
                }
                Err(e)
            }
        }
    }

    async fn start(&self, cell: &mut Cell, spec: &VmmSpec) -> Result<(), VmmJailError> {
        let uid = cell.uid().expect("a new cell has a uid");
        let staging = cell.dir().join("root");
        let io_dir = cell.dir().join("io");
        for dir in [&staging, &io_dir] {
            std::fs::create_dir(dir).map_err(io_err("creating", dir))?;
        }
        chown(&io_dir, uid)?;
        let (files, vm) = jailed_vm(spec, uid)?;
        let cgroup_procs = cell.create_leaf(&SandboxLimits {
            memory_bytes: spec.limits.memory_bytes,
            cpu_millicores: spec.limits.cpu_millicores,
            pids_max: spec.limits.pids_max,
            disk_bytes: 0,
        })?;
        let init_spec = VmmInitSpec {
            vm_id: spec.vm_id.clone(),
            uid,
            gid: uid,
            cgroup_procs,
            staging_dir: staging,
            io_dir,
            files,
            taps: spec
                .net_devices
                .iter()
                .map(|n| n.tap_name.clone())
                .collect(),
            vm,
        };
        let json = serde_json::to_vec(&init_spec).expect("spec serializes");
        // The status pipe closes silently once the VM is built and its vCPUs start (a
        // guest that stops at once has then exited too; `wait` gives its status).
        cell.launch(
            &self.init_binary,
            "vmm-jail-init",
            &[],
            &json,
            SETUP_TIMEOUT,
        )
        .await?;
        Ok(())
    }
}

fn chown(path: &Path, uid: u32) -> Result<(), CellError> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(io_err("changing owner of", path))
}

fn validate_spec(spec: &VmmSpec) -> Result<(), VmmJailError> {
    let files: Vec<&PathBuf> = match &spec.boot {
        Boot::Kernel { path, initrd, .. } => std::iter::once(path).chain(initrd).collect(),
        Boot::Snapshot { state, memory } => vec![state, memory],
    };
    for path in files
        .iter()
        .copied()
        .chain(spec.disks.iter().map(|d| &d.path))
    {
        if !path.is_absolute() || !path.is_file() {
            return Err(VmmJailError::Spec(format!(
                "{} must be an absolute path to a regular file",
                path.display()
            )));
        }
    }
    let guest = match &spec.boot {
        Boot::Kernel { mem_size_mib, .. } => mem_size_mib.saturating_mul(1024 * 1024),
        Boot::Snapshot { memory, .. } => std::fs::metadata(memory).map_or(0, |m| m.len()),
    };
    let l = &spec.limits;
    if l.pids_max == 0 || l.memory_bytes < guest.saturating_add(VMM_OVERHEAD_BYTES) {
        return Err(VmmJailError::Spec(format!(
            "pids must be > 0 and memory at least guest RAM + {} MiB ({} bytes), got {l:?}",
            VMM_OVERHEAD_BYTES >> 20,
            guest.saturating_add(VMM_OVERHEAD_BYTES)
        )));
    }
    Ok(())
}

/// The files to bind into the chroot and the VM as the jailed VMM sees it.
fn jailed_vm(spec: &VmmSpec, uid: u32) -> Result<(Vec<BoundFile>, JailedVm), VmmJailError> {
    let inside = |name: &str| Path::new(FILES_DIR).join(name);
    let bound = |host_path: &PathBuf, name: &str, writable| BoundFile {
        host_path: host_path.clone(),
        name: name.to_owned(),
        writable,
    };
    let mut files = match &spec.boot {
        Boot::Kernel { path, initrd, .. } => std::iter::once(bound(path, "kernel", false))
            .chain(initrd.iter().map(|i| bound(i, "initrd", false)))
            .collect(),
        Boot::Snapshot { state, memory } => vec![
            bound(state, "snapshot.state", false),
            bound(memory, "snapshot.mem", false),
        ],
    };
    let mut block_devices = Vec::new();
    for (i, disk) in spec.disks.iter().enumerate() {
        let name = format!("disk{i}");
        if !disk.read_only {
            chown(&disk.path, uid)?;
        }
        block_devices.push(vmm::config::BlockConfig {
            path: inside(&name),
            read_only: disk.read_only,
        });
        files.push(bound(&disk.path, &name, !disk.read_only));
    }
    let io = Path::new(IO_DIR);
    let serial_path = spec.serial_log.then(|| io.join(SERIAL_LOG));
    let vm = match &spec.boot {
        Boot::Kernel {
            initrd,
            cmdline,
            vcpu_count,
            mem_size_mib,
            ..
        } => JailedVm::Boot(vmm::VmConfig {
            vcpu_count: *vcpu_count,
            initrd_path: initrd.as_ref().map(|_| inside("initrd")),
            cmdline: cmdline.clone(),
            serial_path,
            block_devices,
            vsock: spec.vsock_cid.map(|guest_cid| vmm::config::VsockConfig {
                guest_cid,
                uds_path: io.join(VSOCK_SOCKET),
            }),
            net_devices: spec.net_devices.clone(),
            ..vmm::VmConfig::new(inside("kernel"), *mem_size_mib)
        }),
        Boot::Snapshot { .. } => JailedVm::Restore(vmm::standalone::RestoreConfig {
            state_path: inside("snapshot.state"),
            mem_path: inside("snapshot.mem"),
            serial_path,
            vsock_uds_path: spec.vsock_cid.map(|_| io.join(VSOCK_SOCKET)),
        }),
    };
    Ok((files, vm))
}

/// A running jailed VMM. Call [`VmmProcess::destroy`]; dropping it instead tears it
/// down synchronously (blocking for up to a few seconds).
pub struct VmmProcess {
    cell: Cell,
}

impl std::fmt::Debug for VmmProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmProcess")
            .field("id", &self.cell.id())
            .field("uid", &self.cell.uid())
            .finish()
    }
}

impl VmmProcess {
    pub fn id(&self) -> &str {
        self.cell.id()
    }

    /// The uid the VMM runs as.
    pub fn uid(&self) -> Option<u32> {
        self.cell.uid()
    }

    /// Host path of the serial console log (when the spec asked for it).
    pub fn serial_log(&self) -> PathBuf {
        self.cell.dir().join("io").join(SERIAL_LOG)
    }

    /// Host path of the vsock device's Unix socket (when the spec has one).
    pub fn vsock_socket(&self) -> PathBuf {
        self.cell.dir().join("io").join(VSOCK_SOCKET)
    }

    /// The VMM's host pid (PID 1 of its pid namespace), while it runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        let init = self.cell.child()?.id()?;
        let children =
            std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// The VM's cgroup directories (one per hierarchy).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cell.leaf().map(|l| l.dirs()).unwrap_or_default()
    }

    /// Waits for the VM to stop by itself: the VMM's exit code (the guest's status, 128
    /// for a shutdown, 1 when the VMM failed: the reason is in the daemon's log), or
    /// 128 + the signal that killed the VMM (159 for seccomp's SIGSYS).
    pub async fn wait(&mut self) -> io::Result<i32> {
        let child = self
            .cell
            .child_mut()
            .ok_or_else(|| io::Error::other("the VMM was destroyed"))?;
        let status = child.wait().await?;
        Ok(status.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
        }))
    }

    /// Kills the VMM and removes its cgroup and host directory. Whatever could not be
    /// removed is logged and returned.
    pub async fn destroy(mut self) -> Result<(), VmmJailError> {
        Ok(self.cell.teardown().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(boot: Boot) -> VmmSpec {
        VmmSpec {
            vm_id: "vm-1".to_owned(),
            limits: VmmLimits {
                memory_bytes: 96 * 1024 * 1024,
                cpu_millicores: 0,
                pids_max: 16,
            },
            boot,
            disks: vec![vmm::config::BlockConfig {
                path: PathBuf::from("/etc/hostname"),
                read_only: true,
            }],
            net_devices: Vec::new(),
            vsock_cid: Some(3),
            serial_log: true,
        }
    }

    fn kernel(mem_size_mib: u64) -> Boot {
        Boot::Kernel {
            path: PathBuf::from("/etc/passwd"),
            initrd: Some(PathBuf::from("/etc/group")),
            cmdline: "console=ttyS0".to_owned(),
            vcpu_count: 2,
            mem_size_mib,
        }
    }

    #[test]
    fn jails_and_processes_can_be_shared_across_tasks() {
        fn shared<T: Send + Sync>() {}
        shared::<VmmJail>();
        shared::<VmmProcess>();
    }

    #[test]
    fn the_jailed_vmm_sees_chroot_paths_only() {
        let (files, vm) = jailed_vm(&spec(kernel(64)), 300_000).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| (f.name.as_str(), f.writable))
            .collect();
        assert_eq!(
            names,
            [("kernel", false), ("initrd", false), ("disk0", false)]
        );
        let JailedVm::Boot(cfg) = vm else {
            panic!("not a boot")
        };
        assert_eq!(cfg.kernel_path, Path::new("/vm/kernel"));
        assert_eq!(cfg.initrd_path.as_deref(), Some(Path::new("/vm/initrd")));
        assert_eq!(cfg.block_devices[0].path, Path::new("/vm/disk0"));
        assert_eq!(
            cfg.serial_path.as_deref(),
            Some(Path::new("/io/serial.log"))
        );
        assert_eq!(cfg.vsock.unwrap().uds_path, Path::new("/io/vsock.sock"));
        assert!(cfg.seccomp);

        let snapshot = Boot::Snapshot {
            state: PathBuf::from("/etc/passwd"),
            memory: PathBuf::from("/etc/group"),
        };
        let (files, vm) = jailed_vm(&spec(snapshot), 300_000).unwrap();
        assert_eq!(files[0].name, "snapshot.state");
        assert_eq!(files[1].name, "snapshot.mem");
        let JailedVm::Restore(cfg) = vm else {
            panic!("not a restore")
        };
        assert_eq!(cfg.mem_path, Path::new("/vm/snapshot.mem"));
        assert_eq!(
            cfg.vsock_uds_path.as_deref(),
            Some(Path::new("/io/vsock.sock"))
        );
    }

    #[test]
    fn specs_without_room_for_the_guest_or_with_missing_files_are_refused() {
        assert!(validate_spec(&spec(kernel(64))).is_ok());
        let e = validate_spec(&spec(kernel(128))).unwrap_err();
        assert!(e.to_string().contains("at least guest RAM + 32 MiB"), "{e}");
        let mut relative = spec(kernel(64));
        relative.boot = Boot::Kernel {
            path: PathBuf::from("vmlinux"),
            initrd: None,
            cmdline: String::new(),
            vcpu_count: 1,
            mem_size_mib: 64,
        };
        assert!(validate_spec(&relative).is_err());
        let mut no_disk = spec(kernel(64));
        no_disk.disks[0].path = PathBuf::from("/nonexistent/disk.img");
        let e = validate_spec(&no_disk).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
        let mut no_initrd = spec(kernel(64));
        no_initrd.boot = Boot::Kernel {
            path: PathBuf::from("/etc/passwd"),
            initrd: Some(PathBuf::from("/nonexistent/initrd")),
            cmdline: String::new(),
            vcpu_count: 1,
            mem_size_mib: 64,
        };
        let e = validate_spec(&no_initrd).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/initrd"), "{e}");
    }
}
