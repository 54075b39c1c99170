//! The daemon with `--approvals-listen`: `nanoclaw approvals` lists (nothing pending yet),
//! `--register-link` hands out a one-time link to the pages, which are served on TCP with their
//! security headers and refuse a foreign `Host`; without the flag approvals are off.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, extra: &[&str]) -> Daemon {
    std::fs::write(dir.join("kernel"), "k").unwrap();
    std::fs::write(dir.join("initrd"), "i").unwrap();
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .arg("serve")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("api.sock"))
        .arg("--kernel")
        .arg(dir.join("kernel"))
        .arg("--initrd")
        .arg(dir.join("initrd"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(dir.join("api.sock")).is_err() {
        assert!(
            Instant::now() < deadline,
            "daemon did not start: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

fn nanoclaw(dir: &Path, args: &[&str]) -> Output {
    Command::new(nanoclaw_tests::built_bin("nanoclaw"))
        .arg("--socket")
        .arg(dir.join("api.sock"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn the_daemon_serves_approvals_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let _d = start(dir.path(), &["--approvals-listen", &listen]);

    let out = nanoclaw(dir.path(), &["approvals"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "no pending approval requests\n");
    let out = nanoclaw(dir.path(), &["approvals", "--json"]);
    assert_eq!(text(&out.stdout).trim(), "[]");

    let out = nanoclaw(dir.path(), &["approvals", "--register-link"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let link = stdout.lines().last().unwrap();
    let prefix = format!("http://localhost:{port}/register#");
    assert!(link.starts_with(&prefix), "{stdout}");
    assert!(link.len() > prefix.len() + 20, "a real token: {link}");

    // The pages, through the origin the browser uses.
    let client = reqwest::Client::new();
    let resp = client
        .get(format!("http://localhost:{port}/register"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(resp.text().await.unwrap().contains("/static/webauthn.js"));
    // A foreign Host (DNS rebinding) is refused.
    let resp = client
        .get(format!("http://127.0.0.1:{port}/register"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 421);
    // An unknown request and a guessed registration token are refused.
    let resp = client
        .get(format!("http://localhost:{port}/api/approvals/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = client
        .post(format!("http://localhost:{port}/api/register/begin"))
        .json(&serde_json::json!({"token": "guess"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = client
        .post(format!(
            "http://localhost:{port}/api/approvals/nope/approve"
        ))
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // Every approval-related event lands in the state directory's audit log.
    assert!(dir.path().join("state/audit.ndjson").exists());
}

#[test]
fn without_the_flag_approvals_are_off() {
    let dir = tempfile::tempdir().unwrap();
    let _d = start(dir.path(), &[]);
    let out = nanoclaw(dir.path(), &["approvals"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "no pending approval requests\n");
    let out = nanoclaw(dir.path(), &["approvals", "--register-link"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("approvals are off"),
        "{}",
        text(&out.stderr)
    );
}
