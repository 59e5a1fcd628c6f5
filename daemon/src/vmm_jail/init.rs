//! `sessiond vmm-jail-init`: the single-threaded process that jails one VMM, in the order
//! of Firecracker's jailer. Started by the daemon with the status pipe on fd 4 and a
//! [`VmmInitSpec`] on stdin, it joins the VM's cgroup leaves, unshares the mount, pid, net,
//! uts, ipc and cgroup namespaces and forks; the child (PID 1 of the new pid namespace)
//! builds the chroot ([`chroot`](super::chroot)), drops every privilege to the VM's uid,
//! keeps only stdout, stderr and the status pipe, and runs the VMM; the parent waits and
//! exits with the child's status (the VMM's exit code, or 128 + the signal that killed it).
//!
//! The VMM runs in this process rather than through a second exec: sessiond is linked
//! dynamically and the chroot holds no libraries. The process was exec'd fresh by the
//! daemon and has run nothing but this setup, so nothing of the daemon's state is in it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

use super::chroot::{self, ChrootError};
use super::spec::{JailedVm, VmmInitSpec, CONFIG_PATH, STATUS_FD};
use crate::jail::init::{chain, close_from, report_status, reset_signals, wait_for_pid1};
use crate::jail::loopback::{self, LoopbackError};
use crate::jail::pid1::{self, Forked, Pid1Error};
use crate::jail::privileges::{self, PrivilegeError};

/// Hostname inside every VMM jail.
const HOSTNAME: &str = "vmm";

/// What runs in the jail once it is built, as the VM's uid: returns the exit code, or
/// the error to report. It calls [`signal_ready`] when its setup succeeded.
pub type Payload = fn(&VmmInitSpec) -> Result<u8, String>;

#[derive(Debug, Error)]
pub enum VmmInitError {
    #[error(transparent)]
    Pid1(#[from] Pid1Error),
    #[error("building the chroot")]
    Chroot(#[from] ChrootError),
    #[error("setting the hostname")]
    Hostname(#[source] nix::Error),
    #[error("creating tap {0}")]
    Tap(String, #[source] vmm::devices::virtio::net::NetError),
    #[error("setting tap {0} up")]
    LinkUp(String, #[source] LoopbackError),
    #[error("dropping privileges")]
    Privileges(#[from] PrivilegeError),
    #[error("entering /")]
    Chdir(#[source] nix::Error),
    #[error("closing inherited file descriptors")]
    CloseFds(#[source] std::io::Error),
    #[error("{0}")]
    Payload(String),
}

/// Set once the status pipe is closed: the descriptor number may then be reused.
static READY: AtomicBool = AtomicBool::new(false);

/// Tells the daemon that the jailed process is up (closes the status pipe).
pub fn signal_ready() {
    if !READY.swap(true, Ordering::SeqCst) {
        // SAFETY: closes the status pipe, which nothing else in this process refers to;
        // READY keeps it from being closed (or written) again.
        unsafe { libc::close(STATUS_FD) };
    }
}

fn report(msg: &str) {
    if !READY.load(Ordering::SeqCst) {
        report_status(msg);
    }
}

/// The VMM: `sessiond vmm --config /vm.json`, or a snapshot restored; ready once the VM
/// is built.
fn run_vmm(spec: &VmmInitSpec) -> Result<u8, String> {
    match &spec.vm {
        JailedVm::Boot(_) => vmm::standalone::run_notify(Path::new(CONFIG_PATH), signal_ready),
        JailedVm::Restore(config) => vmm::standalone::restore_notify(config, signal_ready),
    }
    .map(vmm::standalone::exit_code)
    .map_err(|e| chain(&e))
}

/// Entry point of `sessiond vmm-jail-init`; never returns.
pub fn run() -> ! {
    run_with(run_vmm)
}

/// The jail around another payload than the VMM (the tests use one that must die of
/// seccomp); never returns.
pub fn run_with(payload: Payload) -> ! {
    pid1::exit_with("vmm-jail-init", |id| supervise(id, payload), report)
}

fn supervise(id: &mut String, payload: Payload) -> Result<i32, VmmInitError> {
    // SIGPIPE stays ignored while this process writes to the daemon's log pipe.
    reset_signals(false);
    let spec: VmmInitSpec = pid1::read_spec()?;
    id.clone_from(&spec.vm_id);
    // Only stdout, stderr (the daemon's log pipes) and the status pipe stay open. The net
    // namespace holds only the VM's taps: the VMM itself reaches no network.
    pid1::keep_fds(&[STATUS_FD])?;
    // SAFETY: vmm-jail-init is single-threaded (dispatched from main before any thread
    // starts).
    match unsafe { pid1::fork_pid1(&spec.cgroup_procs) }? {
        Forked::Pid1(death_r) => {
            let err = match pid1::tie_to_parent(death_r) {
                Ok(()) => match jail_and_run(&spec, payload) {
                    Ok(code) => std::process::exit(i32::from(code)),
                    Err(e) => e,
                },
                Err(e) => e.into(),
            };
            let msg = chain(&err);
            eprintln!("sessiond vmm-jail-init [{}]: {msg}", spec.vm_id);
            report(&msg);
            std::process::exit(1)
        }
        Forked::Parent(child, _death_w) => {
            // SAFETY: our copy of the status pipe, which only PID 1 needs.
            unsafe { libc::close(STATUS_FD) };
            Ok(wait_for_pid1(child, &spec.vm_id))
        }
    }
}

/// PID 1 of the jail: builds it, becomes the VM's uid and runs the payload.
fn jail_and_run(spec: &VmmInitSpec, payload: Payload) -> Result<u8, VmmInitError> {
    chroot::build(spec)?;
    nix::unistd::sethostname(HOSTNAME).map_err(VmmInitError::Hostname)?;
    // Created while CAP_NET_ADMIN remains, in the VM's own network namespace: the VMM
    // attaches to them as their owner.
    for tap in &spec.taps {
        vmm::devices::virtio::net::create_persistent_tap(tap, spec.uid, spec.gid)
            .map_err(|e| VmmInitError::Tap(tap.clone(), e))?;
        loopback::link_up(tap).map_err(|e| VmmInitError::LinkUp(tap.clone(), e))?;
    }
    privileges::drop_to(spec.uid, spec.gid)?;
    nix::unistd::chdir("/").map_err(VmmInitError::Chdir)?;
    close_from(STATUS_FD as u32 + 1).map_err(VmmInitError::CloseFds)?;
    reset_signals(true);
    payload(spec).map_err(VmmInitError::Payload)
}
