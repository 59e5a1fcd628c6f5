//! What one sandbox holds on the host, and how it starts and ends: a uid slot, a private
//! host directory, a cgroup leaf and an init helper process (`sessiond jail-init`,
//! `sessiond vmm-jail-init`) told its spec on stdin and answering on the status pipe.
//! Torn down in reverse: the helper (SIGTERM, then SIGKILL), whatever is left in the leaf,
//! the leaf, the directory; the uid is reused only once no process of it can remain.
//!
//! Shared by the jail backend and the jailed VMM ([`crate::vmm_jail`]); added beside
//! `mod.rs`, whose sandboxes can move onto it.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::cgroup::{CgroupError, CgroupLayout, CgroupLeaf};
use super::slots::UidSlots;
use super::spec::STATUS_FD;
use super::{
    cloexec_pipe, dup_high, forward_log, teardown_cgroup_blocking, terminate, SandboxLimits,
    TEARDOWN_TIMEOUT, TERM_GRACE,
};

#[derive(Debug, Error)]
pub enum CellError {
    #[error("cgroup")]
    Cgroup(#[from] CgroupError),
    #[error("cgroup name {0:?} must be [A-Za-z0-9._-] and not start with '.'")]
    CgroupName(String),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("id {0:?} must be 1..=63 characters of [a-z0-9-]")]
    Id(String),
    #[error(
        "{file} has {name:?} with id {id}, inside the uid range {}..{}: choose another uid_base",
        range.start,
        range.end
    )]
    UidRange {
        file: &'static str,
        name: String,
        id: u32,
        range: std::ops::Range<u32>,
    },
    #[error("all {0} uids are in use")]
    NoFreeUid(u32),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{helper} for {id} failed: {message}")]
    Init {
        helper: String,
        id: String,
        message: String,
    },
    #[error("{id} was not fully removed: {leftovers}")]
    Leftovers { id: String, leftovers: String },
}

pub fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CellError {
    let path = path.to_owned();
    move |source| CellError::Io { what, path, source }
}

/// A cell id names a directory and a cgroup: 1..=63 characters of `[a-z0-9-]`.
pub fn check_id(id: &str) -> Result<(), CellError> {
    if id.is_empty()
        || id.len() > 63
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(CellError::Id(id.to_owned()));
    }
    Ok(())
}

/// Where a backend's cells live: its cgroup group, its uids and its directory.
pub struct CellHost {
    cgroups: CgroupLayout,
    slots: Mutex<UidSlots>,
    capacity: u32,
    uid_base: u32,
    dir: PathBuf,
}

impl CellHost {
    /// Finds the cgroup layout (`cgroup_name` under the daemon's own cgroup), creates
    /// `dir` (0700; its parent 0755 if missing) and removes what an earlier run of the same configuration left in
    /// both: its processes, cgroups and directories.
    pub fn new(
        cgroup_name: &str,
        dir: PathBuf,
        uid_base: u32,
        capacity: u32,
    ) -> Result<Self, CellError> {
        if cgroup_name.is_empty()
            || cgroup_name.starts_with('.')
            || !cgroup_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(CellError::CgroupName(cgroup_name.to_owned()));
        }
        // A host account in the range could signal and trace the cells' processes, and a
        // cell would own that account's files.
        let range = uid_base..uid_base.saturating_add(capacity);
        for file in ["/etc/passwd", "/etc/group"] {
            if let Ok(text) = fs::read_to_string(file) {
                if let Some((name, id)) = super::account_in_range(&text, &range) {
                    return Err(CellError::UidRange {
                        file,
                        name,
                        id,
                        range,
                    });
                }
            }
        }
        let cgroups = CgroupLayout::discover(cgroup_name)?;
        // The parent (the daemon's run_dir) may hold other things, such as the API
        // socket: only created, 0755, if missing.
        if let Some(parent) = dir.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(io_err("creating", parent))?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .or_else(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(io_err("creating", &dir))?;
        // An existing directory too: the cells' directories are root's alone.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("restricting", &dir))?;
        let mut leftovers = Vec::new();
        for mut leaf in cgroups.stale_leaves() {
            tracing::warn!(cgroups = ?leaf.dirs(), "removing a cgroup left by an earlier run");
            if !teardown_cgroup_blocking(&mut leaf) {
                leftovers.push(format!("{:?}", leaf.dirs()));
            }
        }
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            tracing::warn!(dir = %entry.path().display(), "removing a directory left by an earlier run");
            if let Err(e) = fs::remove_dir_all(entry.path()) {
                leftovers.push(format!("{}: {e}", entry.path().display()));
            }
        }
        if !leftovers.is_empty() {
            return Err(CellError::Leftovers {
                id: "(earlier run)".to_owned(),
                leftovers: leftovers.join(", "),
            });
        }
        Ok(Self {
            cgroups,
            slots: Mutex::new(UidSlots::new(capacity)),
            capacity,
            uid_base,
            dir,
        })
    }

    pub fn cgroups(&self) -> &CgroupLayout {
        &self.cgroups
    }

    /// Reserves a uid and creates the cell's directory `<dir>/<id>` (0700). The id names
    /// a directory and a cgroup: 1..=63 characters of `[a-z0-9-]`.
    pub fn create(self: &Arc<Self>, id: &str) -> Result<Cell, CellError> {
        check_id(id)?;
        let slot = self
            .slots
            .lock()
            .expect("slot lock")
            .alloc()
            .ok_or(CellError::NoFreeUid(self.capacity))?;
        let mut cell = Cell {
            id: id.to_owned(),
            dir: self.dir.join(id),
            child: None,
            leaf: None,
            slot: Some(slot),
            host: Arc::clone(self),
            torn_down: false,
        };
        match fs::DirBuilder::new().mode(0o700).create(&cell.dir) {
            Ok(()) => Ok(cell),
            Err(e) => {
                // The directory may belong to a live cell of that id: left alone.
                cell.dir = PathBuf::new();
                cell.release_slot();
                cell.torn_down = true;
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Err(CellError::Exists(id.to_owned()))
                } else {
                    Err(io_err("creating", &self.dir.join(id))(e))
                }
            }
        }
    }
}

/// One sandbox's host resources. Call [`Cell::teardown`]; dropping it instead tears it
/// down synchronously (blocking for up to a few seconds).
pub struct Cell {
    id: String,
    dir: PathBuf,
    child: Option<Child>,
    leaf: Option<CgroupLeaf>,
    slot: Option<u32>,
    host: Arc<CellHost>,
    torn_down: bool,
}

impl Cell {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cell's private host directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The uid (and gid) of every process in the cell.
    pub fn uid(&self) -> Option<u32> {
        self.slot.map(|s| self.host.uid_base + s)
    }

    pub fn child(&self) -> Option<&Child> {
        self.child.as_ref()
    }

    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    pub fn leaf(&self) -> Option<&CgroupLeaf> {
        self.leaf.as_ref()
    }

    /// Creates the cell's cgroup leaf with `limits`; returns its `cgroup.procs` files.
    pub fn create_leaf(&mut self, limits: &SandboxLimits) -> Result<Vec<PathBuf>, CellError> {
        let leaf = self.host.cgroups.create_leaf(&self.id, limits)?;
        let procs = leaf.procs_files();
        self.leaf = Some(leaf);
        Ok(procs)
    }

    /// Starts `<binary> <helper> <id>` in a session of its own with an empty environment,
    /// `fds` (descriptor, number in the child) and the status pipe ([`STATUS_FD`]) in
    /// place, its output copied into the daemon's log and `spec` on its stdin; then waits
    /// up to `timeout` for the status pipe to close: without a word when setup succeeded,
    /// after the helper's error message when it failed.
    pub async fn launch(
        &mut self,
        binary: &Path,
        helper: &str,
        fds: &[(OwnedFd, i32)],
        spec: &[u8],
        timeout: Duration,
    ) -> Result<(), CellError> {
        let dir = self.dir.clone();
        let (status_r, status_w) =
            cloexec_pipe().map_err(io_err("creating the status pipe for", &dir))?;
        // Moved to descriptors >= 10 first, so the dup2 calls below cannot overwrite each
        // other; close-on-exec keeps them out of any other child started meanwhile.
        let mut moves = Vec::with_capacity(fds.len() + 1);
        for (fd, target) in fds
            .iter()
            .map(|(fd, t)| (fd.as_raw_fd(), *t))
            .chain([(status_w.as_raw_fd(), STATUS_FD)])
        {
            moves.push((
                dup_high(fd).map_err(io_err("duplicating a descriptor for", &dir))?,
                target,
            ));
        }
        drop(status_w);
        let raw: Vec<(i32, i32)> = moves.iter().map(|(fd, t)| (fd.as_raw_fd(), *t)).collect();
        let mut cmd = Command::new(binary);
        cmd.arg(helper)
            .arg(&self.id)
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let daemon = std::process::id() as libc::pid_t;
        // SAFETY: the closure only calls async-signal-safe functions (dup2, setsid, prctl,
        // getppid) on descriptors that stay open in the parent until spawn returns; `raw`
        // was allocated before fork.
        unsafe {
            cmd.pre_exec(move || {
                for &(fd, target) in &raw {
                    if libc::dup2(fd, target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // If the daemon dies (even of SIGKILL), the helper gets SIGTERM and takes
                // its sandbox or VM down, as on a destroy. The signal follows the thread
                // that forked: a tokio worker or the main thread, both of which live as
                // long as the daemon's runtime. Checked after arming, in case the daemon
                // died in between.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != daemon {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(io_err("starting", binary))?;
        drop(moves);
        tracing::debug!(id = %self.id, pid = child.id(), uid = self.uid(), helper, "init helper started");
        let stdin = child.stdin.take();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_log(self.id.clone(), "stdout", out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_log(self.id.clone(), "stderr", err));
        }
        self.child = Some(child);
        if let Some(mut stdin) = stdin {
            stdin
                .write_all(spec)
                .await
                .map_err(io_err("writing the spec to the init helper of", &dir))?;
        }

        let mut status = tokio::net::unix::pipe::Receiver::from_owned_fd(status_r)
            .map_err(io_err("watching the status pipe of", &dir))?;
        let mut message = String::new();
        let failed = |message: String| CellError::Init {
            helper: helper.to_owned(),
            id: self.id.clone(),
            message,
        };
        match tokio::time::timeout(timeout, status.read_to_string(&mut message)).await {
            Err(_) => Err(failed(format!("not ready after {timeout:?}"))),
            Ok(Err(e)) => Err(io_err("reading the status pipe of", &dir)(e)),
            Ok(Ok(_)) if !message.is_empty() => Err(failed(message)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    fn release_slot(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.host.slots.lock().expect("slot lock").free(slot);
        }
    }

    /// Kills every process of the cell and removes its cgroup and host directory.
    /// Whatever could not be removed is logged and returned.
    pub async fn teardown(&mut self) -> Result<(), CellError> {
        self.torn_down = true;
        if let Some(mut child) = self.child.take() {
            // On SIGTERM the init helper kills and reaps PID 1, whose death ends every
            // process of the pid namespace. SIGKILL is the fallback: PID 1 then dies of
            // PDEATHSIG, reaped by the host's init.
            terminate(&child);
            if tokio::time::timeout(TERM_GRACE, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(id = %self.id, "init helper ignored SIGTERM: killing it");
                let _ = child.start_kill();
                if tokio::time::timeout(TEARDOWN_TIMEOUT, child.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(id = %self.id, "init helper did not exit after SIGKILL");
                }
            }
        }
        let mut leftovers = Vec::new();
        if let Some(mut leaf) = self.leaf.take() {
            let (leaf, gone) = tokio::task::spawn_blocking(move || {
                let gone = teardown_cgroup_blocking(&mut leaf);
                (leaf, gone)
            })
            .await
            .expect("cgroup teardown task");
            if !gone {
                leftovers.push(format!("cgroups {:?}", leaf.dirs()));
            }
        }
        self.finish(leftovers)
    }

    /// [`Cell::teardown`] without an async runtime, for drop.
    pub fn teardown_blocking(&mut self) {
        self.torn_down = true;
        if let Some(mut child) = self.child.take() {
            let exited = |child: &mut Child, within: Duration| {
                let deadline = std::time::Instant::now() + within;
                loop {
                    if !matches!(child.try_wait(), Ok(None)) {
                        return true;
                    }
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            };
            terminate(&child);
            if !exited(&mut child, TERM_GRACE) {
                let _ = child.start_kill();
                exited(&mut child, TEARDOWN_TIMEOUT);
            }
        }
        let mut leftovers = Vec::new();
        if let Some(mut leaf) = self.leaf.take() {
            if !teardown_cgroup_blocking(&mut leaf) {
                leftovers.push(format!("cgroups {:?}", leaf.dirs()));
            }
        }
        let _ = self.finish(leftovers);
    }

    fn finish(&mut self, mut leftovers: Vec<String>) -> Result<(), CellError> {
        if leftovers.is_empty() {
            // Only now is no process of that uid left: the uid may be reused.
            self.release_slot();
        } else {
            tracing::warn!(id = %self.id, uid = ?self.uid(), "uid kept out of use: processes may remain");
        }
        if !self.dir.as_os_str().is_empty() {
            match fs::remove_dir_all(&self.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => leftovers.push(format!("{}: {e}", self.dir.display())),
            }
        }
        if leftovers.is_empty() {
            tracing::info!(id = %self.id, "destroyed");
            Ok(())
        } else {
            let leftovers = leftovers.join(", ");
            tracing::warn!(id = %self.id, %leftovers, "not fully removed");
            Err(CellError::Leftovers {
                id: self.id.clone(),
                leftovers,
            })
        }
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        if !self.torn_down {
            tracing::warn!(id = %self.id, "dropped without teardown: tearing it down");
            self.teardown_blocking();
        }
    }
}
