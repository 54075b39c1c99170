//! vpod-sidecar: PID 1 in the guest. The boot sequence is documented in the library
//! (`vpod_sidecar`); this file only wires its parts together.

use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use boot_key::random_secret;
use nix::sys::signal::{SigSet, Signal};
use rand_core::{OsRng, RngCore};
use shared_proto::handshake::PROTOCOL_VERSION;
use shared_proto::message::{AgentSpec, GuestToHost};
use shared_proto::ports::{CONTROL_PORT, ECHO_PORT, FILES_PORT, HOST_CID};
use tracing::Level;
use vpod_sidecar::ErrorChain;
use vpod_sidecar::agent::{AgentRunner, IdPolicy};
use vpod_sidecar::console::ConsoleLog;
use vpod_sidecar::control::{self, Backoff, HostRequests, SessionEnd};
use vpod_sidecar::echo;
use vpod_sidecar::files;
use vpod_sidecar::init;
use vpod_sidecar::outbox::Outbox;
use vpod_sidecar::vsock::{VsockListener, VsockStream};
use x25519_dalek::{PublicKey, StaticSecret};

fn main() {
    if std::env::args().nth(1).as_deref() == Some("mcp-stdio") {
        std::process::exit(vpod_sidecar::mcp::stdio_main());
    }
    // Block SIGTERM before any thread starts, so every thread inherits the mask and only the
    // forwarder's sigwait sees it. (The agent clears its mask before exec.)
    let sigterm_blocked = SigSet::from(Signal::SIGTERM).thread_block();
    let pid1 = std::process::id() == 1;
    let mount_failures = if pid1 {
        init::mount_basics()
    } else {
        Vec::new()
    };
    let (console, console_failure): (Box<dyn Write + Send>, _) = match init::open_console() {
        Ok(file) if pid1 => (Box::new(file), None),
        Ok(_) => (Box::new(std::io::stderr()), None),
        Err(e) => (Box::new(std::io::stderr()), pid1.then_some(e)),
    };
    // Installing fails only if a subscriber is already set, which nothing else does.
    let _ = tracing::subscriber::set_global_default(ConsoleLog::new(console, Level::INFO));
    for failure in mount_failures.iter().chain(&console_failure) {
        tracing::warn!(error = %ErrorChain(failure), "init");
    }
    if let Err(e) = sigterm_blocked {
        tracing::warn!(error = %e, "cannot block SIGTERM");
    }

    // A PID 1 that unwinds out of main panics the kernel; reset the VM instead.
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run(pid1)));
    if outcome.is_err() {
        tracing::error!("panic in the sidecar");
    }
    finish(pid1);
}

/// Ends the sidecar: resets the VM when PID 1, exits otherwise (a developer run on a host).
fn finish(pid1: bool) -> ! {
    if !pid1 {
        std::process::exit(0);
    }
    let err = init::reset_vm();
    tracing::error!(error = %ErrorChain(&err), "cannot reset");
    loop {
        std::thread::park();
    }
}

fn run(pid1: bool) {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), pid1, "starting");
    if pid1 {
        if let Err(e) = init::bring_up_loopback() {
            tracing::warn!(error = %ErrorChain(&e), "init");
        }
        if !init::crng_ready() {
            tracing::info!("crng not ready yet; getrandom waits for the kernel's jitter entropy");
        }
    }
    let reaper = match init::Reaper::start() {
        Ok(r) => r,
        Err(e) => {
            // Without a reaper no agent exit would be seen; ending the VM says so clearly.
            tracing::error!(error = %ErrorChain(&e), "init");
            return;
        }
    };

    let boot_id = random_bytes::<16>();
    let secret = random_secret();
    let hello = GuestToHost::Hello {
        protocol_version: PROTOCOL_VERSION,
        sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
        boot_id,
        ephemeral_public_key: PublicKey::from(&secret).to_bytes(),
    };
    // The secret stays alive (and in memory only) for the whole boot; the envelope opener of a
    // later stage takes it over.
    let identity = Arc::new(vpod_sidecar::proxy::ProxyIdentity {
        boot_secret: zeroize::Zeroizing::new(secret.to_bytes()),
        boot_id,
    });
    let _secret: StaticSecret = secret;
    if let Err(e) = std::thread::Builder::new()
        .name("credential-proxy".into())
        .spawn(move || serve_credential_proxy(identity))
    {
        tracing::error!(error = %e, "cannot start the credential proxy");
    }

    if let Err(e) = std::thread::Builder::new()
        .name("echo-listener".into())
        .spawn(serve_echo)
    {
        tracing::error!(error = %e, "cannot start the echo listener");
    }

    let outbox = Arc::new(Outbox::default());
    let runner = AgentRunner::new(Arc::clone(&outbox), reaper, IdPolicy::Switch);
    let agent_root = runner.published_root();
    if let Err(e) = std::thread::Builder::new()
        .name("files-listener".into())
        .spawn(move || serve_files(&agent_root))
    {
        tracing::error!(error = %e, "cannot start the file copy listener");
    }
    let forwarder = runner.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("sigterm".into())
        .spawn(move || forward_sigterm(&forwarder, pid1))
    {
        tracing::error!(error = %e, "cannot start the SIGTERM forwarder");
    }

    let mut guest = Guest { runner };
    let connect = || VsockStream::connect(HOST_CID, CONTROL_PORT).map_err(std::io::Error::other);
    let end = control::run(
        connect,
        &hello,
        &mut Backoff::default(),
        &outbox,
        &mut guest,
    );
    match end {
        SessionEnd::Shutdown => tracing::info!("shutdown requested"),
        SessionEnd::Rejected(e) => tracing::error!(error = %e, "host refused hello"),
        SessionEnd::AgentDone => tracing::info!("agent done, exit delivered"),
    }
}

/// The production answers to host requests.
struct Guest {
    runner: AgentRunner,
}

impl HostRequests for Guest {
    fn echo_connect(&mut self, port: u32) -> Result<(), String> {
        let stream =
            VsockStream::connect(HOST_CID, port).map_err(|e| ErrorChain(&e).to_string())?;
        echo::spawn_echo(stream, "echo-connect").map_err(|e| e.to_string())
    }

    fn run_agent(&mut self, spec: AgentSpec) {
        if let Some(summary) = &spec.mcp
            && let Err(e) = vpod_sidecar::mcp::start(summary)
        {
            tracing::warn!(error = %ErrorChain(&e), "mcp");
        }
        self.runner.run(spec);
    }

    fn agent_stdin(&mut self, data: Vec<u8>) {
        self.runner.stdin(data);
    }

    fn signal(&mut self, signo: i32) {
        self.runner.signal(signo);
    }
}

/// Waits for SIGTERM (blocked in every thread by `main`) and forwards it to the agent's
/// process group; with no agent running, it ends the VM.
fn forward_sigterm(runner: &AgentRunner, pid1: bool) {
    let set = SigSet::from(Signal::SIGTERM);
    loop {
        match set.wait() {
            Ok(_) if runner.is_running() => {
                tracing::info!("SIGTERM: forwarding to the agent");
                if let Err(e) = runner.try_signal(Signal::SIGTERM as i32) {
                    tracing::warn!(error = %ErrorChain(&e), "SIGTERM");
                }
            }
            Ok(_) => {
                tracing::info!("SIGTERM with no agent running: ending");
                finish(pid1);
            }
            Err(e) => {
                tracing::error!(error = %e, "sigwait");
                return;
            }
        }
    }
}

/// Binds the echo port (retrying with backoff if vsock is not ready) and serves it forever.
fn serve_echo() {
    let mut backoff = Backoff::default();
    loop {
        match VsockListener::bind(ECHO_PORT) {
            Ok(listener) => {
                tracing::info!(port = ECHO_PORT, "echo listening");
                echo::serve(&listener)
            }
            Err(e) => {
                if backoff.worth_logging() {
                    tracing::warn!(error = %ErrorChain(&e), "echo");
                }
                std::thread::sleep(backoff.next_delay());
            }
        }
    }
}

/// Binds the file copy port (retrying with backoff if vsock is not ready) and serves it
/// forever; requests before the agent's image root is built are answered `NotReady`.
fn serve_files(agent_root: &std::sync::OnceLock<vpod_sidecar::rootfs::PreparedRoot>) {
    let mut backoff = Backoff::default();
    loop {
        match VsockListener::bind(FILES_PORT) {
            Ok(listener) => {
                tracing::info!(port = FILES_PORT, "file copy listening");
                files::serve(&listener, agent_root, &files::Limits::default())
            }
            Err(e) => {
                if backoff.worth_logging() {
                    tracing::warn!(error = %ErrorChain(&e), "files");
                }
                std::thread::sleep(backoff.next_delay());
            }
        }
    }
}

/// Binds the agent's credential proxy on `127.0.0.1` and serves it forever; each request opens
/// a vsock connection to the host's credential relay.
fn serve_credential_proxy(identity: Arc<vpod_sidecar::proxy::ProxyIdentity>) {
    use shared_proto::credential::GUEST_PROXY_PORT;
    use shared_proto::ports::CREDENTIAL_PROXY_PORT;
    let mut backoff = Backoff::default();
    let listener = loop {
        match std::net::TcpListener::bind(("127.0.0.1", GUEST_PROXY_PORT)) {
            Ok(l) => break l,
            Err(e) => {
                if backoff.worth_logging() {
                    tracing::warn!(error = %e, "credential proxy");
                }
                std::thread::sleep(backoff.next_delay());
            }
        }
    };
    tracing::info!(port = GUEST_PROXY_PORT, "credential proxy listening");
    let connect = Arc::new(|| {
        VsockStream::connect(HOST_CID, CREDENTIAL_PROXY_PORT).map_err(std::io::Error::other)
    });
    vpod_sidecar::proxy::serve(&listener, identity, connect);
}

/// The pause before retrying `getrandom`, which fails only in exotic setups.
const RANDOM_RETRY: Duration = Duration::from_millis(100);

/// Fills an array from the kernel's CSPRNG, retrying instead of panicking on failure.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    while let Err(e) = OsRng.try_fill_bytes(&mut out) {
        tracing::warn!(error = %e, "getrandom");
        std::thread::sleep(RANDOM_RETRY);
    }
    out
}

mod boot_key {
    //! The boot X25519 secret, drawn without leaving copies of its bytes behind.

    use x25519_dalek::StaticSecret;

    /// A fresh X25519 secret from the kernel's CSPRNG.
    pub fn random_secret() -> StaticSecret {
        let mut bytes = super::random_bytes::<32>();
        let secret = StaticSecret::from(bytes);
        zeroize::Zeroize::zeroize(&mut bytes);
        secret
    }
}
