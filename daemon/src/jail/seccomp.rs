//! The sandbox's seccomp policy: a deny-list (EPERM) of what sandboxed code
//! never needs and the kernel's riskiest surface, default allow. Written in
//! Rust with seccompiler (like cloud-hypervisor's `vmm/src/seccomp_filters.rs`).
//!
//! Three filters are stacked, because seccompiler gives one action per filter:
//! the deny-list (EPERM), `clone3` (ENOSYS, so libc falls back to `clone`,
//! whose flags a filter can inspect), and on x86_64 a guard returning ENOSYS
//! for x32-ABI syscall numbers, which would otherwise bypass a deny-list keyed
//! on x86_64 numbers.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("unsupported architecture {0}")]
    Arch(&'static str),
    #[error("building the seccomp filter")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter")]
    Install(#[from] seccompiler::Error),
}

/// Syscalls denied whatever their arguments.
const DENIED: &[libc::c_long] = &[
    // File system namespace changes.
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    // Namespaces.
    libc::SYS_unshare,
    libc::SYS_setns,
    // Other processes' memory.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    // The agent is non-dumpable, which already makes the kernel refuse these
    // to processes of its uid; denied outright so that one flag is not the
    // only barrier between sandboxed code and the agent's descriptors.
    libc::SYS_pidfd_getfd,
    libc::SYS_process_madvise,
    libc::SYS_kcmp,
    // Kernel attack surface sandboxed code does not need.
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_fanotify_init,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_lookup_dcookie,
    // Whole-machine state.
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_vhangup,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_nfsservctl,
];

/// Every `CLONE_NEW*` flag `clone(2)` accepts (CLONE_NEWTIME shares its bit
/// with the exit signal there and is only valid for clone3/unshare).
const CLONE_NEW_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

/// ioctl requests denied on any descriptor: pushing input into a terminal
/// (TIOCSTI) or driving the virtual console (TIOCLINUX). The sandbox has no
/// terminal today; this keeps it so should a tty descriptor ever leak in.
// The request constants are c_ulong with glibc but c_int with musl.
#[allow(clippy::unnecessary_cast)]
const DENIED_IOCTLS: &[u64] = &[libc::TIOCSTI as u64, libc::TIOCLINUX as u64];

/// Personas allowed (Docker's list): the default, 32-bit `uname`, UNAME26,
/// both, and the query value. Anything else (e.g. ADDR_NO_RANDOMIZE) is denied.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// vsock is not network-namespaced: on a host that is itself a VM it would
/// reach the hypervisor's services despite the loopback-only namespace.
const AF_VSOCK: u64 = libc::AF_VSOCK as u64;

fn arch() -> Result<TargetArch, SeccompError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        op,
        value,
    )?)
}

fn deny_list() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let clone_rules = CLONE_NEW_FLAGS
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            Ok(SeccompRule::new(vec![cond(
                0,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?])?)
        })
        .collect::<Result<Vec<_>, SeccompError>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    let persona = PERSONALITIES
        .iter()
        .map(|&p| cond(0, SeccompCmpOp::Ne, p))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_personality, vec![SeccompRule::new(persona)?]);
    let ioctls = DENIED_IOCTLS
        .iter()
        .map(|&req| Ok(SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, req)?])?))
        .collect::<Result<Vec<_>, SeccompError>>()?;
    rules.insert(libc::SYS_ioctl, ioctls);
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpOp::Eq,
            AF_VSOCK,
        )?])?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )?;
    Ok(filter.try_into()?)
}

fn clone3() -> Result<BpfProgram, SeccompError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// Hand-written: "syscall number >= __X32_SYSCALL_BIT" is a range, which
/// seccompiler's per-number rules cannot express.
#[cfg(target_arch = "x86_64")]
fn x32_guard() -> BpfProgram {
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u32, k: u32| sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    vec![
        // seccomp_data.arch
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 4),
        jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            AUDIT_ARCH_X86_64,
            1,
            0,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
        // seccomp_data.nr
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        jump(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            X32_SYSCALL_BIT,
            0,
            1,
        ),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// The compiled filters, built before privileges are dropped (allocation is
/// fine there: jail-init is single-threaded).
pub fn sandbox_filters() -> Result<Vec<BpfProgram>, SeccompError> {
    let mut filters = vec![deny_list()?, clone3()?];
    #[cfg(target_arch = "x86_64")]
    filters.push(x32_guard());
    Ok(filters)
}

/// Installs the filters on the calling thread; requires no_new_privs.
pub fn install(filters: &[BpfProgram]) -> Result<(), SeccompError> {
    for filter in filters {
        seccompiler::apply_filter(filter)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `probe` in a forked child under the filters and returns its exit
    /// code. The child only makes raw syscalls, so forking from the
    /// multi-threaded test harness is sound.
    fn under_filters(probe: fn() -> i32) -> i32 {
        let filters = sandbox_filters().expect("filters build");
        // SAFETY: the child below only calls async-signal-safe functions
        // (prctl, seccomp via apply_filter, raw syscalls, _exit).
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                let code = if install(&filters).is_ok() {
                    probe()
                } else {
                    99
                };
                // SAFETY: leaving the forked child without running destructors.
                unsafe { libc::_exit(code) }
            }
            pid if pid > 0 => {
                let mut status = 0;
                // SAFETY: waiting for our own child with a valid status pointer.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "probe child died: {status:#x}");
                libc::WEXITSTATUS(status)
            }
            _ => panic!("fork failed"),
        }
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn filters_compile_for_this_architecture() {
        let filters = sandbox_filters().unwrap();
        assert!(filters.len() >= 2);
        assert!(filters.iter().all(|f| !f.is_empty()));
    }

    #[test]
    fn namespace_creation_is_denied_with_eperm() {
        fn probe() -> i32 {
            // SAFETY: unshare with an integer flag; fails under the filter.
            let r = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
            if r == -1 && errno() == libc::EPERM {
                0
            } else {
                1
            }
        }
        assert_eq!(under_filters(probe), 0);
    }

    #[test]
    fn clone3_reports_enosys_and_plain_fork_works() {
        fn probe() -> i32 {
            // SAFETY: clone3 with a null argument is rejected before use.
            let r = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            if !(r == -1 && errno() == libc::ENOSYS) {
                return 1;
            }
            // SAFETY: fork in a single-threaded child; the grandchild exits at once.
            match unsafe { libc::fork() } {
                // SAFETY: leaving the grandchild immediately.
                0 => unsafe { libc::_exit(0) },
                pid if pid > 0 => {
                    let mut st = 0;
                    // SAFETY: waiting for our own child.
                    unsafe { libc::waitpid(pid, &mut st, 0) };
                    0
                }
                _ => 2,
            }
        }
        assert_eq!(under_filters(probe), 0);
    }

    #[test]
    fn clone_with_a_new_namespace_flag_is_denied() {
        fn probe() -> i32 {
            let flags = (libc::CLONE_NEWNET | libc::SIGCHLD) as libc::c_ulong;
            // SAFETY: raw clone without a new stack behaves like fork; the
            // filter rejects it before the kernel acts on it.
            let r =
                unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
            if r == 0 {
                // SAFETY: leaving an unexpected child immediately.
                unsafe { libc::_exit(0) }
            }
            if r == -1 && errno() == libc::EPERM {
                0
            } else {
                1
            }
        }
        assert_eq!(under_filters(probe), 0);
    }

    #[test]
    fn vsock_and_io_uring_are_denied_but_inet_sockets_work() {
        fn probe() -> i32 {
            // SAFETY: socket(2) with integer arguments.
            let v = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) };
            if !(v == -1 && errno() == libc::EPERM) {
                return 1;
            }
            // SAFETY: io_uring_setup with a null params pointer; denied first.
            let u = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1usize, 0usize) };
            if !(u == -1 && errno() == libc::EPERM) {
                return 2;
            }
            // SAFETY: socket(2) with integer arguments.
            let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if s < 0 {
                return 3;
            }
            0
        }
        assert_eq!(under_filters(probe), 0);
    }

    #[test]
    fn tiocsti_and_the_agent_takeover_calls_are_denied() {
        fn probe() -> i32 {
            let mut fds = [0; 2];
            // SAFETY: pipe(2) writes two descriptors into our array.
            if unsafe { libc::pipe(fds.as_mut_ptr()) } < 0 {
                return 1;
            }
            let c = b'x';
            // SAFETY: ioctl with a pointer to a byte we own; denied first.
            let r = unsafe { libc::ioctl(fds[0], libc::TIOCSTI, &c) };
            if !(r == -1 && errno() == libc::EPERM) {
                return 2;
            }
            // Other ioctls still reach the kernel (ENOTTY on a pipe).
            let mut ws = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCGWINSZ writes a winsize we own.
            let r = unsafe { libc::ioctl(fds[0], libc::TIOCGWINSZ, &mut ws) };
            if !(r == -1 && errno() == libc::ENOTTY) {
                return 3;
            }
            for nr in [
                libc::SYS_pidfd_getfd,
                libc::SYS_kcmp,
                libc::SYS_process_madvise,
            ] {
                // SAFETY: integer arguments; denied before the kernel acts.
                let r = unsafe { libc::syscall(nr, 0usize, 0usize, 0usize, 0usize, 0usize) };
                if !(r == -1 && errno() == libc::EPERM) {
                    return 4;
                }
            }
            0
        }
        assert_eq!(under_filters(probe), 0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_syscalls_are_refused() {
        fn probe() -> i32 {
            // getpid through the x32 ABI: the number with __X32_SYSCALL_BIT.
            // SAFETY: a syscall without arguments.
            let r = unsafe { libc::syscall(libc::SYS_getpid | 0x4000_0000) };
            if r == -1 && errno() == libc::ENOSYS {
                0
            } else {
                1
            }
        }
        assert_eq!(under_filters(probe), 0);
    }

    #[test]
    fn personality_allows_the_query_and_denies_disabling_aslr() {
        fn probe() -> i32 {
            // SAFETY: personality(2) with an integer persona.
            let q = unsafe { libc::personality(0xffff_ffff) };
            if q < 0 {
                return 1;
            }
            // SAFETY: as above; ADDR_NO_RANDOMIZE must be refused.
            let r = unsafe { libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong) };
            if r == -1 && errno() == libc::EPERM {
                0
            } else {
                2
            }
        }
        assert_eq!(under_filters(probe), 0);
    }
}
