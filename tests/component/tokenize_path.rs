//! Tokenization on the credential path, end to end on loopback: the host's agent tokenizer
//! (the one its MCP gateway uses) goes to the device over the paired link with the surrogates
//! it issued; the device restores them in calls to services, tokenizes calls to the profile's
//! LLM hosts and the responses, and reports kinds and counts to the host's audit log.

use std::sync::Arc;

use host_agent::mcp::AgentTokens;
use host_agent::policy::Profile;
use nanoclaw_audit::AuditLog;
use nanoclaw_tests::credential::{
    Sidecar, attach_tokenized, make_vault, pair, random_secret, sidecar, start_device, start_proxy,
};
use nanoclaw_tests::http::http;
use nanoclaw_tests::upstream::{RESPONSE_EMAIL, Upstream, make_ca, start_upstream};
use serde_json::Value;

const CARD: &str = "4111 1111 1111 1111";
const SSN: &str = "123-45-6789";

struct World {
    _dir: tempfile::TempDir,
    upstream: Upstream,
    relay: Arc<host_agent::relay::Relay>,
    audit: std::path::PathBuf,
    vm_dir: std::path::PathBuf,
    sc: Sidecar,
    api: String,
    ca_pem: Vec<u8>,
    _device: Arc<vault_device::device::Device>,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path());
    let secret = random_secret();
    let upstream = start_upstream(&ca, &["api.test"], &secret).await;
    let api = format!("api.test:{}", upstream.addr.port());
    let vault = make_vault(dir.path(), &api, &api, &secret);
    let relay = host_agent::relay::Relay::open(&dir.path().join("host"), "test-host").unwrap();
    let audit = dir.path().join("audit.ndjson");
    relay.set_audit(Arc::new(AuditLog::open(&audit).unwrap()));
    let (addr, _l) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    pair(&vault, &relay, addr).await;
    let device = start_device(&vault, &ca, vec![("api.test".into(), upstream.addr)]).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), relay.wait_linked())
        .await
        .expect("the device links up");
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    World {
        _dir: dir,
        upstream,
        relay,
        audit,
        vm_dir,
        sc: sidecar(),
        api,
        ca_pem: std::fs::read(&ca.pem_path).unwrap(),
        _device: device,
    }
}

/// The agent's tokenizer under a profile with `mode`, `llm_hosts` and `restore_hosts`.
fn tokens(mode: &str, llm_hosts: &[&str], restore_hosts: &[&str]) -> Arc<AgentTokens> {
    let list = |hosts: &[&str]| {
        let quoted: Vec<String> = hosts.iter().map(|h| format!("{h:?}")).collect();
        quoted.join(", ")
    };
    let profile = Profile::from_toml(&format!(
        "name = \"t\"\ntier = \"worker\"\ntokenize = \"{mode}\"\nllm_hosts = [{}]\n\
         restore_hosts = [{}]\n",
        list(llm_hosts),
        list(restore_hosts)
    ))
    .unwrap();
    Arc::new(
        AgentTokens::for_profile(&profile)
            .unwrap()
            .expect("tokenizing"),
    )
}

/// Posts `body` (JSON) to `/json` through the proxy; the status and the response body.
async fn post(proxy: std::net::SocketAddr, body: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        http(
            proxy,
            &format!(
                "POST /svc/json HTTP/1.1\r\nContent-Type: application/json\r\nAccept-Encoding: gzip\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    })
    .await
    .unwrap()
}

fn last_body(w: &World) -> String {
    let seen = w.upstream.seen.lock().unwrap();
    String::from_utf8(seen.bodies.last().cloned().unwrap_or_default()).unwrap()
}

fn tokenize_records(w: &World) -> Vec<Value> {
    nanoclaw_audit::tail(&w.audit, 1000)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.record.kind == "tokenize")
        .map(|r| r.record.data)
        .collect()
}

/// Waits for the device's reports (sent without waiting on the link) to reach the log.
async fn wait_records(w: &World, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let records = tokenize_records(w);
        if records.len() >= n {
            return records;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokenize_records(w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_get_real_values_llms_and_the_agent_get_surrogates() {
    let w = world().await;
    let tokens = tokens("enforce", &[], &[&w.api]);
    // The gateway tokenized a tool result: the agent holds the card's surrogate.
    let (tool_result, _) = tokens
        .lock()
        .tokenize_text(&format!("card {CARD}"))
        .unwrap();
    let card_surrogate = tool_result.strip_prefix("card ").unwrap().to_owned();
    assert_ne!(card_surrogate, CARD);
    let _vm = attach_tokenized(&w.relay, &w.vm_dir, &w.sc, Arc::clone(&tokens));
    let proxy = start_proxy(&w.vm_dir, &w.sc);

    // To a service: the host's surrogate is restored, so the service gets the real card; the
    // response's email reaches the agent as a surrogate, and so does the echoed card.
    let (status, answer) = post(proxy, format!(r#"{{"pay":"{card_surrogate}"}}"#)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(last_body(&w), format!(r#"{{"pay":"{CARD}"}}"#));
    assert_eq!(
        w.upstream
            .seen
            .lock()
            .unwrap()
            .accept_encodings
            .last()
            .cloned()
            .flatten()
            .as_deref(),
        Some("identity"),
        "the agent's gzip is replaced: a compressed answer could not be scanned"
    );
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let email_surrogate = answer["contact"].as_str().unwrap().to_owned();
    assert_ne!(email_surrogate, RESPONSE_EMAIL);
    assert!(email_surrogate.contains('@'), "{email_surrogate}");
    let echoed = answer["got"].as_str().unwrap();
    assert!(
        !echoed.contains(CARD) && echoed.contains(&card_surrogate),
        "{echoed}"
    );

    // The device's own surrogate (from the response) is restored on the way out too, and a
    // surrogate-shaped value nobody issued is left alone.
    let stranger = "5555 5555 5555 4444";
    let (status, _) = post(
        proxy,
        format!(r#"{{"reply_to":"{email_surrogate}","card":"{stranger}"}}"#),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        last_body(&w),
        format!(r#"{{"reply_to":"{RESPONSE_EMAIL}","card":"{stranger}"}}"#)
    );

    // More surrogates than one link message carries: the relay sends them in several, and the
    // device restores the last one.
    let many: Vec<String> = (0..300)
        .map(|i| format!("user{i:03}@example.org"))
        .collect();
    let (tool_result, _) = tokens.lock().tokenize_text(&many.join(" ")).unwrap();
    let last_surrogate = tool_result.split(' ').next_back().unwrap().to_owned();
    assert_ne!(last_surrogate, many[299]);
    let (status, _) = post(proxy, format!(r#"{{"to":"{last_surrogate}"}}"#)).await;
    assert_eq!(status, 200);
    assert_eq!(last_body(&w), format!(r#"{{"to":"{}"}}"#, many[299]));

    // The audit log holds kinds and counts, never a value.
    let records = wait_records(&w, 5).await;
    let restored: Vec<&Value> = records
        .iter()
        .filter(|r| r["direction"] == "request_restored")
        .collect();
    assert_eq!(restored.len(), 3, "{records:?}");
    assert_eq!(restored[0]["counts"]["cards"], 1);
    assert_eq!(restored[1]["counts"]["emails"], 1);
    assert!(
        records
            .iter()
            .all(|r| r["path"] == "credential" && r["mode"] == "enforce")
    );
    assert!(records.iter().all(|r| r["target_host"] == w.api.as_str()));
    let log = std::fs::read_to_string(&w.audit).unwrap();
    for value in [CARD, RESPONSE_EMAIL, &card_surrogate, &email_surrogate] {
        assert!(!log.contains(value), "{value} reached the audit log");
    }
    nanoclaw_audit::verify(&w.audit).expect("the chain verifies");
}

/// Real values go only to the hosts the profile lists in `restore_hosts`: to any other, the
/// agent's surrogate leaves as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_not_in_restore_hosts_gets_the_surrogate() {
    let w = world().await;
    let tokens = tokens("enforce", &[], &[]);
    let (tool_result, _) = tokens
        .lock()
        .tokenize_text(&format!("card {CARD}"))
        .unwrap();
    let card_surrogate = tool_result.strip_prefix("card ").unwrap().to_owned();
    let _vm = attach_tokenized(&w.relay, &w.vm_dir, &w.sc, Arc::clone(&tokens));
    let proxy = start_proxy(&w.vm_dir, &w.sc);
    let (status, answer) = post(proxy, format!(r#"{{"pay":"{card_surrogate}"}}"#)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(last_body(&w), format!(r#"{{"pay":"{card_surrogate}"}}"#));
    // The answer is still tokenized on its way to the agent.
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_ne!(answer["contact"], RESPONSE_EMAIL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_to_an_llm_host_is_tokenized_with_the_hosts_surrogates() {
    let w = world().await;
    let tokens = tokens("enforce", &[&w.api], &[]);
    let _vm = attach_tokenized(&w.relay, &w.vm_dir, &w.sc, Arc::clone(&tokens));
    let proxy = start_proxy(&w.vm_dir, &w.sc);
    let (status, _) = post(proxy, format!(r#"{{"prompt":"ssn {SSN}, card {CARD}"}}"#)).await;
    assert_eq!(status, 200);
    // The model got surrogates, and they are the very ones the host's gateway gives.
    let (expected, _) = tokens
        .lock()
        .tokenize_text(&format!("ssn {SSN}, card {CARD}"))
        .unwrap();
    assert_eq!(last_body(&w), format!(r#"{{"prompt":"{expected}"}}"#));
    let records = wait_records(&w, 2).await;
    let sent = records
        .iter()
        .find(|r| r["direction"] == "request_tokenized")
        .unwrap_or_else(|| panic!("{records:?}"));
    assert_eq!(
        (
            sent["counts"]["cards"].as_u64(),
            sent["counts"]["ssns"].as_u64()
        ),
        (Some(1), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn monitor_mode_changes_nothing_and_reports_counts() {
    let w = world().await;
    let tokens = tokens("monitor", &[&w.api], &[]);
    let _vm = attach_tokenized(&w.relay, &w.vm_dir, &w.sc, tokens);
    let proxy = start_proxy(&w.vm_dir, &w.sc);
    let body = format!(r#"{{"prompt":"card {CARD}"}}"#);
    let (status, answer) = post(proxy, body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(last_body(&w), body);
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["contact"], RESPONSE_EMAIL);
    let records = wait_records(&w, 2).await;
    assert!(
        records.iter().all(|r| r["mode"] == "monitor"),
        "{records:?}"
    );
    let response = records
        .iter()
        .find(|r| r["direction"] == "response")
        .expect("response");
    assert_eq!(response["counts"]["emails"], 1);
    assert!(!std::fs::read_to_string(&w.audit).unwrap().contains(CARD));
}

/// In enforce mode an answer of any other content type (here `application/octet-stream`) is
/// scanned as text too, so a value in it reaches the agent as a surrogate; monitor mode leaves
/// it as it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_content_types_are_scanned_in_enforce_mode() {
    for (mode, tokenized) in [("enforce", true), ("monitor", false)] {
        let w = world().await;
        let _vm = attach_tokenized(&w.relay, &w.vm_dir, &w.sc, tokens(mode, &[], &[]));
        let proxy = start_proxy(&w.vm_dir, &w.sc);
        let (status, body) =
            tokio::task::spawn_blocking(move || http(proxy, "GET /svc/octet HTTP/1.1\r\n\r\n"))
                .await
                .unwrap();
        assert_eq!(status, 200, "{mode}: {body}");
        assert!(body.starts_with("contact ") && body.contains('@'), "{body}");
        assert_eq!(body.contains(RESPONSE_EMAIL), !tokenized, "{mode}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_bodies_are_refused_in_enforce_mode_and_event_streams_still_stream() {
    let w = world().await;
    // A service that gets real values: its request bodies must be scanned.
    let tokens = tokens("enforce", &[], &[&w.api]);
    let _vm = attach_tokenized(&w.relay, &w.vm_dir, &w.sc, tokens);
    let proxy = start_proxy(&w.vm_dir, &w.sc);
    let before = w.upstream.seen.lock().unwrap().requests.len();
    let (status, body) = tokio::task::spawn_blocking(move || {
        http(
            proxy,
            "POST /svc/json HTTP/1.1\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\n\x1f\x08\x00\x00",
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("compressed"), "{body}");
    assert_eq!(
        w.upstream.seen.lock().unwrap().requests.len(),
        before,
        "nothing sent"
    );
    let records = wait_records(&w, 1).await;
    assert!(
        records[0]["unscanned"]
            .as_str()
            .unwrap()
            .contains("compressed")
    );

    // The event stream still streams (the first event before the server sends the last).
    let seen = Arc::clone(&w.upstream.seen);
    let upstream = Arc::new(w.upstream);
    let up = Arc::clone(&upstream);
    tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.write_all(b"GET /svc/sse HTTP/1.1\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap() > 0 && !line.contains("data: first") {
            line.clear();
        }
        assert!(line.contains("data: first"), "{line}");
        assert_eq!(seen.lock().unwrap().sse_released_by_client, None);
        up.release();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fallback_path_is_refused_when_calls_are_tokenized() {
    use vpod_sidecar::proxy::fallback::{Fallback, FallbackTls};
    use vpod_sidecar::proxy::{self, IdentityCell, ProxyIdentity};
    let w = world().await;
    let _vm = attach_tokenized(&w.relay, &w.vm_dir, &w.sc, tokens("enforce", &[], &[]));
    // A sidecar that asks for the sealed secret to make the call itself, in the guest, where
    // the agent key never is.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let tls = FallbackTls::from_pem(&w.ca_pem, vec![("api.test".into(), w.upstream.addr)]).unwrap();
    let fallback = Arc::new(Fallback::new(tls));
    let socket = host_agent::relay::proxy_socket_path(&w.vm_dir);
    let connect = Arc::new(move || std::os::unix::net::UnixStream::connect(&socket));
    let id = Arc::new(IdentityCell::from(ProxyIdentity {
        boot_secret: zeroize::Zeroizing::new(w.sc.secret),
        boot_id: w.sc.boot_id,
    }));
    std::thread::spawn(move || proxy::serve_with(&listener, id, connect, Some(fallback)));
    let (status, body) = tokio::task::spawn_blocking(move || {
        http(
            proxy_addr,
            "POST /svc/hello HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("tokenized"), "{body}");
    assert!(w.upstream.seen.lock().unwrap().requests.is_empty());
}
