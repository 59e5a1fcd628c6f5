//! The vCPU seccomp filter kills the VMM process on a syscall outside its list. Runs the
//! violation in a child process (this test binary re-executed), since it must die.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD_ENV: &str = "VMM_SECCOMP_CHILD";

/// In the child: confine this thread as a vCPU thread would be, show that an allowed
/// syscall works, then make a forbidden one.
#[test]
fn seccomp_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    vmm::seccomp::install(vmm::seccomp::ThreadKind::Vcpu).unwrap();
    // SAFETY: plain socket(2) calls; the fds are not used further.
    unsafe {
        assert!(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) >= 0);
        libc::write(1, b"allowed syscalls work\n".as_ptr().cast(), 22);
        // A vCPU thread never opens network sockets: this must kill the process.
        libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        libc::write(1, b"still alive\n".as_ptr().cast(), 12);
    }
}

#[test]
fn forbidden_syscall_kills_the_vmm_process() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("allowed syscalls work"), "{stdout}");
    assert!(!stdout.contains("still alive"), "{stdout}");
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{:?}", out.status);
}
