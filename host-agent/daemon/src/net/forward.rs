//! Host ports forwarded to a networked VM (`nanoclaw run -p [ADDR:]HOSTPORT:GUESTPORT`).
//!
//! The daemon listens on each host address and port ([`bind`], when the VM is created, so a
//! port already taken fails the create with a clear error). For each connection it opens one
//! from inside the VM's namespace to the guest's address and port: it reaches the guest over
//! `tap0`, from the gateway address, and never crosses the VM's egress rules, which filter only
//! what the guest sends (the guest's replies pass as part of that connection). Bytes are then
//! copied both ways until either side closes.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections per forwarded port at once (more are closed
//! at once); the connection into the guest must open within [`CONNECT_TIMEOUT`]; a failure
//! (nothing listening in the guest, say) is logged within a budget, since a guest or a client
//! could otherwise flood the log. Listening on loopback is the default; another address is the
//! user's explicit choice.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nanoclaw_api::PortForward;
use shared_proto::ratelimit::LogBudget;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::netns::VmNetns;

/// Connections one forwarded port carries at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long opening the connection into the guest may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a forwarded port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// `host_addr` is not an IP address.
    #[error("port forward address {0:?} is not an IP address")]
    BadAddr(String),
    /// The host port could not be bound (in use, or a privileged port).
    #[error("cannot listen on {addr} for the forward to guest port {guest_port}")]
    Bind {
        /// The host address and port.
        addr: SocketAddr,
        /// The guest port it was for.
        guest_port: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The listening sockets of a VM's forwarded ports, bound and not yet served.
#[derive(Debug)]
pub struct Bound(Vec<(PortForward, std::net::TcpListener)>);

/// Binds every forwarded port of a VM (non-blocking sockets, served later by [`serve`]).
pub fn bind(ports: &[PortForward]) -> Result<Bound, ForwardError> {
    let mut bound = Vec::new();
    for p in ports {
        let ip: IpAddr = p
            .host_addr
            .parse()
            .map_err(|_| ForwardError::BadAddr(p.host_addr.clone()))?;
        let addr = SocketAddr::new(ip, p.host_port);
        let err = |source| ForwardError::Bind {
            addr,
            guest_port: p.guest_port,
            source,
        };
        let listener = std::net::TcpListener::bind(addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        bound.push((p.clone(), listener));
    }
    Ok(Bound(bound))
}

/// A VM's forwarded ports, served; dropping it closes the listeners and stops the copying.
#[derive(Debug, Default)]
pub struct PortForwards {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PortForwards {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves `bound` for VM `vm`, whose guest has address `guest` in namespace `ns`. Must run
/// inside the daemon's Tokio runtime.
pub fn serve(
    vm: &str,
    ns: VmNetns,
    guest: Ipv4Addr,
    bound: Bound,
) -> std::io::Result<PortForwards> {
    let budget = Arc::new(Mutex::new(LogBudget::new()));
    let mut forwards = PortForwards::default();
    for (p, listener) in bound.0 {
        let listener = TcpListener::from_std(listener)?;
        let (vm, ns, budget) = (vm.to_owned(), ns.clone(), Arc::clone(&budget));
        let target = SocketAddr::from((guest, p.guest_port));
        tracing::info!(vm, host = %listener.local_addr()?, guest = %target, "port forwarded");
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        forwards.tasks.push(tokio::spawn(async move {
            loop {
                let client = match listener.accept().await {
                    Ok((client, _)) => client,
                    Err(e) => {
                        log(&budget, &vm, "accept", &e);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                    drop(client);
                    continue;
                };
                let (vm, ns, budget) = (vm.clone(), ns.clone(), Arc::clone(&budget));
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = relay(client, &ns, target).await {
                        log(&budget, &vm, "relay", &e);
                    }
                });
            }
        }));
    }
    Ok(forwards)
}

/// Opens the connection to `target` from inside `ns` and copies both ways until either ends.
async fn relay(mut client: TcpStream, ns: &VmNetns, target: SocketAddr) -> std::io::Result<()> {
    let ns = ns.clone();
    let inner = tokio::task::spawn_blocking(move || {
        ns.run_in(move || std::net::TcpStream::connect_timeout(&target, CONNECT_TIMEOUT))
    })
    .await
    .map_err(std::io::Error::other)?
    .map_err(std::io::Error::other)??;
    inner.set_nonblocking(true)?;
    let mut inner = TcpStream::from_std(inner)?;
    let _ = client.set_nodelay(true);
    let _ = inner.set_nodelay(true);
    tokio::io::copy_bidirectional(&mut client, &mut inner).await?;
    Ok(())
}

fn log(budget: &Mutex<LogBudget>, vm: &str, what: &'static str, e: &std::io::Error) {
    crate::egress::guest_log(budget, |suppressed| {
        tracing::warn!(vm, what, error = %e, suppressed, "port forward");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_a_clear_error_and_a_bad_address_too() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let p = PortForward {
            host_addr: "127.0.0.1".into(),
            host_port: port,
            guest_port: 80,
        };
        let err = bind(std::slice::from_ref(&p)).unwrap_err();
        assert!(
            matches!(err, ForwardError::Bind { guest_port: 80, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
        let bad = PortForward {
            host_addr: "localhost".into(),
            ..p
        };
        assert!(matches!(bind(&[bad]), Err(ForwardError::BadAddr(_))));
    }
}
