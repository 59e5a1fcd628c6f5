//! Snapshots on the real /dev/kvm: a guest paused mid-computation is restored as several
//! concurrent clones that each finish with the right answer and diverge on different input;
//! clones share memory with the snapshot (also when restored into a VM shell made ahead);
//! bad snapshot files and a shell made from another snapshot are refused clearly.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::persist::{RestoreSpec, SnapshotError};
use vmm::{GuestStop, MicroVm, VmConfig};

const MAILBOX: u64 = 0x30_0000;
const PROGRESS: u64 = 0x30_0008;
const DATA: u64 = 0x100_0000;
const DATA_PAGES: u64 = 4096;
const N: u64 = 40_000;
const MEM_MIB: u64 = 128;

/// What compute.c prints, computed on the host.
fn expected(data: impl Fn(u64) -> u64, mailbox: u64) -> u64 {
    let mut acc: u64 = 0;
    for i in 1..=N {
        acc = acc
            .wrapping_mul(31)
            .wrapping_add(i)
            .wrapping_add(data((i % DATA_PAGES) * 512));
    }
    acc.wrapping_add(mailbox)
}

fn data_word(index: u64) -> u64 {
    index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555
}

struct Snapshot {
    dir: PathBuf,
    mem: PathBuf,
    state: PathBuf,
    /// Removes the directory when the test passes.
    _scratch: Option<common::Scratch>,
}

/// Boots compute.c with 16 MiB of host-written data, lets it run part way, snapshots it.
fn snapshot_mid_run(test: &str) -> Snapshot {
    snapshot_mid_run_with(test, 1)
}

fn snapshot_mid_run_with(test: &str, vcpus: u8) -> Snapshot {
    let dir = common::scratch(test);
    let kernel = common::build_guest("compute", &dir);
    let cfg = VmConfig {
        vcpu_count: vcpus,
        serial_path: Some(dir.join("original.log")),
        ..VmConfig::new(kernel, MEM_MIB)
    };
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    let mut page = vec![0u8; 4096 * 8];
    let words = page.len() as u64 / 8;
    for chunk in 0..(DATA_PAGES * 4096 / page.len() as u64) {
        for (i, w) in page.chunks_mut(8).enumerate() {
            let index = chunk * words + i as u64;
            w.copy_from_slice(&data_word(index).to_le_bytes());
        }
        vm.memory()
            .write_slice(&page, GuestAddress(DATA + chunk * page.len() as u64))
            .unwrap();
    }
    vm.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.memory().read_obj::<u64>(GuestAddress(PROGRESS)).unwrap() < N / 10 {
        assert!(Instant::now() < deadline, "guest made no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause().unwrap();
    let progress: u64 = vm.memory().read_obj(GuestAddress(PROGRESS)).unwrap();
    assert!(
        progress < N,
        "snapshot must be taken mid-run (progress {progress})"
    );
    eprintln!("snapshot taken at step {progress} of {N}");
    let (mem, state) = (dir.join("mem"), dir.join("state"));
    vm.snapshot(&mem, &state).unwrap();
    drop(vm);
    Snapshot {
        dir: dir.to_path_buf(),
        mem,
        state,
        _scratch: Some(dir),
    }
}

fn spec<'a>(snap: &'a Snapshot, log: &Path) -> RestoreSpec<'a> {
    RestoreSpec {
        state_path: &snap.state,
        mem_path: &snap.mem,
        serial: Box::new(std::fs::File::create(log).unwrap()),
        vsock_uds_path: None,
        seccomp: true,
    }
}

fn restore(snap: &Snapshot, log: &Path) -> Result<MicroVm, SnapshotError> {
    vmm::restore(spec(snap, log))
}

/// Private_Dirty + Anonymous of the mapping starting at `addr`, from /proc/self/smaps, in KiB.
fn private_kib(addr: usize) -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let start = format!("{addr:x}-");
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
    lines.next().expect("mapping not found in smaps");
    let (mut dirty, mut rss) = (None, None);
    for l in lines {
        if l.split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            break;
        }
        let kib = || l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
        if l.starts_with("Private_Dirty:") {
            dirty = Some(kib());
        } else if l.starts_with("Rss:") {
            rss = Some(kib());
        }
    }
    (dirty.unwrap(), rss.unwrap())
}

#[test]
fn clones_finish_correctly_diverge_and_share_memory() {
    if !common::kvm_available("clones_finish_correctly_diverge_and_share_memory") {
        return;
    }
    let snap = snapshot_mid_run("clones");
    let inputs = [0u64, 1000, 77_777];
    // The last clone goes into a VM shell made before the restore, as a pool would.
    let mut shell = Some(vmm::VmShell::new(&snap.state, &snap.mem).unwrap());
    let mut clones = Vec::new();
    for (k, input) in inputs.iter().enumerate() {
        let log = snap.dir.join(format!("clone{k}.log"));
        let vm = if k == inputs.len() - 1 {
            vmm::restore_into(shell.take().unwrap(), spec(&snap, &log)).unwrap()
        } else {
            restore(&snap, &log).unwrap()
        };
        // Host input after restore: each clone gets its own mailbox value.
        vm.memory()
            .write_obj(*input, GuestAddress(MAILBOX))
            .unwrap();
        clones.push((vm, log, *input));
    }
    for (vm, _, _) in &mut clones {
        vm.resume().unwrap();
    }
    for (vm, log, input) in &mut clones {
        assert_eq!(
            vm.wait(Duration::from_secs(60)).unwrap(),
            GuestStop::Exit(0)
        );
        let want = format!("result={:#018x}\n", expected(data_word, *input));
        assert_eq!(common::read_log(log), want, "clone with input {input}");
        let (host, len) = vmm::vstate::memory::host_ranges(vm.memory())[0];
        assert_eq!(len as u64, MEM_MIB << 20);
        let (dirty, rss) = private_kib(host);
        eprintln!("clone input {input}: guest RAM rss {rss} KiB, private dirty {dirty} KiB");
        // The clone read all 16 MiB of data (shared page cache), but wrote only its stack and
        // a few mailbox pages.
        assert!(rss >= 16 * 1024, "clone touched its data: rss {rss} KiB");
        assert!(dirty <= 256, "clone's private memory is {dirty} KiB");
    }
    let outputs: Vec<_> = clones.iter().map(|(_, l, _)| common::read_log(l)).collect();
    assert_ne!(outputs[0], outputs[1]);
    assert_ne!(outputs[1], outputs[2]);
}

#[test]
fn bad_snapshot_files_are_refused_clearly() {
    if !common::kvm_available("bad_snapshot_files_are_refused_clearly") {
        return;
    }
    let snap = snapshot_mid_run("badsnap");
    let good = std::fs::read(&snap.state).unwrap();
    let log = snap.dir.join("bad.log");

    // Wrong version.
    let mut bytes = good.clone();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&snap.state, &bytes).unwrap();
    let e = restore(&snap, &log).err().unwrap();
    assert!(e.to_string().contains("version 99"), "{e}");

    // Corrupted payload.
    let mut bytes = good.clone();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x01;
    std::fs::write(&snap.state, &bytes).unwrap();
    let e = restore(&snap, &log).err().unwrap();
    assert!(matches!(e, SnapshotError::Checksum { .. }), "{e}");
    assert!(e.to_string().contains("corrupted"), "{e}");

    // Truncated state file.
    std::fs::write(&snap.state, &good[..good.len() - 10]).unwrap();
    let e = restore(&snap, &log).err().unwrap();
    assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");

    // Truncated memory file.
    std::fs::write(&snap.state, &good).unwrap();
    let intact = snap.dir.join("intact-mem");
    std::fs::copy(&snap.mem, &intact).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&snap.mem)
        .unwrap();
    f.set_len(MEM_MIB << 20).unwrap();
    let e = restore(&snap, &log).err().unwrap();
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(chain.contains("truncated"), "{chain}");
    std::fs::copy(&intact, &snap.mem).unwrap();

    // The memory of another snapshot of the same VM (same size): its trailer says so.
    let other = snapshot_mid_run("badsnap-other");
    let e = vmm::restore(RestoreSpec {
        mem_path: &other.mem,
        ..spec(&snap, &log)
    })
    .err()
    .unwrap();
    assert!(matches!(e, SnapshotError::MemoryMismatch(_)), "{e}");

    // A VM shell made from another copy of the memory file.
    let copy = snap.dir.join("copy-mem");
    std::fs::copy(&snap.mem, &copy).unwrap();
    let shell = vmm::VmShell::new(&snap.state, &copy).unwrap();
    let e = vmm::restore_into(shell, spec(&snap, &log)).err().unwrap();
    assert!(matches!(e, SnapshotError::ShellFile(_)), "{e}");

    // The intact pair still restores.
    assert!(restore(&snap, &log).is_ok());
}

#[test]
fn devices_are_rebuilt_on_restore() {
    if !common::kvm_available("devices_are_rebuilt_on_restore") {
        return;
    }
    let dir = common::scratch("devsnap");
    let kernel = common::build_guest("compute", &dir);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 * 512]).unwrap();
    let cfg = VmConfig {
        block_devices: vec![vmm::config::BlockConfig {
            path: disk.clone(),
            read_only: true,
        }],
        vsock: Some(vmm::config::VsockConfig {
            guest_cid: 7,
            uds_path: dir.join("original.sock"),
        }),
        ..VmConfig::new(kernel, MEM_MIB)
    };
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    vm.resume().unwrap();
    while vm.memory().read_obj::<u64>(GuestAddress(PROGRESS)).unwrap() < 10 {
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause().unwrap();
    let snap = Snapshot {
        mem: dir.join("mem"),
        state: dir.join("state"),
        dir: dir.to_path_buf(),
        _scratch: None,
    };
    vm.snapshot(&snap.mem, &snap.state).unwrap();
    drop(vm);
    assert!(
        !dir.join("original.sock").exists(),
        "the VMM removes its socket"
    );

    let clone_sock = dir.join("clone.sock");
    let log = dir.join("clone.log");
    let mut clone = vmm::restore(RestoreSpec {
        state_path: &snap.state,
        mem_path: &snap.mem,
        serial: Box::new(std::fs::File::create(&log).unwrap()),
        vsock_uds_path: Some(&clone_sock),
        seccomp: true,
    })
    .unwrap();
    assert!(
        clone_sock.exists(),
        "the clone listens on its own vsock socket"
    );
    clone.resume().unwrap();
    assert_eq!(
        clone.wait(Duration::from_secs(60)).unwrap(),
        GuestStop::Exit(0)
    );
    let want = format!("result={:#018x}\n", expected(|_| 0, 0));
    assert_eq!(common::read_log(&log), want);
    drop(clone);

    // The snapshot names its disk; without it, restore says which file is missing.
    std::fs::remove_file(&disk).unwrap();
    let e = restore(&snap, &dir.join("x.log")).err().unwrap();
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(chain.contains("disk.img"), "{chain}");
}

#[test]
fn two_vcpu_vm_snapshots_and_restores() {
    if !common::kvm_available("two_vcpu_vm_snapshots_and_restores") {
        return;
    }
    let snap = snapshot_mid_run_with("smp-snap", 2);
    let log = snap.dir.join("clone.log");
    let mut vm = restore(&snap, &log).unwrap();
    vm.memory().write_obj(5u64, GuestAddress(MAILBOX)).unwrap();
    vm.resume().unwrap();
    assert_eq!(
        vm.wait(Duration::from_secs(60)).unwrap(),
        GuestStop::Exit(0)
    );
    let want = format!("result={:#018x}\n", expected(data_word, 5));
    assert_eq!(common::read_log(&log), want);
}

/// Taking a snapshot onto the files a running clone was restored from replaces them (new
/// files renamed into place): the clone, which maps the old memory file, runs on unharmed,
/// and the new pair restores.
#[test]
fn snapshotting_over_a_snapshot_in_use_leaves_its_clones_running() {
    if !common::kvm_available("snapshotting_over_a_snapshot_in_use_leaves_its_clones_running") {
        return;
    }
    let snap = snapshot_mid_run("resnap");
    let log = snap.dir.join("clone.log");
    let mut clone = restore(&snap, &log).unwrap();
    clone
        .memory()
        .write_obj(3u64, GuestAddress(MAILBOX))
        .unwrap();
    clone.resume().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    clone.pause().unwrap();
    // Onto the very files the clone came from.
    clone.snapshot(&snap.mem, &snap.state).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&snap.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    clone.resume().unwrap();
    assert_eq!(
        clone.wait(Duration::from_secs(60)).unwrap(),
        GuestStop::Exit(0)
    );
    let want = format!("result={:#018x}\n", expected(data_word, 3));
    assert_eq!(common::read_log(&log), want);

    let log2 = snap.dir.join("clone2.log");
    let mut second = restore(&snap, &log2).unwrap();
    second.resume().unwrap();
    assert_eq!(
        second.wait(Duration::from_secs(60)).unwrap(),
        GuestStop::Exit(0)
    );
    assert_eq!(
        common::read_log(&log2),
        want,
        "the second snapshot keeps input 3"
    );
}
