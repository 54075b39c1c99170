//! Prints how long the approval checks take: encoding a request and hashing it (the
//! challenge), and verifying a passkey assertion (what the host and vault-device run per
//! approval). Figures, not a pass/fail test: `cargo bench -p shared-proto --bench approval`.

use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use sha2::{Digest, Sha256};
use shared_proto::approval::{
    ApprovalRequest, Assertion, Passkey, RelyingParty, RequestAction, verify_approval,
};

fn percentiles(name: &str, mut ns: Vec<u128>) {
    ns.sort_unstable();
    let p = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    println!(
        "{name:<32} p50 {:>8.1} µs   p99 {:>8.1} µs   ({} runs)",
        p(0.5),
        p(0.99),
        ns.len()
    );
}

fn main() {
    let rp = RelyingParty {
        rp_id: "localhost".into(),
        origin: "http://localhost:8443".into(),
    };
    let request = ApprovalRequest {
        id: "0123456789abcdef01234567".into(),
        agent: "coder".into(),
        vm_id: "vm-0001".into(),
        profile: "worker".into(),
        action: RequestAction::ToolCall {
            server: "fs".into(),
            tool: "delete".into(),
        },
        arguments: format!(
            r#"{{"path":"/home/u/project","note":"{}"}}"#,
            "x".repeat(512)
        ),
        rule: "destructive".into(),
        reason: "deletes files".into(),
        created_unix_ms: 1,
        expires_unix_ms: u64::MAX,
        nonce: [7; 32],
    };
    let key = SigningKey::random(&mut rand_core::OsRng);
    let passkey = Passkey {
        credential_id: b"cred".to_vec(),
        public_key: key
            .verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec(),
        counter: 0,
    };
    let challenge = request.challenge().expect("encodes");
    let mut auth_data = Sha256::digest(b"localhost").to_vec();
    auth_data.extend_from_slice(&[0x05, 0, 0, 0, 1]);
    let client_data_json = format!(
        r#"{{"type":"webauthn.get","challenge":"{}","origin":"http://localhost:8443"}}"#,
        B64URL.encode(challenge)
    )
    .into_bytes();
    let mut msg = auth_data.clone();
    msg.extend_from_slice(&Sha256::digest(&client_data_json));
    let sig: Signature = key.sign(&msg);
    let assertion = Assertion {
        credential_id: b"cred".to_vec(),
        authenticator_data: auth_data,
        client_data_json,
        signature: sig.to_der().as_bytes().to_vec(),
    };

    let runs = 2000;
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        std::hint::black_box(request.challenge().expect("encodes"));
        t.push(s.elapsed().as_nanos());
    }
    percentiles("encode + SHA-256 (challenge)", t);
    let bytes = request.encode().expect("encodes");
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        std::hint::black_box(ApprovalRequest::decode(&bytes).expect("decodes"));
        t.push(s.elapsed().as_nanos());
    }
    percentiles("decode (canonical check)", t);
    let passkeys = [passkey];
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        verify_approval(&rp, &request, 2, &passkeys, &assertion).expect("verifies");
        t.push(s.elapsed().as_nanos());
    }
    percentiles("verify_approval (ES256)", t);
}
