//! The vCPU seccomp filter kills the VMM process on a syscall outside its list, and on a
//! request for executable memory. Runs each violation in a child process (this test binary
//! re-executed), since it must die.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD_ENV: &str = "VMM_SECCOMP_CHILD";

/// In the child: confine this thread as a vCPU thread would be, show that allowed syscalls
/// work, then make the forbidden one `VMM_SECCOMP_CHILD` names.
#[test]
fn seccomp_child() {
    let Some(violation) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    vmm::seccomp::install(vmm::seccomp::ThreadKind::Vcpu).unwrap();
    // SAFETY: plain socket(2) and mmap(2) calls on fresh resources that nothing else uses;
    // the fds and mappings are not used further.
    unsafe {
        assert!(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) >= 0);
        let rw = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(rw, libc::MAP_FAILED);
        libc::write(1, b"allowed syscalls work\n".as_ptr().cast(), 22);
        if violation == "socket" {
            // A vCPU thread never opens network sockets.
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        } else {
            // Nor maps code.
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
        }
        libc::write(1, b"still alive\n".as_ptr().cast(), 12);
    }
}

fn run_child(violation: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, violation)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("allowed syscalls work"), "{stdout}");
    assert!(!stdout.contains("still alive"), "{violation}: {stdout}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "{violation}: {:?}",
        out.status
    );
}

#[test]
fn forbidden_syscall_kills_the_vmm_process() {
    run_child("socket");
}

#[test]
fn executable_memory_kills_the_vmm_process() {
    run_child("exec-mmap");
}
