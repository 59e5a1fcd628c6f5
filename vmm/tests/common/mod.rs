//! Shared helpers for the VMM integration tests: build a tiny guest with gcc, skip where
//! /dev/kvm is missing, read a serial log.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Returns false (after printing why) when this host has no usable /dev/kvm. Under
/// `SESSIOND_TEST_STRICT=1` (what `scripts/test` sets on the machines that run CI, which have
/// /dev/kvm) a missing /dev/kvm fails the test instead.
pub fn kvm_available(test: &str) -> bool {
    let cap = vmm::detect();
    if !cap.dev_kvm_usable {
        skip(test, &cap.summary);
        return false;
    }
    true
}

/// Prints why `test` is skipped; panics instead under `SESSIOND_TEST_STRICT=1`, where every
/// prerequisite is expected to be present.
pub fn skip(test: &str, why: &str) {
    if std::env::var("SESSIOND_TEST_STRICT").as_deref() == Ok("1") {
        panic!("{test} cannot run ({why}) and SESSIOND_TEST_STRICT=1 forbids skipping");
    }
    eprintln!("skipping {test}: {why}");
}

/// A scratch directory removed when the test passes (kept after a failure, for debugging).
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A fresh scratch directory for one test.
pub fn scratch(test: &str) -> Scratch {
    // Integration tests get a target-local temp dir; examples sharing this file do not.
    let base = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("vmm-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// Compiles `tests/guests/<name>.c` into a freestanding ELF entered at 1 MiB in 64-bit mode.
pub fn build_guest(name: &str, out_dir: &Path) -> PathBuf {
    vmm::test_guests::build(name, out_dir).unwrap_or_else(|e| panic!("{e}: {e:?}"))
}

/// The serial log, or "" if nothing was written.
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits (up to 60 s) until the serial log contains `what`.
pub fn wait_for_line(log: &Path, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !read_log(log).contains(what) {
        assert!(
            std::time::Instant::now() < deadline,
            "guest never printed {what:?}; serial: {}",
            read_log(log)
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Connects to guest vsock `port` through the VM's Unix socket (`CONNECT <port>` / `OK
/// <host port>`); returns the stream and a reader on it, reads time out after 60 s.
pub fn vsock_connect(
    uds: &Path,
    port: u32,
) -> (
    std::os::unix::net::UnixStream,
    std::io::BufReader<std::os::unix::net::UnixStream>,
) {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("OK ") && line.ends_with('\n'),
        "handshake reply {line:?}"
    );
    line[3..]
        .trim()
        .parse::<u32>()
        .expect("OK carries the host port");
    (s, reader)
}

/// A test guest's report on serial: `key: value` lines, values in hex (`serial_hex`).
pub struct Report(pub String);

impl Report {
    pub fn text(&self, key: &str) -> &str {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
            .unwrap_or_else(|| panic!("no {key:?} line in the guest's report:\n{}", self.0))
    }

    pub fn num(&self, key: &str) -> u64 {
        let v = self.text(key);
        u64::from_str_radix(v.trim_start_matches("0x"), 16)
            .unwrap_or_else(|e| panic!("{key}: {v:?}: {e}"))
    }
}

/// A VM built by hand from the crate's parts (64 MiB, `kernel` loaded at 1 MiB, boot GDT and
/// page tables), for tests that drive `Vcpu`s themselves; returns it and the entry point.
pub fn hand_built_vm(kernel: &Path) -> (vmm::vstate::vm::Vm, u64) {
    use linux_loader::loader::{elf::Elf, KernelLoader};
    let mem = vmm::vstate::memory::anonymous(64 << 20).unwrap();
    let mut file = std::fs::File::open(kernel).unwrap();
    let entry = Elf::load(
        &mem,
        None,
        &mut file,
        Some(vm_memory::GuestAddress(1 << 20)),
    )
    .unwrap()
    .kernel_load
    .0;
    vmm::arch::x86_64::boot::write_gdt(&mem).unwrap();
    vmm::arch::x86_64::boot::write_page_tables(&mem).unwrap();
    (vmm::vstate::vm::Vm::new(mem).unwrap(), entry)
}

/// A port I/O bus holding only the exit port, for hand-built VMs (add devices to it).
pub fn exit_port_bus() -> vmm::devices::bus::Bus {
    let mut pio = vmm::devices::bus::Bus::default();
    let exit: vmm::devices::bus::SharedDevice =
        std::sync::Arc::new(std::sync::Mutex::new(vmm::devices::legacy::ExitDevice));
    pio.insert(u64::from(vmm::devices::legacy::exit::EXIT_PORT), 4, exit)
        .unwrap();
    pio
}

/// Tells a vCPU thread to stop, kicking it out of KVM_RUN until it has, and joins it.
pub fn stop_vcpu(
    commands: &std::sync::mpsc::Sender<vmm::vstate::vcpu::VcpuCommand>,
    thread: std::thread::JoinHandle<()>,
) {
    use vmm_sys_util::signal::Killable;
    let _ = commands.send(vmm::vstate::vcpu::VcpuCommand::Stop);
    while !thread.is_finished() {
        let _ = thread.kill(vmm::vstate::vcpu::kick_signal());
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    thread.join().unwrap();
}
