//! virtio-vsock on the real /dev/kvm through the Unix-socket muxer: a tiny guest connects
//! out to a host listener at `<uds>_<port>`, and a host process reaches a guest port with
//! `CONNECT <port>\n` / `OK <port>\n`; bytes flow both ways.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use vmm::config::VsockConfig;
use vmm::{GuestStop, VmConfig};

#[test]
fn guest_and_host_exchange_bytes_both_ways() {
    if !common::kvm_available("guest_and_host_exchange_bytes_both_ways") {
        return;
    }
    let dir = common::scratch("vsock");
    let kernel = common::build_guest("vsock", &dir);
    let uds = dir.join("vsock.sock");
    let log = dir.join("serial.log");

    // Host service the guest connects to (guest -> host port 5000).
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 15];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"pong from host").unwrap();
        // Hold the connection until the guest shuts it down.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        buf
    });

    let cfg = VmConfig {
        vcpu_count: 1,
        mem_size_mib: 64,
        kernel_path: kernel,
        initrd_path: None,
        cmdline: String::new(),
        serial_path: Some(log.clone()),
        block_devices: vec![],
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone(),
        }),
        net_devices: vec![],
        seccomp: true,
    };
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    vm.resume().unwrap();

    assert_eq!(&server.join().unwrap(), b"ping from guest");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !common::read_log(&log).contains("listening") {
        assert!(
            Instant::now() < deadline,
            "guest never listened: {}",
            common::read_log(&log)
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // Host -> guest port 1234.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"CONNECT 1234\n").unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
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
    s.write_all(b"hello guest").unwrap();
    let mut echo = [0u8; 16];
    reader.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"echo:hello guest");
    drop(reader);
    drop(s);

    let stop = vm.wait(Duration::from_secs(60));
    let out = common::read_log(&log);
    assert_eq!(stop.unwrap(), GuestStop::Exit(0), "serial: {out}");
    assert!(out.contains("got: pong from host\n"), "{out}");
    assert!(out.ends_with("closed\n"), "{out}");
}

/// A paused VM stays still: host data arriving on a vsock connection is not put into the
/// guest's buffers until the VM resumes (a snapshot taken meanwhile must not see guest memory
/// and device state disagree).
#[test]
fn paused_vm_takes_no_host_data_until_resumed() {
    if !common::kvm_available("paused_vm_takes_no_host_data_until_resumed") {
        return;
    }
    // vsock_echo.c's receive queue: ring at 0x404000, used ring 0x2000 above, its index at +2.
    const RX_USED_IDX: u64 = 0x404000 + 0x2000 + 2;
    let dir = common::scratch("vsock-pause");
    let kernel = common::build_guest("vsock_echo", &dir);
    let uds = dir.join("echo.sock");
    let log = dir.join("serial.log");
    let cfg = VmConfig {
        vcpu_count: 1,
        mem_size_mib: 64,
        kernel_path: kernel,
        initrd_path: None,
        cmdline: String::new(),
        serial_path: Some(log.clone()),
        block_devices: vec![],
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone(),
        }),
        net_devices: vec![],
        seccomp: true,
    };
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    vm.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !common::read_log(&log).contains("ready") {
        assert!(Instant::now() < deadline, "guest never got ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"CONNECT 1234\n").unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "handshake reply {line:?}");

    vm.pause().unwrap();
    let used = |vm: &vmm::MicroVm| -> u16 {
        use vm_memory::Bytes;
        vm.memory()
            .read_obj(vm_memory::GuestAddress(RX_USED_IDX))
            .unwrap()
    };
    let before = used(&vm);
    s.write_all(b"while paused").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        used(&vm),
        before,
        "the device filled guest buffers while paused"
    );

    vm.resume().unwrap();
    let mut echo = [0u8; 12];
    reader.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"while paused");
    assert!(used(&vm) != before);
}
