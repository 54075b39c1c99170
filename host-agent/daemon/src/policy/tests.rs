use serde_json::{Map, Value, json};

use super::*;

fn args(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn example(name: &str) -> AccessPolicy {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/profiles")
        .join(name);
    AccessPolicy::load(&path).unwrap_or_else(|e| panic!("{name}: {}", crate::error_chain(&e)))
}

const SMALL: &str = r#"
name = "t"
tier = "worker"
[servers.s]
command = ["true"]
[[tools]]
server = "s"
name = "read"
args.path = { prefix = "/data/*x\"" }
"#;

#[test]
fn examples_load_and_compile() {
    let worker = example("worker.toml");
    assert_eq!(worker.profile().tier, Tier::Worker);
    assert!(worker.visible("read_file"));
    assert!(!worker.visible(SPAWN_AGENT_TOOL));
    assert!(worker.cedar_source().contains("forbid"));
    let orch = example("orchestrator.toml");
    assert!(orch.visible(SPAWN_AGENT_TOOL));
    assert!(orch.visible_tools().contains(&SPAWN_AGENT_TOOL.to_string()));
}

#[test]
fn allows_within_constraints_and_names_the_rule() {
    let p = example("worker.toml");
    let d = p
        .decide("a", "read_file", &args(json!({"path": "/data/x"})), false)
        .unwrap();
    assert_eq!(
        d,
        Decision::Allow {
            rule: "tool:files/read_file".into()
        }
    );
    let d = p
        .decide(
            "a",
            "transfer",
            &args(json!({"amount": 100, "account": "acct-ops"})),
            false,
        )
        .unwrap();
    assert_eq!(d.kind(), "allow");
}

#[test]
fn denies_outside_constraints_with_the_rule() {
    let p = example("worker.toml");
    let cases = [
        (
            "read_file",
            json!({"path": "/etc/passwd"}),
            "arg:files/read_file/path.prefix",
        ),
        ("read_file", json!({}), "arg:files/read_file/path.prefix"),
        (
            "read_file",
            json!({"path": "/data/../etc/passwd"}),
            "arg:files/read_file/path.prefix",
        ),
        (
            "read_file",
            json!({"path": "/data/x/.."}),
            "arg:files/read_file/path.prefix",
        ),
        // Review finding M9: encoded dot segments, encoded slashes and backslashes, which an
        // upstream may decode into a `..` step out of the prefix.
        (
            "read_file",
            json!({"path": "/data/%2e%2e/etc/passwd"}),
            "arg:files/read_file/path.prefix",
        ),
        (
            "read_file",
            json!({"path": "/data/%2E%2E/etc/passwd"}),
            "arg:files/read_file/path.prefix",
        ),
        (
            "read_file",
            json!({"path": "/data/..%2fetc/passwd"}),
            "arg:files/read_file/path.prefix",
        ),
        (
            "read_file",
            json!({"path": "/data/..%5Cetc"}),
            "arg:files/read_file/path.prefix",
        ),
        (
            "read_file",
            json!({"path": "/data/..\\etc\\passwd"}),
            "arg:files/read_file/path.prefix",
        ),
        (
            "read_file",
            json!({"path": 7}),
            "arg:files/read_file/path.type",
        ),
        (
            "transfer",
            json!({"amount": 101, "account": "acct-ops"}),
            "arg:files/transfer/amount.max",
        ),
        (
            "transfer",
            json!({"amount": 0, "account": "acct-ops"}),
            "arg:files/transfer/amount.min",
        ),
        (
            "transfer",
            json!({"amount": 5.5, "account": "acct-ops"}),
            "arg:files/transfer/amount.type",
        ),
        (
            "transfer",
            json!({"amount": 5, "account": "acct-evil"}),
            "arg:files/transfer/account.one_of",
        ),
        ("exec_shell", json!({}), DEFAULT_DENY),
        (SPAWN_AGENT_TOOL, json!({}), DEFAULT_DENY),
    ];
    for (tool, a, rule) in cases {
        let d = p.decide("a", tool, &args(a.clone()), false).unwrap();
        match &d {
            Decision::Deny { rule: r, reason } => {
                assert_eq!(r, rule, "{tool} {a}");
                assert!(!reason.is_empty());
            }
            other => panic!("{tool} {a}: {other:?}"),
        }
    }
}

#[test]
fn approval_rules_ask_then_allow_once_approved() {
    let p = example("worker.toml");
    let a = args(json!({"path": "/data/x"}));
    let d = p.decide("a", "delete_file", &a, false).unwrap();
    assert_eq!(
        d,
        Decision::NeedsApproval {
            rule: "approval:files/delete_file".into(),
            reason: "deletes a file".into()
        }
    );
    assert_eq!(
        p.decide("a", "delete_file", &a, true).unwrap().kind(),
        "allow"
    );
    // A constraint still denies outright: approval does not widen the bounds.
    let bad = args(json!({"path": "/etc"}));
    assert_eq!(
        p.decide("a", "delete_file", &bad, false).unwrap().kind(),
        "deny"
    );
    assert_eq!(
        p.decide("a", "delete_file", &bad, true).unwrap().kind(),
        "deny"
    );
}

#[test]
fn like_patterns_are_escaped() {
    let p = AccessPolicy::from_toml(SMALL).unwrap();
    let ok = args(json!({"path": "/data/*x\"/f"}));
    assert_eq!(p.decide("a", "read", &ok, false).unwrap().kind(), "allow");
    // The `*` in the prefix is literal, not a wildcard.
    let wild = args(json!({"path": "/data/anything-x\"/f"}));
    assert_eq!(p.decide("a", "read", &wild, false).unwrap().kind(), "deny");
}

#[test]
fn typos_and_bad_shapes_are_load_errors() {
    let bad = [
        ("unknown top-level key", SMALL.replace("tier =", "teir =")),
        (
            "unknown tool key",
            SMALL.replace("name = \"read\"", "name = \"read\"\naproval = \"x\""),
        ),
        ("unknown bound", SMALL.replace("prefix =", "prefx =")),
        (
            "wrong type",
            SMALL.replace("prefix = \"/data/*x\\\"\"", "prefix = 3"),
        ),
        ("unknown tier", SMALL.replace("\"worker\"", "\"root\"")),
        (
            "undeclared server",
            SMALL.replace("server = \"s\"", "server = \"z\""),
        ),
        (
            "mixed bounds",
            SMALL.replace("prefix = \"/data/*x\\\"\"", "prefix = \"/\", max = 3"),
        ),
        (
            "bad name",
            SMALL.replace("name = \"read\"", "name = \"re ad\""),
        ),
        (
            "reserved tool",
            SMALL.replace("name = \"read\"", "name = \"spawn_agent\""),
        ),
        (
            "server without command",
            SMALL.replace("command = [\"true\"]", ""),
        ),
        (
            "url not http",
            SMALL.replace("command = [\"true\"]", "url = \"ftp://x\""),
        ),
        (
            "duplicate tool",
            format!("{SMALL}\n[[tools]]\nserver = \"s\"\nname = \"read\"\n"),
        ),
        (
            "llm host with a path",
            SMALL.replace("tier =", "llm_hosts = [\"api.test/v1\"]\ntier ="),
        ),
        (
            "llm host with a bad port",
            SMALL.replace("tier =", "llm_hosts = [\"api.test:0\"]\ntier ="),
        ),
        (
            "type conflict",
            format!(
                "{SMALL}\n[[tools]]\nserver = \"s\"\nname = \"b\"\nargs.path = {{ max = 3 }}\n"
            ),
        ),
    ];
    let good = SMALL.replace(
        "tier =",
        "llm_hosts = [\"api.test\", \"llm.test:8443\"]\ntier =",
    );
    assert_eq!(
        AccessPolicy::from_toml(&good)
            .expect("llm_hosts")
            .profile()
            .llm_hosts,
        ["api.test", "llm.test:8443"]
    );
    for (what, text) in bad {
        assert_ne!(text, SMALL, "{what}: the replacement did not apply");
        match AccessPolicy::from_toml(&text) {
            Err(PolicyError::Parse(_) | PolicyError::Invalid(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn spawn_within_and_beyond_the_parent() {
    let orch = example("orchestrator.toml");
    let narrower = r#"
name = "reader"
tier = "worker"
[servers.files]
command = ["python3", "tests/peers/mcp_upstream.py"]
[[tools]]
server = "files"
name = "read_file"
args.path = { prefix = "/data/reports/" }
"#;
    let child = Profile::from_toml(narrower).unwrap();
    assert_eq!(orch.spawn_excess(&child), Vec::<String>::new());

    // worker.toml lists `transfer`, which the orchestrator does not have.
    let wider = example("worker.toml");
    let excess = orch.spawn_excess(wider.profile());
    assert!(excess.iter().any(|e| e.contains("transfer")), "{excess:?}");

    let mut as_orch = child.clone();
    as_orch.tier = Tier::Orchestrator;
    assert!(orch.spawn_excess(&as_orch)[0].contains("only workers"));

    let mut wide_arg = child.clone();
    wide_arg.tools[0].args.clear();
    assert!(orch.spawn_excess(&wide_arg)[0].contains("wider"));

    let mut other_server = child.clone();
    if let Some(s) = other_server.servers.get_mut("files") {
        s.command = Some(vec!["sh".into(), "-c".into(), "evil".into()]);
    }
    assert!(orch.spawn_excess(&other_server)[0].contains("server"));

    let no_approval = r#"
name = "deleter"
tier = "worker"
[servers.files]
command = ["python3", "tests/peers/mcp_upstream.py"]
[[tools]]
server = "files"
name = "delete_file"
args.path = { prefix = "/data/" }
"#;
    let child = Profile::from_toml(no_approval).unwrap();
    assert!(orch.spawn_excess(&child)[0].contains("approval"));

    let mut weaker = Profile::from_toml(narrower).unwrap();
    weaker.tokenize = TokenizeMode::Off;
    assert!(orch.spawn_excess(&weaker)[0].contains("tokenize"));
    // Dropping one of the parent's LLM hosts would send real values to it.
    let mut parent = orch.profile().clone();
    parent.llm_hosts = vec!["llm.test".into()];
    let parent = AccessPolicy::new(parent).expect("compiles");
    let mut child = Profile::from_toml(narrower).unwrap();
    assert!(
        parent
            .spawn_excess(&child)
            .iter()
            .any(|e| e.contains("llm host `llm.test`")),
        "{:?}",
        parent.spawn_excess(&child)
    );
    child.llm_hosts = vec!["llm.test".into(), "other.test".into()];
    assert!(
        parent
            .spawn_excess(&child)
            .iter()
            .all(|e| !e.contains("llm host"))
    );
}

#[test]
fn a_profile_survives_a_toml_round_trip() {
    // How a spawned agent's profile travels to the daemon's create path.
    for name in ["worker.toml", "orchestrator.toml"] {
        let p = example(name).profile().clone();
        let text = toml::to_string(&p).unwrap();
        assert_eq!(Profile::from_toml(&text).unwrap(), p, "{text}");
    }
}
