//! The first steps of an init helper (`sessiond jail-init`, `sessiond vmm-jail-init`), in
//! its single-threaded process: take the spec from stdin, keep only the descriptors agreed
//! with the daemon, join the cgroup leaves, unshare the namespaces and fork the sandbox's
//! PID 1, which dies with its parent. Shared by the jail backend and the jailed VMM
//! ([`crate::vmm_jail`]); added beside `init.rs`, which can move onto it.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::Signal;
use nix::unistd::{fork, ForkResult, Pid};
use serde::de::DeserializeOwned;
use thiserror::Error;

use super::cloexec_pipe;
use super::init::{chain, close_from, fd_is_open, set_cloexec};
use super::spec::STATUS_FD;

#[derive(Debug, Error)]
pub enum Pid1Error {
    #[error("reading the spec from stdin")]
    ReadSpec(#[source] io::Error),
    #[error("parsing the spec")]
    ParseSpec(#[source] serde_json::Error),
    #[error("fd {0} was not inherited from the daemon")]
    MissingFd(i32),
    #[error("closing inherited file descriptors")]
    CloseFds(#[source] io::Error),
    #[error("redirecting stdin to /dev/null")]
    Stdin(#[source] io::Error),
    #[error("joining cgroup via {path}")]
    JoinCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unsharing namespaces")]
    Unshare(#[source] nix::Error),
    #[error("making the new mount namespace private")]
    Private(#[source] nix::Error),
    #[error("creating the parent-death pipe")]
    Pipe(#[source] io::Error),
    #[error("forking PID 1")]
    Fork(#[source] nix::Error),
    #[error("setting the parent-death signal")]
    DeathSignal(#[source] nix::Error),
    #[error("the init helper exited before the sandbox started")]
    ParentGone,
}

/// Runs an init helper's `supervise` (which records the sandbox id once known) and exits
/// with its code; on failure the error and its causes go to stderr and, through `report`,
/// to the daemon.
pub fn exit_with<E: std::error::Error>(
    helper: &str,
    supervise: impl FnOnce(&mut String) -> Result<i32, E>,
    report: fn(&str),
) -> ! {
    let mut id = String::from("?");
    let code = supervise(&mut id).unwrap_or_else(|e| {
        let msg = chain(&e);
        eprintln!("sessiond {helper} [{id}]: {msg}");
        report(&msg);
        1
    });
    std::process::exit(code)
}

/// The spec the daemon wrote on stdin.
pub fn read_spec<T: DeserializeOwned>() -> Result<T, Pid1Error> {
    let mut raw = Vec::new();
    io::stdin()
        .read_to_end(&mut raw)
        .map_err(Pid1Error::ReadSpec)?;
    serde_json::from_slice(&raw).map_err(Pid1Error::ParseSpec)
}

/// Checks that `fds` (the status pipe among them) were inherited, closes every other
/// descriptor above stderr and points stdin at /dev/null. The status pipe becomes
/// close-on-exec: its closing at exec tells the daemon that setup succeeded.
pub fn keep_fds(fds: &[i32]) -> Result<(), Pid1Error> {
    for &fd in fds {
        if !fd_is_open(fd) {
            return Err(Pid1Error::MissingFd(fd));
        }
    }
    set_cloexec(STATUS_FD);
    let last = fds.iter().copied().max().unwrap_or(2).max(2);
    close_from(last as u32 + 1).map_err(Pid1Error::CloseFds)?;
    for fd in 3..last {
        if !fds.contains(&fd) {
            // SAFETY: a descriptor below the kept ones that nothing here owns; closing
            // one that is not open fails harmlessly with EBADF.
            unsafe { libc::close(fd) };
        }
    }
    let null = File::open("/dev/null").map_err(Pid1Error::Stdin)?;
    // SAFETY: dup2 onto stdin with a descriptor we own.
    if unsafe { libc::dup2(null.as_raw_fd(), 0) } < 0 {
        return Err(Pid1Error::Stdin(io::Error::last_os_error()));
    }
    Ok(())
}

/// Which side of [`fork_pid1`] this is.
pub enum Forked {
    /// PID 1 of the new namespaces; call [`tie_to_parent`] with the pipe first.
    Pid1(OwnedFd),
    /// The init helper, with PID 1's pid and the pipe's write end, to hold until it
    /// exits.
    Parent(Pid, OwnedFd),
}

/// Joins the cgroup leaves (so everything after is charged there), unshares the mount,
/// pid, net, uts, ipc and cgroup namespaces and forks PID 1.
///
/// # Safety
/// The calling process must be single-threaded (the child runs arbitrary code after fork).
pub unsafe fn fork_pid1(cgroup_procs: &[PathBuf]) -> Result<Forked, Pid1Error> {
    let pid = std::process::id().to_string();
    for path in cgroup_procs {
        std::fs::write(path, &pid).map_err(|source| Pid1Error::JoinCgroup {
            path: path.clone(),
            source,
        })?;
    }
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(Pid1Error::Unshare)?;
    // Nothing mounted from here on may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(Pid1Error::Private)?;
    // The child learns from this pipe that its parent died before PDEATHSIG was armed:
    // the write end closes with the parent.
    let (death_r, death_w) = cloexec_pipe().map_err(Pid1Error::Pipe)?;
    // SAFETY: the caller guarantees a single-threaded process.
    match unsafe { fork() }.map_err(Pid1Error::Fork)? {
        ForkResult::Child => {
            drop(death_w);
            Ok(Forked::Pid1(death_r))
        }
        ForkResult::Parent { child } => {
            drop(death_r);
            // The init helper sits in the sandbox's memory cgroup: an OOM there must take
            // sandboxed processes, never the supervisor. Set after fork so PID 1 does not
            // inherit it; needs CAP_SYS_RESOURCE (best effort).
            let _ = std::fs::write(Path::new("/proc/self/oom_score_adj"), "-1000");
            Ok(Forked::Parent(child, death_w))
        }
    }
}

/// In PID 1: dies with the init helper (SIGKILL), and fails if it is already gone.
pub fn tie_to_parent(death_r: OwnedFd) -> Result<(), Pid1Error> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(Pid1Error::DeathSignal)?;
    // getppid() is 0 for PID 1 of a new namespace, so check the pipe instead.
    let mut pfd = libc::pollfd {
        fd: death_r.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd we own, without waiting.
    if unsafe { libc::poll(&mut pfd, 1, 0) } > 0 && pfd.revents != 0 {
        return Err(Pid1Error::ParentGone);
    }
    Ok(())
}
