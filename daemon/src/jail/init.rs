//! `sessiond jail-init`: the single-threaded process that builds one sandbox.
//!
//! Started by the daemon with the agent's listening socket on fd 3, the
//! status pipe on fd 4 and an [`InitSpec`] on stdin. It joins the sandbox's
//! cgroup leaves, unshares the mount, pid, net, uts, ipc and cgroup
//! namespaces and forks; the child (PID 1 of the new pid namespace) builds
//! the file system, drops every privilege and execs the agent, while the
//! parent waits and exits with the child's status. Killing jail-init kills
//! the whole sandbox (the child has PDEATHSIG SIGKILL, and when a pid
//! namespace's PID 1 dies the kernel kills everything in it).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use thiserror::Error;

use super::loopback::{self, LoopbackError};
use super::pid1::{self, Forked, Pid1Error};
use super::privileges::{self, PrivilegeError};
use super::rootfs::{self, RootfsError};
use super::seccomp::{self, SeccompError};
use super::spec::{InitSpec, LISTEN_FD, STATUS_FD};

/// The agent binary (O_PATH), from before pivot_root until exec.
const AGENT_FD: i32 = STATUS_FD + 1;

/// oom_score_adj of the sandbox's PID 1 and agent, inherited by what they
/// start; the Python runner and shell commands raise themselves to 1000, so
/// they go first.
const SANDBOX_OOM_SCORE_ADJ: &str = "500";

/// Hostname inside every sandbox.
const HOSTNAME: &str = "sandbox";

#[derive(Debug, Error)]
pub enum InitError {
    #[error(transparent)]
    Pid1(#[from] Pid1Error),
    #[error("building the file system")]
    Rootfs(#[from] RootfsError),
    #[error("setting the hostname")]
    Hostname(#[source] nix::Error),
    #[error("bringing up loopback")]
    Loopback(#[from] LoopbackError),
    #[error("dropping privileges")]
    Privileges(#[from] PrivilegeError),
    #[error("entering {0}")]
    Chdir(&'static str, #[source] nix::Error),
    #[error("seccomp")]
    Seccomp(#[from] SeccompError),
    #[error("closing inherited file descriptors")]
    CloseFds(#[source] io::Error),
    #[error("invalid environment entry {0:?}")]
    Env(String),
    #[error("raising oom_score_adj")]
    OomScore(#[source] io::Error),
    #[error("opening the agent {path}")]
    OpenAgent {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("executing the agent {path}")]
    Exec {
        path: &'static str,
        #[source]
        source: nix::Error,
    },
}

pub(crate) use sessiond_agent::output::error_chain as chain;

/// Entry point of `sessiond jail-init`; never returns.
pub fn run() -> ! {
    pid1::exit_with("jail-init", supervise, report_status)
}

/// Best effort: the daemon reads this as the reason spawning failed.
pub(crate) fn report_status(msg: &str) {
    // SAFETY: fd 4 is the status pipe (or closed, in which case write fails
    // with EBADF); ManuallyDrop keeps it open for the caller.
    let mut f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(STATUS_FD) });
    let _ = f.write_all(msg.as_bytes());
}

pub(crate) fn fd_is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD only queries the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

pub(crate) fn set_cloexec(fd: i32) {
    // SAFETY: F_SETFD on a descriptor we checked is open; no memory involved.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Closes every descriptor from `first` up.
pub(crate) fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range(2) with integer arguments; nothing in this
    // single-threaded process holds the descriptors closed here.
    if unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Resets every signal to its default action (SIGPIPE too when `pipe`) and
/// unblocks all: dispositions set to "ignore" and the signal mask survive
/// exec, and the daemon's or Rust's runtime choices must not leak into the
/// sandbox, nor hide SIGTERM/SIGCHLD from jail-init.
pub(crate) fn reset_signals(pipe: bool) {
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) || (sig == Signal::SIGPIPE && !pipe) {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no handler code in this process.
        let _ = unsafe { sigaction(sig, &default) };
    }
    let _ = SigSet::all().thread_unblock();
}

fn supervise(id: &mut String) -> Result<i32, InitError> {
    // SIGPIPE stays ignored (Rust's default) while jail-init writes to the
    // daemon's log pipe.
    reset_signals(false);
    let spec: InitSpec = pid1::read_spec()?;
    id.clone_from(&spec.sandbox_id);
    pid1::keep_fds(&[LISTEN_FD, STATUS_FD])?;
    // SAFETY: jail-init is single-threaded (dispatched from main before any
    // thread starts).
    match unsafe { pid1::fork_pid1(&spec.cgroup_procs) }? {
        Forked::Pid1(death_r) => {
            let err = sandbox_pid1(&spec, death_r);
            let msg = chain(&err);
            eprintln!("sessiond jail-init [{}]: {msg}", spec.sandbox_id);
            report_status(&msg);
            std::process::exit(1)
        }
        Forked::Parent(child, _death_w) => {
            // SAFETY: closing our copies of fds 3 and 4, which nothing else
            // here refers to: only the child and the agent keep them.
            unsafe {
                libc::close(LISTEN_FD);
                libc::close(STATUS_FD);
            }
            Ok(wait_for_pid1(child, &spec.sandbox_id))
        }
    }
}

/// Waits for PID 1 and returns the exit code to leave with. SIGTERM (the
/// daemon's way to destroy the sandbox) kills PID 1 first, so that jail-init,
/// not the host's init, reaps it and nothing is left as a zombie.
pub(crate) fn wait_for_pid1(child: Pid, id: &str) -> i32 {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGCHLD);
    // Blocked signals stay pending for sigwait below: no race between
    // checking on the child and waiting for the next event.
    if let Err(e) = signals.thread_block() {
        eprintln!("sessiond jail-init [{id}]: blocking signals: {e}");
    }
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => {
                eprintln!("sessiond jail-init [{id}]: waiting for PID 1: {e}");
                return 1;
            }
        }
        match signals.wait() {
            Ok(Signal::SIGTERM | Signal::SIGINT) => {
                let _ = kill(child, Signal::SIGKILL);
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("sessiond jail-init [{id}]: waiting for signals: {e}");
                return 1;
            }
        }
    }
}

/// PID 1 of the sandbox: returns only on failure.
fn sandbox_pid1(spec: &InitSpec, death_r: OwnedFd) -> InitError {
    match build_and_exec(spec, death_r) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn build_and_exec(
    spec: &InitSpec,
    death_r: OwnedFd,
) -> Result<std::convert::Infallible, InitError> {
    pid1::tie_to_parent(death_r)?;

    // Opened while the host's file system is still in view, at a fixed
    // descriptor that survives the clean-up below and closes at exec.
    let agent = rustix::fs::open(
        &spec.agent_binary,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|source| InitError::OpenAgent {
        path: spec.agent_binary.clone(),
        source: source.into(),
    })?;
    let agent = if agent.as_raw_fd() == AGENT_FD {
        agent
    } else {
        // SAFETY: dup3 onto AGENT_FD, which nothing in this process uses.
        if unsafe { libc::dup3(agent.as_raw_fd(), AGENT_FD, libc::O_CLOEXEC) } < 0 {
            return Err(InitError::OpenAgent {
                path: spec.agent_binary.clone(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: AGENT_FD was just duplicated and is owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(AGENT_FD) }
    };

    // Every sandbox process is killed before jail-init on a memory cgroup
    // OOM, and before the host's own processes on a global one. Written with
    // CAP_SYS_RESOURCE (a normal root daemon), it is also the floor that
    // sandboxed code cannot lower its score below.
    std::fs::write("/proc/self/oom_score_adj", SANDBOX_OOM_SCORE_ADJ)
        .map_err(InitError::OomScore)?;

    rootfs::build(spec)?;
    nix::unistd::sethostname(HOSTNAME).map_err(InitError::Hostname)?;
    loopback::bring_up()?;

    let env = spec
        .env
        .iter()
        .map(|(k, v)| {
            let entry = format!("{k}={v}");
            if k.is_empty() || k.contains('=') {
                return Err(InitError::Env(entry));
            }
            CString::new(entry.clone()).map_err(|_| InitError::Env(entry))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let path = CString::new(rootfs::AGENT_PATH).expect("constant has no NUL");
    let argv = [
        path.clone(),
        CString::new("--init").expect("constant has no NUL"),
        CString::new("--listen-fd").expect("constant has no NUL"),
        CString::new(LISTEN_FD.to_string()).expect("digits have no NUL"),
    ];
    let filters = seccomp::sandbox_filters()?;

    privileges::drop_to(spec.uid, spec.gid)?;
    nix::unistd::chdir(sessiond_agent::proto::DATA_DIR)
        .map_err(|e| InitError::Chdir(sessiond_agent::proto::DATA_DIR, e))?;
    close_from(AGENT_FD as u32 + 1).map_err(InitError::CloseFds)?;
    reset_signals(true);
    seccomp::install(&filters)?;
    // execveat on the descriptor: no host path is mounted into the sandbox
    // for the agent, and the sandbox cannot swap the file being run.
    match nix::unistd::execveat(&agent, c"", &argv, &env, nix::fcntl::AtFlags::AT_EMPTY_PATH) {
        Ok(never) => match never {},
        Err(source) => Err(InitError::Exec {
            path: rootfs::AGENT_PATH,
            source,
        }),
    }
}
