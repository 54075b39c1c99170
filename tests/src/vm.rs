//! The e2e tier's microVM: [`TestVm::boot`] spawns the `nanoclaw-vmm` binary in a fresh VM
//! directory after binding the host control listener (`vsock.sock_<CONTROL_PORT>`), so the
//! sidecar's first connection finds it; [`Control`] is the host end of that connection. Everything
//! it starts is killed when it is dropped.
//!
//! The guest image comes from the manifest that `guest-image/build` writes
//! (`NANOCLAW_GUEST_MANIFEST`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use shared_proto::handshake::answer_hello;
use shared_proto::ports::CONTROL_PORT;
use shared_proto::{FrameDecoder, GuestToHost, HostToGuest, encode_frame};

use crate::workspace::{vmm_bin, workspace_root};

/// The guest kernel images and initramfs that `guest-image/build` produced.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The compressed kernel.
    pub bzimage: PathBuf,
    /// The uncompressed ELF kernel.
    pub vmlinux: PathBuf,
    /// The initramfs with the sidecar as `/init`.
    pub initramfs: PathBuf,
}

impl GuestImage {
    /// Reads the manifest named by `NANOCLAW_GUEST_MANIFEST` (default: the workspace's
    /// `target/guest-image/manifest`).
    pub fn from_env() -> Result<Self> {
        let path = std::env::var_os("NANOCLAW_GUEST_MANIFEST")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target/guest-image/manifest"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read {} (run guest-image/build)", path.display()))?;
        let get = |key: &str| -> Result<PathBuf> {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(PathBuf::from)
                .ok_or_else(|| anyhow!("{} has no {key}", path.display()))
        };
        Ok(Self {
            bzimage: get("KERNEL_BZIMAGE")?,
            vmlinux: get("KERNEL_VMLINUX")?,
            initramfs: get("INITRAMFS")?,
        })
    }
}

/// Which kernel image to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// `bzImage` (the compressed kernel with its setup header).
    BzImage,
    /// The ELF `vmlinux`.
    Vmlinux,
}

/// How to boot a test VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Kernel image.
    pub kernel: Kernel,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Appended to the VMM's kernel command line.
    pub cmdline_extra: Option<String>,
    /// More `nanoclaw-vmm` arguments, after the ones the spec implies (test hooks).
    pub vmm_args: Vec<String>,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            kernel: Kernel::BzImage,
            vcpus: 1,
            memory_mib: 128,
            cmdline_extra: None,
            vmm_args: Vec::new(),
        }
    }
}

/// Accepts the next connection on `listener`, polling every 20 ms; between polls `waiting`
/// may end the wait with its error (a deadline passed, a VMM that exited).
fn accept_polling(
    listener: &UnixListener,
    mut waiting: impl FnMut() -> Result<()>,
) -> Result<UnixStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => waiting()?,
            Err(e) => return Err(e.into()),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What [`TestVm::migrate_to`] saw.
#[derive(Debug)]
pub struct Migration {
    /// One line per pre-copy round, as the source VMM sent them.
    pub progress: Vec<serde_json::Value>,
    /// The source VMM's answer (`ok`, `state`, `migration`).
    pub answer: serde_json::Value,
    /// Bytes relayed from the source to the target.
    pub bytes: u64,
    /// From the request to the answer.
    pub elapsed: Duration,
}

/// How the VMM process ended.
#[derive(Debug)]
pub struct VmExit {
    /// The VMM's exit code (`None` if a signal killed it).
    pub code: Option<i32>,
    /// `<vm-dir>/exit.json`, parsed.
    pub report: serde_json::Value,
    /// The guest console.
    pub console: String,
}

/// A microVM booted by our VMM, with the host side of its vsock in a temporary directory.
#[derive(Debug)]
pub struct TestVm {
    child: Option<Child>,
    dir: tempfile::TempDir,
    control: UnixListener,
    started: Instant,
}

/// With `NANOCLAW_PIN_VMM_CPUS` set (for instance `NANOCLAW_PIN_VMM_CPUS=1 scripts/e2e`, which
/// passes it into L1), the `--cpus` list for the next VM, handed out in turn by the daemon's own
/// pinner (`--pin-vmm-cpus`), so test VMs and the daemon's VMs are placed alike.
fn pinned_cpus(vcpus: u8) -> Option<String> {
    static PINNER: std::sync::OnceLock<Option<host_agent::daemon::pinning::CpuPinner>> =
        std::sync::OnceLock::new();
    let on = std::env::var("NANOCLAW_PIN_VMM_CPUS")
        .is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false" | "no" | "off"));
    if !on {
        return None;
    }
    PINNER
        .get_or_init(|| host_agent::daemon::pinning::CpuPinner::from_own_affinity().ok())
        .as_ref()
        .map(|pinner| pinner.next_list(vcpus))
}

impl TestVm {
    /// Boots a VM as `spec` says. Returns once the VMM process is running.
    pub fn boot(spec: &VmSpec) -> Result<Self> {
        let image = GuestImage::from_env()?;
        let dir = tempfile::Builder::new().prefix("ncvm-").tempdir()?;
        let kernel = match spec.kernel {
            Kernel::BzImage => &image.bzimage,
            Kernel::Vmlinux => &image.vmlinux,
        };
        let mut first: Vec<std::ffi::OsString> = vec![
            "--kernel".into(),
            kernel.into(),
            "--initrd".into(),
            image.initramfs.clone().into(),
        ];
        if let Some(extra) = &spec.cmdline_extra {
            first.extend(["--cmdline-extra".into(), extra.into()]);
        }
        Self::spawn(spec, dir, first)
    }

    /// Spawns the VMM for a VM in `dir` with `first` (what it starts from) and what every test
    /// VM has: the sidecar's control listener, its folder, vCPUs, memory, console file, pinning
    /// and `spec`'s own arguments.
    fn spawn(
        spec: &VmSpec,
        dir: tempfile::TempDir,
        first: Vec<std::ffi::OsString>,
    ) -> Result<Self> {
        let control = UnixListener::bind(dir.path().join(format!("vsock.sock_{CONTROL_PORT}")))
            .context("bind the control listener")?;
        control.set_nonblocking(true)?;
        let mut cmd = Command::new(vmm_bin());
        cmd.args(first)
            .arg("--vm-dir")
            .arg(dir.path())
            .args(["--vcpus", &spec.vcpus.to_string()])
            .args(["--memory-mib", &spec.memory_mib.to_string()])
            .arg("--console")
            .arg(dir.path().join("console.log"))
            .stdin(Stdio::null());
        if let Some(cpus) = pinned_cpus(spec.vcpus) {
            cmd.args(["--cpus", &cpus]);
        }
        cmd.args(&spec.vmm_args);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", vmm_bin().display()))?;
        Ok(Self {
            child: Some(child),
            dir,
            control,
            started: Instant::now(),
        })
    }

    /// Starts a VMM that takes a VM migrating in (`--migrate-from`): it connects to a socket
    /// in its own folder, which [`TestVm::migrate_to`] relays to the source. `spec` gives the
    /// memory and vCPUs, which must be the source's. Returns once the VMM process runs and has
    /// connected.
    pub fn migrate_in(spec: &VmSpec) -> Result<(Self, UnixStream)> {
        let dir = tempfile::Builder::new().prefix("ncvm-").tempdir()?;
        let inbound_path = dir.path().join("inbound.sock");
        let inbound = UnixListener::bind(&inbound_path).context("bind the inbound socket")?;
        let first = vec!["--migrate-from".into(), inbound_path.into_os_string()];
        let mut vm = Self::spawn(spec, dir, first)?;
        let link = vm.accept_from_vmm(&inbound, Duration::from_secs(60))?;
        Ok((vm, link))
    }

    /// Accepts the VMM's connection on `listener`, failing if the VMM exits first.
    fn accept_from_vmm(
        &mut self,
        listener: &UnixListener,
        timeout: Duration,
    ) -> Result<UnixStream> {
        let deadline = Instant::now() + timeout;
        accept_polling(listener, || {
            if let Some(status) = self.vmm_exited() {
                bail!("the VMM exited ({status}) before it connected");
            }
            ensure!(
                Instant::now() < deadline,
                "the VMM did not connect within {timeout:?}"
            );
            Ok(())
        })
    }

    /// Live-migrates this VM into the VMM of [`TestVm::migrate_in`], whose link is
    /// `target_link`, playing the daemons' part: a socket in this VM's folder for the source
    /// VMM's link, a relay between the two links, and the control socket's `migrate` request
    /// with `downtime_ms`. Returns the request's progress lines and its answer.
    pub fn migrate_to(
        &mut self,
        target_link: UnixStream,
        downtime_ms: u64,
        timeout: Duration,
    ) -> Result<Migration> {
        let listener = UnixListener::bind(self.dir.path().join("migrate.sock"))?;
        let mut control = UnixStream::connect(self.dir.path().join("control.sock"))
            .context("connect to the VMM's control socket")?;
        control.set_read_timeout(Some(timeout))?;
        writeln!(
            control,
            r#"{{"op":"migrate","socket":"migrate.sock","downtime_ms":{downtime_ms}}}"#
        )?;
        let started = Instant::now();
        let source_link = self.accept_from_vmm(&listener, timeout)?;
        let relay = |mut from: UnixStream, to: UnixStream| {
            std::thread::spawn(move || {
                let n = std::io::copy(&mut from, &mut &to).unwrap_or(0);
                let _ = to.shutdown(std::net::Shutdown::Write);
                n
            })
        };
        let up = relay(source_link.try_clone()?, target_link.try_clone()?);
        let down = relay(target_link, source_link);
        let mut progress = Vec::new();
        let mut lines = BufReader::new(control).lines();
        let answer = loop {
            let line = lines
                .next()
                .context("the control socket closed before the migration's answer")?
                .context("read the migration's answer")?;
            let value: serde_json::Value =
                serde_json::from_str(&line).with_context(|| format!("parse {line:?}"))?;
            if value.get("progress").is_some() {
                progress.push(value["progress"].clone());
            } else {
                break value;
            }
        };
        let elapsed = started.elapsed();
        let bytes = up.join().unwrap_or(0);
        let _ = down.join();
        Ok(Migration {
            progress,
            answer,
            bytes,
            elapsed,
        })
    }

    /// One request on the VMM's control socket (`{"op":...}`), and its answer.
    pub fn vmm_control(&self, request: &str) -> Result<serde_json::Value> {
        let mut stream = UnixStream::connect(self.dir.path().join("control.sock"))
            .context("connect to the VMM's control socket")?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        writeln!(stream, "{request}")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("parse {line:?}"))
    }

    /// The VM directory (holds `vsock.sock`, the console log and `exit.json`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The guest console so far.
    pub fn console(&self) -> String {
        std::fs::read(self.dir.path().join("console.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Sends `signo` to the VMM process.
    pub fn signal(&self, signo: i32) -> Result<()> {
        let child = self.child.as_ref().context("the VMM has already exited")?;
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions; the child
        // has not been reaped yet (we hold it), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, signo) };
        ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        Ok(())
    }

    fn vmm_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the sidecar's control connection, checks its `Hello` and acknowledges it.
    ///
    /// A connection that closes before its `Hello` (the guest gave up on a slow connect and
    /// the sidecar retries with backoff, as it does under heavy nested emulation) is dropped
    /// and the next one is awaited, until `timeout`.
    pub fn accept_control(&mut self, timeout: Duration) -> Result<Control> {
        let deadline = Instant::now() + timeout;
        loop {
            let stream = self.accept_control_stream(deadline, timeout)?;
            stream.set_nonblocking(false)?;
            let mut control = Control {
                stream,
                decoder: FrameDecoder::new(),
                closed: false,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let hello = match control.recv(left) {
                Ok(hello) => hello,
                Err(e) if control.closed && Instant::now() < deadline => {
                    println!("control connection closed before its hello ({e}); awaiting a retry");
                    continue;
                }
                Err(e) => {
                    return Err(e.context(format!("sidecar hello; console:\n{}", self.console())));
                }
            };
            let verdict = answer_hello(&hello);
            control.send(&verdict.reply)?;
            verdict.outcome.context("handshake")?;
            println!(
                "sidecar said hello {:.2} s after the VMM started",
                self.started.elapsed().as_secs_f64()
            );
            return Ok(control);
        }
    }

    fn accept_control_stream(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<UnixStream> {
        loop {
            match self.control.accept() {
                Ok((s, _)) => return Ok(s),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("accept the control connection"),
            }
            if let Some(status) = self.vmm_exited() {
                bail!(
                    "VMM exited ({status}) before the sidecar connected; console:\n{}",
                    self.console()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "no control connection within {timeout:?}; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Opens a host-initiated vsock connection to guest `port` (hybrid vsock `CONNECT`).
    pub fn connect(&self, port: u32, timeout: Duration) -> Result<UnixStream> {
        let mut s = UnixStream::connect(self.dir.path().join("vsock.sock"))
            .context("connect to vsock.sock")?;
        s.set_read_timeout(Some(timeout))?;
        writeln!(s, "CONNECT {port}")?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            ensure!(line.len() < 64, "CONNECT answer too long: {line:?}");
            let n = s.read(&mut byte).context("read the CONNECT answer")?;
            ensure!(n == 1, "vsock.sock closed before answering CONNECT {port}");
            line.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&line);
        ensure!(line.starts_with("OK "), "CONNECT {port} answered {line:?}");
        s.set_read_timeout(None)?;
        Ok(s)
    }

    /// Binds the host listener for guest-initiated connections to host `port`.
    pub fn listen(&self, port: u32) -> Result<UnixListener> {
        Ok(UnixListener::bind(
            self.dir.path().join(format!("vsock.sock_{port}")),
        )?)
    }

    /// Accepts the next connection on `listener` (from [`TestVm::listen`]) within `timeout`.
    pub fn accept_within(&self, listener: &UnixListener, timeout: Duration) -> Result<UnixStream> {
        let deadline = Instant::now() + timeout;
        accept_polling(listener, || {
            ensure!(
                Instant::now() < deadline,
                "no connection within {timeout:?}; console:\n{}",
                self.console()
            );
            Ok(())
        })
    }

    /// Waits for the VMM process to exit and collects its report.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<VmExit> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.vmm_exited() {
                break status;
            }
            ensure!(
                Instant::now() < deadline,
                "VMM still running after {timeout:?}; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.child = None;
        let report_path = self.dir.path().join("exit.json");
        let report = std::fs::read(&report_path)
            .with_context(|| format!("read {}", report_path.display()))
            .and_then(|b| serde_json::from_slice(&b).context("parse exit.json"))?;
        Ok(VmExit {
            code: status.code(),
            report,
            console: self.console(),
        })
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The host end of a sidecar's control connection.
#[derive(Debug)]
pub struct Control {
    stream: UnixStream,
    decoder: FrameDecoder<GuestToHost>,
    /// The sidecar closed the connection (read EOF).
    closed: bool,
}

impl Control {
    /// Sends one message.
    pub fn send(&mut self, msg: &HostToGuest) -> Result<()> {
        self.stream.write_all(&encode_frame(msg)?)?;
        Ok(())
    }

    /// Receives one message, waiting at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<GuestToHost> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(msg) = self.decoder.decode_next()? {
                return Ok(msg);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "no message from the sidecar within {timeout:?}"
            );
            self.stream.set_read_timeout(Some(left))?;
            let n = self
                .stream
                .read(&mut buf)
                .context("read from the sidecar")?;
            if n == 0 {
                self.closed = true;
                bail!("the sidecar closed the control connection");
            }
            self.decoder.push(&buf[..n]);
        }
    }
}

/// `len` bytes of a deterministic pseudo-random pattern (xorshift64), so that a misplaced,
/// dropped or repeated chunk shows up as a mismatch.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` into `stream` from a second thread while reading the echo back, and checks the
/// echo byte for byte. Returns the elapsed time.
pub fn echo_round_trip(stream: UnixStream, data: &[u8], timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let mut writer = stream.try_clone()?;
    let to_send = data.to_vec();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        for chunk in to_send.chunks(64 * 1024) {
            writer.write_all(chunk)?;
        }
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut reader = BufReader::new(stream);
    reader.get_ref().set_read_timeout(Some(timeout))?;
    let mut echoed = Vec::with_capacity(data.len());
    while echoed.len() < data.len() {
        let buf = reader.fill_buf().context("read the echo")?;
        ensure!(
            !buf.is_empty(),
            "echo ended after {} of {} bytes",
            echoed.len(),
            data.len()
        );
        let n = buf.len();
        echoed.extend_from_slice(buf);
        reader.consume(n);
        ensure!(start.elapsed() < timeout, "echo timed out");
    }
    sender
        .join()
        .map_err(|_| anyhow!("sender thread panicked"))?
        .context("send")?;
    ensure!(echoed.len() == data.len(), "echo returned extra bytes");
    if let Some(at) = echoed.iter().zip(data).position(|(a, b)| a != b) {
        bail!("echo differs from what was sent at byte {at}");
    }
    Ok(start.elapsed())
}
