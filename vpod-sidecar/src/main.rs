//! vpod-sidecar: PID 1 in the guest.

fn main() {}
