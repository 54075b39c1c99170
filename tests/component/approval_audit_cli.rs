//! `nanoclaw audit verify` and `nanoclaw audit tail` on a real audit file: a sound chain
//! verifies and prints its head; flipping one byte makes `verify` fail at that record.

use nanoclaw_audit::AuditLog;
use nanoclaw_tests::{CLI_TIMEOUT, OutputWithin, text};
use serde_json::json;

fn nanoclaw(args: &[&str]) -> (i32, String, String) {
    let out = nanoclaw_tests::nanoclaw(args)
        .output_within(CLI_TIMEOUT)
        .expect("run nanoclaw");
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

#[test]
fn flipping_one_byte_fails_verify_at_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    let log = AuditLog::open(&path).unwrap();
    for i in 0..5 {
        log.append(
            "approval_request",
            json!({"approval_id": format!("req-{i}")}),
        )
        .unwrap();
    }
    drop(log);
    let file = path.to_str().unwrap();

    let (code, out, err) = nanoclaw(&["audit", "verify", "--file", file]);
    assert_eq!(code, 0, "{err}");
    let summary = nanoclaw_audit::verify(&path).unwrap();
    assert_eq!(
        out,
        format!(
            "ok: 5 records, head {}\ncheckpoints not checked (no --device-key)\n",
            summary.head
        )
    );

    let (code, out, err) = nanoclaw(&["audit", "tail", "-n", "2", "--file", file]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("req-3") && lines[1].contains("req-4"),
        "{out}"
    );

    // Flip one byte inside the 4th record's data ("req-3" -> "req-2").
    let original = std::fs::read(&path).unwrap();
    let starts: Vec<usize> = std::iter::once(0)
        .chain(
            original
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect();
    let line4 = &original[starts[3]..starts[4]];
    let at = starts[3] + line4.windows(5).position(|w| w == b"req-3").unwrap() + 4;
    let mut tampered = original.clone();
    tampered[at] ^= 0x01;
    std::fs::write(&path, &tampered).unwrap();
    let (code, out, err) = nanoclaw(&["audit", "verify", "--file", file]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("audit chain broken at line 4 (seq 3): hash does not match the record"),
        "{err}"
    );
    // tail refuses a broken chain too.
    let (code, _, err) = nanoclaw(&["audit", "tail", "--file", file]);
    assert_eq!(code, 1, "{err}");

    // Every single-byte flip anywhere in the file is caught, at the record it is in.
    for (line_no, w) in starts.windows(2).enumerate() {
        for at in [w[0], w[0] + 40, w[1] - 2] {
            let mut t = original.clone();
            t[at] ^= 0x20;
            std::fs::write(&path, &t).unwrap();
            let (code, _, err) = nanoclaw(&["audit", "verify", "--file", file]);
            assert_eq!(code, 1, "flip at byte {at}");
            assert!(
                err.contains(&format!("broken at line {}", line_no + 1)),
                "flip at byte {at}: {err}"
            );
        }
    }
}

#[test]
fn approvals_help_says_approving_needs_the_passkey() {
    let (code, out, _) = nanoclaw(&["approvals", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Approving from the CLI is not possible"),
        "{out}"
    );
}
