//! The sandbox's file system, built by jail-init's PID-1 child inside its
//! private mount namespace: tmpfs (size-limited) holding the overlay's upper
//! layer and /mnt/data, overlay over the read-only rootfs, minimal /dev of
//! its own device nodes, fresh /proc with sensitive entries masked,
//! pivot_root. Nothing is bound from the host's file systems but the rootfs
//! (as the overlay's lower layer), so /proc/self/mountinfo in the sandbox
//! names no host path, disk or devtmpfs. The agent is not mounted at all:
//! jail-init execs it through a descriptor opened before pivot_root.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chown, Gid, Uid};
use thiserror::Error;

use super::spec::InitSpec;

/// The agent's name inside the sandbox (its argv[0]); no file is there.
pub const AGENT_PATH: &str = "/usr/lib/sessiond/sessiond-agent";
/// Home directory of the sandbox user.
pub const HOME: &str = "/home/sandbox";
/// Name of the sandbox user in the sandbox's /etc/passwd.
const USER: &str = "sandbox";
/// /dev/shm is its own tmpfs; the memory cgroup bounds it as well.
const SHM_BYTES: u64 = 64 * 1024 * 1024;

/// Device nodes created in the sandbox's /dev: (name, major, minor), the
/// numbers fixed by the kernel's devices.txt.
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];
/// /proc entries hidden behind /dev/null (files) or an empty read-only tmpfs
/// (directories), as Docker's default masked paths.
const PROC_MASKED: &[&str] = &[
    "acpi",
    "asound",
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "scsi",
];
/// /proc entries made read-only, as Docker's default read-only paths.
const PROC_READ_ONLY: &[&str] = &["bus", "fs", "irq", "sys", "sysrq-trigger"];

#[derive(Debug, Error)]
pub enum RootfsError {
    #[error("mounting {what} on {target}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("preparing {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("changing owner of {path}")]
    Chown {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("creating device node {path}")]
    Node {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("pivot_root into {root}")]
    Pivot {
        root: PathBuf,
        #[source]
        source: nix::Error,
    },
}

pub(crate) fn mnt(
    what: &str,
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RootfsError> {
    mount(source, target, fstype, flags, data).map_err(|source| RootfsError::Mount {
        what: what.to_owned(),
        target: target.to_owned(),
        source,
    })
}

fn prepare<T>(path: &Path, result: io::Result<T>) -> Result<T, RootfsError> {
    result.map_err(|source| RootfsError::Prepare {
        path: path.to_owned(),
        source,
    })
}

/// Creates a directory (and parents) if missing and sets its mode.
pub(crate) fn ensure_dir(path: &Path, mode: u32) -> Result<(), RootfsError> {
    prepare(
        path,
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path),
    )?;
    prepare(
        path,
        fs::set_permissions(path, fs::Permissions::from_mode(mode)),
    )
}

pub(crate) fn chown_to(path: &Path, uid: u32, gid: u32) -> Result<(), RootfsError> {
    chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(|source| {
        RootfsError::Chown {
            path: path.to_owned(),
            source,
        }
    })
}

/// Binds `source` on `target`, then remounts the bind with `flags` (a bind
/// mount ignores flags on creation).
pub(crate) fn bind(source: &Path, target: &Path, flags: MsFlags) -> Result<(), RootfsError> {
    let what = format!("bind of {}", source.display());
    mnt(&what, Some(source), target, None, MsFlags::MS_BIND, None)?;
    if !flags.is_empty() {
        mnt(
            &format!("read-only remount of {what}"),
            None,
            target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
            None,
        )?;
    }
    Ok(())
}

/// Builds the sandbox's root under `spec.staging_dir` and pivots into it.
/// Runs as root in fresh mount and pid namespaces, as PID 1.
pub fn build(spec: &InitSpec) -> Result<(), RootfsError> {
    // Nothing mounted from here on may propagate back to the host.
    mnt(
        "private propagation",
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;

    let scratch = &spec.staging_dir;
    mnt(
        "sandbox tmpfs",
        Some(Path::new("tmpfs")),
        scratch,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(&format!("size={},mode=0755", spec.disk_bytes)),
    )?;
    let lower = scratch.join("lower");
    let upper = scratch.join("upper");
    let work = scratch.join("work");
    let data = scratch.join("data");
    let root = scratch.join("root");
    ensure_dir(&lower, 0o755)?;
    ensure_dir(&upper, 0o755)?;
    ensure_dir(&work, 0o700)?;
    ensure_dir(&data, 0o755)?;
    chown_to(&data, spec.uid, spec.gid)?;
    ensure_dir(&root, 0o755)?;
    // A read-only bind of the rootfs as the lower layer: nothing in the
    // sandbox can write to the shared image, whatever the overlay does.
    bind(
        &spec.rootfs,
        &lower,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;
    // Relative layer paths keep host paths out of the sandbox's /proc/mounts.
    nix::unistd::chdir(scratch.as_path()).map_err(|source| RootfsError::Mount {
        what: "chdir for overlay".to_owned(),
        target: scratch.clone(),
        source,
    })?;
    mnt(
        "overlay",
        Some(Path::new("overlay")),
        &root,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("lowerdir=lower,upperdir=upper,workdir=work"),
    )?;

    let mnt_data = root.join("mnt/data");
    ensure_dir(&mnt_data, 0o755)?;
    bind(&data, &mnt_data, MsFlags::empty())?;

    build_dev(&root.join("dev"))?;
    build_proc(&root.join("proc"), &root.join("dev/null"))?;

    ensure_dir(&root.join("tmp"), 0o1777)?;
    ensure_dir(&root.join("var/tmp"), 0o1777)?;
    let home = root.join(HOME.trim_start_matches('/'));
    ensure_dir(&home, 0o700)?;
    chown_to(&home, spec.uid, spec.gid)?;
    add_user(&root, spec.uid, spec.gid)?;

    pivot(&root)
}

fn build_dev(dev: &Path) -> Result<(), RootfsError> {
    ensure_dir(dev, 0o755)?;
    mnt(
        "/dev tmpfs",
        Some(Path::new("tmpfs")),
        dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=65536"),
    )?;
    for &(name, major, minor) in DEVICES {
        char_device(&dev.join(name), (major, minor), 0o666)?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let path = dev.join(link);
        prepare(&path, std::os::unix::fs::symlink(target, &path))?;
    }
    let shm = dev.join("shm");
    ensure_dir(&shm, 0o1777)?;
    mnt(
        "/dev/shm tmpfs",
        Some(Path::new("tmpfs")),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(&format!("mode=1777,size={SHM_BYTES}")),
    )?;
    mnt(
        "read-only remount of /dev",
        None,
        dev,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NOEXEC,
        None,
    )
}

fn build_proc(proc: &Path, null: &Path) -> Result<(), RootfsError> {
    let locked = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    ensure_dir(proc, 0o555)?;
    mnt(
        "proc",
        Some(Path::new("proc")),
        proc,
        Some("proc"),
        locked,
        None,
    )?;
    for name in PROC_MASKED {
        let path = proc.join(name);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => mnt(
                "mask tmpfs",
                Some(Path::new("tmpfs")),
                &path,
                Some("tmpfs"),
                locked | MsFlags::MS_RDONLY,
                Some("size=0"),
            )?,
            Ok(_) => bind(null, &path, MsFlags::empty())?,
            Err(_) => continue,
        }
    }
    for name in PROC_READ_ONLY {
        let path = proc.join(name);
        if fs::symlink_metadata(&path).is_err() {
            continue;
        }
        mnt(
            "bind",
            Some(&path),
            &path,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        mnt(
            "read-only remount",
            None,
            &path,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | locked,
            None,
        )?;
    }
    Ok(())
}

/// Gives the sandbox uid a name and home, so tools that look the user up
/// (`whoami`, `getpass.getuser()`, ssh-like clients) work.
fn add_user(root: &Path, uid: u32, gid: u32) -> Result<(), RootfsError> {
    for (file, line) in [
        (
            "etc/passwd",
            format!("{USER}:x:{uid}:{gid}:sessiond sandbox:{HOME}:/bin/sh\n"),
        ),
        ("etc/group", format!("{USER}:x:{gid}:\n")),
    ] {
        let path = root.join(file);
        let mut f = prepare(&path, OpenOptions::new().append(true).open(&path))?;
        prepare(&path, f.write_all(line.as_bytes()))?;
    }
    Ok(())
}

pub(crate) fn pivot(root: &Path) -> Result<(), RootfsError> {
    let err = |source| RootfsError::Pivot {
        root: root.to_owned(),
        source,
    };
    nix::unistd::chdir(root).map_err(err)?;
    // pivot_root(".", ".") stacks the old root on the new one; detaching it
    // leaves nothing of the host reachable.
    nix::unistd::pivot_root(".", ".").map_err(err)?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err)?;
    nix::unistd::chdir("/").map_err(err)
}

/// Creates character device `path` with exactly `mode` (mknod applies the umask).
pub(crate) fn char_device(
    path: &Path,
    (major, minor): (u64, u64),
    mode: u32,
) -> Result<(), RootfsError> {
    mknod(
        path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .map_err(|source| RootfsError::Node {
        path: path.to_owned(),
        source,
    })?;
    prepare(
        path,
        fs::set_permissions(path, fs::Permissions::from_mode(mode)),
    )
}
