//! The jail backend: each sandbox is a process tree in fresh mount, pid, net,
//! uts, ipc and cgroup namespaces, pivot_root'ed into an overlay of the guest
//! rootfs, as an unprivileged per-sandbox uid under seccomp, in its own
//! cgroup leaf. See docs/architecture.md, "Jail backend".
//!
//! The daemon side (this module) prepares the host directory, the agent's
//! listening socket and the cgroup leaf, then starts `sessiond jail-init`
//! ([`init`]), which builds the sandbox and execs the agent.

pub(crate) mod cgroup;
pub mod init;
pub(crate) mod loopback;
pub(crate) mod privileges;
pub(crate) mod rootfs;
mod seccomp;
mod slots;
pub(crate) mod spec;
// Shared with the jailed VMM (crate::vmm_jail); the sandboxes here can move onto them.
pub(crate) mod cell;
pub(crate) mod pid1;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use cgroup::{CgroupError, CgroupLayout, CgroupLeaf};
use slots::UidSlots;
use spec::{InitSpec, LISTEN_FD, STATUS_FD};

/// First uid (and gid) given to sandboxes; sandbox `n` runs as `base + n`.
pub const DEFAULT_UID_BASE: u32 = 200_000;
/// At most this many sandboxes (and uids) at once per backend.
pub const MAX_SANDBOXES: u32 = 65_536;
/// Name of the cgroup directory, under the daemon's own cgroup, that holds
/// one leaf per sandbox.
pub const DEFAULT_CGROUP_NAME: &str = "sessiond-sandboxes";
/// How long jail-init may take to build a sandbox and exec the agent.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long destroy waits for the last processes to leave the cgroup.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long jail-init gets to kill and reap PID 1 after SIGTERM.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// Longest line of sandbox output copied into the daemon's log.
const MAX_LOG_LINE: usize = 4096;

#[derive(Debug, Clone)]
pub struct JailConfig {
    /// Guest root filesystem directory: the overlay's read-only lower layer.
    pub rootfs: PathBuf,
    /// Host path of `sessiond-agent`, bound read-only into every sandbox.
    pub agent_binary: PathBuf,
    /// Host directory (created 0755 if missing, never chmod-ed); the backend
    /// owns `sandboxes/` under it (0700), one directory per sandbox.
    pub run_dir: PathBuf,
    /// First sandbox uid/gid.
    pub uid_base: u32,
    /// Binary started as `<init_binary> jail-init <id>`: the sessiond binary.
    /// `/proc/self/exe` (the default) is the running daemon, even if its
    /// file was replaced by an upgrade.
    pub init_binary: PathBuf,
    /// Directory name of the sandboxes' cgroups under the daemon's own
    /// cgroup; two backends in one cgroup need different names.
    pub cgroup_name: String,
}

impl JailConfig {
    /// A configuration with the defaults for everything else.
    pub fn new(rootfs: PathBuf, agent_binary: PathBuf, run_dir: PathBuf) -> Self {
        Self {
            rootfs,
            agent_binary,
            run_dir,
            uid_base: DEFAULT_UID_BASE,
            init_binary: PathBuf::from("/proc/self/exe"),
            cgroup_name: DEFAULT_CGROUP_NAME.to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Memory (RAM + tmpfs + kernel), no swap. Must be > 0.
    pub memory_bytes: u64,
    /// CPU quota in thousandths of a core; 0 means no quota.
    pub cpu_millicores: u32,
    /// Processes and threads. Must be > 0.
    pub pids_max: u32,
    /// Size of the writable layer (overlay upper + /mnt/data). Must be > 0.
    pub disk_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct JailSpec {
    /// `[a-z0-9-]`, 1..=63 characters, unique among live sandboxes.
    pub sandbox_id: String,
    pub limits: SandboxLimits,
    /// Extra environment of the agent (overrides the defaults).
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Error)]
pub enum JailError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid sandbox spec: {0}")]
    Spec(String),
    #[error("cgroup")]
    Cgroup(#[from] CgroupError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("all {0} sandbox uids are in use")]
    NoFreeUid(u32),
    #[error("sandbox {0} already exists")]
    Exists(String),
    #[error("starting jail-init {path}")]
    Start {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("jail-init for sandbox {id} failed: {message}")]
    Init { id: String, message: String },
    #[error("sandbox {id} was not fully removed: {leftovers}")]
    Leftovers { id: String, leftovers: String },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JailError {
    let path = path.to_owned();
    move |source| JailError::Io { what, path, source }
}

struct Shared {
    cfg: JailConfig,
    cgroups: CgroupLayout,
    slots: Mutex<UidSlots>,
    sandboxes_dir: PathBuf,
}

/// Starts and destroys jail sandboxes. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct JailBackend {
    shared: Arc<Shared>,
}

/// Characters that would break the overlay mount options or paths.
fn check_path(what: &str, path: &Path) -> Result<(), JailError> {
    let s = path
        .to_str()
        .ok_or_else(|| JailError::Config(format!("{what} {} is not UTF-8", path.display())))?;
    if !path.is_absolute() || s.contains([',', ':', '\\', '\n']) {
        return Err(JailError::Config(format!(
            "{what} {s} must be absolute and contain no ',', ':', '\\' or newline"
        )));
    }
    Ok(())
}

fn create_private_dir(path: &Path) -> Result<(), JailError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err("creating", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .map_err(io_err("restricting", path))
}

impl JailBackend {
    /// Checks the configuration, finds the cgroup layout and removes what an
    /// earlier run of the same configuration left behind (its sandboxes'
    /// processes, cgroups and directories).
    pub fn new(cfg: JailConfig) -> Result<Self, JailError> {
        check_path("rootfs", &cfg.rootfs)?;
        check_path("run_dir", &cfg.run_dir)?;
        if !cfg.rootfs.join("usr/bin").is_dir() {
            return Err(JailError::Config(format!(
                "rootfs {} is not a root filesystem (no usr/bin); build it with scripts/build-rootfs",
                cfg.rootfs.display()
            )));
        }
        if !cfg.agent_binary.is_file() {
            return Err(JailError::Config(format!(
                "agent binary {} does not exist",
                cfg.agent_binary.display()
            )));
        }
        if cfg.cgroup_name.is_empty()
            || !cfg
                .cgroup_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            || cfg.cgroup_name.starts_with('.')
        {
            return Err(JailError::Config(format!(
                "cgroup name {:?} must be [A-Za-z0-9._-] and not start with '.'",
                cfg.cgroup_name
            )));
        }
        if cfg.uid_base == 0 || cfg.uid_base.checked_add(MAX_SANDBOXES).is_none() {
            return Err(JailError::Config(format!(
                "uid_base {} must be > 0 and leave room for {MAX_SANDBOXES} uids",
                cfg.uid_base
            )));
        }
        // A host account in the range could signal and trace sandboxed
        // processes, and a sandbox would own that account's files.
        let range = cfg.uid_base..cfg.uid_base + MAX_SANDBOXES;
        for file in ["/etc/passwd", "/etc/group"] {
            if let Ok(text) = fs::read_to_string(file) {
                if let Some((name, id)) = account_in_range(&text, &range) {
                    return Err(JailError::Config(format!(
                        "{file} has {name:?} with id {id}, inside the sandbox uid range {}..{}: choose another uid_base",
                        range.start, range.end
                    )));
                }
            }
        }
        let cgroups = CgroupLayout::discover(&cfg.cgroup_name)?;
        let sandboxes_dir = cfg.run_dir.join("sandboxes");
        // run_dir may hold other things (the API socket): only create it.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&cfg.run_dir)
            .map_err(io_err("creating", &cfg.run_dir))?;
        create_private_dir(&sandboxes_dir)?;

        let mut leftovers = Vec::new();
        for mut leaf in cgroups.stale_leaves() {
            tracing::warn!(cgroups = ?leaf.dirs(), "removing a sandbox cgroup left by an earlier run");
            if !teardown_cgroup_blocking(&mut leaf) {
                leftovers.push(format!("{:?}", leaf.dirs()));
            }
        }
        if let Ok(entries) = fs::read_dir(&sandboxes_dir) {
            for entry in entries.flatten() {
                tracing::warn!(dir = %entry.path().display(), "removing a sandbox directory left by an earlier run");
                if let Err(e) = fs::remove_dir_all(entry.path()) {
                    leftovers.push(format!("{}: {e}", entry.path().display()));
                }
            }
        }
        if !leftovers.is_empty() {
            return Err(JailError::Leftovers {
                id: "(earlier run)".to_owned(),
                leftovers: leftovers.join(", "),
            });
        }
        Ok(Self {
            shared: Arc::new(Shared {
                slots: Mutex::new(UidSlots::new(MAX_SANDBOXES)),
                cfg,
                cgroups,
                sandboxes_dir,
            }),
        })
    }

    /// One line saying how sandboxes are isolated, for the API and the CLI.
    pub fn isolation(&self) -> String {
        let cpu = if self.shared.cgroups.has_cpu() {
            ""
        } else {
            " (no cpu quota)"
        };
        format!(
            "jail: namespaces(mnt,pid,net,uts,ipc,cgroup)+seccomp+cgroup {}{cpu}; no hardware virtualization",
            self.shared.cgroups.version()
        )
    }

    /// Starts a sandbox. Returns once the agent has been exec'd inside it,
    /// listening on [`JailSandbox::agent_socket`]; the caller then polls the
    /// agent's health over that socket.
    pub async fn spawn(&self, spec: JailSpec) -> Result<JailSandbox, JailError> {
        let id = spec.sandbox_id.clone();
        validate_spec(&spec)?;
        let slot = self
            .shared
            .slots
            .lock()
            .expect("slot lock")
            .alloc()
            .ok_or(JailError::NoFreeUid(MAX_SANDBOXES))?;
        let mut sandbox = JailSandbox {
            socket: self.shared.sandboxes_dir.join(&id).join("agent.sock"),
            host_dir: self.shared.sandboxes_dir.join(&id),
            id,
            child: None,
            leaf: None,
            slot: Some(slot),
            shared: self.shared.clone(),
            torn_down: false,
        };
        match self.start(&mut sandbox, &spec, slot).await {
            Ok(()) => Ok(sandbox),
            Err(e) => {
                if !matches!(e, JailError::Exists(_)) {
                    if let Err(cleanup) = sandbox.teardown().await {
                        tracing::warn!(sandbox = %sandbox.id, error = %cleanup, "cleanup after a failed spawn");
                    }
                } else {
                    // The directory belongs to the live sandbox of that id.
                    sandbox.host_dir = PathBuf::new();
                    sandbox.release_slot();
                    sandbox.torn_down = true;
                }
                Err(e)
            }
        }
    }

    async fn start(
        &self,
        sandbox: &mut JailSandbox,
        spec: &JailSpec,
        slot: u32,
    ) -> Result<(), JailError> {
        let cfg = &self.shared.cfg;
        let id = &sandbox.id.clone();
        match fs::DirBuilder::new().mode(0o700).create(&sandbox.host_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(JailError::Exists(id.clone()))
            }
            Err(e) => return Err(io_err("creating", &sandbox.host_dir)(e)),
        }
        let staging = sandbox.host_dir.join("root");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(io_err("creating", &staging))?;
        let listener =
            UnixListener::bind(&sandbox.socket).map_err(io_err("binding", &sandbox.socket))?;

        sandbox.leaf = Some(self.shared.cgroups.create_leaf(id, &spec.limits)?);
        let leaf = sandbox.leaf.as_ref().expect("just set");

        let uid = cfg.uid_base + slot;
        let init_spec = InitSpec {
            sandbox_id: id.clone(),
            rootfs: cfg.rootfs.clone(),
            agent_binary: cfg.agent_binary.clone(),
            staging_dir: staging,
            uid,
            gid: uid,
            cgroup_procs: leaf.procs_files(),
            disk_bytes: spec.limits.disk_bytes,
            env: agent_env(&spec.env),
        };
        let json = serde_json::to_vec(&init_spec).expect("spec serializes");

        // Moved to descriptors >= 10 first, so the dup2 calls below cannot
        // overwrite each other; close-on-exec keeps them out of any other
        // child the daemon starts meanwhile.
        let listen_high =
            dup_high(listener.as_raw_fd()).map_err(io_err("duplicating", &sandbox.socket))?;
        drop(listener);
        let (status_r, status_w) =
            cloexec_pipe().map_err(io_err("creating the status pipe for", &sandbox.host_dir))?;
        let status_high = dup_high(status_w.as_raw_fd())
            .map_err(io_err("duplicating the status pipe for", &sandbox.host_dir))?;
        drop(status_w);
        let (listen_raw, status_raw) = (listen_high.as_raw_fd(), status_high.as_raw_fd());

        let mut cmd = Command::new(&cfg.init_binary);
        cmd.arg("jail-init")
            .arg(id)
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // SAFETY: the closure only calls async-signal-safe functions (dup2,
        // setsid) on descriptors that stay open in the parent until spawn
        // returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(listen_raw, LISTEN_FD) < 0
                    || libc::dup2(status_raw, STATUS_FD) < 0
                    || libc::setsid() < 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| JailError::Start {
            path: cfg.init_binary.clone(),
            source,
        })?;
        drop(listen_high);
        drop(status_high);
        tracing::debug!(sandbox = %id, pid = child.id(), uid, "jail-init started");

        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        sandbox.child = Some(child);
        if let Some(out) = stdout {
            tokio::spawn(forward_log(id.clone(), "stdout", out));
        }
        if let Some(err) = stderr {
            tokio::spawn(forward_log(id.clone(), "stderr", err));
        }
        if let Some(mut stdin) = stdin {
            stdin.write_all(&json).await.map_err(io_err(
                "writing the spec to jail-init of",
                &sandbox.host_dir,
            ))?;
        }

        let mut status = tokio::net::unix::pipe::Receiver::from_owned_fd(status_r)
            .map_err(io_err("watching the status pipe of", &sandbox.host_dir))?;
        let mut message = String::new();
        let read = tokio::time::timeout(SETUP_TIMEOUT, status.read_to_string(&mut message)).await;
        match read {
            Err(_) => {
                return Err(JailError::Init {
                    id: id.clone(),
                    message: format!("no agent after {SETUP_TIMEOUT:?}"),
                })
            }
            Ok(Err(e)) => return Err(io_err("reading the status pipe of", &sandbox.host_dir)(e)),
            Ok(Ok(_)) if !message.is_empty() => {
                return Err(JailError::Init {
                    id: id.clone(),
                    message,
                })
            }
            Ok(Ok(_)) => {}
        }
        // The pipe also closes when jail-init dies before reporting.
        if !sandbox.is_alive() {
            return Err(JailError::Init {
                id: id.clone(),
                message: "jail-init exited before starting the agent (see its log)".to_owned(),
            });
        }
        tracing::info!(sandbox = %id, uid, "sandbox started");
        Ok(())
    }
}

/// The first entry of a passwd- or group-format file whose id (third
/// field) falls in `range`.
fn account_in_range(text: &str, range: &std::ops::Range<u32>) -> Option<(String, u32)> {
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?.parse::<u32>().ok()?;
        range.contains(&id).then(|| (name.to_owned(), id))
    })
}

fn validate_spec(spec: &JailSpec) -> Result<(), JailError> {
    let id = &spec.sandbox_id;
    if id.is_empty()
        || id.len() > 63
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(JailError::Spec(format!(
            "sandbox id {id:?} must be 1..=63 characters of [a-z0-9-]"
        )));
    }
    let l = &spec.limits;
    if l.memory_bytes == 0 || l.pids_max == 0 || l.disk_bytes == 0 {
        return Err(JailError::Spec(format!(
            "memory, pids and disk limits must be > 0, got {l:?}"
        )));
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(JailError::Spec(format!("invalid environment entry {k:?}")));
        }
    }
    Ok(())
}

/// The agent's environment: fixed defaults, overridden by the spec's.
fn agent_env(extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("HOME", rootfs::HOME),
        ("LANG", "C.UTF-8"),
        ("MPLBACKEND", "Agg"),
        // Pre-built font cache from the image (guest-image/rootfs-setup.sh);
        // writable per sandbox through the overlay.
        ("MPLCONFIGDIR", "/usr/lib/sessiond/mpl"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in extra {
        env.insert(k.clone(), v.clone());
    }
    env.into_iter().collect()
}

fn dup_high(fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// A pipe whose ends are close-on-exec: (read, write).
fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Copies jail-init's and the agent's output into the daemon's log.
///
/// The pipe is writable from inside the sandbox (the agent's stderr is
/// inherited by its Python interpreter), so its content is hostile: lines are
/// cut at [`MAX_LOG_LINE`] without ever buffering more, and at most
/// [`LOG_BURST`] bytes plus [`LOG_BYTES_PER_SEC`] per second reach the log;
/// the rest is read and counted, so a writer can neither exhaust the daemon's
/// memory nor flood its log, and never blocks on a full pipe.
async fn forward_log(id: String, stream: &'static str, mut out: impl tokio::io::AsyncRead + Unpin) {
    let mut lines = LogLines::new(LogBudget::new(tokio::time::Instant::now()));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match out.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        lines.feed(&buf[..n], tokio::time::Instant::now(), |line| {
            tracing::info!(sandbox = %id, stream, "{line}");
        });
    }
    lines.finish(|line| tracing::info!(sandbox = %id, stream, "{line}"));
}

/// Control characters (terminal escapes, carriage returns) in sandbox output
/// would act on whoever reads the log in a terminal: shown escaped instead.
fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Bytes of sandbox output logged in a burst before the rate applies.
const LOG_BURST: u64 = 256 * 1024;
/// Sustained rate of sandbox output copied into the daemon's log.
const LOG_BYTES_PER_SEC: u64 = 16 * 1024;

/// Token bucket over logged bytes.
struct LogBudget {
    tokens: u64,
    last: tokio::time::Instant,
    dropped: u64,
}

impl LogBudget {
    fn new(now: tokio::time::Instant) -> Self {
        Self {
            tokens: LOG_BURST,
            last: now,
            dropped: 0,
        }
    }

    /// Whether a line of `len` bytes may be logged now; counts it otherwise.
    fn take(&mut self, len: u64, now: tokio::time::Instant) -> bool {
        let refill =
            now.saturating_duration_since(self.last).as_millis() as u64 * LOG_BYTES_PER_SEC / 1000;
        if refill > 0 {
            self.tokens = (self.tokens + refill).min(LOG_BURST);
            self.last = now;
        }
        if self.tokens >= len {
            self.tokens -= len;
            true
        } else {
            self.dropped += len;
            false
        }
    }
}

/// Splits a byte stream into log lines of at most [`MAX_LOG_LINE`] bytes,
/// holding no more than that.
struct LogLines {
    line: Vec<u8>,
    /// The current line was cut: skip to its end.
    truncated: bool,
    budget: LogBudget,
}

impl LogLines {
    fn new(budget: LogBudget) -> Self {
        Self {
            line: Vec::with_capacity(256),
            truncated: false,
            budget,
        }
    }

    fn feed(&mut self, mut data: &[u8], now: tokio::time::Instant, mut emit: impl FnMut(&str)) {
        while !data.is_empty() {
            let (chunk, end) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], Some(i + 1)),
                None => (data, None),
            };
            if !self.truncated {
                let room = MAX_LOG_LINE - self.line.len();
                self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if chunk.len() > room {
                    self.truncated = true;
                }
            }
            match end {
                Some(i) => {
                    self.emit(now, &mut emit);
                    data = &data[i..];
                }
                None => break,
            }
        }
    }

    fn emit(&mut self, now: tokio::time::Instant, emit: &mut impl FnMut(&str)) {
        let dropped_before = self.budget.dropped;
        if self.budget.take(self.line.len() as u64 + 1, now) {
            if dropped_before > 0 {
                emit(&format!(
                    "[sessiond: {dropped_before} bytes of sandbox output not logged: rate limit]"
                ));
                self.budget.dropped = 0;
            }
            let text = String::from_utf8_lossy(&self.line);
            let cut = if self.truncated { " [line cut]" } else { "" };
            emit(&format!("{}{cut}", escape_controls(text.trim_end())));
        }
        self.line.clear();
        self.truncated = false;
    }

    /// Logs what is left when the stream ends.
    fn finish(mut self, mut emit: impl FnMut(&str)) {
        let now = tokio::time::Instant::now();
        if !self.line.is_empty() || self.truncated {
            self.emit(now, &mut emit);
        }
        if self.budget.dropped > 0 {
            emit(&format!(
                "[sessiond: {} bytes of sandbox output not logged: rate limit]",
                self.budget.dropped
            ));
        }
    }
}

/// Asks jail-init to end the sandbox (see [`init`]).
fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// Kills what is left in a cgroup leaf and removes it, waiting up to
/// [`TEARDOWN_TIMEOUT`]; true when it is gone.
fn teardown_cgroup_blocking(leaf: &mut CgroupLeaf) -> bool {
    let deadline = std::time::Instant::now() + TEARDOWN_TIMEOUT;
    loop {
        leaf.kill_all();
        if leaf.is_empty() && leaf.try_remove() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running sandbox. Call [`JailSandbox::destroy`]; dropping it instead
/// tears it down synchronously (blocking for up to a few seconds).
pub struct JailSandbox {
    id: String,
    socket: PathBuf,
    host_dir: PathBuf,
    child: Option<Child>,
    leaf: Option<CgroupLeaf>,
    slot: Option<u32>,
    shared: Arc<Shared>,
    torn_down: bool,
}

impl std::fmt::Debug for JailSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JailSandbox")
            .field("id", &self.id)
            .field("socket", &self.socket)
            .field("uid", &self.uid())
            .finish()
    }
}

impl JailSandbox {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Host path of the agent's listening socket.
    pub fn agent_socket(&self) -> &Path {
        &self.socket
    }

    /// Whether jail-init (and so the sandbox) is still running.
    pub fn is_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Private memory of the sandbox (anonymous + tmpfs + kernel), from its
    /// cgroup; the shared file cache of the rootfs is not counted.
    pub fn memory_private_bytes(&self) -> Option<u64> {
        self.leaf.as_ref()?.memory_private_bytes()
    }

    /// The uid every process of the sandbox runs as.
    pub fn uid(&self) -> Option<u32> {
        self.slot.map(|s| self.shared.cfg.uid_base + s)
    }

    /// The sandbox's cgroup directories (one per hierarchy), for tests and
    /// diagnostics.
    #[allow(dead_code)]
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.leaf.as_ref().map(CgroupLeaf::dirs).unwrap_or_default()
    }

    /// Kills every process of the sandbox and removes its cgroup and host
    /// directory. Whatever could not be removed is logged and returned.
    pub async fn destroy(mut self) -> Result<(), JailError> {
        self.teardown().await
    }

    fn release_slot(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.shared.slots.lock().expect("slot lock").free(slot);
        }
    }

    async fn teardown(&mut self) -> Result<(), JailError> {
        self.torn_down = true;
        if let Some(mut child) = self.child.take() {
            // On SIGTERM jail-init kills and reaps PID 1, whose death ends
            // every process of the pid namespace. SIGKILL is the fallback:
            // PID 1 then dies of PDEATHSIG, reaped by the host's init.
            terminate(&child);
            if tokio::time::timeout(TERM_GRACE, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(sandbox = %self.id, "jail-init ignored SIGTERM: killing it");
                let _ = child.start_kill();
                if tokio::time::timeout(TEARDOWN_TIMEOUT, child.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(sandbox = %self.id, "jail-init did not exit after SIGKILL");
                }
            }
        }
        let mut leftovers = Vec::new();
        if let Some(mut leaf) = self.leaf.take() {
            let deadline = tokio::time::Instant::now() + TEARDOWN_TIMEOUT;
            let gone = loop {
                leaf.kill_all();
                if leaf.is_empty() && leaf.try_remove() {
                    break true;
                }
                if tokio::time::Instant::now() >= deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            if !gone {
                leftovers.push(format!("cgroups {:?}", leaf.dirs()));
            }
        }
        if leftovers.is_empty() {
            // Only now is no process of that uid left: the uid may be reused.
            self.release_slot();
        } else {
            tracing::warn!(sandbox = %self.id, uid = ?self.uid(), "uid kept out of use: processes may remain");
        }
        if !self.host_dir.as_os_str().is_empty() {
            match fs::remove_dir_all(&self.host_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => leftovers.push(format!("{}: {e}", self.host_dir.display())),
            }
        }
        if leftovers.is_empty() {
            tracing::info!(sandbox = %self.id, "sandbox destroyed");
            Ok(())
        } else {
            let leftovers = leftovers.join(", ");
            tracing::warn!(sandbox = %self.id, %leftovers, "sandbox not fully removed");
            Err(JailError::Leftovers {
                id: self.id.clone(),
                leftovers,
            })
        }
    }

    fn teardown_blocking(&mut self) {
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
        let mut clean = true;
        if let Some(mut leaf) = self.leaf.take() {
            clean = teardown_cgroup_blocking(&mut leaf);
            if !clean {
                tracing::warn!(sandbox = %self.id, cgroups = ?leaf.dirs(), "sandbox cgroup not removed");
            }
        }
        if clean {
            self.release_slot();
        }
        if !self.host_dir.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.host_dir);
        }
    }
}

impl Drop for JailSandbox {
    fn drop(&mut self) {
        if !self.torn_down {
            tracing::warn!(sandbox = %self.id, "sandbox dropped without destroy: tearing it down");
            self.teardown_blocking();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_and_sandboxes_can_be_shared_across_tasks() {
        fn shared<T: Send + Sync>() {}
        shared::<JailBackend>();
        shared::<JailSandbox>();
    }

    #[test]
    fn spec_validation_refuses_bad_ids_limits_and_env() {
        let limits = SandboxLimits {
            memory_bytes: 1,
            cpu_millicores: 0,
            pids_max: 1,
            disk_bytes: 1,
        };
        let spec = |id: &str, env: Vec<(String, String)>| JailSpec {
            sandbox_id: id.to_owned(),
            limits,
            env,
        };
        assert!(validate_spec(&spec("pool-0123abcd", vec![])).is_ok());
        for bad in ["", "A", "a_b", "a/b", "..", &"a".repeat(64)] {
            assert!(validate_spec(&spec(bad, vec![])).is_err(), "{bad:?}");
        }
        for (k, v) in [("", "x"), ("A=B", "x"), ("K", "nul\0")] {
            let env = vec![(k.to_owned(), v.to_owned())];
            assert!(validate_spec(&spec("ok", env)).is_err(), "{k:?}");
        }
        let mut no_disk = spec("ok", vec![]);
        no_disk.limits.disk_bytes = 0;
        assert!(validate_spec(&no_disk).is_err());
    }

    #[test]
    fn sandbox_output_is_logged_in_bounded_lines() {
        let now = tokio::time::Instant::now();
        let mut lines = LogLines::new(LogBudget::new(now));
        let mut seen = Vec::new();
        // A hostile writer sends 64 MiB without a newline, then a short line.
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..64 {
            lines.feed(&chunk, now, |l| seen.push(l.to_owned()));
            assert!(lines.line.len() <= MAX_LOG_LINE);
        }
        lines.feed(b"\nshort\x1b[2J\r\tok\npartial", now, |l| {
            seen.push(l.to_owned())
        });
        lines.finish(|l| seen.push(l.to_owned()));
        assert_eq!(
            seen.len(),
            3,
            "{:?}",
            seen.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(seen[0].len(), MAX_LOG_LINE + " [line cut]".len());
        assert_eq!(seen[1], "short\\u{1b}[2J\\r\tok");
        assert_eq!(seen[2], "partial");
    }

    #[test]
    fn sandbox_output_beyond_the_rate_is_counted_not_logged() {
        let start = tokio::time::Instant::now();
        let mut lines = LogLines::new(LogBudget::new(start));
        let mut logged = 0usize;
        let line = [b'y'; 1023];
        let mut flood = Vec::new();
        for _ in 0..4096 {
            flood.extend_from_slice(&line);
            flood.push(b'\n');
        }
        lines.feed(&flood, start, |l| logged += l.len() + 1);
        assert!(logged as u64 <= LOG_BURST, "{logged}");
        assert!(lines.budget.dropped >= (4 << 20) - LOG_BURST);
        // A second later the rate allows more again, and the drop is reported.
        let mut later = Vec::new();
        lines.feed(b"after\n", start + Duration::from_secs(1), |l| {
            later.push(l.to_owned())
        });
        assert_eq!(later.len(), 2, "{later:?}");
        assert!(later[0].contains("not logged"), "{later:?}");
        assert_eq!(later[1], "after");
    }

    #[test]
    fn host_accounts_inside_the_sandbox_uid_range_are_found() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      nobody:x:65534:65534::/:/usr/sbin/nologin\n\
                      # comment\n\
                      alice:x:200007:100::/home/alice:/bin/sh\n";
        let range = DEFAULT_UID_BASE..DEFAULT_UID_BASE + MAX_SANDBOXES;
        assert_eq!(
            account_in_range(passwd, &range),
            Some(("alice".to_owned(), 200_007))
        );
        assert_eq!(account_in_range(passwd, &(300_000..365_536)), None);
        assert_eq!(account_in_range("", &range), None);
    }

    #[test]
    fn agent_env_has_defaults_that_the_spec_overrides() {
        let env = agent_env(&[("LANG".to_owned(), "de_DE.UTF-8".to_owned())]);
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("LANG"), Some("de_DE.UTF-8"));
        assert_eq!(get("HOME"), Some("/home/sandbox"));
        assert_eq!(get("MPLBACKEND"), Some("Agg"));
        assert_eq!(env.iter().filter(|(k, _)| k == "LANG").count(), 1);
    }
}
