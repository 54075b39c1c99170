//! A networked VM's plumbing, made for real by the daemon's own code (as root, with iproute2
//! and nft; no VM is booted): its network namespace kept by a bind mount, the TAP, the veth
//! and routes, the firewall with its set and counters, a frame the "guest" writes into the TAP
//! being refused and counted, and a removal that leaves nothing behind.
//!
//! A second test starts a VM's resolver for real (`VmEgress`, over a small upstream DNS server
//! of its own) and asks it from inside the VM's namespace: an allowed name's address is in the
//! firewall's set before the answer arrives, and a refused name is REFUSED and audited. Then
//! the daemon "restarts": a new `VmEgress` over the same VM folder lets a port-443 connection
//! to the address resolved before through the SNI check without a new query (and one without
//! the folder resets it). A SYN the "guest" writes into the TAP towards the metadata address
//! is refused by the firewall, counted, and audited (`by: firewall`, rule `deny_metadata`,
//! port 80) through the kernel's NFLOG.
//!
//! A third test plays a host on an underlay with a client beside it (a veth between the test's
//! namespace and the client's): the daemon's underlay reads its interface, publishes a guest's
//! address (the client's ARP for it is answered with the host's MAC), announces it (a
//! gratuitous ARP overwrites what the client had cached) and withdraws it; a VM's firewall
//! with ingress ports and the host's table with the underlay load into the kernel.
//!
//! Each test re-runs itself under `unshare --net`, so the host's own links, routes, forwarding
//! setting and nftables are never touched: there, the test's namespace plays the host's.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use std::sync::Arc;

use host_agent::egress::VmEgress;
use host_agent::egress::service::SNI_PORT;
use host_agent::net::addr::{OverlayPrefix, allocate};
use host_agent::net::netns::{self, VmNetns};
use host_agent::net::{addr::VmLink, firewall};

/// Set in the copy of the test that runs in its own network namespace.
const INNER: &str = "NANOCLAW_TEST_VM_NETWORK_INNER";

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `ip -j ARGS` in the test's namespace (the "host"), parsed.
fn host_ip_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("ip").arg("-j").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `PROGRAM ARGS` in the VM's namespace: its stdout, or its stderr as the error.
fn in_ns(ns: &VmNetns, program: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    let (mut cmd, _keep) = ns.command(program).unwrap();
    let out = cmd.args(args).output().unwrap();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn ns_json(ns: &VmNetns, program: &str, args: &[&str]) -> serde_json::Value {
    let out = in_ns(ns, program, args).unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    serde_json::from_slice(&out).unwrap()
}

/// Runs `body` in a copy of this test process under `unshare --net` (root, ip, nft and
/// unshare needed; skipped without them): `name` is the test's full name.
fn in_own_netns(name: &str, body: fn()) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: a VM's network namespace needs root");
        return;
    }
    if !have("ip") || !have("nft") || !have("unshare") {
        eprintln!("skipped: needs iproute2 (ip), nftables (nft) and util-linux (unshare)");
        return;
    }
    if std::env::var_os(INNER).is_none() {
        let out = Command::new("unshare")
            .arg("--net")
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(INNER, "1")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stdout}\n{stderr}");
        // The copy ran the test, not nothing.
        assert!(stdout.contains("1 passed"), "{stdout}\n{stderr}");
        return;
    }
    body();
}

#[test]
fn a_vm_network_is_built_filtered_counted_and_removed() {
    in_own_netns(
        "vm_network::a_vm_network_is_built_filtered_counted_and_removed",
        inner,
    );
}

#[test]
fn the_resolver_opens_the_firewall_before_it_answers_and_audits_a_refusal() {
    in_own_netns(
        "vm_network::the_resolver_opens_the_firewall_before_it_answers_and_audits_a_refusal",
        resolver_inner,
    );
}

#[test]
fn the_underlay_answers_announces_and_withdraws_a_guest_address() {
    in_own_netns(
        "vm_network::the_underlay_answers_announces_and_withdraws_a_guest_address",
        underlay_inner,
    );
}

/// The client's neighbour entry for `addr`: its MAC, if it has one.
fn client_neighbour(client: &VmNetns, addr: Ipv4Addr) -> Option<String> {
    let entries = ns_json(client, "ip", &["-j", "neigh", "show", &addr.to_string()]);
    entries[0]["lladdr"].as_str().map(str::to_owned)
}

fn underlay_inner() {
    use host_agent::net::underlay::Underlay;
    let dir = tempfile::tempdir().unwrap();
    let prefix: OverlayPrefix = "10.251.0.0/24".parse().unwrap();
    let link = allocate(&prefix, &[].into()).unwrap();
    let id = "0de1e7ee";
    let path = dir.path().join(netns::NETNS_FILE);
    let ns = VmNetns::create(&path).unwrap();
    let _guard = Teardown(&path, id);
    netns::setup(&ns, id, &link, 1_000_778).unwrap();
    // The gateway's MAC is derived from its address: the same on every host.
    let gw_mac = link.gateway_mac_string();
    assert_eq!(tap_mac(&ns).map(|b| format!("{b:02x}")).join(":"), gw_mac);

    // The client, on the underlay with the host: the overlay is on its link.
    let client_path = dir.path().join("client");
    let client = VmNetns::create(&client_path).unwrap();
    let _client_guard = Teardown(&client_path, "c1e47");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("ip").args(["link", "add", "ulh", "type", "veth", "peer", "name", "ul0"]));
    run(Command::new("ip")
        .args(["link", "set", "ul0", "netns"])
        .arg(&client_path));
    run(Command::new("ip").args(["addr", "add", "192.0.2.1/24", "dev", "ulh"]));
    run(Command::new("ip").args(["link", "set", "ulh", "up"]));
    for args in [
        &["addr", "add", "192.0.2.3/24", "dev", "ul0"][..],
        &["link", "set", "ul0", "up"],
        &["route", "add", "10.251.0.0/24", "dev", "ul0"],
    ] {
        in_ns(&client, "ip", args).unwrap();
    }
    let underlay = Underlay::open("ulh").unwrap();
    assert_eq!(underlay.networks(), ["192.0.2.0/24"]);
    let host_mac = host_ip_json(&["link", "show", "ulh"])[0]["address"]
        .as_str()
        .unwrap()
        .to_owned();

    // Published: the client's ARP for the guest is answered with the host's MAC.
    underlay.publish(link.guest).unwrap();
    let proxies = || {
        String::from_utf8(
            Command::new("ip")
                .args(["neigh", "show", "proxy"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
    };
    assert!(proxies().contains(&link.guest.to_string()), "{}", proxies());
    let guest = std::net::SocketAddr::from((link.guest, 9));
    let _ = client
        .run_in(|| std::net::TcpStream::connect_timeout(&guest, Duration::from_secs(1)))
        .unwrap();
    assert_eq!(
        client_neighbour(&client, link.guest).as_deref(),
        Some(host_mac.as_str())
    );

    // Announced: a stale entry elsewhere is overwritten at once.
    in_ns(
        &client,
        "ip",
        &[
            "neigh",
            "replace",
            &link.guest.to_string(),
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "ul0",
            "nud",
            "stale",
        ],
    )
    .unwrap();
    assert_eq!(
        client_neighbour(&client, link.guest).as_deref(),
        Some("02:00:00:00:00:99")
    );
    underlay.announce(link.guest).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while client_neighbour(&client, link.guest).as_deref() != Some(host_mac.as_str()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the announcement did not reach the client: {:?}",
            client_neighbour(&client, link.guest)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Withdrawn, twice: the second is no error.
    underlay.withdraw(link.guest).unwrap();
    underlay.withdraw(link.guest).unwrap();
    assert!(
        !proxies().contains(&link.guest.to_string()),
        "{}",
        proxies()
    );

    // The VM's ingress rules and the host's table with the underlay load as written.
    let ingress = firewall::Ingress::new(Some(&underlay), &[7000]);
    firewall::install(&ns, &link, &prefix, None, &ingress).unwrap();
    firewall::install_host(&prefix, Some(&underlay)).unwrap();
    let forward = String::from_utf8(
        in_ns(
            &ns,
            "nft",
            &["list", "chain", "inet", "nanoclaw", "forward"],
        )
        .unwrap(),
    )
    .unwrap();
    assert!(
        forward.contains("ip saddr 192.0.2.0/24 tcp dport 7000 accept"),
        "{forward}"
    );
    assert!(
        forward.contains("ip daddr 192.0.2.0/24 tcp sport 7000 accept"),
        "{forward}"
    );
    let host = String::from_utf8(
        Command::new("nft")
            .args(["list", "chain", "ip", "nanoclaw", "postrouting"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        host.contains("oifname \"ulh\" ip daddr 192.0.2.0/24 accept"),
        "{host}"
    );
}

fn resolver_inner() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(netns::NETNS_FILE);
    let prefix: OverlayPrefix = "10.252.0.0/24".parse().unwrap();
    let link = allocate(&prefix, &[].into()).unwrap();
    let id = "0de1e7ee";
    let ns = VmNetns::create(&path).unwrap();
    let _guard = Teardown(&path, id);
    netns::setup(&ns, id, &link, 1_000_778).unwrap();
    firewall::install(&ns, &link, &prefix, Some(SNI_PORT), &Default::default()).unwrap();

    // The upstream server listens on the test namespace's loopback, which starts down.
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(up.success());
    let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    // `A` for allowed.test is 192.0.2.80; anything else NXDOMAIN.
    std::thread::spawn(move || {
        nanoclaw_tests::dns::serve_upstream(upstream, |name| {
            (name == "allowed.test").then_some(Ipv4Addr::new(192, 0, 2, 80))
        })
    });
    let audit = Arc::new(nanoclaw_audit::AuditLog::open(dir.path().join("audit.log")).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let egress = rt
        .block_on(async {
            VmEgress::start(
                id,
                ns.clone(),
                &link,
                &["allowed.test:443".to_owned()],
                upstream_addr,
                Some(Arc::clone(&audit)),
                Some(dir.path()),
            )
        })
        .unwrap();
    let ns_for_sni = ns.clone();
    // The "guest": a socket inside the VM's namespace, asking the gateway.
    let gateway = link.gateway;
    let ask = move |id: u16, name: &'static str| {
        ns.run_in(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.send_to(&nanoclaw_tests::dns::a_query(id, name), (gateway, 53))
                .unwrap();
            let mut buf = [0u8; 1500];
            let n = s.recv(&mut buf).unwrap();
            buf[..n].to_vec()
        })
        .unwrap()
    };
    let answer = ask(1, "allowed.test");
    assert_eq!(answer[3] & 0x0f, 0, "NOERROR: {answer:?}");
    assert_eq!(&answer[answer.len() - 4..], &[192, 0, 2, 80], "{answer:?}");
    // The address was in the firewall's set before the answer left.
    let set = netns_set(&link, &path);
    assert!(
        set.contains("192.0.2.80") && set.contains("443"),
        "the answer came before the grant: {set}"
    );
    let refused = ask(2, "other.test");
    assert_eq!(refused[3] & 0x0f, 5, "REFUSED: {refused:?}");
    assert!(!netns_set(&link, &path).contains("192.0.2.81"));
    let counters = egress.counters();
    assert_eq!(
        (counters.dns.granted, counters.dns.refused),
        (1, 1),
        "{counters:?}"
    );
    // The refusal is in the audit log, naming the VM and the name.
    let mut denial = None;
    for _ in 0..100 {
        let text = std::fs::read_to_string(dir.path().join("audit.log")).unwrap_or_default();
        denial = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["record"]["kind"] == "egress_denied");
        if denial.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let denial = denial.expect("an egress_denied record");
    let data = &denial["record"]["data"];
    assert_eq!(
        (data["vm"].as_str(), data["name"].as_str()),
        (Some(id), Some("other.test")),
        "{denial}"
    );

    // The kernel's refusals are audited too: a SYN the "guest" writes into the TAP towards
    // the metadata address becomes a record naming the rule, the address and the port.
    let frame = syn_frame(
        &link,
        tap_mac(&ns_for_sni),
        Ipv4Addr::new(169, 254, 169, 254),
        80,
    );
    ns_for_sni.run_in(|| write_to_tap(&frame)).unwrap();
    let firewall = wait_for_record(&dir.path().join("audit.log"), |d| d["by"] == "firewall");
    let data = &firewall["record"]["data"];
    assert_eq!(
        (
            data["vm"].as_str(),
            data["rule"].as_str(),
            data["addr"].as_str(),
            data["src"].as_str(),
            data["proto"].as_str(),
            data["port"].as_u64(),
        ),
        (
            Some(id),
            Some("deny_metadata"),
            Some("169.254.169.254"),
            Some(link.guest.to_string().as_str()),
            Some("tcp"),
            Some(80)
        ),
        "{firewall}"
    );
    // The counter still counts it.
    assert_eq!(
        firewall::counters(&ns_for_sni).unwrap()["deny_metadata"].packets,
        1
    );

    // A daemon restart: the grant made above is in the VM's folder, and a new VmEgress over
    // the same folder lets a port-443 connection to that address through without a new query.
    let saved = dir
        .path()
        .join(host_agent::egress::saved::SAVED_GRANTS_FILE);
    for _ in 0..100 {
        if std::fs::read_to_string(&saved).is_ok_and(|t| t.contains("allowed.test")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&saved).unwrap_or_default();
    assert!(
        text.contains("allowed.test") && text.contains("192.0.2.80"),
        "{text}"
    );
    drop(egress);
    sni_after_restart(&rt, &ns_for_sni, &link, id, dir.path(), upstream_addr);
    drop(rt);
}

/// The first `egress_denied` record in the audit log at `path` whose data `matches`, waited
/// for up to 5 s.
fn wait_for_record(
    path: &std::path::Path,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..100 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["record"]["kind"] == "egress_denied" && matches(&r["record"]["data"]));
        if let Some(r) = found {
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    panic!("no such egress_denied record in:\n{text}");
}

/// Starts a VmEgress for `id` once its predecessor's sockets are free.
fn restart_egress(
    rt: &tokio::runtime::Runtime,
    ns: &VmNetns,
    link: &VmLink,
    id: &str,
    state: Option<&std::path::Path>,
    upstream: std::net::SocketAddr,
) -> VmEgress {
    let mut last = None;
    for _ in 0..100 {
        let started = rt.block_on(async {
            VmEgress::start(
                id,
                ns.clone(),
                link,
                &["allowed.test:443".to_owned()],
                upstream,
                None,
                state,
            )
        });
        match started {
            Ok(e) => return e,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("cannot start the egress again: {last:?}");
}

/// The "guest" (a socket in the VM's namespace, sent to the SNI check the way the firewall
/// sends the TAP's port-443 connections) connects to 192.0.2.80:443 with a ClientHello for
/// allowed.test. Without the saved grants the connection is reset; with them it reaches the
/// server (which the test's namespace holds on its loopback), and no query was made.
fn sni_after_restart(
    rt: &tokio::runtime::Runtime,
    ns: &VmNetns,
    link: &VmLink,
    id: &str,
    state: &std::path::Path,
    upstream: std::net::SocketAddr,
) {
    let dest = Ipv4Addr::new(192, 0, 2, 80);
    let up = Command::new("ip")
        .args(["addr", "add", "192.0.2.80/32", "dev", "lo"])
        .status()
        .unwrap();
    assert!(up.success());
    let server = std::net::TcpListener::bind((dest, 443)).unwrap();
    let (got_tx, got) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in server.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 5];
            use std::io::Read;
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            if conn.read_exact(&mut buf).is_ok() {
                let _ = got_tx.send(buf);
            }
        }
    });
    // Locally made connections skip prerouting: the same redirect, on output, for the test.
    let gw = link.gateway;
    let rules = format!(
        "add chain inet nanoclaw test_out {{ type nat hook output priority -100; policy accept; }}\n\
         add rule inet nanoclaw test_out ip daddr {dest} tcp dport 443 dnat ip to {gw}:{SNI_PORT}\n"
    );
    let (mut nft, _keep) = ns.command("nft").unwrap();
    let mut child = nft
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
    }
    assert!(child.wait().unwrap().success());
    let hello = client_hello("allowed.test");
    let connect = || {
        let hello = hello.clone();
        ns.run_in(move || {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from((dest, 443)),
                Duration::from_secs(5),
            )
            .unwrap();
            s.write_all(&hello).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 1];
            use std::io::Read;
            // Reset (refused), or held open by the server, which answers nothing.
            let _ = s.read(&mut buf);
        })
        .unwrap();
    };

    // The control: a VmEgress without the saved grants resets the connection.
    let fresh = restart_egress(rt, ns, link, id, None, upstream);
    connect();
    let c = fresh.counters();
    assert_eq!((c.sni.allowed, c.sni.refused), (0, 1), "{c:?}");
    assert!(got.try_recv().is_err(), "the server was reached");
    drop(fresh);

    // Over the same folder: admitted, with no query asked.
    let restarted = restart_egress(rt, ns, link, id, Some(state), upstream);
    std::thread::spawn(connect_in_background(ns.clone(), dest, hello));
    let first = got
        .recv_timeout(Duration::from_secs(10))
        .expect("the restarted SNI check let the connection through");
    assert_eq!(first[0], 0x16, "a TLS handshake record: {first:?}");
    // The gate counts the connection right after it has replayed the hello.
    let mut c = restarted.counters();
    for _ in 0..100 {
        if c.sni.allowed > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        c = restarted.counters();
    }
    assert_eq!(
        (c.sni.allowed, c.sni.refused, c.dns.queries),
        (1, 0, 0),
        "{c:?}"
    );
    drop(restarted);
}

/// Connects as [`sni_after_restart`]'s guest does and keeps the connection until the server
/// has read from it (the server never answers, so a blocking read would wait its timeout).
fn connect_in_background(
    ns: VmNetns,
    dest: Ipv4Addr,
    hello: Vec<u8>,
) -> impl FnOnce() + Send + 'static {
    move || {
        let _ = ns.run_in(move || {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from((dest, 443)),
                Duration::from_secs(5),
            )
            .unwrap();
            s.write_all(&hello).unwrap();
            std::thread::sleep(Duration::from_secs(3));
        });
    }
}

/// A ClientHello for `name`, as rustls sends it.
fn client_hello(name: &'static str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name.try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// The VM's `allowed` set, as `nft -j` prints it.
fn netns_set(_link: &VmLink, path: &std::path::Path) -> String {
    let ns = VmNetns::at(path);
    ns_json(
        &ns,
        "nft",
        &["-j", "list", "set", "inet", "nanoclaw", "allowed"],
    )
    .to_string()
}

fn inner() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(netns::NETNS_FILE);
    let prefix: OverlayPrefix = "10.251.0.0/24".parse().unwrap();
    let link = allocate(&prefix, &[].into()).unwrap();
    let id = "0de1e7ed";
    let veth = netns::host_veth_name(id).unwrap();
    let uid = 1_000_777;

    let ns = VmNetns::create(&path).unwrap();
    // A failing check still unmounts the namespace, so the temporary folder can go.
    let _guard = Teardown(&path, id);
    assert!(VmNetns::is_mounted(&path));
    netns::setup(&ns, id, &link, uid).unwrap();
    firewall::install(&ns, &link, &prefix, None, &Default::default()).unwrap();
    firewall::install_host(&prefix, None).unwrap();
    // Loading again replaces, never duplicates; nft takes the SNI redirect as written.
    firewall::install(&ns, &link, &prefix, Some(8443), &Default::default()).unwrap();
    let text = String::from_utf8(
        in_ns(
            &ns,
            "nft",
            &["list", "chain", "inet", "nanoclaw", "prerouting"],
        )
        .unwrap(),
    )
    .unwrap();
    assert!(text.contains("redirect to :8443"), "{text}");
    firewall::install(&ns, &link, &prefix, None, &Default::default()).unwrap();
    firewall::install_host(&prefix, None).unwrap();

    check_links(&ns, &link, &veth, uid);
    check_ruleset(&ns);

    // The resolver's call: an element with its timeout; a second call refreshes it.
    let dest = Ipv4Addr::new(192, 0, 2, 80);
    firewall::allow(&ns, dest, 443, Duration::from_secs(120)).unwrap();
    firewall::allow(&ns, dest, 443, Duration::from_secs(600)).unwrap();
    let set = ns_json(
        &ns,
        "nft",
        &["-j", "list", "set", "inet", "nanoclaw", "allowed"],
    );
    let text = set.to_string();
    assert!(
        text.contains("192.0.2.80") && text.contains("443"),
        "{text}"
    );
    let timeout = find_key(&set, "timeout").unwrap_or_else(|| panic!("no timeout: {text}"));
    assert_eq!(timeout.as_u64(), Some(600), "{text}");
    // Several at once, in one transaction.
    let more = [
        (Ipv4Addr::new(192, 0, 2, 81), 443),
        (Ipv4Addr::new(192, 0, 2, 82), 8443),
    ];
    firewall::allow_all(&ns, &more, Duration::from_secs(60)).unwrap();
    let text = ns_json(
        &ns,
        "nft",
        &["-j", "list", "set", "inet", "nanoclaw", "allowed"],
    )
    .to_string();
    assert!(
        text.contains("192.0.2.81") && text.contains("192.0.2.82") && text.contains("8443"),
        "{text}"
    );
    assert!(matches!(
        firewall::allow(&ns, dest, 443, Duration::ZERO),
        Err(firewall::FirewallError::BadTtl(_))
    ));

    // A peer's address: added twice, then removed twice, without an error either time.
    let peer = Ipv4Addr::new(10, 251, 0, 10);
    let peers = |ns: &VmNetns| {
        ns_json(
            ns,
            "nft",
            &["-j", "list", "set", "inet", "nanoclaw", "peers"],
        )
        .to_string()
    };
    firewall::set_peer(&ns, peer, true).unwrap();
    firewall::set_peer(&ns, peer, true).unwrap();
    assert!(peers(&ns).contains("10.251.0.10"));
    firewall::set_peer(&ns, peer, false).unwrap();
    firewall::set_peer(&ns, peer, false).unwrap();
    assert!(!peers(&ns).contains("10.251.0.10"));

    // The counters read back, all of them, at zero.
    let before = firewall::counters(&ns).unwrap();
    for name in firewall::COUNTERS {
        assert_eq!(
            before.get(*name).map(|c| c.packets),
            Some(0),
            "{name}: {before:?}"
        );
    }
    // The "guest" writes a SYN to the metadata address into the TAP: refused and counted.
    let tap_mac = tap_mac(&ns);
    let frame = syn_frame(&link, tap_mac, Ipv4Addr::new(169, 254, 169, 254), 80);
    ns.run_in(|| write_to_tap(&frame)).unwrap();
    let mut counted = 0;
    for _ in 0..50 {
        counted = firewall::counters(&ns).unwrap()["deny_metadata"].packets;
        if counted > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(counted, 1, "the SYN to 169.254.169.254 was not counted");
    // Nor did anything else count it.
    let after = firewall::counters(&ns).unwrap();
    assert_eq!(after["deny_other"].packets, 0);

    // Removal leaves no veth, no route, no namespace file.
    drop(ns);
    netns::teardown(&path, id).unwrap();
    assert!(!path.exists());
    let links = host_ip_json(&["link", "show"]);
    assert!(
        !links.to_string().contains(&format!("\"{veth}\"")),
        "{veth} is left: {links}"
    );
    let routes = host_ip_json(&["route", "show"]);
    assert!(!routes.to_string().contains("10.251.0.0"), "{routes}");
    // Twice is fine.
    netns::teardown(&path, id).unwrap();
}

/// Tears the VM's network down when dropped (on a panic too).
struct Teardown<'a>(&'a std::path::Path, &'a str);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let _ = netns::teardown(self.0, self.1);
    }
}

fn check_links(ns: &VmNetns, link: &VmLink, veth: &str, uid: u32) {
    let tap = ns_json(ns, "ip", &["-d", "-j", "link", "show", "tap0"]);
    let info = &tap[0]["linkinfo"]["info_data"];
    assert_eq!(info["type"], "tap", "{tap}");
    assert_eq!(info["pi"], false, "{tap}");
    assert_eq!(info["persist"], true, "{tap}");
    assert_eq!(info["user"].as_u64(), Some(u64::from(uid)), "{tap}");
    let addrs = ns_json(ns, "ip", &["-j", "-4", "addr", "show"]).to_string();
    assert!(addrs.contains(&link.gateway.to_string()), "{addrs}");
    assert!(addrs.contains(&link.netns_end.to_string()), "{addrs}");
    let default = ns_json(ns, "ip", &["-j", "route", "show", "default"]);
    assert_eq!(
        default[0]["gateway"],
        link.host_end.to_string(),
        "{default}"
    );
    assert_eq!(default[0]["dev"], "up0", "{default}");

    let host = host_ip_json(&["-4", "addr", "show", "dev", veth]);
    assert!(
        host.to_string().contains(&link.host_end.to_string()),
        "{host}"
    );
    let route = host_ip_json(&["route", "show", &format!("{}/30", link.guest_net())]);
    assert_eq!(route[0]["gateway"], link.netns_end.to_string(), "{route}");
    assert_eq!(route[0]["dev"], veth, "{route}");
    let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(forwarding.trim(), "1");
    let inside = ns
        .run_in(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap())
        .unwrap();
    assert_eq!(inside.trim(), "1");
}

fn check_ruleset(ns: &VmNetns) {
    let text = String::from_utf8(in_ns(ns, "nft", &["list", "ruleset"]).unwrap()).unwrap();
    assert_eq!(text.matches("table inet nanoclaw").count(), 1, "{text}");
    assert!(text.contains("set allowed"), "{text}");
    assert!(text.contains("flags timeout"), "{text}");
    let host = Command::new("nft")
        .args(["list", "table", "ip", "nanoclaw"])
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(
        host.contains("ip saddr 10.251.0.0/24 oifname != \"nc-*\" masquerade"),
        "{host}"
    );
}

/// The first value under `key` anywhere in `v`.
fn find_key<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

fn tap_mac(ns: &VmNetns) -> [u8; 6] {
    let tap = ns_json(ns, "ip", &["-j", "link", "show", "tap0"]);
    let text = tap[0]["address"].as_str().unwrap().to_owned();
    let bytes: Vec<u8> = text
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// The ones' complement sum of `data`, folded.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame from the guest to the gateway's MAC: a TCP SYN from the guest to
/// `dst:port`.
fn syn_frame(link: &VmLink, tap_mac: [u8; 6], dst: Ipv4Addr, port: u16) -> Vec<u8> {
    let src = link.guest;
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&40000u16.to_be_bytes());
    tcp.extend_from_slice(&port.to_be_bytes());
    tcp.extend_from_slice(&1u32.to_be_bytes()); // seq
    tcp.extend_from_slice(&0u32.to_be_bytes()); // ack
    tcp.extend_from_slice(&[0x50, 0x02]); // 20-byte header, SYN
    tcp.extend_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&tap_mac);
    frame.extend_from_slice(&link.mac());
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&tcp);
    frame
}

/// Attaches to `tap0` (in the calling thread's namespace) as the VMM does and writes `frame`.
fn write_to_tap(frame: &[u8]) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let mut tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    // SAFETY: ifreq is a plain C struct for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"tap0\0") {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: `tun` is an open /dev/net/tun descriptor and `req` a valid, NUL-terminated
    // ifreq that outlives the call, which is what TUNSETIFF reads.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &req) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    tun.write_all(frame).unwrap();
}
