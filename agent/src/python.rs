//! The session's persistent Python interpreter.
//!
//! One `python3` child runs `python/runner.py`; requests and replies travel
//! as length-prefixed JSON on two pipes that the child sees as fds 3 and 4,
//! never on stdout, so user output cannot forge a reply. Executions are
//! serialized by a mutex; the interpreter is restarted when it dies or has to
//! be killed, and the reply then says state was lost.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use crate::procs;
use crate::proto::{
    ExecStatus, PythonRequest, PythonResponse, DEFAULT_MAX_OUTPUT, DEFAULT_TIMEOUT_MS,
};

const RUNNER: &str = include_str!("python/runner.py");

/// What `python3 -c` runs: it reads the runner as the first frame on fd 3.
/// The runner then has a filename of its own (`<sessiond-runner>`), so its
/// frames can be told apart from user code's `exec` of strings, and `ps`
/// in the sandbox shows a short command line.
const BOOTSTRAP: &str = "import os
def _read(n):
    b = b''
    while len(b) < n:
        c = os.read(3, n - len(b))
        if not c:
            raise SystemExit(1)
        b += c
    return b
exec(compile(_read(int.from_bytes(_read(4), 'big')), '<sessiond-runner>', 'exec'))
";

/// How long a SIGINT'ed cell gets to return before the interpreter is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);
/// How long a fresh interpreter gets to say it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest reply accepted from the runner beyond the capped streams and
/// result (each at most 6 JSON bytes per byte of cap): the runner returns at
/// most 8 MiB of figure PNGs, under 11 MiB as base64.
const REPLY_SLACK: usize = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("create the control pipes")]
    Pipe(#[source] std::io::Error),
    #[error("start {0:?}")]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("the interpreter closed its control pipe")]
    Closed,
    #[error("read from the interpreter")]
    Read(#[source] std::io::Error),
    #[error("write to the interpreter")]
    Write(#[source] std::io::Error),
    #[error("reply of {0} bytes is over the limit")]
    ReplyTooLarge(usize),
    #[error("malformed reply from the interpreter")]
    BadReply(#[source] serde_json::Error),
    #[error("the interpreter did not become ready within {0:?}")]
    StartTimeout(Duration),
}

#[derive(Serialize)]
struct RunnerRequest<'a> {
    code: &'a str,
    max_output: usize,
    env: &'a [(String, String)],
    reseed: bool,
}

#[derive(Deserialize)]
struct RunnerReply {
    status: ExecStatus,
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    stderr: String,
    #[serde(default)]
    result: serde_json::Value,
    #[serde(default)]
    display: Vec<serde_json::Value>,
}

struct Interpreter {
    child: Child,
    pid: i32,
    requests: pipe::Sender,
    replies: pipe::Receiver,
    /// Bytes of a partly read reply; kept here so a timed-out read loses nothing.
    buf: Vec<u8>,
}

impl Interpreter {
    async fn start(python: &PathBuf, data_dir: &PathBuf) -> Result<Interpreter, PythonError> {
        let (req_r, req_w) = pipe_pair()?;
        let (resp_r, resp_w) = pipe_pair()?;
        let (child_in, child_out) = (req_r.as_raw_fd(), resp_w.as_raw_fd());
        let mut cmd = Command::new(python);
        cmd.args(["-E", "-u", "-c", BOOTSTRAP])
            .current_dir(data_dir)
            .env("MPLBACKEND", "Agg")
            .envs(mpl_config_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: between fork and exec only fcntl(2) and dup2(2) run, both
        // async-signal-safe; the fds are owned by this function and still open.
        unsafe {
            cmd.pre_exec(move || {
                // Move both ends above 4 first so that placing one cannot
                // clobber the other, then put them at 3 and 4 (dup2 clears
                // close-on-exec on the copies).
                let a = libc::fcntl(child_in, libc::F_DUPFD_CLOEXEC, 10);
                let b = libc::fcntl(child_out, libc::F_DUPFD_CLOEXEC, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| PythonError::Spawn(python.clone(), e))?;
        drop((req_r, resp_w));
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let mut interp = Interpreter {
            child,
            pid,
            requests: pipe::Sender::from_owned_fd(req_w).map_err(PythonError::Pipe)?,
            replies: pipe::Receiver::from_owned_fd(resp_r).map_err(PythonError::Pipe)?,
            buf: Vec::new(),
        };
        let mut frame = Vec::with_capacity(RUNNER.len() + 4);
        frame.extend_from_slice(&(RUNNER.len() as u32).to_be_bytes());
        frame.extend_from_slice(RUNNER.as_bytes());
        let started = async {
            interp
                .requests
                .write_all(&frame)
                .await
                .map_err(PythonError::Write)?;
            interp.recv(1024).await
        };
        match tokio::time::timeout(START_TIMEOUT, started).await {
            Ok(Ok(_ready)) => Ok(interp),
            Ok(Err(e)) => {
                interp.kill().await;
                Err(e)
            }
            Err(_) => {
                interp.kill().await;
                Err(PythonError::StartTimeout(START_TIMEOUT))
            }
        }
    }

    async fn send(&mut self, msg: &RunnerRequest<'_>) -> Result<(), PythonError> {
        let body = serde_json::to_vec(msg).map_err(PythonError::BadReply)?;
        let mut frame = Vec::with_capacity(body.len() + 4);
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        self.requests
            .write_all(&frame)
            .await
            .map_err(PythonError::Write)
    }

    /// Reads one reply. Cancel-safe: partial data stays in `self.buf`.
    async fn recv(&mut self, limit: usize) -> Result<serde_json::Value, PythonError> {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > limit {
                    return Err(PythonError::ReplyTooLarge(len));
                }
                if self.buf.len() >= 4 + len {
                    let value = serde_json::from_slice(&self.buf[4..4 + len])
                        .map_err(PythonError::BadReply);
                    self.buf.drain(..4 + len);
                    return value;
                }
            }
            match self.replies.read(&mut chunk).await {
                Ok(0) => return Err(PythonError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(PythonError::Read(e)),
            }
        }
    }

    /// Kills the interpreter's whole process group and reaps it.
    async fn kill(&mut self) -> Option<ExitStatus> {
        let pid = self.pid;
        if pid > 0 {
            let _ =
                tokio::task::spawn_blocking(move || procs::kill_group(pid, Duration::from_secs(2)))
                    .await;
        }
        self.child.wait().await.ok()
    }

    /// Kills what the last cell left running in the interpreter's group.
    async fn kill_leftovers(&self) {
        let pid = self.pid;
        if pid > 0 {
            let _ = tokio::task::spawn_blocking(move || {
                procs::kill_group_except(pid, pid, Duration::from_secs(5))
            })
            .await;
        }
    }
}

/// Where the guest image pre-builds matplotlib's font cache
/// (`guest-image/rootfs-setup.sh`).
const IMAGE_MPL_DIR: &str = "/usr/lib/sessiond/mpl";

/// matplotlib wants a writable config/cache dir: without one it warns on
/// every import and rebuilds its font cache (about a second) in a temp dir.
/// An explicit `MPLCONFIGDIR` wins; then the image's pre-built cache if this
/// uid may write there; else a dir under the temp dir.
fn mpl_config_dir() -> Option<(&'static str, PathBuf)> {
    if std::env::var_os("MPLCONFIGDIR").is_some() {
        return None;
    }
    if rustix::fs::access(IMAGE_MPL_DIR, rustix::fs::Access::WRITE_OK).is_ok() {
        return Some(("MPLCONFIGDIR", PathBuf::from(IMAGE_MPL_DIR)));
    }
    Some(("MPLCONFIGDIR", std::env::temp_dir().join("matplotlib")))
}

fn pipe_pair() -> Result<(OwnedFd, OwnedFd), PythonError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| PythonError::Pipe(e.into()))
}

/// Human text for an interpreter that died under a cell.
fn death_message(status: Option<ExitStatus>) -> String {
    let cause = match status {
        Some(s) if s.signal() == Some(9) => {
            "the Python process was killed (signal 9, likely out of memory)".to_string()
        }
        Some(s) if s.signal().is_some() => {
            format!(
                "the Python process was killed by signal {}",
                s.signal().unwrap_or(0)
            )
        }
        Some(s) => format!(
            "the Python process exited with code {}",
            s.code().unwrap_or(-1)
        ),
        None => "the Python process stopped answering".to_string(),
    };
    format!("{cause}; interpreter restarted, state lost\n")
}

fn seconds(ms: u64) -> String {
    format!("{}", ms as f64 / 1000.0)
}

/// The interpreter of one session (one per agent).
pub struct Python {
    python: PathBuf,
    data_dir: PathBuf,
    ready: AtomicBool,
    reseed: AtomicBool,
    env: std::sync::Mutex<Vec<(String, String)>>,
    interp: Mutex<Option<Interpreter>>,
}

impl Python {
    pub fn new(python: PathBuf, data_dir: PathBuf) -> Arc<Python> {
        Arc::new(Python {
            python,
            data_dir,
            ready: AtomicBool::new(false),
            reseed: AtomicBool::new(false),
            env: std::sync::Mutex::new(Vec::new()),
            interp: Mutex::new(None),
        })
    }

    /// Whether an interpreter is started and waiting for cells.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Environment for later cells (added to, not replacing, what is set).
    pub fn set_env(&self, env: &[(String, String)]) {
        let mut cur = self.env.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in env {
            cur.retain(|(ck, _)| ck != k);
            cur.push((k.clone(), v.clone()));
        }
    }

    /// The next cell first reseeds Python's RNGs (after a snapshot restore
    /// every clone would otherwise draw the same numbers).
    pub fn request_reseed(&self) {
        self.reseed.store(true, Ordering::Relaxed);
    }

    /// Starts the interpreter now so that a ready sandbox has Python warm.
    pub async fn warm(self: &Arc<Self>) -> Result<(), PythonError> {
        let mut guard = self.interp.lock().await;
        if guard.is_none() {
            *guard = Some(self.start().await?);
        }
        Ok(())
    }

    async fn start(&self) -> Result<Interpreter, PythonError> {
        self.ready.store(false, Ordering::Relaxed);
        let interp = Interpreter::start(&self.python, &self.data_dir).await?;
        tracing::info!(pid = interp.pid, "python interpreter ready");
        self.ready.store(true, Ordering::Relaxed);
        Ok(interp)
    }

    /// Runs one cell. Runs to completion in its own task even if the caller
    /// goes away, so the control protocol never stops mid-message.
    pub async fn execute(self: &Arc<Self>, req: PythonRequest) -> PythonResponse {
        let this = Arc::clone(self);
        match tokio::spawn(async move { this.execute_inner(req).await }).await {
            Ok(resp) => resp,
            Err(e) => failure(
                format!("internal error in the agent: {e}\n"),
                Duration::ZERO,
                false,
            ),
        }
    }

    async fn execute_inner(&self, req: PythonRequest) -> PythonResponse {
        let mut guard = self.interp.lock().await;
        let started = Instant::now();
        let timeout_ms = req.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        let max_output = req.max_output.unwrap_or(DEFAULT_MAX_OUTPUT);
        // An interpreter that died while idle (OOM-killed, say) is replaced
        // before the cell runs; the reply then says state was lost.
        let mut lost = None;
        let alive = match guard.take() {
            Some(mut i) => match i.child.try_wait() {
                Ok(Some(status)) => {
                    tracing::warn!(?status, "python interpreter died while idle");
                    lost = Some(death_message(Some(status)));
                    i.kill().await;
                    None
                }
                _ => Some(i),
            },
            None => None,
        };
        let mut interp = match alive {
            Some(i) => i,
            None => match self.start().await {
                Ok(i) => i,
                Err(e) => {
                    return failure(
                        format!("cannot start Python: {}\n", crate::output::error_chain(&e)),
                        started.elapsed(),
                        false,
                    )
                }
            },
        };
        let env = self.env.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let msg = RunnerRequest {
            code: &req.code,
            max_output,
            env: &env,
            reseed: self.reseed.swap(false, Ordering::Relaxed),
        };
        let limit = max_output.saturating_mul(18).saturating_add(REPLY_SLACK);
        let sent = interp.send(&msg).await;
        let deadline = Duration::from_millis(timeout_ms);
        let first = match sent {
            Ok(()) => tokio::time::timeout(deadline, interp.recv(limit)).await,
            Err(e) => Ok(Err(e)),
        };
        let (resp, keep) = match first {
            Ok(Ok(reply)) => (from_reply(reply, started.elapsed()), true),
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::output::error_chain(&e), "python interpreter lost");
                let status = interp.kill().await;
                let mut r = failure(death_message(status), started.elapsed(), true);
                r.restarted = true;
                (r, false)
            }
            Err(_elapsed) => {
                self.interrupt(&mut interp, timeout_ms, limit, started)
                    .await
            }
        };
        let mut resp = resp;
        if let Some(msg) = lost {
            resp.restarted = true;
            resp.stderr
                .insert_str(0, &format!("before this execution, {msg}"));
        }
        if keep {
            *guard = Some(interp);
        } else {
            match self.start().await {
                Ok(i) => *guard = Some(i),
                Err(e) => {
                    tracing::error!(error = %crate::output::error_chain(&e), "python interpreter cannot restart")
                }
            }
        }
        resp
    }

    /// The cell ran past its timeout: interrupt it, or kill the interpreter if
    /// it does not give up. Returns the reply and whether the interpreter lives.
    async fn interrupt(
        &self,
        interp: &mut Interpreter,
        timeout_ms: u64,
        limit: usize,
        started: Instant,
    ) -> (PythonResponse, bool) {
        tracing::info!(
            pid = interp.pid,
            timeout_ms,
            "python cell timed out, interrupting"
        );
        let _ = kill(Pid::from_raw(interp.pid), Signal::SIGINT);
        let msg = format!("execution timed out after {} s", seconds(timeout_ms));
        match tokio::time::timeout(INTERRUPT_GRACE, interp.recv(limit)).await {
            Ok(Ok(reply)) => {
                interp.kill_leftovers().await;
                let mut r = from_reply(reply, started.elapsed());
                r.status = ExecStatus::Timeout;
                r.result = serde_json::Value::String(String::new());
                r.stderr.push_str(&format!(
                    "{msg}; the execution was interrupted, session state is kept\n"
                ));
                (r, true)
            }
            other => {
                if let Ok(Err(e)) = &other {
                    tracing::warn!(error = %crate::output::error_chain(e), "python interpreter lost while interrupted");
                }
                interp.kill().await;
                let mut r = failure(
                    format!("{msg}; the code did not stop when interrupted, so the interpreter was restarted and session state was lost\n"),
                    started.elapsed(),
                    true,
                );
                r.status = ExecStatus::Timeout;
                (r, false)
            }
        }
    }
}

fn from_reply(reply: serde_json::Value, elapsed: Duration) -> PythonResponse {
    match serde_json::from_value::<RunnerReply>(reply) {
        Ok(r) => PythonResponse {
            status: r.status,
            stdout: r.stdout,
            stderr: r.stderr,
            result: r.result,
            display: r.display,
            duration_ms: elapsed.as_millis() as u64,
            restarted: false,
        },
        Err(e) => failure(
            format!("malformed reply from the interpreter: {e}\n"),
            elapsed,
            false,
        ),
    }
}

fn failure(stderr: String, elapsed: Duration, restarted: bool) -> PythonResponse {
    PythonResponse {
        status: ExecStatus::Failure,
        stdout: String::new(),
        stderr,
        result: serde_json::Value::String(String::new()),
        display: Vec::new(),
        duration_ms: elapsed.as_millis() as u64,
        restarted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for `matplotlib.pyplot` with figures of chosen PNG sizes,
    /// so the runner's figure caps are tested without matplotlib.
    const FAKE_PYPLOT: &str = r#"
import sys, types
class _Fig:
    def __init__(self, size):
        self.size = size
    def savefig(self, buf, format):
        buf.write(b"\x89PNG" + b"x" * (self.size - 4))
plt = types.ModuleType("matplotlib.pyplot")
plt._figs = {}
plt.get_fignums = lambda: sorted(plt._figs)
plt.figure = lambda num: plt._figs[num]
plt.close = lambda what: plt._figs.clear()
sys.modules["matplotlib.pyplot"] = plt
def make(*sizes):
    for i, size in enumerate(sizes):
        plt._figs[i + 1] = _Fig(size)
"#;

    fn python() -> Option<Arc<Python>> {
        let python = PathBuf::from("/usr/bin/python3");
        if !python.exists() {
            eprintln!("SKIP: no /usr/bin/python3");
            return None;
        }
        Some(Python::new(python, std::env::temp_dir()))
    }

    async fn run(py: &Arc<Python>, code: &str) -> PythonResponse {
        py.execute(PythonRequest {
            code: code.to_string(),
            timeout_ms: Some(30_000),
            max_output: None,
        })
        .await
    }

    #[tokio::test]
    async fn figures_are_capped_in_number_and_size() {
        let Some(py) = python() else { return };
        let r = run(&py, FAKE_PYPLOT).await;
        assert_eq!(r.status, ExecStatus::Success, "{}", r.stderr);
        // Twelve small figures: the first eight come back, the rest are noted.
        let r = run(&py, "make(*[100] * 12)\n1").await;
        assert_eq!(r.result, serde_json::json!(1));
        assert_eq!(r.display.len(), 8);
        assert!(
            r.stderr.contains("4 more figure(s) not returned"),
            "{}",
            r.stderr
        );
        // One figure over 4 MiB is left out; three of 3 MiB stop at 8 MiB.
        let r = run(&py, "make(5 << 20, 100, 3 << 20, 3 << 20, 3 << 20)\n2").await;
        assert_eq!(r.display.len(), 3, "{}", r.stderr);
        assert!(r.stderr.contains("figure 1 not returned"), "{}", r.stderr);
        assert!(r.stderr.contains("figure 5 not returned"), "{}", r.stderr);
        // The figures are closed either way.
        let r = run(&py, "len(plt.get_fignums())").await;
        assert_eq!(r.result, serde_json::json!(0));
    }

    #[tokio::test]
    async fn long_string_results_are_truncated_to_the_cap() {
        let Some(py) = python() else { return };
        let r = run(&py, "'ab' * (1 << 20)").await;
        assert_eq!(r.status, ExecStatus::Success, "{}", r.stderr);
        assert_eq!(r.result.as_str().unwrap().len(), DEFAULT_MAX_OUTPUT);
        assert!(
            r.stderr.contains("the result was truncated"),
            "{}",
            r.stderr
        );
    }
}
