//! vpod-sidecar: PID 1 in the guest. The boot sequence is documented in the library
//! (`vpod_sidecar`); this file only wires its parts together.

use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use shared_proto::message::{AgentSpec, GuestNetwork, GuestToHost};
use shared_proto::ports::{CONTROL_PORT, ECHO_PORT, FILES_PORT, HOST_CID};
use tracing::Level;
use vpod_sidecar::ErrorChain;
use vpod_sidecar::agent::{AgentRunner, IdPolicy};
use vpod_sidecar::console::ConsoleLog;
use vpod_sidecar::control::{self, Backoff, HostRequests, SessionEnd};
use vpod_sidecar::echo;
use vpod_sidecar::files;
use vpod_sidecar::identity::{self, IdentityCell};
use vpod_sidecar::init;
use vpod_sidecar::outbox::Outbox;
use vpod_sidecar::vsock::{VsockListener, VsockStream};

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

    // The boot key stays in memory only, in the cell, until a clone's new identity replaces it.
    let first = identity::draw();
    let hello = identity::hello(&first);
    let identity = Arc::new(IdentityCell::from(first));
    let proxy_identity = Arc::clone(&identity);
    if let Err(e) = std::thread::Builder::new()
        .name("credential-proxy".into())
        .spawn(move || serve_credential_proxy(proxy_identity))
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

    let mut guest = Guest {
        runner,
        identity,
        pid1,
        frozen: false,
    };
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
        // `control::run` reconnects on a new identity and never returns it.
        SessionEnd::Reidentified(_) => tracing::error!("control ended on a new identity"),
    }
}

/// The production answers to host requests.
struct Guest {
    runner: AgentRunner,
    /// The boot identity, shared with the credential proxy.
    identity: Arc<IdentityCell>,
    /// Whether this is the guest's init (only then may it stop every other process).
    pid1: bool,
    /// Whether a `Freeze` stopped the other processes.
    frozen: bool,
}

impl Guest {
    /// Moves the interface to `net` and points the agent's resolver (in its image root, or the
    /// sidecar's own `/etc` for an initramfs agent) at the new gateway.
    fn move_network(&self, net: &GuestNetwork) -> Result<(), String> {
        vpod_sidecar::net::reconfigure(net).map_err(|e| ErrorChain(&e).to_string())?;
        match self.runner.published_root().get() {
            Some(root) => vpod_sidecar::rootfs::RootDir::open(&root.path)
                .and_then(|dir| vpod_sidecar::rootfs::write_resolv_conf(&dir, net.dns))
                .map_err(|e| format!("the agent's /etc/resolv.conf: {e}")),
            None => vpod_sidecar::net::write_own_resolv_conf(net.dns)
                .map_err(|e| ErrorChain(&e).to_string()),
        }
    }
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

    fn freeze(&mut self) -> Result<(), String> {
        if !self.pid1 {
            return Err("the sidecar is not the guest's init".into());
        }
        init::stop_all_others().map_err(|e| ErrorChain(&e).to_string())?;
        self.frozen = true;
        tracing::info!("frozen for a snapshot");
        Ok(())
    }

    fn thaw(&mut self) {
        if !std::mem::take(&mut self.frozen) {
            return;
        }
        match init::continue_all_others() {
            Ok(()) => tracing::info!("thawed"),
            Err(e) => tracing::warn!(error = %ErrorChain(&e), "thaw"),
        }
    }

    fn reidentify(
        &mut self,
        entropy: &[u8],
        network: Option<&GuestNetwork>,
    ) -> Result<GuestToHost, String> {
        if !self.pid1 {
            return Err("the sidecar is not the guest's init".into());
        }
        let hello = identity::reidentify(&self.identity, entropy)
            .map_err(|e| ErrorChain(&e).to_string())?;
        tracing::info!("reseeded from the host; new boot identity");
        // The clone's own link, before its processes go on. A failure leaves the clone without
        // a working network (the host's firewall is unaffected), and says so on the console.
        if let Some(net) = network
            && let Err(e) = self.move_network(net)
        {
            tracing::error!(error = %e, "cannot move the network to the clone's link");
        }
        // Only now may the clone's processes run again.
        self.thaw();
        Ok(hello)
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
fn serve_credential_proxy(identity: Arc<IdentityCell>) {
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
