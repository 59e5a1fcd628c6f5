//! Seccomp filters, one per kind of VMM thread, installed by each thread before it runs
//! guest code or touches guest-controlled data. A syscall outside the list kills the whole
//! VMM process (`SECCOMP_RET_KILL_PROCESS`): the VMM is meant to run one process per VM, so
//! an embedding caller that runs VMs inside a larger process must turn filtering off.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs KVM_RUN and emulates devices on exits (including vsock/net/block I/O).
    Vcpu,
    /// A device's host-side event loop (vsock sockets, tap).
    DeviceEvents,
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {0:?} seccomp filter: {1}")]
    Build(ThreadKind, String),
    #[error("installing the {0:?} seccomp filter")]
    Install(ThreadKind, #[source] seccompiler::Error),
}

/// `_IOC_TYPE` of every KVM ioctl.
const KVM_IOCTL_TYPE: u64 = 0xae;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| e.to_string())
}

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut allowed: Vec<i64> = vec![
        // memory and threads
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_getrandom,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        // a panic aborts through these
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_tgkill,
        // time
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // I/O on fds the VMM already holds (serial output, disks, eventfds, sockets, tap)
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_epoll_ctl,
        // std checks an fd is open before closing it (debug builds), and sets O_NONBLOCK
        libc::SYS_fcntl,
    ];
    if kind == ThreadKind::DeviceEvents {
        allowed.extend([libc::SYS_epoll_wait, libc::SYS_epoll_pwait]);
    }
    let mut map: BTreeMap<i64, Vec<SeccompRule>> =
        allowed.into_iter().map(|s| (s, Vec::new())).collect();
    // Guest connections to host vsock ports open Unix sockets, and nothing else.
    map.insert(
        libc::SYS_socket,
        vec![
            SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])
                .map_err(|e| e.to_string())?,
        ],
    );
    // Memory, never executable: a confined thread cannot map or turn memory into code.
    // mprotect is needed because glibc's malloc grows (and, for a new thread's first
    // allocation, creates) a per-thread arena by mprotect-ing reserved PROT_NONE memory to
    // read/write; without it a vCPU or device thread that allocates under contention is
    // killed.
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        map.insert(
            nr,
            vec![SeccompRule::new(vec![cond(
                2,
                SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
                0,
            )?])
            .map_err(|e| e.to_string())?],
        );
    }
    // KVM ioctls (run, state save) and FIONBIO (std's set_nonblocking on new sockets).
    map.insert(
        libc::SYS_ioctl,
        vec![
            SeccompRule::new(vec![cond(
                1,
                SeccompCmpOp::MaskedEq(0xff00),
                KVM_IOCTL_TYPE << 8,
            )?])
            .map_err(|e| e.to_string())?,
            SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, libc::FIONBIO)?])
                .map_err(|e| e.to_string())?,
        ],
    );
    Ok(map)
}

/// Compiles the filter for `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |e: String| SeccompError::Build(kind, e);
    let f = SeccompFilter::new(
        rules(kind).map_err(build)?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| build(e.to_string()))?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

/// Installs the filter for `kind` on the calling thread (and `no_new_privs`, which seccomp
/// requires of unprivileged callers).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let prog = filter(kind)?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install(kind, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        assert!(!filter(ThreadKind::Vcpu).unwrap().is_empty());
        assert!(!filter(ThreadKind::DeviceEvents).unwrap().is_empty());
    }

    #[test]
    fn confined_threads_can_grow_a_malloc_arena() {
        for kind in [ThreadKind::Vcpu, ThreadKind::DeviceEvents] {
            std::thread::spawn(move || {
                install(kind).unwrap();
                // What glibc does for a new or growing per-thread arena.
                // SAFETY: maps and changes the protection of a fresh private mapping that
                // nothing else references, then unmaps it.
                unsafe {
                    let len = 1 << 20;
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_NONE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                        -1,
                        0,
                    );
                    assert_ne!(p, libc::MAP_FAILED);
                    assert_eq!(
                        libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_WRITE),
                        0
                    );
                    libc::munmap(p, len);
                }
            })
            .join()
            .unwrap();
        }
    }
}
