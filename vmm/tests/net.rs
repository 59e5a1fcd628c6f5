//! virtio-net on the real /dev/kvm with a tap device, inside a private network namespace:
//! a tiny guest sends an Ethernet frame that the host captures on the tap, and receives one
//! the host injects.

mod common;

use std::time::{Duration, Instant};

use vmm::config::NetConfig;
use vmm::{GuestStop, VmConfig};

const ETH_P_ALL: u16 = 0x0003;
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];

fn cvt(r: libc::c_int, what: &str) -> libc::c_int {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

/// Sets IFF_UP on `name` (in this thread's network namespace).
fn link_up(name: &str) {
    let s = cvt(
        // SAFETY: plain socket(2) call; the fd is closed below.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) },
        "socket",
    );
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq that outlives the calls.
    unsafe {
        cvt(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req), "SIOCGIFFLAGS");
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        cvt(libc::ioctl(s, libc::SIOCSIFFLAGS, &req), "SIOCSIFFLAGS");
        libc::close(s);
    }
}

/// A raw packet socket bound to `name`.
fn packet_socket(name: &str) -> libc::c_int {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert!(index > 0, "no interface {name}");
    let fd = cvt(
        // SAFETY: plain socket(2) call.
        unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from(ETH_P_ALL.to_be()),
            )
        },
        "packet socket",
    );
    // SAFETY: sockaddr_ll is plain data; all-zero is valid before the fields are set.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: bind reads `size_of::<sockaddr_ll>()` bytes from a live sockaddr_ll.
    cvt(
        unsafe {
            libc::bind(
                fd,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        },
        "bind",
    );
    fd
}

#[test]
fn guest_sends_and_receives_ethernet_frames_through_a_tap() {
    if !common::kvm_available("guest_sends_and_receives_ethernet_frames_through_a_tap") {
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        common::skip(
            "guest_sends_and_receives_ethernet_frames_through_a_tap",
            "no /dev/net/tun",
        );
        return;
    }
    // SAFETY: unshare(2) with CLONE_NEWNET moves only this test thread (and the threads it
    // starts: the VMM's vCPU and device threads) into a fresh network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        common::skip(
            "guest_sends_and_receives_ethernet_frames_through_a_tap",
            &format!(
                "cannot create a network namespace ({})",
                std::io::Error::last_os_error()
            ),
        );
        return;
    }
    let dir = common::scratch("net");
    let kernel = common::build_guest("net", &dir);
    let log = dir.join("serial.log");
    let tap = "vmmtest0";
    let cfg = VmConfig {
        serial_path: Some(log.clone()),
        net_devices: vec![NetConfig {
            tap_name: tap.into(),
            mac: "06:00:ac:10:00:02".into(),
        }],
        ..VmConfig::new(kernel, 64)
    };
    let spec = cfg.validate().unwrap();
    // Quiet the link (no IPv6 router solicitations) and bring it up before the guest runs.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    link_up(tap);
    let sock = packet_socket(tap);
    let mut vm = vmm::build(spec).unwrap();
    vm.resume().unwrap();

    // The guest's broadcast arrives on the tap.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 2048];
    let payload = loop {
        assert!(Instant::now() < deadline, "no frame from the guest");
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 14 {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let f = &buf[..n as usize];
        if f[12..14] == ETHERTYPE && f[6..12] == GUEST_MAC {
            assert_eq!(&f[..6], &[0xff; 6]);
            break String::from_utf8_lossy(&f[14..]).into_owned();
        }
    };
    assert_eq!(payload, "hello from the guest over virtio-net");

    // A frame from the host reaches the guest.
    let mut frame = GUEST_MAC.to_vec();
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&ETHERTYPE);
    frame.extend_from_slice(b"hello from the host over tap");
    // SAFETY: send reads frame.len() bytes from a live buffer.
    let sent = unsafe { libc::send(sock, frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(
        sent,
        frame.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );

    let stop = vm.wait(Duration::from_secs(60));
    let out = common::read_log(&log);
    assert_eq!(stop.unwrap(), GuestStop::Exit(0), "serial: {out}");
    assert_eq!(out, "sent\nrx: hello from the host over tap\n");
    // SAFETY: closing the fd this test opened.
    unsafe { libc::close(sock) };
}
