//! The jailed VMM against the real kernel and /dev/kvm: tiny guests (vmm/tests/guests,
//! built with gcc) run under `sessiond vmm-jail-init` as an unprivileged uid in their own
//! namespaces and chroot, one of them exchanging frames through a tap in its own network
//! namespace; a syscall outside the VMM's seccomp policy kills the jailed process; `sessiond vmm` and `sessiond host` work from the command line. They need
//! root, /dev/kvm, gcc, nsenter, ip and python3; without them each test prints why and returns.
//!
//! A test binary of its own (`harness = false`): like `sessiond`, it dispatches
//! `vmm-jail-init` first thing in main, single-threaded, so one test can run the real jail
//! around a payload that must die of SIGSYS.

// The daemon is a binary crate: its jail modules are compiled in here directly.
#[allow(dead_code, unused_imports)]
#[path = "../src/jail/mod.rs"]
mod jail;
#[allow(dead_code, unused_imports)]
#[path = "../src/vmm_jail/mod.rs"]
mod vmm_jail;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use vmm_jail::{Boot, VmmJail, VmmJailConfig, VmmLimits, VmmSpec};

const MIB: u64 = 1024 * 1024;
/// `sessiond vmm-jail-init` exits with 128 + the signal that killed the VMM.
const KILLED_BY_SIGSYS: i32 = 128 + libc::SIGSYS;

/// Payload of the seccomp test, in place of the VMM: already jailed, as the VM's uid.
fn forbidden_syscall(_: &vmm_jail::VmmInitSpec) -> Result<u8, String> {
    if nix::unistd::getuid().is_root() {
        return Err("the payload runs as root".to_owned());
    }
    // What every vCPU thread of the VMM installs before running guest code.
    vmm::seccomp::install(vmm::seccomp::ThreadKind::Vcpu).map_err(|e| e.to_string())?;
    vmm_jail::init::signal_ready();
    // SAFETY: plain socket(2); a VMM never opens network sockets, so this must kill it.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    Ok(0)
}

/// A test: its name and body.
type Test = fn(&Env);

fn main() -> ExitCode {
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new("vmm-jail-init")) {
        vmm_jail::init::run_with(forbidden_syscall);
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let tests: &[(&str, Test)] = &[
        (
            "a_jailed_guest_runs_as_a_non_root_uid_and_exits_with_its_status",
            a_jailed_guest_runs_as_a_non_root_uid_and_exits_with_its_status,
        ),
        (
            "the_jailed_vmm_sees_only_its_chroot_and_namespaces",
            the_jailed_vmm_sees_only_its_chroot_and_namespaces,
        ),
        (
            "a_jailed_bzimage_gets_its_initrd_and_command_line",
            a_jailed_bzimage_gets_its_initrd_and_command_line,
        ),
        (
            "a_syscall_outside_the_seccomp_policy_kills_the_jailed_vmm",
            a_syscall_outside_the_seccomp_policy_kills_the_jailed_vmm,
        ),
        (
            "a_jailed_guest_exchanges_frames_through_its_own_tap",
            a_jailed_guest_exchanges_frames_through_its_own_tap,
        ),
        (
            "a_snapshot_is_restored_jailed_and_finishes_its_computation",
            a_snapshot_is_restored_jailed_and_finishes_its_computation,
        ),
        (
            "spawn_reports_why_the_vm_could_not_start",
            spawn_reports_why_the_vm_could_not_start,
        ),
        (
            "sessiond_vmm_runs_a_config_and_exits_with_the_guest_status",
            sessiond_vmm_runs_a_config_and_exits_with_the_guest_status,
        ),
        (
            "sessiond_host_reports_kvm_with_evidence",
            sessiond_host_reports_kvm_with_evidence,
        ),
    ];
    let env = match Env::new() {
        Ok(env) => env,
        Err(reason) => {
            // scripts/test sets SESSIOND_TEST_STRICT=1 on the machines that have everything.
            if std::env::var("SESSIOND_TEST_STRICT").as_deref() == Ok("1") {
                eprintln!("the jailed VMM tests cannot run ({reason}) and SESSIOND_TEST_STRICT=1");
                return ExitCode::FAILURE;
            }
            eprintln!("skipping the jailed VMM tests: {reason}");
            return ExitCode::SUCCESS;
        }
    };
    let mut failed = Vec::new();
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        println!("test {name} ...");
        match std::panic::catch_unwind(|| test(&env)) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("failed: {failed:?}");
        ExitCode::FAILURE
    }
}

/// What every test needs: a scratch directory and the guests.
struct Env {
    dir: PathBuf,
    hello: PathBuf,
    spin: PathBuf,
    net: PathBuf,
    compute: PathBuf,
    /// The zero-page reporter packaged as a bzImage.
    bootparams: PathBuf,
}

impl Env {
    fn new() -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root (namespaces, cgroups, mknod)".to_owned());
        }
        let cap = vmm::detect();
        if !cap.dev_kvm_usable {
            return Err(cap.summary);
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmm-jail");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let build = |name| vmm::test_guests::build(name, &dir).map_err(|e| format!("{e}"));
        Ok(Self {
            hello: build("hello")?,
            spin: build("spin")?,
            net: build("net")?,
            compute: build("compute")?,
            bootparams: vmm::test_guests::build_bzimage("bootparams", &dir)
                .map_err(|e| format!("{e}"))?,
            dir,
        })
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A jail of its own per test (run dir, cgroup name, uid range).
fn jail(env: &Env, name: &str, uid_block: u32, init_binary: &Path) -> VmmJail {
    let mut cfg = VmmJailConfig::new(env.dir.join(name));
    cfg.uid_base = 310_000 + uid_block * 100;
    cfg.cgroup_name = format!("sessiond-test-vms-{name}");
    cfg.init_binary = init_binary.to_owned();
    VmmJail::new(cfg).unwrap()
}

fn sessiond() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sessiond"))
}

fn spec(id: &str, kernel: &Path) -> VmmSpec {
    VmmSpec {
        vm_id: id.to_owned(),
        limits: VmmLimits {
            memory_bytes: 128 * MIB,
            cpu_millicores: 0,
            pids_max: 32,
        },
        boot: Boot::Kernel {
            path: kernel.to_owned(),
            initrd: None,
            cmdline: String::new(),
            vcpu_count: 1,
            mem_size_mib: 32,
        },
        disks: Vec::new(),
        net_devices: Vec::new(),
        vsock_cid: None,
        serial_log: true,
    }
}

fn status_field(pid: u32, task: Option<u32>, key: &str) -> String {
    let path = match task {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {key} in status of {pid}"))
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn a_jailed_guest_runs_as_a_non_root_uid_and_exits_with_its_status(env: &Env) {
    runtime().block_on(async {
        let jail = jail(env, "exit", 0, &sessiond());
        let mut vm = jail.spawn(spec("hello", &env.hello)).await.unwrap();
        assert_eq!(vm.uid(), Some(310_000));
        assert_eq!(vm.wait().await.unwrap(), 42);
        assert_eq!(
            std::fs::read_to_string(vm.serial_log()).unwrap(),
            "hello from the guest\n"
        );
        let cgroups = vm.cgroup_dirs();
        assert!(!cgroups.is_empty());
        let io = vm.serial_log().parent().unwrap().to_owned();
        vm.destroy().await.unwrap();
        assert!(!io.exists(), "{} left behind", io.display());
        assert!(
            cgroups.iter().all(|d| !d.exists()),
            "{cgroups:?} left behind"
        );
    });
}

fn the_jailed_vmm_sees_only_its_chroot_and_namespaces(env: &Env) {
    runtime().block_on(async {
        let jail = jail(env, "chroot", 1, &sessiond());
        let disk = env.dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let mut s = spec("spin", &env.spin);
        s.disks.push(vmm::config::BlockConfig {
            path: disk.clone(),
            read_only: true,
        });
        s.vsock_cid = Some(3);
        let vm = jail.spawn(s).await.unwrap();
        let uid = vm.uid().unwrap();
        let pid = vm.vmm_pid().expect("the VMM runs");

        // Its root holds what the VM needs and nothing else; no /proc, /sys, /etc, libs.
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        assert_eq!(
            names(&root),
            ["dev", "io", "vm", "vm.json"].map(String::from).into()
        );
        assert_eq!(names(&root.join("dev")), ["kvm".to_owned()].into());
        assert_eq!(
            names(&root.join("vm")),
            ["disk0", "kernel"].map(String::from).into()
        );
        assert_eq!(
            names(&root.join("io")),
            ["serial.log", "vsock.sock"].map(String::from).into()
        );
        assert!(
            vm.vsock_socket().exists(),
            "the host reaches the vsock socket"
        );
        // Its own /dev/kvm node, owned by the VM's uid; the host's stays root-only.
        let meta = |p: &Path| std::fs::metadata(p).unwrap();
        use std::os::unix::fs::MetadataExt;
        let kvm = meta(&root.join("dev/kvm"));
        assert_eq!((kvm.uid(), kvm.mode() & 0o777), (uid, 0o600));
        let host_kvm = meta(Path::new("/dev/kvm"));
        assert_eq!((host_kvm.uid(), host_kvm.mode() & 0o777), (0, 0o600));
        let mounts: BTreeSet<String> = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .unwrap()
            .lines()
            .map(|l| l.split(' ').nth(4).unwrap().to_owned())
            .collect();
        assert_eq!(
            mounts,
            ["/", "/io", "/vm/disk0", "/vm/kernel"]
                .map(String::from)
                .into(),
            "mounts seen by the VMM"
        );

        // A non-root uid with no capabilities, in namespaces of its own.
        assert_eq!(
            status_field(pid, None, "Uid:"),
            format!("{uid}\t{uid}\t{uid}\t{uid}")
        );
        assert_eq!(status_field(pid, None, "CapEff:"), "0000000000000000");
        assert_eq!(status_field(pid, None, "CapBnd:"), "0000000000000000");
        assert_eq!(status_field(pid, None, "NoNewPrivs:"), "1");
        assert_eq!(
            status_field(pid, None, "NSpid:").split_whitespace().last(),
            Some("1")
        );
        for ns in ["mnt", "pid", "net", "uts", "ipc", "cgroup"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert_ne!(theirs, ours, "{ns} namespace shared with the host");
        }
        // Only its log pipes (the status pipe closed once the VM was built) and what the
        // VMM opened itself: KVM, eventfds, its files and vsock socket.
        let fds = names(&PathBuf::from(format!("/proc/{pid}/fd")));
        let pipes = fds
            .iter()
            .filter(|fd| {
                std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                    .is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"))
            })
            .count();
        assert_eq!(pipes, 2, "stdout and stderr only");
        for fd in fds {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
            let t = target.to_string_lossy();
            assert!(
                !t.starts_with('/')
                    || t.starts_with("/dev/kvm")
                    || t.starts_with("/vm/")
                    || t.starts_with("/io/")
                    || t == "/dev/null",
                "fd {fd} -> {t}"
            );
        }
        // The vCPU thread runs under the VMM's seccomp filter.
        let filtered = names(&PathBuf::from(format!("/proc/{pid}/task")))
            .into_iter()
            .filter(|t| status_field(pid, Some(t.parse().unwrap()), "Seccomp:") == "2")
            .count();
        assert!(filtered >= 1, "no thread under seccomp");

        let cgroups = vm.cgroup_dirs();
        vm.destroy().await.unwrap();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "VMM still running"
        );
        assert!(
            cgroups.iter().all(|d| !d.exists()),
            "{cgroups:?} left behind"
        );
        assert_eq!(std::fs::read(&disk).unwrap(), vec![0u8; 4096]);
    });
}

fn a_jailed_bzimage_gets_its_initrd_and_command_line(env: &Env) {
    runtime().block_on(async {
        let jail = jail(env, "initrd", 6, &sessiond());
        // Bound into the chroot read-only: it must be readable by the VM's uid.
        let initrd = env.dir.join("initrd.img");
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&initrd, &bytes).unwrap();
        let mut s = spec("bootparams", &env.bootparams);
        s.boot = Boot::Kernel {
            path: env.bootparams.clone(),
            initrd: Some(initrd),
            cmdline: "console=ttyS0 jailed=1".to_owned(),
            vcpu_count: 1,
            mem_size_mib: 32,
        };
        let mut vm = jail.spawn(s).await.unwrap();
        assert_eq!(vm.wait().await.unwrap(), 7);
        let log = std::fs::read_to_string(vm.serial_log()).unwrap();
        let fnv = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        assert!(log.contains("cmdline: console=ttyS0 jailed=1\n"), "{log}");
        assert!(
            log.contains(&format!("initrd size: {:#018x}\n", bytes.len())),
            "{log}"
        );
        assert!(
            log.contains(&format!("initrd fnv1a: {fnv:#018x}\n")),
            "{log}"
        );
        vm.destroy().await.unwrap();
    });
}

fn a_syscall_outside_the_seccomp_policy_kills_the_jailed_vmm(env: &Env) {
    runtime().block_on(async {
        // This test binary as the init: the real jail around `forbidden_syscall`.
        let me = std::env::current_exe().unwrap();
        let jail = jail(env, "seccomp", 2, &me);
        let mut vm = jail.spawn(spec("seccomp", &env.hello)).await.unwrap();
        assert_eq!(vm.wait().await.unwrap(), KILLED_BY_SIGSYS);
        vm.destroy().await.unwrap();
    });
}

/// Packets the kernel received on `link` in the network namespace of `pid`.
fn rx_packets(pid: u32, link: &str) -> Option<u64> {
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    let line = dev
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{link}:")))?;
    line.split_once(':')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn a_jailed_guest_exchanges_frames_through_its_own_tap(env: &Env) {
    const TAP: &str = "vm0";
    let in_vm_netns = |pid: u32, cmd: &[&str]| {
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(cmd)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    runtime().block_on(async {
        let jail = jail(env, "net", 4, &sessiond());
        let mut s = spec("net", &env.net);
        s.net_devices.push(vmm::config::NetConfig {
            tap_name: TAP.to_owned(),
            mac: "06:00:ac:10:00:02".to_owned(),
        });
        let mut vm = jail.spawn(s).await.unwrap();
        let uid = vm.uid().unwrap();
        let pid = vm.vmm_pid().expect("the VMM runs");
        assert!(
            names(&PathBuf::from(format!("/proc/{pid}/root/dev/net"))).contains("tun"),
            "no /dev/net/tun in the chroot"
        );
        // The tap is the VM's: in its network namespace only, owned by its uid.
        assert!(
            rx_packets(std::process::id(), TAP).is_none(),
            "{TAP} on the host"
        );
        let link = in_vm_netns(pid, &["ip", "-d", "link", "show", TAP]);
        assert!(link.contains(&format!("user {uid} group {uid}")), "{link}");
        assert!(link.contains("state UP") || link.contains(",UP"), "{link}");

        // The guest's broadcast reaches the kernel through the jailed VMM ...
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while rx_packets(pid, TAP).unwrap_or(0) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no frame from the guest"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // ... and a frame sent on the tap reaches the guest.
        let send = "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); \
                    s.bind(('vm0', 0)); \
                    s.send(bytes.fromhex('0600ac100002020000000001') + b'\\x88\\xb5' \
                    + b'hello from the host over tap')";
        in_vm_netns(pid, &["python3", "-c", send]);
        assert_eq!(vm.wait().await.unwrap(), 0);
        assert_eq!(
            std::fs::read_to_string(vm.serial_log()).unwrap(),
            "sent\nrx: hello from the host over tap\n"
        );
        vm.destroy().await.unwrap();
    });
}

fn a_snapshot_is_restored_jailed_and_finishes_its_computation(env: &Env) {
    use std::os::unix::fs::PermissionsExt;
    use vm_memory::{Bytes, GuestAddress};
    // compute.c snapshotted part way by an unjailed VMM, then run on to its answer.
    const PROGRESS: u64 = 0x30_0008;
    let dir = env.dir.join("snapshot");
    std::fs::create_dir_all(&dir).unwrap();
    let (state, memory, log) = (dir.join("state"), dir.join("mem"), dir.join("original.log"));
    let cfg = vmm::VmConfig {
        serial_path: Some(log.clone()),
        ..vmm::VmConfig::new(env.compute.clone(), 64)
    };
    let mut original = vmm::build(cfg.validate().unwrap()).unwrap();
    original.resume().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while original
        .memory()
        .read_obj::<u64>(GuestAddress(PROGRESS))
        .unwrap()
        < 4000
    {
        assert!(std::time::Instant::now() < deadline, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    original.pause().unwrap();
    original.snapshot(&memory, &state).unwrap();
    original.resume().unwrap();
    let stop = original.wait(std::time::Duration::from_secs(60)).unwrap();
    assert_eq!(stop, vmm::GuestStop::Exit(0));
    let answer = std::fs::read_to_string(&log).unwrap();
    assert!(answer.starts_with("result=0x"), "{answer}");
    // Readable by the clone's uid.
    for f in [&state, &memory] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    runtime().block_on(async {
        let jail = jail(env, "restore", 5, &sessiond());
        let mut s = spec("clone", &env.hello);
        s.boot = Boot::Snapshot { state, memory };
        let mut clone = jail.spawn(s).await.unwrap();
        assert_eq!(clone.wait().await.unwrap(), 0);
        assert_eq!(std::fs::read_to_string(clone.serial_log()).unwrap(), answer);
        clone.destroy().await.unwrap();
    });
}

fn spawn_reports_why_the_vm_could_not_start(env: &Env) {
    runtime().block_on(async {
        let jail = jail(env, "errors", 3, &sessiond());
        let not_elf = env.dir.join("not-a-kernel");
        std::fs::write(&not_elf, "#!/bin/sh\n").unwrap();
        let e = jail.spawn(spec("bad-kernel", &not_elf)).await.unwrap_err();
        let msg = format!("{}", ChainDisplay(&e));
        assert!(msg.contains("vmm-jail-init for bad-kernel failed"), "{msg}");
        assert!(msg.contains("/vm/kernel"), "{msg}");
        let e = jail.spawn(spec("../escape", &env.hello)).await.unwrap_err();
        assert!(format!("{}", ChainDisplay(&e)).contains("[a-z0-9-]"), "{e}");
        let mut small = spec("small", &env.hello);
        small.limits.memory_bytes = 16 * MIB;
        let e = jail.spawn(small).await.unwrap_err();
        assert!(e.to_string().contains("at least guest RAM"), "{e}");
        // Nothing is left of the failed VMs; the jail still works.
        assert!(names(&env.dir.join("errors/vms")).is_empty());
        let mut vm = jail.spawn(spec("after", &env.hello)).await.unwrap();
        assert_eq!(vm.wait().await.unwrap(), 42);
        vm.destroy().await.unwrap();
    });
}

struct ChainDisplay<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ChainDisplay<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

/// `sessiond vmm --config <config>`.
fn sessiond_vmm(config: &Path) -> std::process::Output {
    Command::new(sessiond())
        .args(["vmm", "--config"])
        .arg(config)
        .output()
        .unwrap()
}

fn sessiond_vmm_runs_a_config_and_exits_with_the_guest_status(env: &Env) {
    let log = env.dir.join("cli-serial.log");
    let config = env.dir.join("cli-vm.json");
    let vm = serde_json::json!({
        "mem_size_mib": 32,
        "kernel_path": env.hello,
        "serial_path": log,
    });
    std::fs::write(&config, vm.to_string()).unwrap();
    let out = sessiond_vmm(&config);
    assert_eq!(out.status.code(), Some(42), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "hello from the guest\n"
    );

    std::fs::write(&config, r#"{"mem_size_mib": 32, "kernel": "x"}"#).unwrap();
    let out = sessiond_vmm(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cli-vm.json") && stderr.contains("unknown field `kernel`"),
        "{stderr}"
    );
}

fn sessiond_host_reports_kvm_with_evidence(_env: &Env) {
    let out = Command::new(sessiond())
        .args(["host", "--output", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cap = vmm::detect();
    assert_eq!(v["kvm"], serde_json::to_value(&cap).unwrap());
    assert_eq!(v["can_boot_linux"], cap.can_boot_linux());
    assert_eq!(v["backend"], "jail");
    assert!(v["reason"]
        .as_str()
        .unwrap()
        .ends_with("using the jail backend"));
    let text = Command::new(sessiond()).arg("host").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("KVM modules:") && text.contains("Sandbox backend:   jail"),
        "{text}"
    );
}
