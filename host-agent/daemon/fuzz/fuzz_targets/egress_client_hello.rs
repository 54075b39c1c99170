//! Fuzzes the SNI check's ClientHello parser (`host_agent::egress::client_hello::parse`) with
//! the bytes a hostile guest sends first on a port-443 connection. It must never panic; a name
//! it returns must be a plain lower-case host name; and a hello it accepts must be accepted the
//! same way with any bytes after it, while every shorter prefix is `Incomplete` or an error,
//! never a different name.

#![no_main]

use host_agent::egress::client_hello::{HelloError, parse};
use host_agent::egress::rules::check_name;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(hello) = parse(data) else {
        return;
    };
    if let Some(sni) = &hello.sni {
        assert!(check_name(sni).is_ok(), "accepted name {sni:?}");
        assert_eq!(*sni, sni.to_ascii_lowercase());
    }
    let mut longer = data.to_vec();
    longer.extend_from_slice(&[0x17, 3, 3, 0, 1, 0]);
    assert_eq!(parse(&longer), Ok(hello.clone()));
    for n in (0..data.len()).step_by(7) {
        match parse(&data[..n]) {
            Ok(h) => assert_eq!(h, hello, "prefix {n} parsed differently"),
            Err(HelloError::Incomplete) | Err(_) => {}
        }
    }
});
