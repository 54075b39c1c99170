use serde_bytes::ByteBuf;

use super::*;

fn request() -> SidecarToDevice {
    SidecarToDevice::Request(ProxyRequest {
        target: ProxyTarget::Absolute {
            authority: "api.example.com:8443".into(),
            path_and_query: "/v1/models?x=1".into(),
        },
        method: "POST".into(),
        headers: vec![("content-type".into(), ByteBuf::from(b"text/plain".to_vec()))],
    })
}

fn tokenize_message(issued: usize, len: usize) -> HostToDevice {
    HostToDevice::Tokenize {
        vm_id: "v".repeat(MAX_NAME_LEN),
        spec: TokenizeSpec {
            enforce: true,
            key: [0xff; 32],
            llm_hosts: (0..MAX_LLM_HOSTS / 2)
                .map(|i| format!("{}{i}:65535", "h".repeat(MAX_NAME_LEN - 9)))
                .collect(),
            restore_hosts: (MAX_LLM_HOSTS / 2..MAX_LLM_HOSTS)
                .map(|i| format!("{}{i}:65535", "r".repeat(MAX_NAME_LEN - 9)))
                .collect(),
        },
        issued: (0..issued)
            .map(|_| IssuedToken {
                surrogate: "x".repeat(len),
                kind: TokenKind::ApiKey,
                prefix_len: u16::try_from(len).unwrap_or(u16::MAX),
                alphabet: 0xff,
            })
            .collect(),
    }
}

#[test]
fn the_largest_tokenize_message_fits_and_a_larger_one_is_refused() {
    let msg = tokenize_message(MAX_ISSUED_PER_MESSAGE, MAX_SURROGATE_LEN);
    let bytes = encode_message(&msg).unwrap();
    assert!(
        bytes.len() + NOISE_TAG <= MAX_NOISE_MESSAGE,
        "{}",
        bytes.len()
    );
    assert_eq!(decode_message::<HostToDevice>(&bytes).unwrap(), msg);
    for bad in [
        tokenize_message(MAX_ISSUED_PER_MESSAGE + 1, 8),
        tokenize_message(1, MAX_SURROGATE_LEN + 1),
        tokenize_message(1, 0),
    ] {
        let bytes = encode_message(&bad).unwrap();
        assert!(matches!(
            decode_message::<HostToDevice>(&bytes),
            Err(CredentialError::InvalidField { field: "issued" })
        ));
    }
    // The key never shows in a debug print.
    let HostToDevice::Tokenize { spec, .. } = msg else {
        unreachable!()
    };
    assert!(!format!("{spec:?}").contains("255"));
}

#[test]
fn messages_round_trip() {
    let msg = request();
    let bytes = encode_message(&msg).unwrap();
    assert_eq!(decode_message::<SidecarToDevice>(&bytes).unwrap(), msg);
    let open = HostToDevice::Open {
        session: 7,
        vm_id: "vm-1".into(),
        boot_id: [3; 16],
        sidecar_public_key: [9; 32],
    };
    let bytes = encode_message(&open).unwrap();
    assert_eq!(decode_message::<HostToDevice>(&bytes).unwrap(), open);
    let ask = DeviceToHost::ApprovalNeeded {
        request: [4; 16],
        vm_id: "vm-1".into(),
        credential: "openai".into(),
        target_host: "api.openai.com:443".into(),
        on_device: false,
    };
    let bytes = encode_message(&ask).unwrap();
    assert_eq!(decode_message::<DeviceToHost>(&bytes).unwrap(), ask);
    let answer = HostToDevice::Approval {
        request: [4; 16],
        answer: ApprovalAnswer::Approved {
            canonical_request: vec![1, 2, 3],
            assertion: crate::approval::Assertion {
                credential_id: vec![5; 16],
                authenticator_data: vec![6; 37],
                client_data_json: b"{}".to_vec(),
                signature: vec![7; 70],
            },
        },
    };
    let bytes = encode_message(&answer).unwrap();
    assert_eq!(decode_message::<HostToDevice>(&bytes).unwrap(), answer);
    let bad = encode_message(&DeviceToHost::ApprovalNeeded {
        request: [4; 16],
        vm_id: "vm-1".into(),
        credential: "openai".into(),
        target_host: "evil.com/x".into(),
        on_device: false,
    })
    .unwrap();
    assert!(matches!(
        decode_message::<DeviceToHost>(&bad),
        Err(CredentialError::InvalidField { field: "authority" })
    ));
}

#[test]
fn whatever_decodes_encodes_again() {
    let approval = |n: usize| HostToDevice::Approval {
        request: [1; 16],
        answer: ApprovalAnswer::Approved {
            canonical_request: vec![0; n],
            assertion: crate::approval::Assertion {
                credential_id: vec![],
                authenticator_data: vec![],
                client_data_json: vec![],
                signature: vec![],
            },
        },
    };
    let raw = |msg: &HostToDevice| {
        let mut out = Vec::new();
        ciborium::into_writer(msg, &mut out).unwrap();
        out
    };
    let base = raw(&approval(1000)).len();
    let fits = 1000 + (MAX_NOISE_MESSAGE - NOISE_TAG) - base;
    let bytes = raw(&approval(fits));
    assert_eq!(bytes.len(), MAX_NOISE_MESSAGE - NOISE_TAG);
    let msg = decode_message::<HostToDevice>(&bytes).unwrap();
    assert_eq!(encode_message(&msg).unwrap(), bytes);
    let bytes = raw(&approval(fits + 1));
    assert!(matches!(
        decode_message::<HostToDevice>(&bytes),
        Err(CredentialError::RecordTooLarge(_))
    ));
}

#[test]
fn a_full_chunk_fits_a_noise_message() {
    let bytes = encode_message(&DeviceToSidecar::Body(vec![0xff; MAX_CHUNK])).unwrap();
    assert!(bytes.len() + NOISE_TAG <= MAX_NOISE_MESSAGE);
    let bytes = encode_message(&HostToDevice::Data {
        session: u64::MAX,
        bytes: vec![0xff; MAX_LINK_DATA],
    })
    .unwrap();
    assert!(bytes.len() + NOISE_TAG <= MAX_NOISE_MESSAGE);
}

#[test]
fn oversize_and_bad_fields_are_refused() {
    let big = encode_message(&DeviceToSidecar::Body(vec![0; MAX_CHUNK + 1])).unwrap();
    assert!(matches!(
        decode_message::<DeviceToSidecar>(&big),
        Err(CredentialError::InvalidField { field: "bytes" })
    ));
    let header_injection = SidecarToDevice::Request(ProxyRequest {
        target: ProxyTarget::Service {
            name: "openai".into(),
            path_and_query: "/v1".into(),
        },
        method: "GET".into(),
        headers: vec![("x".into(), ByteBuf::from(b"a\r\nHost: evil".to_vec()))],
    });
    let bytes = encode_message(&header_injection).unwrap();
    assert!(decode_message::<SidecarToDevice>(&bytes).is_err());
    for authority in ["", "a b", "host:99999", "host:", "h/x", "user@host"] {
        let seal = SidecarToDevice::Seal {
            target: ProxyTarget::Absolute {
                authority: authority.into(),
                path_and_query: "/".into(),
            },
        };
        let bytes = encode_message(&seal).unwrap();
        assert!(
            decode_message::<SidecarToDevice>(&bytes).is_err(),
            "{authority:?} accepted"
        );
    }
    let relative = SidecarToDevice::Request(ProxyRequest {
        target: ProxyTarget::Service {
            name: "openai".into(),
            path_and_query: "v1".into(),
        },
        method: "GET".into(),
        headers: vec![],
    });
    assert!(decode_message::<SidecarToDevice>(&encode_message(&relative).unwrap()).is_err());
}

#[test]
fn the_wildcard_is_no_vm_id_on_the_wire() {
    let open = |vm_id: &str| HostToDevice::Open {
        session: 1,
        vm_id: vm_id.into(),
        boot_id: [0; 16],
        sidecar_public_key: [0; 32],
    };
    let bytes = encode_message(&open("*")).unwrap();
    assert!(matches!(
        decode_message::<HostToDevice>(&bytes),
        Err(CredentialError::InvalidField { field: "vm_id" })
    ));
    let bytes = encode_message(&open("vm-1")).unwrap();
    assert!(decode_message::<HostToDevice>(&bytes).is_ok());
    let ask = DeviceToHost::ApprovalNeeded {
        request: [0; 16],
        vm_id: "*".into(),
        credential: "openai".into(),
        target_host: "api.openai.com".into(),
        on_device: false,
    };
    let bytes = encode_message(&ask).unwrap();
    assert!(decode_message::<DeviceToHost>(&bytes).is_err());
}

/// `ApprovalNeeded` as it was before `on_device`, for the wire compatibility test.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
enum OldDeviceToHost {
    ApprovalNeeded {
        #[serde(with = "serde_bytes")]
        request: [u8; 16],
        vm_id: String,
        credential: String,
        target_host: String,
    },
}

#[test]
fn approval_needed_on_device_is_wire_compatible_both_ways() {
    // An older device's ask decodes, as an ask the host shows.
    let old = OldDeviceToHost::ApprovalNeeded {
        request: [4; 16],
        vm_id: "vm-1".into(),
        credential: "openai".into(),
        target_host: "api.openai.com:443".into(),
    };
    let mut bytes = Vec::new();
    ciborium::into_writer(&old, &mut bytes).unwrap();
    assert_eq!(
        decode_message::<DeviceToHost>(&bytes).unwrap(),
        DeviceToHost::ApprovalNeeded {
            request: [4; 16],
            vm_id: "vm-1".into(),
            credential: "openai".into(),
            target_host: "api.openai.com:443".into(),
            on_device: false,
        }
    );
    // A notice that the request waits on the device round-trips, and an older host still
    // decodes it (the field it does not know is skipped).
    let notice = DeviceToHost::ApprovalNeeded {
        request: [4; 16],
        vm_id: "vm-1".into(),
        credential: "openai".into(),
        target_host: "api.openai.com:443".into(),
        on_device: true,
    };
    let bytes = encode_message(&notice).unwrap();
    assert_eq!(decode_message::<DeviceToHost>(&bytes).unwrap(), notice);
    let seen_by_old: OldDeviceToHost = ciborium::from_reader(bytes.as_slice()).unwrap();
    assert_eq!(seen_by_old, old);
}

#[test]
fn trailing_and_garbage_are_refused() {
    let mut bytes = encode_message(&SidecarToDevice::End).unwrap();
    bytes.push(0);
    assert!(matches!(
        decode_message::<SidecarToDevice>(&bytes),
        Err(CredentialError::TrailingBytes(1))
    ));
    assert!(matches!(
        decode_message::<SidecarToDevice>(&[0xff, 0x00]),
        Err(CredentialError::Malformed(_))
    ));
}

#[test]
fn pairing_codes_normalize_and_derive_the_same_psk() {
    let code = pairing_code([0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]);
    assert_eq!(code.len(), PAIRING_CODE_SYMBOLS + 1);
    let typed = code.to_lowercase().replace('-', " ");
    assert_eq!(pairing_psk(&code).unwrap(), pairing_psk(&typed).unwrap());
    assert_ne!(
        pairing_psk(&code).unwrap(),
        pairing_psk(&pairing_code([0; 8])).unwrap()
    );
    for bad in ["", "12345", "12345-123456", "UUUUU-UUUUU", "12345-1234é"] {
        assert!(pairing_psk(bad).is_err(), "{bad:?} accepted");
    }
    // Look-alikes read as digits.
    assert_eq!(
        pairing_psk("0000000001").unwrap(),
        pairing_psk("OOOOO-OOOOI").unwrap()
    );
}

#[test]
fn prologue_binds_vm_and_boot() {
    let a = session_prologue("vm-1", &[1; 16]).unwrap();
    assert_ne!(a, session_prologue("vm-2", &[1; 16]).unwrap());
    assert_ne!(a, session_prologue("vm-1", &[2; 16]).unwrap());
    assert!(session_prologue("", &[1; 16]).is_err());
}

#[test]
fn checkpoint_messages_round_trip_and_bad_labels_are_refused() {
    let ask = HostToDevice::Checkpoint {
        log: "host/audit.ndjson".into(),
        seq: 41,
        head: [3; 32],
        unix_time: 1_700_000_000,
    };
    let bytes = encode_message(&ask).unwrap();
    assert_eq!(decode_message::<HostToDevice>(&bytes).unwrap(), ask);
    let signed = DeviceToHost::CheckpointSigned {
        log: "host/audit.ndjson".into(),
        seq: 41,
        head: [3; 32],
        unix_time: 1_700_000_000,
        device_key: [4; 32],
        signature: [5; 64],
    };
    let bytes = encode_message(&signed).unwrap();
    assert_eq!(decode_message::<DeviceToHost>(&bytes).unwrap(), signed);
    for log in [
        String::new(),
        "x".repeat(MAX_CHECKPOINT_LABEL + 1),
        "a\nb".into(),
    ] {
        let ask = HostToDevice::Checkpoint {
            log,
            seq: 1,
            head: [0; 32],
            unix_time: 1,
        };
        let bytes = encode_message(&ask).unwrap();
        assert!(matches!(
            decode_message::<HostToDevice>(&bytes),
            Err(CredentialError::InvalidField { field: "log" })
        ));
    }
    let refused = DeviceToHost::CheckpointRefused {
        seq: 1,
        reason: "\u{7}".into(),
    };
    let bytes = encode_message(&refused).unwrap();
    assert!(decode_message::<DeviceToHost>(&bytes).is_err());
}

#[test]
fn move_messages_round_trip_and_bad_ids_are_refused() {
    let notice = HostToDevice::Moving {
        vm_id: "vm-1".into(),
        boot_key: [7; 32],
        to_host: [8; 32],
        to_vm: "vm-9".into(),
    };
    let bytes = encode_message(&notice).unwrap();
    assert_eq!(decode_message::<HostToDevice>(&bytes).unwrap(), notice);
    for answer in [
        DeviceToHost::MoveNoted {
            vm_id: "vm-1".into(),
            refused: None,
        },
        DeviceToHost::MoveNoted {
            vm_id: "vm-1".into(),
            refused: Some("that host is not paired".into()),
        },
    ] {
        let bytes = encode_message(&answer).unwrap();
        assert_eq!(decode_message::<DeviceToHost>(&bytes).unwrap(), answer);
    }
    // `*` names every VM of a host in a grant: neither end of a move may be it.
    for (vm_id, to_vm) in [("*", "vm-9"), ("vm-1", "*"), ("", "vm-9"), ("vm-1", "a\nb")] {
        let bad = HostToDevice::Moving {
            vm_id: vm_id.into(),
            boot_key: [7; 32],
            to_host: [8; 32],
            to_vm: to_vm.into(),
        };
        let bytes = encode_message(&bad).unwrap();
        assert!(
            decode_message::<HostToDevice>(&bytes).is_err(),
            "{vm_id:?} {to_vm:?}"
        );
    }
    let bad = DeviceToHost::MoveNoted {
        vm_id: "vm-1".into(),
        refused: Some("x".repeat(10_000)),
    };
    let bytes = encode_message(&bad).unwrap();
    assert!(decode_message::<DeviceToHost>(&bytes).is_err());
}
