//! virtio-vsock with Firecracker's host-side model: one Unix socket per VM.
//!
//! - A host process connects to `uds_path`, writes `CONNECT <port>\n`, and once the guest
//!   accepts gets `OK <host port>\n` followed by the byte stream.
//! - A guest connection to host (CID 2) port P is forwarded to a Unix socket at
//!   `<uds_path>_<P>`, which some host process must be listening on.
//!
//! Flow control is credit-based both ways: the device never queues more guest data for a
//! host socket than the buffer it advertised, and never sends the guest more than the guest
//! advertised. Connections do not survive a snapshot: a restored device starts with none and
//! tells the guest driver (TRANSPORT_RESET event) to drop its own.

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::chain::{self, ChainError};
use super::VirtioDevice;
use packet::*;

/// virtio device id of vsock.
pub const TYPE_VSOCK: u32 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// Receive buffer advertised to the guest per connection: the most guest data the device
/// will hold for a slow host reader.
const CONN_BUF: u32 = 256 * 1024;
/// Most packets waiting for guest rx buffers. Each guest packet can queue a reply (RST,
/// RESPONSE, credit update): past this the device stops taking guest packets until the guest
/// takes replies, so a guest that never posts rx buffers cannot grow host memory.
const MAX_RX_BACKLOG: usize = 2 * QUEUE_SIZE as usize;
/// Most open connections per device: each holds a host socket and up to `CONN_BUF` bytes.
const MAX_CONNS: usize = 1024;
/// Largest chunk read from a host socket into one packet.
const READ_CHUNK: usize = 4096;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE: usize = 32;
/// Host ports handed to host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Why the vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved; use 3 or more")]
    Cid(u64),
    #[error("binding the vsock Unix socket {path:?}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the vsock event loop")]
    Epoll(#[source] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated; waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: ConnState,
    /// Guest data not yet written to the host socket.
    to_host: Vec<u8>,
    /// Bytes of guest data handed to the host socket (reported to the guest).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    host_eof: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: ConnState) -> Self {
        Conn {
            stream,
            state,
            to_host: Vec::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_eof: false,
        }
    }

    /// How many more bytes the guest can take.
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes queued guest data to the host socket without blocking.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// (host port, guest port)
type ConnKey = (u32, u32);

/// The vsock device and its Unix-socket muxer.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Arc<Epoll>,
    /// Accepted host connections still sending their `CONNECT` line.
    handshakes: Vec<(UnixStream, Vec<u8>)>,
    conns: HashMap<ConnKey, Conn>,
    /// Packets waiting for a guest rx buffer.
    rx: VecDeque<(Header, Vec<u8>)>,
    next_local_port: u32,
    reset_event_pending: bool,
}

impl Vsock {
    /// A device with guest CID `cid`, listening for host connections on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::Cid(cid));
        }
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        })?;
        listener.set_nonblocking(true).map_err(VsockError::Epoll)?;
        let epoll = super::epoll_on_input(listener.as_raw_fd()).map_err(VsockError::Epoll)?;
        Ok(Vsock {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll: Arc::new(epoll),
            handshakes: Vec::new(),
            conns: HashMap::new(),
            rx: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            reset_event_pending: false,
        })
    }

    /// Marks a restored device: the guest is told its connections are gone.
    pub fn after_restore(&mut self) {
        self.reset_event_pending = true;
    }

    /// The guest CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The host Unix socket path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    fn watch(&self, stream: &UnixStream) {
        let fd = stream.as_raw_fd();
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, fd as u64),
        ) {
            tracing::warn!(error = %e, "vsock: cannot watch a host socket");
        }
    }

    fn unwatch(&self, stream: &UnixStream) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            stream.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    fn header(&self, key: ConnKey, op: u16, len: u32) -> Header {
        let (fwd_cnt, buf_alloc) = self
            .conns
            .get(&key)
            .map_or((0, CONN_BUF), |c| (c.fwd_cnt, CONN_BUF));
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn send_ctrl(&mut self, key: ConnKey, op: u16) {
        let h = self.header(key, op, 0);
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_cnt_sent = c.fwd_cnt;
        }
        self.rx.push_back((h, Vec::new()));
    }

    fn drop_conn(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.unwatch(&c.stream);
        }
    }

    /// Handles one packet the guest sent.
    fn handle_guest_packet(&mut self, h: Header, payload: Vec<u8>) {
        let key = (h.dst_port, h.src_port);
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.rx.push_back((self.header(key, OP_RST, 0), Vec::new()));
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.drop_conn(key);
                    self.rx.push_back((self.header(key, OP_RST, 0), Vec::new()));
                    return;
                }
                if self.conns.len() >= MAX_CONNS {
                    tracing::debug!("vsock: guest connection refused: {MAX_CONNS} open");
                    self.rx.push_back((self.header(key, OP_RST, 0), Vec::new()));
                    return;
                }
                let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
                match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                    Ok(stream) => {
                        let mut c = Conn::new(stream, ConnState::Established);
                        c.peer_buf_alloc = h.buf_alloc;
                        c.peer_fwd_cnt = h.fwd_cnt;
                        self.watch(&c.stream);
                        self.conns.insert(key, c);
                        self.send_ctrl(key, OP_RESPONSE);
                    }
                    Err(e) => {
                        tracing::debug!(path, error = %e, "vsock: guest connection refused");
                        self.rx.push_back((self.header(key, OP_RST, 0), Vec::new()));
                    }
                }
            }
            OP_RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == ConnState::Connecting => {
                    c.state = ConnState::Established;
                    c.to_host
                        .extend_from_slice(format!("OK {}\n", key.0).as_bytes());
                    if c.flush().is_err() {
                        self.drop_conn(key);
                        self.send_ctrl(key, OP_RST);
                    }
                }
                _ => self.send_ctrl(key, OP_RST),
            },
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.send_ctrl(key, OP_RST);
                    return;
                };
                // The guest may not exceed the buffer we advertised.
                if c.state != ConnState::Established
                    || c.to_host.len() + payload.len() > CONN_BUF as usize
                {
                    self.drop_conn(key);
                    self.send_ctrl(key, OP_RST);
                    return;
                }
                c.to_host.extend_from_slice(&payload);
                let ok = c.flush().is_ok();
                let update = c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= CONN_BUF / 2;
                if !ok {
                    self.drop_conn(key);
                    self.send_ctrl(key, OP_RST);
                } else if update {
                    self.send_ctrl(key, OP_CREDIT_UPDATE);
                }
            }
            OP_SHUTDOWN | OP_RST => {
                if let Some(c) = self.conns.get_mut(&key) {
                    // Deliver what the guest sent before it closed (best effort, no blocking).
                    let _ = c.flush();
                }
                let known = self.conns.contains_key(&key);
                self.drop_conn(key);
                if h.op == OP_SHUTDOWN && known {
                    self.send_ctrl(key, OP_RST);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.send_ctrl(key, OP_CREDIT_UPDATE);
                }
            }
            _ => self.send_ctrl(key, OP_RST),
        }
    }

    /// Accepts host connections and reads their `CONNECT <port>` lines.
    fn service_host_handshakes(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.watch(&stream);
                        self.handshakes.push((stream, Vec::new()));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    break;
                }
            }
        }
        let pending = std::mem::take(&mut self.handshakes);
        for (mut stream, mut line) in pending {
            let mut byte = [0u8; 1];
            let mut done = None;
            // Byte by byte, so nothing after the newline is consumed before the guest accepts.
            loop {
                match stream.read(&mut byte) {
                    Ok(0) => {
                        done = Some(None);
                        break;
                    }
                    Ok(_) if byte[0] == b'\n' => {
                        done = Some(parse_connect(&line));
                        break;
                    }
                    Ok(_) if line.len() < MAX_HANDSHAKE => line.push(byte[0]),
                    Ok(_) => {
                        done = Some(None);
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        done = Some(None);
                        break;
                    }
                }
            }
            match done {
                None => self.handshakes.push((stream, line)),
                Some(None) => self.unwatch(&stream),
                Some(Some(port)) => {
                    let local = self.next_local_port;
                    self.next_local_port =
                        self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
                    let key = (local, port);
                    self.conns
                        .insert(key, Conn::new(stream, ConnState::Connecting));
                    self.send_ctrl(key, OP_REQUEST);
                }
            }
        }
    }

    /// Reads host data for established connections, within the guest's credit.
    fn service_host_data(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if let Err(e) = c.flush() {
                tracing::debug!(error = %e, "vsock: host socket write failed");
                self.drop_conn(key);
                self.send_ctrl(key, OP_RST);
                continue;
            }
            if c.state != ConnState::Established || c.host_eof {
                continue;
            }
            // Bound what waits in memory for guest rx buffers.
            if self.rx.len() >= QUEUE_SIZE as usize {
                break;
            }
            let want = (c.credit() as usize).min(READ_CHUNK);
            if want == 0 {
                continue;
            }
            let mut buf = vec![0u8; want];
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    c.host_eof = true;
                    self.drop_conn(key);
                    self.send_ctrl(key, OP_RST);
                }
                Ok(n) => {
                    buf.truncate(n);
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    c.fwd_cnt_sent = c.fwd_cnt;
                    let h = self.header(key, OP_RW, n as u32);
                    self.rx.push_back((h, buf));
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_conn(key);
                    self.send_ctrl(key, OP_RST);
                }
            }
        }
    }

    /// Moves queued packets into guest rx buffers.
    fn deliver(&mut self, rxq: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, ChainError> {
        let mut used = false;
        while let Some((mut h, mut payload)) = self.rx.pop_front() {
            let Some((index, descs)) = chain::pop(rxq, mem)? else {
                self.rx.push_front((h, payload));
                break;
            };
            let room = chain::writable_capacity(&descs)?;
            if room < HDR_LEN || (room == HDR_LEN && !payload.is_empty()) {
                return Err(ChainError::Missing("rx buffer large enough for a packet"));
            }
            // Split a packet that does not fit; the rest goes out in the next buffer.
            let fits = payload.len().min(room - HDR_LEN);
            let rest = payload.split_off(fits);
            h.len = fits as u32;
            let mut bytes = h.encode().to_vec();
            bytes.extend_from_slice(&payload);
            chain::write_writable(&descs, mem, &bytes)?;
            rxq.add_used(mem, index, bytes.len() as u32)
                .map_err(|e| ChainError::UsedRing(format!("{e:?}")))?;
            used = true;
            if !rest.is_empty() {
                let mut h2 = h;
                h2.len = rest.len() as u32;
                self.rx.push_front((h2, rest));
            }
        }
        Ok(used)
    }

    fn deliver_reset_event(
        &mut self,
        evq: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, ChainError> {
        if !self.reset_event_pending {
            return Ok(false);
        }
        let Some((index, descs)) = chain::pop(evq, mem)? else {
            return Ok(false);
        };
        let d = descs
            .first()
            .filter(|d| d.is_write_only() && d.len() >= 4)
            .ok_or(ChainError::Missing("writable event buffer"))?;
        mem.write_obj(EVENT_TRANSPORT_RESET, d.addr())
            .map_err(|_| ChainError::Missing("writable event buffer"))?;
        evq.add_used(mem, index, 4)
            .map_err(|e| ChainError::UsedRing(format!("{e:?}")))?;
        self.reset_event_pending = false;
        Ok(true)
    }

    fn pump(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, ChainError> {
        let mut used = false;
        // Drain the guest's tx queue first (it frees credit and answers handshakes); the
        // guest's next rx notification resumes it if the backlog stopped it.
        while self.rx.len() < MAX_RX_BACKLOG {
            let Some((index, descs)) = chain::pop(&mut queues[TXQ], mem)? else {
                break;
            };
            let (h, payload) = read_packet(&descs, mem)?;
            queues[TXQ]
                .add_used(mem, index, 0)
                .map_err(|e| ChainError::UsedRing(format!("{e:?}")))?;
            used = true;
            self.handle_guest_packet(h, payload);
        }
        self.service_host_handshakes();
        self.service_host_data();
        used |= self.deliver(&mut queues[RXQ], mem)?;
        used |= self.deliver_reset_event(&mut queues[EVQ], mem)?;
        Ok(used)
    }
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.trim_end_matches('\r').strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cid = self.cid.to_le_bytes();
        super::read_config_bytes(&cid, offset, data);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, ChainError> {
        self.pump(queues, mem)
    }

    fn process_backend(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, ChainError> {
        self.pump(queues, mem)
    }

    fn backend_epoll(&self) -> Option<Arc<Epoll>> {
        Some(self.epoll.clone())
    }

    fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.drop_conn(key);
        }
        self.rx.clear();
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(b"CONNECT x"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
    }

    #[test]
    fn reserved_cids_are_refused() {
        let p = std::env::temp_dir().join(format!("vmm-vsock-cid-{}", std::process::id()));
        assert!(matches!(Vsock::new(2, &p), Err(VsockError::Cid(2))));
        assert!(matches!(Vsock::new(1 << 33, &p), Err(VsockError::Cid(_))));
    }

    #[test]
    fn a_guest_that_takes_no_replies_cannot_grow_the_reply_queue() {
        use vm_memory::GuestAddress;
        let mem = crate::vstate::memory::anonymous(4 << 20).unwrap();
        let uds = std::env::temp_dir().join(format!("vmm-vsock-backlog-{}", std::process::id()));
        let mut dev = Vsock::new(3, &uds).unwrap();
        // Rings at 0x10000 (rx, never given buffers), 0x20000 (tx), 0x30000 (events).
        let mut queues: Vec<Queue> = [0x10000u32, 0x20000, 0x30000]
            .iter()
            .map(|&base| {
                let mut q = Queue::new(QUEUE_SIZE).unwrap();
                q.set_desc_table_address(Some(base), Some(0));
                q.set_avail_ring_address(Some(base + 0x1000), Some(0));
                q.set_used_ring_address(Some(base + 0x2000), Some(0));
                q.set_ready(true);
                q
            })
            .collect();
        // Connection requests to a port nobody listens on: each earns an RST.
        let request = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 7,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        mem.write_slice(&request.encode(), GuestAddress(0x40000))
            .unwrap();
        let (tx_desc, tx_avail, tx_used) = (0x20000u64, 0x21000u64, 0x22000u64);
        let mut published = 0u16;
        for _ in 0..8 {
            let consumed: u16 = mem.read_obj(GuestAddress(tx_used + 2)).unwrap();
            if consumed != published {
                break;
            }
            // A full ring of requests, all sharing one header buffer.
            for i in 0..u64::from(QUEUE_SIZE) {
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&0x40000u64.to_le_bytes());
                d[8..12].copy_from_slice(&(HDR_LEN as u32).to_le_bytes());
                mem.write_slice(&d, GuestAddress(tx_desc + 16 * i)).unwrap();
                let slot = u64::from(published.wrapping_add(i as u16) % QUEUE_SIZE);
                mem.write_obj(i as u16, GuestAddress(tx_avail + 4 + 2 * slot))
                    .unwrap();
            }
            published = published.wrapping_add(QUEUE_SIZE);
            mem.write_obj(published, GuestAddress(tx_avail + 2))
                .unwrap();
            dev.process_queue(TXQ, &mut queues, &mem).unwrap();
        }
        assert_eq!(dev.rx.len(), MAX_RX_BACKLOG);
        let consumed: u16 = mem.read_obj(GuestAddress(tx_used + 2)).unwrap();
        assert_eq!(
            usize::from(consumed),
            MAX_RX_BACKLOG,
            "tx stopped at the backlog"
        );
    }

    #[test]
    fn credit_accounts_for_unacknowledged_bytes() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, ConnState::Established);
        c.peer_buf_alloc = 1000;
        c.tx_cnt = 700;
        c.peer_fwd_cnt = 200;
        assert_eq!(c.credit(), 500);
        c.tx_cnt = 1300;
        assert_eq!(c.credit(), 0);
    }
}
