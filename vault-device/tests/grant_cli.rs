//! `vault-device grant --on` and `list` with several paired hosts: a grant names the paired host
//! of its VM (by name, address or key), the only one by default; with several and no `--on`, or
//! none paired, it fails and says why, changing nothing.

use std::path::Path;
use std::process::{Command, Output};

use vault_device::vault::{Entry, KdfParams, Pairing, Secret, Vault};

const PASSPHRASE: &str = "correct horse battery staple";

fn run(vault: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vault-device"))
        .arg("--vault")
        .arg(vault)
        .args(args)
        .env("VAULT_DEVICE_PASSPHRASE", PASSPHRASE)
        .output()
        .unwrap()
}

fn pair(vault: &Path, name: &str, key: u8) {
    let mut v = Vault::open(vault, PASSPHRASE.as_bytes()).unwrap();
    v.data.add_pairing(Pairing {
        address: format!("{name}.test:7000"),
        host_public_key: [key; 32],
        host_name: name.into(),
    });
    v.save().unwrap();
}

fn grants_on(vault: &Path) -> Vec<Option<[u8; 32]>> {
    let v = Vault::open(vault, PASSPHRASE.as_bytes()).unwrap();
    v.data.grants.iter().map(|g| g.on).collect()
}

#[track_caller]
fn fails_with(out: &Output, says: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for s in says {
        assert!(stderr.contains(s), "{stderr:?} does not say {s:?}");
    }
}

#[test]
fn a_grant_names_its_paired_host() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("d.vault");
    let mut v = Vault::create(&vault, PASSPHRASE.as_bytes(), KdfParams::FAST_FOR_TESTS).unwrap();
    v.add(Entry {
        name: "svc".into(),
        secret: Secret::new(b"k".to_vec()),
        hosts: vec!["api.test".into()],
        header: "Authorization".into(),
        format: "Bearer {}".into(),
    })
    .unwrap();
    v.save().unwrap();
    let grant = |on: Option<&str>| {
        let mut args = vec!["grant", "svc", "--host", "api.test", "--vm", "vm-1"];
        if let Some(on) = on {
            args.extend(["--on", on]);
        }
        run(&vault, &args)
    };

    fails_with(&grant(None), &["not paired", "vault-device pair"]);
    fails_with(&grant(Some("host-a")), &["not paired"]);

    pair(&vault, "host-a", 0xa);
    let out = grant(None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(grants_on(&vault), [Some([0xa; 32])]);

    pair(&vault, "host-b", 0xb);
    fails_with(
        &grant(None),
        &[
            "several hosts are paired",
            "--on",
            "host-a at host-a.test:7000",
            "host-b",
        ],
    );
    fails_with(
        &grant(Some("host-c")),
        &["no paired host is named \"host-c\""],
    );
    assert_eq!(
        grants_on(&vault).len(),
        1,
        "a refused grant changes nothing"
    );
    assert!(grant(Some("host-b")).status.success());
    assert!(grant(Some("host-a.test:7000")).status.success());
    assert!(grant(Some(&hex::encode([0xb; 32]))).status.success());
    assert_eq!(
        grants_on(&vault),
        [
            Some([0xa; 32]),
            Some([0xb; 32]),
            Some([0xa; 32]),
            Some([0xb; 32])
        ]
    );

    let out = run(&vault, &["list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains(&format!(
            "paired host-b at host-b.test:7000 key {}",
            hex::encode([0xb; 32])
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("grant svc host api.test on host-a vm vm-1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("grant svc host api.test on host-b vm vm-1"),
        "{stdout}"
    );
}
