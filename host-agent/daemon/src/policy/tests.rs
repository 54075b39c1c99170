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

    let mut listening = Profile::from_toml(narrower).unwrap();
    listening.network.ingress = vec![7000];
    assert!(
        orch.spawn_excess(&listening)[0].contains("ingress port 7000"),
        "a child may not open a port its parent does not"
    );

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
fn a_spawned_worker_gets_no_egress_its_parent_lacks() {
    let mut parent = example("orchestrator.toml").profile().clone();
    parent.network.egress = vec!["pypi.org:443".into()];
    let parent = AccessPolicy::new(parent).expect("compiles");
    let mut child = Profile::from_toml("name = \"w\"\ntier = \"worker\"\n").unwrap();
    assert_eq!(parent.spawn_excess(&child), Vec::<String>::new());
    child.network.egress = vec!["pypi.org:443".into()];
    assert_eq!(parent.spawn_excess(&child), Vec::<String>::new());
    child.network.egress.push("*.example.com:443".into());
    let excess = parent.spawn_excess(&child);
    assert_eq!(excess.len(), 1, "{excess:?}");
    assert!(
        excess[0].contains("egress `*.example.com:443`"),
        "{excess:?}"
    );
    // The same host on another port is another destination.
    child.network.egress = vec!["pypi.org:80".into()];
    assert!(parent.spawn_excess(&child)[0].contains("pypi.org:80"));
}

#[test]
fn a_spawned_worker_names_no_peer_its_parent_lacks_and_peers_are_names() {
    let mut parent = example("orchestrator.toml").profile().clone();
    parent.network.peers = vec!["cache".into()];
    let parent = AccessPolicy::new(parent).expect("compiles");
    let mut child = Profile::from_toml("name = \"w\"\ntier = \"worker\"\n").unwrap();
    assert!(child.network.is_empty());
    child.network.peers = vec!["cache".into()];
    assert!(!child.network.is_empty(), "peers alone give a network");
    assert_eq!(parent.spawn_excess(&child), Vec::<String>::new());
    child.network.peers.push("db".into());
    let excess = parent.spawn_excess(&child);
    assert!(
        excess.len() == 1 && excess[0].contains("peer `db`"),
        "{excess:?}"
    );
    let bad =
        Profile::from_toml("name = \"w\"\ntier = \"worker\"\n[network]\npeers = [\"no spaces\"]\n");
    assert!(bad.is_err(), "{bad:?}");
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

/// Values that step out from under a prefix: a `..` segment, what an upstream may decode into
/// one (encoded dots, slashes, backslashes) and a backslash.
const ESCAPING: &[&str] = &[
    "/data/../etc/shadow",
    "/data/x/..",
    "/data/%2e%2e/etc/shadow",
    "/data/%2E%2E/etc/shadow",
    "/data/..%2fetc/shadow",
    "/data/..%2Fetc/shadow",
    "/data/..%5cetc",
    "/data/..%5Cetc",
    "/data/..\\etc\\shadow",
];

/// A worker holding `read_file` with `path` bound as given (TOML inline table).
fn reader(bound: &str) -> Profile {
    let text = format!(
        "name = \"reader\"\ntier = \"worker\"\n[servers.files]\n\
         command = [\"python3\", \"tests/peers/mcp_upstream.py\"]\n[[tools]]\n\
         server = \"files\"\nname = \"read_file\"\nargs.path = {bound}\n"
    );
    Profile::from_toml(&text).unwrap_or_else(|e| panic!("{bound}: {}", crate::error_chain(&e)))
}

/// Review finding H1: a child's `one_of` values under the parent's `prefix` skipped the `..`
/// guard, so an orchestrator bound to `/data/` could spawn, with no approval, a worker allowed
/// to read `/data/../etc/shadow`.
#[test]
fn spawn_refuses_one_of_values_that_step_out_of_the_parents_prefix() {
    let orch = example("orchestrator.toml");
    for value in ESCAPING {
        let quoted = toml::Value::String((*value).into()).to_string();
        for bound in [
            format!("{{ one_of = [{quoted}] }}"),
            format!("{{ one_of = [\"/data/a\", {quoted}] }}"),
            // A prefix of the child's own does not excuse an escaping value next to it.
            format!("{{ prefix = \"/data/\", one_of = [{quoted}] }}"),
        ] {
            let excess = orch.spawn_excess(&reader(&bound));
            assert!(
                excess
                    .iter()
                    .any(|e| e.contains("read_file") && e.contains("wider")),
                "{bound}: {excess:?}"
            );
        }
    }
    // A value outside the prefix, and a child prefix that itself steps out.
    for bound in [
        "{ one_of = [\"/etc/shadow\"] }",
        "{ prefix = \"/data/../etc/\" }",
        "{ prefix = \"/data/%2e%2e/\" }",
    ] {
        assert!(!orch.spawn_excess(&reader(bound)).is_empty(), "{bound}");
    }
    // Values safely under the prefix still spawn without approval (`..` inside a name is not a
    // segment).
    for bound in [
        "{ one_of = [\"/data/a.txt\", \"/data/x..y/z\"] }",
        "{ prefix = \"/data/reports/\" }",
        "{ prefix = \"/etc/\", one_of = [\"/data/a\"] }",
    ] {
        assert_eq!(
            orch.spawn_excess(&reader(bound)),
            Vec::<String>::new(),
            "{bound}"
        );
    }
}

/// Review finding H1, evaluation: a `one_of` rule of an argument the profile bounds by a prefix
/// carries the same escape guard, so an escaping value in the set never matches.
#[test]
fn one_of_values_of_a_prefix_bounded_argument_cannot_step_out() {
    for value in ESCAPING {
        let quoted = toml::Value::String((*value).into()).to_string();
        let text = format!(
            "name = \"t\"\ntier = \"worker\"\n[servers.files]\ncommand = [\"true\"]\n\
             [[tools]]\nserver = \"files\"\nname = \"read_file\"\n\
             args.path = {{ prefix = \"/data/\" }}\n\
             [[tools]]\nserver = \"files\"\nname = \"stat\"\n\
             args.path = {{ one_of = [\"/data/ok\", {quoted}] }}\n"
        );
        let p = AccessPolicy::from_toml(&text).unwrap();
        let d = p
            .decide("a", "stat", &args(json!({ "path": value })), false)
            .unwrap();
        assert_eq!(d.rule(), "arg:files/stat/path.one_of", "{value}: {d:?}");
        assert_eq!(d.kind(), "deny", "{value}");
        let ok = p
            .decide("a", "stat", &args(json!({"path": "/data/ok"})), false)
            .unwrap();
        assert_eq!(ok.kind(), "allow", "{value}");
        // The orchestrator the worker would have been spawned by refuses the call too.
        let orch = example("orchestrator.toml");
        let d = orch
            .decide("a", "read_file", &args(json!({ "path": value })), false)
            .unwrap();
        assert_eq!(d.kind(), "deny", "{value}");
    }
    // An argument no tool bounds by a prefix keeps its literal set.
    let p = example("worker.toml");
    let d = p
        .decide(
            "a",
            "transfer",
            &args(json!({"amount": 5, "account": "acct-ops"})),
            false,
        )
        .unwrap();
    assert_eq!(d.kind(), "allow");
}

/// The Rust test the spawn comparison uses (`cedar::steps_out`) and the compiled `prefix` rule
/// agree: a value under the prefix is denied exactly when the Rust test says it steps out.
#[test]
fn the_spawn_escape_test_agrees_with_the_compiled_prefix_rule() {
    let p = AccessPolicy::new(reader("{ prefix = \"/data/\" }")).unwrap();
    let safe = [
        "/data/a",
        "/data/x..y",
        "/data/..x/y",
        "/data/x/...",
        "/data/x/.../y",
        "/data/%41",
        "/data/2e/2f",
        "/data/",
    ];
    for value in ESCAPING.iter().chain(&safe) {
        let d = p
            .decide("a", "read_file", &args(json!({ "path": value })), false)
            .unwrap();
        assert_eq!(
            d.kind() == "deny",
            cedar::steps_out(value),
            "{value}: {d:?}"
        );
    }
    for value in safe {
        assert!(!cedar::steps_out(value), "{value}");
    }
}

/// Review finding M8: a call to `transfer` (bounds on `amount` and `account`) with an extra
/// `memo` was allowed and reached the upstream. A tool that names arguments admits only those.
#[test]
fn arguments_the_profile_does_not_name_are_denied_and_named() {
    let p = example("worker.toml");
    let d = p
        .decide(
            "a",
            "transfer",
            &args(json!({"amount": 50, "account": "acct-ops", "memo": "x"})),
            false,
        )
        .unwrap();
    match &d {
        Decision::Deny { rule, reason } => {
            assert_eq!(rule, "other_args:files/transfer");
            assert!(reason.contains("`memo`"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Every unexpected argument is named, in order.
    let d = p
        .decide(
            "a",
            "read_file",
            &args(json!({"path": "/data/x", "mode": "w", "follow": true})),
            false,
        )
        .unwrap();
    match &d {
        Decision::Deny { rule, reason } => {
            assert_eq!(rule, "other_args:files/read_file");
            assert!(
                reason.contains("`follow`, `mode`") && reason.contains("`path`"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The names come from the agent: escaped, cut short, and counted past a few.
    let mut many = args(json!({"amount": 5, "account": "acct-ops"}));
    many.insert(format!("{}\n", "k".repeat(1000)), json!(1));
    for i in 0..20 {
        many.insert(format!("x{i:02}"), json!(1));
    }
    let d = p.decide("a", "transfer", &many, false).unwrap();
    let Decision::Deny { reason, .. } = &d else {
        panic!("{d:?}")
    };
    assert!(
        reason.len() < 400
            && reason.contains(&format!("`{}...`", "k".repeat(64)))
            && reason.contains("`x06`, and 13 more")
            && !reason.contains('\n'),
        "{reason}"
    );
    // An extra argument is refused outright, not put to the user, approved or not.
    let extra = args(json!({"path": "/data/x", "recursive": true}));
    for approved in [false, true] {
        let d = p.decide("a", "delete_file", &extra, approved).unwrap();
        assert_eq!(d.rule(), "other_args:files/delete_file", "{d:?}");
        assert_eq!(d.kind(), "deny");
    }
    // The named arguments alone still pass.
    let d = p
        .decide(
            "a",
            "transfer",
            &args(json!({"amount": 50, "account": "acct-ops"})),
            false,
        )
        .unwrap();
    assert_eq!(d.kind(), "allow");
}

/// `other_args = "allow"` opts one tool out; a tool listed with no `args` keeps admitting any
/// arguments unless it says `other_args = "deny"`, which then admits none.
#[test]
fn other_args_opts_a_tool_out_and_bare_tools_keep_any_arguments() {
    let text = r#"
name = "t"
tier = "worker"
[servers.s]
command = ["true"]
[[tools]]
server = "s"
name = "transfer"
args.amount = { min = 1, max = 100 }
args.account = { one_of = ["acct-ops"] }
other_args = "allow"
[[tools]]
server = "s"
name = "search"
[[tools]]
server = "s"
name = "now"
other_args = "deny"
"#;
    let p = AccessPolicy::from_toml(text).unwrap();
    let decide = |tool: &str, a: Value| p.decide("a", tool, &args(a), false).unwrap();
    let memo = json!({"amount": 50, "account": "acct-ops", "memo": "x"});
    assert_eq!(decide("transfer", memo).kind(), "allow");
    // The opt-out admits other arguments, not wider named ones.
    let d = decide(
        "transfer",
        json!({"amount": 500, "account": "acct-ops", "memo": "x"}),
    );
    assert_eq!(d.rule(), "arg:s/transfer/amount.max");
    assert_eq!(
        decide("search", json!({"query": "q", "limit": 3})).kind(),
        "allow"
    );
    assert_eq!(decide("now", json!({})).kind(), "allow");
    assert_eq!(
        decide("now", json!({"tz": "UTC"})).rule(),
        "other_args:s/now"
    );
    // The key survives the trip a spawned profile takes.
    let back = Profile::from_toml(&toml::to_string(p.profile()).unwrap()).unwrap();
    assert_eq!(&back, p.profile());
    for bad in ["other_args = \"alow\"", "other_args = true"] {
        let text = text.replace("other_args = \"allow\"", bad);
        assert!(
            matches!(AccessPolicy::from_toml(&text), Err(PolicyError::Parse(_))),
            "{bad}"
        );
    }
}

/// A spawned child cannot admit arguments its parent's tool does not.
#[test]
fn spawn_cannot_admit_arguments_the_parent_does_not() {
    let parent = example("worker.toml");
    let child = |extra: &str| {
        let text = format!(
            "name = \"payer\"\ntier = \"worker\"\nllm_hosts = [\"api.anthropic.com\"]\n\
             [servers.files]\ncommand = [\"python3\", \"tests/peers/mcp_upstream.py\"]\n\
             [[tools]]\nserver = \"files\"\nname = \"transfer\"\n\
             args.amount = {{ min = 1, max = 10 }}\nargs.account = {{ one_of = [\"acct-ops\"] }}\n\
             {extra}"
        );
        Profile::from_toml(&text).unwrap()
    };
    assert_eq!(parent.spawn_excess(&child("")), Vec::<String>::new());
    let excess = parent.spawn_excess(&child("other_args = \"allow\"\n"));
    assert!(
        excess.iter().any(|e| e.contains("other_args")),
        "{excess:?}"
    );
    let excess = parent.spawn_excess(&child("args.memo = { one_of = [\"x\"] }\n"));
    assert!(excess.iter().any(|e| e.contains("`memo`")), "{excess:?}");
    // Under a parent that opts out, the child may name (and bound) more arguments.
    let text = r#"
name = "writer"
tier = "worker"
llm_hosts = ["api.anthropic.com"]
[servers.files]
command = ["python3", "tests/peers/mcp_upstream.py"]
[[tools]]
server = "files"
name = "write_file"
args.path = { prefix = "/data/out/" }
args.content = { prefix = "" }
"#;
    let writer = Profile::from_toml(text).unwrap();
    assert_eq!(parent.spawn_excess(&writer), Vec::<String>::new());
}

/// Real values go only where the profile says (`restore` on a tool, `restore_hosts`); a spawned
/// child cannot add either, and a model API can never be a restore host.
#[test]
fn restore_marks_are_checked_and_cannot_grow_in_a_spawn() {
    let parent = example("worker.toml");
    assert!(parent.profile().tool("write_file").unwrap().restore);
    assert!(!parent.profile().tool("read_file").unwrap().restore);
    let child = |extra_tool: &str, restore_hosts: &str| {
        let text = format!(
            "name = \"c\"\ntier = \"worker\"\nllm_hosts = [\"api.anthropic.com\"]\n\
             restore_hosts = [{restore_hosts}]\n\
             [servers.files]\ncommand = [\"python3\", \"tests/peers/mcp_upstream.py\"]\n\
             [[tools]]\nserver = \"files\"\nname = \"read_file\"\n\
             args.path = {{ prefix = \"/data/\" }}\n{extra_tool}"
        );
        Profile::from_toml(&text).unwrap()
    };
    assert_eq!(parent.spawn_excess(&child("", "")), Vec::<String>::new());
    let excess = parent.spawn_excess(&child("restore = true\n", ""));
    assert!(
        excess.iter().any(|e| e.contains("real values")),
        "{excess:?}"
    );
    let excess = parent.spawn_excess(&child("", "\"pay.example\""));
    assert!(
        excess
            .iter()
            .any(|e| e.contains("restore host `pay.example`")),
        "{excess:?}"
    );
    // A model API in both lists, or a bad host, is a load error.
    let both = "name = \"x\"\ntier = \"worker\"\nllm_hosts = [\"llm.example\"]\n\
                restore_hosts = [\"LLM.example\"]\n";
    let err = Profile::from_toml(both).unwrap_err().to_string();
    assert!(err.contains("both"), "{err}");
    let bad = "name = \"x\"\ntier = \"worker\"\nrestore_hosts = [\"a b\"]\n";
    let err = Profile::from_toml(bad).unwrap_err().to_string();
    assert!(err.contains("restore_hosts"), "{err}");
}
