//! Turns the root PID 1 into the unprivileged sandbox user: no capabilities
//! in any set (bounding included), no supplementary groups, its own uid/gid,
//! no_new_privs, no core dumps.

use std::io;

use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
use rustix::thread::{CapabilitySet, CapabilitySets};
use thiserror::Error;

/// Open files per sandbox process (soft = hard). Set explicitly: the daemon
/// runs with a large limit (the unit sets 1048576) that must not pass to
/// sandboxed code; kernel memory per file is charged to the sandbox's memory
/// cgroup either way.
pub const SANDBOX_NOFILE: u64 = 8192;

/// Past the highest capability any kernel defines today (40).
const MAX_CAPABILITY: libc::c_ulong = 63;

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error("dropping capability {cap} from the bounding set")]
    Bounding {
        cap: libc::c_ulong,
        #[source]
        source: io::Error,
    },
    #[error("clearing the ambient capabilities")]
    Ambient(#[source] rustix::io::Errno),
    #[error("clearing supplementary groups")]
    Groups(#[source] nix::Error),
    #[error("switching to gid {0}")]
    Gid(u32, #[source] nix::Error),
    #[error("switching to uid {0}")]
    Uid(u32, #[source] nix::Error),
    #[error("clearing the capability sets")]
    Capset(#[source] rustix::io::Errno),
    #[error("capabilities remain after dropping them: {0:?}")]
    Remaining(CapabilitySets),
    #[error("setting no_new_privs")]
    NoNewPrivs(#[source] rustix::io::Errno),
    #[error("setting the open files limit")]
    NoFile(#[source] nix::Error),
    #[error("setting the core dump limit")]
    Core(#[source] nix::Error),
    #[error("keeping the parent-death signal across the uid change")]
    DeathSignal(#[source] nix::Error),
}

pub fn drop_to(uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    for cap in 0..=MAX_CAPABILITY {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and touches no memory.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            let err = io::Error::last_os_error();
            // EINVAL: past the kernel's last capability; all are dropped.
            if err.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(PrivilegeError::Bounding { cap, source: err });
        }
    }
    rustix::thread::clear_ambient_capability_set().map_err(PrivilegeError::Ambient)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(PrivilegeError::Core)?;
    // Raised or lowered while still root: the hard limit binds from here on.
    setrlimit(Resource::RLIMIT_NOFILE, SANDBOX_NOFILE, SANDBOX_NOFILE)
        .map_err(PrivilegeError::NoFile)?;
    setgroups(&[]).map_err(PrivilegeError::Groups)?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).map_err(|e| PrivilegeError::Gid(gid, e))?;
    // The kernel clears the parent-death signal on every credential change
    // (commit_creds): without re-arming it, a sandbox would outlive the
    // process that supervises it.
    let death_signal = nix::sys::prctl::get_pdeathsig().map_err(PrivilegeError::DeathSignal)?;
    let u = Uid::from_raw(uid);
    // Leaving uid 0 clears the permitted and effective sets, not the
    // inheritable one: cleared explicitly below.
    setresuid(u, u, u).map_err(|e| PrivilegeError::Uid(uid, e))?;
    if death_signal.is_some() {
        nix::sys::prctl::set_pdeathsig(death_signal).map_err(PrivilegeError::DeathSignal)?;
    }
    let none = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    rustix::thread::set_capabilities(None, none).map_err(PrivilegeError::Capset)?;
    let now = rustix::thread::capabilities(None).map_err(PrivilegeError::Capset)?;
    if now != none {
        return Err(PrivilegeError::Remaining(now));
    }
    rustix::thread::set_no_new_privs(true).map_err(PrivilegeError::NoNewPrivs)
}
