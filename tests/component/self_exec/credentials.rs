//! The secret never touches the host: the real daemon (`host-agent serve --device-listen`)
//! relays a primary-path call between a sidecar and the user's device, and afterwards its
//! memory, its log and its state directory hold zero copies of the secret, and neither do the
//! sidecar's or the agent's memory.
//!
//! This test binary plays four roles, chosen by its first argument (it runs without libtest's
//! harness so that it can, see `nanoclaw_tests::self_exec`):
//! - `serve ...`: the real daemon, through `host_agent::daemon::serve_main`;
//! - `--kernel ...`: a FAKE VMM passed as `--vmm-bin`: it plays the sidecar, saying `Hello` with a
//!   real boot key and then running the sidecar's real proxy code (`vpod_sidecar::proxy`) with
//!   the VM's `vsock.sock_1025` in place of vsock, and starts the agent;
//! - `agent PORT DIR`: the agent, a separate process that calls the proxy;
//! - no role: the test. The device and the HTTPS server run in this process, which is also the
//!   scanner's positive control (it holds the secret, so the scan must find it here).
//!
//! The secret is drawn at run time in the test process, so it is in no executable mapping.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nanoclaw_tests::credential::{self, PASSPHRASE};
use nanoclaw_tests::fake_vmm::{self, ControlConn};
use nanoclaw_tests::http::parse_response;
use nanoclaw_tests::self_exec::{self, SERVE};
use nanoclaw_tests::upstream::{make_ca, start_upstream};
use nanoclaw_tests::{DaemonOptions, free_port, wait_for};
use vpod_sidecar::proxy::{self, IdentityCell, ProxyIdentity};

fn main() {
    self_exec::main(
        &[SERVE, ("--kernel", fake_vmm), ("agent", agent)],
        nanoclaw_tests::tests![secret_never_touches_the_host],
    );
}

// ---------------------------------------------------------------------------------------------
// Role: the fake VMM, playing the sidecar.

fn fake_vmm(args: &[String]) {
    let vm_dir = fake_vmm::vm_dir(args);
    std::fs::write(vm_dir.join("vmm.pid"), std::process::id().to_string()).unwrap();
    let sc = credential::sidecar();
    // Kept open until the scan is done, at the end of this function.
    let _control = ControlConn::open(&vm_dir, sc.boot_id, sc.public);
    let relay_socket = vm_dir.join("vsock.sock_1025");
    wait_for("the credential socket", Duration::from_secs(10), || {
        relay_socket.exists()
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let identity = Arc::new(IdentityCell::from(ProxyIdentity {
        boot_secret: zeroize::Zeroizing::new(sc.secret),
        boot_id: sc.boot_id,
    }));
    let connect = Arc::new(move || UnixStream::connect(&relay_socket));
    std::thread::spawn(move || proxy::serve(&listener, identity, connect));
    let me = std::env::current_exe().unwrap();
    let mut agent = Command::new(me)
        .arg("agent")
        .arg(port.to_string())
        .arg(&vm_dir)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(vm_dir.join("agent.pid"), agent.id().to_string()).unwrap();
    let _ = agent.wait();
    // Keep the control connection open until the test is done scanning.
    let done = vm_dir.join("scan-done");
    wait_for("the scan", Duration::from_secs(120), || done.exists());
}

// ---------------------------------------------------------------------------------------------
// Role: the agent.

/// `agent PORT VM-DIR`.
fn agent(args: &[String]) {
    let (port, vm_dir) = (&args[1], Path::new(&args[2]));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let request = std::fs::read_to_string(vm_dir.join("agent-request"))
        .unwrap_or_else(|_| "GET /svc/hello HTTP/1.1\r\n\r\n".into());
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, body) = loop {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let (status, body) = parse_response(&raw);
        // 503: the device has not linked up yet.
        if status != 503 || Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::fs::write(vm_dir.join("agent-result"), format!("{status} {body}")).unwrap();
    let done = vm_dir.join("scan-done");
    wait_for("the scan", Duration::from_secs(120), || done.exists());
}

// ---------------------------------------------------------------------------------------------
// The scanners.

/// Occurrences of `needle` in `hay`.
fn count(hay: &[u8], needle: &[u8]) -> usize {
    let first = needle[0];
    let mut n = 0;
    let mut i = 0;
    while let Some(p) = hay[i..].iter().position(|&b| b == first) {
        let at = i + p;
        if hay[at..].starts_with(needle) {
            n += 1;
        }
        i = at + 1;
    }
    n
}

/// Occurrences of `needle` in the readable mappings of process `pid`, and the bytes read.
fn scan_memory(pid: u32, needle: &[u8]) -> (usize, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let (mut hits, mut read) = (0, 0u64);
    const CHUNK: u64 = 4 << 20;
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut at = start;
        let mut carry: Vec<u8> = Vec::new();
        while at < end {
            let len = CHUNK.min(end - at);
            let mut buf = vec![0u8; len as usize];
            if mem.seek(SeekFrom::Start(at)).is_err() || mem.read_exact(&mut buf).is_err() {
                break;
            }
            read += len;
            let mut joined = std::mem::take(&mut carry);
            joined.extend_from_slice(&buf);
            hits += count(&joined, needle);
            let keep = needle.len() - 1;
            carry = joined[joined.len().saturating_sub(keep)..].to_vec();
            at += len;
        }
    }
    (hits, read)
}

/// Occurrences of `needle` in every regular file under `dir`, with the files read.
fn scan_dir(dir: &Path, needle: &[u8]) -> (usize, usize) {
    let (mut hits, mut files) = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            let (h, f) = scan_dir(&path, needle);
            hits += h;
            files += f;
        } else if ft.is_file()
            && let Ok(bytes) = std::fs::read(&path)
        {
            hits += count(&bytes, needle);
            files += 1;
        }
    }
    (hits, files)
}

// ---------------------------------------------------------------------------------------------
// The test.

fn api_create_vm(socket: &Path) -> String {
    let body = serde_json::to_string(&nanoclaw_api::CreateVm::new("/agent", vec![])).unwrap();
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
        s,
        "POST /v1/vms HTTP/1.1\r\nHost: daemon\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let (status, body) = parse_response(&raw);
    assert!((200..300).contains(&status), "create: {status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

fn secret_never_touches_the_host() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let secret = credential::random_secret();
    let needle = secret.as_bytes().to_vec();

    let ca = make_ca(p);
    let upstream = rt.block_on(start_upstream(&ca, &["api.test"], &secret));
    let api = format!("api.test:{}", upstream.addr.port());
    let vault = credential::make_vault(p, &api, &api, &secret);
    // Grants are per VM: this one names any VM (the id is the daemon's to choose).
    {
        let mut v = vault_device::vault::Vault::open(&vault, PASSPHRASE).unwrap();
        v.data.grants[0].vm = vault_device::grant::ANY_VM.into();
        v.save().unwrap();
    }

    let device_port = free_port();
    let mut daemon = DaemonOptions::self_exec()
        .arg("--device-listen")
        .arg(format!("127.0.0.1:{device_port}"))
        .rust_log("debug")
        .start()
        .expect("start the daemon");
    let (state, socket) = (daemon.state_dir(), daemon.socket());
    let log_path = daemon.dir().join("daemon.log");
    let daemon_pid = daemon.pid().expect("the daemon runs");

    // Pair with the code the daemon wrote, then keep the device's link up from this process.
    let code = std::fs::read_to_string(state.join("relay/pairing-code")).unwrap();
    let addr = format!("127.0.0.1:{device_port}");
    rt.block_on(async {
        let mut v = vault_device::vault::Vault::open(&vault, PASSPHRASE).unwrap();
        vault_device::device::pair(&mut v, &addr, &code, "test-phone")
            .await
            .unwrap();
    });
    let _device = rt.block_on(credential::start_device(
        &vault,
        &ca,
        vec![("api.test".into(), upstream.addr)],
    ));

    let id = api_create_vm(&socket);
    // The fake VMM works in the VMM's folder, as the real one does (the jail's root).
    let vm_dir = state.join("vms").join(&id).join("vmm");
    let result = vm_dir.join("agent-result");
    wait_for("the agent's call", Duration::from_secs(60), || {
        result.exists()
    });
    let outcome = std::fs::read_to_string(&result).unwrap();
    assert_eq!(
        outcome,
        "200 hello ",
        "daemon log:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    assert_eq!(upstream.seen.lock().unwrap().requests.len(), 1);

    let pid_of = |f: &str| -> u32 {
        std::fs::read_to_string(vm_dir.join(f))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (vmm_pid, agent_pid) = (pid_of("vmm.pid"), pid_of("agent.pid"));

    // Positive controls: the scanners find the secret where it is.
    let (own_hits, own_read) = scan_memory(std::process::id(), &needle);
    assert!(
        own_hits > 0,
        "the memory scanner missed the device's copy ({own_read} bytes read)"
    );
    let planted = p.join("planted");
    std::fs::create_dir(&planted).unwrap();
    std::fs::write(planted.join("x"), format!("log line {secret} end")).unwrap();
    assert_eq!(scan_dir(&planted, &needle), (1, 1));

    // The host: the daemon's memory, log and state directory.
    for (what, pid) in [
        ("daemon", daemon_pid),
        ("sidecar", vmm_pid),
        ("agent", agent_pid),
    ] {
        let (hits, read) = scan_memory(pid, &needle);
        assert!(read > 1 << 20, "{what}: only {read} bytes of memory read");
        assert_eq!(hits, 0, "{what}'s memory holds the secret");
        println!("scanned {what} (pid {pid}): {read} bytes of memory, 0 hits");
    }
    let log = std::fs::read(&log_path).unwrap();
    assert!(!log.is_empty());
    assert_eq!(count(&log, &needle), 0, "the daemon log holds the secret");
    let (hits, files) = scan_dir(&state, &needle);
    assert!(files >= 3, "only {files} state files");
    assert_eq!(hits, 0, "the state directory holds the secret");
    println!(
        "scanned the daemon log ({} bytes) and {files} state files: 0 hits",
        log.len()
    );

    std::fs::write(vm_dir.join("scan-done"), "").unwrap();
    let _ = daemon.kill();
}
