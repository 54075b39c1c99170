//! The daemon with `--approvals-listen`: `nanoclaw approvals` lists (nothing pending yet),
//! `--register-link` hands out a one-time link to the pages, which are served on TCP with their
//! security headers and refuse a foreign `Host`; without the flag approvals are off.

use nanoclaw_tests::{DaemonOptions, free_port, text};

#[tokio::test]
async fn the_daemon_serves_approvals_when_asked() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = DaemonOptions::without_vms()
        .args(["--approvals-listen", &listen])
        .start()
        .expect("start the daemon");

    let out = d.cli(&["approvals"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "no pending approval requests\n");
    let out = d.cli(&["approvals", "--json"]);
    assert_eq!(text(&out.stdout).trim(), "[]");

    let out = d.cli(&["approvals", "--register-link"]);
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
    assert!(d.state_dir().join("audit.ndjson").exists());
}

#[test]
fn without_the_flag_approvals_are_off() {
    let d = DaemonOptions::without_vms()
        .start()
        .expect("start the daemon");
    let out = d.cli(&["approvals"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "no pending approval requests\n");
    let out = d.cli(&["approvals", "--register-link"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("approvals are off"),
        "{}",
        text(&out.stderr)
    );
}
