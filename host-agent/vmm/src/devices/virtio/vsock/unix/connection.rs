//! One relayed stream: a guest vsock connection joined to a host Unix stream.
//!
//! The state machine and both credit ledgers (virtio spec 1.2 §5.10.6.3) live here; the muxer
//! owns epoll and the connection table. Host-to-guest bytes are never buffered: they are read
//! from the Unix stream straight into the packet being built, and only while the guest has
//! credit and an rx buffer. Guest-to-host bytes are buffered only up to the credit we advertise
//! (`CONN_BUF_ALLOC`, 256 KiB); a guest sending more is a credit violation.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::super::VsockHeader;
use super::super::defs::{
    self, CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RW, OP_SHUTDOWN, SHUTDOWN_F_RECV, SHUTDOWN_F_SEND,
};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnState {
    /// Host-initiated: we owe the guest an `OP_REQUEST`, or sent it and wait for the answer.
    AwaitingGuestResponse,
    /// Data flows.
    Established,
}

/// What the muxer must do after a guest packet or a host event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Keep the connection.
    Keep,
    /// Drop the connection and send the guest `OP_RST` (a protocol error or a dead stream).
    Reset,
    /// Drop the connection and send the guest `OP_RST` as the last step of a graceful close.
    Close,
    /// Drop the connection silently (the guest reset it).
    Forget,
    /// The guest exceeded our credit: reset and count.
    CreditViolation,
}

/// A relayed stream.
#[derive(Debug)]
pub(super) struct Connection {
    pub(super) stream: UnixStream,
    pub(super) local_port: u32,
    pub(super) peer_port: u32,
    pub(super) state: ConnState,
    /// Guest-to-host bytes not yet written to the stream.
    tx_buf: VecDeque<u8>,
    /// Bytes at the front of `tx_buf` that are our own `OK <port>\n` line, not guest data.
    ctrl_bytes: usize,
    /// Guest-to-host bytes received.
    recv_cnt: Wrapping<u32>,
    /// Guest-to-host bytes written to the stream (our `fwd_cnt`).
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Host-to-guest bytes sent.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// `OP_SHUTDOWN` flags received from the guest.
    peer_shutdown: u32,
    /// The host stream hit EOF; we owe or sent the guest `OP_SHUTDOWN(SEND)`.
    host_eof: bool,
    /// The host peer is gone entirely (EPOLLHUP): no more writes possible.
    host_gone: bool,
    /// We already half-closed the stream's write side.
    wrote_shutdown: bool,
    /// The stream may have bytes to read (EPOLLIN fired, no `WouldBlock` since).
    pub(super) readable: bool,
    /// Control packets owed to the guest.
    need_request: bool,
    need_response: bool,
    need_credit_update: bool,
    need_shutdown: u32,
    /// Whether the muxer has this connection in its rx-ready list.
    pub(super) in_rx_ready: bool,
    /// The epoll interest currently registered; `None` when not registered.
    pub(super) interest: Option<EventSet>,
    /// Expiry of the current wait (guest response, graceful close).
    pub(super) deadline: Option<Instant>,
}

impl Connection {
    /// A guest-initiated connection: we connected to the host listener and owe the guest
    /// `OP_RESPONSE`.
    pub(super) fn peer_init(stream: UnixStream, local_port: u32, req: &VsockHeader) -> Self {
        let mut c = Self::new(stream, local_port, req.src_port, ConnState::Established);
        c.need_response = true;
        c.update_peer_credit(req);
        c
    }

    /// A host-initiated connection: we owe the guest `OP_REQUEST`.
    pub(super) fn local_init(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(
            stream,
            local_port,
            peer_port,
            ConnState::AwaitingGuestResponse,
        );
        c.need_request = true;
        c.deadline = Some(deadline);
        c
    }

    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            tx_buf: VecDeque::new(),
            ctrl_bytes: 0,
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shutdown: 0,
            host_eof: false,
            host_gone: false,
            wrote_shutdown: false,
            readable: false,
            need_request: false,
            need_response: false,
            need_credit_update: false,
            need_shutdown: 0,
            in_rx_ready: false,
            interest: None,
            deadline: None,
        }
    }

    /// Bytes the guest can still take from us.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes of guest data we hold, not yet written to the host stream.
    pub(super) fn pending_tx(&self) -> usize {
        self.tx_buf.len()
    }

    fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_F_RECV == 0
    }

    /// The epoll interest this connection needs now.
    pub(super) fn desired_interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.wants_read() && !self.readable && self.peer_credit() > 0 {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Whether [`Connection::next_rx`] has something to produce.
    pub(super) fn has_pending_rx(&self) -> bool {
        self.need_request
            || self.need_response
            || self.need_credit_update
            || self.need_shutdown != 0
            || (self.wants_read() && self.readable && self.peer_credit() > 0)
    }

    fn update_peer_credit(&mut self, hdr: &VsockHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    fn header(&mut self, guest_cid: u64, op: u16) -> VsockHeader {
        let mut h = VsockHeader::host_to_guest(guest_cid, self.local_port, self.peer_port, op);
        h.buf_alloc = CONN_BUF_ALLOC;
        h.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        h
    }

    /// Produces the next packet for the guest, reading host bytes into `buf` for `OP_RW`.
    /// Returns the verdict too: a failed stream read turns into a reset.
    pub(super) fn next_rx(
        &mut self,
        guest_cid: u64,
        buf: &mut [u8],
    ) -> (Option<VsockHeader>, Verdict) {
        if self.need_request {
            self.need_request = false;
            return (Some(self.header(guest_cid, OP_REQUEST)), Verdict::Keep);
        }
        if self.need_response {
            self.need_response = false;
            return (Some(self.header(guest_cid, OP_RESPONSE)), Verdict::Keep);
        }
        if self.need_credit_update {
            self.need_credit_update = false;
            return (
                Some(self.header(guest_cid, OP_CREDIT_UPDATE)),
                Verdict::Keep,
            );
        }
        if self.wants_read() && self.readable && !buf.is_empty() {
            let want = buf.len().min(self.peer_credit() as usize);
            if want > 0 {
                match self.stream.read(&mut buf[..want]) {
                    Ok(0) => self.on_host_eof(),
                    Ok(n) => {
                        self.rx_cnt += Wrapping(n as u32);
                        let mut h = self.header(guest_cid, OP_RW);
                        h.len = n as u32;
                        return (Some(h), Verdict::Keep);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return (None, Verdict::Reset),
                }
            }
        }
        if self.need_shutdown != 0 {
            let flags = std::mem::take(&mut self.need_shutdown);
            let mut h = self.header(guest_cid, OP_SHUTDOWN);
            h.flags = flags;
            return (Some(h), Verdict::Keep);
        }
        (None, Verdict::Keep)
    }

    /// Both sides finished sending and the guest heard about it: the connection can close.
    pub(super) fn is_finished(&self) -> bool {
        self.host_eof && self.need_shutdown == 0 && self.wrote_shutdown && self.tx_buf.is_empty()
    }

    /// The host stream reached EOF: tell the guest we will send no more (and receive no more
    /// if the host peer is gone entirely).
    fn on_host_eof(&mut self) {
        self.readable = false;
        if self.host_eof {
            return;
        }
        self.host_eof = true;
        self.need_shutdown |= SHUTDOWN_F_SEND;
        if self.host_gone {
            self.need_shutdown |= SHUTDOWN_F_RECV;
            self.deadline = Some(Instant::now() + defs::CLOSE_TIMEOUT);
        }
    }

    /// The host peer closed both directions (EPOLLHUP). Pending guest data cannot be delivered.
    pub(super) fn on_host_hangup(&mut self) -> Verdict {
        self.host_gone = true;
        if !self.tx_buf.is_empty() || self.state != ConnState::Established {
            return Verdict::Reset;
        }
        // Drain what the host wrote before closing; EOF then sends the shutdown.
        self.readable = true;
        if !self.wants_read() {
            self.on_host_eof();
        }
        Verdict::Keep
    }

    /// Handles a packet from the guest addressed to this connection.
    pub(super) fn on_guest_pkt(
        &mut self,
        hdr: &VsockHeader,
        payload: &[u8],
        now: Instant,
    ) -> Verdict {
        self.update_peer_credit(hdr);
        match hdr.op {
            defs::OP_RST => Verdict::Forget,
            defs::OP_RESPONSE
                if self.state == ConnState::AwaitingGuestResponse && !self.need_request =>
            {
                self.state = ConnState::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.local_port);
                self.ctrl_bytes = line.len();
                self.tx_buf.extend(line.as_bytes());
                self.flush()
            }
            defs::OP_RW if self.state == ConnState::Established => {
                if self.peer_shutdown & SHUTDOWN_F_SEND != 0 || self.host_gone {
                    return Verdict::Reset;
                }
                // What the guest may have in flight is what we advertised: buf_alloc minus
                // what it sent and has not yet heard us forward.
                let unacked = (self.recv_cnt - self.last_fwd_cnt_sent).0 as usize;
                if unacked + payload.len() > CONN_BUF_ALLOC as usize {
                    return Verdict::CreditViolation;
                }
                self.recv_cnt += Wrapping(payload.len() as u32);
                self.tx_buf.extend(payload);
                self.flush()
            }
            defs::OP_CREDIT_UPDATE => Verdict::Keep,
            defs::OP_CREDIT_REQUEST => {
                self.need_credit_update = true;
                Verdict::Keep
            }
            defs::OP_SHUTDOWN if self.state == ConnState::Established => {
                self.peer_shutdown |= hdr.flags & (SHUTDOWN_F_RECV | SHUTDOWN_F_SEND);
                if self.peer_shutdown & SHUTDOWN_F_RECV != 0 {
                    self.readable = false;
                }
                if self.tx_buf.is_empty() {
                    self.after_flush()
                } else {
                    self.deadline = Some(now + defs::CLOSE_TIMEOUT);
                    Verdict::Keep
                }
            }
            // A request for a live connection, a response we did not ask for, data before the
            // handshake, or an unknown op: reset.
            _ => Verdict::Reset,
        }
    }

    /// Writes held guest data to the host stream.
    pub(super) fn flush(&mut self) -> Verdict {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Verdict::Reset,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let ctrl = n.min(self.ctrl_bytes);
                    self.ctrl_bytes -= ctrl;
                    self.fwd_cnt += Wrapping((n - ctrl) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Verdict::Reset,
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.need_credit_update = true;
        }
        if self.tx_buf.is_empty() {
            self.after_flush()
        } else {
            Verdict::Keep
        }
    }

    /// Applies guest shutdowns that waited for held data to drain.
    fn after_flush(&mut self) -> Verdict {
        let both = SHUTDOWN_F_RECV | SHUTDOWN_F_SEND;
        if self.peer_shutdown & both == both {
            return Verdict::Close;
        }
        if self.peer_shutdown & SHUTDOWN_F_SEND != 0 && !self.wrote_shutdown {
            self.wrote_shutdown = true;
            // The peer may already be gone; the next read or write notices.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.deadline = None;
            if self.host_eof {
                // Both sides are done sending: close.
                return Verdict::Close;
            }
        }
        Verdict::Keep
    }
}
