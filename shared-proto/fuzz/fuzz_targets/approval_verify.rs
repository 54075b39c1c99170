//! Feeds arbitrary bytes to the approval request decoder and the WebAuthn checks.
//!
//! The input is read as an encoded request (a decoded one must re-encode to the same bytes), as
//! an attestation object and as the parts of an assertion against a fixed passkey. Nothing may
//! panic, and a random assertion must never verify.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_proto::approval::{
    ApprovalRequest, Assertion, Passkey, Registration, RelyingParty, verify_assertion,
    verify_registration,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = ApprovalRequest::decode(data) {
        assert_eq!(
            request.encode().expect("a decoded request re-encodes"),
            data
        );
    }
    let rp = RelyingParty {
        rp_id: "localhost".into(),
        origin: "http://localhost:8443".into(),
    };
    let third = data.len() / 3;
    let (a, rest) = data.split_at(third);
    let (b, c) = rest.split_at(third);
    let _ = verify_registration(
        &rp,
        b"challenge",
        &Registration {
            attestation_object: a.to_vec(),
            client_data_json: b.to_vec(),
        },
    );
    // The P-256 generator as a stand-in registered key.
    let mut public_key = vec![0x04];
    public_key.extend_from_slice(&[
        0x6b, 0x17, 0xd1, 0xf2, 0xe1, 0x2c, 0x42, 0x47, 0xf8, 0xbc, 0xe6, 0xe5, 0x63, 0xa4, 0x40,
        0xf2, 0x77, 0x03, 0x7d, 0x81, 0x2d, 0xeb, 0x33, 0xa0, 0xf4, 0xa1, 0x39, 0x45, 0xd8, 0x98,
        0xc2, 0x96, 0x4f, 0xe3, 0x42, 0xe2, 0xfe, 0x1a, 0x7f, 0x9b, 0x8e, 0xe7, 0xeb, 0x4a, 0x7c,
        0x0f, 0x9e, 0x16, 0x2b, 0xce, 0x33, 0x57, 0x6b, 0x31, 0x5e, 0xce, 0xcb, 0xb6, 0x40, 0x68,
        0x37, 0xbf, 0x51, 0xf5,
    ]);
    let passkeys = [Passkey {
        credential_id: b"id".to_vec(),
        public_key,
        counter: 0,
    }];
    let assertion = Assertion {
        credential_id: b"id".to_vec(),
        authenticator_data: a.to_vec(),
        client_data_json: b.to_vec(),
        signature: c.to_vec(),
    };
    assert!(verify_assertion(&rp, &[0; 32], &passkeys, &assertion).is_err());
});
