//! The resolver one VM talks to: a DNS server on a UDP socket and a TCP listener (RFC 1035
//! length-prefixed messages) that answers only for names the VM's [`EgressPolicy`] allows.
//!
//! For each query:
//! - a message that does not parse gets FORMERR when its header can be read, and is dropped
//!   otherwise; responses and messages with other than one question are never relayed;
//! - a name no rule allows gets REFUSED, with an RFC 8914 Extended DNS Error (info-code 15,
//!   Blocked) whose EXTRA-TEXT says why, e.g. `nanoclaw: other.test not in egress allowlist`
//!   (when the query carried EDNS; without it there is nowhere to put the option);
//! - `A` for an allowed name is sent to the upstream resolver as a fresh query (new random id,
//!   no guest EDNS options), with a [`UPSTREAM_TIMEOUT`] deadline (SERVFAIL when it passes),
//!   falling back to TCP when the UDP answer is truncated. The answer is flattened: the `A`
//!   records reached from the name through its CNAME chain are given out under the name asked
//!   for, at most [`MAX_ANSWERS`], non-public addresses (loopback, private, link-local, ...)
//!   left out, with their TTL clamped to
//!   [`MIN_TTL`](super::table::MIN_TTL)..=[`MAX_TTL`](super::table::MAX_TTL); each is recorded in
//!   the [`GrantTable`] and reported as [`EgressEvent::Granted`] before the guest hears of it
//!   (an address whose event cannot be queued within [`EVENT_TIMEOUT`] is left out, and SERVFAIL
//!   sent when none is left);
//! - `AAAA` for an allowed name gets an empty NOERROR answer (IPv6 egress is denied), so
//!   clients fall back to IPv4 at once;
//! - any other type gets REFUSED with an Extended DNS Error naming the rule.
//!
//! Upstream sockets are opened in the network namespace of the thread that runs the future;
//! the caller gives the listening sockets already bound in the VM's namespace.
//!
//! Bounds: requests of at most [`MAX_QUERY_BYTES`], [`MAX_IN_FLIGHT`] UDP queries being
//! answered at once (more are dropped and counted), [`MAX_TCP_SESSIONS`] TCP sessions each idle
//! for at most [`TCP_IDLE`], answers of at most [`MAX_ANSWERS`] addresses, and the table's own
//! bounds.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::ProtoError;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::DecodeError;
use shared_proto::ratelimit::LogBudget;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::timeout;

use super::rules::{EgressPolicy, normalize_name};
use super::table::{GrantTable, clamp_ttl};
use super::{EgressEvent, EventSender, transient};

/// How long the upstream resolver has to answer one query.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest request read from the guest, over UDP or TCP.
pub const MAX_QUERY_BYTES: usize = 4096;
/// UDP queries being answered at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// TCP sessions served at once.
pub const MAX_TCP_SESSIONS: usize = 16;
/// How long a TCP session may wait for the guest's next bytes.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long a grant may wait for room in the event queue before its address is left out.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(1);
/// Addresses given out in one answer at most.
pub const MAX_ANSWERS: usize = 16;
/// CNAMEs followed in an upstream answer at most.
const MAX_CNAME_CHAIN: usize = 8;
/// The UDP payload size offered upstream and to the guest (RFC 9715's recommendation).
const EDNS_PAYLOAD: u16 = 1232;
/// RFC 8914: the EDNS option code of an Extended DNS Error.
const EDE_OPTION: u16 = 15;
/// RFC 8914 info-code 15: Blocked.
pub const EDE_BLOCKED: u16 = 15;

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// Receiving on the UDP socket failed.
    #[error("receiving a DNS query")]
    Recv(#[source] io::Error),
    /// Accepting on the TCP listener failed.
    #[error("accepting a DNS-over-TCP connection")]
    Accept(#[source] io::Error),
}

/// Why a query to the upstream resolver failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No answer within [`UPSTREAM_TIMEOUT`].
    #[error("upstream resolver did not answer within {0:?}")]
    Timeout(Duration),
    /// A socket operation failed.
    #[error("talking to the upstream resolver")]
    Io(#[source] io::Error),
    /// Building the query failed.
    #[error("encoding the upstream query")]
    Encode(#[source] ProtoError),
    /// The TCP answer did not parse.
    #[error("decoding the upstream answer")]
    Decode(#[source] DecodeError),
    /// The TCP answer was not the answer to the query sent.
    #[error("the upstream TCP answer does not match the query")]
    Mismatch,
}

/// The resolver's figures so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResolverCounters {
    /// Requests received (UDP datagrams and TCP messages).
    pub queries: u64,
    /// `A` queries sent upstream.
    pub forwarded: u64,
    /// Answers relayed from upstream (NOERROR or NXDOMAIN).
    pub answered: u64,
    /// Addresses given out.
    pub granted: u64,
    /// Queries refused by policy.
    pub refused: u64,
    /// `AAAA` queries answered empty.
    pub aaaa_empty: u64,
    /// Requests that did not parse or were not a single-question query.
    pub malformed: u64,
    /// Requests dropped because too many were in flight, or TCP sessions refused for the same.
    pub dropped: u64,
    /// Upstream failures (SERVFAIL sent).
    pub upstream_failures: u64,
    /// Addresses left out because they are not public (loopback, private, link-local, ...).
    pub non_public: u64,
    /// Events dropped because the event channel was full.
    pub events_dropped: u64,
    /// Addresses left out because the firewall could not be opened to them in time.
    pub apply_failures: u64,
}

#[derive(Debug, Default)]
struct Counts {
    queries: AtomicU64,
    forwarded: AtomicU64,
    answered: AtomicU64,
    granted: AtomicU64,
    refused: AtomicU64,
    aaaa_empty: AtomicU64,
    malformed: AtomicU64,
    dropped: AtomicU64,
    upstream_failures: AtomicU64,
    non_public: AtomicU64,
    events_dropped: AtomicU64,
    apply_failures: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

struct Inner {
    policy: Arc<EgressPolicy>,
    upstream: SocketAddr,
    events: EventSender,
    table: GrantTable,
    counts: Counts,
    in_flight: Arc<Semaphore>,
    tcp_sessions: Arc<Semaphore>,
    log: Mutex<LogBudget>,
    apply: Option<ApplyGrant>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("policy", &self.policy)
            .field("upstream", &self.upstream)
            .field("counts", &self.counts)
            .field("apply", &self.apply.is_some())
            .finish_non_exhaustive()
    }
}

/// What makes an address reachable before the guest hears of it: the daemon's part, which adds
/// `addr . port` for each of `ports` to the VM's nftables set with timeout `ttl`. It answers
/// whether that worked; an address it could not apply within [`APPLY_TIMEOUT`] is left out of
/// the answer, so the guest never learns an address its firewall would refuse.
pub type ApplyGrant = Arc<
    dyn Fn(Ipv4Addr, Vec<u16>, Duration) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>>
        + Send
        + Sync,
>;

/// How long applying one grant ([`ApplyGrant`]) may take before its address is left out.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// One VM's resolver; clones share everything.
#[derive(Debug, Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

impl Resolver {
    /// A resolver for `policy` that forwards allowed `A` queries to `upstream` and reports to
    /// `events`.
    pub fn new(policy: Arc<EgressPolicy>, upstream: SocketAddr, events: EventSender) -> Self {
        Self::build(policy, upstream, events, None)
    }

    /// [`new`](Self::new), and each address is applied with `apply` (and so reachable) before
    /// the answer that gives it out is sent.
    pub fn with_apply(
        policy: Arc<EgressPolicy>,
        upstream: SocketAddr,
        events: EventSender,
        apply: ApplyGrant,
    ) -> Self {
        Self::build(policy, upstream, events, Some(apply))
    }

    fn build(
        policy: Arc<EgressPolicy>,
        upstream: SocketAddr,
        events: EventSender,
        apply: Option<ApplyGrant>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                policy,
                upstream,
                events,
                table: GrantTable::new(),
                counts: Counts::default(),
                in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
                tcp_sessions: Arc::new(Semaphore::new(MAX_TCP_SESSIONS)),
                log: Mutex::new(LogBudget::new()),
                apply,
            }),
        }
    }

    /// The addresses given out, for the SNI check.
    pub fn table(&self) -> GrantTable {
        self.inner.table.clone()
    }

    /// The figures so far.
    pub fn counters(&self) -> ResolverCounters {
        let c = &self.inner.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ResolverCounters {
            queries: get(&c.queries),
            forwarded: get(&c.forwarded),
            answered: get(&c.answered),
            granted: get(&c.granted),
            refused: get(&c.refused),
            aaaa_empty: get(&c.aaaa_empty),
            malformed: get(&c.malformed),
            dropped: get(&c.dropped),
            upstream_failures: get(&c.upstream_failures),
            non_public: get(&c.non_public),
            events_dropped: get(&c.events_dropped),
            apply_failures: get(&c.apply_failures),
        }
    }

    /// Serves queries on `socket` until receiving fails for a reason other than an ICMP error
    /// from an earlier reply.
    pub async fn serve_udp(&self, socket: UdpSocket) -> Result<(), DnsError> {
        let socket = Arc::new(socket);
        let mut buf = vec![0u8; MAX_QUERY_BYTES + 1];
        loop {
            let (n, peer) = match socket.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) if transient(&e) => continue,
                Err(e) => return Err(DnsError::Recv(e)),
            };
            let Ok(permit) = self.inner.in_flight.clone().try_acquire_owned() else {
                bump(&self.inner.counts.dropped);
                bump(&self.inner.counts.queries);
                self.guest_log(|s| {
                    tracing::warn!(
                        suppressed = s,
                        "egress dns: too many queries in flight, dropping one"
                    )
                });
                continue;
            };
            let request = buf[..n].to_vec();
            let this = self.clone();
            let socket = socket.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(reply) = this.answer(&request, Transport::Udp).await
                    && let Err(e) = socket.send_to(&reply, peer).await
                {
                    this.guest_log(|s| tracing::warn!(suppressed = s, error = %e, "egress dns: sending a reply failed"));
                }
            });
        }
    }

    /// Serves length-prefixed queries on connections accepted from `listener`, until accepting
    /// fails for a reason other than a lack of descriptors or memory.
    pub async fn serve_tcp(&self, listener: TcpListener) -> Result<(), DnsError> {
        loop {
            let stream = super::accept(&listener, &self.inner.log, "dns")
                .await
                .map_err(DnsError::Accept)?;
            let Ok(permit) = self.inner.tcp_sessions.clone().try_acquire_owned() else {
                bump(&self.inner.counts.dropped);
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                this.tcp_session(stream).await;
            });
        }
    }

    async fn tcp_session(&self, mut stream: TcpStream) {
        loop {
            let Ok(Ok(len)) = timeout(TCP_IDLE, stream.read_u16()).await else {
                return;
            };
            let len = usize::from(len);
            if len > MAX_QUERY_BYTES {
                bump(&self.inner.counts.queries);
                bump(&self.inner.counts.malformed);
                self.guest_log(|s| {
                    tracing::warn!(
                        suppressed = s,
                        len,
                        "egress dns: TCP query too long, closing"
                    )
                });
                return;
            }
            let mut request = vec![0u8; len];
            let Ok(Ok(_)) = timeout(TCP_IDLE, stream.read_exact(&mut request)).await else {
                return;
            };
            let Some(reply) = self.answer(&request, Transport::Tcp).await else {
                return;
            };
            let Ok(reply_len) = u16::try_from(reply.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&reply_len.to_be_bytes());
            framed.extend_from_slice(&reply);
            let Ok(Ok(())) = timeout(TCP_IDLE, stream.write_all(&framed)).await else {
                return;
            };
        }
    }

    /// Answers one request received over UDP, as [`serve_udp`](Self::serve_udp) does: the
    /// reply to send back, or `None` to send nothing.
    pub async fn answer_udp(&self, request: &[u8]) -> Option<Vec<u8>> {
        self.answer(request, Transport::Udp).await
    }

    async fn answer(&self, request: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let counts = &self.inner.counts;
        bump(&counts.queries);
        if request.len() > MAX_QUERY_BYTES {
            bump(&counts.malformed);
            self.guest_log(|s| {
                tracing::warn!(
                    suppressed = s,
                    len = request.len(),
                    "egress dns: query too long, dropped"
                )
            });
            return None;
        }
        let query = match Message::from_vec(request) {
            Ok(m) => m,
            Err(e) => {
                bump(&counts.malformed);
                self.guest_log(
                    |s| tracing::warn!(suppressed = s, error = %e, "egress dns: malformed query"),
                );
                return format_error(request);
            }
        };
        if query.metadata.message_type != MessageType::Query {
            bump(&counts.malformed);
            return None;
        }
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        let edns = query.edns.is_some();
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(EDNS_PAYLOAD);
            reply.set_edns(e);
        }
        let max_len = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => usize::from(query.max_payload().clamp(512, EDNS_PAYLOAD)),
        };
        if query.metadata.op_code != OpCode::Query {
            reply.metadata.response_code = ResponseCode::NotImp;
            return encode(&reply, max_len);
        }
        let [question] = query.queries.as_slice() else {
            bump(&counts.malformed);
            reply.metadata.response_code = ResponseCode::FormErr;
            return encode(&reply, max_len);
        };
        reply.add_query(question.clone());
        let name = normalize_name(&question.name().to_ascii());

        if question.query_class() != DNSClass::IN {
            let why = format!(
                "nanoclaw: class {} queries are not served",
                question.query_class()
            );
            self.refuse(&mut reply, &name, why).await;
            return encode(&reply, max_len);
        }
        let Some((rule, ports)) = self.inner.policy.decide(&name) else {
            let why = format!("nanoclaw: {name} not in egress allowlist");
            self.refuse(&mut reply, &name, why).await;
            return encode(&reply, max_len);
        };
        match question.query_type() {
            RecordType::A => {}
            RecordType::AAAA => {
                bump(&counts.aaaa_empty);
                return encode(&reply, max_len);
            }
            other => {
                let why = format!(
                    "nanoclaw: {other} queries for {name} are not served (egress rule {rule} allows A only)"
                );
                self.refuse(&mut reply, &name, why).await;
                return encode(&reply, max_len);
            }
        }

        bump(&counts.forwarded);
        let upstream = match self.forward(question.name()).await {
            Ok(m) => m,
            Err(e) => {
                bump(&counts.upstream_failures);
                self.guest_log(|s| tracing::warn!(suppressed = s, name = %name, error = %crate::error_chain(&e), "egress dns: upstream failed"));
                reply.metadata.response_code = ResponseCode::ServFail;
                return encode(&reply, max_len);
            }
        };
        let rcode = upstream.metadata.response_code;
        if rcode != ResponseCode::NoError && rcode != ResponseCode::NXDomain {
            bump(&counts.upstream_failures);
            reply.metadata.response_code = ResponseCode::ServFail;
            return encode(&reply, max_len);
        }
        bump(&counts.answered);
        reply.metadata.response_code = rcode;
        let found = addresses(question.name(), &upstream);
        let mut kept = 0usize;
        for (addr, ttl) in &found {
            if !is_public(*addr) {
                bump(&counts.non_public);
                self.guest_log(|s| tracing::warn!(suppressed = s, name = %name, %addr, "egress dns: upstream answered a non-public address, left out"));
                continue;
            }
            let ttl = clamp_ttl(*ttl);
            if !self.inner.table.grant(*addr, &name, ttl) {
                self.guest_log(|s| tracing::warn!(suppressed = s, name = %name, %addr, "egress dns: grant table full, address left out"));
                continue;
            }
            let event = EgressEvent::Granted {
                name: name.clone(),
                addr: *addr,
                ports: ports.clone(),
                ttl,
            };
            // Back-pressure: the guest hears of the address only once the daemon's queue holds
            // it. An address the daemon cannot hear of (queue full for EVENT_TIMEOUT, or closed)
            // would not be in its nftables set, so it is left out of the answer.
            if !matches!(
                timeout(EVENT_TIMEOUT, self.inner.events.send(event)).await,
                Ok(Ok(()))
            ) {
                bump(&counts.events_dropped);
                self.guest_log(|s| tracing::warn!(suppressed = s, name = %name, %addr, "egress dns: event queue full or closed, address left out"));
                continue;
            }
            if let Some(apply) = &self.inner.apply
                && !matches!(
                    timeout(APPLY_TIMEOUT, apply(*addr, ports.clone(), ttl)).await,
                    Ok(true)
                )
            {
                bump(&counts.apply_failures);
                self.guest_log(|s| tracing::warn!(suppressed = s, name = %name, %addr, "egress dns: the address could not be let through the firewall, left out"));
                continue;
            }
            bump(&counts.granted);
            kept += 1;
            let secs = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
            reply.add_answer(Record::from_rdata(
                question.name().clone(),
                secs,
                RData::A(A(*addr)),
            ));
        }
        if kept == 0 && !found.is_empty() {
            reply.metadata.response_code = ResponseCode::ServFail;
        }
        encode(&reply, max_len)
    }

    async fn refuse(&self, reply: &mut Message, name: &str, why: String) {
        bump(&self.inner.counts.refused);
        reply.metadata.response_code = ResponseCode::Refused;
        if let Some(edns) = reply.edns.as_mut() {
            let mut data = EDE_BLOCKED.to_be_bytes().to_vec();
            data.extend_from_slice(why.as_bytes());
            edns.options_mut()
                .insert(EdnsOption::Unknown(EDE_OPTION, data));
        }
        let event = EgressEvent::Refused {
            name: name.to_owned(),
            rule: why,
        };
        if self.inner.events.try_send(event).is_err() {
            bump(&self.inner.counts.events_dropped);
        }
    }

    /// Asks the upstream resolver for `name`'s `A` records.
    async fn forward(&self, name: &Name) -> Result<Message, UpstreamError> {
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(name.clone(), RecordType::A));
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        query.set_edns(edns);
        let bytes = query.to_vec().map_err(UpstreamError::Encode)?;
        let upstream = self.inner.upstream;
        let exchange = async {
            let udp = udp_exchange(upstream, &query, &bytes).await?;
            if !udp.metadata.truncation {
                return Ok(udp);
            }
            tcp_exchange(upstream, &query, &bytes).await
        };
        timeout(UPSTREAM_TIMEOUT, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(UPSTREAM_TIMEOUT))?
    }

    fn guest_log(&self, line: impl FnOnce(u64)) {
        super::guest_log(&self.inner.log, line);
    }
}

/// Whether `reply` answers `query`: same id, a response, the same question.
fn answers_query(query: &Message, reply: &Message) -> bool {
    reply.metadata.id == query.metadata.id
        && reply.metadata.message_type == MessageType::Response
        && reply.queries == query.queries
}

async fn udp_exchange(
    upstream: SocketAddr,
    query: &Message,
    bytes: &[u8],
) -> Result<Message, UpstreamError> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await.map_err(UpstreamError::Io)?;
    // Connected: datagrams from anyone but the upstream never reach us, and an ICMP
    // unreachable fails the exchange at once instead of at the deadline.
    socket.connect(upstream).await.map_err(UpstreamError::Io)?;
    socket.send(bytes).await.map_err(UpstreamError::Io)?;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let n = socket.recv(&mut buf).await.map_err(UpstreamError::Io)?;
        // Anything that is not the answer (a stale or spoofed datagram) is ignored; the
        // deadline bounds the wait.
        if let Ok(reply) = Message::from_vec(&buf[..n])
            && answers_query(query, &reply)
        {
            return Ok(reply);
        }
    }
}

async fn tcp_exchange(
    upstream: SocketAddr,
    query: &Message,
    bytes: &[u8],
) -> Result<Message, UpstreamError> {
    let mut stream = TcpStream::connect(upstream)
        .await
        .map_err(UpstreamError::Io)?;
    let len = u16::try_from(bytes.len()).map_err(|_| UpstreamError::Mismatch)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.map_err(UpstreamError::Io)?;
    let len = stream.read_u16().await.map_err(UpstreamError::Io)?;
    let mut buf = vec![0u8; usize::from(len)];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(UpstreamError::Io)?;
    let reply = Message::from_vec(&buf).map_err(UpstreamError::Decode)?;
    if !answers_query(query, &reply) {
        return Err(UpstreamError::Mismatch);
    }
    Ok(reply)
}

/// The `A` records in `reply`'s answer section reached from `name` through CNAMEs, with their
/// TTLs, without duplicates, at most [`MAX_ANSWERS`].
fn addresses(name: &Name, reply: &Message) -> Vec<(Ipv4Addr, u32)> {
    let mut chain = vec![name.clone()];
    let mut current = name.clone();
    for _ in 0..MAX_CNAME_CHAIN {
        let next = reply.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name == current => Some(target.0.clone()),
            _ => None,
        });
        match next {
            Some(target) if !chain.contains(&target) => {
                chain.push(target.clone());
                current = target;
            }
            _ => break,
        }
    }
    let mut out: Vec<(Ipv4Addr, u32)> = Vec::new();
    for r in &reply.answers {
        if let RData::A(a) = &r.data
            && chain.contains(&r.name)
            && !out.iter().any(|(addr, _)| *addr == a.0)
        {
            out.push((a.0, r.ttl));
            if out.len() == MAX_ANSWERS {
                break;
            }
        }
    }
    out
}

/// Whether `addr` may be given out: not unspecified, "this network" (0/8), loopback, private
/// (RFC 1918), shared (100.64/10, RFC 6598), link-local (cloud metadata lives there),
/// multicast, reserved (240/4) or broadcast. An allowed name that resolves to one of these (by
/// mistake or on purpose, as in DNS rebinding) would otherwise open the host's own networks to
/// the guest.
fn is_public(addr: Ipv4Addr) -> bool {
    let [a, b, ..] = addr.octets();
    !(a == 0
        || addr.is_loopback()
        || addr.is_private()
        || (a == 100 && (64..128).contains(&b))
        || addr.is_link_local()
        || addr.is_multicast()
        || a >= 240)
}

/// FORMERR for a request whose header can be read and that is a query; nothing otherwise.
fn format_error(request: &[u8]) -> Option<Vec<u8>> {
    let [id_hi, id_lo, flags, ..] = *request else {
        return None;
    };
    if request.len() < 12 || flags & 0x80 != 0 {
        return None;
    }
    let reply = Message::error_msg(
        u16::from_be_bytes([id_hi, id_lo]),
        OpCode::Query,
        ResponseCode::FormErr,
    );
    reply.to_vec().ok()
}

/// The reply's bytes; when they exceed `max_len`, the truncated form (TC set, question only).
fn encode(reply: &Message, max_len: usize) -> Option<Vec<u8>> {
    let bytes = reply.to_vec().ok()?;
    if bytes.len() <= max_len {
        return Some(bytes);
    }
    let mut short = reply.truncate();
    if let Some(edns) = short.edns.as_mut() {
        *edns.options_mut() = Default::default();
    }
    short.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::CNAME;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn a_reply_too_long_for_the_client_is_truncated() {
        let mut reply = Message::response(7, OpCode::Query);
        reply.add_query(Query::query(name("pypi.org."), RecordType::A));
        for i in 0..64u8 {
            let a = RData::A(A(Ipv4Addr::new(192, 0, 2, i)));
            reply.add_answer(Record::from_rdata(name("pypi.org."), 30, a));
        }
        let full = encode(&reply, usize::from(u16::MAX)).unwrap();
        assert!(full.len() > 512);
        let short = Message::from_vec(&encode(&reply, 512).unwrap()).unwrap();
        assert!(short.metadata.truncation);
        assert_eq!(short.metadata.id, 7);
        assert!(short.answers.is_empty());
        assert_eq!(short.queries.len(), 1);
    }

    #[test]
    fn cname_loops_end_and_unrelated_records_are_ignored() {
        let mut reply = Message::response(1, OpCode::Query);
        let cname = |from: &str, to: &str| {
            Record::from_rdata(name(from), 60, RData::CNAME(CNAME(name(to))))
        };
        reply.add_answer(cname("a.test.", "b.test."));
        reply.add_answer(cname("b.test.", "a.test."));
        reply.add_answer(Record::from_rdata(
            name("B.test."),
            60,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        reply.add_answer(Record::from_rdata(
            name("c.test."),
            60,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 2))),
        ));
        assert_eq!(
            addresses(&name("a.test."), &reply),
            vec![(Ipv4Addr::new(192, 0, 2, 1), 60)]
        );
    }

    #[test]
    fn only_public_addresses_are_given_out() {
        for private in [
            [0, 1, 2, 3],
            [10, 0, 0, 1],
            [100, 64, 0, 1],
            [100, 127, 255, 255],
            [127, 0, 0, 1],
            [169, 254, 169, 254],
            [172, 16, 0, 1],
            [192, 168, 1, 1],
            [224, 0, 0, 1],
            [240, 0, 0, 1],
            [255, 255, 255, 255],
        ] {
            assert!(!is_public(Ipv4Addr::from(private)), "{private:?}");
        }
        for public in [
            [1, 1, 1, 1],
            [100, 63, 0, 1],
            [100, 128, 0, 1],
            [151, 101, 0, 223],
            [172, 32, 0, 1],
        ] {
            assert!(is_public(Ipv4Addr::from(public)), "{public:?}");
        }
    }

    #[test]
    fn format_error_needs_a_query_header() {
        assert_eq!(format_error(&[0; 11]), None);
        let mut response = [0u8; 12];
        response[2] = 0x80;
        assert_eq!(format_error(&response), None);
        let reply =
            Message::from_vec(&format_error(&[0xab, 0xcd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap())
                .unwrap();
        assert_eq!(reply.metadata.id, 0xabcd);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    }
}
