//! A hostile driver, at random: seeded sequences of virtio-mmio register accesses and
//! requests on the real block, vsock and net devices, with no KVM involved. Each request is
//! well formed, well formed with one hostile field (an address outside guest memory, a huge
//! length, a loop, a bad next index, flipped flags), or a descriptor table and ring full of
//! garbage. Whatever the guest does, the device model must not panic or hang, and must not
//! touch host state beyond what it was given: the disk file keeps its size (a read-only one
//! its bytes), frames leaving the VM stay within the largest frame. Each test also checks
//! that requests were both completed and refused, so the inputs really reached the devices.
//! A failing run prints its seed: rerun with `VMM_FUZZ_SEED=<seed>`;
//! `VMM_FUZZ_ROUNDS=<n>` (default 150 per device) runs longer.

use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::mmio::{reg, MmioTransport};
use vmm::devices::virtio::net::Net;
use vmm::devices::virtio::status;
use vmm::devices::virtio::vsock::Vsock;
use vmm::devices::virtio::{VirtioDevice, INT_USED_RING};
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 2 << 20;
const DISK: u64 = 64 * 512;

/// xorshift64*: small, deterministic, good enough to pick inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    /// A guest address: mostly plausible, often just past the end or absurd.
    fn addr(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => MEM - self.below(64),
            2 => MEM + self.below(1 << 20),
            3 => u64::MAX - self.below(4096),
            _ => self.below(MEM),
        }
    }
    /// A buffer length: mostly small, sometimes enormous.
    fn len(&mut self) -> u32 {
        match self.below(6) {
            0 => 0,
            1 => u32::MAX - self.below(16) as u32,
            2 => self.pick(&[1, 15, 16, 44, 512, 4096, 65536]),
            3 => (16 << 20) + 1,
            _ => self.below(8192) as u32,
        }
    }
}

struct Driver {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    rng: Rng,
    /// Ring addresses of each queue as last programmed.
    rings: Vec<(u64, u64, u64, u16)>,
    kind: Kind,
    /// Per queue: where the next well-formed chain starts in the descriptor table, and the
    /// driver's available index.
    cursors: Vec<(u64, u16)>,
    outcomes: Outcomes,
}

#[derive(Clone, Copy)]
enum Kind {
    Block,
    Vsock,
    Net,
}

/// What the hostile notifications led to, so the test can tell it reached the devices.
#[derive(Default, Debug)]
struct Outcomes {
    /// The device completed at least one request (used-ring interrupt raised).
    used: u64,
    /// The device gave up on the queue and asked for a reset.
    needs_reset: u64,
}

impl Driver {
    fn write(&mut self, offset: u64, v: u32) {
        self.t.write(offset, &v.to_le_bytes());
    }
    fn read(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// The normal bring-up a driver does, with ring addresses that are usually valid.
    fn init(&mut self, queues: usize) {
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        for sel in 0..2 {
            self.write(reg::DEVICE_FEATURES_SEL, sel);
            let offered = self.read(reg::DEVICE_FEATURES);
            self.write(reg::DRIVER_FEATURES_SEL, sel);
            let noise = if self.rng.below(4) == 0 {
                self.rng.next() as u32
            } else {
                0
            };
            self.write(reg::DRIVER_FEATURES, offered | noise);
        }
        self.write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.rings.clear();
        self.cursors = vec![(0, 0); queues];
        for q in 0..queues as u32 {
            self.write(reg::QUEUE_SEL, q);
            let max = self.read(reg::QUEUE_NUM_MAX).max(1);
            let size = if self.rng.below(8) == 0 {
                self.rng.next() as u32
            } else {
                1 << self.rng.below(u64::from(max.ilog2()) + 1)
            };
            // Rings in the low 1 MiB, aligned as the spec requires, sometimes not at all.
            let base = self.rng.below(MEM / 2) & !0xfff;
            let (desc, avail, used) = if self.rng.below(10) == 0 {
                (self.rng.addr(), self.rng.addr(), self.rng.addr())
            } else {
                (base, base + 0x1000 * 4, base + 0x1000 * 6)
            };
            self.write(reg::QUEUE_NUM, size);
            for (lo, v) in [
                (reg::QUEUE_DESC_LOW, desc),
                (reg::QUEUE_AVAIL_LOW, avail),
                (reg::QUEUE_USED_LOW, used),
            ] {
                self.write(lo, v as u32);
                self.write(lo + 4, (v >> 32) as u32);
            }
            self.write(reg::QUEUE_READY, 1);
            self.rings.push((desc, avail, used, size as u16));
        }
        self.write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    fn desc(&mut self, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = self
            .mem
            .write_slice(&d, GuestAddress(table.wrapping_add(16 * i)));
    }

    /// A buffer in the upper half of guest memory (the rings live in the lower half).
    fn buffer(&mut self, len: usize) -> u64 {
        MEM / 2 + (self.rng.below(MEM / 2 - len as u64 - 1) & !7)
    }

    /// The request a well-behaved driver would put on `queue`, as (address, length, flags)
    /// buffers in order.
    fn request(&mut self, queue: usize) -> Vec<(u64, u32, u16)> {
        const WRITE: u16 = 2;
        match (self.kind, queue) {
            (Kind::Block, _) => {
                // virtio_blk_outhdr: type, ioprio, sector; IN, OUT, FLUSH, GET_ID, or junk.
                let ty = self.rng.pick(&[0u32, 0, 1, 1, 4, 8, 3]);
                let sector = self.rng.below(DISK / 512 + 8);
                let mut hdr = [0u8; 16];
                hdr[..4].copy_from_slice(&ty.to_le_bytes());
                hdr[8..].copy_from_slice(&sector.to_le_bytes());
                let h = self.buffer(16);
                let _ = self.mem.write_slice(&hdr, GuestAddress(h));
                let data_len = 512 * (1 + self.rng.below(8)) as u32;
                let data = self.buffer(data_len as usize);
                let data_flags = if ty == 1 { 0 } else { WRITE };
                let st = self.buffer(1);
                vec![(h, 16, 0), (data, data_len, data_flags), (st, 1, WRITE)]
            }
            (Kind::Vsock, 1) => {
                // A packet from the guest: header (44 bytes) and maybe a payload.
                let mut hdr = [0u8; 44];
                hdr[..8].copy_from_slice(&3u64.to_le_bytes()); // src_cid
                hdr[8..16].copy_from_slice(&self.rng.pick(&[2u64, 2, 2, 3, 99]).to_le_bytes());
                hdr[16..20].copy_from_slice(&(1024 + self.rng.below(4) as u32).to_le_bytes());
                hdr[20..24]
                    .copy_from_slice(&self.rng.pick(&[5000u32, 5000, 1234, 1]).to_le_bytes());
                let payload = self.rng.pick(&[0u32, 0, 5, 4096]);
                hdr[24..28].copy_from_slice(&payload.to_le_bytes());
                hdr[28..30].copy_from_slice(&self.rng.pick(&[1u16, 1, 1, 2]).to_le_bytes());
                // op: REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST.
                hdr[30..32].copy_from_slice(&(1 + self.rng.below(7) as u16).to_le_bytes());
                hdr[32..36].copy_from_slice(&(self.rng.below(4) as u32).to_le_bytes());
                hdr[36..40].copy_from_slice(&self.rng.pick(&[0u32, 65536, u32::MAX]).to_le_bytes());
                hdr[40..44].copy_from_slice(&(self.rng.next() as u32 & 0xffff).to_le_bytes());
                let h = self.buffer(44);
                let _ = self.mem.write_slice(&hdr, GuestAddress(h));
                let mut bufs = vec![(h, 44, 0)];
                if payload > 0 {
                    bufs.push((self.buffer(payload as usize), payload, 0));
                }
                bufs
            }
            // vsock rx and event queues: empty buffers for the device to fill.
            (Kind::Vsock, _) => vec![(self.buffer(4096), 4096, WRITE)],
            // net tx: the 12-byte virtio-net header and a frame, maybe split.
            (Kind::Net, 1) => {
                let len = self.rng.pick(&[12u32, 14, 60, 1514, 1526, 70000]);
                let split = self.rng.below(u64::from(len)) as u32;
                let a = self.buffer(len as usize);
                if split == 0 {
                    vec![(a, len, 0)]
                } else {
                    vec![(a, split, 0), (a + u64::from(split), len - split, 0)]
                }
            }
            // net rx: room for a frame, sometimes too little.
            (Kind::Net, _) => {
                let len = self.rng.pick(&[1526u32, 1526, 2048, 64]);
                vec![(self.buffer(len as usize), len, WRITE)]
            }
        }
    }

    /// Puts one to three requests on `queue` and notifies. Each is either well formed, well
    /// formed with one hostile field (an address outside memory, a huge length, a loop, a
    /// bad next index, flipped flags), or a descriptor table and ring full of garbage.
    fn scribble(&mut self, queue: usize) {
        const NEXT: u16 = 1;
        let Some(&(table, avail, _, size)) = self.rings.get(queue) else {
            self.write(reg::QUEUE_NOTIFY, queue as u32);
            return;
        };
        let n = u64::from(size.clamp(1, 32768));
        let mode = self.rng.below(3);
        if mode == 2 {
            for i in 0..n.min(256) {
                let (addr, len) = (self.rng.addr(), self.rng.len());
                // NEXT, WRITE and INDIRECT in every combination, plus junk bits.
                let flags = (self.rng.next() & 0x7) as u16 | self.rng.pick(&[0u16, 0, 0x8000]);
                let next = match self.rng.below(4) {
                    0 => i as u16,
                    1 => self.rng.next() as u16,
                    _ => ((i + 1) % n) as u16,
                };
                self.desc(table, i, addr, len, flags, next);
            }
        }
        let (mut next_desc, mut avail_idx) = self.cursors[queue];
        let chains = 1 + self.rng.below(3);
        for _ in 0..chains {
            let head = next_desc % n;
            if mode < 2 {
                let bufs = self.request(queue);
                let count = bufs.len() as u64;
                let poison = (mode == 1).then(|| self.rng.below(count));
                for (k, (mut addr, mut len, mut flags)) in bufs.into_iter().enumerate() {
                    let i = (head + k as u64) % n;
                    let mut next = ((i + 1) % n) as u16;
                    if k as u64 + 1 < count {
                        flags |= NEXT;
                    }
                    if poison == Some(k as u64) {
                        match self.rng.below(5) {
                            0 => addr = self.rng.addr(),
                            1 => len = self.rng.len(),
                            2 => flags ^= 1 << self.rng.below(3),
                            3 => next = head as u16,
                            _ => next = self.rng.next() as u16,
                        }
                    }
                    self.desc(table, i, addr, len, flags, next);
                }
                next_desc += count;
            }
            let slot = u64::from(avail_idx) % n;
            let _ = self
                .mem
                .write_obj(head as u16, GuestAddress(avail.wrapping_add(4 + 2 * slot)));
            avail_idx = avail_idx.wrapping_add(1);
        }
        self.cursors[queue] = (next_desc, avail_idx);
        let idx = if mode == 2 && self.rng.below(2) == 0 {
            self.rng.next() as u16
        } else {
            avail_idx
        };
        let _ = self.mem.write_obj(idx, GuestAddress(avail.wrapping_add(2)));
        self.write(reg::INTERRUPT_ACK, u32::MAX);
        self.write(reg::QUEUE_NOTIFY, queue as u32);
        if self.read(reg::INTERRUPT_STATUS) & INT_USED_RING != 0 {
            self.outcomes.used += 1;
        }
        if self.read(reg::STATUS) & status::DEVICE_NEEDS_RESET != 0 {
            self.outcomes.needs_reset += 1;
        }
    }

    fn step(&mut self, queues: usize, peer: Option<&UnixDatagram>) {
        if self.read(reg::STATUS) & status::DEVICE_NEEDS_RESET != 0 && self.rng.below(2) == 0 {
            self.init(queues);
            return;
        }
        match self.rng.below(12) {
            0 => self.init(queues),
            1..=6 => {
                let q = self.rng.below(queues as u64 + 1) as usize;
                self.scribble(q);
            }
            7 => {
                let off = self.rng.below(0x100) & !3;
                let v = self.rng.next() as u32;
                self.write(off, v);
            }
            8 => {
                let off = self.rng.below(0x200);
                let len = self.rng.pick(&[1usize, 2, 3, 4, 8, 16]);
                let mut b = vec![0u8; len];
                self.t.read(off, &mut b);
                let v = self.rng.next().to_le_bytes();
                self.t.write(off, &v[..len.min(8)]);
            }
            9 => {
                if let Some(peer) = peer {
                    // A frame from the outside world for the guest.
                    let len = self.rng.pick(&[12usize, 60, 1526, 4000]);
                    let _ = peer.send(&vec![0xab; len]);
                }
                self.t.backend_event();
            }
            10 => {
                let v = self.rng.next() as u32;
                self.write(reg::INTERRUPT_ACK, v);
            }
            _ => {
                let q = self.rng.below(queues as u64 + 2) as u32;
                self.write(reg::QUEUE_NOTIFY, q);
            }
        }
    }
}

fn run(
    seed: u64,
    kind: Kind,
    device: Box<dyn VirtioDevice>,
    peer: Option<&UnixDatagram>,
    steps: usize,
) -> Outcomes {
    let queues = device.queue_max_sizes().len();
    let mem = vmm::vstate::memory::anonymous(MEM).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut d = Driver {
        t: MmioTransport::new(device, mem.clone(), irq),
        mem,
        rng: Rng(seed | 1),
        rings: Vec::new(),
        kind,
        cursors: Vec::new(),
        outcomes: Outcomes::default(),
    };
    d.init(queues);
    for _ in 0..steps {
        d.step(queues, peer);
    }
    d.outcomes
}

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("VMM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![s];
    }
    let rounds: u64 = std::env::var("VMM_FUZZ_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    (1..=rounds)
        .map(|r| r.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect()
}

fn with_seed(seed: u64, total: &mut Outcomes, f: impl FnOnce() -> Outcomes) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(o) => {
            total.used += o.used;
            total.needs_reset += o.needs_reset;
        }
        Err(e) => {
            eprintln!("failing seed: VMM_FUZZ_SEED={seed}");
            std::panic::resume_unwind(e);
        }
    }
}

/// Both outcomes must occur, or the inputs never got past the transport.
fn check_reached(device: &str, total: &Outcomes) {
    eprintln!("{device}: {total:?}");
    if std::env::var("VMM_FUZZ_SEED").is_err() {
        assert!(total.used > 0, "{device}: no request ever completed");
        assert!(total.needs_reset > 0, "{device}: no chain was ever refused");
    }
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("vmm-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn random_drivers_cannot_break_the_block_device_or_grow_its_disk() {
    let dir = scratch("blk");
    let disk = dir.join("disk.img");
    let mut total = Outcomes::default();
    for seed in seeds() {
        let pattern: Vec<u8> = (0..DISK).map(|i| (i % 251) as u8).collect();
        std::fs::write(&disk, &pattern).unwrap();
        let read_only = seed % 3 == 0;
        with_seed(seed, &mut total, || {
            let disk = Block::open(&disk, read_only).unwrap();
            run(seed, Kind::Block, Box::new(disk), None, 200)
        });
        let after = std::fs::read(&disk).unwrap();
        assert_eq!(
            after.len() as u64,
            DISK,
            "seed {seed} changed the disk size"
        );
        if read_only {
            assert!(after == pattern, "seed {seed} wrote to a read-only disk");
        }
    }
    check_reached("block", &total);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn random_drivers_cannot_break_the_vsock_device() {
    let dir = scratch("vsock");
    // Something to connect to, so some guest-initiated connections get further than a reset.
    let listener = std::os::unix::net::UnixListener::bind(dir.join("v.sock_5000")).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut total = Outcomes::default();
    for seed in seeds() {
        let sock = dir.join("v.sock");
        let _ = std::fs::remove_file(&sock);
        with_seed(seed, &mut total, || {
            let vsock = Vsock::new(3, &sock).unwrap();
            run(seed, Kind::Vsock, Box::new(vsock), None, 200)
        });
        while listener.accept().is_ok() {}
    }
    check_reached("vsock", &total);
    drop(listener);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn random_drivers_cannot_break_the_net_device() {
    let mut total = Outcomes::default();
    for seed in seeds() {
        // A datagram socket pair stands in for the tap: like a tap it keeps frame
        // boundaries, and the device only reads and writes its fd.
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        // SAFETY: `ours` is an open fd whose ownership moves to the device; it behaves as the
        // non-blocking, frame-preserving fd the device expects of a tap.
        let net = unsafe { Net::from_raw_fd(ours.into_raw_fd(), [2, 0, 0, 0, 0, 1]) }.unwrap();
        with_seed(seed, &mut total, || {
            run(seed, Kind::Net, Box::new(net), Some(&theirs), 200)
        });
        // Frames the guest sent arrived whole, never beyond the largest the device allows.
        let mut buf = vec![0u8; 1 << 17];
        while let Ok(n) = theirs.recv(&mut buf) {
            assert!(
                (12..=65562).contains(&n),
                "seed {seed}: a {n}-byte frame left the VM"
            );
        }
    }
    check_reached("net", &total);
}
