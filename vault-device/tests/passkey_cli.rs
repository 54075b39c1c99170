//! `vault-device passkey import|list`: the host's passkeys file becomes the device's, 0600,
//! with the relying party; a malformed or empty file, or a wrong passphrase, is refused and
//! leaves the stored passkeys as they were.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use shared_proto::approval::Passkey;
use vault_device::approval::{PasskeyFile, fingerprint};
use vault_device::vault::{KdfParams, Vault};

const PASSPHRASE: &str = "correct horse battery staple";

fn run(vault: &Path, passphrase: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vault-device"))
        .arg("--vault")
        .arg(vault)
        .args(args)
        .env("VAULT_DEVICE_PASSPHRASE", passphrase)
        .output()
        .unwrap()
}

#[test]
fn import_and_list_passkeys() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("d.vault");
    Vault::create(&vault, PASSPHRASE.as_bytes(), KdfParams::FAST_FOR_TESTS).unwrap();
    let passkey = Passkey {
        credential_id: b"cred-1".to_vec(),
        public_key: vec![4; 65],
        counter: 7,
    };
    let host_file = dir.path().join("passkeys.json");
    std::fs::write(
        &host_file,
        serde_json::to_vec(&vec![passkey.clone()]).unwrap(),
    )
    .unwrap();
    let import = |file: &Path, passphrase: &str| {
        run(
            &vault,
            passphrase,
            &[
                "passkey",
                "import",
                file.to_str().unwrap(),
                "--rp-id",
                "host.example",
                "--origin",
                "https://host.example:8443",
            ],
        )
    };
    let out = import(&host_file, PASSPHRASE);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PasskeyFile::path_for(&vault);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let stored = PasskeyFile::load(&path).unwrap();
    assert_eq!(stored.passkeys, vec![passkey.clone()]);
    assert_eq!(stored.rp_id, "host.example");
    assert_eq!(stored.origin, "https://host.example:8443");

    let out = run(&vault, PASSPHRASE, &["passkey", "list"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&fingerprint(&passkey)), "{text}");
    assert!(text.contains(&hex::encode(b"cred-1")), "{text}");

    // Refused, and the stored passkeys stay.
    let bad = dir.path().join("bad.json");
    for (body, passphrase) in [
        (&b"{"[..], PASSPHRASE),
        (b"[]", PASSPHRASE),
        (&std::fs::read(&host_file).unwrap()[..], "wrong passphrase"),
    ] {
        std::fs::write(&bad, body).unwrap();
        let out = import(&bad, passphrase);
        assert!(!out.status.success());
        assert!(!out.stderr.is_empty());
        assert_eq!(PasskeyFile::load(&path).unwrap(), stored);
    }
}
