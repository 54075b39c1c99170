//! End-to-end test fixtures: find the guest image and the binaries under test, boot microVMs.
