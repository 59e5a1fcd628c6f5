//! Shell executions: `/bin/sh -c command` or an argv, in its own process
//! group so a timeout can kill everything it started.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::output::{read_capped_until, to_text};
use crate::procs;
use crate::proto::{
    ExecStatus, ShellRequest, ShellResponse, DEFAULT_MAX_OUTPUT, DEFAULT_TIMEOUT_MS,
};

/// After the command exits, how long to keep reading output that a process
/// it backgrounded still holds open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// Makes a shell command the memory cgroup OOM killer's first choice, as
/// the Python runner does for itself, so that when a command fills the
/// sandbox's memory (tmpfs included) the agent, which reports what happened,
/// goes last. The command does it itself after exec: the agent cannot, as
/// its children's /proc files are not writable by it before they exec.
const OOM_FIRST_WRAPPER: &str =
    "{ echo 1000 > /proc/self/oom_score_adj; } 2>/dev/null; exec /bin/sh -c \"$1\"";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShellError {
    #[error("give exactly one of `command` and `argv`")]
    CommandOrArgv,
    #[error("`argv` is empty")]
    EmptyArgv,
}

/// Runs one command to completion or timeout. Request errors are returned;
/// a command that cannot start is a [`ExecStatus::Failure`] reply.
pub async fn run(
    req: ShellRequest,
    data_dir: &Path,
    env: &[(String, String)],
) -> Result<ShellResponse, ShellError> {
    let mut cmd = match (&req.command, &req.argv) {
        (Some(c), None) => {
            // The command runs as `/bin/sh -c c` would (same $0, exit code
            // and pid, through exec); the wrapper only raises its score.
            let mut cmd = Command::new("/bin/sh");
            cmd.args(["-c", OOM_FIRST_WRAPPER, "/bin/sh", c]);
            cmd
        }
        (None, Some(argv)) => {
            let (first, rest) = argv.split_first().ok_or(ShellError::EmptyArgv)?;
            let mut cmd = Command::new(first);
            cmd.args(rest);
            cmd
        }
        _ => return Err(ShellError::CommandOrArgv),
    };
    let started = Instant::now();
    let timeout_ms = req.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    let cap = req.max_output.unwrap_or(DEFAULT_MAX_OUTPUT);
    cmd.current_dir(data_dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if req.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Ok(ShellResponse {
                status: ExecStatus::Failure,
                exit_code: Some(if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                }),
                stdout: String::new(),
                stderr: format!("cannot start the command: {e}\n"),
                duration_ms: started.elapsed().as_millis() as u64,
            });
        }
    };
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    if let (Some(mut stdin), Some(data)) = (child.stdin.take(), req.stdin) {
        // A command that does not read its input must not stall the call.
        tokio::spawn(async move {
            let _ = stdin.write_all(data.as_bytes()).await;
        });
    }
    let (stop_out, out_stop) = tokio::sync::oneshot::channel();
    let (stop_err, err_stop) = tokio::sync::oneshot::channel();
    let out = tokio::spawn(read_capped_until(
        child.stdout.take().expect("piped stdout"),
        cap,
        out_stop,
    ));
    let err = tokio::spawn(read_capped_until(
        child.stderr.take().expect("piped stderr"),
        cap,
        err_stop,
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    let waited = tokio::time::timeout_at(deadline, child.wait()).await;
    let timed_out = waited.is_err();
    if timed_out && pgid > 0 {
        let _ =
            tokio::task::spawn_blocking(move || procs::kill_group(pgid, Duration::from_secs(5)))
                .await;
    }
    let status = match waited {
        Ok(s) => s.ok(),
        Err(_) => child.wait().await.ok(),
    };
    let drain = tokio::time::Instant::now() + DRAIN_AFTER_EXIT;
    let _ = stop_out.send(drain);
    let _ = stop_err.send(drain);
    let (stdout, out_cut) = out.await.unwrap_or_default();
    let (stderr, err_cut) = err.await.unwrap_or_default();
    let mut stderr = to_text(&stderr, err_cut);
    let (status, exit_code) = if timed_out {
        stderr.push_str(&format!(
            "execution timed out after {} s; the command's process group was killed\n",
            timeout_ms as f64 / 1000.0
        ));
        (ExecStatus::Timeout, None)
    } else {
        match status {
            Some(s) if s.code().is_some() => (ExecStatus::Success, s.code()),
            Some(s) => {
                stderr.push_str(&format!("killed by signal {}\n", s.signal().unwrap_or(0)));
                (ExecStatus::Failure, None)
            }
            None => (ExecStatus::Failure, None),
        }
    };
    Ok(ShellResponse {
        status,
        exit_code,
        stdout: to_text(&stdout, out_cut),
        stderr,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}
