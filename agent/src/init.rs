//! `--init`: the agent as PID 1 of the sandbox's pid namespace.
//!
//! PID 1 inherits every orphan in the namespace, so something must reap them,
//! and when PID 1 exits the kernel kills the whole namespace. The parent side
//! of the fork does only that: reap everything, forward SIGTERM/SIGINT to the
//! agent, and exit with the agent's status. It runs before any thread exists.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

static AGENT_PID: AtomicI32 = AtomicI32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("fork the agent")]
    Fork(#[source] Errno),
    #[error("install the signal handler for {0}")]
    Signal(Signal, #[source] Errno),
    #[error("arm the parent-death signal")]
    DeathSignal(#[source] Errno),
}

/// What the caller does next after [`fork_init`].
pub enum Role {
    /// This process is the agent: go on and serve.
    Agent,
    /// This process was init and the agent is gone: exit with this code.
    Exit(i32),
}

extern "C" fn forward(signum: libc::c_int) {
    let pid = AGENT_PID.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe and takes plain integers.
        unsafe {
            libc::kill(pid, signum);
        }
    }
}

/// Forks; the child returns [`Role::Agent`], the parent reaps until the agent
/// exits. `listen_fd` is closed in the parent: only the agent serves on it.
///
/// Must be called while the process is single-threaded.
pub fn fork_init(listen_fd: Option<RawFd>) -> Result<Role, InitError> {
    if std::process::id() == 1 {
        // PID 1 of a sandbox must not outlive its supervisor outside the
        // namespace; the kernel clears this signal on credential changes, so
        // it is armed here, after the last of them (the exec).
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(InitError::DeathSignal)?;
    }
    // SAFETY: called from main before any runtime or thread is created, so the
    // child cannot inherit a lock held by another thread.
    let child = match unsafe { fork() }.map_err(InitError::Fork)? {
        ForkResult::Child => return Ok(Role::Agent),
        ForkResult::Parent { child } => child,
    };
    AGENT_PID.store(child.as_raw(), Ordering::Relaxed);
    if let Some(fd) = listen_fd {
        // SAFETY: the fd belongs to this process and nothing in the init side
        // uses it; the agent child keeps its own copy.
        unsafe {
            libc::close(fd);
        }
    }
    let action = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only reads an atomic and calls kill(2).
        unsafe { sigaction(sig, &action) }.map_err(|e| InitError::Signal(sig, e))?;
    }
    Ok(Role::Exit(reap_until(child)))
}

fn reap_until(agent: Pid) -> i32 {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => return code,
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == agent => return 128 + sig as i32,
            Ok(_) | Err(Errno::EINTR) => {}
            // ECHILD: nothing left at all, the agent included.
            Err(_) => return 1,
        }
    }
}
