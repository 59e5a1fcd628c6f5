//! Per-sandbox cgroup leaves, nested under the daemon's own cgroup so that
//! limits placed around the daemon (a systemd unit, a test harness) also bound
//! every sandbox it starts.
//!
//! Layout: `<own cgroup>/<group>/<sandbox id>` in every hierarchy used (v1:
//! memory, pids, cpu and cpuacct when mounted apart; v2: the unified one).

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::SandboxLimits;

/// Period of the CPU bandwidth controller; quota is `millicores * 100` of it.
const CPU_PERIOD_US: u64 = 100_000;
/// Smallest quota the kernel accepts (1 ms).
const CPU_MIN_QUOTA_US: u64 = 1_000;
/// v2 leaf the daemon moves itself into so its own cgroup may delegate
/// controllers (the "no internal processes" rule).
const V2_DAEMON_LEAF: &str = "sessiond-daemon";

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("creating cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no usable cgroup hierarchy: {0}")]
    NoHierarchy(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// One hierarchy's directory holding the sandbox leaves.
#[derive(Debug, Clone)]
struct Group {
    /// `memory`, `pids`, `cpu`, `cpuacct` (v1) or `unified` (v2).
    controller: &'static str,
    dir: PathBuf,
}

/// Where sandbox cgroups live, found once at startup.
#[derive(Debug)]
pub struct CgroupLayout {
    version: CgroupVersion,
    groups: Vec<Group>,
}

/// The cgroup directories of one sandbox.
#[derive(Debug)]
pub struct CgroupLeaf {
    version: CgroupVersion,
    dirs: Vec<(&'static str, PathBuf)>,
}

struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    super_opts: String,
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

/// Undoes the octal escapes (`\040` for a space, ...) of /proc/self/mountinfo.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let (b'\\', Some(digits)) = (bytes[i], octal) {
            let v = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(v as u8);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?.to_owned();
            let _source = right.next()?;
            let super_opts = right.next().unwrap_or("").to_owned();
            Some(Mount {
                root: unescape_mountinfo(left.get(3)?),
                point: PathBuf::from(unescape_mountinfo(left.get(4)?)),
                fstype,
                super_opts,
            })
        })
        .collect()
}

/// `(controllers, path)` per line of /proc/self/cgroup.
fn parse_proc_cgroup(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_owned();
            let path = parts.next()?.to_owned();
            Some((controllers, path))
        })
        .collect()
}

/// Directory of cgroup `path` inside a hierarchy mounted at `mount`.
fn cgroup_dir(mount: &Mount, path: &str) -> PathBuf {
    let rel = if mount.root == "/" {
        path
    } else {
        path.strip_prefix(mount.root.as_str()).unwrap_or(path)
    };
    mount.point.join(rel.trim_start_matches('/'))
}

fn create_dir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

fn pids_in(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

impl CgroupLayout {
    /// Finds the daemon's own cgroup and prepares `<own>/<group_name>` in
    /// every hierarchy sandboxes use: v2 when the unified hierarchy offers
    /// memory, pids and cpu to the daemon's cgroup, else v1.
    pub fn discover(group_name: &str) -> Result<Self, CgroupError> {
        let mounts = parse_mountinfo(&read(Path::new("/proc/self/mountinfo"))?);
        let own = parse_proc_cgroup(&read(Path::new("/proc/self/cgroup"))?);
        if let Some(layout) = Self::discover_v2(&mounts, &own, group_name)? {
            return Ok(layout);
        }
        Self::discover_v1(&mounts, &own, group_name)
    }

    fn discover_v2(
        mounts: &[Mount],
        own: &[(String, String)],
        group_name: &str,
    ) -> Result<Option<Self>, CgroupError> {
        let Some(mount) = mounts.iter().find(|m| m.fstype == "cgroup2") else {
            return Ok(None);
        };
        let Some((_, path)) = own.iter().find(|(c, _)| c.is_empty()) else {
            return Ok(None);
        };
        let mut own_dir = cgroup_dir(mount, path);
        let available = fs::read_to_string(own_dir.join("cgroup.controllers")).unwrap_or_default();
        let available: Vec<&str> = available.split_whitespace().collect();
        if !["memory", "pids", "cpu"]
            .iter()
            .all(|c| available.contains(c))
        {
            return Ok(None);
        }
        // A daemon restarted in place is already inside its own leaf.
        if own_dir.file_name().is_some_and(|n| n == V2_DAEMON_LEAF) {
            if let Some(parent) = own_dir.parent() {
                own_dir = parent.to_owned();
            }
        }
        let is_root = own_dir == mount.point;
        if !is_root && !pids_in(&own_dir).is_empty() {
            // Controllers can only be delegated from a cgroup without
            // processes of its own: move everything in it into a leaf.
            let leaf = own_dir.join(V2_DAEMON_LEAF);
            create_dir(&leaf)?;
            for pid in pids_in(&own_dir) {
                if let Err(e) = write(&leaf.join("cgroup.procs"), &pid.to_string()) {
                    tracing::warn!(pid, error = %e, "could not move a process out of the daemon's cgroup");
                }
            }
            tracing::info!(leaf = %leaf.display(), "moved the daemon into a leaf cgroup to delegate controllers");
        }
        write(
            &own_dir.join("cgroup.subtree_control"),
            "+memory +pids +cpu",
        )?;
        let dir = own_dir.join(group_name);
        create_dir(&dir)?;
        write(&dir.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
        Ok(Some(Self {
            version: CgroupVersion::V2,
            groups: vec![Group {
                controller: "unified",
                dir,
            }],
        }))
    }

    fn discover_v1(
        mounts: &[Mount],
        own: &[(String, String)],
        group_name: &str,
    ) -> Result<Self, CgroupError> {
        let mut groups: Vec<Group> = Vec::new();
        for controller in ["memory", "pids", "cpu", "cpuacct"] {
            let Some(mount) = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == controller))
            else {
                continue;
            };
            let Some((_, path)) = own
                .iter()
                .find(|(c, _)| c.split(',').any(|c| c == controller))
            else {
                continue;
            };
            let dir = cgroup_dir(mount, path).join(group_name);
            // cpu and cpuacct are often co-mounted: one directory serves both.
            if groups.iter().any(|g| g.dir == dir) {
                continue;
            }
            create_dir(&dir)?;
            groups.push(Group { controller, dir });
        }
        for required in ["memory", "pids"] {
            if !groups.iter().any(|g| g.controller == required) {
                return Err(CgroupError::NoHierarchy(format!(
                    "neither cgroup v2 with memory,pids,cpu nor a v1 {required} hierarchy is mounted"
                )));
            }
        }
        if !groups.iter().any(|g| g.controller == "cpu") {
            tracing::warn!("no cgroup v1 cpu hierarchy: sandboxes get no CPU quota");
        }
        Ok(Self {
            version: CgroupVersion::V1,
            groups,
        })
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Removes the `<own>/<group_name>` directories once every sandbox in them
    /// is gone (clean shutdown); a directory still holding a sandbox stays and
    /// is cleaned at the next start.
    pub fn remove_groups(&self) {
        for group in &self.groups {
            if let Err(e) = fs::remove_dir(&group.dir) {
                tracing::warn!(dir = %group.dir.display(), error = %e, "sandbox cgroup parent left behind");
            }
        }
    }

    /// Whether CPU quotas are enforced.
    pub fn has_cpu(&self) -> bool {
        self.version == CgroupVersion::V2 || self.groups.iter().any(|g| g.controller == "cpu")
    }

    /// Leaves left by an earlier run of this daemon (same group name).
    pub fn stale_leaves(&self) -> Vec<CgroupLeaf> {
        let mut by_name: std::collections::BTreeMap<String, CgroupLeaf> = Default::default();
        for group in &self.groups {
            let Ok(entries) = fs::read_dir(&group.dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                by_name
                    .entry(name)
                    .or_insert_with(|| CgroupLeaf {
                        version: self.version,
                        dirs: Vec::new(),
                    })
                    .dirs
                    .push((group.controller, entry.path()));
            }
        }
        by_name.into_values().collect()
    }

    /// Creates the leaves of sandbox `id` and writes its limits.
    pub fn create_leaf(&self, id: &str, limits: &SandboxLimits) -> Result<CgroupLeaf, CgroupError> {
        let mut leaf = CgroupLeaf {
            version: self.version,
            dirs: Vec::new(),
        };
        for group in &self.groups {
            let dir = group.dir.join(id);
            // A leaf that already exists may hold another sandbox's processes.
            if let Err(source) = fs::create_dir(&dir) {
                leaf.try_remove();
                return Err(CgroupError::Create { path: dir, source });
            }
            leaf.dirs.push((group.controller, dir));
        }
        if let Err(e) = leaf.apply_limits(limits) {
            leaf.kill_all();
            leaf.try_remove();
            return Err(e);
        }
        Ok(leaf)
    }
}

impl CgroupLeaf {
    fn dir(&self, controller: &str) -> Option<&Path> {
        let wanted = if self.version == CgroupVersion::V2 {
            "unified"
        } else {
            controller
        };
        self.dirs
            .iter()
            .find(|(c, _)| *c == wanted)
            .map(|(_, d)| d.as_path())
    }

    fn apply_limits(&self, limits: &SandboxLimits) -> Result<(), CgroupError> {
        let cpu_quota = (limits.cpu_millicores > 0).then(|| {
            (u64::from(limits.cpu_millicores) * CPU_PERIOD_US / 1000).max(CPU_MIN_QUOTA_US)
        });
        match self.version {
            CgroupVersion::V1 => {
                if let Some(dir) = self.dir("memory") {
                    let mem = limits.memory_bytes.to_string();
                    write(&dir.join("memory.limit_in_bytes"), &mem)?;
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &mem)?;
                    } else {
                        // Without swap accounting, keep the sandbox out of swap.
                        write(&dir.join("memory.swappiness"), "0")?;
                    }
                }
                if let Some(dir) = self.dir("pids") {
                    write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
                }
                if let (Some(dir), Some(quota)) = (self.dir("cpu"), cpu_quota) {
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
            }
            CgroupVersion::V2 => {
                let dir = self.dir("unified").expect("v2 leaf has its directory");
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
                if let Some(quota) = cpu_quota {
                    write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
            }
        }
        Ok(())
    }

    /// `cgroup.procs` files a process writes its pid to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    /// The leaf directories, one per hierarchy.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.clone()).collect()
    }

    /// Anonymous and tmpfs memory plus kernel memory charged to the sandbox:
    /// usage minus the file page cache, which other sandboxes share.
    pub fn memory_private_bytes(&self) -> Option<u64> {
        let dir = self.dir("memory")?;
        let (usage_file, file_key, shmem_key) = match self.version {
            CgroupVersion::V1 => ("memory.usage_in_bytes", "total_cache", "total_shmem"),
            CgroupVersion::V2 => ("memory.current", "file", "shmem"),
        };
        let usage: u64 = fs::read_to_string(dir.join(usage_file))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = fs::read_to_string(dir.join("memory.stat")).ok()?;
        let field = |key: &str| -> u64 {
            stat.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0)
        };
        let shared_cache = field(file_key).saturating_sub(field(shmem_key));
        Some(usage.saturating_sub(shared_cache))
    }

    /// Whether no process is left in any of the leaves.
    pub fn is_empty(&self) -> bool {
        self.dirs.iter().all(|(_, d)| pids_in(d).is_empty())
    }

    /// SIGKILLs every process in the leaves. A pid is only signalled through
    /// a pidfd opened before checking it is still listed in the leaf, so a
    /// recycled pid outside the sandbox is never hit.
    pub fn kill_all(&self) {
        if self.version == CgroupVersion::V2 {
            if let Some(dir) = self.dir("unified") {
                let kill = dir.join("cgroup.kill");
                if kill.exists() && fs::write(&kill, "1").is_ok() {
                    return;
                }
            }
        }
        for (_, dir) in &self.dirs {
            for pid in pids_in(dir) {
                let Some(pid_t) = rustix::process::Pid::from_raw(pid) else {
                    continue;
                };
                let Ok(pidfd) =
                    rustix::process::pidfd_open(pid_t, rustix::process::PidfdFlags::empty())
                else {
                    continue;
                };
                if pids_in(dir).contains(&pid) {
                    let _ =
                        rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
                }
            }
        }
    }

    /// Removes the leaves that can be removed; true when none is left.
    /// A leaf stays busy while its last processes are being torn down.
    pub fn try_remove(&mut self) -> bool {
        self.dirs.retain(|(_, dir)| match fs::remove_dir(dir) {
            Ok(()) => false,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(_) => true,
        });
        self.dirs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_finds_v1_controllers_and_unescapes_paths() {
        let text = "\
35 25 0:30 / /sys/fs/cgroup/memory rw,relatime shared:14 - cgroup cgroup rw,memory
36 25 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
37 25 0:32 /sub /mnt/with\\040space rw - cgroup2 cgroup2 rw,nsdelegate
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[0].point, Path::new("/sys/fs/cgroup/memory"));
        assert!(mounts[1].super_opts.split(',').any(|o| o == "cpuacct"));
        assert_eq!(mounts[2].point, Path::new("/mnt/with space"));
        assert_eq!(
            cgroup_dir(&mounts[2], "/sub/daemon"),
            Path::new("/mnt/with space/daemon")
        );
        assert_eq!(
            cgroup_dir(&mounts[0], "/process_api/x"),
            Path::new("/sys/fs/cgroup/memory/process_api/x")
        );
    }

    #[test]
    fn proc_cgroup_lines_split_into_controllers_and_path() {
        let own = parse_proc_cgroup("4:memory:/a/b\n1:cpu,cpuacct:/\n0::/user.slice/x\n");
        assert_eq!(own[0], ("memory".to_owned(), "/a/b".to_owned()));
        assert_eq!(own[1], ("cpu,cpuacct".to_owned(), "/".to_owned()));
        assert_eq!(own[2], (String::new(), "/user.slice/x".to_owned()));
    }
}
