//! The pieces of a fake VMM. A daemon started with `--vmm-bin <the test executable>` (see
//! [`crate::DaemonOptions::self_exec`]) runs it as `BIN --kernel K --initrd I --vm-dir DIR ...`
//! for each VM; the test plays the VMM and the sidecar in that process: it connects to
//! `<vm-dir>/vsock.sock_<CONTROL_PORT>` as the sidecar would over vsock ([`ControlConn`]), speaks
//! `shared-proto`, and finally writes `exit.json` ([`write_exit`]) as the VMM would.
//!
//! A fake VMM can also serve the VMM's control socket ([`serve_control`]: pause, resume, state,
//! snapshots into fake snapshot folders, and live migrations over a fake stream), restore such a
//! folder ([`restore`], which refuses a damaged one as the VMM does), and receive a migrating VM
//! ([`migrate_in`]; the stream and what each [`MigrationMode`] acts out are in [`migration`]).
//!
//! What the fake guest then does (its agent) is the test's own; an agent with a profile can
//! call its MCP tools over `<vm-dir>/vsock.sock_<MCP_PORT>` as the sidecar would forward them
//! ([`McpClient`]).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shared_proto::message::{GuestToHost, HostToGuest};
use shared_proto::ports::{CONTROL_PORT, MCP_PORT};
use shared_proto::{FrameDecoder, PROTOCOL_VERSION, encode_frame};

pub mod migration;

pub use migration::{MIGRATION_MODE_FILE, MigrationMode, migrate_in};

/// How long the fake sidecar keeps trying to reach a daemon that is away.
const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// The VM directory of a fake VMM's command line (`--vm-dir DIR`).
///
/// # Panics
///
/// If there is none.
pub fn vm_dir(args: &[String]) -> PathBuf {
    args.windows(2)
        .find(|w| w[0] == "--vm-dir")
        .map(|w| PathBuf::from(&w[1]))
        .expect("--vm-dir")
}

/// The host end of the control port in `vm_dir`.
fn control_socket(vm_dir: &Path) -> PathBuf {
    vm_dir.join(format!("vsock.sock_{CONTROL_PORT}"))
}

/// Writes `<vm-dir>/exit.json` as the VMM does when it ends.
pub fn write_exit(vm_dir: &Path, reason: &str, code: i32) {
    let text = format!(r#"{{"reason":"{reason}","exit_code":{code},"boot_to_ready_ms":5}}"#);
    std::fs::write(vm_dir.join("exit.json"), text).unwrap();
}

/// Ends the fake VMM because the daemon did not behave as the test expects: says why on stderr
/// (the VM's `vmm.log`) and in `exit.json`'s reason (`fake_failure: WHY`), and exits 1.
pub fn fail(vm_dir: &Path, why: &str) -> ! {
    eprintln!("fake vmm: {why}");
    write_exit(
        vm_dir,
        &format!("fake_failure: {}", why.replace('"', "'")),
        1,
    );
    std::process::exit(1);
}

/// The fake sidecar's control connection to the daemon.
#[derive(Debug)]
pub struct ControlConn {
    stream: UnixStream,
    decoder: FrameDecoder<HostToGuest>,
    vm_dir: PathBuf,
}

impl ControlConn {
    /// Connects, retrying while the daemon is away (for up to 30 s), and says nothing yet.
    ///
    /// # Panics
    ///
    /// If no daemon listens within that time.
    pub fn connect(vm_dir: &Path) -> ControlConn {
        let path = control_socket(vm_dir);
        let stream = connect_retrying(&path);
        ControlConn {
            stream,
            decoder: FrameDecoder::new(),
            vm_dir: vm_dir.to_owned(),
        }
    }

    /// Connects and says `Hello` as a sidecar of boot `boot_id` with the boot key `public_key`;
    /// the daemon's answer (`None` if it closed or said nothing within 10 s) and the connection.
    pub fn try_open(
        vm_dir: &Path,
        boot_id: [u8; 16],
        public_key: [u8; 32],
    ) -> (Option<HostToGuest>, ControlConn) {
        let mut conn = ControlConn::connect(vm_dir);
        conn.send(&GuestToHost::Hello {
            protocol_version: PROTOCOL_VERSION,
            sidecar_version: "fake".into(),
            boot_id,
            ephemeral_public_key: public_key,
        });
        (conn.recv(Duration::from_secs(10)), conn)
    }

    /// Connects and says `Hello` until the daemon acknowledges it. Like the real sidecar, a
    /// connection that drops before the answer is retried (a dying daemon may still accept one),
    /// for up to 30 s; any other answer ends the fake VMM ([`fail`]).
    pub fn open(vm_dir: &Path, boot_id: [u8; 16], public_key: [u8; 32]) -> ControlConn {
        let deadline = Instant::now() + RECONNECT_FOR;
        loop {
            let (answer, conn) = ControlConn::try_open(vm_dir, boot_id, public_key);
            match answer {
                Some(HostToGuest::HelloAck { .. }) => return conn,
                None if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => fail(vm_dir, &format!("hello answered with {other:?}")),
            }
        }
    }

    /// Sends one message. A write may fail if the daemon died; the next read notices.
    pub fn send(&mut self, msg: &GuestToHost) {
        let _ = self.stream.write_all(&encode_frame(msg).unwrap());
    }

    /// Sends `bytes` as they are (garbage, for the daemon to refuse).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next message, or `None` on EOF, error or timeout.
    pub fn recv(&mut self, timeout: Duration) -> Option<HostToGuest> {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(msg) = self.decoder.decode_next().ok()? {
                return Some(msg);
            }
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.decoder.push(&buf[..n]),
            }
        }
    }

    /// Waits until the daemon closes the connection (after the fake misbehaved); [`fail`]s if it
    /// has not within 10 s.
    pub fn expect_closed(&mut self) {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 256];
        // Frames already queued for us (such as stdin's EOF) may come first.
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => fail(&self.vm_dir, &format!("daemon kept a bad connection: {e}")),
            }
        }
    }
}

/// A fake agent's MCP session with the host's gateway: newline-delimited JSON-RPC on
/// `<vm-dir>/vsock.sock_<MCP_PORT>`, initialized.
#[derive(Debug)]
pub struct McpClient {
    stream: std::io::BufReader<UnixStream>,
    next_id: u64,
}

impl McpClient {
    /// Connects (retrying for up to 30 s while the gateway is not listening yet) and runs the
    /// `initialize` handshake.
    ///
    /// # Panics
    ///
    /// If the gateway does not answer, or refuses the handshake.
    pub fn connect(vm_dir: &Path) -> McpClient {
        let path = vm_dir.join(format!("vsock.sock_{MCP_PORT}"));
        let stream = connect_retrying(&path);
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut client = McpClient {
            stream: std::io::BufReader::new(stream),
            next_id: 0,
        };
        let init = client.request(
            "initialize",
            serde_json::json!({"protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "fake-agent", "version": "0"}}),
        );
        assert!(init.get("result").is_some(), "initialize: {init}");
        client.send(&serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        client
    }

    fn send(&mut self, msg: &serde_json::Value) {
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.stream.get_mut().write_all(&line).unwrap();
    }

    /// Sends one request and returns the whole answer (`result` or `error`).
    ///
    /// # Panics
    ///
    /// If no answer comes within 30 s, or it is not JSON.
    pub fn request(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        self.send(
            &serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method,
            "params": params}),
        );
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.stream, &mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Calls the tool `name` with `arguments`; the whole answer.
    pub fn call(&mut self, name: &str, arguments: serde_json::Value) -> serde_json::Value {
        self.request(
            "tools/call",
            serde_json::json!({"name": name, "arguments": arguments}),
        )
    }
}

/// Connects to the Unix socket at `path`, retrying for [`RECONNECT_FOR`] while nothing listens
/// there yet.
///
/// # Panics
///
/// If nothing listens within that time.
fn connect_retrying(path: &Path) -> UnixStream {
    let deadline = Instant::now() + RECONNECT_FOR;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The state file's magic and format version the real VMM writes (its `snapshot::format`);
/// the fake's state files start the same way, so the daemon reads their version.
const SNAPSHOT_MAGIC: &[u8; 8] = b"NCLAWSNP";
/// The fake memory file's length.
pub const FAKE_MEMORY_BYTES: u64 = 4 << 20;
/// The file in the VM folder where the fake control socket notes each request's `op`.
pub const CONTROL_OPS_FILE: &str = "control-ops.log";

/// Whether a live migration has stopped this fake VMM's guest: during the switch-over, and for
/// good once the VM moved or may have (the real guest's vCPUs stay parked).
static MIGRATION_STOPPED: AtomicBool = AtomicBool::new(false);

/// Returns once no live migration holds this fake VMM's guest stopped: a fake sidecar calls it
/// before it acts on anything, since a stopped guest hears nothing. After the VM moved that is
/// never: the daemon then ends this VMM.
pub fn wait_while_migration_stopped() {
    while MIGRATION_STOPPED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Serves `<vm-dir>/control.sock` as the VMM does, on a thread: `pause`, `resume`, `state`,
/// `snapshot` (refused unless paused), which writes `memory.bin` (sparse, with data at
/// 1 MiB) and then `state.bin`: the real magic, the real format version (2), `boot_id`, and the
/// memory file's length and byte sum, which [`restore`] checks; and `migrate`
/// ([`migration`]: progress lines, then the answer; after `moved` every request but `state` is
/// refused). Each request's `op` is appended to [`CONTROL_OPS_FILE`].
pub fn serve_control(vm_dir: &Path, boot_id: [u8; 16], paused: bool) {
    let listener = std::os::unix::net::UnixListener::bind(vm_dir.join("control.sock")).unwrap();
    let vm_dir = vm_dir.to_owned();
    std::thread::spawn(move || {
        let mut paused = paused;
        let mut moved = false;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut line = String::new();
            let mut reader = std::io::BufReader::new(&stream);
            if std::io::BufRead::read_line(&mut reader, &mut line).is_err() {
                continue;
            }
            let req: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let op = req["op"].as_str().unwrap_or("").to_owned();
            let mut ops = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(vm_dir.join(CONTROL_OPS_FILE))
                .unwrap();
            writeln!(ops, "{op}").unwrap();
            let state = |p: bool| if p { "paused" } else { "running" };
            let answer = match op.as_str() {
                "state" if moved => serde_json::json!({"ok": true, "state": "moved"}),
                _ if moved => {
                    serde_json::json!({"ok": false, "error": "the VM has moved to another host"})
                }
                "migrate" => {
                    let mut progress = &stream;
                    let sent = migration::send(&vm_dir, boot_id, &req, paused, &mut progress);
                    (paused, moved) = (sent.paused, sent.moved);
                    sent.answer
                }
                "pause" => {
                    paused = true;
                    serde_json::json!({"ok": true, "state": "paused"})
                }
                "resume" => {
                    paused = false;
                    MIGRATION_STOPPED.store(false, Ordering::SeqCst);
                    serde_json::json!({"ok": true, "state": "running"})
                }
                "state" => serde_json::json!({"ok": true, "state": state(paused)}),
                "snapshot" if !paused => serde_json::json!({"ok": false,
                    "error": "the VM is not paused: pause it before taking a snapshot"}),
                "snapshot" => {
                    let dir = req["dir"].as_str().unwrap_or("").to_owned();
                    match write_snapshot(&vm_dir.join(&dir), boot_id) {
                        Ok(data) => serde_json::json!({"ok": true, "state": "paused",
                            "snapshot": {"dir": dir, "vcpus": 1,
                                "memory_bytes": FAKE_MEMORY_BYTES, "memory_data_bytes": data}}),
                        Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
                    }
                }
                _ => serde_json::json!({"ok": false, "error": "unknown request"}),
            };
            let mut stream = &stream;
            let _ = stream.write_all(format!("{answer}\n").as_bytes());
        }
    });
}

/// A fake snapshot in the new folder `dir`: the memory file, then the state file. Answers the
/// memory file's data bytes.
fn write_snapshot(dir: &Path, boot_id: [u8; 16]) -> std::io::Result<u64> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    let new = |name: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(name))
    };
    let data = b"guest memory: a secret the guest held";
    let mut memory = new("memory.bin")?;
    memory.set_len(FAKE_MEMORY_BYTES)?;
    std::io::Seek::seek(&mut memory, std::io::SeekFrom::Start(1 << 20))?;
    memory.write_all(data)?;
    let sum: u64 = data.iter().map(|&b| u64::from(b)).sum();
    let mut state = SNAPSHOT_MAGIC.to_vec();
    state.extend(2u32.to_le_bytes());
    state.extend(boot_id);
    state.extend(FAKE_MEMORY_BYTES.to_le_bytes());
    state.extend(sum.to_le_bytes());
    new("state.bin")?.write_all(&state)?;
    Ok(data.len() as u64)
}

/// What a fake restore found in `dir` (`--restore DIR`): the boot id of the snapshot's guest.
/// A state file of another magic or version, or a memory file whose length or byte sum is not
/// the state file's, is refused as the VMM refuses: a line on stderr and exit 1.
pub fn restore(dir: &Path) -> [u8; 16] {
    let refuse = |why: &str| -> ! {
        eprintln!(
            "nanoclaw-vmm: error: restore the snapshot in {}: {why}",
            dir.display()
        );
        std::process::exit(1);
    };
    let state = std::fs::read(dir.join("state.bin"))
        .unwrap_or_else(|e| refuse(&format!("read state.bin: {e}")));
    if state.len() != 44 || &state[..8] != SNAPSHOT_MAGIC || state[8..12] != 2u32.to_le_bytes() {
        refuse("state.bin is not a snapshot of format version 2");
    }
    let memory = std::fs::read(dir.join("memory.bin"))
        .unwrap_or_else(|e| refuse(&format!("read memory.bin: {e}")));
    let sum: u64 = memory.iter().map(|&b| u64::from(b)).sum();
    let want_len = u64::from_le_bytes(state[28..36].try_into().unwrap());
    let want_sum = u64::from_le_bytes(state[36..44].try_into().unwrap());
    if memory.len() as u64 != want_len || sum != want_sum {
        refuse("the checksum of the memory file does not match the state");
    }
    state[12..28].try_into().unwrap()
}
