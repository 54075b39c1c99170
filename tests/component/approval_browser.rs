//! A real browser approves a pending request: headless Chromium, driven over the DevTools
//! Protocol with a virtual authenticator, registers a passkey on the approval server's page and
//! approves; then a user-unverified assertion and a bogus signature are refused.
//!
//! Skips (loudly) only when Chromium is missing and `CI` is unset; under CI a missing Chromium
//! fails the test. `NANOCLAW_CHROMIUM` names the binary (default `chromium`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use host_agent::approval::passkey::{ApprovalConfig, PasskeyApprover};
use host_agent::approval::{ApprovalAction, ApprovalOutcome, ApprovalSubject, Approver};
use nanoclaw_audit::{self as audit, AuditLog};
use nanoclaw_tests::browser;
use serde_json::json;
use shared_proto::approval::RelyingParty;

/// How long a page may take to become ready.
const PAGE: Duration = Duration::from_secs(10);

fn subject(tool: &str) -> ApprovalSubject {
    ApprovalSubject {
        agent: "coder".into(),
        vm_id: "vm-0001".into(),
        profile: "worker".into(),
        action: ApprovalAction::ToolCall {
            server: "fs".into(),
            tool: tool.into(),
        },
        arguments: json!({"path": "/home/u/project", "recursive": true}),
        rule: "destructive".into(),
        reason: "deletes files".into(),
    }
}

/// Starts a request in the background and waits until it is pending; answers its id and the
/// task that resolves to the outcome.
async fn start_request(
    approver: &PasskeyApprover,
    tool: &str,
) -> Result<(String, tokio::task::JoinHandle<ApprovalOutcome>)> {
    let before: Vec<String> = approver
        .pending()
        .into_iter()
        .map(|p| p.request.id)
        .collect();
    let a = approver.clone();
    let s = subject(tool);
    let task = tokio::spawn(async move { a.request(s).await });
    for _ in 0..200 {
        if let Some(p) = approver
            .pending()
            .into_iter()
            .find(|p| !before.contains(&p.request.id))
        {
            return Ok((p.request.id, task));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the request never became pending")
}

const APPROVE_READY: &str = "document.readyState === 'complete' && \
    document.getElementById('status').dataset.state === 'pending'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_registers_a_passkey_and_approves() -> Result<()> {
    let bin = browser::chromium_bin();
    if !browser::chromium_available(&bin) {
        if std::env::var_os("CI").is_some() {
            panic!("{bin} is missing under CI: scripts/setup installs the chromium package");
        }
        eprintln!(
            "\n\n*** SKIPPING chromium_registers_a_passkey_and_approves: {bin} is not installed \
             (apt-get install chromium, or scripts/setup) ***\n\n"
        );
        return Ok(());
    }

    let dir = tempfile::tempdir()?;
    let audit_path = dir.path().join("audit.ndjson");
    let audit = Arc::new(AuditLog::open(&audit_path)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin = format!("http://localhost:{}", listener.local_addr()?.port());
    let approver = PasskeyApprover::new(
        ApprovalConfig {
            rp: RelyingParty {
                rp_id: "localhost".into(),
                origin: origin.clone(),
            },
            ttl: Duration::from_secs(120),
            passkeys_file: Some(dir.path().join("passkeys.json")),
        },
        audit,
        Vec::new(),
    )?;
    let app = host_agent::approval::server::router(approver.clone(), None);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (_browser, mut cdp) = browser::launch(&bin, Duration::from_secs(60)).await?;
    let auth_id = cdp.add_virtual_authenticator(true).await?;

    // Register, through a one-time link.
    let link = approver.registration_link()?;
    cdp.open(
        &link,
        "document.readyState === 'complete' && typeof nanoclawRegister === 'function'",
        PAGE,
    )
    .await?;
    assert_eq!(cdp.eval("nanoclawRegister()").await?, json!("registered"));
    assert_eq!(approver.passkeys().len(), 1);
    // The link was used up.
    assert!(
        cdp.eval("nanoclawRegister()")
            .await?
            .as_str()
            .is_some_and(|s| s.contains("not valid")),
        "a registration link works once"
    );

    // Approve a pending request: the waiting future resolves Approved.
    let (id, task) = start_request(&approver, "delete").await?;
    cdp.open(&approver.approval_url(&id), APPROVE_READY, PAGE)
        .await?;
    assert_eq!(
        cdp.eval("document.getElementById('arguments').textContent")
            .await?,
        json!(r#"{"path":"/home/u/project","recursive":true}"#),
        "the page shows the full arguments"
    );
    assert_eq!(cdp.eval("nanoclawApprove()").await?, json!("approved"));
    let outcome = tokio::time::timeout(Duration::from_secs(10), task).await??;
    assert_eq!(
        outcome,
        ApprovalOutcome::Approved {
            approval_id: id.clone()
        }
    );
    assert!(approver.passkeys()[0].counter > 0);
    // Replaying that assertion over HTTP: not for the same request again, nor for a new one.
    let replay = |id: &str| {
        format!(
            "fetch('/api/approvals/{id}/approve', {{method: 'POST', \
             headers: {{'content-type': 'application/json'}}, \
             body: JSON.stringify(window.nanoclawLastAssertion)}}) \
             .then(async r => r.status + ' ' + (await r.json()).error)"
        )
    };
    let r = cdp.eval(&replay(&id)).await?;
    assert!(r.as_str().is_some_and(|s| s.starts_with("404 ")), "{r}");
    let (next, task) = start_request(&approver, "delete").await?;
    let r = cdp.eval(&replay(&next)).await?;
    assert!(
        r.as_str()
            .is_some_and(|s| s.starts_with("403 ") && s.contains("challenge is not this request's")),
        "{r}"
    );
    approver.deny(&next)?;
    let outcome = tokio::time::timeout(Duration::from_secs(10), task).await??;
    assert!(
        matches!(outcome, ApprovalOutcome::Denied { .. }),
        "{outcome:?}"
    );

    // User not verified: the approval fails and the request stays pending.
    cdp.call(
        "WebAuthn.setUserVerified",
        json!({"authenticatorId": auth_id, "isUserVerified": false}),
    )
    .await?;
    let (id, task) = start_request(&approver, "delete").await?;
    cdp.open(&approver.approval_url(&id), APPROVE_READY, PAGE)
        .await?;
    let r = cdp.eval("nanoclawApprove()").await?;
    eprintln!("user not verified: {r}");
    assert!(r.as_str().is_some_and(|s| s.starts_with("error")), "{r}");
    assert!(approver.get(&id).is_some(), "still pending");
    approver.deny(&id)?;
    let outcome = tokio::time::timeout(Duration::from_secs(10), task).await??;
    assert!(
        matches!(outcome, ApprovalOutcome::Denied { .. }),
        "{outcome:?}"
    );
    cdp.call(
        "WebAuthn.setUserVerified",
        json!({"authenticatorId": auth_id, "isUserVerified": true}),
    )
    .await?;

    // A bogus signature: refused by our verifier.
    cdp.call(
        "WebAuthn.setResponseOverrideBits",
        json!({"authenticatorId": auth_id, "isBogusSignature": true}),
    )
    .await?;
    let (id, task) = start_request(&approver, "delete").await?;
    cdp.open(&approver.approval_url(&id), APPROVE_READY, PAGE)
        .await?;
    let r = cdp.eval("nanoclawApprove()").await?;
    // Chromium's bogus signature is not even DER; either way our check refuses it.
    eprintln!("bogus signature: {r}");
    assert!(
        r.as_str()
            .is_some_and(|s| s.contains("passkey check failed: malformed signature")
                || s.contains("passkey check failed: the signature does not verify")),
        "{r}"
    );
    assert!(approver.get(&id).is_some(), "still pending");
    approver.deny(&id)?;
    let outcome = tokio::time::timeout(Duration::from_secs(10), task).await??;
    assert!(
        matches!(outcome, ApprovalOutcome::Denied { .. }),
        "{outcome:?}"
    );

    // Everything is in a verifying audit chain, and no argument value is.
    let summary = audit::verify(&audit_path)?;
    let records = audit::tail(&audit_path, 100)?;
    assert_eq!(summary.records, records.len() as u64);
    let kinds: Vec<&str> = records.iter().map(|r| r.record.kind.as_str()).collect();
    for kind in [
        "passkey_registered",
        "approval_request",
        "approval",
        "approval_rejected",
        "denial",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let count = |kind: &str| kinds.iter().filter(|k| **k == kind).count();
    assert_eq!(count("approval_request"), 4);
    assert_eq!(count("approval"), 1, "one approval, however often replayed");
    assert_eq!(count("denial"), 3);
    let text = std::fs::read_to_string(&audit_path)?;
    assert!(
        !text.contains("/home/u/project"),
        "argument values never reach the audit log"
    );
    Ok(())
}
