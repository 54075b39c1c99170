//! The credential path on loopback, as the component tests set it up: a vault with a granted
//! credential, the device paired with the host relay and linked from this process, and the
//! sidecar's proxy code (`vpod_sidecar::proxy`) running on the host over the VM's relay socket
//! (a Unix socket in place of vsock). The HTTPS server it calls is [`crate::upstream`].

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use host_agent::relay::{Relay, VmIdentity, VmRelay, proxy_socket_path};
use vault_device::device::{self, Device, DeviceConfig};
use vault_device::grant::Grant;
use vault_device::vault::{Entry, KdfParams, Secret, Vault};
use vpod_sidecar::proxy::{self, IdentityCell, ProxyIdentity};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::upstream::Ca;

/// A fresh credential for one test. It is drawn at run time, never a constant: the test
/// binary also runs as the daemon and the agent, and a constant would sit in their mapped
/// executable and defeat the memory scans.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 24];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    format!("sk-live-{}", hex::encode(bytes))
}
/// A second credential that has no grant.
pub const UNGRANTED_SECRET: &str = "sk-ungranted-Qm3Zr8Tn5Wb2Xc7Vy4Ud9Ke1";
/// The VM id.
pub const VM: &str = "vm-test-1";
/// The vault's passphrase.
pub const PASSPHRASE: &[u8] = b"correct horse battery staple";

/// A vault with the granted credential `svc` (to `api.test:PORT`) and the ungranted `other`
/// (to `api.test:PORT` and `other.test:PORT`).
pub fn make_vault(dir: &Path, api: &str, other: &str, secret: &str) -> PathBuf {
    let path = dir.join("device.vault");
    let mut vault = Vault::create(&path, PASSPHRASE, KdfParams::FAST_FOR_TESTS).unwrap();
    vault
        .add(Entry {
            name: "svc".into(),
            secret: Secret::new(secret.as_bytes().to_vec()),
            hosts: vec![api.to_owned()],
            header: "Authorization".into(),
            format: "Bearer {}".into(),
        })
        .unwrap();
    vault
        .add(Entry {
            name: "other".into(),
            secret: Secret::new(UNGRANTED_SECRET.as_bytes().to_vec()),
            hosts: vec![other.to_owned()],
            header: "Authorization".into(),
            format: "Bearer {}".into(),
        })
        .unwrap();
    vault.data.grants.push(Grant {
        credential: "svc".into(),
        host: api.to_owned(),
        vm: VM.into(),
        // Named by [`pair`], once the host is known.
        on: None,
        expires_at: u64::MAX,
        fallback: true,
    });
    vault.save().unwrap();
    path
}

/// Pairs the vault with the relay listening at `addr`, names that host in the vault's grants,
/// and waits (at most 10 s) until the relay has recorded the device: it does so just after it
/// sends its last handshake message, so the device's side may finish first.
pub async fn pair(vault: &Path, relay: &Relay, addr: SocketAddr) {
    let mut v = Vault::open(vault, PASSPHRASE).unwrap();
    let code = relay.pairing_code().unwrap();
    device::pair(&mut v, &addr.to_string(), &code, "test-phone")
        .await
        .unwrap();
    // The vault's grants are for VMs of this host.
    for grant in &mut v.data.grants {
        grant.on.get_or_insert(relay.public_key());
    }
    v.save().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.paired_device().is_none() {
        assert!(
            Instant::now() < deadline,
            "the relay did not record the paired device"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts the device's link (in this process) and waits until the relay sees it.
pub async fn start_device(
    vault: &Path,
    ca: &Ca,
    resolve: Vec<(String, SocketAddr)>,
) -> Arc<Device> {
    let device = Device::open(DeviceConfig {
        vault: vault.to_owned(),
        passphrase: Zeroizing::new(PASSPHRASE.to_vec()),
        ca_files: vec![ca.pem_path.clone()],
        resolve,
        approval_wait: device::DEFAULT_APPROVAL_WAIT,
    })
    .unwrap();
    tokio::spawn(Arc::clone(&device).serve());
    device
}

/// The sidecar's boot identity.
#[derive(Debug)]
pub struct Sidecar {
    /// The boot key's secret half (X25519).
    pub secret: [u8; 32],
    /// The boot key's public half, which the sidecar announces in its `Hello`.
    pub public: [u8; 32],
    /// The boot id.
    pub boot_id: [u8; 16],
}

/// A fresh boot identity (a random boot key; the boot id is always `[0x5a; 16]`).
pub fn sidecar() -> Sidecar {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    Sidecar {
        public: PublicKey::from(&secret).to_bytes(),
        secret: secret.to_bytes(),
        boot_id: [0x5a; 16],
    }
}

/// Attaches the VM to the relay with the given announced sidecar key.
pub fn attach(
    relay: &Arc<Relay>,
    vm_dir: &Path,
    sidecar: &Sidecar,
    announced: [u8; 32],
) -> VmRelay {
    attach_with(relay, vm_dir, sidecar, announced, None)
}

/// [`attach`] for an agent whose tokenizer the host shares with the device.
pub fn attach_tokenized(
    relay: &Arc<Relay>,
    vm_dir: &Path,
    sidecar: &Sidecar,
    tokens: Arc<host_agent::mcp::AgentTokens>,
) -> VmRelay {
    attach_with(relay, vm_dir, sidecar, sidecar.public, Some(tokens))
}

fn attach_with(
    relay: &Arc<Relay>,
    vm_dir: &Path,
    sidecar: &Sidecar,
    announced: [u8; 32],
    tokens: Option<Arc<host_agent::mcp::AgentTokens>>,
) -> VmRelay {
    relay
        .attach_vm(
            vm_dir,
            VmIdentity {
                vm_id: VM.into(),
                boot_id: sidecar.boot_id,
                sidecar_public_key: announced,
                tokens,
                vmm_uid: None,
            },
        )
        .unwrap()
}

/// The relay connections a proxy started by [`start_proxy_watched`] made: each is one
/// end-to-end session, so one handshake with the device.
#[derive(Debug, Clone, Default)]
pub struct RelayConnections {
    streams: Arc<Mutex<Vec<UnixStream>>>,
}

impl RelayConnections {
    /// How many relay connections (so sessions, so handshakes) the proxy has opened.
    pub fn opened(&self) -> usize {
        self.streams.lock().unwrap().len()
    }

    /// Breaks every relay connection made so far, as a relay that goes away would.
    pub fn break_all(&self) {
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// [`start_proxy`], counting the relay connections it makes and able to break them.
pub fn start_proxy_watched(vm_dir: &Path, sidecar: &Sidecar) -> (SocketAddr, RelayConnections) {
    let listener = StdTcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let identity = Arc::new(IdentityCell::from(ProxyIdentity {
        boot_secret: Zeroizing::new(sidecar.secret),
        boot_id: sidecar.boot_id,
    }));
    let socket = proxy_socket_path(vm_dir);
    let watched = RelayConnections::default();
    let streams = Arc::clone(&watched.streams);
    let connect = Arc::new(move || {
        let stream = UnixStream::connect(&socket)?;
        streams.lock().unwrap().push(stream.try_clone()?);
        Ok(stream)
    });
    std::thread::spawn(move || proxy::serve(&listener, identity, connect));
    (addr, watched)
}

/// Runs the sidecar's proxy on a thread, connecting to the VM's relay socket; returns its
/// address.
pub fn start_proxy(vm_dir: &Path, sidecar: &Sidecar) -> SocketAddr {
    let listener = StdTcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let identity = Arc::new(IdentityCell::from(ProxyIdentity {
        boot_secret: Zeroizing::new(sidecar.secret),
        boot_id: sidecar.boot_id,
    }));
    let socket = proxy_socket_path(vm_dir);
    let connect = Arc::new(move || std::os::unix::net::UnixStream::connect(&socket));
    std::thread::spawn(move || proxy::serve(&listener, identity, connect));
    addr
}
