//! Notifications of a pending approval reach a local push service and a local webhook: the
//! push service (an HTTP server here) checks the VAPID JWT's ES256 signature and claims and
//! decrypts the RFC 8291 payload with the subscription's private key and auth secret; both
//! receivers check that the notice names the approval and carries no argument value.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use hkdf::Hkdf;
use host_agent::approval::passkey::{ApprovalConfig, PasskeyApprover};
use host_agent::approval::{ApprovalAction, ApprovalOutcome, ApprovalSubject, Approver};
use host_agent::notify::webhook::Webhook;
use host_agent::notify::webpush::{Subscription, SubscriptionKeys, WebPush};
use host_agent::notify::{Notice, Notifier};
use nanoclaw_audit::AuditLog;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use serde_json::{Value, json};
use sha2::Sha256;

/// What the local push service received, decrypted, or why it refused.
type Inbox = Arc<Mutex<Vec<Result<Value, String>>>>;

struct PushService {
    ua_secret: SecretKey,
    auth: [u8; 16],
    origin: String,
    inbox: Inbox,
}

/// The receiving side of RFC 8291, written from the RFC independently of the sender.
fn decrypt(ua_secret: &SecretKey, auth: &[u8], body: &[u8]) -> Result<Vec<u8>, String> {
    let salt = body.get(..16).ok_or("short")?;
    let rs = u32::from_be_bytes(body.get(16..20).ok_or("short")?.try_into().unwrap());
    let idlen = *body.get(20).ok_or("short")? as usize;
    let keyid = body.get(21..21 + idlen).ok_or("short")?;
    let ciphertext = &body[21 + idlen..];
    if ciphertext.len() > rs as usize {
        return Err("more than one record".into());
    }
    let as_public = PublicKey::from_sec1_bytes(keyid).map_err(|_| "bad keyid")?;
    let shared = p256::ecdh::diffie_hellman(ua_secret.to_nonzero_scalar(), as_public.as_affine());
    let ua_public = ua_secret.public_key().to_encoded_point(false);
    let info = [b"WebPush: info\0".as_slice(), ua_public.as_bytes(), keyid].concat();
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(auth), shared.raw_secret_bytes())
        .expand(&info, &mut ikm)
        .unwrap();
    let prk = Hkdf::<Sha256>::new(Some(salt), &ikm);
    let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
    prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
        .unwrap();
    prk.expand(b"Content-Encoding: nonce\0", &mut nonce)
        .unwrap();
    let mut plain = Aes128Gcm::new_from_slice(&cek)
        .unwrap()
        .decrypt(Nonce::from_slice(&nonce), ciphertext)
        .map_err(|_| "does not decrypt")?;
    while plain.last() == Some(&0) {
        plain.pop();
    }
    if plain.pop() != Some(2) {
        return Err("no last-record delimiter".into());
    }
    Ok(plain)
}

/// Checks `Authorization: vapid t=JWT, k=KEY` per RFC 8292.
fn check_vapid(headers: &HeaderMap, audience: &str) -> Result<(), String> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or("no Authorization")?;
    let rest = auth.strip_prefix("vapid ").ok_or("not vapid")?;
    let (t, k) = rest.split_once(", ").ok_or("no t and k")?;
    let jwt = t.strip_prefix("t=").ok_or("no t")?;
    let key = B64URL
        .decode(k.strip_prefix("k=").ok_or("no k")?)
        .map_err(|_| "k")?;
    let key = VerifyingKey::from_sec1_bytes(&key).map_err(|_| "bad k")?;
    let (signing_input, sig) = jwt.rsplit_once('.').ok_or("no signature")?;
    let sig = Signature::from_slice(&B64URL.decode(sig).map_err(|_| "sig b64")?)
        .map_err(|_| "sig length")?;
    key.verify(signing_input.as_bytes(), &sig)
        .map_err(|_| "JWT signature does not verify")?;
    let (header, claims) = signing_input.split_once('.').ok_or("no claims")?;
    let header: Value = serde_json::from_slice(&B64URL.decode(header).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&B64URL.decode(claims).unwrap()).unwrap();
    if header["alg"] != "ES256" {
        return Err("alg".into());
    }
    if claims["aud"] != audience {
        return Err(format!("aud {}", claims["aud"]));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = claims["exp"].as_u64().ok_or("no exp")?;
    if exp <= now || exp > now + 24 * 3600 {
        return Err("exp out of range".into());
    }
    if !claims["sub"]
        .as_str()
        .is_some_and(|s| s.starts_with("mailto:"))
    {
        return Err("sub".into());
    }
    Ok(())
}

async fn push_endpoint(
    State(svc): State<Arc<PushService>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let result = (|| {
        if headers
            .get("content-encoding")
            .and_then(|v| v.to_str().ok())
            != Some("aes128gcm")
        {
            return Err("Content-Encoding is not aes128gcm".to_string());
        }
        if headers.get("ttl").is_none() {
            return Err("no TTL".into());
        }
        check_vapid(&headers, &svc.origin)?;
        let plain = decrypt(&svc.ua_secret, &svc.auth, &body)?;
        serde_json::from_slice::<Value>(&plain).map_err(|e| e.to_string())
    })();
    let ok = result.is_ok();
    svc.inbox.lock().unwrap().push(result);
    if ok {
        StatusCode::CREATED
    } else {
        StatusCode::BAD_REQUEST
    }
}

async fn webhook_endpoint(State(inbox): State<Inbox>, body: Bytes) -> StatusCode {
    inbox
        .lock()
        .unwrap()
        .push(serde_json::from_slice(&body).map_err(|e| e.to_string()));
    StatusCode::NO_CONTENT
}

async fn serve(router: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, router).await });
    format!("http://127.0.0.1:{}", addr.port())
}

async fn wait_for(inbox: &Inbox, n: usize) -> Vec<Result<Value, String>> {
    for _ in 0..500 {
        if inbox.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    inbox.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_request_is_pushed_encrypted_and_posted_to_the_webhook() {
    let dir = tempfile::tempdir().unwrap();
    // The browser's side of a subscription.
    let ua_secret = SecretKey::random(&mut rand_core::OsRng);
    let auth = *b"sixteen-byte-sec";
    let push_inbox: Inbox = Arc::default();
    let mut push_origin = String::new();
    let push_url = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        push_origin.push_str(&format!(
            "http://127.0.0.1:{}",
            l.local_addr().unwrap().port()
        ));
        let svc = Arc::new(PushService {
            ua_secret: ua_secret.clone(),
            auth,
            origin: push_origin.clone(),
            inbox: Arc::clone(&push_inbox),
        });
        let app = axum::Router::new()
            .route("/wpush/v2/abc", axum::routing::post(push_endpoint))
            .with_state(svc);
        tokio::spawn(async move { axum::serve(l, app).await });
        format!("{push_origin}/wpush/v2/abc")
    };
    let hook_inbox: Inbox = Arc::default();
    let hook_url = serve(
        axum::Router::new()
            .route("/hook", axum::routing::post(webhook_endpoint))
            .with_state(Arc::clone(&hook_inbox)),
    )
    .await
        + "/hook";

    let push = WebPush::open(
        &dir.path().join("vapid.key"),
        dir.path().join("push-subscriptions.json"),
        "mailto:owner@example.com".into(),
    )
    .unwrap();
    let sub = Subscription {
        endpoint: push_url.clone(),
        keys: SubscriptionKeys {
            p256dh: B64URL.encode(ua_secret.public_key().to_encoded_point(false).as_bytes()),
            auth: B64URL.encode(auth),
        },
    };
    push.subscribe(sub.clone()).unwrap();
    assert_eq!(push.subscriptions().unwrap(), [sub]);
    // The VAPID key persists.
    let again = WebPush::open(
        &dir.path().join("vapid.key"),
        dir.path().join("push-subscriptions.json"),
        "mailto:owner@example.com".into(),
    )
    .unwrap();
    assert_eq!(again.public_key(), push.public_key());

    let notifiers: Vec<Arc<dyn Notifier>> = vec![Arc::new(push), Arc::new(Webhook::new(hook_url))];
    let approver = PasskeyApprover::new(
        ApprovalConfig {
            rp: shared_proto::approval::RelyingParty {
                rp_id: "localhost".into(),
                origin: "http://localhost:9".into(),
            },
            ttl: Duration::from_millis(1500),
            passkeys_file: None,
        },
        Arc::new(AuditLog::open(dir.path().join("audit.ndjson")).unwrap()),
        notifiers,
    )
    .unwrap();
    let subject = ApprovalSubject {
        agent: "coder".into(),
        vm_id: "vm-1".into(),
        profile: "worker".into(),
        action: ApprovalAction::Credential {
            name: "github".into(),
            target_host: "api.github.com".into(),
        },
        arguments: json!({"body": "SECRET-ARGUMENT-VALUE"}),
        rule: "vault".into(),
        reason: "needs a token".into(),
    };
    let a = approver.clone();
    let task = tokio::spawn(async move { a.request(subject).await });

    let pushed = wait_for(&push_inbox, 1).await;
    let hooked = wait_for(&hook_inbox, 1).await;
    let id = approver.pending()[0].request.id.clone();
    for got in [&pushed, &hooked] {
        assert_eq!(got.len(), 1, "{got:?}");
        let notice: Notice = serde_json::from_value(got[0].clone().unwrap()).unwrap();
        assert_eq!(notice.approval_id, id);
        assert_eq!(notice.url, format!("http://localhost:9/approve/{id}"));
        assert_eq!(
            notice.summary,
            "coder wants to use credential github for api.github.com (rule vault)"
        );
        assert!(
            !got[0]
                .as_ref()
                .unwrap()
                .to_string()
                .contains("SECRET-ARGUMENT-VALUE")
        );
    }
    // No answer: the request expires.
    assert_eq!(task.await.unwrap(), ApprovalOutcome::Expired);
    assert!(approver.pending().is_empty());
}
