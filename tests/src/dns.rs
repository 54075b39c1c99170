//! A small DNS upstream and raw queries, for the tests and the benchmark of the egress
//! resolver: the resolver must be asked and must ask someone, over real sockets.

use std::net::{Ipv4Addr, UdpSocket};

/// A raw `A` query for `name` with id `id` (one question, no EDNS).
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    for v in [id, 0x0100, 1, 0, 0, 0] {
        q.extend_from_slice(&v.to_be_bytes());
    }
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Serves DNS on `socket` until it fails (blocking; run it on a thread of its own): an `A`
/// answer with TTL 60 for the names `answer` maps to an address, NXDOMAIN for the others.
/// Messages it cannot read a question from are ignored.
pub fn serve_upstream(socket: UdpSocket, answer: impl Fn(&str) -> Option<Ipv4Addr>) {
    let mut buf = [0u8; 1500];
    while let Ok((n, peer)) = socket.recv_from(&mut buf) {
        let q = &buf[..n];
        let Some(end) = q
            .get(12..)
            .and_then(|t| t.iter().position(|b| *b == 0))
            .map(|p| 12 + p + 5)
            .filter(|end| *end <= q.len())
        else {
            continue;
        };
        let mut labels = Vec::new();
        let mut i = 12;
        while i < end - 5 {
            let len = usize::from(q[i]);
            labels.push(String::from_utf8_lossy(&q[i + 1..(i + 1 + len).min(end)]).to_lowercase());
            i += 1 + len;
        }
        let found = answer(&labels.join("."));
        let mut r = q[..2].to_vec();
        r.extend_from_slice(&(if found.is_some() { 0x8180u16 } else { 0x8183 }).to_be_bytes());
        r.extend_from_slice(&[0, 1, 0, u8::from(found.is_some()), 0, 0, 0, 0]);
        r.extend_from_slice(&q[12..end]);
        if let Some(addr) = found {
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            r.extend_from_slice(&addr.octets());
        }
        let _ = socket.send_to(&r, peer);
    }
}
