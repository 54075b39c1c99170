//! One device paired with three hosts, on loopback: grants name their host, a grant written
//! while sessions are open is seen at the next call, and a VM that moves from host A to host B
//! (the source's notice through its relay) is served on B under its grants, not on C, a paired
//! host the notice did not name, and no longer on A once it has arrived on B.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use host_agent::relay::{MoveNoticeFailure, Relay, VmIdentity, VmRelay};
use nanoclaw_tests::credential::{
    PASSPHRASE, Sidecar, VM, attach, make_vault, pair, random_secret, sidecar, start_device,
    start_proxy,
};
use nanoclaw_tests::http::http;
use nanoclaw_tests::upstream::{make_ca, start_upstream};
use vault_device::grant::Grant;
use vault_device::vault::Vault;

/// A relay listening on loopback, and the task that serves its listener.
async fn relay(dir: &Path, name: &str) -> (Arc<Relay>, SocketAddr, tokio::task::JoinHandle<()>) {
    let relay = Relay::open(&dir.join(name), name).unwrap();
    let (addr, task) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (relay, addr, task)
}

/// `sidecar`'s VM as `relay` names it, `vm`.
fn attach_as(relay: &Arc<Relay>, vm_dir: &Path, sidecar: &Sidecar, vm: &str) -> VmRelay {
    std::fs::create_dir_all(vm_dir).unwrap();
    relay
        .attach_vm(
            vm_dir,
            VmIdentity {
                vm_id: vm.into(),
                boot_id: sidecar.boot_id,
                sidecar_public_key: sidecar.public,
                tokens: None,
                vmm_uid: None,
            },
        )
        .unwrap()
}

/// The status of `GET /svc/hello` through the proxy at `proxy`.
async fn call(proxy: SocketAddr) -> (u16, String) {
    tokio::task::spawn_blocking(move || http(proxy, "GET /svc/hello HTTP/1.1\r\n\r\n"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_device_follows_a_vm_to_the_named_host_only_and_serves_one_copy() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path());
    let secret = random_secret();
    let upstream = start_upstream(&ca, &["api.test"], &secret).await;
    let api = format!("api.test:{}", upstream.addr.port());
    let vault = make_vault(
        dir.path(),
        &api,
        &format!("other.test:{}", upstream.addr.port()),
        &secret,
    );
    let (a, a_addr, _a) = relay(dir.path(), "host-a").await;
    let (b, b_addr, _b) = relay(dir.path(), "host-b").await;
    let (c, c_addr, _c) = relay(dir.path(), "host-c").await;
    // The vault's grant (svc for VM on host A) is named when A pairs, first.
    for (r, addr) in [(&a, a_addr), (&b, b_addr), (&c, c_addr)] {
        pair(&vault, r, addr).await;
    }
    let _device = start_device(&vault, &ca, vec![("api.test".to_owned(), upstream.addr)]).await;
    for r in [&a, &b, &c] {
        tokio::time::timeout(Duration::from_secs(10), r.wait_linked())
            .await
            .expect("the device links up to each host");
    }

    // On A, the granted VM is served.
    let sc = sidecar();
    let on_a = dir.path().join("a-vm");
    std::fs::create_dir(&on_a).unwrap();
    let _vm_a = attach(&a, &on_a, &sc, sc.public);
    let proxy_a = start_proxy(&on_a, &sc);
    assert_eq!(call(proxy_a).await.0, 200);

    // A VM of the same id on B is another VM: A's grant does not cover it.
    let other = sidecar();
    let same_id_on_b = dir.path().join("b-same-id");
    let _vm_b_same = attach_as(&b, &same_id_on_b, &other, VM);
    let proxy_b_same = start_proxy(&same_id_on_b, &other);
    let (status, body) = call(proxy_b_same).await;
    assert_eq!(status, 403, "{body}");
    // A grant written while its session is open (the sidecar keeps it) serves the next call.
    {
        let mut v = Vault::open(&vault, PASSPHRASE).unwrap();
        v.data.grants.push(Grant {
            credential: "svc".into(),
            host: api.clone(),
            vm: VM.into(),
            on: Some(b.public_key()),
            expires_at: u64::MAX,
            fallback: false,
        });
        v.save().unwrap();
    }
    assert_eq!(call(proxy_b_same).await.0, 200);

    // A notice naming a host the device has not paired is refused, and changes nothing.
    match a.tell_moving(VM, sc.public, [0x77; 32], "vm-moved").await {
        Err(MoveNoticeFailure::Refused(why)) => assert!(why.contains("not paired"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The VM moves from A to B, where it is "vm-moved".
    a.tell_moving(VM, sc.public, b.public_key(), "vm-moved")
        .await
        .expect("the device follows the VM to B");

    // C is paired too, but the notice did not name it: the same sidecar there gets nothing.
    let on_c = dir.path().join("c-vm");
    let _vm_c = attach_as(&c, &on_c, &sc, "vm-moved");
    let (status, body) = call(start_proxy(&on_c, &sc)).await;
    assert_eq!(status, 403, "{body}");

    // On B the VM is served under A's grant, though no grant names "vm-moved".
    let on_b = dir.path().join("b-vm");
    let _vm_b = attach_as(&b, &on_b, &sc, "vm-moved");
    let (status, body) = call(start_proxy(&on_b, &sc)).await;
    assert_eq!(status, 200, "{body}");

    // It has arrived on B: a new session of A's copy, with that key, is no longer served.
    let (status, body) = call(start_proxy(&on_a, &sc)).await;
    assert_ne!(
        status, 200,
        "the source's copy was served after the move: {body}"
    );
}
