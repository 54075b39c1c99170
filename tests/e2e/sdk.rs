//! The Python SDK (`sdk/python`) end to end: from another network namespace, over a veth link,
//! through the remote API over TLS, one VM of the busybox test image runs an agent whose output
//! is streamed and whose exit code comes back, files go in and out of it byte for byte while it
//! runs and off its disk once it has ended, the real VMM pauses and resumes it, and a read
//! token cannot create a sandbox (`sdk/python/tests/test_guest.py`).

use nanoclaw_tests::netns::{ClientNetns, HOST_ADDR};
use nanoclaw_tests::oci::import_test_image;
use nanoclaw_tests::peers::mcp_python;
use nanoclaw_tests::sdk::{RemoteApi, assert_sdk_tests_passed, sdk_tests_in};
use nanoclaw_tests::{Daemon, GuestImage, OutputWithin, RUN_TIMEOUT, free_port};

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn the_python_sdk_runs_an_agent_and_copies_its_files() {
    let guest = GuestImage::from_env().expect("guest image");
    // The client is another machine: its own network namespace, a veth link to the host, and
    // the daemon's certificate names the host's address on that link.
    let client = ClientNetns::create("sdk").expect("the client's network namespace");
    let port = free_port();
    let listen = format!("{HOST_ADDR}:{port}");
    let host = HOST_ADDR.to_string();
    let d = Daemon::start_with(
        &guest.vmlinux,
        &guest.initramfs,
        &["--listen", &listen, "--tls-name", &host],
    )
    .expect("start the daemon");
    import_test_image(&d, "sdk-test", RUN_TIMEOUT).expect("import the test image");
    let api = RemoteApi::at(&d, &format!("https://{HOST_ADDR}:{port}"));
    let out = sdk_tests_in(
        client.command(mcp_python()),
        &api,
        "guest",
        &["test_guest"],
        &[("NANOCLAW_TEST_IMAGE", "sdk-test")],
    )
    .output_within(RUN_TIMEOUT)
    .unwrap_or_else(|e| panic!("the SDK's tests: {e:#}\n{}", d.records()));
    assert_sdk_tests_passed(&out, 2, &d.records());
}
