//! The hybrid vsock backend: [`VsockMuxer`] relays guest streams to host Unix sockets, using
//! Firecracker's conventions (see the parent module).
//!
//! The muxer owns a private epoll instance holding the listener, the streams still sending their
//! `CONNECT` line, and every connection's stream; the device thread polls its fd and calls
//! [`VsockBackend::process_events`]. Everything is bounded:
//! - live connections by `MAX_CONNECTIONS` = 1024 (overflow: `OP_RST`, `conn_limit_hits`);
//! - half-open host streams by `MAX_PENDING_HANDSHAKES` = 64 (overflow: closed);
//! - resets for packets matching no connection by `MAX_PENDING_RESETS` = 256 (overflow: dropped,
//!   `rst_queue_overflows`);
//! - control packets owed by a live connection are flags on it, and the rx-ready list holds
//!   each live connection at most once.

mod connection;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use self::connection::{ConnState, Connection, Verdict};
use super::defs::{
    self, FIRST_LOCAL_PORT, GUEST_RESPONSE_TIMEOUT, HANDSHAKE_TIMEOUT, MAX_CONNECT_LINE,
    MAX_CONNECTIONS, MAX_PENDING_HANDSHAKES, MAX_PENDING_RESETS,
};
use super::{VsockBackend, VsockError, VsockHeader, VsockMetrics};
use crate::devices::virtio::RateLimitedLog;

/// Epoll token of the listener; stream tokens are their fds.
const LISTENER_TOKEN: u64 = u64::MAX;

static GUEST_PROTO_LOG: RateLimitedLog = RateLimitedLog::new();
static HOST_LOG: RateLimitedLog = RateLimitedLog::new();

/// A connection's identity: (host port, guest port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

/// A host stream that has not yet sent its `CONNECT <port>\n` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// Callback fired once, on the guest's first `OP_REQUEST`, with the host port it targets.
pub type FirstConnectHook = Box<dyn FnOnce(u32) + Send>;

/// The hybrid (Unix socket) vsock backend.
pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    rx_ready: VecDeque<ConnKey>,
    resets: VecDeque<VsockHeader>,
    metrics: Arc<VsockMetrics>,
    on_first_guest_connect: Option<FirstConnectHook>,
    max_connections: usize,
}

impl std::fmt::Debug for VsockMuxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockMuxer")
            .field("uds_path", &self.uds_path)
            .field("conns", &self.conns.len())
            .field("handshakes", &self.handshakes.len())
            .finish()
    }
}

impl VsockMuxer {
    /// Binds the host listener at `uds_path` (replacing a stale socket file) for the guest
    /// `guest_cid`.
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        metrics: Arc<VsockMetrics>,
        on_first_guest_connect: Option<FirstConnectHook>,
    ) -> Result<Self, VsockError> {
        let bind_err = |source| VsockError::Bind {
            path: uds_path.clone(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(&uds_path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(&uds_path).map_err(bind_err)?;
            }
        }
        let listener = UnixListener::bind(&uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockError::EpollCtl)?;
        Ok(Self {
            guest_cid,
            uds_path,
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            local_ports: HashSet::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rx_ready: VecDeque::new(),
            resets: VecDeque::new(),
            metrics,
            on_first_guest_connect,
            max_connections: MAX_CONNECTIONS,
        })
    }

    /// Lowers the connection cap (default 1024); it cannot be raised above it.
    pub fn set_max_connections(&mut self, max: usize) {
        self.max_connections = max.min(MAX_CONNECTIONS);
    }

    /// The host listener's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host streams still owing their `CONNECT` line.
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    /// Resets waiting for an rx buffer.
    pub fn pending_reset_count(&self) -> usize {
        self.resets.len()
    }

    /// Guest bytes held for the host across all connections (bounded by the credit we grant).
    pub fn held_guest_bytes(&self) -> usize {
        self.conns.values().map(Connection::pending_tx).sum()
    }

    fn queue_reset(&mut self, hdr: VsockHeader) {
        if self.resets.len() >= MAX_PENDING_RESETS {
            VsockMetrics::inc(&self.metrics.rst_queue_overflows);
            return;
        }
        self.resets.push_back(hdr);
    }

    /// Removes a connection; with `rst`, the guest is told with `OP_RST`.
    fn remove_conn(&mut self, key: ConnKey, rst: bool) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        let fd = conn.stream.as_raw_fd();
        if conn.interest.is_some() {
            // Closing the fd below removes it from epoll anyway; this is belt and braces.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.by_fd.remove(&fd);
        self.local_ports.remove(&conn.local_port);
        if conn.in_rx_ready {
            self.rx_ready.retain(|k| *k != key);
        }
        if rst {
            let mut h = VsockHeader::host_to_guest(
                self.guest_cid,
                conn.local_port,
                conn.peer_port,
                defs::OP_RST,
            );
            h.buf_alloc = 0;
            self.queue_reset(h);
        }
    }

    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => self.refresh(key),
            Verdict::Close => self.remove_conn(key, true),
            Verdict::Forget => {
                VsockMetrics::inc(&self.metrics.conns_reset);
                self.remove_conn(key, false);
            }
            Verdict::Reset => {
                VsockMetrics::inc(&self.metrics.conns_reset);
                self.remove_conn(key, true);
            }
            Verdict::CreditViolation => {
                VsockMetrics::inc(&self.metrics.credit_violations);
                VsockMetrics::inc(&self.metrics.conns_reset);
                if GUEST_PROTO_LOG.allow() {
                    tracing::warn!(port = key.local_port, "vsock: guest exceeded its credit");
                }
                self.remove_conn(key, true);
            }
        }
    }

    /// Re-syncs a connection's epoll interest and rx-ready membership with its state.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.is_finished() {
            self.remove_conn(key, true);
            return;
        }
        if let Some(current) = conn.interest {
            let want = conn.desired_interest();
            if want != current {
                match self.epoll.ctl(
                    ControlOperation::Modify,
                    conn.stream.as_raw_fd(),
                    EpollEvent::new(want, conn.stream.as_raw_fd() as u64),
                ) {
                    Ok(()) => conn.interest = Some(want),
                    Err(e) => {
                        if HOST_LOG.allow() {
                            tracing::warn!(error = %e, "vsock: epoll modify failed");
                        }
                        VsockMetrics::inc(&self.metrics.conns_reset);
                        self.remove_conn(key, true);
                        return;
                    }
                }
            }
        }
        if !conn.in_rx_ready && conn.has_pending_rx() {
            conn.in_rx_ready = true;
            self.rx_ready.push_back(key);
        }
    }

    /// Registers a new connection's stream and adds it to the table.
    fn insert_conn(&mut self, conn: Connection) -> bool {
        let key = ConnKey {
            local_port: conn.local_port,
            peer_port: conn.peer_port,
        };
        let fd = conn.stream.as_raw_fd();
        let interest = conn.desired_interest();
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(interest, fd as u64),
        ) {
            if HOST_LOG.allow() {
                tracing::warn!(error = %e, "vsock: epoll add failed");
            }
            return false;
        }
        let mut conn = conn;
        conn.interest = Some(interest);
        if conn.state == ConnState::Established {
            VsockMetrics::inc(&self.metrics.conns_opened);
        }
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.refresh(key);
        true
    }

    /// A guest `OP_REQUEST` for host port `hdr.dst_port`.
    fn guest_connect(&mut self, hdr: &VsockHeader) {
        if let Some(hook) = self.on_first_guest_connect.take() {
            hook(hdr.dst_port);
        }
        if self.conns.len() >= self.max_connections {
            VsockMetrics::inc(&self.metrics.conn_limit_hits);
            self.queue_reset(hdr.reset_reply());
            return;
        }
        let path = port_listener_path(&self.uds_path, hdr.dst_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(_) => {
                VsockMetrics::inc(&self.metrics.conns_refused);
                self.queue_reset(hdr.reset_reply());
                return;
            }
        };
        let conn = Connection::peer_init(stream, hdr.dst_port, hdr);
        if !self.insert_conn(conn) {
            self.queue_reset(hdr.reset_reply());
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
            if !self.local_ports.contains(&port) {
                return port;
            }
        }
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    if HOST_LOG.allow() {
                        tracing::warn!(error = %e, "vsock: accept failed");
                    }
                    return;
                }
            };
            if self.handshakes.len() >= MAX_PENDING_HANDSHAKES
                || stream.set_nonblocking(true).is_err()
            {
                VsockMetrics::inc(&self.metrics.handshake_failures);
                continue;
            }
            let fd = stream.as_raw_fd();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .is_err()
            {
                VsockMetrics::inc(&self.metrics.handshake_failures);
                continue;
            }
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::with_capacity(MAX_CONNECT_LINE),
                    deadline: now + HANDSHAKE_TIMEOUT,
                },
            );
        }
    }

    /// Reads the `CONNECT` line one byte at a time, so no byte after the newline is consumed.
    fn read_handshake(&mut self, fd: RawFd, now: Instant) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break parse_connect_line(&hs.line),
                Ok(_) if hs.line.len() + 1 >= MAX_CONNECT_LINE => break None,
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(peer_port) = port else {
            VsockMetrics::inc(&self.metrics.handshake_failures);
            return;
        };
        if self.conns.len() >= self.max_connections {
            VsockMetrics::inc(&self.metrics.conn_limit_hits);
            return;
        }
        let local_port = self.alloc_local_port();
        self.local_ports.insert(local_port);
        let conn = Connection::local_init(
            hs.stream,
            local_port,
            peer_port,
            now + GUEST_RESPONSE_TIMEOUT,
        );
        if !self.insert_conn(conn) {
            self.local_ports.remove(&local_port);
        }
    }

    fn conn_event(&mut self, fd: RawFd, ev: EventSet) {
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut verdict = Verdict::Keep;
        if ev.contains(EventSet::ERROR) {
            verdict = Verdict::Reset;
        } else if ev.contains(EventSet::HANG_UP) {
            // A hung-up stream stays readable forever; stop polling it.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            conn.interest = None;
            verdict = conn.on_host_hangup();
        } else {
            if ev.contains(EventSet::IN) {
                conn.readable = true;
            }
            if ev.contains(EventSet::OUT) {
                verdict = conn.flush();
            }
        }
        self.apply(key, verdict);
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.handshakes.remove(&fd);
            VsockMetrics::inc(&self.metrics.handshake_failures);
        }
        let late: Vec<(ConnKey, ConnState)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, c)| (*k, c.state))
            .collect();
        for (key, state) in late {
            if state == ConnState::AwaitingGuestResponse {
                VsockMetrics::inc(&self.metrics.conns_refused);
            }
            VsockMetrics::inc(&self.metrics.conns_reset);
            self.remove_conn(key, true);
        }
    }
}

impl VsockBackend for VsockMuxer {
    fn send_pkt(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        if hdr.type_ != defs::TYPE_STREAM {
            VsockMetrics::inc(&self.metrics.tx_unsupported);
            if hdr.op != defs::OP_RST {
                self.queue_reset(hdr.reset_reply());
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                defs::OP_REQUEST => self.guest_connect(hdr),
                defs::OP_RST => {}
                op => {
                    if !(defs::OP_REQUEST..=defs::OP_CREDIT_REQUEST).contains(&op) {
                        VsockMetrics::inc(&self.metrics.tx_unsupported);
                    }
                    self.queue_reset(hdr.reset_reply());
                }
            }
            return;
        };
        if !(defs::OP_REQUEST..=defs::OP_CREDIT_REQUEST).contains(&hdr.op) {
            VsockMetrics::inc(&self.metrics.tx_unsupported);
            if GUEST_PROTO_LOG.allow() {
                tracing::warn!(op = hdr.op, "vsock: unknown op from guest");
            }
        }
        let awaiting = conn.state == ConnState::AwaitingGuestResponse;
        let verdict = conn.on_guest_pkt(hdr, payload, Instant::now());
        if awaiting {
            if verdict == Verdict::Forget {
                VsockMetrics::inc(&self.metrics.conns_refused);
            } else if conn.state == ConnState::Established {
                VsockMetrics::inc(&self.metrics.conns_opened);
            }
        }
        self.apply(key, verdict);
    }

    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<VsockHeader> {
        if let Some(h) = self.resets.pop_front() {
            return Some(h);
        }
        // Each connection is visited at most once per call: one that has nothing for this
        // buffer (say, data but no room) goes back to the end of the list, not round again.
        for _ in 0..self.rx_ready.len() {
            let Some(key) = self.rx_ready.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_ready = false;
            let (pkt, verdict) = conn.next_rx(self.guest_cid, buf);
            match (pkt, verdict) {
                (Some(h), Verdict::Keep) => {
                    self.refresh(key);
                    return Some(h);
                }
                (None, Verdict::Keep) => self.refresh(key),
                (_, v) => {
                    self.apply(key, v);
                    if let Some(h) = self.resets.pop_front() {
                        return Some(h);
                    }
                }
            }
        }
        None
    }

    fn has_pending_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rx_ready.is_empty()
    }

    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let now = Instant::now();
        // Bounded rounds so one busy peer cannot starve the virtqueues.
        for _ in 0..16 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    if HOST_LOG.allow() {
                        tracing::warn!(error = %e, "vsock: inner epoll wait failed");
                    }
                    return;
                }
            };
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                let token = ev.data();
                if token == LISTENER_TOKEN {
                    self.accept_all(now);
                } else if self.handshakes.contains_key(&(token as RawFd)) {
                    self.read_handshake(token as RawFd, now);
                } else {
                    self.conn_event(token as RawFd, ev.event_set());
                }
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        self.expire(now);
    }

    fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key, false);
        }
        self.resets.clear();
        self.rx_ready.clear();
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// Where a guest connection to host `port` goes: `<uds_path>_<port>` (Firecracker's hybrid vsock
/// rule). The daemon's `shared_proto::ports::host_listener_path` is the same rule for our own
/// `uds_path`, `<vm-dir>/vsock.sock`; the VMM takes any `uds_path` and does not link the wire
/// crate.
pub fn port_listener_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = uds_path.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Parses `CONNECT <port>` (the newline already stripped).
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let rest = line.strip_prefix(b"CONNECT ")?;
    if rest.is_empty() || rest.len() > 10 || !rest.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// Connects to a Unix stream listener without blocking: a listener whose backlog is full
/// refuses (`EAGAIN`) instead of stalling the device thread.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let addr = UnixAddr::new(path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}
