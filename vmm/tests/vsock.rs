//! virtio-vsock on the real /dev/kvm through the Unix-socket muxer: a tiny guest connects
//! out to a host listener at `<uds>_<port>`, and a host process reaches a guest port with
//! `CONNECT <port>\n` / `OK <port>\n`; bytes flow both ways.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use vmm::config::VsockConfig;
use vmm::{GuestStop, VmConfig};

/// Boots `kernel` with a vsock device on `uds` (guest CID 3) and lets it run.
fn start(kernel: &std::path::Path, log: &std::path::Path, uds: &std::path::Path) -> vmm::MicroVm {
    let cfg = VmConfig {
        serial_path: Some(log.to_owned()),
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: uds.to_owned(),
        }),
        ..VmConfig::new(kernel, 64)
    };
    let mut vm = vmm::build(cfg.validate().unwrap()).unwrap();
    vm.resume().unwrap();
    vm
}

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

    let mut vm = start(&kernel, &log, &uds);

    assert_eq!(&server.join().unwrap(), b"ping from guest");
    common::wait_for_line(&log, "listening");

    // Host -> guest port 1234.
    let (mut s, mut reader) = common::vsock_connect(&uds, 1234);
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
    let mut vm = start(&kernel, &log, &uds);
    common::wait_for_line(&log, "ready");
    let (mut s, mut reader) = common::vsock_connect(&uds, 1234);

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
