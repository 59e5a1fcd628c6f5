//! The VMM's root, built by vmm-jail-init's PID-1 child in its private mount namespace: a
//! small tmpfs holding only what the VM needs (the /dev/kvm node, /dev/net/tun when it has
//! network cards, the guest's kernel and
//! disks bound from the host, the VM config, the io directory shared with the host), made
//! read-only, then pivot_root. No /proc, /sys, libraries or other device nodes.

use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use thiserror::Error;

use super::spec::{JailedVm, VmmInitSpec, CONFIG_PATH, FILES_DIR, IO_DIR};
use crate::jail::rootfs::{self, RootfsError};

/// `/dev/kvm`: misc device 10, minor 232 (the kernel's devices.txt).
const KVM_DEVICE: (u64, u64) = (10, 232);
/// `/dev/net/tun`: misc device 10, minor 200.
const TUN_DEVICE: (u64, u64) = (10, 200);
/// The root tmpfs holds a config file and mount points only.
const ROOT_TMPFS_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Error)]
pub enum ChrootError {
    #[error("building the VMM root")]
    Rootfs(#[from] RootfsError),
    #[error("file name {0:?} must be one path component")]
    Name(String),
}

fn inside(root: &Path, chroot_path: &str) -> PathBuf {
    root.join(chroot_path.trim_start_matches('/'))
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), ChrootError> {
    let err = |source| RootfsError::Prepare {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    Ok(io::Write::write_all(&mut f, contents).map_err(err)?)
}

fn device_node(path: &Path, device: (u64, u64), spec: &VmmInitSpec) -> Result<(), ChrootError> {
    rootfs::char_device(path, device, 0o600)?;
    Ok(rootfs::chown_to(path, spec.uid, spec.gid)?)
}

/// Builds the root under `spec.staging_dir` and pivots into it. Runs as root (CAP_MKNOD,
/// CAP_SYS_ADMIN) in fresh mount (private) and pid namespaces, as PID 1.
pub fn build(spec: &VmmInitSpec) -> Result<(), ChrootError> {
    let root = &spec.staging_dir;
    // No MS_NODEV: /dev/kvm lives on this tmpfs. Nothing runs from it (MS_NOEXEC).
    let root_flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    let size = format!("size={ROOT_TMPFS_BYTES},mode=0755");
    let tmpfs = Some(Path::new("tmpfs"));
    rootfs::mnt(
        "VMM root tmpfs",
        tmpfs,
        root,
        Some("tmpfs"),
        root_flags,
        Some(&size),
    )?;

    let dev = root.join("dev");
    rootfs::ensure_dir(&dev, 0o755)?;
    // Nodes of our own, owned by the VM's uid: the host's (root-only) are left as they
    // are, and no other VM's uid can open these.
    device_node(&dev.join("kvm"), KVM_DEVICE, spec)?;
    if !spec.taps.is_empty() {
        rootfs::ensure_dir(&dev.join("net"), 0o755)?;
        device_node(&dev.join("net/tun"), TUN_DEVICE, spec)?;
    }

    let files = inside(root, FILES_DIR);
    rootfs::ensure_dir(&files, 0o755)?;
    for file in &spec.files {
        if file.name.is_empty() || file.name.contains('/') || file.name.starts_with('.') {
            return Err(ChrootError::Name(file.name.clone()));
        }
        let target = files.join(&file.name);
        write_file(&target, b"", 0o600)?;
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        if !file.writable {
            flags |= MsFlags::MS_RDONLY;
        }
        rootfs::bind(&file.host_path, &target, flags)?;
    }

    let io_dir = inside(root, IO_DIR);
    rootfs::ensure_dir(&io_dir, 0o700)?;
    rootfs::bind(
        &spec.io_dir,
        &io_dir,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )?;

    let config = match &spec.vm {
        JailedVm::Boot(config) => serde_json::to_vec_pretty(config),
        JailedVm::Restore(config) => serde_json::to_vec_pretty(config),
    }
    .expect("config serializes");
    write_file(&inside(root, CONFIG_PATH), &config, 0o444)?;

    // The VMM can create files in /io only.
    rootfs::mnt(
        "read-only remount of the VMM root",
        None,
        root,
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | root_flags,
        None,
    )?;
    Ok(rootfs::pivot(root)?)
}
