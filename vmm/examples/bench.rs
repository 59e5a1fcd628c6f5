//! VMM benchmark: prints measured figures only.
//!
//! - boot-to-first-serial-byte of the tiny `hello` guest (VM creation, kernel load, vCPU
//!   setup, and guest code up to its first `out` to COM1);
//! - restore-to-running for 128 MiB, 1 GiB and 4 GiB guests: from calling `restore()` on a
//!   snapshot until the restored guest's first write to memory is visible to the host; and
//!   the same from a VM shell made beforehand (`VmShell`: the snapshot's memory file
//!   mapped, KVM VM, memory slots, irqchip).
//!
//! Run: `cargo run -p vmm --release --example bench` (needs /dev/kvm and gcc).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::persist::RestoreSpec;
use vmm::{MachineSpec, VmConfig};

const PROGRESS: u64 = 0x30_0008;

/// Records when the first byte arrives.
#[derive(Clone, Default)]
struct FirstByte(Arc<Mutex<Option<Instant>>>);

impl Write for FirstByte {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut t = self.0.lock().unwrap();
        if t.is_none() && !b.is_empty() {
            *t = Some(Instant::now());
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn spec(kernel: &std::path::Path, mem_mib: u64, serial: Box<dyn Write + Send>) -> MachineSpec {
    let cfg = VmConfig::new(kernel, mem_mib);
    let mut spec = cfg.validate().expect("valid config");
    spec.serial = serial;
    spec
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    format!(
        "min {:.0} us, median {:.0} us, max {:.0} us (n={})",
        us(v[0]),
        us(v[v.len() / 2]),
        us(v[v.len() - 1]),
        v.len()
    )
}

/// Resident KiB of this process (VmRSS).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resident KiB of the mappings that start at the given host addresses (guest RAM).
fn mapping_rss_kib(starts: &[usize]) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut total = 0;
    let mut in_guest = false;
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let start = usize::from_str_radix(first.split('-').next().unwrap(), 16).unwrap_or(0);
            in_guest = starts.contains(&start);
        } else if in_guest && l.starts_with("Rss:") {
            total += l
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// vsock round trips and echo throughput through the Unix-socket muxer.
fn vsock_bench(dir: &std::path::Path) {
    use std::io::Read;
    let echo = common::build_guest("vsock_echo", dir);
    let uds = dir.join("bench.sock");
    let log = dir.join("echo.log");
    let cfg = VmConfig {
        serial_path: Some(log.clone()),
        vsock: Some(vmm::config::VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone(),
        }),
        ..VmConfig::new(echo, 128)
    };
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    vm.resume().unwrap();
    common::wait_for_line(&log, "ready");
    let (mut s, mut reader) = common::vsock_connect(&uds, 1234);
    let mut rtts = Vec::new();
    let mut b = [0u8; 1];
    for i in 0..200u32 {
        let t = Instant::now();
        s.write_all(&[i as u8]).unwrap();
        reader.read_exact(&mut b).unwrap();
        rtts.push(t.elapsed());
        assert_eq!(b[0], i as u8);
    }
    println!(
        "vsock round trip, 1 byte, host -> guest echo -> host: {}",
        stats(rtts)
    );
    let total: usize = 4 << 20;
    let writer_stream = s.try_clone().unwrap();
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut w = writer_stream;
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            w.write_all(&chunk[..n]).unwrap();
            sent += n;
        }
    });
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while got < total {
        let n = reader.read(&mut buf).unwrap();
        assert!(n > 0, "echo stream ended early");
        got += n;
    }
    let secs = t.elapsed().as_secs_f64();
    writer.join().unwrap();
    println!(
        "vsock echo throughput: {} MiB each way in {:.2} s = {:.1} MiB/s",
        total >> 20,
        secs,
        (total as f64 / (1 << 20) as f64) / secs
    );
}

/// `--one-clone <state> <mem>`: restore one clone, let it run, print memory figures.
fn one_clone(state: &std::path::Path, mem: &std::path::Path) {
    let before = rss_kib();
    let t0 = Instant::now();
    let mut clone = vmm::restore(RestoreSpec {
        state_path: state,
        mem_path: mem,
        serial: Box::new(std::io::sink()),
        vsock_uds_path: None,
        seccomp: true,
    })
    .unwrap();
    clone.resume().unwrap();
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(50));
    let starts: Vec<usize> = vmm::vstate::memory::host_ranges(clone.memory())
        .iter()
        .map(|(a, _)| *a)
        .collect();
    let guest = mapping_rss_kib(&starts);
    let after = rss_kib();
    println!(
        "fresh VMM process running one clone: RSS {after} KiB, of which guest pages {guest} KiB; \
         VMM without guest pages {} KiB ({} KiB above the process before restore); \
         restore+resume {:.0} us",
        after - guest,
        after.saturating_sub(before).saturating_sub(guest),
        took.as_secs_f64() * 1e6
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "--one-clone" {
        one_clone(args[2].as_ref(), args[3].as_ref());
        return;
    }
    let cap = vmm::detect();
    println!("host: {}", cap.summary);
    if !cap.dev_kvm_usable {
        return;
    }
    let dir = common::scratch("bench");
    let hello = common::build_guest("hello", &dir);
    let spin = common::build_guest("spin", &dir);

    let mut boots = Vec::new();
    for _ in 0..10 {
        let first = FirstByte::default();
        let t0 = Instant::now();
        let mut vm = vmm::build(spec(&hello, 128, Box::new(first.clone()))).unwrap();
        vm.resume().unwrap();
        vm.wait(Duration::from_secs(10)).unwrap();
        let t = first.0.lock().unwrap().expect("guest printed");
        boots.push(t - t0);
    }
    println!(
        "boot-to-first-serial-byte (128 MiB, hello guest): {}",
        stats(boots)
    );

    vsock_bench(&dir);

    // VMM_BENCH_MIB=128,1024 limits the guest sizes measured.
    let sizes: Vec<u64> = std::env::var("VMM_BENCH_MIB")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![128, 1024, 4096]);
    for mib in sizes {
        let mut vm = vmm::build(spec(&spin, mib, Box::new(std::io::sink()))).unwrap();
        vm.resume().unwrap();
        while vm.memory().read_obj::<u64>(GuestAddress(PROGRESS)).unwrap() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        vm.pause().unwrap();
        let (mem, state) = (
            dir.join(format!("mem-{mib}")),
            dir.join(format!("state-{mib}")),
        );
        let t = Instant::now();
        vm.snapshot(&mem, &state).unwrap();
        let snap_time = t.elapsed();
        drop(vm);
        let on_disk = std::fs::metadata(&mem).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        let mut to_paused = Vec::new();
        let mut to_running = Vec::new();
        let mut shell_to_running = Vec::new();
        for i in 0..40 {
            // Odd rounds restore into a VM shell made before the clock starts, as a pool
            // keeping shells ready would.
            let shell = (i % 2 == 1).then(|| vmm::VmShell::new(&state, &mem).unwrap());
            let spec = RestoreSpec {
                state_path: &state,
                mem_path: &mem,
                serial: Box::new(std::io::sink()),
                vsock_uds_path: None,
                seccomp: true,
            };
            let t0 = Instant::now();
            let mut clone = match shell {
                Some(shell) => vmm::restore_into(shell, spec),
                None => vmm::restore(spec),
            }
            .unwrap();
            let paused = t0.elapsed();
            clone
                .memory()
                .write_obj(0u64, GuestAddress(PROGRESS))
                .unwrap();
            clone.resume().unwrap();
            while clone
                .memory()
                .read_obj::<u64>(GuestAddress(PROGRESS))
                .unwrap()
                == 0
            {
                std::hint::spin_loop();
            }
            if i % 2 == 1 {
                shell_to_running.push(t0.elapsed());
            } else {
                to_paused.push(paused);
                to_running.push(t0.elapsed());
            }
        }
        // Userspace memory of a VMM process running one clone, guest pages excluded, measured
        // in a fresh process (KVM's own kernel allocations are not in RSS).
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .arg("--one-clone")
            .arg(&state)
            .arg(&mem)
            .output()
            .unwrap();
        print!(
            "{mib:>5} MiB guest: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        println!(
            "{mib:>5} MiB guest: snapshot {:.1} ms (memory file {} KiB on disk); \
             restore to paused: {}; restore to running (first guest write seen): {}; \
             restore into a prepared VM shell to running: {}",
            snap_time.as_secs_f64() * 1e3,
            on_disk.map(|b| b / 1024).unwrap_or(0),
            stats(to_paused),
            stats(to_running),
            stats(shell_to_running)
        );
        let _ = std::fs::remove_file(&mem);
    }
}
