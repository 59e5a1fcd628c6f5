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
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::process::Child;

use cell::{Cell, CellError, CellHost};
use cgroup::CgroupLeaf;
use spec::{InitSpec, LISTEN_FD};

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
    #[error(transparent)]
    Cell(#[from] CellError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("jail-init for sandbox {id} failed: {message}")]
    Init { id: String, message: String },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JailError {
    let path = path.to_owned();
    move |source| JailError::Io { what, path, source }
}

struct Shared {
    cfg: JailConfig,
    cells: Arc<CellHost>,
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
        if cfg.uid_base == 0 || cfg.uid_base.checked_add(MAX_SANDBOXES).is_none() {
            return Err(JailError::Config(format!(
                "uid_base {} must be > 0 and leave room for {MAX_SANDBOXES} uids",
                cfg.uid_base
            )));
        }
        let cells = CellHost::new(
            &cfg.cgroup_name,
            cfg.run_dir.join("sandboxes"),
            cfg.uid_base,
            MAX_SANDBOXES,
        )?;
        Ok(Self {
            shared: Arc::new(Shared {
                cfg,
                cells: Arc::new(cells),
            }),
        })
    }

    /// Removes the backend's cgroup parents; call after every sandbox was
    /// destroyed.
    pub fn shutdown(&self) {
        self.shared.cells.cgroups().remove_groups();
    }

    /// One line saying how sandboxes are isolated, for the API and the CLI.
    pub fn isolation(&self) -> String {
        let cgroups = self.shared.cells.cgroups();
        let cpu = if cgroups.has_cpu() {
            ""
        } else {
            " (no cpu quota)"
        };
        format!(
            "jail: namespaces(mnt,pid,net,uts,ipc,cgroup)+seccomp+cgroup {}{cpu}; no hardware virtualization",
            cgroups.version()
        )
    }

    /// Starts a sandbox. Returns once the agent has been exec'd inside it,
    /// listening on [`JailSandbox::agent_socket`]; the caller then polls the
    /// agent's health over that socket.
    pub async fn spawn(&self, spec: JailSpec) -> Result<JailSandbox, JailError> {
        validate_spec(&spec)?;
        let cell = self.shared.cells.create(&spec.sandbox_id)?;
        let mut sandbox = JailSandbox {
            socket: cell.dir().join("agent.sock"),
            cell,
        };
        match self.start(&mut sandbox, &spec).await {
            Ok(()) => Ok(sandbox),
            Err(e) => {
                if let Err(cleanup) = sandbox.cell.teardown().await {
                    tracing::warn!(sandbox = %spec.sandbox_id, error = %cleanup, "cleanup after a failed spawn");
                }
                Err(e)
            }
        }
    }

    async fn start(&self, sandbox: &mut JailSandbox, spec: &JailSpec) -> Result<(), JailError> {
        let cfg = &self.shared.cfg;
        let cell = &mut sandbox.cell;
        let id = cell.id().to_owned();
        let uid = cell.uid().expect("a new cell has a uid");
        let staging = cell.dir().join("root");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(io_err("creating", &staging))?;
        let listener =
            UnixListener::bind(&sandbox.socket).map_err(io_err("binding", &sandbox.socket))?;
        let init_spec = InitSpec {
            sandbox_id: id.clone(),
            rootfs: cfg.rootfs.clone(),
            agent_binary: cfg.agent_binary.clone(),
            staging_dir: staging,
            uid,
            gid: uid,
            cgroup_procs: cell.create_leaf(&spec.limits)?,
            disk_bytes: spec.limits.disk_bytes,
            env: agent_env(&spec.env),
        };
        let json = serde_json::to_vec(&init_spec).expect("spec serializes");
        let fds = [(OwnedFd::from(listener), LISTEN_FD)];
        cell.launch(&cfg.init_binary, "jail-init", &fds, &json, SETUP_TIMEOUT)
            .await?;
        // The pipe also closes when jail-init dies before reporting.
        if !sandbox.is_alive() {
            return Err(JailError::Init {
                id,
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
    if cell::check_id(id).is_err() {
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
    cell: Cell,
    socket: PathBuf,
}

impl std::fmt::Debug for JailSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JailSandbox")
            .field("id", &self.cell.id())
            .field("socket", &self.socket)
            .field("uid", &self.uid())
            .finish()
    }
}

impl JailSandbox {
    pub fn id(&self) -> &str {
        self.cell.id()
    }

    /// Host path of the agent's listening socket.
    pub fn agent_socket(&self) -> &Path {
        &self.socket
    }

    /// Whether jail-init (and so the sandbox) is still running.
    pub fn is_alive(&mut self) -> bool {
        self.cell
            .child_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Private memory of the sandbox (anonymous + tmpfs + kernel), from its
    /// cgroup; the shared file cache of the rootfs is not counted.
    pub fn memory_private_bytes(&self) -> Option<u64> {
        self.cell.leaf()?.memory_private_bytes()
    }

    /// The uid every process of the sandbox runs as.
    pub fn uid(&self) -> Option<u32> {
        self.cell.uid()
    }

    /// The sandbox's cgroup directories (one per hierarchy), for tests and
    /// diagnostics.
    #[allow(dead_code)]
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cell.leaf().map(CgroupLeaf::dirs).unwrap_or_default()
    }

    /// Kills every process of the sandbox and removes its cgroup and host
    /// directory. Whatever could not be removed is logged and returned.
    pub async fn destroy(mut self) -> Result<(), JailError> {
        Ok(self.cell.teardown().await?)
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
