//! `vault-device passkey import|list`: the host's passkeys file becomes the device's, 0600,
//! with the relying party; a malformed or empty file, or a wrong passphrase, is refused and
//! leaves the stored passkeys as they were. `vault-device passkey register` and `serve
//! --approval-listen`: the device's own page, on loopback only.

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

#[test]
fn the_approval_page_listens_on_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("d.vault");
    Vault::create(&vault, PASSPHRASE.as_bytes(), KdfParams::FAST_FOR_TESTS).unwrap();
    for args in [
        &["passkey", "register", "--listen", "0.0.0.0:0"][..],
        &["serve", "--approval-listen", "0.0.0.0:0"][..],
    ] {
        let out = run(&vault, PASSPHRASE, args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("loopback only"), "{args:?}: {err}");
    }
}

#[test]
fn passkey_register_prints_a_one_time_link_to_the_devices_page() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("d.vault");
    Vault::create(&vault, PASSPHRASE.as_bytes(), KdfParams::FAST_FOR_TESTS).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vault-device"))
        .arg("--vault")
        .arg(&vault)
        .args(["passkey", "register", "--listen", "127.0.0.1:0"])
        .env("VAULT_DEVICE_PASSPHRASE", PASSPHRASE)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let link = lines
        .by_ref()
        .map(Result::unwrap)
        .find(|l| l.starts_with("http://"))
        .unwrap();
    let rest = link.strip_prefix("http://localhost:").unwrap();
    let (port, token) = rest.split_once("/register#").unwrap();
    assert!(token.len() >= 32, "{link}");
    // The page is there, on loopback, for the origin it names.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap();
    write!(
        s,
        "GET /register HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("/static/webauthn.js"));
    child.kill().unwrap();
    child.wait().unwrap();
    // Nothing registered, nothing stored.
    assert!(!PasskeyFile::path_for(&vault).exists());
}
