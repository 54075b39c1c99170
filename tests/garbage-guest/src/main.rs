//! `garbage-guest`: a hostile guest for the end-to-end tests, packed as `/init` instead of the
//! sidecar.
//!
//! It skips the sidecar protocol and opens the host control port again and again, each time
//! sending a different kind of garbage: an oversized length prefix, random bytes, a truncated
//! frame, CBOR of the wrong direction, a `Hello` with a wrong protocol version, a flood of zeros.
//! After each attempt it waits for the host to close the connection, at most `WAIT` (a host that
//! never closes is reported by attempt and kind, not left as a silent hang). When every attempt is
//! done it prints a summary on the console and resets the VM.

use std::io::{ErrorKind, Read, Write};
use std::time::Instant;

use shared_proto::ports::{CONTROL_PORT, HOST_CID};
use shared_proto::{GuestToHost, HostToGuest, encode_frame};
use vpod_sidecar::init::{mount_basics, open_console, reset_vm};
use vpod_sidecar::vsock::VsockStream;

/// How many connections to open (several rounds of every kind of garbage).
const ATTEMPTS: usize = 60;

/// How long one attempt waits for the host to close (the host's hello timeout is 10 s).
const WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn garbage(kind: usize, seed: &mut u64) -> Vec<u8> {
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                *seed as u8
            })
            .collect()
    };
    match kind % 6 {
        0 => u32::MAX.to_be_bytes().to_vec(),
        1 => {
            let mut v = 64u32.to_be_bytes().to_vec();
            v.extend(random(64));
            v
        }
        2 => {
            let mut v = 1000u32.to_be_bytes().to_vec();
            v.extend(random(10));
            v
        }
        3 => encode_frame(&HostToGuest::Shutdown).unwrap_or_default(),
        4 => encode_frame(&GuestToHost::Hello {
            protocol_version: u32::MAX,
            sidecar_version: "garbage".into(),
            boot_id: [7; 16],
            ephemeral_public_key: [9; 32],
        })
        .unwrap_or_default(),
        _ => vec![0; 64 * 1024],
    }
}

fn main() {
    let _ = mount_basics();
    let mut console = open_console().ok();
    let mut say = |line: &str| {
        if let Some(c) = console.as_mut() {
            let _ = writeln!(c, "garbage-guest: {line}");
        }
    };
    let start = Instant::now();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut closed_by_host = 0;
    for attempt in 0..ATTEMPTS {
        let mut stream = match VsockStream::connect(HOST_CID, CONTROL_PORT) {
            Ok(s) => s,
            Err(e) => {
                say(&format!("attempt {attempt}: connect failed: {e}"));
                std::thread::sleep(std::time::Duration::from_millis(200));
                continue;
            }
        };
        if let Err(e) = stream.set_timeouts(WAIT) {
            say(&format!("attempt {attempt}: cannot set timeouts: {e}"));
        }
        let sent = Instant::now();
        if let Err(e) = stream.write_all(&garbage(attempt, &mut seed)) {
            say(&format!(
                "attempt {attempt} (kind {}): write: {e}",
                attempt % 6
            ));
        }
        // Wait for the host to close the connection; whatever it answers is drained.
        let mut sink = [0u8; 4096];
        let closed = loop {
            match stream.read(&mut sink) {
                Ok(0) => break true,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break false;
                }
                Err(_) => break true,
                Ok(_) => {}
            }
        };
        if closed {
            closed_by_host += 1;
        } else {
            say(&format!(
                "attempt {attempt} (kind {}): the host did not close within {} s",
                attempt % 6,
                sent.elapsed().as_secs()
            ));
        }
    }
    say(&format!(
        "done: {closed_by_host} of {ATTEMPTS} connections closed by the host in {} ms",
        start.elapsed().as_millis()
    ));
    let err = reset_vm();
    say(&format!("reset failed: {err}"));
}
